"""Measure the installed size of the slim runtime venv against the export venv.

    python tools/venv_sizes.py
    python tools/venv_sizes.py --venvs runtime onnx   # re-measure these, keep the other rows
    python tools/venv_sizes.py --tables-only     # the docs section again from bench/results/venv_sizes.json

Creates fresh venvs in a temporary folder with this interpreter (``pip install .``, ``pip install
'.[onnx]'``: the runtime with what lowering a portable model at load needs, and ``pip install
'.[export]'``), measures them with ``du``, writes bench/results/venv_sizes.json and the section
``sizes`` of docs/running.md. Takes a few minutes (the export venv holds PyTorch).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _report  # noqa: E402

ROOT = _report.ROOT
RESULTS = _report.RESULTS / "venv_sizes.json"
PAGE, SECTIONS = "running.md", ("sizes",)


def venv_size(extra: str, where: Path) -> tuple[int, list[str]]:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    pip = where / "bin" / "pip"
    subprocess.run([str(pip), "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(pip), "install", "-q", f"{ROOT}{extra}"], check=True)
    size = int(subprocess.run(["du", "-sk", str(where)], capture_output=True, text=True, check=True).stdout.split()[0])
    frozen = subprocess.run([str(pip), "freeze"], capture_output=True, text=True, check=True).stdout.split()
    return size * 1024, frozen


VENVS = {"runtime": "", "onnx": "[onnx]", "export": "[export]"}


def measure(out: Path, venvs: list[str]) -> dict:
    meta = _report.start_run(PAGE, SECTIONS, versions=("pip",))
    rows = []
    with tempfile.TemporaryDirectory(prefix="gradmap-venvs-") as tmp:
        for name in venvs:
            size, packages = venv_size(VENVS[name], Path(tmp) / name)
            rows.append({"venv": name, "install": f"pip install '.{VENVS[name]}'" if VENVS[name] else "pip install .",
                         "bytes": size, "package_count": len(packages), "packages": packages,
                         "has_torch": any(p.lower().startswith("torch==") for p in packages)})
    if set(venvs) != set(VENVS) and out.is_file():  # keep the rows not re-measured
        saved = _report.read_results(out)
        rows += [r for r in saved["rows"] if r["venv"] not in venvs]
        meta = _report.merge_update(meta, saved["meta"], venvs)
    rows.sort(key=lambda r: list(VENVS).index(r["venv"]))
    return _report.write_results(out, meta, rows)


def render(data: dict) -> str:
    rows = {r["venv"]: r for r in data["rows"]}
    slim, full = rows["runtime"], rows["export"]
    mb = 1024 * 1024
    text = (f"{_report.machine_line(data['meta'])}\n\n"
            f"Installed size, fresh venvs (`python tools/venv_sizes.py`): runtime `pip install .` "
            f"**{slim['bytes'] / mb:.0f} MB** ({slim['package_count']} packages, torch "
            f"{'present' if slim['has_torch'] else 'absent'}); export `pip install '.[export]'` "
            f"**{full['bytes'] / mb:.0f} MB**, {full['bytes'] / slim['bytes']:.0f}x as much.")
    if "onnx" in rows:
        lowering = rows["onnx"]
        added = sorted({p.split("==")[0] for p in lowering["packages"]} - {p.split("==")[0] for p in slim["packages"]}
                       - {"gradmap", "@"} - {p for p in lowering["packages"] if p.startswith("file:")})
        text += (f" The runtime with `[onnx]` (`pip install '.[onnx]'`: onnx and onnx-ir, which lowering a portable "
                 f"model at load needs) **{lowering['bytes'] / mb:.0f} MB**, "
                 f"{(lowering['bytes'] - slim['bytes']) / mb:.0f} MB more ({', '.join(added)}).")
    return text


def sections(data: dict) -> dict[str, str]:
    return {"sizes": render(data)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venvs", nargs="+", choices=list(VENVS), default=list(VENVS),
                        help="the venvs to measure (default: all); the results file keeps the others' rows")
    _report.add_flags(parser, RESULTS)
    args = parser.parse_args()
    data = _report.read_results(args.out) if args.tables_only else measure(args.out, args.venvs)
    print(render(data))
    if not args.no_docs:
        _report.publish(PAGE, sections(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
