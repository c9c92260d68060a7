"""Side-by-side speed of saliency maps: gradmap's ONNX gradient graph against the alternatives.

    python bench/export_baseline.py --rev f082100 --out /tmp/gradmap-baseline   # optional, see --baseline
    python bench/bench_speed.py [--models resnet50 vgg19 ...] [--batches 1 8] [--threads 2]
                                [--baseline /tmp/gradmap-baseline] [--compile]
    python bench/bench_speed.py --tables-only     # the docs tables again from bench/results/speed.json

In one process, per model and batch, medians after warm-up of (run in turn, round after round, so
that a shared machine's load drifts hit all variants alike, each call 0.1 s after the previous one):
  (a) onnxruntime forward only, of the plain export (no gradient), onnxruntime's default options;
  (b) gradmap's gradient graph on onnxruntime (logits + gradient), with the session options of
      gradmap's runtime (``gradmap.runtime.model.session_options``: no memory pattern), for the
      default ``cpu`` target and, as (b'), the ``portable`` target (the graph for other engines);
  (c) PyTorch eager autograd as in the ResNet-50 recipe (input requires grad, parameters frozen);
  (d) Captum's Saliency (abs=False) on the same module;
  with --compile, (e) the same autograd on ``torch.compile(module, dynamic=False)`` in steady state
      (its first call, which compiles, timed apart);
  with --baseline DIR, (f) the gradient models an earlier gradmap commit exported
      (bench/export_baseline.py: same weights), to show a change costs no speed.
Random weights, random 224x224 inputs (the models' own input size), a fixed thread count for
onnxruntime and torch. Writes bench/results/speed.json and the speed tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import _report

RESULTS = _report.RESULTS / "speed.json"
PAGE, SECTIONS = "benchmarks.md", ("speed", "speed-targets")

DEFAULT_MODELS = ["resnet50", "vgg19", "mobilenet_v3_large", "efficientnet_b0", "densenet121", "vit_b_16",
                  "convnext_tiny"]


def _interleaved_times(variants: dict, *, warmup: int, repeat: int, budget_s: float,
                       pause_s: float = 0.1) -> dict[str, list[float]]:
    """Times in ms per variant, one per round, the variants run in turn within each round (A B C D, then D C B A on the
    next round) so that load drifts on a shared machine hit all of them alike: the ratios between
    variants are what the table reports. Stops after ``repeat`` rounds, or after the budget once
    three rounds are in.

    Each call starts ``pause_s`` after the previous one ended, untimed: onnxruntime's idle pool
    threads spin for a while after a run, and a torch call started at once shares the cores with
    them (mobilenet_v3_large, batch 1, 2 threads: PyTorch eager 84 ms right after a gradmap run,
    43 ms after a 0.2 s pause; gradmap's own time the same)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeat and (rounds < 3 or time.perf_counter() - start < budget_s):
        for name in (names if rounds % 2 == 0 else names[::-1]):
            time.sleep(pause_s)
            t = time.perf_counter()
            variants[name]()
            times[name].append((time.perf_counter() - t) * 1000)
        rounds += 1
    return times


def export_pair(name: str):
    """A torchvision model with random weights, frozen; its input size; the serialized plain forward
    export and gradmap's gradient model."""
    import onnx_ir as ir

    from gradmap.export._api import build_gradient_model
    from gradmap.export._torchvision import input_size_of, load_torchvision
    from gradmap.export._trace import trace_to_onnx

    module, _ = load_torchvision(name, "none")
    for p in module.parameters():
        p.requires_grad_(False)
    size = input_size_of(name)
    forward = ir.serde.serialize_model(trace_to_onnx(module, size)).SerializeToString()
    gradient_model, _ = build_gradient_model(module, size)
    gradient = ir.serde.serialize_model(gradient_model).SerializeToString()
    return module, size, forward, gradient


def export_portable(module, size) -> bytes:
    """gradmap's gradient model of ``module`` for the portable target, serialized."""
    import onnx_ir as ir

    from gradmap.export._api import build_gradient_model

    model, _ = build_gradient_model(module, size, target="portable")
    return ir.serde.serialize_model(model).SerializeToString()


def cpu_session(model, threads: int, options=None):
    """An onnxruntime CPU session (``model``: bytes or a path) with ``threads`` intra-op threads and
    one inter-op thread; onnxruntime's default options unless ``options`` are given."""
    import onnxruntime as ort

    options = options or ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def bench_model(name: str, batches: list[int], threads: int, repeat: int, budget_s: float,
                pause_s: float = 0.1, baseline: Path | None = None, compile_torch: bool = False) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    module, size, forward, gradient = export_pair(name)

    from gradmap.runtime.model import session_options

    # the plain forward with onnxruntime's default options; gradmap's graph as gradmap's runtime loads it
    s_forward = cpu_session(forward, threads)
    s_gradient = cpu_session(gradient, threads, session_options(threads))
    s_portable = cpu_session(export_portable(module, size), threads, session_options(threads))
    # the same model exported by an earlier commit (bench/export_baseline.py)
    s_baseline = cpu_session(str(baseline / f"{name}.onnx"), threads, session_options(threads)) if baseline else None
    try:
        from captum.attr import Saliency
    except ImportError:  # captum is optional here
        Saliency = None
    rows = []
    for batch in batches:
        rng = np.random.default_rng(batch)
        image = rng.standard_normal((batch, 3, *size), dtype=np.float32)
        target = np.full(batch, -1, dtype=np.int64)
        row = {"model": name, "batch": batch, "threads": threads}

        def eager():
            x = torch.from_numpy(image).requires_grad_(True)
            out = module(x)
            score, _ = torch.max(out, 1)
            score.sum().backward()
            return x.grad

        variants = {
            "ort_forward_ms": lambda: s_forward.run(None, {"image": image}),
            "gradmap_ms": lambda: s_gradient.run(None, {"image": image, "target": target}),
            "portable_ms": lambda: s_portable.run(None, {"image": image, "target": target}),
            "torch_eager_ms": eager,
        }
        if compile_torch:
            # torch.compile (inductor, static shapes: one compilation per model and batch, as a user
            # who picks speed would run it); the first call compiles the forward and the backward
            import torch._dynamo

            torch._dynamo.reset()
            compiled = torch.compile(module, dynamic=False)

            def compiled_saliency():
                x = torch.from_numpy(image).requires_grad_(True)
                score, _ = torch.max(compiled(x), 1)
                score.sum().backward()
                return x.grad

            t = time.perf_counter()
            compiled_saliency()
            row["torch_compile_first_s"] = time.perf_counter() - t
            variants["torch_compile_ms"] = compiled_saliency
        if s_baseline is not None:
            variants["baseline_ms"] = lambda: s_baseline.run(None, {"image": image, "target": target})
        if Saliency is not None:
            saliency = Saliency(module)
            x = torch.from_numpy(image)
            with torch.no_grad():
                top = module(x).argmax(1)
            variants["captum_ms"] = lambda: saliency.attribute(x, target=top, abs=False)
        times = _interleaved_times(variants, warmup=2, repeat=repeat, budget_s=budget_s, pause_s=pause_s)
        row.update({name: statistics.median(values) for name, values in times.items()})
        row["gradmap_over_forward"] = row["gradmap_ms"] / row["ort_forward_ms"]
        row["portable_over_forward"] = row["portable_ms"] / row["ort_forward_ms"]
        # the same ratio round by round (the two ran side by side): its quartiles show the noise
        per_round = np.asarray(times["gradmap_ms"]) / np.asarray(times["ort_forward_ms"])
        row["gradmap_over_forward_quartiles"] = [float(q) for q in np.percentile(per_round, [25, 50, 75])]
        row["rounds"] = len(per_round)
        if "torch_compile_ms" in row:
            row["speedup_vs_torch_compile"] = row["torch_compile_ms"] / row["gradmap_ms"]
        if "baseline_ms" in times:
            row["baseline_over_forward"] = row["baseline_ms"] / row["ort_forward_ms"]
            per_round = np.asarray(times["gradmap_ms"]) / np.asarray(times["baseline_ms"])
            row["gradmap_over_baseline"] = row["gradmap_ms"] / row["baseline_ms"]
            row["gradmap_over_baseline_quartiles"] = [float(q) for q in np.percentile(per_round, [25, 50, 75])]
        row["times_ms"] = {name: [round(v, 3) for v in values] for name, values in times.items()}
        row["speedup_vs_torch"] = row["torch_eager_ms"] / row["gradmap_ms"]
        fwd = row["ort_forward_ms"]
        row["target_ms"] = max(2.1 * fwd, min(2.5 * fwd, row["torch_eager_ms"] / 1.5))
        row["target_met"] = row["gradmap_ms"] <= row["target_ms"]
        print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
        rows.append(row)
    return rows


def _quartiles(r: dict, key: str) -> str:
    q = r.get(key)
    return f"{q[0]:.2f}–{q[2]:.2f}" if q else "–"


def _ms(r: dict, key: str) -> str:
    return f"{r[key]:.1f}" if key in r else "–"


def floor_ratios(path: Path = _report.RESULTS / "floor.json") -> dict:
    """floor ÷ forward per (model, batch) from bench/floor.py's last run, if there is one."""
    if not path.exists():
        return {}
    return {(r["model"], r["batch"]): r["floor_over_forward"] for r in json.loads(path.read_text())["rows"]}


def render(rows: list[dict], meta: dict) -> str:
    floors = floor_ratios()
    lines = [
        _report.machine_line(meta),
        "",
        f"`{meta.get('command', 'python bench/bench_speed.py --baseline DIR --compile')}`: medians in ms of "
        "interleaved rounds (every "
        f"variant once per round, {meta['pause_s']:g} s apart), {meta['threads']} threads, random weights"
        f"{'; ' + meta['note'] if meta.get('note') else ''}. ORT forward: the plain export, "
        "onnxruntime's default session options; gradmap: the default `cpu` target with gradmap's runtime "
        "options; PyTorch eager autograd as in the ResNet-50 recipe; Captum's Saliency; torch.compile: the same "
        "autograd on `torch.compile(module, dynamic=False)` (inductor) in steady state, its first call "
        "(compilation) beside it in seconds. Target: gradmap at least 1.5× faster than the faster of PyTorch "
        "eager and Captum; \"floor\" where 1.10 × the floor graph of the floor table below (its floor ÷ "
        "forward, times this run's forward) is not that fast either.",
        "",
        "| model | batch | ORT forward | gradmap | gradmap ÷ forward | PyTorch eager | Captum Saliency | "
        "torch.compile (first call) | speed-up vs eager / Captum / compile | ≥ 1.5× eager and Captum |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        torch_best = min(r["torch_eager_ms"], r.get("captum_ms", r["torch_eager_ms"]))
        floor = floors.get((r["model"], r["batch"]))
        if r["gradmap_ms"] <= torch_best / 1.5:
            met = "yes"
        elif floor is not None and 1.10 * floor * r["ort_forward_ms"] > torch_best / 1.5:
            met = "floor"
        else:
            met = "**no**"
        compiled = (f"{r['torch_compile_ms']:.1f} ({r['torch_compile_first_s']:.0f} s)"
                    if "torch_compile_ms" in r else "–")
        speedups = " / ".join(f"{r[k] / r['gradmap_ms']:.2f}×" if k in r else "–"
                              for k in ("torch_eager_ms", "captum_ms", "torch_compile_ms"))
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['ort_forward_ms']:.1f} | {r['gradmap_ms']:.1f} | "
            f"{r['gradmap_over_forward']:.2f} | {r['torch_eager_ms']:.1f} | {_ms(r, 'captum_ms')} | "
            f"{compiled} | {speedups} | {met} |")
    return "\n".join(lines)


def render_targets(rows: list[dict], meta: dict) -> str:
    """The cpu target against the graph an earlier commit exported, and the portable target: ratios to
    the forward measured in the same rounds."""
    base = meta.get("baseline") or {}
    lines = [
        _report.machine_line(meta),
        "",
        f"From the same run: gradmap's graph as exported before the two-layer rewrite (commit "
        f"{base.get('commit', '?')[:7]}, `bench/export_baseline.py`, the same weights), the default `cpu` target "
        "and the `portable` target on onnxruntime's CPU provider with gradmap's session options, each over the "
        "ORT forward of the same rounds; cpu ÷ before per round: quartiles of the ratio of the two runs side by "
        "side in each round.",
        "",
        "| model | batch | rounds | before ÷ forward | cpu ÷ forward | cpu ÷ before (per round) | portable ÷ forward |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "baseline_ms" not in r:
            continue
        lines.append(f"| {r['model']} | {r['batch']} | {r['rounds']} | {r['baseline_over_forward']:.2f} | "
                     f"{r['gradmap_over_forward']:.2f} | {r['gradmap_over_baseline']:.2f} "
                     f"({_quartiles(r, 'gradmap_over_baseline_quartiles')}) | {r['portable_over_forward']:.2f} |")
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    """The docs tables of a results file: the speed table and, when the run timed a baseline, the targets table."""
    rows, meta = data["rows"], data["meta"]
    out = {"speed": render(rows, meta)}
    if any("baseline_ms" in r for r in rows):
        out["speed-targets"] = render_targets(rows, meta)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15, help="rounds (each runs every variant once)")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds of rounds per model and batch at most")
    parser.add_argument("--pause", type=float, default=0.1,
                        help="seconds between two timed calls (onnxruntime's pool threads spin after a run)")
    _report.add_flags(parser, RESULTS, note=True, update=True)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a folder of gradient models exported by an earlier commit (bench/export_baseline.py), "
                             "timed in the same rounds")
    parser.add_argument("--compile", action="store_true",
                        help="also time PyTorch autograd on torch.compile's module (steady state; compile time recorded)")
    args = _report.parse_args(parser)

    def measure():
        baseline = json.loads((args.baseline / "baseline.json").read_text()) if args.baseline else None
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "torch", "captum"), threads=args.threads,
                                 baseline=baseline, pause_s=args.pause, gradmap_session_options="runtime",
                                 note=args.note)
        previous = {}
        if args.out.exists():
            for r in _report.read_results(args.out)["rows"]:
                previous[(r["model"], r["batch"])] = r["gradmap_over_forward"]
        rows = []
        for name in args.models:
            rows += bench_model(name, args.batches, args.threads, args.repeat, args.budget, args.pause,
                                baseline=args.baseline, compile_torch=args.compile)
        for r in rows:
            r["previous_gradmap_over_forward"] = previous.get((r["model"], r["batch"]))
        rows, meta = _report.updated(args, meta, rows)
        return _report.write_results(args.out, meta, rows)

    _report.render_or_measure(args, PAGE, sections, measure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
