"""Run by run: wall time, page faults and peak RSS of one onnxruntime session's first runs, with
and without onnxruntime's memory pattern (gradmap's runtime turns it off, see
``gradmap.runtime.model.session_options``).

    python bench/first_runs.py model.onnx [--batch 8] [--runs 6] [--threads 2]

Each setting runs in a fresh process of its own, so that peak RSS is that session's alone.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import numpy as np


def runs(path: str, batch: int, count: int, threads: int, mem_pattern: bool) -> None:
    import onnxruntime as ort

    from gradmap.runtime.model import session_options

    options = session_options(threads)
    options.enable_mem_pattern = mem_pattern
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    size = session.get_inputs()[0].shape[2:]
    size = [s if isinstance(s, int) else 224 for s in size]
    feeds = {"image": np.random.default_rng(0).standard_normal((batch, 3, *size), dtype=np.float32)}
    if "target" in {i.name for i in session.get_inputs()}:
        feeds["target"] = np.full(batch, -1, dtype=np.int64)
    for i in range(count):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        session.run(None, feeds)
        ms = (time.perf_counter() - start) * 1000
        after = resource.getrusage(resource.RUSAGE_SELF)
        print(f"  run {i}: {ms:8.1f} ms  {after.ru_minflt - before.ru_minflt:7d} page faults  "
              f"peak RSS {after.ru_maxrss / 1024:6.0f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        runs(args.model, args.batch, args.runs, args.threads, args.worker == "on")
        return 0
    for setting in ("on", "off"):
        print(f"{args.model}, batch {args.batch}, {args.threads} threads, memory pattern {setting}:", flush=True)
        subprocess.run([sys.executable, __file__, args.model, "--batch", str(args.batch), "--runs", str(args.runs),
                        "--threads", str(args.threads), "--worker", setting], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
