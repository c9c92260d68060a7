"""Which ONNX ops torch.onnx emits for torchvision's classifiers, and whether the gradient pass covers them.

    python tools/op_histogram.py [MODEL ...]       # dump the graphs not dumped yet (all classifiers by default)
    python tools/op_histogram.py --tables-only     # the docs table again from bench/results/op_histogram.json

Each model is exported in a child process (``python -m gradmap.export._ophist MODEL``; big models
need several GB) with seeded random weights, as ``gradmap export`` does before the gradient pass.
Models already in the results file are skipped unless named; a model whose dump failed is tried
again. Writes bench/results/op_histogram.json and the section ``ops`` of docs/coverage.md: every op
emitted against the gradient pass's rules (``gradmap.graph.gradient.RULES``) and its list of ops
that carry no gradient.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _report  # noqa: E402

RESULTS = _report.RESULTS / "op_histogram.json"
PAGE, SECTIONS = "coverage.md", ("ops",)


def dump(name: str, opset: int, timeout: float) -> dict:
    import json

    proc = subprocess.run([sys.executable, "-m", "gradmap.export._ophist", name, "--opset", str(opset)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 0:
        return {"model": name, "ops": json.loads(proc.stdout.strip().splitlines()[-1])}
    return {"model": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}


def render(data: dict) -> str:
    from gradmap.graph.gradient import NON_DIFFERENTIABLE, RULES

    rows = data["rows"]
    exported: dict[str, list[str]] = {}
    failed = [r["model"] for r in rows if "error" in r]
    for r in rows:
        for op in r.get("ops", {}):
            exported.setdefault(op, []).append(r["model"])
    lines = [
        f"{len(RULES)} op types have a gradient rule; {len(NON_DIFFERENTIABLE)} are listed as carrying no gradient.",
        "",
    ]
    if exported:
        missing = sorted(op for op in exported if op not in RULES and op not in NON_DIFFERENTIABLE)
        table = [[op, len(models), "rule" if op in RULES else ("no gradient" if op in NON_DIFFERENTIABLE
                                                                 else "**missing**")]
                 for op, models in sorted(exported.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
        lines += [
            _report.machine_line(data["meta"]),
            "",
            f"Ops that torch.onnx emits for the {len(rows) - len(failed)} torchvision classifiers whose graphs were "
            f"dumped (bench/results/op_histogram.json, `python tools/op_histogram.py`):",
            "",
            *_report.table(["op", "models using it", "gradmap"], table),
            "",
            "Every op emitted has a rule or is known to carry no gradient." if not missing
            else f"Missing: {', '.join(missing)}.",
        ]
        import torchvision

        dumped = {r["model"] for r in rows}
        absent = [m for m in torchvision.models.list_models(module=torchvision.models) if m not in dumped]
        if failed or absent:
            lines.append(f"Graphs not dumped (the dump failed or did not reach them): {', '.join(failed + absent)}.")
    lines += ["", "Rules: " + ", ".join(sorted(RULES)) + ".",
              "", "No gradient: " + ", ".join(sorted(NON_DIFFERENTIABLE)) + "."]
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"ops": render(data)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="torchvision names (default: every classifier not dumped yet)")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for one model's dump")
    _report.add_flags(parser, RESULTS)
    args = parser.parse_args()
    if args.tables_only:
        data = _report.read_results(args.out)
    else:
        import torchvision

        meta = _report.start_run(PAGE, SECTIONS, versions=("torch", "torchvision", "onnx", "onnxscript"),
                                 opset=args.opset)
        saved = _report.read_results(args.out) if args.out.exists() else None
        rows = {r["model"]: r for r in (saved["rows"] if saved else [])}
        names = args.models or [m for m in torchvision.models.list_models(module=torchvision.models)
                                if m not in rows or "error" in rows[m]]
        if saved:
            meta = _report.merge_update(meta, saved["meta"], names)
        for i, name in enumerate(names):
            rows[name] = dump(name, args.opset, args.timeout)
            print(name, rows[name], flush=True)
            data = _report.write_results(args.out, meta, [rows[m] for m in sorted(rows)], final=i == len(names) - 1)
        if not names:
            if saved is None:
                raise SystemExit("no classifier to dump")
            data = saved
    if not args.no_docs:
        _report.publish(PAGE, sections(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
