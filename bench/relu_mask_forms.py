"""Exact ReLU backward forms on onnxruntime's CPU provider, side by side: the time of one graph
(Conv + ReLU, a stand-in gradient from a second Conv, the masked product, then a 1x1 Conv and an
Add that keep it in onnxruntime's blocked layout) with each form of dX = dY [Y > 0].

    python bench/relu_mask_forms.py [--threads 2] [--batch 8] [--channels 64] [--size 112]

    none        dX = dY (no mask: the time of the graph's other work)
    floor       dY * Y (bench/floor.py's stand-in: one product, wrong values)
    conv_mask   dY * HardSigmoid(Conv(Y, 2^127), 2^127, 0) (gradmap's cpu lowering, relu_mask)
    where       Where(Y > 0, dY, 0) (no blocked kernel: layout reorders around it)
    sign        dY * Sign(Y)

Medians of interleaved rounds (the order reversed every other round), 0.1 s apart. The exact forms
are checked to give the same masked product before timing. Writes bench/results/relu_mask_forms.json,
which docs/benchmarks.md cites.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import _report

FORMS = ("none", "floor", "conv_mask", "where", "sign")
_HUGE = 2.0 ** 127


def build(form: str, channels: int, size: int, batch: int, output: str = "O") -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)  # the same weights for every form

    def init(name, values):
        return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)

    c = channels
    inits = [init("W1", rng.standard_normal((c, c, 3, 3)) * 0.05), init("W2", rng.standard_normal((c, c, 3, 3)) * 0.05),
             init("W3", rng.standard_normal((c, c, 1, 1)) * 0.1), init("Wm", np.full((c, 1, 1, 1), _HUGE)),
             init("zero", np.zeros(()))]
    node = helper.make_node
    nodes = [node("Conv", ["X", "W1"], ["P"], pads=[1, 1, 1, 1]), node("Relu", ["P"], ["Y"]),
             node("Conv", ["X", "W2"], ["G"], pads=[1, 1, 1, 1])]
    nodes += {
        "none": [node("Identity", ["G"], ["D"])],
        "floor": [node("Mul", ["G", "Y"], ["D"])],
        "conv_mask": [node("Conv", ["Y", "Wm"], ["Ys"], group=c),
                      node("HardSigmoid", ["Ys"], ["M"], alpha=_HUGE, beta=0.0), node("Mul", ["G", "M"], ["D"])],
        "where": [node("Greater", ["Y", "zero"], ["B"]), node("Where", ["B", "G", "zero"], ["D"])],
        "sign": [node("Sign", ["Y"], ["S"]), node("Mul", ["G", "S"], ["D"])],
    }[form]
    nodes += [node("Conv", ["D", "W3"], ["Z"]), node("Add", ["Z", "Y"], ["O"])]
    shape = [batch, c, size, size]
    graph = helper.make_graph(nodes, form, [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
                              [i for i in inits if form == "conv_mask" or i.name != "Wm"])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=12)
    _report.add_flags(parser, _report.RESULTS / "relu_mask_forms.json", tables=False)
    args = parser.parse_args()
    import onnxruntime as ort

    from bench_speed import cpu_session

    meta = _report.start_run("benchmarks.md", versions=("onnxruntime",),
                             shape=[args.batch, args.channels, args.size, args.size], threads=args.threads,
                             rounds=args.rounds)

    def session(model: bytes) -> ort.InferenceSession:
        return cpu_session(model, args.threads)

    x = np.random.default_rng(1).standard_normal((args.batch, args.channels, args.size, args.size), dtype=np.float32)
    masked = {form: session(build(form, args.channels, args.size, args.batch, "D")).run(None, {"X": x})[0]
              for form in ("conv_mask", "where", "sign")}
    for form, values in masked.items():
        np.testing.assert_array_equal(values, masked["where"], err_msg=f"{form} differs from Where(Y > 0, dY, 0)")
    sessions = {form: session(build(form, args.channels, args.size, args.batch)) for form in FORMS}
    for s in sessions.values():
        s.run(None, {"X": x})
    times: dict[str, list[float]] = {form: [] for form in FORMS}
    for r in range(args.rounds):
        for form in FORMS if r % 2 == 0 else FORMS[::-1]:
            time.sleep(0.1)
            start = time.perf_counter()
            sessions[form].run(None, {"X": x})
            times[form].append((time.perf_counter() - start) * 1000)
    base = statistics.median(times["none"])
    print(f"[{args.batch}, {args.channels}, {args.size}, {args.size}], {args.threads} threads, medians of {args.rounds} rounds")
    for form in FORMS:
        median = statistics.median(times[form])
        print(f"  {form:10s} {median:8.2f} ms  ({median - base:+.2f} ms over none)")
    _report.write_results(args.out, meta, [{"form": form, "median_ms": statistics.median(times[form]),
                                            "times_ms": times[form]} for form in FORMS])
    if not args.no_docs:
        _report.publish("benchmarks.md", {})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
