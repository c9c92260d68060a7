"""How close gradmap's gradient graphs are to the cheapest graph of the same shape: the floor.

    python bench/floor.py [--models mobilenet_v3_large ...] [--batches 1 8] [--threads 2]
    python bench/floor.py --tables-only     # the docs table again from bench/results/floor.json

The floor graph is gradmap's own gradient graph with every elementwise nonlinearity's rule and every
max-pool routing replaced by the cheapest op that still touches the same tensors:

    Relu, HardSigmoid, Sigmoid, Tanh, Clip, LeakyRelu, Gelu, and the Mul patterns the pass treats as
    one activation (SiLU, the split HardSwish, torch's exact GELU):   dX = dY * (a forward tensor)
    MaxPool:                                                          dX = nearest Resize of dY
    a Relu whose output only a MaxPool reads:                         dX = Resize(dP * P), the
        product at the pool's resolution (an exact graph masks there: gradmap's relu_pool_mask)

Everything else stays as gradmap emits it: the forward part, the adjoint convolutions and matrix
products, squeeze-and-excitation products, concatenations, normalizations, softmax. The floor's
gradient is wrong (no masks, no routing), but any exact graph of standard ONNX ops must do at least
this much on onnxruntime's CPU provider: one activation-sized product per nonlinearity (it has no
fused "gradient times mask" kernel; a Conv fuses activations and additions only) and one write of
each pool input's gradient. What gradmap spends above the floor is what a better formulation of the
nonlinearities and pools could still win; the floor's own ratio to the forward is what no
formulation of them can go below.

Per model and batch, in one process, interleaved rounds (bench_speed's timing: medians, each call
0.1 s after the previous one): (a) onnxruntime forward of the plain export with default options,
(b) gradmap's default export as its runtime loads it (lowered at load for this CPU's block) and
(c) the floor graph, lowered for the same block, both with gradmap's runtime session options.
Random weights and inputs. Writes bench/results/floor.json and the table in docs/benchmarks.md.
``bench/bench_speed.py`` times the floor in its own rounds too and writes this file from them.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

import _report

DEFAULT_MODELS = ["resnet50", "vgg19", "mobilenet_v3_large", "efficientnet_b0", "densenet121", "vit_b_16",
                  "convnext_tiny"]
RESULTS = _report.RESULTS / "floor.json"
PAGE, SECTIONS = "benchmarks.md", ("floor",)
_ACTIVATIONS = ("Relu", "HardSigmoid", "Sigmoid", "Tanh", "Clip", "LeakyRelu", "Gelu", "HardSwish")


#: The cpu lowering passes that would rewrite the floor's stand-ins into exact forms again.
FLOOR_SKIPPED_LOWERING = ("relu_pool_mask", "relu_mask", "hard_swish_steps", "silu_affine", "max_pool_indices")


def floor_seed(ctx, logits, target, score):
    """gradmap's seed times 2^100.

    The stand-ins multiply the gradient by forward activations at every nonlinearity, which shrinks
    it layer after layer: with random weights, mobilenet_v3_large's floor gradient was subnormal
    (below 1.2e-38) from the middle of the network on, and x86 computes subnormals many times slower
    (floor 58 ms against gradmap's 15 ms, batch 1). A seed of 2^100 instead of 1 keeps the floor's
    values in the normal range; one product on the [N, classes] seed."""
    from gradmap.graph.gradient import score_seed

    onehot, target_index = score_seed(ctx, logits, target, score)
    return ctx.op("Mul", onehot, ctx.const(np.float32(2.0 ** 100))), target_index


def _pooled_only(value) -> bool:
    """A ReLU output whose one reader is a max pool: an exact graph can mask the pool's gradient at
    the pool's resolution (gradmap's relu_pool_mask), so the floor's product goes there too."""
    uses = value.uses()
    return len(uses) == 1 and uses[0].node.op_type == "MaxPool" and value.producer() is not None \
        and value.producer().op_type == "Relu"


def _activation(ctx, node, dy):
    if _pooled_only(node.outputs[0]):
        return [dy[0]] + [None] * (len(node.inputs) - 1)
    return [ctx.op("Mul", dy[0], node.outputs[0])] + [None] * (len(node.inputs) - 1)


def _composite(ctx, node, dy, parts):
    x = parts["x"]
    return [ctx.op("Mul", dy[0], x) if v is x else None for v in node.inputs]


def _max_pool(ctx, node, dy):
    x, y = node.inputs[0], node.outputs[0]
    xdims, ydims = ctx.dims(x), ctx.dims(y)
    scales = [1.0, 1.0] + [xd / yd for xd, yd in zip(xdims[2:], ydims[2:])]
    g = ctx.op("Mul", dy[0], y) if _pooled_only(x) else dy[0]  # the pooled ReLU's product
    up = ctx.op("Resize", g, None, ctx.const(np.asarray(scales, dtype=np.float32)), mode="nearest",
                coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    return [up]


def floor_rules():
    """gradmap's rule table with the floor's stand-ins for activations and max pools."""
    from gradmap.graph.gradient import RuleTable

    return RuleTable.default().replaced({**{op: _activation for op in _ACTIVATIONS}, "MaxPool": _max_pool},
                                        composite_rule=_composite)


def build_floor_model(module, size, block: int | None = None):
    """The floor graph of ``module``: traced as gradmap exports it, its gradient appended with the
    floor's rules and seed, lowered for the cpu target (for the channel block ``block``, the one
    gradmap's runtime lowers the default export for on this CPU; None: the lowering's default)
    without the passes of FLOOR_SKIPPED_LOWERING."""
    from gradmap.export._trace import trace_to_onnx
    from gradmap.graph import add_gradient

    model = trace_to_onnx(module, size)
    add_gradient(model, target="cpu", rules=floor_rules(), seed=floor_seed, skip_lowering=FLOOR_SKIPPED_LOWERING,
                 channel_multiple=block)
    return model


def floor_runner(model: bytes, threads: int):
    """A function of the feeds that runs the floor graph with subnormal floats flushed to zero.

    The floor's stand-ins multiply the gradient by forward activations at every nonlinearity, so its
    values shrink layer after layer (the scaled seed above is not enough for efficientnet_b0, whose
    SiLU gates shrink it further), and x86 computes subnormals many times slower. The floor measures
    the ops, not subnormal arithmetic: its session's pool threads flush them
    (``session.set_denormal_as_zero``) and so does the calling thread while it runs
    (``torch.set_flush_denormal``; the other variants run with the default)."""
    import torch

    from bench_speed import cpu_session
    from gradmap.runtime.model import session_options

    options = session_options(threads)
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    session = cpu_session(model, threads, options)

    def run(feeds):
        torch.set_flush_denormal(True)
        try:
            return session.run(None, feeds)
        finally:
            torch.set_flush_denormal(False)

    return run


def bench_model(name: str, batches: list[int], threads: int, repeat: int, budget_s: float) -> list[dict]:
    """bench/bench_speed.py's rounds with the forward, gradmap's default export as its runtime loads it
    and the floor graph only."""
    import bench_speed

    rows = bench_speed.bench_model(name, batches, threads, repeat, budget_s, floor=True, eager=False)
    return bench_speed.floor_rows(rows)


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        _report.machine_line(meta),
        "",
        f"Measured by `{meta.get('command') or 'python bench/floor.py'}` ({meta['date']}, {rows[0]['threads']} thread{'s' if rows[0]['threads'] != 1 else ''}, "
        f"medians of interleaved rounds{'; ' + meta['note'] if meta.get('note') else ''}). gradmap: the default export as its runtime loads it (lowered at load). The floor graph is gradmap's graph with every activation's rule cut "
        "to one product and every max pool's routing to one nearest Resize (a ReLU that only a max pool "
        "reads: its product at the pool's resolution, before the Resize; wrong gradients, the least "
        "any exact graph of standard ops must do there; see the script's docstring; its subnormal floats "
        "flushed to zero). Per round: gradmap ÷ floor of the two runs side by side in each round, quartiles "
        "over the rounds. Target: gradmap ≤ 1.10 × floor.",
        "",
        "| model | batch | forward ms | gradmap ms | floor ms | gradmap ÷ forward | floor ÷ forward | gradmap ÷ floor "
        "(per round) | ≤ 1.10 × floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        times = r.get("times_ms", {})
        quartiles = ""
        if times.get("floor_ms"):
            q = np.percentile(np.asarray(times["gradmap_ms"]) / np.asarray(times["floor_ms"]), [25, 75])
            quartiles = f" ({q[0]:.2f}–{q[1]:.2f})"
        met = "yes" if r["gradmap_over_floor"] <= 1.10 else "**no**"
        lines.append(f"| {r['model']} | {r['batch']} | {r['ort_forward_ms']:.1f} | {r['gradmap_ms']:.1f} | "
                     f"{r['floor_ms']:.1f} | {r['gradmap_over_forward']:.2f} | {r['floor_over_forward']:.2f} | "
                     f"{r['gradmap_over_floor']:.2f}{quartiles} | {met} |")
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"floor": render(data["rows"], data["meta"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30, help="rounds per model and batch")
    parser.add_argument("--budget", type=float, default=40.0, help="seconds per model and batch, after 3 rounds")
    _report.add_flags(parser, RESULTS, note=True, update=True)
    args = _report.parse_args(parser)

    def measure():
        meta = _report.start_run(PAGE, SECTIONS, note=args.note)
        rows = []
        for name in args.models:
            rows += bench_model(name, args.batches, args.threads, args.repeat, args.budget)
        rows, meta = _report.updated(args, meta, rows)
        return _report.write_results(args.out, meta, rows)

    _report.render_or_measure(args, PAGE, sections, measure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
