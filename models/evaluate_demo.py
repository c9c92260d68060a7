"""Measure the demo model's map quality with ``gradmap evaluate`` and write it into README.md.

Usage (from the repository root, after ``python models/make_demo.py``; torch-free):

    python models/evaluate_demo.py [--demo models/demo] [--no-readme]

Equivalent to

    gradmap evaluate models/demo/shapes.onnx --data models/demo/eval_set.npz \\
        --randomized models/demo/shapes_randomized_top.onnx --json models/demo/quality.json

on the 200 held-out images of ``eval_set.npz`` (every method the demo model supports, default
parameters), followed by the check of the targets below and the README table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Targets for the demo (gradmap's README states them): pointing game per method, and for every
# method a randomization rank correlation of at most 0.3 and a deletion AUC below random order.
POINTING_TARGETS = {"vanilla": 0.8, "smoothgrad": 0.9, "grad-cam": 0.9}
MAX_RHO = 0.3


def run(demo: Path, threads: int) -> dict:
    from gradmap.runtime import SaliencyModel
    from gradmap.runtime.evaluate import evaluate, load_evaluation_data
    from gradmap.runtime.methods import MethodSpec

    model = SaliencyModel(demo / "shapes.onnx", provider="cpu", threads=threads)
    randomized = SaliencyModel(demo / "shapes_randomized_top.onnx", provider="cpu", threads=threads)
    data = load_evaluation_data(demo / "eval_set.npz", model.metadata.preprocessing, model.metadata.labels)
    specs = [MethodSpec(name) for name in model.metadata.methods]
    results = evaluate(model, data, specs, randomized=randomized, progress=lambda m: print(m, flush=True))
    results["model"] = "models/demo/shapes.onnx"
    results["randomized_model"] = "models/demo/shapes_randomized_top.onnx"
    results["data"] = "models/demo/eval_set.npz"
    metrics_file = demo / "metrics.json"
    if metrics_file.exists():
        results["training"] = json.loads(metrics_file.read_text())
    return results


def verdicts(results: dict) -> dict[str, list[str]]:
    """Per method, the targets it misses (an empty list: all met)."""
    random_deletion = results["random_order"]["deletion_auc"]["mean"]
    missed = {}
    for name, m in results["methods"].items():
        misses = []
        if name in POINTING_TARGETS and m["pointing_game"]["mean"] < POINTING_TARGETS[name]:
            misses.append(f"pointing game {m['pointing_game']['mean']:.3f} < {POINTING_TARGETS[name]}")
        if m["rank_correlation"]["mean"] > MAX_RHO:
            misses.append(f"randomization rho {m['rank_correlation']['mean']:.3f} > {MAX_RHO}")
        if m["deletion_auc"]["mean"] >= random_deletion:
            misses.append(f"deletion AUC {m['deletion_auc']['mean']:.3f} >= random {random_deletion:.3f}")
        missed[name] = misses
    return missed


def render(results: dict) -> str:
    training = results.get("training", {})
    r = results
    lines = [
        f"`python models/evaluate_demo.py` (= `gradmap evaluate` on the demo model and its {r['images']} held-out "
        f"images; accuracy {r['accuracy']:.3f}"
        + (f", held-out test accuracy {training['test_accuracy']:.3f} on {training['split_sizes']['test']} images"
           if "test_accuracy" in training else "") + "). "
        f"Chance for the pointing game (mean object area): {r['chance']['mean']:.3f}; random pixel order: "
        f"deletion AUC {r['random_order']['deletion_auc']['mean']:.3f}, insertion AUC "
        f"{r['random_order']['insertion_auc']['mean']:.3f}.",
        "",
        "| method | pointing game | energy pointing game | deletion AUC ↓ | insertion AUC ↑ | randomization ρ ↓ | targets |",
        "|---|---|---|---|---|---|---|",
    ]
    misses = verdicts(results)
    for name, m in r["methods"].items():
        target = f"≥ {POINTING_TARGETS[name]}" if name in POINTING_TARGETS else ""
        verdict = "met" if not misses[name] else "**missed**: " + "; ".join(misses[name])
        lines.append(f"| {name} | {m['pointing_game']['mean']:.3f} {target} | {m['energy_pointing_game']['mean']:.3f} | "
                     f"{m['deletion_auc']['mean']:.3f} | {m['insertion_auc']['mean']:.3f} | "
                     f"{m['rank_correlation']['mean']:.3f} | {verdict} |")
    lines += ["", f"Targets: pointing game ≥ 0.8 (vanilla), ≥ 0.9 (smoothgrad, grad-cam); randomization ρ ≤ {MAX_RHO} "
                  "and deletion AUC below random order for every method. Figures from models/demo/quality.json."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "models" / "demo")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--readme-only", action="store_true", help="rewrite README's table from quality.json")
    args = parser.parse_args()
    if args.readme_only:
        results = json.loads((args.demo / "quality.json").read_text())
    else:
        results = run(args.demo, args.threads)
        results["targets_missed"] = verdicts(results)
        (args.demo / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    from gradmap.runtime.evaluate import format_report

    print(format_report(results))
    if not args.no_readme:
        sys.path.insert(0, str(ROOT / "tools"))
        from update_readme import README, replace_section

        README.write_text(replace_section(README.read_text(), "quality", render(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
