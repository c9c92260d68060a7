"""A folder of photographs through ``gradmap run``'s job, with and without overlapped writing.

    python bench/bench_folder.py [--model resnet50] [--pictures 48] [--rounds 5] [--threads 2] [--format heatmap]

``explain_and_write`` (what ``gradmap run`` calls) writes a batch's outputs (maps back on the
picture, rendering, PNG encoding) on a second thread while onnxruntime runs the next batch
(``overlap=True``, the default) or in turn (``overlap=False``). Both run in one process, one
session, interleaved round by round (the order swapped every other round), on scikit-image's four
photographs repeated; wall time per folder, medians. Writes bench/results/folder.json, which
docs/benchmarks.md cites.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report

ROOT = _report.ROOT
RESULTS = _report.RESULTS / "folder.json"
PAGE = "benchmarks.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", help="a torchvision name (exported with random weights) "
                                                           "or a gradmap .onnx file")
    parser.add_argument("--pictures", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--format", default="heatmap")
    _report.add_flags(parser, RESULTS, tables=False)
    args = parser.parse_args()
    import skimage.data
    from PIL import Image

    from gradmap.runtime import JobSettings, OutputLayout, SaliencyModel, explain_and_write, parse_target

    meta = _report.start_run(PAGE, model=args.model, pictures=args.pictures, batch_size=args.batch_size,
                             format=args.format, threads=args.threads, rounds=args.rounds)
    work = Path(tempfile.mkdtemp(prefix="gradmap-folder-"))
    try:
        photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket()]
        inputs = []
        for i in range(args.pictures):
            path = work / "in" / f"photo{i:03d}.jpg"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(photos[i % len(photos)]).save(path)
            inputs.append(str(path))
        model_path = Path(args.model)
        if model_path.suffix != ".onnx":
            model_path = work / f"{args.model}.onnx"
            subprocess.run([sys.executable, "-m", "gradmap.cli", "export", args.model, "--weights", "none", "-o",
                            str(model_path)], check=True, capture_output=True, cwd=ROOT)
        model = SaliencyModel(model_path, provider="cpu", threads=args.threads)
        settings = JobSettings(target=parse_target("top1", model.labels), formats=tuple(args.format.split(",")),
                               batch_size=args.batch_size)

        def folder(overlap: bool, out: Path) -> float:
            start = time.perf_counter()
            for done in explain_and_write(model, inputs, OutputLayout(out, inputs), settings, overlap=overlap):
                assert done.ok, done.record
            return time.perf_counter() - start

        folder(True, work / "warm")  # the session's slow first runs
        shutil.rmtree(work / "warm")
        times: dict[str, list[float]] = {"in turn": [], "overlapped": []}
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for overlap in order:
                out = work / f"out_{overlap}"
                times["overlapped" if overlap else "in turn"].append(folder(overlap, out))
                shutil.rmtree(out)
        medians = {k: statistics.median(v) for k, v in times.items()}
        ratio = [o / s for o, s in zip(times["overlapped"], times["in turn"])]
        rows = [{"mode": mode, "median_s": medians[mode], "times_s": times[mode]} for mode in times]
        _report.write_results(args.out, meta, rows, overlapped_over_in_turn=sorted(ratio))
        if not args.no_docs:
            _report.publish(PAGE, {})
        print(f"{args.model}, {args.pictures} pictures, batch {args.batch_size}, --format {args.format}, "
              f"{args.threads} threads, medians of {args.rounds} rounds:")
        for name, value in medians.items():
            print(f"  {name:10s} {value:7.2f} s  {args.pictures / value:5.2f} pictures/s")
        print(f"  overlapped / in turn per round: {statistics.median(ratio):.3f} "
              f"(range {min(ratio):.3f}-{max(ratio):.3f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
