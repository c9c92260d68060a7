"""The portable export lowered at load against the cpu target exported lowered: load time, memory
and speed on onnxruntime's CPU provider.

    python bench/bench_lowering.py [--models resnet50 mobilenet_v3_large] [--repeat 3] [--rounds 10]
    python bench/bench_lowering.py --tables-only     # the docs tables again from bench/results/lowering.json

For each model (random weights, 224x224), both files are exported from the same trace settings:
``gradmap export MODEL`` (portable, the default) and ``gradmap export MODEL --target cpu``.

Loads: each in a fresh process that imports gradmap's runtime, creates ``SaliencyModel`` (timed:
for the portable file this includes reading it, lowering it for this CPU's block and writing the
lowered model) and runs one picture; peak RSS is ``VmHWM``. A model's first, second and third
load on a machine differ (gradmap/runtime/_lowering.py, _session_cache.py): the portable file's
first load lowers it and writes the lowered model, the second reads that and saves onnxruntime's
optimized graph, the third reads both; the cpu file's first load only marks it, the second saves the
optimized graph, the third reads it. Each repeat starts from an empty cache; medians of
``--repeat``.

Speed: in one process, the cpu target, the portable file lowered at load and the portable file run
as written (``cpu_block="off"``), runs interleaved (A, B, C then C, B, A), medians of ``--rounds``
at batch 1 and 8. Writes bench/results/lowering.json and the section ``lowering`` of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report

RESULTS = _report.RESULTS / "lowering.json"
PAGE, SECTIONS = "benchmarks.md", ("lowering",)
LOADS = ("first", "second", "third")


def _peak_mb() -> float:
    """This process's peak RSS since it started (VmHWM: unlike ru_maxrss, not inherited from the
    parent across fork and exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def _child(model: str, cache: str, threads: int) -> None:
    import numpy as np

    from gradmap.runtime import SaliencyModel

    start = time.perf_counter()
    loaded = SaliencyModel(model, provider="cpu", threads=threads, cache_dir=cache)
    load_s = time.perf_counter() - start
    image = np.random.default_rng(0).standard_normal((1, 3, *loaded.input_size), dtype=np.float32)
    start = time.perf_counter()
    loaded.run(image)
    run_s = time.perf_counter() - start
    lowering = loaded.lowering
    print(json.dumps({"load_s": load_s, "first_run_s": run_s,
                      "peak_mb": _peak_mb(),
                      "lowering": None if lowering is None else lowering.state,
                      "lowering_s": None if lowering is None else lowering.seconds,
                      "block": None if lowering is None else lowering.block, "session_cache": loaded.cache_state}))


def _speed(files: dict[str, Path], threads: int, rounds: int, batch: int) -> dict[str, float]:
    import numpy as np

    from gradmap.runtime import SaliencyModel

    sessions = {
        "cpu target": SaliencyModel(files["cpu"], provider="cpu", threads=threads, cache_dir=False).session,
        "portable lowered at load": SaliencyModel(files["portable"], provider="cpu", threads=threads,
                                                  cache_dir=False).session,
        "portable as written": SaliencyModel(files["portable"], provider="cpu", threads=threads, cache_dir=False,
                                             cpu_block="off").session,
    }
    image = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    feeds = {"image": image, "target": np.full(batch, -1, dtype=np.int64)}
    names = ["logits", "gradient"]
    for session in sessions.values():
        session.run(names, feeds)
    times: dict[str, list[float]] = {label: [] for label in sessions}
    order = list(sessions.items())
    for r in range(rounds):
        for label, session in (order if r % 2 == 0 else order[::-1]):
            time.sleep(0.1)  # onnxruntime's pool threads spin a while after a run
            start = time.perf_counter()
            session.run(names, feeds)
            times[label].append((time.perf_counter() - start) * 1000)
    return {label: statistics.median(t) for label, t in times.items()}


def measure(args) -> dict:
    import onnx_ir  # noqa: F401 - the lowering needs it; fail before exporting

    from gradmap.runtime._lowering import cpu_block

    block, reason = cpu_block()
    meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "torch", "onnx-ir"), threads=args.threads,
                             repeat=args.repeat, rounds=args.rounds, batches=args.batches, block=block,
                             block_reason=reason)
    work = Path(tempfile.mkdtemp(prefix="gradmap-lowering-"))
    rows = []
    for name in args.models:
        files = {"portable": work / f"{name}.onnx", "cpu": work / f"{name}_cpu.onnx"}
        for target, path in files.items():
            subprocess.run([sys.executable, "-m", "gradmap.cli", "export", name, "--weights", "none", "--no-verify",
                            "--target", target, "-o", str(path)], check=True, capture_output=True)
        runs: dict[tuple[str, str], list[dict]] = {}
        for repeat in range(args.repeat):
            for target, path in files.items():
                cache = work / f"cache-{name}-{target}-{repeat}"
                for load in LOADS:
                    out = subprocess.run([sys.executable, __file__, "--child", str(path), str(cache), str(args.threads)],
                                         check=True, capture_output=True, text=True,
                                         env={k: v for k, v in os.environ.items() if k != "GRADMAP_CPU_BLOCK"}).stdout
                    result = json.loads(out.strip().splitlines()[-1])
                    runs.setdefault((target, load), []).append(result)
                    print(name, target, load, result, flush=True)
        for (target, load), results in runs.items():
            row = {"model": name, "kind": "load", "file": target, "load": load,
                   "states": sorted({f"{r['lowering'] or '–'}/{r['session_cache']}" for r in results})}
            for key in ("load_s", "first_run_s", "peak_mb"):
                row[key] = statistics.median(r[key] for r in results)
            if target == "portable":
                row["lowering_s"] = statistics.median(r["lowering_s"] for r in results)
            rows.append(row)
        for batch in args.batches:
            medians = _speed(files, args.threads, args.rounds, batch)
            print(name, batch, medians, flush=True)
            rows.append({"model": name, "kind": "speed", "batch": batch, "ms": medians})
        for path in files.values():
            path.unlink()
    return _report.write_results(args.out, meta, rows)


def render(data: dict) -> str:
    meta = data["meta"]
    lines = [_report.machine_line(meta), "",
             f"`python bench/bench_lowering.py` ({meta['date']}; random weights, 224x224, {meta['threads']} threads; "
             f"this CPU's block: {meta['block']} ({meta['block_reason']})). Loads: `SaliencyModel` in a fresh process "
             f"each, from an empty cache, medians of {meta['repeat']} repeat(s); the portable file's load includes "
             "reading, lowering and writing the lowered model (the lowering column, with importing onnx-ir and "
             "gradmap's graph code on a first load); the states are the lowering's and the session cache's.", ""]
    load_rows = []
    for r in (r for r in data["rows"] if r["kind"] == "load"):
        lowering = f"{r['lowering_s']:.2f} s" if r.get("lowering_s") is not None else "–"
        load_rows.append([r["model"], "portable (default)" if r["file"] == "portable" else "`--target cpu`", r["load"],
                          f"{r['load_s']:.2f} s", lowering, f"{r['first_run_s']:.2f} s", f"{r['peak_mb']:.0f} MB",
                          ", ".join(state.replace("None/", "–/") for state in r["states"])])
    lines += _report.table(["model", "file", "load", "creating the model", "of it lowering", "first run", "peak RSS",
                            "lowering / session cache"], load_rows)
    lines += ["", f"Speed, one process, runs interleaved, medians of {meta['rounds']} rounds (ms per batch; ratio to "
                  "the cpu target):", ""]
    speed_rows = []
    for r in (r for r in data["rows"] if r["kind"] == "speed"):
        ms = r["ms"]
        base = ms["cpu target"]
        speed_rows.append([r["model"], r["batch"], f"{base:.1f}",
                           f"{ms['portable lowered at load']:.1f} ({ms['portable lowered at load'] / base:.2f}x)",
                           f"{ms['portable as written']:.1f} ({ms['portable as written'] / base:.2f}x)"])
    lines += _report.table(["model", "batch", "`--target cpu`", "portable lowered at load",
                            "portable as written (`GRADMAP_CPU_BLOCK=off`)"], speed_rows)
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"lowering": render(data)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_large"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    _report.add_flags(parser, RESULTS)
    args = _report.parse_args(parser)
    print(render(_report.render_or_measure(args, PAGE, sections, lambda: measure(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
