"""Where a gradmap model's time goes on onnxruntime's CPU provider: per-node kernel times from
onnxruntime's profiler, grouped by the forward op whose gradient rule emitted the node.

    python bench/profile_nodes.py model.onnx [--batch 1] [--runs 20] [--warmup 3] [--threads 2]

Backward nodes are named ``grad/<forward node>/<op>_<n>``; onnxruntime renames the convolutions it
moves to its blocked NCHWc layout to ``<output>_nchwc``, so those are matched by output name.
ReorderInput/ReorderOutput are the layout conversions onnxruntime inserts around ops that have no
NCHWc kernel. Shares are of the summed kernel time, which leaves out scheduling overhead. The first
``--warmup`` runs are profiled too but left out of the figures: a session's first runs are several
times slower (resnet50 at batch 8: 980 and 890 ms, then 460-520), and with them in, a few
nodes look several times slower than they are.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="runs left out of the figures")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--flush-denormals", action="store_true",
                        help="flush subnormal floats to zero, as bench/floor.py runs its floor graphs")
    args = parser.parse_args()
    if args.runs <= args.warmup:
        parser.error("--runs must exceed --warmup")
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), "gradmap_profile")
    if args.flush_denormals:
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
        import torch

        torch.set_flush_denormal(True)  # the calling thread too (onnxruntime runs one share of the work on it)
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    model = onnx.load(args.model, load_external_data=False)
    op_of = {n.name: n.op_type for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    image = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size), dtype=np.float32)
    feeds = {"image": image}
    if "target" in {i.name for i in session.get_inputs()}:
        feeds["target"] = np.full(args.batch, -1, dtype=np.int64)
    for _ in range(args.runs):
        session.run(None, feeds)
    path = session.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    shares: collections.Counter = collections.Counter()
    seen: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        seen[event["name"]] += 1
        if seen[event["name"]] <= args.warmup:
            continue
        name, op = event["name"][: -len("_kernel_time")], event["args"]["op_name"]
        origin = producer.get(name[: -len("_nchwc")] if name.endswith("_nchwc") else name)
        emitted_by = name if name.startswith("grad/") else (origin.name if origin is not None else "")
        if emitted_by.startswith("grad/"):
            rule = op_of.get(emitted_by.split("/")[1], emitted_by.split("/")[1])
            key = f"backward  {rule} rule: {op}"
        elif op in ("ReorderInput", "ReorderOutput"):
            key = f"layout    {op}"
        else:
            key = f"forward   {op}"
        shares[key] += event["dur"]
    timed = args.runs - args.warmup
    total = sum(shares.values())
    print(f"{args.model}: batch {args.batch}, {args.threads} threads, "
          f"{total / timed / 1000:.2f} ms kernel time per run ({timed} runs after {args.warmup} warm-up)")
    for key, dur in shares.most_common(args.top):
        print(f"  {key:50s} {dur / timed / 1000:8.2f} ms {100 * dur / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
