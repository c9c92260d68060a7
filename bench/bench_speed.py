"""Side-by-side speed of saliency maps: gradmap's ONNX gradient graph against the alternatives.

    python bench/bench_speed.py [--models resnet50 vgg19 ...] [--batches 1 8] [--threads 2]
    python bench/bench_speed.py --readme-only     # README's table again from bench/results/speed.json

In one process, per model and batch, medians after warm-up of (run in turn, round after round, so
that a shared machine's load drifts hit all four alike, each call 0.1 s after the previous one):
  (a) onnxruntime forward only, of the plain export (no gradient), onnxruntime's default options;
  (b) gradmap's gradient graph on onnxruntime (logits + gradient), with the session options of
      gradmap's runtime (``gradmap.runtime.model.session_options``: no memory pattern), for the
      default ``cpu`` target and, as (b'), the ``portable`` target (the graph for other engines);
  (c) PyTorch eager autograd as in the ResNet-50 recipe (input requires grad, parameters frozen);
  (d) Captum's Saliency (abs=False) on the same module.
Random weights, random 224x224 inputs (the models' own input size), a fixed thread count for
onnxruntime and torch. Writes bench/results/speed.json and the table in README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
                pause_s: float = 0.1) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    module, size, forward, gradient = export_pair(name)

    from gradmap.runtime.model import session_options

    # the plain forward with onnxruntime's default options; gradmap's graph as gradmap's runtime loads it
    s_forward = cpu_session(forward, threads)
    s_gradient = cpu_session(gradient, threads, session_options(threads))
    s_portable = cpu_session(export_portable(module, size), threads, session_options(threads))
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
        row["times_ms"] = {name: [round(v, 3) for v in values] for name, values in times.items()}
        row["speedup_vs_torch"] = row["torch_eager_ms"] / row["gradmap_ms"]
        floor = row["ort_forward_ms"]
        row["target_ms"] = max(2.1 * floor, min(2.5 * floor, row["torch_eager_ms"] / 1.5))
        row["target_met"] = row["gradmap_ms"] <= row["target_ms"]
        print(json.dumps({k: v for k, v in row.items() if k != "times_ms"}), flush=True)
        rows.append(row)
    return rows


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        f"`python bench/bench_speed.py`: medians in ms, the variants interleaved round by round, "
        f"{meta['pause_s']:g} s apart, "
        f"{meta['threads']} threads, random weights, "
        f"{meta['machine']}; "
        + ("the plain forward with onnxruntime's default session options, gradmap with its runtime's (no memory "
           "pattern); " if meta.get("gradmap_session_options") == "runtime" else "") +
        "target: gradmap ≤ max(2.1 × ORT forward, min(2.5 × ORT forward, PyTorch eager ÷ 1.5)). "
        "Per round: gradmap ÷ forward of the two runs side by side in each round, quartiles over the rounds "
        "(how far one round's ratio strays on this machine). gradmap is the default `cpu` target; "
        "portable is `--target portable` (the graph for other engines) on the same onnxruntime CPU session "
        "options; previous: gradmap ÷ forward in the table this run replaced.",
        "",
        "| model | batch | ORT forward | gradmap | gradmap ÷ forward | per round (quartiles) | previous | portable | "
        "portable ÷ forward | PyTorch eager | Captum Saliency | speed-up vs PyTorch | target | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        captum = f"{r['captum_ms']:.0f}" if "captum_ms" in r else "–"
        q = r.get("gradmap_over_forward_quartiles")
        quartiles = f"{q[0]:.2f}–{q[2]:.2f}" if q else "–"
        previous = f"{r['previous_gradmap_over_forward']:.2f}" if r.get("previous_gradmap_over_forward") else "–"
        portable = (f"{r['portable_ms']:.1f} | {r['portable_over_forward']:.2f}" if "portable_ms" in r else "– | –")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['ort_forward_ms']:.1f} | {r['gradmap_ms']:.1f} | "
            f"{r['gradmap_over_forward']:.2f} | {quartiles} | {previous} | {portable} | {r['torch_eager_ms']:.1f} | "
            f"{captum} | {r['speedup_vs_torch']:.2f}× | "
            f"{r['target_ms']:.1f} | {'yes' if r['target_met'] else '**no**'} |")
    return "\n".join(lines)


def render_targets(rows: list[dict], meta: dict) -> str:
    """The cpu and portable targets side by side: ratios to the forward measured in the same rounds."""
    lines = [
        f"`python bench/bench_speed.py --out bench/results/speed_targets.json --targets-table` ({meta.get('note', '')}"
        f"{meta['threads']} threads, medians of interleaved rounds): gradmap ÷ ORT forward for the default `cpu` "
        "target and the `portable` target, with the quartiles of the cpu ratio over rounds, and the cpu ratio of "
        "the speed table above.",
        "",
        "| model | batch | rounds | cpu ÷ forward | per round (quartiles) | speed table above | portable ÷ forward |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = r["gradmap_over_forward_quartiles"]
        previous = f"{r['previous_gradmap_over_forward']:.2f}" if r.get("previous_gradmap_over_forward") else "–"
        lines.append(f"| {r['model']} | {r['batch']} | {r['rounds']} | {r['gradmap_over_forward']:.2f} | "
                     f"{q[0]:.2f}–{q[2]:.2f} | {previous} | {r['portable_over_forward']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15, help="rounds (each runs every variant once)")
    parser.add_argument("--budget", type=float, default=90.0, help="seconds of rounds per model and batch at most")
    parser.add_argument("--pause", type=float, default=0.1,
                        help="seconds between two timed calls (onnxruntime's pool threads spin after a run)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "speed.json"))
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--readme-only", action="store_true", help="rewrite README's table from --out's file")
    parser.add_argument("--targets-table", action="store_true",
                        help="with --readme-only: write --out's rows as README's cpu-vs-portable table instead")
    parser.add_argument("--note", default="", help="a note on the run for the targets table (e.g. the machine's load)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.readme_only:
        saved = json.loads(out.read_text())
        rows, meta = saved["rows"], saved["meta"]
    else:
        previous = {}
        if out.exists():
            for r in json.loads(out.read_text())["rows"]:
                previous[(r["model"], r["batch"])] = r["gradmap_over_forward"]
        rows = []
        for name in args.models:
            rows += bench_model(name, args.batches, args.threads, args.repeat, args.budget, args.pause)
        for r in rows:
            r["previous_gradmap_over_forward"] = previous.get((r["model"], r["batch"]))
        meta = {"threads": args.threads, "pause_s": args.pause, "gradmap_session_options": "runtime", "note": args.note,
                "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "python": platform.python_version()}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    if not args.no_readme:
        sys.path.insert(0, str(ROOT / "tools"))
        from update_readme import README, replace_section

        if args.targets_table:
            README.write_text(replace_section(README.read_text(), "speed-targets", render_targets(rows, meta)))
        else:
            README.write_text(replace_section(README.read_text(), "speed", render(rows, meta)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
