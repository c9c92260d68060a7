"""SmoothGrad and integrated gradients per picture: gradmap's runtime against Captum and torch.compile.

    python bench/bench_methods.py [--models resnet50 mobilenet_v3_large efficientnet_b0 vit_b_16]
    python bench/bench_methods.py --tables-only     # the docs table again from bench/results/methods.json

One photograph (scikit-image's chelsea, the models' own preprocessing), top-1 class, per model with
random weights, 2 threads for onnxruntime and torch:

  SmoothGrad, 25 samples, noise 0.15 of the picture's value range:
    gradmap: ``gradmap.runtime.methods.attribute`` (what ``gradmap run --method smoothgrad`` calls) on the
      default export (portable) as the runtime loads it (lowered at load for this CPU's block), the
      samples in batches of ``--batch-sizes`` (best one reported);
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

The floor (unless --no-floor): bench/floor.py's floor graph, lowered for the same block, run on the
batches gradmap's call sends to onnxruntime (recorded from that call; random pictures of those
sizes, subnormals flushed as floor.py runs it), in the same rounds: the least
the same gradients cost with any exact standard-op graph, before numpy's share of the method. A row
that misses the target against Captum says whether that floor stops it.
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
#: Target: gradmap at least this many times faster than Captum at its best internal batch size.
TARGET = 1.5


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


class _BatchRecorder:
    """A loaded SaliencyModel that records the batch sizes it is run on (the floor replays them)."""

    def __init__(self, model):
        self._model, self.batches = model, []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def run_outputs(self, images, targets, outputs):
        self.batches.append(len(images))
        return self._model.run_outputs(images, targets, outputs)


def bench_model(name: str, threads: int, batch_sizes: list[int], captum_batches: list[int], repeat: int,
                budget_s: float, compile_torch: bool, floor: bool = True) -> list[dict]:
    import torch
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    from bench_speed import _interleaved_times
    from gradmap.export._torchvision import input_size_of, load_torchvision
    from gradmap.runtime.methods import MethodSpec, attribute, baseline_image

    torch.set_num_threads(threads)
    module, _ = load_torchvision(name, "none")
    for p in module.parameters():
        p.requires_grad_(False)
    size = input_size_of(name)
    image, mean, std = picture(size)
    from bench_speed import export_default

    with tempfile.TemporaryDirectory() as tmp:
        # the default export with the same seeded random weights as ``module`` (load_torchvision's seed 0),
        # lowered at load as the runtime does
        model = export_default(name, Path(tmp), threads)
    run_floor = None
    if floor:
        import onnx_ir as ir

        from floor import build_floor_model, floor_runner

        run_floor = floor_runner(ir.serde.serialize_model(build_floor_model(module, size, block=model.lowering.block))
                                 .SerializeToString(), threads)
        floor_image = np.random.default_rng(1).standard_normal((max(batch_sizes), 3, *size), dtype=np.float32)
    x = torch.from_numpy(image)
    with torch.no_grad():
        top = int(module(x).argmax(1))
    targets = np.array([top])
    sigma = float(NOISE * (image.max() - image.min()))
    baseline = baseline_image(image, "black", mean, std)
    rows = []
    for method in ("smoothgrad", "integrated-gradients"):
        row = {"model": name, "method": method, "threads": threads, "input_size": list(size),
               "block": model.lowering.block, "lowering": model.lowering.state,
               "load_average_start": _report._load_1min()}
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
        if run_floor is not None:
            recorder = _BatchRecorder(model)
            attribute(recorder, spec, image, targets, batch_size=int(g_best))
            row["floor_batches"] = sent = list(recorder.batches)
            target_feed = np.full(max(sent), -1, dtype=np.int64)

            def floor_fn():
                for b in sent:
                    run_floor({"image": floor_image[:b], "target": target_feed[:b]})

            variants["floor_ms"] = floor_fn
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
        row["load_average_end"] = _report._load_1min()
        row["times_ms"] = {k: [round(t, 2) for t in v] for k, v in times.items()}
        row["speedup_vs_captum"] = row["captum_ms"] / row["gradmap_ms"]
        if "torch_compile_ms" in row:
            row["speedup_vs_torch_compile"] = row["torch_compile_ms"] / row["gradmap_ms"]
        print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
        rows.append(row)
    return rows


def verdict(r: dict) -> tuple[str, str | None]:
    """("yes" | "floor" | "no", for a miss what stops it): gradmap at most Captum's time ÷ TARGET; a
    miss is the floor's when 1.10 times the floor graph's time on the same batches is over that too."""
    from bench_speed import FLOOR_MARGIN, floor_stops

    needed = r["captum_ms"] / TARGET
    if r["gradmap_ms"] <= needed:
        return "yes", None
    head = f"needs ≤ {needed:.0f} ms (Captum {r['captum_ms']:.0f} ms ÷ {TARGET:g}), gradmap {r['gradmap_ms']:.0f} ms"
    if "floor_ms" not in r:
        return "no", f"{head}; no floor measured"
    floor_text = (f"the floor graph on the same {len(r['floor_batches'])} batch(es) takes {r['floor_ms']:.0f} ms in "
                  f"the same rounds")
    part = floor_stops(r["floor_ms"], needed)
    if part:
        return "floor", f"{head}; {floor_text}: {part}"
    rest = r["gradmap_ms"] - r["floor_ms"]
    return "no", (f"{head}; {floor_text}, so a graph within {FLOOR_MARGIN:.2f}× its floor would meet it: gradmap "
                  f"spends {rest:.0f} ms above the floor's gradients (its graph over the floor's, and numpy's share "
                  f"of the method){per_gradient(r)}")


def per_gradient(r: dict) -> str:
    """Each side's time per gradient it evaluates, at each batch size tried (one call each, before the
    rounds): whether a side gains from larger batches. gradmap evaluates the picture's and the
    baseline's gradient besides the samples (SmoothGrad: the picture's), Captum the samples only."""
    if not r.get("gradmap_batch_ms") or not r.get("captum_batch_ms"):
        return ""
    samples = SAMPLES if r["method"] == "smoothgrad" else STEPS
    ours = samples + (1 if r["method"] == "smoothgrad" else 2)

    def times(candidates: dict, count: int) -> str:
        return ", ".join(f"{ms / count:.0f} at batch {b}" for b, ms in sorted(candidates.items(), key=lambda kv: int(kv[0])))

    return (f". Per gradient, from one call per batch size before the rounds, in ms (gradmap evaluates {ours} per "
            f"picture, Captum {samples}): gradmap "
            f"{times(r['gradmap_batch_ms'], ours)}; Captum {times(r['captum_batch_ms'], samples)}")


def render(rows: list[dict], meta: dict) -> str:
    has_floor = any("floor_ms" in r for r in rows)
    compiled_any = any("torch_compile_ms" in r for r in rows)
    blocks = sorted({r["block"] for r in rows if r.get("block") is not None})
    loaded = (f"the default export (portable) as the runtime loads it, lowered for this CPU's "
              f"{'/'.join(map(str, blocks))}-channel block" if blocks else "the exported model")
    lines = [
        _report.machine_line(meta),
        "",
        f"`{meta.get('command') or 'python bench/bench_methods.py'}`: one photograph (chelsea) per call, top-1 "
        f"class, medians in ms of interleaved rounds, {meta['threads']} thread{'s' if meta['threads'] != 1 else ''}, random weights"
        f"{'; ' + meta['note'] if meta.get('note') else ''}. SmoothGrad: {SAMPLES} samples, noise {NOISE} of the "
        f"value range; integrated gradients: {STEPS} Gauss-Legendre steps from a black baseline. gradmap: "
        f"`gradmap.runtime.methods.attribute` on {loaded} (what `gradmap run --method` calls); "
        "Captum: `NoiseTunnel(Saliency)` and `IntegratedGradients`; each with its fastest batch size of the "
        "candidates (in brackets"
        + (f"; Captum's: {', '.join(map(str, meta['captum_batches']))}" if meta.get("captum_batches") else "") + ")"
        + ("; floor: bench/floor.py's floor graph run on the batches gradmap's call sends, in the same rounds"
           if has_floor else "")
        + ("; torch.compile: the same sums on `torch.compile(module)` in steady state (all samples in one batch; "
           "its first call, the compilation, in brackets)" if compiled_any else "")
        + f". Target: gradmap at least {TARGET:g}× faster than Captum at its best batch size; \"floor\" where "
        "1.10 × the floor's time on the same batches is not that fast either.",
        "",
    ]
    header = ["model", "method", "gradmap", "Captum"]
    if has_floor:
        header += ["floor", "gradmap ÷ floor"]
    if compiled_any:
        header += ["torch.compile (first call)", "vs torch.compile"]
    header += ["speed-up vs Captum", f"≥ {TARGET:g}× Captum"]
    body, misses = [], []
    for r in rows:
        met, why = verdict(r)
        cells = [r["model"], r["method"], f"{r['gradmap_ms']:.0f} (batch {r['gradmap_batch']})",
                 f"{r['captum_ms']:.0f} (batch {r['captum_batch']})"]
        if has_floor:
            cells += [f"{r['floor_ms']:.0f}" if "floor_ms" in r else "–",
                      f"{r['gradmap_ms'] / r['floor_ms']:.2f}" if "floor_ms" in r else "–"]
        if compiled_any:
            cells += [f"{r['torch_compile_ms']:.0f} ({r['torch_compile_first_s']:.0f} s)" if "torch_compile_ms" in r
                      else "–",
                      f"{r['speedup_vs_torch_compile']:.2f}×" if "speedup_vs_torch_compile" in r else "–"]
        cells += [f"{r['speedup_vs_captum']:.2f}×", _report.target_cell(met)]
        body.append(cells)
        if why:
            misses.append(f"- {r['model']}, {r['method']} ({met}): {why}.")
    lines += _report.table(header, body)
    lines += _report.misses_lines(misses)
    differences = [r["ig_difference"] for r in rows if "ig_difference" in r]
    if differences:
        lines += ["", f"Integrated gradients: gradmap's differ from Captum's by {min(differences):.1g} to "
                      f"{max(differences):.1g} of Captum's largest value (max |difference| ÷ max |Captum|)."]
    return "\n".join(lines)


def readme_sections(data: dict) -> dict[str, str]:
    """README's line on SmoothGrad and integrated gradients, from the same results."""
    rows, meta = data["rows"], data["meta"]
    verdicts = [verdict(r)[0] for r in rows]
    speedups = [r["speedup_vs_captum"] for r in rows]
    missed = [f"{r['model']} {r['method']}" for r, v in zip(rows, verdicts) if v == "no"]
    # the load during the rows themselves (an --update run's own start and end cover its rows only)
    loads = [r[k] for r in rows for k in ("load_average_start", "load_average_end") if r.get(k) is not None]
    start, end = (min(loads), max(loads)) if loads else _report.load_average(meta)
    counts = (f"{verdicts.count('yes')} of {len(rows)} rows meet the {TARGET:g}x target, "
              f"{verdicts.count('floor')} are stopped by the floor")
    counts += f", {len(missed)} miss it ({', '.join(missed)})" if missed else ""
    line = (f"- SmoothGrad ({SAMPLES} samples) and integrated gradients ({STEPS} steps) of one picture were "
            f"{min(speedups):.2f} to {max(speedups):.2f} times as fast as Captum at its best internal batch size; "
            f"{counts} (`bench/bench_methods.py` on {_report.cpu_text(meta)}, "
            f"{meta.get('date') or 'date ' + _report.NOT_RECORDED}, 1-minute load average {_report._or_not(start)} to "
            f"{_report._or_not(end)} during its rows; `bench/results/methods.json`, "
            "[methods table](docs/benchmarks.md#smoothgrad-and-integrated-gradients)).")
    return {"methods-summary": line}


def sections(data: dict) -> dict[str, str]:
    return {"methods-speed": render(data["rows"], data["meta"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16, 32],
                        help="gradmap's batch sizes to pick the fastest from")
    parser.add_argument("--captum-batches", nargs="+", type=int, default=[8, 16, 32],
                        help="Captum's internal batch sizes to pick the fastest from")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of rounds per model and method at most")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--no-floor", action="store_true", help="leave out the floor graph")
    _report.add_flags(parser, RESULTS, note=True, update=True)
    args = _report.parse_args(parser)

    def measure():
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "torch", "captum"), threads=args.threads,
                                 note=args.note, batch_sizes=args.batch_sizes, captum_batches=args.captum_batches)
        rows = []
        for name in args.models:
            rows += bench_model(name, args.threads, args.batch_sizes, args.captum_batches, args.repeat, args.budget,
                                not args.no_compile, floor=not args.no_floor)
            _report.write_results(args.out.parent / "partial" / args.out.name, meta, rows, final=False)
        rows, meta = _report.updated(args, meta, rows)
        data = _report.write_results(args.out, meta, rows)
        (args.out.parent / "partial" / args.out.name).unlink(missing_ok=True)
        return data

    _report.render_or_measure(args, PAGE, sections, measure, readme_sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
