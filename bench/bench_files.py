"""Model file sizes and session creation: gradmap's gradient models against the plain forward export.

    python bench/bench_files.py [--models resnet50 ...] [--rounds 5]
    python bench/bench_files.py --tables-only     # the docs table again from bench/results/files.json

Per model (random weights, the model's input size), serialized in memory:
  forward     the plain forward export (torch.onnx, as gradmap traces it), no gradient;
  cpu         gradmap's default export: the adjoint convolutions' kernels are computed in the graph
              from the forward's own weights (Reshape, Transpose, a Slice with steps -1, the BN
              fold's Mul), which onnxruntime folds into constants when it creates the session;
  stored      the same cpu graph with those kernels folded into the file instead, every adjoint
              kernel stored beside its forward weight (gradmap's files before this; they stored
              the stride-1 and depthwise kernels only, so they were somewhat smaller than this);
  portable    ``--target portable`` (ConvTranspose reads the forward weight itself).
Session creation: onnxruntime CPU sessions from the bytes, gradmap's runtime session options,
medians over ``--rounds`` rounds taken in turn. Writes bench/results/files.json and the table of
docs/exporting.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import _report
from bench_speed import DEFAULT_MODELS  # the speed table's models

RESULTS = _report.RESULTS / "files.json"
PAGE, SECTIONS = "exporting.md", ("files",)
_FOLDABLE = {"Transpose", "Reshape", "Slice", "Mul"}


def stored_kernels(proto):
    """``proto`` with every backward node whose inputs are all constants evaluated into an
    initializer (the adjoint kernels), as a file that stores them."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    graph = proto.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kept = []
    for node in graph.node:
        tagged = any(p.key == "gradmap.vjp" for p in node.metadata_props)
        inputs = [constants.get(name) for name in node.input]
        if not tagged or node.op_type not in _FOLDABLE or any(v is None for v in inputs):
            kept.append(node)
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Transpose":
            value = np.transpose(inputs[0], attrs.get("perm"))
        elif node.op_type == "Reshape":
            value = inputs[0].reshape(inputs[1])
        elif node.op_type == "Mul":
            value = inputs[0] * inputs[1]
        else:
            data, starts, ends, axes, steps = inputs
            index = [slice(None)] * data.ndim
            for s, e, a, k in zip(starts, ends, axes, steps):
                index[int(a)] = slice(int(s), None if e <= np.iinfo(np.int64).min // 2 else int(e), int(k))
            value = data[tuple(index)]
        constants[node.output[0]] = value
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return proto


def measure(name: str, rounds: int) -> dict:
    import onnx
    import onnxruntime as ort

    from bench_speed import export_pair, export_portable
    from gradmap.runtime.model import session_options

    module, size, forward, cpu = export_pair(name)
    portable = export_portable(module, size)
    stored = stored_kernels(onnx.ModelProto.FromString(cpu)).SerializeToString()
    models = {"forward": forward, "cpu": cpu, "stored": stored, "portable": portable}
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for label, data in models.items():
            options = session_options(2)
            options.log_severity_level = 3
            start = time.perf_counter()
            ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            times[label].append(time.perf_counter() - start)
    row = {"model": name, **{f"{k}_mb": len(v) / 1e6 for k, v in models.items()},
           **{f"{k}_session_s": statistics.median(v) for k, v in times.items()}}
    print(json.dumps(row), flush=True)
    return row


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        _report.machine_line(meta),
        "",
        f"`python bench/bench_files.py` ({meta['date']}): file sizes in MB; session creation in "
        f"seconds (onnxruntime {meta['versions']['onnxruntime']}, CPU, gradmap's runtime options, medians of {meta['rounds']} "
        "rounds taken in turn). stored: the cpu graph with every adjoint kernel folded into the file, as "
        "gradmap stored them (most of them) before they were computed from the forward weights at load time.",
        "",
        "| model | forward | cpu | cpu ÷ forward | portable | portable ÷ forward | stored | "
        "session: forward | cpu | stored | portable |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['forward_mb']:.1f} | {r['cpu_mb']:.1f} | {r['cpu_mb'] / r['forward_mb']:.3f} | "
            f"{r['portable_mb']:.1f} | {r['portable_mb'] / r['forward_mb']:.3f} | {r['stored_mb']:.1f} | "
            f"{r['forward_session_s']:.2f} | {r['cpu_session_s']:.2f} | {r['stored_session_s']:.2f} | "
            f"{r['portable_session_s']:.2f} |")
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"files": render(data["rows"], data["meta"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--rounds", type=int, default=5)
    _report.add_flags(parser, RESULTS)
    args = _report.parse_args(parser)

    def run():
        meta = _report.start_run(PAGE, SECTIONS, rounds=args.rounds)
        return _report.write_results(args.out, meta, [measure(name, args.rounds) for name in args.models])

    _report.render_or_measure(args, PAGE, sections, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
