"""SmoothGrad and integrated gradients per picture: gradmap's runtime against Captum and torch.compile.

    python bench/bench_methods.py [--models resnet50 mobilenet_v3_large efficientnet_b0 vit_b_16]
    python bench/bench_methods.py --tables-only     # the docs table again from bench/results/methods.json

One photograph (scikit-image's chelsea, the models' own preprocessing), top-1 class, per model with
random weights, 2 threads for onnxruntime and torch:

  SmoothGrad, 25 samples, noise 0.15 of the picture's value range:
    gradmap: ``gradmap.runtime.methods.attribute`` (what ``gradmap run --method smoothgrad`` calls) on the
      exported model, the samples in batches of ``--batch-sizes`` (best one reported);
    Captum: ``NoiseTunnel(Saliency(module))`` with ``nt_samples_batch_size`` from ``--captum-batches`` (best);
    torch.compile: the same sums on ``torch.compile(module, dynamic=False)``, the samples in one batch.
  Integrated gradients, 32 steps (Gauss-Legendre, black baseline):
    gradmap: ``attribute`` as above; Captum: ``IntegratedGradients`` with ``internal_batch_size`` from
    ``--captum-batches`` (best); torch.compile: the 32 path points in one batch.

The best batch size of each side is picked from one timed call each (after a warm-up call); then the
three sides of each method run in turn, round by round, as in bench_speed.py, and the table reports
medians. torch.compile's first call (compilation of forward and backward for that batch shape) is
reported beside its steady state. Each side's attribution is checked against Captum's before timing
(max |difference| over max |Captum|), so that the three compute the same thing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _report

DEFAULT_MODELS = ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "vit_b_16"]
RESULTS = _report.RESULTS / "methods.json"
PAGE, SECTIONS = "benchmarks.md", ("methods-speed",)
SAMPLES, NOISE, STEPS = 25, 0.15, 32


def picture(size: tuple[int, int]) -> tuple[np.ndarray, list, list]:
    """chelsea, preprocessed as torchvision's ImageNet eval transform (the export's own preprocessing)."""
    from PIL import Image
    from skimage import data

    from gradmap.runtime.preprocess import preprocess
    from gradmap.contract import Preprocessing

    pre = Preprocessing(crop=tuple(size), resize=int(round(size[0] / 0.875)))
    tensor, _ = preprocess(Image.fromarray(data.chelsea()), pre)
    return tensor.reshape(1, 3, *size), list(pre.mean), list(pre.std)


def best_of(candidates: dict, calls: int = 1) -> tuple[str, dict[str, float]]:
    """The fastest of ``candidates`` (name -> function), each timed ``calls`` times after a warm-up call."""
    times = {}
    for name, fn in candidates.items():
        fn()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times[name] = (time.perf_counter() - t) / calls * 1000
    return min(times, key=times.get), times


def bench_model(name: str, threads: int, batch_sizes: list[int], captum_batches: list[int], repeat: int,
                budget_s: float, compile_torch: bool) -> list[dict]:
    import torch
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    from bench_speed import _interleaved_times
    from gradmap.export._api import export_torchvision
    from gradmap.export._torchvision import input_size_of, load_torchvision
    from gradmap.runtime.methods import MethodSpec, attribute, baseline_image
    from gradmap.runtime.model import SaliencyModel

    torch.set_num_threads(threads)
    module, _ = load_torchvision(name, "none")
    for p in module.parameters():
        p.requires_grad_(False)
    size = input_size_of(name)
    image, mean, std = picture(size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        # the same seeded random weights as ``module`` (load_torchvision's seed 0)
        export_torchvision(name, path, weights="none", verify=False)
        model = SaliencyModel(path, provider="cpu", threads=threads)
    x = torch.from_numpy(image)
    with torch.no_grad():
        top = int(module(x).argmax(1))
    targets = np.array([top])
    sigma = float(NOISE * (image.max() - image.min()))
    baseline = baseline_image(image, "black", mean, std)
    rows = []
    for method in ("smoothgrad", "integrated-gradients"):
        row = {"model": name, "method": method, "threads": threads, "input_size": list(size)}
        spec = (MethodSpec("smoothgrad", samples=SAMPLES, noise=NOISE) if method == "smoothgrad"
                else MethodSpec("integrated-gradients", steps=STEPS, rule="gauss-legendre", baseline="black"))

        def gradmap_fn(b):
            return lambda: attribute(model, spec, image, targets, batch_size=b)[2]

        if method == "smoothgrad":
            nt = NoiseTunnel(Saliency(module))

            def captum_fn(b):
                return lambda: nt.attribute(x, nt_type="smoothgrad", nt_samples=SAMPLES, stdevs=sigma,
                                            nt_samples_batch_size=b, target=top, abs=False).numpy()
        else:
            ig = IntegratedGradients(module)
            x0 = torch.from_numpy(np.ascontiguousarray(baseline))

            def captum_fn(b):
                return lambda: ig.attribute(x, baselines=x0, target=top, n_steps=STEPS, method="gausslegendre",
                                            internal_batch_size=b).numpy()

        # the same attribution on all sides (SmoothGrad's noise draws differ: compared on expectation
        # only through the shared clean-image term; IG is deterministic and must agree)
        g_best, g_times = best_of({str(b): gradmap_fn(b) for b in batch_sizes})
        c_best, c_times = best_of({str(b): captum_fn(b) for b in captum_batches})
        row["gradmap_batch"], row["gradmap_batch_ms"] = int(g_best), g_times
        row["captum_batch"], row["captum_batch_ms"] = int(c_best), c_times
        variants = {"gradmap_ms": gradmap_fn(int(g_best)), "captum_ms": captum_fn(int(c_best))}
        if method == "integrated-gradients":
            ours, theirs = variants["gradmap_ms"](), variants["captum_ms"]()
            row["ig_difference"] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        if compile_torch:
            import torch._dynamo

            torch._dynamo.reset()
            compiled = torch.compile(module, dynamic=False)
            if method == "smoothgrad":
                rng = np.random.default_rng(0)

                def compiled_fn():
                    noisy = x + sigma * torch.from_numpy(rng.standard_normal((SAMPLES, *image.shape[1:]),
                                                                             dtype=np.float32))
                    noisy.requires_grad_(True)
                    compiled(noisy)[:, top].sum().backward()
                    return noisy.grad.mean(0, keepdim=True).numpy()
            else:
                xs, ws = np.polynomial.legendre.leggauss(STEPS)
                alphas = torch.from_numpy((0.5 * (xs + 1)).astype(np.float32))[:, None, None, None]
                weights = torch.from_numpy((0.5 * ws).astype(np.float32))[:, None, None, None]
                x0 = torch.from_numpy(np.ascontiguousarray(baseline))

                def compiled_fn():
                    path = (x0 + alphas * (x - x0)).requires_grad_(True)
                    compiled(path)[:, top].sum().backward()
                    return ((x - x0) * (weights * path.grad).sum(0, keepdim=True)).numpy()
            t = time.perf_counter()
            first = compiled_fn()
            row["torch_compile_first_s"] = time.perf_counter() - t
            if method == "integrated-gradients":
                theirs = variants["captum_ms"]()
                row["compile_ig_difference"] = float(np.abs(first - theirs).max() / np.abs(theirs).max())
            variants["torch_compile_ms"] = compiled_fn
        times = _interleaved_times(variants, warmup=1, repeat=repeat, budget_s=budget_s)
        row.update({k: statistics.median(v) for k, v in times.items()})
        row["rounds"] = len(times["gradmap_ms"])
        row["times_ms"] = {k: [round(t, 2) for t in v] for k, v in times.items()}
        row["speedup_vs_captum"] = row["captum_ms"] / row["gradmap_ms"]
        if "torch_compile_ms" in row:
            row["speedup_vs_torch_compile"] = row["torch_compile_ms"] / row["gradmap_ms"]
        print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
        rows.append(row)
    return rows


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        _report.machine_line(meta),
        "",
        f"`python bench/bench_methods.py`: one photograph (chelsea) per call, top-1 class, medians in ms of "
        f"interleaved rounds, {meta['threads']} threads, random weights"
        f"{'; ' + meta['note'] if meta.get('note') else ''}. SmoothGrad: {SAMPLES} samples, noise {NOISE} of the "
        f"value range; integrated gradients: {STEPS} Gauss-Legendre steps from a black baseline. gradmap: "
        "`gradmap.runtime.methods.attribute` on the exported model (what `gradmap run --method` calls), "
        "Captum: `NoiseTunnel(Saliency)` and `IntegratedGradients`, each with its fastest batch size of the "
        "candidates (in brackets); torch.compile: the same sums on `torch.compile(module)` in steady state "
        "(all samples in one batch; its first call, the compilation, in brackets). Target: gradmap at least "
        "1.5x faster than Captum and faster than torch.compile.",
        "",
        "| model | method | gradmap | Captum | torch.compile (first call) | speed-up vs Captum | vs torch.compile | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        compiled = (f"{r['torch_compile_ms']:.0f} ({r['torch_compile_first_s']:.0f} s)"
                    if "torch_compile_ms" in r else "–")
        vs_compile = f"{r['speedup_vs_torch_compile']:.2f}×" if "speedup_vs_torch_compile" in r else "–"
        met = r["speedup_vs_captum"] >= 1.5 and r.get("speedup_vs_torch_compile", 2.0) > 1.0
        lines.append(f"| {r['model']} | {r['method']} | {r['gradmap_ms']:.0f} (batch {r['gradmap_batch']}) | "
                     f"{r['captum_ms']:.0f} (batch {r['captum_batch']}) | {compiled} | "
                     f"{r['speedup_vs_captum']:.2f}× | {vs_compile} | {'yes' if met else '**no**'} |")
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"methods-speed": render(data["rows"], data["meta"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16, 32],
                        help="gradmap's batch sizes to pick the fastest from")
    parser.add_argument("--captum-batches", nargs="+", type=int, default=[8, 32],
                        help="Captum's internal batch sizes to pick the fastest from")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of rounds per model and method at most")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    _report.add_flags(parser, RESULTS, note=True, update=True)
    args = _report.parse_args(parser)

    def measure():
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "torch", "captum"), threads=args.threads,
                                 note=args.note)
        rows = []
        for name in args.models:
            rows += bench_model(name, args.threads, args.batch_sizes, args.captum_batches, args.repeat, args.budget,
                                not args.no_compile)
        rows, meta = _report.updated(args, meta, rows)
        return _report.write_results(args.out, meta, rows)

    _report.render_or_measure(args, PAGE, sections, measure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
