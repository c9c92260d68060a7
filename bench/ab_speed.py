"""Interleaved A/B timing of ONNX models in one process, for comparing gradient-graph formulations
on a noisy, shared machine.

    python bench/ab_speed.py --batch 1 --rounds 40 --threads 1 fwd=plain.onnx old=a.onnx new=b.onnx
    python bench/ab_speed.py --batch 8 --rounds 8 --block 5 fwd=plain.onnx old=a.onnx new=b.onnx

The first model is the reference (usually the plain forward export). Runs alternate A, B, C, ...
and C, B, A on successive rounds so that load drifts hit every model alike; the report gives
medians and 10th percentiles, each also as a ratio to the reference. A model with a ``target``
input gets target -1 (top-1) for every sample.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="label=path.onnx; the first is the reference")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--pause", type=float, default=0.1,
                        help="seconds between runs: onnxruntime's pool threads spin a while after a run and "
                             "slow the next session's run (mobilenet_v3_large's 4.6 ms forward measured 2x slower without one)")
    parser.add_argument("--block", type=int, default=1,
                        help="runs of one session in a row per round (after the pause); the round's time is "
                             "their median, as a user's repeated runs of one session would see")
    args = parser.parse_args()
    import onnxruntime as ort

    sessions = []
    for spec in args.models:
        label, _, path = spec.partition("=")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        sessions.append((label, ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])))
    rng = np.random.default_rng(args.batch)
    image = rng.standard_normal((args.batch, 3, args.size, args.size), dtype=np.float32)
    target = np.full(args.batch, -1, dtype=np.int64)

    def feeds(session):
        names = {i.name for i in session.get_inputs()}
        return {"image": image, **({"target": target} if "target" in names else {})}

    times = {label: [] for label, _ in sessions}
    for _, session in sessions:
        for _ in range(2):
            session.run(None, feeds(session))
    for r in range(args.rounds):
        for label, session in (sessions if r % 2 == 0 else sessions[::-1]):
            f = feeds(session)
            time.sleep(args.pause)
            block = []
            for _ in range(args.block):
                start = time.perf_counter()
                session.run(None, f)
                block.append((time.perf_counter() - start) * 1000)
            times[label].append(statistics.median(block))
    ref = sessions[0][0]
    ref_median, ref_p10 = statistics.median(times[ref]), float(np.percentile(times[ref], 10))
    for label, _ in sessions:
        median, p10 = statistics.median(times[label]), float(np.percentile(times[label], 10))
        print(f"batch {args.batch} {label:16s} median {median:9.2f} ms ({median / ref_median:5.2f}x)   "
              f"p10 {p10:9.2f} ms ({p10 / ref_p10:5.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
