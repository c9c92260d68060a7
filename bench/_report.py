"""What every benchmark and coverage script shares: its flags, the record of the machine it ran on,
its results file, its tables and the generated sections of the docs pages they go to.

A script measures, then hands its rows to this module::

    import _report                                   # bench/ scripts; tools/ and models/ put bench/ on sys.path

    parser = argparse.ArgumentParser(...)
    _report.add_flags(parser, RESULTS)               # --out, --tables-only, --no-docs (--note, --update)
    args = _report.parse_args(parser)

    def measure():
        run = _report.start_run(PAGE, SECTIONS)      # CPU, instruction sets, cores, versions, commit, load
        rows = ...
        rows, run = _report.updated(args, run, rows) # --update: the other models' rows kept
        return _report.write_results(args.out, run, rows, threads=args.threads)

    data = _report.render_or_measure(args, PAGE, sections, measure)
    # --tables-only: the recorded results, measure() not called; then, unless --no-docs,
    # _report.publish(PAGE, sections(data)): docs/PAGE's generated sections, and the run index

Results live in bench/results/NAME.json as ``{"meta": {...}, "rows": [...]}`` (plus any other
top-level keys a script needs). ``meta["machine"]`` is what :func:`machine` returns; results
recorded before this module existed carry whatever their script wrote there (a string such as
``"x86_64, cpu"``), and :func:`machine_line` says "not recorded" for what they lack.

Generated sections sit between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in a page under
docs/; :func:`publish` replaces their bodies and refreshes the "What was run where" index of
docs/benchmarks.md, built from every results file's metadata.

Standard library only: bench/bench_foreign.py's worker imports bench_speed, and so this module, in
a venv of its own without gradmap.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata as _metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"
INDEX_PAGE = "benchmarks.md"
#: README.md as a page name for :func:`write_sections` (pages are named relative to docs/): a script's
#: one-line summaries there come from its results file like its tables (``readme_sections(data)``).
README = "../README.md"
INDEX_SECTION = "runs"
NOT_RECORDED = "not recorded"

# scripts run from a checkout import gradmap from it, not from whatever is installed
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = [
    "ROOT", "RESULTS", "DOCS", "README", "NOT_RECORDED", "add_flags", "parse_args", "render_or_measure",
    "cpu_from_cpuinfo", "machine", "start_run", "finish_run", "write_results", "write_json", "merge_rows",
    "merge_update", "updated", "read_results", "machine_line", "cpu_text", "load_average", "cores",
    "table", "replace_section", "section_body", "write_section", "write_sections", "publish", "check_sections",
    "result_files", "runs_section",
]


# --- flags ---------------------------------------------------------------------------------------------------------


def add_flags(parser: argparse.ArgumentParser, results: Path, *, note: bool = False, tables: bool = True,
              update: bool = False) -> None:
    """The flags every script shares: where its results file is, re-rendering the docs tables from it
    without measuring, and measuring without touching the docs. ``--readme-only`` and ``--no-readme``
    are the names these had while the tables lived in README.md. ``tables=False``: the script's
    results are cited in a page's prose, so there is no table to re-render (``--no-docs`` then leaves
    the run index alone). ``update``: ``--update`` re-measures the ``--models`` given and keeps the
    other models' rows (:func:`updated`; it needs ``note``, and :func:`parse_args` asks for a
    ``--note``)."""
    parser.add_argument("--out", type=Path, default=results,
                        help=f"the results file (default: {_relative(results)})")
    if tables:
        parser.add_argument("--tables-only", "--readme-only", dest="tables_only", action="store_true",
                            help="measure nothing: rewrite the docs pages' tables from the results file")
    parser.add_argument("--no-docs", "--no-readme", dest="no_docs", action="store_true",
                        help="write the results file only and leave the docs pages as they are")
    if note or update:
        parser.add_argument("--note", default="", help="a note on the run, shown in the table's header "
                                                       "(what else ran, which rows were re-measured when)")
    if update:
        parser.add_argument("--update", action="store_true",
                            help="re-measure --models only and keep the other models' rows of --out (say so in --note)")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, refusing ``--update`` without a ``--note``: a table whose rows
    were measured at different times says so in its header."""
    args = parser.parse_args(argv)
    if getattr(args, "update", False) and not args.note:
        parser.error("--update needs a --note saying which rows were re-measured when")
    return args


def render_or_measure(args: argparse.Namespace, page: str, sections, measure, readme=None) -> dict:
    """A script's run after its flags: ``--tables-only`` reads the results file as recorded,
    otherwise ``measure()`` measures, writes the results file and returns what it wrote; then,
    unless ``--no-docs``, ``sections(data)`` (a dict of section name to body) goes into
    docs/``page`` with the run index, and ``readme(data)`` (the same, for README.md) into README
    (:func:`publish`). Returns the results."""
    data = read_results(args.out) if getattr(args, "tables_only", False) else measure()
    if not args.no_docs:
        if readme is None:
            publish(page, sections(data))
        else:
            publish(page, sections(data), readme(data))
    return data


# --- the machine ---------------------------------------------------------------------------------------------------

# x86 instruction-set levels, highest first, by the /proc/cpuinfo flag that marks each
_X86_LEVELS = (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx"), ("SSE4.2", "sse4_2"))
# flags beside the level that change which kernels onnxruntime and torch pick
_X86_EXTENSIONS = ("fma", "f16c", "avx_vnni", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                   "amx_int8")
_ARM_EXTENSIONS = ("asimd", "asimddp", "asimdhp", "i8mm", "bf16", "sve", "sve2", "sme")


def cpu_from_cpuinfo(text: str) -> dict:
    """The CPU's model name, instruction-set level (AVX-512, AVX2, ... on x86; SVE or NEON on Arm)
    and the notable extensions, from the text of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key not in fields:
            fields[key] = value.strip()
    model = fields.get("model name") or fields.get("cpu model") or fields.get("hardware")
    if model is None and "cpu part" in fields:  # Arm: implementer and part numbers only
        model = f"Arm CPU (implementer {fields.get('cpu implementer', '?')}, part {fields['cpu part']})"
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    if "flags" in fields:
        isa = next((name for name, flag in _X86_LEVELS if flag in flags), "x86-64")
        extensions = [f for f in _X86_EXTENSIONS if f in flags]
    elif flags:
        isa = "SVE" if "sve" in flags else ("NEON" if "asimd" in flags else "Arm")
        extensions = [f for f in _ARM_EXTENSIONS if f in flags]
    else:
        isa, extensions = None, []
    return {"cpu": model, "isa": isa, "isa_extensions": extensions}


def machine() -> dict:
    """This machine: CPU model, instruction-set level and extensions, cores, architecture, OS."""
    try:
        cpu = cpu_from_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu = {"cpu": platform.processor() or None, "isa": None, "isa_extensions": []}
    return {**cpu, "cores": os.cpu_count(), "arch": platform.machine(),
            "system": f"{platform.system()} {platform.release()}"}


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of ``packages`` (without importing them), and Python's."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = _metadata.version(name)
        except _metadata.PackageNotFoundError:
            pass
    return found


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _load_1min() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def start_run(page: str, sections: tuple[str, ...] = (), versions: tuple[str, ...] = ("onnxruntime", "torch"),
              **fields) -> dict:
    """The metadata of a run that starts now: the script and its command line, the docs page and
    sections its results go to (none: the page cites them in its prose), the time, the machine, the
    versions of ``versions`` (onnxruntime and torch by default; add the other packages the run
    measures), gradmap's commit (and whether the tree had changes), the 1-minute load average now.
    :func:`write_results` adds the end's. ``fields`` go in as they are (threads, note...)."""
    script = Path(sys.argv[0]).resolve()
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "script": _relative(script),
        "command": " ".join(["python", _relative(script), *sys.argv[1:]]),
        "docs": [{"page": page, "sections": list(sections)}],
        "date": datetime.date.today().isoformat(),
        "started": _now(),
        "machine": machine(),
        "versions": _versions(versions),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "load_average": {"start": _load_1min()},
        **fields,
    }


def finish_run(meta: dict) -> dict:
    """``meta`` of a run that ends now: the time and the 1-minute load average at the end."""
    if "started" in meta:
        meta["finished"] = _now()
        meta.setdefault("load_average", {})["end"] = _load_1min()
    return meta


# --- results files -------------------------------------------------------------------------------------------------


def write_results(path: Path, meta: dict, rows: list, *, final: bool = True, **extra) -> dict:
    """Write ``{"meta": meta, "rows": rows, **extra}`` to ``path`` (through a temporary file, so
    that a run stopped mid-write leaves the previous results) and return it. ``final``: the run is
    over, so its end time and load average go into ``meta``; a script that saves after every model
    passes ``final=False`` until the last."""
    if not isinstance(rows, list):
        raise TypeError(f"rows must be a list (one entry per table row), not {type(rows).__name__}")
    if final:
        finish_run(meta)
    return write_json(path, {"meta": meta, "rows": rows, **extra})


def write_json(path: Path, data: dict, indent: int = 1) -> dict:
    """``data`` as JSON at ``path``, through a temporary file beside it (a run stopped mid-write leaves
    the previous file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(data, indent=indent, default=float) + "\n")
    staging.replace(path)
    return data


def merge_update(meta: dict, saved: dict, remeasured: list[str]) -> dict:
    """The metadata of a run that re-measured only ``remeasured`` (``--update``) and kept the other
    rows of the results file whose metadata is ``saved``: this run's, with the earlier runs' beside it
    so that a table's header names every machine its rows came from."""
    earlier = [{k: v for k, v in saved.items() if k != "earlier_runs"}] + list(saved.get("earlier_runs", []))
    return {**meta, "remeasured": list(remeasured), "earlier_runs": earlier}


def merge_rows(saved: list[dict], new: list[dict], key: str = "model") -> list[dict]:
    """``saved`` rows with those of the ``key`` values in ``new`` replaced by ``new``'s, in
    ``saved``'s order (values not in ``saved`` at the end): ``--update`` re-measures some models of
    a table."""
    fresh = {r[key] for r in new}
    merged, placed = [], set()
    for r in saved:
        if r[key] not in fresh:
            merged.append(r)
        elif r[key] not in placed:
            merged += [n for n in new if n[key] == r[key]]
            placed.add(r[key])
    return merged + [n for n in new if n[key] not in placed]


def updated(args: argparse.Namespace, meta: dict, rows: list[dict]) -> tuple[list[dict], dict]:
    """With ``--update``: the rows of ``--out`` with those of the re-measured ``--models`` replaced
    (:func:`merge_rows`) and the metadata saying so (:func:`merge_update`); without: ``rows`` and
    ``meta`` as given."""
    if not getattr(args, "update", False):
        return rows, meta
    saved = read_results(args.out)
    return merge_rows(saved["rows"], rows), merge_update(meta, saved["meta"], args.models)


def read_results(path: Path) -> dict:
    """A results file written by :func:`write_results`, with a clear error if it is not there."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{_relative(path)}: no such results file (run the script without --tables-only first)")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "meta" not in data or not isinstance(data.get("rows"), list):
        raise SystemExit(f"{_relative(path)}: not a results file ({{'meta': ..., 'rows': [...]}})")
    return data


# --- what a table's header says about its run ----------------------------------------------------------------------


def cores(meta: dict) -> int | None:
    """The run's core count, from its machine record (None where not recorded)."""
    m = meta.get("machine")
    if isinstance(m, dict):
        return m.get("cores")
    found = re.search(r"(\d+) cores", m or "")
    return int(found.group(1)) if found else None


def load_average(meta: dict) -> tuple[float | None, float | None]:
    """The 1-minute load average at the run's start and end (None where not recorded)."""
    load = meta.get("load_average") or {}
    return load.get("start"), load.get("end")


def cpu_text(meta: dict, with_cores: bool = True) -> str:
    """The CPU of a run in a few words: "AMD EPYC 9R14 (AVX-512: avx512_vnni, avx512_bf16), 2 cores, x86_64",
    or "CPU not recorded" (with what the results file does say of the machine)."""
    m = meta.get("machine")
    if isinstance(m, dict) and m.get("cpu"):
        isa = m.get("isa") or f"instruction sets {NOT_RECORDED}"
        notable = [e for e in m.get("isa_extensions", []) if e not in ("fma", "f16c")]
        if notable:
            isa += ": " + ", ".join(notable)
        text = f"{m['cpu']} ({isa})"
        if with_cores and m.get("cores"):
            text += f", {m['cores']} cores"
        return text + (f", {m['arch']}" if with_cores and m.get("arch") else "")
    said = m if isinstance(m, str) and m else None
    return f"CPU {NOT_RECORDED}" + (f" (the results file says \"{said}\")" if said else "")


def machine_line(meta: dict) -> str:
    """One line for a generated table's header: the CPU it ran on, the versions, gradmap's commit,
    the date and the load average, each "not recorded" where the results file lacks it."""
    parts = [cpu_text(meta)]
    versions = meta.get("versions") or {k: meta[k] for k in ("onnxruntime", "torch") if meta.get(k)}
    shown = [f"{name} {versions[name]}" for name in versions if name != "python"]
    if shown:
        parts.append(", ".join(shown))
    commit = meta.get("commit")
    if commit:
        parts.append(f"gradmap {commit}" + (" with uncommitted changes" if meta.get("dirty") else ""))
    parts.append(meta.get("date") or f"date {NOT_RECORDED}")
    start, end = load_average(meta)
    if start is not None or end is not None:
        parts.append(f"1-minute load average {_or_not(start)} at the start, {_or_not(end)} at the end")
    else:
        parts.append(f"load average {NOT_RECORDED}")
    line = "Ran on: " + "; ".join(parts) + "."
    if meta.get("earlier_runs"):
        kept = "; ".join(dict.fromkeys(f"{cpu_text(m)}, {m.get('date') or 'date ' + NOT_RECORDED}"
                                       for m in meta["earlier_runs"]))
        line += (f" This run re-measured {', '.join(meta.get('remeasured', []))}; the other rows are from earlier "
                 f"runs: {kept}.")
    return line


def _or_not(value) -> str:
    return NOT_RECORDED if value is None else f"{value:g}"


# --- tables and sections -------------------------------------------------------------------------------------------


def target_cell(met: str) -> str:
    """A table's target column from a verdict: ``yes``, ``floor`` or a bold ``no``."""
    return {"yes": "yes", "floor": "floor", "no": "**no**"}[met]


def misses_lines(misses: list[str]) -> list[str]:
    """The list under a table of the rows that miss its target and what stops each; none: no lines."""
    return ["", "Rows that miss the target, and what stops them on this CPU:", "", *misses] if misses else []


def table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table's lines; the caller formats the cells (and escapes a ``|`` inside one)."""
    def line(cells) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)", re.S)


def replace_section(text: str, name: str, body: str, where: str = "the page") -> str:
    """``text`` with the body of its generated section ``name`` replaced by ``body``."""
    pattern = _pattern(name)
    if not pattern.search(text):
        raise SystemExit(f"{where} has no generated section {name!r} (<!-- BEGIN {name} --> ... <!-- END {name} -->)")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text, count=1)


def section_body(text: str, name: str) -> str | None:
    """The body of the generated section ``name`` in ``text`` (None if it has none)."""
    found = _pattern(name).search(text)
    return None if found is None else text[found.end(1):found.start(2)]


def write_section(page: str, name: str, body: str) -> None:
    """Replace the generated section ``name`` of docs/``page``."""
    write_sections(page, {name: body})


def write_sections(page: str, sections: dict[str, str]) -> None:
    path = DOCS / page
    if not path.is_file():
        raise SystemExit(f"docs/{page}: no such page")
    text = path.read_text()
    for name, body in sections.items():
        text = replace_section(text, name, body, where=f"docs/{page}")
    path.write_text(text)


def publish(page: str, sections: dict[str, str], readme: dict[str, str] | None = None) -> None:
    """Write ``sections`` into docs/``page`` (none: a script whose results a page cites in its prose)
    and ``readme`` into README.md, and refresh the run index built from every results file."""
    if sections:
        write_sections(page, sections)
    if readme:
        write_sections(README, readme)
    write_sections(INDEX_PAGE, {INDEX_SECTION: runs_section()})
    print(f"wrote docs/{page}: {', '.join([*sections, 'the run index'])}", file=sys.stderr)


def check_sections(page: str, sections: dict[str, str]) -> list[str]:
    """The names of ``sections`` whose body in docs/``page`` differs from the one given (for tests)."""
    text = (DOCS / page).read_text()
    return [name for name, body in sections.items() if section_body(text, name) != body.rstrip() + "\n"]


# --- the run index: what was run where -----------------------------------------------------------------------------


def result_files() -> list[Path]:
    """Every results file: bench/results/*.json, the demo's quality.json (which the package ships) and
    the demo ViT's."""
    return sorted(RESULTS.glob("*.json")) + [ROOT / "models" / "demo" / "quality.json",
                                             ROOT / "models" / "demo_vit" / "quality.json"]


def runs_section() -> str:
    """The index of every recorded run, from the results files' metadata: which script, which docs
    tables, when, on which CPU, with which versions and at which commit."""
    header = ["results file", "script", "tables (docs page: section)", "date", "CPU", "cores", "versions", "gradmap",
              "load average (start, end)"]
    rows = []
    for path in result_files():
        if not path.is_file():
            continue
        meta = (json.loads(path.read_text()).get("meta") or {})
        cpu = cpu_text(meta, with_cores=False)
        versions = meta.get("versions") or {}
        shown = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "python") or NOT_RECORDED
        tables = "; ".join(f"{t['page']}: {', '.join(t['sections'])}" if t.get("sections") else f"{t['page']} (prose)"
                           for t in meta.get("docs", [])) or "–"
        commit = meta.get("commit") or NOT_RECORDED
        if meta.get("commit") and meta.get("dirty"):
            commit += " (changed)"
        start, end = load_average(meta)
        load = NOT_RECORDED if start is None and end is None else f"{_or_not(start)}, {_or_not(end)}"
        rows.append([f"`{_relative(path)}`", f"`{meta['script']}`" if meta.get("script") else NOT_RECORDED, tables,
                     meta.get("date") or NOT_RECORDED, cpu, cores(meta) or NOT_RECORDED, shown, commit, load])
    lines = ["Generated from the metadata of every results file (`bench/_report.py`); a run recorded before the "
             "scripts recorded their machine says \"not recorded\" for what its file lacks.", ""]
    return "\n".join(lines + table(header, rows))


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)
