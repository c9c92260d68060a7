"""What creating onnxruntime's session of a gradient model costs, and what changes it.

    python bench/load_memory.py [--model resnet50] [--repeat 3] [--threads 2]
    python bench/load_memory.py --tables-only     # the docs table again from bench/results/load_memory.json

A model's first run spends most of its time and its memory peak creating the session: onnxruntime
parses the file, folds the adjoint kernels out of the forward weights and rewrites the graph into
its blocked CPU layout. Each variant below runs in a fresh process that imports gradmap's runtime,
creates the session (timed), runs one random picture, and reports its RSS after loading and its peak
RSS (``ru_maxrss``); medians of ``--repeat`` processes:

    defaults                   gradmap's session options (``gradmap.runtime.model.session_options``)
    no prepacking              + ``session.disable_prepacking``
    initializers off the arena + ``session.use_device_allocator_for_initializers``
    no arena                   + ``enable_cpu_mem_arena = False``
    freed memory returned      glibc returning every freed block over 128 kB at once
                               (``MALLOC_MMAP_THRESHOLD_=131072`` in the process's environment)
    weights in a data file     the same model exported with ``--external-data`` (MODEL.onnx.data
                               beside it, which onnxruntime maps into memory), defaults otherwise
    session cache entry read   ``SaliencyModel`` reading the entry its earlier sessions saved
                               (gradmap/runtime/_session_cache.py)

Random weights (``gradmap export MODEL --weights none``). Writes bench/results/load_memory.json and
the table of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _report

RESULTS = _report.RESULTS / "load_memory.json"
PAGE, SECTIONS = "benchmarks.md", ("load-memory",)
VARIANTS = {
    "defaults": ({}, {}),
    "no prepacking": ({"session.disable_prepacking": "1"}, {}),
    "initializers off the arena": ({"session.use_device_allocator_for_initializers": "1"}, {}),
    "no arena": ({"arena": "0"}, {}),
    "freed memory returned": ({}, {"MALLOC_MMAP_THRESHOLD_": "131072"}),
    "weights in a data file (--external-data)": ({"split": "1"}, {}),
    "session cache entry read": ({"cache": "1"}, {}),
}


def _child(variant: str, model: str, threads: int, cache: str) -> None:
    import resource
    import time

    import numpy as np
    import onnxruntime as ort

    from gradmap.runtime import SaliencyModel
    from gradmap.runtime.model import session_options

    def rss_mb() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

    imported = rss_mb()
    config, _ = VARIANTS[variant]
    start = time.perf_counter()
    if config.get("cache"):
        loaded = SaliencyModel(model, provider="cpu", threads=threads, cache_dir=cache)
        if loaded.cache_state != "read":
            raise SystemExit(f"the cache entry was not read ({loaded.cache_state})")
        session = loaded.session
    else:
        options = session_options(threads)
        if config.get("split"):
            model = str(Path(model).parent / "split" / Path(model).name)
        for key, value in config.items():
            if key == "split":
                continue
            if key == "arena":
                options.enable_cpu_mem_arena = value == "1"
            else:
                options.add_session_config_entry(key, value)
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    after_load = rss_mb()
    image = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    start = time.perf_counter()
    session.run(["logits", "gradient"], {"image": image, "target": np.asarray([-1], dtype=np.int64)})
    run_s = time.perf_counter() - start
    print(json.dumps({"imports_mb": imported, "load_s": load_s, "loaded_mb": after_load, "first_run_s": run_s,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def render(data: dict) -> str:
    meta = data["meta"]
    rows = {r["session"]: r for r in data["rows"]}
    base = rows["defaults"]
    lines = [_report.machine_line(meta), "",
             f"`python bench/load_memory.py` ({meta['date']}, {meta['model']}, random weights, {meta['threads']} threads, "
             f"onnxruntime {meta['versions']['onnxruntime']}; medians of {meta['repeat']} fresh processes, each importing gradmap's "
             "runtime, creating the session, then running one picture): what creating the session costs, and what "
             "changes it.", "",
             "| session | creating it | RSS after it | first run | peak RSS | peak ÷ defaults |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['load_s']:.2f} s | {r['loaded_mb']:.0f} MB | {r['first_run_s']:.2f} s | "
                     f"{r['peak_mb']:.0f} MB | {r['peak_mb'] / base['peak_mb']:.2f} |")
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"load-memory": render(data)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter of the children (a venv of the slim install, say)")
    _report.add_flags(parser, RESULTS)
    args = _report.parse_args(parser)
    print(render(_report.render_or_measure(args, PAGE, sections, lambda: measure(args))))
    return 0


def measure(args) -> dict:
    meta = _report.start_run(PAGE, SECTIONS, model=args.model, threads=args.threads, repeat=args.repeat)
    work = Path(tempfile.mkdtemp(prefix="gradmap-load-"))
    model = work / f"{args.model}.onnx"
    subprocess.run([sys.executable, "-m", "gradmap.cli", "export", args.model, "--weights", "none", "-o", str(model)],
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "gradmap.cli", "export", args.model, "--weights", "none", "--external-data",
                    "--no-verify", "-o", str(work / "split" / model.name)], check=True, capture_output=True)
    cache = work / "cache"
    for _ in range(2):  # the model's first session marks it, the second saves the entry the variant reads
        subprocess.run([args.python, "-c", "import sys; from gradmap.runtime import SaliencyModel; "
                        "SaliencyModel(sys.argv[1], provider='cpu', cache_dir=sys.argv[2])", str(model), str(cache)],
                       check=True)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeat):
        for name, (_, env) in VARIANTS.items():  # in turn, so that load drifts hit every variant alike
            out = subprocess.run([args.python, __file__, "--child", name, str(model), str(args.threads), str(cache)],
                                 check=True, capture_output=True, text=True, env={**os.environ, **env,
                                                                                  "GRADMAP_CACHE_DIR": "off"}).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    rows = [{"session": name, **{key: statistics.median(r[key] for r in rs) for key in rs[0]}}
            for name, rs in runs.items()]
    return _report.write_results(args.out, meta, rows, runs=runs)


if __name__ == "__main__":
    sys.exit(main())
