"""Blur IG, Guided IG and XRAI per picture: gradmap's runtime against PAIR's ``saliency`` package on torch.

    python bench/bench_path_methods.py [--models resnet50 vit_b_16] [--steps 16]
    python bench/bench_path_methods.py --models vit_b_16 --update --note "..."   # the other models' rows kept
    python bench/bench_path_methods.py --tables-only   # the docs table again from bench/results/path_methods.json

One photograph (scikit-image's chelsea, the models' own preprocessing), top-1 class, per model with
random weights, 2 threads for onnxruntime and torch, the same settings on both sides:

  Blur IG: ``--steps`` steps, max_sigma 50, grad_step 0.01;
  Guided IG: ``--steps`` steps, fraction 0.25, max_dist 0.02, from gradmap's black baseline (the
    same array given to PAIR);
  XRAI: ``--steps`` integration points per baseline with PAIR's defaults (baselines at the input's
    min and max, equal weights; gradmap's ``--baselines input-range --rule equal-weights``), full search.

gradmap: ``gradmap.runtime.methods.attribute`` (what ``gradmap run --method`` calls) on the exported
model, with the fastest of ``--batch-sizes``. PAIR: ``saliency.core`` with the call_model_function
of its PyTorch example (the module's gradient of the target logit, by autograd), with the fastest of
``--batch-sizes`` where the method batches (Blur IG and XRAI; Guided IG asks for one point at a
time). Each side's map is compared with the other's before timing (max |difference| over max
|PAIR|: float32 torch and onnxruntime gradients differ in their last bits, which Guided IG's
feature ranking and XRAI's region order can amplify). Then the two sides run in turn, round by
round, as in bench_speed.py; the table reports medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

import _report

DEFAULT_MODELS = ["resnet50", "vit_b_16"]
RESULTS = _report.RESULTS / "path_methods.json"
PAGE, SECTIONS = "benchmarks.md", ("path-methods-speed",)
METHODS = ("blur-ig", "guided-ig", "xrai")
TARGET = 1.5


def _numpy_for_pair():
    """saliency 0.2.1's Guided IG calls np.quantile(..., interpolation=...), which numpy 2.4 spells
    ``method``: its module gets numpy with that one keyword translated."""
    from saliency.core import guided_ig

    class _Numpy:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def quantile(a, q, interpolation="linear", **kwargs):
            return np.quantile(a, q, method=interpolation, **kwargs)

    guided_ig.np = _Numpy()


def bench_model(name: str, threads: int, steps: int, batch_sizes: list[int], repeat: int, budget_s: float) -> list[dict]:
    import saliency.core as pair
    import torch

    from bench_methods import best_of, picture
    from bench_speed import _interleaved_times
    from gradmap.export._api import export_torchvision
    from gradmap.export._torchvision import input_size_of, load_torchvision
    from gradmap.runtime.methods import MethodSpec, attribute, baseline_image
    from gradmap.runtime.model import SaliencyModel

    _numpy_for_pair()
    torch.set_num_threads(threads)
    module, _ = load_torchvision(name, "none")
    for p in module.parameters():
        p.requires_grad_(False)
    size = input_size_of(name)
    image, mean, std = picture(size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        export_torchvision(name, path, weights="none", verify=False)  # the same seeded random weights
        model = SaliencyModel(path, provider="cpu", threads=threads)
    with torch.no_grad():
        top = int(module(torch.from_numpy(image)).argmax(1))
    targets = np.array([top])
    hwc = np.moveaxis(image[0], 0, -1).astype(np.float64)

    calls: list[int] = []  # the pictures of each of PAIR's gradient calls: how many gradients a method takes

    def call_model(batch, call_model_args=None, expected_keys=None):
        calls.append(len(batch))
        x = torch.from_numpy(np.moveaxis(np.asarray(batch, np.float32), -1, 1).copy()).requires_grad_(True)
        module(x)[:, top].sum().backward()
        return {pair.INPUT_OUTPUT_GRADIENTS: np.moveaxis(x.grad.numpy(), 1, -1)}

    black = baseline_image(image, "black", mean, std)
    specs = {"blur-ig": MethodSpec("blur-ig", steps=steps, max_sigma=50, grad_step=0.01),
             "guided-ig": MethodSpec("guided-ig", steps=steps, fraction=0.25, max_dist=0.02, baseline="black"),
             "xrai": MethodSpec("xrai", steps=steps, rule="equal-weights", baselines="input-range", search="full")}

    def pair_fn(method: str, b: int):
        if method == "blur-ig":
            return lambda: pair.BlurIG().GetMask(hwc, call_model, steps=steps, max_sigma=50, grad_step=0.01,
                                                 batch_size=b)
        if method == "guided-ig":
            return lambda: pair.GuidedIG().GetMask(hwc, call_model, x_baseline=np.moveaxis(black[0], 0, -1),
                                                   x_steps=steps, fraction=0.25, max_dist=0.02)
        return lambda: pair.XRAI().GetMask(hwc, call_model, batch_size=b,
                                           extra_parameters=pair.XRAIParameters(steps=steps))

    rows = []
    for method in METHODS:
        row = {"model": name, "method": method, "threads": threads, "input_size": list(size), "steps": steps,
               "load_average_start": _report._load_1min()}

        def gradmap_fn(b, spec=specs[method]):
            return lambda: attribute(model, spec, image, targets, batch_size=b)[2][0]

        pair_batches = batch_sizes if method != "guided-ig" else [1]
        # one candidate: nothing to pick, and the comparison call below is the warm-up
        g_best, g_times = best_of({str(b): gradmap_fn(b) for b in batch_sizes}) if len(batch_sizes) > 1 \
            else (str(batch_sizes[0]), {})
        p_best, p_times = best_of({str(b): pair_fn(method, b) for b in pair_batches}) if len(pair_batches) > 1 \
            else (str(pair_batches[0]), {})
        row["gradmap_batch"], row["gradmap_batch_ms"] = int(g_best), g_times
        row["pair_batch"], row["pair_batch_ms"] = int(p_best), p_times
        variants = {"gradmap_ms": gradmap_fn(int(g_best)), "pair_ms": pair_fn(method, int(p_best))}
        ours = variants["gradmap_ms"]()
        calls.clear()
        theirs = np.asarray(variants["pair_ms"]())
        ours = ours[0] if method == "xrai" else np.moveaxis(ours, 0, -1)
        row["difference"] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        # the floor: onnxruntime's input gradients on PAIR's own calls (as many pictures in each),
        # timed in the same rounds: the gradients the method needs, in the batches its path allows
        # (Guided IG's steps one after the other, each from the last)
        row["gradients"] = sum(calls)
        row["pair_calls"] = pair_calls = list(calls)
        copies = np.repeat(image, max(pair_calls), axis=0)

        def floor_fn(sizes=tuple(pair_calls)):
            for k in sizes:
                model.run(copies[:k], np.repeat(targets, k))
        variants["floor_ms"] = floor_fn
        floor_fn()  # its warm-up
        times = _interleaved_times(variants, warmup=0, repeat=repeat, budget_s=budget_s)
        row.update({k: statistics.median(v) for k, v in times.items()})
        row["rounds"] = len(times["gradmap_ms"])
        row["times_ms"] = {k: [round(t, 1) for t in v] for k, v in times.items()}
        row["speedup_vs_pair"] = row["pair_ms"] / row["gradmap_ms"]
        row["load_average_end"] = _report._load_1min()
        print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
        rows.append(row)
    return rows


def verdict(r: dict) -> tuple[str, str | None]:
    """("yes" | "floor" | "no", for a miss what stops it): gradmap at most PAIR's time ÷ 1.5. A miss is
    the floor's when onnxruntime's gradients on PAIR's own calls (``floor_ms``, same rounds; rows
    measured before it have none) are, with FLOOR_MARGIN to spare, over the target."""
    from bench_speed import FLOOR_MARGIN, floor_stops

    needed = r["pair_ms"] / TARGET
    if r["gradmap_ms"] <= needed:
        return "yes", None
    head = f"needs ≤ {needed:.0f} ms (PAIR's {r['pair_ms']:.0f} ms ÷ {TARGET:g}), gradmap {r['gradmap_ms']:.0f} ms"
    if "floor_ms" not in r:
        return "no", head
    if "pair_calls" in r:
        sizes = sorted(set(r["pair_calls"]))
        calls = len(r["pair_calls"])
        floor_text = (f"onnxruntime's input gradients on PAIR's own {calls} call{'s' if calls > 1 else ''} "
                      f"({r['gradients']} pictures, {' or '.join(map(str, sizes))} a call) take {r['floor_ms']:.0f} ms "
                      "in the same rounds")
    else:  # rows measured before the floor followed PAIR's calls
        floor_text = (f"onnxruntime's input gradients of the {r['gradients']} pictures PAIR's method takes, in "
                      f"batches of {r['gradmap_batch']}, take {r['floor_ms']:.0f} ms in the same rounds")
    part = floor_stops(r["floor_ms"], needed)
    above = r["gradmap_ms"] - r["floor_ms"]
    if part:
        return "floor", f"{head}; {floor_text}: {part} (gradmap spends {above:.0f} ms above the floor)"
    return "no", (f"{head}; {floor_text}, so a run within {FLOOR_MARGIN:.2f}× of it would meet it: gradmap spends "
                  f"{above:.0f} ms above it")


def render(rows: list[dict], meta: dict) -> str:
    steps = sorted({r["steps"] for r in rows})
    lines = [
        _report.machine_line(meta),
        "",
        f"`python bench/bench_path_methods.py`: one photograph (chelsea) per call, top-1 class, medians in ms "
        f"of interleaved rounds, {meta['threads']} threads, random weights"
        f"{'; ' + meta['note'] if meta.get('note') else ''}. Equal settings on both sides, "
        f"{' / '.join(map(str, steps))} steps{' (per row)' if len(steps) > 1 else ''}: Blur IG max_sigma 50, "
        "grad_step 0.01; Guided IG fraction 0.25, "
        "max_dist 0.02, black baseline; XRAI with PAIR's defaults (baselines at the input's min and max, equal "
        "weights; `--baselines input-range --rule equal-weights`), full search. gradmap: "
        "`gradmap.runtime.methods.attribute` on the exported model (what `gradmap run --method` calls); "
        "PAIR: `saliency.core` with its PyTorch example's call_model_function (autograd on the torch "
        "module); batch sizes in brackets (each side's fastest when several were tried; PAIR's Guided IG "
        "takes one point at a time). *difference*: max |gradmap - PAIR| / max |PAIR| on this picture. Target: gradmap "
        f"at least {TARGET:g}x faster than PAIR, or \"floor\" where onnxruntime's input gradients on PAIR's own "
        "calls (as many pictures in each; timed in the same rounds) would miss it too.",
        "",
    ]
    header = ["model", "method"] + (["steps"] if len(steps) > 1 else []) + [
        "gradmap", "PAIR + torch", "speed-up", "difference", "met"]
    body, misses = [], []
    for r in rows:
        met, why = verdict(r)
        body.append([r["model"], r["method"]] + ([r["steps"]] if len(steps) > 1 else []) + [
            f"{r['gradmap_ms']:.0f} (batch {r['gradmap_batch']})", f"{r['pair_ms']:.0f} (batch {r['pair_batch']})",
            f"{r['speedup_vs_pair']:.2f}×", f"{r['difference']:.1e}", _report.target_cell(met)])
        if why:
            misses.append(f"- {r['model']}, {r['method']}: {why}.")
    lines += _report.table(header, body)
    lines += _report.misses_lines(misses)
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"path-methods-speed": render(data["rows"], data["meta"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16, help="steps of every method, on both sides")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16],
                        help="batch sizes to pick each side's fastest from")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of rounds per model and method at most")
    _report.add_flags(parser, RESULTS, note=True, update=True)
    args = _report.parse_args(parser)

    def measure():
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "torch", "saliency", "scikit-image"),
                                 threads=args.threads, note=args.note)
        partial = args.out.parent / "partial" / args.out.name
        rows = []
        for name in args.models:
            rows += bench_model(name, args.threads, args.steps, args.batch_sizes, args.repeat, args.budget)
            _report.write_results(partial, meta, rows, final=False)  # a crash later keeps what was measured
        rows, meta = _report.updated(args, meta, rows)
        data = _report.write_results(args.out, meta, rows)
        partial.unlink(missing_ok=True)
        return data

    _report.render_or_measure(args, PAGE, sections, measure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
