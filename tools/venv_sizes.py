"""Measure the installed size of the slim runtime venv against the export venv.

    python tools/venv_sizes.py
    python tools/venv_sizes.py --tables-only     # the docs section again from bench/results/venv_sizes.json

Creates two fresh venvs in a temporary folder with this interpreter (``pip install .`` and
``pip install '.[export]'``), measures them with ``du``, writes bench/results/venv_sizes.json and the
section ``sizes`` of docs/running.md. Takes a few minutes (the export venv holds PyTorch).
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


def measure(out: Path) -> dict:
    meta = _report.start_run(PAGE, SECTIONS, versions=("pip",))
    with tempfile.TemporaryDirectory(prefix="gradmap-venvs-") as tmp:
        slim, slim_pkgs = venv_size("", Path(tmp) / "slim")
        full, full_pkgs = venv_size("[export]", Path(tmp) / "export")
    rows = [{"venv": "runtime", "install": "pip install .", "bytes": slim, "package_count": len(slim_pkgs),
             "packages": slim_pkgs, "has_torch": any(p.lower().startswith("torch==") for p in slim_pkgs)},
            {"venv": "export", "install": "pip install '.[export]'", "bytes": full, "package_count": len(full_pkgs)}]
    return _report.write_results(out, meta, rows)


def render(data: dict) -> str:
    slim, full = (next(r for r in data["rows"] if r["venv"] == name) for name in ("runtime", "export"))
    mb = 1024 * 1024
    return (f"{_report.machine_line(data['meta'])}\n\n"
            f"Installed size, fresh venvs (`python tools/venv_sizes.py`): runtime `pip install .` "
            f"**{slim['bytes'] / mb:.0f} MB** ({slim['package_count']} packages, torch "
            f"{'present' if slim['has_torch'] else 'absent'}); export `pip install '.[export]'` "
            f"**{full['bytes'] / mb:.0f} MB**, {full['bytes'] / slim['bytes']:.0f}x as much.")


def sections(data: dict) -> dict[str, str]:
    return {"sizes": render(data)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _report.add_flags(parser, RESULTS)
    args = parser.parse_args()
    data = _report.read_results(args.out) if args.tables_only else measure(args.out)
    print(render(data))
    if not args.no_docs:
        _report.publish(PAGE, sections(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
