"""Regenerate README.md's generated sections from the code, the tests and measured results.

    python tools/update_readme.py                 # op coverage (registry + docs/op_histogram.json)
    python tools/update_readme.py --families      # also re-run the family parity exports

Sections live between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HISTOGRAM = ROOT / "docs" / "op_histogram.json"
FAMILY_RESULTS = ROOT / "docs" / "family_parity.json"


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no section {name}")
    return pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def ops_section() -> str:
    from gradmap.graph.gradient import NON_DIFFERENTIABLE, RULES

    histograms = json.loads(HISTOGRAM.read_text()) if HISTOGRAM.exists() else {}
    exported = {}
    failed = []
    for model, hist in sorted(histograms.items()):
        if "error" in hist:
            failed.append(model)
            continue
        for op in hist:
            exported.setdefault(op, []).append(model)
    lines = [
        f"{len(RULES)} op types have a gradient rule; {len(NON_DIFFERENTIABLE)} are listed as carrying no gradient.",
        "",
    ]
    if exported:
        missing = sorted(op for op in exported if op not in RULES and op not in NON_DIFFERENTIABLE)
        lines += [
            f"Ops that torch.onnx emits for the {len(histograms) - len(failed)} torchvision classifiers whose graphs were "
            f"dumped ({HISTOGRAM.relative_to(ROOT)}, `python -m gradmap.export._ophist`):",
            "",
            "| op | models using it | gradmap |",
            "|---|---|---|",
        ]
        for op, models in sorted(exported.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            status = "rule" if op in RULES else ("no gradient" if op in NON_DIFFERENTIABLE else "**missing**")
            lines.append(f"| {op} | {len(models)} | {status} |")
        lines.append("")
        lines.append("Every op emitted has a rule or is known to carry no gradient." if not missing
                     else f"Missing: {', '.join(missing)}.")
        import torchvision

        absent = [m for m in torchvision.models.list_models(module=torchvision.models) if m not in histograms]
        if failed or absent:
            lines.append(f"Graphs not dumped (the dump failed or did not reach them): {', '.join(failed + absent)}.")
    lines += ["", "Rules: " + ", ".join(sorted(RULES)) + ".",
              "", "No gradient: " + ", ".join(sorted(NON_DIFFERENTIABLE)) + "."]
    return "\n".join(lines)


def run_families() -> None:
    families = _families_from_test()
    from gradmap.export import export_torchvision

    results = {}
    for family, name in families.items():
        start = time.perf_counter()
        try:
            r = export_torchvision(name, None, weights="none")
            results[family] = {"model": name, "logits_error": r.logits_error, "gradient_error": r.gradient_error,
                               "forward_nodes": r.forward_nodes, "backward_nodes": r.backward_nodes,
                               "seconds": round(time.perf_counter() - start, 1)}
        except Exception as e:  # noqa: BLE001 - recorded in the table
            results[family] = {"model": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(family, results[family], flush=True)
    FAMILY_RESULTS.write_text(json.dumps(results, indent=1) + "\n")


def _families_from_test() -> dict[str, str]:
    source = (ROOT / "tests" / "test_export.py").read_text()
    block = source.split("FAMILIES = {", 1)[1].split("}", 1)[0]
    return dict(re.findall(r'"([\w]+)": "([\w]+)"', block))


def families_section() -> str:
    families = _families_from_test()
    results = json.loads(FAMILY_RESULTS.read_text()) if FAMILY_RESULTS.exists() else {}
    lines = [
        f"{len(families)} families, one model each, exported with seeded random weights and checked against "
        "float64 torch autograd (max|Δ| / max|torch|, tolerance 1e-4) by `tests/test_export.py`; figures from "
        f"{FAMILY_RESULTS.relative_to(ROOT)} (`python tools/update_readme.py --families`):",
        "",
        "| family | model | logits error | gradient error | forward + gradient nodes |",
        "|---|---|---|---|---|",
    ]
    for family, name in families.items():
        r = results.get(family)
        if r is None:
            lines.append(f"| {family} | {name} | not measured | | |")
        elif "error" in r:
            lines.append(f"| {family} | {name} | fails: {r['error']} | | |")
        else:
            lines.append(f"| {family} | {name} | {r['logits_error']:.1e} | {r['gradient_error']:.1e} | "
                         f"{r['forward_nodes']} + {r['backward_nodes']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", action="store_true", help="re-run the family exports first")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.families:
        run_families()
    text = README.read_text()
    text = replace_section(text, "ops", ops_section())
    text = replace_section(text, "families", families_section())
    README.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
