"""Measure the demo model's map quality with ``gradmap evaluate`` and write it into docs/attribution.md.

Usage (from the repository root, after ``python models/make_demo.py``; torch-free):

    python models/evaluate_demo.py [--demo models/demo] [--no-docs]
    python models/evaluate_demo.py --vit             # the demo ViT (models/make_demo_vit.py), same pictures
    python models/evaluate_demo.py --tables-only     # the docs tables again from models/demo/quality.json

Equivalent to

    gradmap evaluate models/demo/shapes.onnx --data models/demo/eval_set.npz \\
        --randomized models/demo/shapes_randomized_top.onnx \\
        --cascade models/demo/cascade/shapes_randomized_blocks2.onnx ... --json models/demo/quality.json

on the 200 held-out images of ``eval_set.npz`` (every method the demo model supports, default
parameters), followed by the check of the targets below and the docs tables. quality.json stays
beside the demo model, not in bench/results/: the package ships it, and ``gradmap demo`` and
``gradmap web`` read SmoothGrad's chosen noise from it. Two settings differ
from ``gradmap evaluate``'s defaults, and both are written into quality.json:

- the pointing game is also reported as Zhang et al. (2016) define it, with a tolerance:
  ``--tolerance 2`` (their 15 px on PASCAL VOC / COCO pictures, ~400 px a side, is 2 px at 64 x 64).
  An exact gradient is as large just outside an object's outline as just inside it, so the strict
  form scores an outline maximum as a coin flip. The targets are judged on this form; the strict
  one stays in the table;
- SmoothGrad's noise level is chosen per model, as Smilkov et al. (2017) advise, on 100 validation
  images drawn apart from the evaluation set (make_demo's "validation" split), by the same pointing
  game, from NOISE_GRID; the evaluation images play no part in the choice.

With ``--vit`` the same measurements run on the demo vision transformer (``models/demo_vit/``:
``shapes_vit.onnx`` and ``shapes_vit_randomized_top.onnx``; no cascade) on the same 200 pictures
(``models/demo/eval_set.npz``), with the same targets; its results go to
``models/demo_vit/quality.json`` and its table to the section ``quality_vit`` of docs/attribution.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _report  # noqa: E402

ROOT = _report.ROOT
RESULTS = ROOT / "models" / "demo" / "quality.json"
PAGE = "attribution.md"


@dataclass(frozen=True)
class Demo:
    """One demo model: its files (relative to the repository root), its results file and its docs section."""
    directory: str
    model: str
    randomized: str
    section: str
    what: str  # the model in the table's header
    top: str  # what its randomized copy re-initialized
    data: str = "models/demo/eval_set.npz"
    cascade_prefix: str | None = None

    @property
    def results(self) -> Path:
        return ROOT / self.directory / "quality.json"


CNN = Demo("models/demo", "shapes.onnx", "shapes_randomized_top.onnx", "quality", "the demo model",
           "classifier and last conv block", cascade_prefix="shapes_randomized_blocks")
VIT = Demo("models/demo_vit", "shapes_vit.onnx", "shapes_vit_randomized_top.onnx", "quality_vit",
           "the demo ViT (`models/make_demo_vit.py`)", "classifier, final LayerNorm and last transformer block")
DEMOS = {demo.section: demo for demo in (CNN, VIT)}

# Targets for the demo (docs/attribution.md states them): pointing game per method, and for every
# method a randomization rank correlation of at most 0.3 and a deletion AUC below random order.
POINTING_TARGETS = {"vanilla": 0.8, "smoothgrad": 0.9, "grad-cam": 0.9}
MAX_RHO = 0.3
TOLERANCE_PX = 2.0
NOISE_GRID = (0.05, 0.10, 0.15, 0.20)
VALIDATION_SIZE = 100
# Left out of the ViT's full run, for time: the perturbation, region and path methods (minutes per
# picture on every model of the checks). ``--vit --method NAME --per-class N`` measures them on a subset.
SLOW_METHODS = ("occlusion", "rise", "score-cam", "xrai", "blur-ig", "guided-ig")


def choose_noise(model) -> dict:
    """SmoothGrad's noise level with the best tolerant pointing game on the validation split."""
    import tempfile

    import numpy as np

    sys.path.insert(0, str(ROOT / "models"))
    from make_demo import make_split

    from gradmap.runtime.evaluate import load_evaluation_data, saliency_maps
    from gradmap.runtime.methods import MethodSpec
    from gradmap.runtime.metrics import pointing_game

    images, masks, labels = make_split("validation", VALIDATION_SIZE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "validation.npz"
        np.savez(path, images=images, masks=masks, labels=labels)
        data = load_evaluation_data(path, model.metadata.preprocessing, model.metadata.labels)
    scores = {}
    for noise in NOISE_GRID:
        maps, _ = saliency_maps(model, MethodSpec("smoothgrad", noise=noise), data.images, data.labels)
        scores[noise] = float(np.mean([pointing_game(m, k, tolerance=TOLERANCE_PX) for m, k in zip(maps, data.masks)]))
        print(f"smoothgrad noise {noise}: validation pointing game (<= {TOLERANCE_PX:g} px) {scores[noise]:.3f}",
              flush=True)
    best = max(NOISE_GRID, key=lambda noise: scores[noise])  # first of equals: the smallest noise
    return {"noise": best, "validation_images": VALIDATION_SIZE, "validation_pointing_game": scores}


def cascade_files(demo: Path, prefix: str | None = CNN.cascade_prefix) -> list[Path]:
    """make_demo's deeper randomizations, shallowest first: classifier and the last 2, 3, ... blocks."""
    if prefix is None:
        return []
    return sorted((demo / "cascade").glob(f"{prefix}*.onnx"), key=lambda path: int(path.stem.removeprefix(prefix)))


def cascade_label(path: Path) -> str:
    return f"{path.stem.removeprefix('shapes_randomized_blocks')} blocks"


def parse_method(text: str) -> tuple[str, dict]:
    """``NAME`` or ``NAME:setting=value,setting=value`` (values as the method table reads text)."""
    name, _, rest = text.partition(":")
    settings = dict(item.split("=", 1) for item in rest.split(",") if item)
    return name, settings


def per_class_subset(labels, per_class: int) -> list[int]:
    """The first ``per_class`` images of each class, in the evaluation set's order: a subset with every
    class equally present, for methods too slow for all 200 images on a small machine."""
    import numpy as np

    labels = np.asarray(labels)
    return sorted(int(i) for k in np.unique(labels) for i in np.flatnonzero(labels == k)[:per_class])


def run(demo: Path, threads: int, only: list[tuple[str, dict]] | None = None,
        selection: dict | None = None, per_class: int | None = None, seed_check: bool = False,
        spec: Demo = CNN) -> dict:
    from gradmap.runtime import SaliencyModel
    from gradmap.runtime.evaluate import evaluate, load_evaluation_data
    from gradmap.runtime.methods import MethodSpec

    model = SaliencyModel(demo / spec.model, provider="cpu", threads=threads)
    randomized = SaliencyModel(demo / spec.randomized, provider="cpu", threads=threads)
    cascade_paths = {cascade_label(path): path for path in cascade_files(demo, spec.cascade_prefix)}
    cascade = [(label, SaliencyModel(path, provider="cpu", threads=threads)) for label, path in cascade_paths.items()]
    data_file = demo / "eval_set.npz" if spec is CNN else ROOT / spec.data
    data = load_evaluation_data(data_file, model.metadata.preprocessing, model.metadata.labels)
    subset = None
    if per_class is not None:
        subset = per_class_subset(data.labels, per_class)
        data.images, data.masks, data.labels = data.images[subset], data.masks[subset], data.labels[subset]
        data.names = [data.names[i] for i in subset]
    if only is None or any(name == "smoothgrad" for name, _ in only) or selection is None:
        selection = choose_noise(model)
    if only is None:
        names = [name for name in model.metadata.methods if spec is CNN or name not in SLOW_METHODS]
        specs = [MethodSpec(name, noise=selection["noise"]) if name == "smoothgrad" else MethodSpec(name)
                 for name in names]
    else:
        specs = [MethodSpec(name, **({"noise": selection["noise"]} if name == "smoothgrad" else {}), **settings)
                 for name, settings in only]
    results = evaluate(model, data, specs, randomized=randomized, cascade=cascade, tolerance=TOLERANCE_PX,
                       seed_check=seed_check, progress=lambda m: print(m, flush=True))
    results["smoothgrad_noise_selection"] = selection
    results["supported_methods"] = list(model.metadata.methods)
    results["model"] = f"{spec.directory}/{spec.model}"
    results["randomized_model"] = f"{spec.directory}/{spec.randomized}"
    results["cascade_models"] = {label: f"{spec.directory}/cascade/{path.name}" for label, path in cascade_paths.items()}
    results["data"] = spec.data
    if subset is not None:
        results["subset"] = {"per_class": per_class, "indices": subset}
    metrics_file = demo / "metrics.json"
    if metrics_file.exists():
        results["training"] = json.loads(metrics_file.read_text())
    return results


def verdicts(results: dict) -> dict[str, list[str]]:
    """Per method, the targets it misses (an empty list: all met); a row measured on a subset is
    judged against random order on the same images."""
    missed = {}
    for name, m in results["methods"].items():
        later = results.get("method_runs", {}).get(name, {})
        random_deletion = (later.get("random_order") or results["random_order"])["deletion_auc"]["mean"]
        misses = []
        pg = m["pointing_game_tolerance"]["mean"]
        if name in POINTING_TARGETS and pg < POINTING_TARGETS[name]:
            misses.append(f"pointing game (<= {TOLERANCE_PX:g} px) {pg:.3f} < {POINTING_TARGETS[name]}")
        if m["rank_correlation"]["mean"] > MAX_RHO:
            misses.append(f"randomization rho {m['rank_correlation']['mean']:.3f} > {MAX_RHO}")
        if m["deletion_auc"]["mean"] >= random_deletion:
            misses.append(f"deletion AUC {m['deletion_auc']['mean']:.3f} >= random {random_deletion:.3f}")
        missed[name] = misses
    return missed


def row_name(results: dict, name: str) -> str:
    """The method's name in the tables, with its image count where it ran on a subset."""
    subset = results.get("method_runs", {}).get(name, {}).get("subset")
    return f"{name} ({len(subset['indices'])} images)" if subset else name


def render(results: dict, spec: Demo = CNN) -> str:
    training = results.get("training", {})
    r = results
    tol = r["settings"]["pointing_tolerance_px"]
    noise = r["smoothgrad_noise_selection"]
    chosen = ", ".join(f"{k}: {v:.3f}" for k, v in noise["validation_pointing_game"].items())
    lines = [
        _report.machine_line(r.get("meta", {})),
        "",
        f"`python models/evaluate_demo.py{' --vit' if spec is VIT else ''}` (= `gradmap evaluate` on {spec.what} "
        f"and its {r['images']} held-out "
        f"images, `--tolerance {tol:g}`; accuracy {r['accuracy']:.3f}"
        + (f", held-out test accuracy {training['test_accuracy']:.3f} on {training['split_sizes']['test']} images"
           if "test_accuracy" in training else "") + "). "
        f"Chance for the pointing game (mean object area): {r['chance']['mean']:.3f} strict, "
        f"{r['chance_tolerance']['mean']:.3f} within {tol:g} px; random pixel order: "
        f"deletion AUC {r['random_order']['deletion_auc']['mean']:.3f}, insertion AUC "
        f"{r['random_order']['insertion_auc']['mean']:.3f}. SmoothGrad's noise, {noise['noise']:g} of the value range, "
        f"was chosen on {noise['validation_images']} separate validation images (their pointing game within {tol:g} px "
        f"per noise level: {chosen}).",
        "",
        f"| method | pointing game (strict) | pointing game (≤ {tol:g} px) | energy pointing game | deletion AUC ↓ | "
        "insertion AUC ↑ | randomization ρ ↓ | ρ between two images' maps | targets |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    misses = verdicts(results)
    for name, m in r["methods"].items():
        target = f"(target ≥ {POINTING_TARGETS[name]})" if name in POINTING_TARGETS else ""
        verdict = "met" if not misses[name] else "**missed**: " + "; ".join(misses[name])
        lines.append(f"| {row_name(r, name)} | {m['pointing_game']['mean']:.3f} | {m['pointing_game_tolerance']['mean']:.3f} {target} | "
                     f"{m['energy_pointing_game']['mean']:.3f} | "
                     f"{m['deletion_auc']['mean']:.3f} | {m['insertion_auc']['mean']:.3f} | "
                     f"{m['rank_correlation']['mean']:.3f} | {m['rank_correlation_other_image']['mean']:.3f} | {verdict} |")
    lines += ["", f"Targets: pointing game (within {tol:g} px, Zhang et al.'s form) ≥ 0.8 (vanilla), ≥ 0.9 "
                  f"(smoothgrad, grad-cam); randomization ρ ≤ {MAX_RHO} and deletion AUC below random order for every "
                  "method. ρ between two images' maps: the trained model's maps of different eval images (each with the next); "
                  "what a layout shared by every map gives by itself: a randomized model's map as unrelated to the trained one "
                  "as another picture's map scores about this. "
                  + (f"The randomized model: the same network with its {spec.top} re-initialized. " if spec is VIT else "")
                  + f"Figures from {spec.directory}/quality.json."]
    later = r.get("method_runs", {})
    if later:
        dates = sorted({(run.get("meta") or {}).get("started", "")[:10] for run in later.values()} - {""})
        lines[-1] += (f" The rows of {', '.join(later)} were measured in a later run "
                      f"(`python models/evaluate_demo.py{' --vit' if spec is VIT else ''} --method NAME`"
                      f"{', ' + ', '.join(dates) if dates else ''}; "
                      "`method_runs` in quality.json records it), the others in the run named above.")
        subsets: dict[tuple, list[str]] = {}
        for name, run in later.items():
            if run.get("subset"):
                key = (run["subset"]["per_class"], len(run["subset"]["indices"]),
                       run["random_order"]["deletion_auc"]["mean"], run["random_order"]["insertion_auc"]["mean"])
                subsets.setdefault(key, []).append(name)
        for (per_class, count, deletion, insertion), names in subsets.items():
            methods = ", ".join(names)
            lines[-1] += (f" {methods} ran on {count} of the {r['images']} images, the first {per_class} of each class "
                          f"(`--per-class {per_class}`: a subset for time on a shared 2-core machine, as every map "
                          f"is computed on each of the {2 + len(r.get('cascade_models', {}))} models of the "
                          "randomization checks); random pixel order on those images: deletion AUC "
                          f"{deletion:.3f}, insertion AUC {insertion:.3f}, which their deletion target is judged against.")
    from gradmap import contract

    transformer_only = [m.name for m in contract.METHOD_TABLE
                        if contract.OUTPUT_ATTENTION in m.outputs and m.name not in r["methods"]]
    unmeasured = [m.name for m in contract.METHOD_TABLE if m.name not in r["methods"]
                  and (spec is VIT or m.name not in transformer_only)
                  and (spec is CNN or m.name in r.get("supported_methods", r["methods"]))]
    if transformer_only and spec is CNN:
        lines[-1] += (f" No rows for {', '.join(transformer_only)}: they read a vision transformer's attention "
                      "(`gradmap export --attention`), and the demo model is a CNN.")
    if unmeasured:
        lines[-1] += f" Not measured on the demo set yet: {', '.join(unmeasured)}."
    labels = list(next(iter(r["methods"].values())).get("rank_correlation_cascade", {}))
    if labels:
        lines += ["", "Randomization cascade (Adebayo et al.'s cascading form): ρ between the trained model's maps and "
                      "those of the same network with its classifier and its last 1, 2, ... conv blocks re-initialized, "
                      "top down, each model keeping the random weights of the one before (`make_demo.randomize_top`). "
                      "The target above is judged on the first column (`shapes_randomized_top.onnx`); with all "
                      f"{labels[-1].split()[0]} blocks random, nothing the model learned is left.",
                  "",
                  "| method | classifier + last block | " + " | ".join(f"+ last {label}" for label in labels)
                  + " | ρ between two images' maps |",
                  "|---|---|" + "---|" * len(labels) + "---|"]
        for name, m in r["methods"].items():
            cells = [f"{m['rank_correlation']['mean']:.3f}"]
            cells += [f"{m['rank_correlation_cascade'][label]['mean']:.3f}" for label in labels]
            lines.append(f"| {row_name(r, name)} | " + " | ".join(cells) + f" | {m['rank_correlation_other_image']['mean']:.3f} |")
    if spec is CNN:  # the reasons are the CNN's (its max-pooled CAM layer, its ReLUs)
        lines += explain_misses(r)
    return "\n".join(lines)


# Why methods miss the randomization target, by the mechanism the demo's figures point to; each
# paragraph is rendered with the measured figures of the methods of its group that miss, and only then.
MISS_GROUPS = (
    (("guided-backprop", "deconvnet"),
     "Both pass back only positive signals through the ReLUs (deconvnet: positive gradients; guided "
     "backpropagation: positive gradients through positive activations), so their maps reconstruct the "
     "picture's edges whatever the top layers hold, as Adebayo et al. (2018) and Nie, Zhang & Patel (2018) "
     "found: ρ hardly falls down the cascade."),
    (("integrated-gradients", "gradient-x-input", "blur-ig", "guided-ig", "xrai"),
     "Each multiplies gradients by how the picture differs from a baseline (x − x0; Blur IG: by how the "
     "picture changes as its blur is undone; XRAI sums integrated gradients over segments of the picture). "
     "That factor is the same for every model, so the maps keep the picture's structure when the network "
     "has learned nothing: ρ stays high down the cascade, well above ρ between two pictures' maps. Adebayo et al. (2018) report the same for gradient ⊙ input and "
     "integrated gradients. Each implementation matches its reference on the same inputs (Captum; PAIR's "
     "`saliency` for XRAI, Blur IG and Guided IG), so the miss is the methods', not an error in them."),
    (("layer-cam", "hirescam"),
     "The demo network max-pools its CAM layer, so the score's gradient there is non-zero only at each "
     "channel's maximum, and these maps, which weight the activations position by position instead of "
     "averaging the gradient over the map as Grad-CAM and XGradCAM do, are the activations at those maxima. "
     "Where a channel peaks depends on the picture as much as on the block's weights, so a random block's "
     "maxima still follow the picture's structure: ρ stays above ρ between two pictures' maps with every "
     "block random. The maps match pytorch-grad-cam's on the same activations and gradients (tests)."),
    (("rise",),
     "RISE's map is the sum of its random masks weighted by the class probability, and the check draws the "
     "same masks (the same seed) for both models. A randomized model's probability hardly changes from mask "
     "to mask, so its map is the masks' own coverage, uneven by sampling, and the trained model's map "
     "carries that coverage too where its own signal is weak; ρ between two pictures' maps, which share the "
     "masks as well, is high for the same reason. The next seed's masks for the randomized model "
     "(`--seed-check`) take the shared masks out of ρ; the trained model's maps of two seeds say how much "
     "of a map the masks themselves decide. RISE matches a re-implementation from the paper on the same "
     "masks (tests)."),
)


def _cascade_figures(r: dict, name: str) -> str:
    m = r["methods"][name]
    chain = [m["rank_correlation"]["mean"]] + [v["mean"] for v in m.get("rank_correlation_cascade", {}).values()]
    text = f"{row_name(r, name)}: ρ {' → '.join(f'{v:.3f}' for v in chain)}"
    text += f" (two pictures' maps: {m['rank_correlation_other_image']['mean']:.3f}"
    if "rank_correlation_other_seed" in m:
        other = m["rank_correlation_other_seed"]["mean"]
        text += (f"; against the randomized model's map drawn from the next seed: {other:.3f}, "
                 f"{'within' if other <= MAX_RHO else 'above'} the target; the trained model's maps of two "
                 f"seeds: {m['rank_correlation_seed_to_seed']['mean']:.3f}")
    return text + ")"


def explain_misses(r: dict) -> list[str]:
    """Paragraphs under the cascade table: for each group of :data:`MISS_GROUPS` with a method that misses
    the randomization target, its measured figures (ρ down the cascade, top first) and the reason."""
    missed = [name for name, m in r["methods"].items() if m["rank_correlation"]["mean"] > MAX_RHO]
    if not missed:
        return []
    lines = ["", f"What the randomization misses mean (ρ > {MAX_RHO}; figures: ρ with the classifier and the last "
                 "block random, then down the cascade):", ""]
    for names, reason in MISS_GROUPS:
        here = [name for name in names if name in missed]
        if here:
            lines.append("- " + "; ".join(_cascade_figures(r, name) for name in here) + ". " + reason)
    alone = [name for name in missed if not any(name in names for names, _ in MISS_GROUPS)]
    if alone:
        lines.append("- " + "; ".join(_cascade_figures(r, name) for name in alone) + ". Not explained yet.")
    return lines


def sections(data: dict) -> dict[str, str]:
    """``data``: the results of each demo model measured so far, by section (:func:`load_results`)."""
    return {name: render(results, DEMOS[name]) for name, results in data.items()}


def load_results(path: Path | None = None) -> dict:
    """The results file at ``path``; without one, every demo model's results by docs section (the CNN's
    always, the ViT's once measured), as :func:`sections` takes them."""
    if path is None:
        return {demo.section: load_results(demo.results) for demo in DEMOS.values()
                if demo is CNN or demo.results.is_file()}
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (run python models/evaluate_demo.py first)")
    return json.loads(path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", type=Path, default=None,
                        help="the demo model's folder (default models/demo, with --vit models/demo_vit)")
    parser.add_argument("--vit", action="store_true",
                        help="the demo vision transformer (models/make_demo_vit.py) instead of the CNN")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", action="append", metavar="NAME[:SETTING=VALUE,...]",
                        help="evaluate only this method (repeatable), with these settings, and merge its rows into "
                             "the existing quality.json (without one: a first run on these methods only)")
    parser.add_argument("--per-class", type=int, default=None, metavar="N",
                        help="with --method: evaluate on the first N images of each class only (the slow "
                             "perturbation and path methods); the table says so")
    parser.add_argument("--seed-check", action="store_true",
                        help="with --method: for methods with a seed (RISE...), also compare the trained model's map "
                             "with the randomized model's map drawn from the next seed (gradmap.runtime.evaluate's "
                             "seed_check): two more maps per image")
    _report.add_flags(parser, RESULTS)
    args = parser.parse_args()
    if args.per_class is not None and not args.method:
        parser.error("--per-class: only with --method (the full run covers every image)")
    if args.seed_check and not args.method:
        parser.error("--seed-check: only with --method")
    spec = VIT if args.vit else CNN
    demo = args.demo or ROOT / spec.directory
    out = args.out if args.out != RESULTS else demo / "quality.json"
    sections_run = (spec.section,)
    if args.tables_only:
        results = load_results(out)
    elif args.method and not out.is_file() and args.per_class is None:
        # a first run on these methods only; later --method runs add the others
        meta = _report.start_run(PAGE, sections_run, versions=("onnxruntime",), threads=args.threads)
        results = run(demo, args.threads, [parse_method(text) for text in args.method], seed_check=args.seed_check,
                      spec=spec)
        results["targets_missed"] = verdicts(results)
        results = _report.write_json(out, {"meta": _report.finish_run(meta), **results}, indent=2)
    elif args.method:
        # some methods again (or new ones), their rows merged into the results of the full run
        results = load_results(out)
        only = [parse_method(text) for text in args.method]
        meta = _report.start_run(PAGE, sections_run, versions=("onnxruntime",), threads=args.threads)
        partial = run(demo, args.threads, only, results.get("smoothgrad_noise_selection"), args.per_class,
                      args.seed_check, spec)
        record = _report.finish_run(meta)
        results = load_results(out)  # read again: another --method run may have merged its rows meanwhile
        for name, settings in only:
            results["methods"][name] = partial["methods"][name]
            results.setdefault("method_runs", {})[name] = {
                "settings": settings, "seconds": partial.get("seconds"), "meta": record,
                **({"subset": partial["subset"], "random_order": partial["random_order"],
                    "chance_tolerance": partial["chance_tolerance"]} if "subset" in partial else {})}
        results["targets_missed"] = verdicts(results)
        results = _report.write_json(out, results, indent=2)
    else:
        meta = _report.start_run(PAGE, sections_run, versions=("onnxruntime",), threads=args.threads)
        results = run(demo, args.threads, spec=spec)
        results["targets_missed"] = verdicts(results)
        results = _report.write_json(out, {"meta": _report.finish_run(meta), **results}, indent=2)
    from gradmap.runtime.evaluate import format_report

    print(format_report(results))
    if not args.no_docs:
        _report.publish(PAGE, {spec.section: render(results, spec)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
