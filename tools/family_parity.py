"""One model of every torchvision family exported with seeded random weights and checked against
float64 torch autograd: the families table of docs/coverage.md.

    python tools/family_parity.py                  # export every family of tests/test_export.py FAMILIES
    python tools/family_parity.py --tables-only    # the docs table again from bench/results/family_parity.json

Each export runs gradmap's own parity check (logits and gradient, max|Δ| / max|torch|, 1e-4), as
``gradmap export`` does; the table gives both errors and the node counts of the forward and the
gradient graph. tests/test_export.py runs the same exports in CI.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _report  # noqa: E402

RESULTS = _report.RESULTS / "family_parity.json"
PAGE, SECTIONS = "coverage.md", ("families",)


def families() -> dict[str, str]:
    """tests/test_export.py's FAMILIES, read from its source (importing it needs torch)."""
    source = (_report.ROOT / "tests" / "test_export.py").read_text()
    block = source.split("FAMILIES = {", 1)[1].split("}", 1)[0]
    return dict(re.findall(r'"([\w]+)": "([\w]+)"', block))


def run_families(names: dict[str, str]) -> list[dict]:
    from gradmap.export import export_torchvision

    rows = []
    for family, name in names.items():
        start = time.perf_counter()
        try:
            r = export_torchvision(name, None, weights="none")
            row = {"family": family, "model": name, "logits_error": r.logits_error, "gradient_error": r.gradient_error,
                   "forward_nodes": r.forward_nodes, "backward_nodes": r.backward_nodes,
                   "seconds": round(time.perf_counter() - start, 1)}
        except Exception as e:  # noqa: BLE001 - recorded in the table
            row = {"family": family, "model": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(row, flush=True)
        rows.append(row)
    return rows


def render(data: dict) -> str:
    results = {r["family"]: r for r in data["rows"]}
    rows = []
    for family, name in families().items():
        r = results.get(family)
        if r is None:
            rows.append([family, name, "not measured", "", ""])
        elif "error" in r:
            rows.append([family, name, f"fails: {r['error']}", "", ""])
        else:
            rows.append([family, name, f"{r['logits_error']:.1e}", f"{r['gradient_error']:.1e}",
                         f"{r['forward_nodes']} + {r['backward_nodes']}"])
    lines = [
        _report.machine_line(data["meta"]),
        "",
        f"{len(rows)} families, one model each, exported with seeded random weights and checked against "
        "float64 torch autograd (max|Δ| / max|torch|, tolerance 1e-4) by `tests/test_export.py`; figures from "
        "bench/results/family_parity.json (`python tools/family_parity.py`):",
        "",
        *_report.table(["family", "model", "logits error", "gradient error", "forward + gradient nodes"], rows),
    ]
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"families": render(data)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", help="comma-separated family names (default: all of them)")
    _report.add_flags(parser, RESULTS)
    args = parser.parse_args()
    if args.tables_only:
        data = _report.read_results(args.out)
    else:
        every = families()
        chosen = args.families.split(",") if args.families else list(every)
        unknown = [f for f in chosen if f not in every]
        if unknown:
            parser.error(f"unknown families {unknown}; choose from {', '.join(every)}")
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "torch", "torchvision", "onnx"))
        rows = run_families({f: every[f] for f in chosen})
        if args.families and args.out.exists():
            saved = _report.read_results(args.out)
            kept = [r for r in saved["rows"] if r["family"] not in chosen]
            rows = sorted(kept + rows, key=lambda r: r["family"])
            meta = _report.merge_update(meta, saved["meta"], chosen)
        data = _report.write_results(args.out, meta, rows)
    if not args.no_docs:
        _report.publish(PAGE, sections(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
