"""Peak memory and wall time of saliency maps: ``gradmap run`` against the PyTorch recipe.

    python bench/bench_memory.py [--model resnet50] [--repeat 3] [--folder 100] [--long 1000]
    python bench/bench_memory.py --tables-only     # the docs tables again from bench/results/memory.json

Three measurements, each side a fresh process:

1. Two workloads: one map of a photograph (the cold start a user waits for: process start to map
   written), and a folder of ``--folder`` photographs (scikit-image's four, repeated) at batch 8,
   gradmap's default batch size. Timed by /usr/bin/time -v, with peak resident set size. gradmap
   runs the default export (``gradmap export MODEL``: the portable graph, which the runtime lowers
   for this CPU when it loads it; exported once beforehand, not timed), and for the one map also
   the same model exported ``--target cpu`` (lowered at export); the recipe
   (bench/pytorch_recipe.py) builds the torchvision model in-process and batches the folder the
   same way.
2. Working set per batch (1 and 8): the peak RSS of a process that loads one model and runs it
   three times on a random batch, and its RSS after loading (imports, weights, session): the plain
   forward export on onnxruntime, gradmap's gradient model through its runtime, and PyTorch eager
   autograd of the same saliency.
   gradmap's caches (gradmap/runtime/_lowering.py, _session_cache.py) are measured in their three
   states, each run with its own cache folder: a model's first run on a machine (it lowers the
   portable file and saves the lowered model; the session cache only marks it; the figures the
   targets are checked against), its second run (which reads the lowered model and saves
   onnxruntime's optimized graph) and later runs (which read both); the folder workload first and
   later runs.
   The working sets and the long run below run with the cache off. A first run is also measured
   on the same model exported with ``--external-data`` (weights in a file beside the model, which
   onnxruntime maps into memory).
3. No growth: ``gradmap run`` over ``--long`` pictures (the four photographs, repeated as
   hard links), its RSS sampled from /proc every 0.25 s.

Writes bench/results/memory.json and the tables in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report

ROOT = _report.ROOT
RESULTS = _report.RESULTS / "memory.json"
PAGE, SECTIONS = "benchmarks.md", ("memory",)
SECOND_RUN = "gradmap run, second run (reads the lowered model, saves the session cache entry)"
LATER_RUNS = "gradmap run, later runs (both cache entries read)"
SPLIT = "gradmap run, model exported with --external-data"
CPU_TARGET = "gradmap run, model exported with --target cpu"


def timed(cmd: list[str], cache: Path | str | None = None, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``cmd`` under /usr/bin/time -v; ``cache``: its
    GRADMAP_CACHE_DIR (gradmap's session cache; None: as this process has it); ``env``: more
    variables for it."""
    env = {**os.environ, **(env or {}), **({} if cache is None else {"GRADMAP_CACHE_DIR": str(cache)})}
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    hours = int(wall.group(1) or 0)
    seconds = hours * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    return seconds, int(rss.group(1)) / 1024


def _child(kind: str, model: str, batch: int, threads: int) -> None:
    """Run in a fresh process: load, RSS, three runs of a random batch, peak RSS (printed as JSON)."""
    import resource

    import numpy as np

    def rss_mb() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

    rng = np.random.default_rng(0)
    if kind == "torch":
        import torch
        import torchvision

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        module = torchvision.models.get_model(model, weights=None).eval()
        for p in module.parameters():
            p.requires_grad_(False)
        image = torch.from_numpy(rng.standard_normal((batch, 3, 224, 224), dtype=np.float32))

        def run():
            x = image.clone().requires_grad_(True)
            module(x).max(1).values.sum().backward()
            return x.grad
    else:
        from gradmap.runtime.model import SaliencyModel

        if kind == "gradmap":
            saliency = SaliencyModel(model, provider="cpu", threads=threads)
            size = saliency.input_size
            image = rng.standard_normal((batch, 3, *size), dtype=np.float32)

            def run():
                return saliency.run(image)
        else:
            from bench_speed import cpu_session

            session = cpu_session(model, threads)
            image = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)

            def run():
                return session.run(None, {session.get_inputs()[0].name: image})
    loaded = rss_mb()
    for _ in range(3):
        run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"loaded_mb": loaded, "peak_mb": peak}))


def working_sets(model_name: str, gradient: Path, forward: Path, threads: int) -> list[dict]:
    rows = []
    for batch in (1, 8):
        row = {"batch": batch}
        for kind, model in (("forward", str(forward)), ("gradmap", str(gradient)), ("torch", model_name)):
            out = subprocess.run([sys.executable, __file__, "--child", kind, model, str(batch), str(threads)],
                                 check=True, capture_output=True, text=True,
                                 env={**os.environ, "GRADMAP_CACHE_DIR": "off"}).stdout
            row[kind] = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def long_run(gradmap: list[str], model: Path, folder: Path, out: Path, threads: str) -> dict:
    """RSS of one ``gradmap run`` over ``folder``, sampled every 0.25 s."""
    proc = subprocess.Popen([*gradmap, "run", str(model), str(folder), "--out", str(out), "--format", "heatmap",
                             "--batch-size", "8", "--threads", threads],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "GRADMAP_CACHE_DIR": "off"})
    samples = []
    start = time.perf_counter()
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
            samples.append((time.perf_counter() - start, rss))
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
        time.sleep(0.25)
    if proc.returncode != 0:
        raise RuntimeError(f"gradmap run failed:\n{proc.stderr.read()[-2000:]}")
    wall = time.perf_counter() - start
    written = len(list(out.rglob("*.png")))

    def at(fraction: float) -> float:  # the largest RSS seen up to this fraction of the run
        return max(r for t, r in samples if t <= fraction * wall)

    return {"pictures": len(list(folder.iterdir())), "written": written, "wall_s": wall,
            "rss_mb": {f"{int(f * 100)}%": at(f) for f in (0.1, 0.25, 0.5, 0.75, 1.0)},
            "samples": [(round(t, 2), round(r, 1)) for t, r in samples]}


def render(data: dict) -> str:
    """The memory tables of a results file: whole runs against the recipe, working sets, the long run."""
    meta = data["meta"]
    workloads: dict[str, dict] = {}
    for row in data["rows"]:
        workloads.setdefault(row["workload"], {})[row["side"]] = row
    lines = [_report.machine_line(meta), "",
             f"{meta['model']}, random weights, {meta['threads']} thread{'s' if meta['threads'] != 1 else ''}, fresh process each, medians of "
             f"{meta['repeat']} (`{meta.get('command') or 'python bench/bench_memory.py'}`"
             f"{'; ' + meta['note'] if meta.get('note') else ''}); wall "
             "time from process start to the last map written. \"gradmap run\": a model's first run on a machine"
             + (f" with the default export, which the runtime lowers for this CPU ({meta['block']}-channel block) "
                "and caches; its second run reads the lowered model and saves onnxruntime's optimized graph in "
                "gradmap's session cache, which later runs read too" if meta.get("block") else
                "; its second run saves onnxruntime's optimized graph in gradmap's session cache, which later "
                "runs read")
             + "; \"exported with --external-data\": a first run of the same model with its weights in a file "
             "beside it" + ("; \"exported with --target cpu\": a first run of a file lowered at export"
                            if any(r["side"] == CPU_TARGET for r in data["rows"]) else "") + ":", "",
             "| work | | wall time | peak RSS | gradmap ÷ recipe: time (target ≤ 0.33) | memory (target ≤ 0.50) |",
             "|---|---|---|---|---|---|"]
    for workload, sides in workloads.items():
        r = sides["PyTorch recipe"]
        for name, s in sides.items():
            ratios = (f"{s['wall_s'] / r['wall_s']:.2f} | {s['peak_rss_mb'] / r['peak_rss_mb']:.2f}"
                      if name != "PyTorch recipe" else " | ")
            lines.append(f"| {workload} | {name} | {s['wall_s']:.2f} s | {s['peak_rss_mb']:.0f} MB | {ratios} |")
    per = data.get("per_further_picture_s")
    if per:
        lines += ["", f"Each further picture of the folder (the folder's wall time minus the one map's, over "
                  f"{meta['folder'] - 1}): gradmap run {1000 * per['gradmap run']:.0f} ms, PyTorch recipe "
                  f"{1000 * per['PyTorch recipe']:.0f} ms ({per['gradmap run'] / per['PyTorch recipe']:.2f})."]
    lines += ["", "Working set: peak RSS of a process that loads the model and runs one random batch three "
              "times, and in brackets its RSS after loading (imports, weights, session"
              + ("; gradmap's default export lowered at load, no cache" if meta.get("block") else "") + "):", "",
              "| batch | onnxruntime forward (plain export) | gradmap (logits + gradient) | PyTorch eager autograd |",
              "|---|---|---|---|"]
    for row in data["working_sets"]:
        cells = [f"{row[k]['peak_mb']:.0f} MB ({row[k]['loaded_mb']:.0f} MB)" for k in ("forward", "gradmap", "torch")]
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + " |")
    long = data.get("long_run")
    if long:
        r = long["rss_mb"]
        lines += ["", f"No growth: `gradmap run` over {long['pictures']} pictures ({long['written']} maps written, "
                  f"{long['wall_s']:.0f} s, {long['pictures'] / long['wall_s']:.1f} pictures/s), the largest RSS "
                  "seen up to each point of the run:", "",
                  "| 10 % | 25 % | 50 % | 75 % | 100 % |", "|---|---|---|---|---|",
                  "| " + " | ".join(f"{r[k]:.0f} MB" for k in ("10%", "25%", "50%", "75%", "100%")) + " |"]
    return "\n".join(lines)


def readme_sections(data: dict) -> dict[str, str]:
    """README's line on a first run's time and memory, from the same results."""
    meta = data["meta"]
    one = {r["side"]: r for r in data["rows"] if r["workload"] == data["rows"][0]["workload"]}
    recipe, first = one["PyTorch recipe"], one["gradmap run"]
    later = one.get(LATER_RUNS)
    start, end = _report.load_average(meta)
    line = (f"- A first `gradmap run` of one {meta['model']} map"
            + (" (the default export, lowered at load and cached)" if meta.get("block") else "")
            + f" took {first['wall_s'] / recipe['wall_s']:.2f} of the PyTorch recipe's time and "
            f"{first['peak_rss_mb'] / recipe['peak_rss_mb']:.2f} of its memory"
            + (f"; a later run, reading gradmap's caches, {later['wall_s'] / recipe['wall_s']:.2f} and "
               f"{later['peak_rss_mb'] / recipe['peak_rss_mb']:.2f}" if later else "")
            + f" (`bench/bench_memory.py` on {_report.cpu_text(meta)}, {meta.get('date') or 'date ' + _report.NOT_RECORDED}"
            f", 1-minute load average {_report._or_not(start)} to {_report._or_not(end)}; `bench/results/memory.json`).")
    return {"memory-summary": line}


def sections(data: dict) -> dict[str, str]:
    return {"memory": render(data)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gradmap", default=None, help="gradmap executable of the slim runtime venv (default: "
                                                        "this interpreter's)")
    parser.add_argument("--folder", type=int, default=100, help="photographs in the folder workload (0: skip it)")
    parser.add_argument("--long", type=int, default=1000, help="pictures in the no-growth run (0: skip it)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads of gradmap's runs and of the recipe's torch (OMP_NUM_THREADS; default: the cores)")
    _report.add_flags(parser, RESULTS, note=True)
    args = _report.parse_args(parser)
    print(render(_report.render_or_measure(args, PAGE, sections, lambda: measure(args), readme_sections)))
    return 0


def measure(args: argparse.Namespace) -> dict:
    """Every workload, measured and written to the results file; returns what was written."""
    threads = str(args.threads)
    from gradmap.runtime._lowering import cpu_block

    block, block_reason = cpu_block()
    meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "torch", "onnx-ir"), model=args.model,
                             repeat=args.repeat, threads=int(threads), folder=args.folder, note=args.note,
                             block=block, block_reason=block_reason, gradmap=args.gradmap or "this interpreter")
    work = Path(tempfile.mkdtemp(prefix="gradmap-bench-"))
    import skimage.data
    from PIL import Image

    picture = work / "chelsea.jpg"
    Image.fromarray(skimage.data.chelsea()).save(picture)
    folder = work / "photos"
    folder.mkdir()
    photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(), skimage.data.rocket()]
    for i in range(args.folder):
        Image.fromarray(photos[i % len(photos)]).save(folder / f"photo{i:03d}.jpg")
    model = work / f"{args.model}.onnx"
    subprocess.run([sys.executable, "-m", "gradmap.cli", "export", args.model, "--weights", "none", "-o", str(model)],
                   check=True, capture_output=True)
    split = work / "split" / f"{args.model}.onnx"  # the same weights, written to split/MODEL.onnx.data
    subprocess.run([sys.executable, "-m", "gradmap.cli", "export", args.model, "--weights", "none", "-o", str(split),
                    "--external-data", "--no-verify"], check=True, capture_output=True)
    cpu_file = work / "cpu" / f"{args.model}.onnx"  # the same weights, lowered at export
    subprocess.run([sys.executable, "-m", "gradmap.cli", "export", args.model, "--weights", "none", "-o", str(cpu_file),
                    "--target", "cpu", "--no-verify"], check=True, capture_output=True)
    forward = work / f"{args.model}.forward.onnx"
    subprocess.run([sys.executable, "-c", "import sys, onnx_ir as ir; sys.path.insert(0, sys.argv[3]); "
                    "from gradmap.export._torchvision import input_size_of, load_torchvision; "
                    "from gradmap.export._trace import trace_to_onnx; "
                    "m, _ = load_torchvision(sys.argv[1], 'none'); "
                    "ir.save(trace_to_onnx(m, input_size_of(sys.argv[1])), sys.argv[2])",
                    args.model, str(forward), str(ROOT)], check=True, capture_output=True)
    gradmap = [args.gradmap] if args.gradmap else [sys.executable, "-m", "gradmap.cli"]
    recipe = [sys.executable, str(ROOT / "bench" / "pytorch_recipe.py"), args.model]
    workloads = {"one map of a 451x300 photograph": (picture, "recipe.png")}
    if args.folder:
        workloads[f"{args.folder} photographs, batch 8"] = (folder, "recipe")
    summary: dict = {}
    def gradmap_run(source: Path, out: Path, cache: Path | str, exported: Path = model) -> tuple[float, float]:
        return timed([*gradmap, "run", str(exported), str(source), "--out", str(out), "--format", "heatmap",
                      "--batch-size", "8", "--threads", threads], cache)

    warm = work / "cache-warm"  # read by the "later runs" rows: the model's first two runs made its entry
    for i in range(2):
        gradmap_run(picture, work / f"warm{i}", warm)
    for workload, (source, recipe_out) in workloads.items():
        names = ["gradmap run", SPLIT, CPU_TARGET, SECOND_RUN, LATER_RUNS, "PyTorch recipe"] if not summary else \
            ["gradmap run", SPLIT, LATER_RUNS, "PyTorch recipe"]  # the second run's saving is the one map's
        rows = {name: [] for name in names}
        for i in range(args.repeat):
            out = work / f"out{len(summary)}_{i}"
            rows["gradmap run"].append(gradmap_run(source, out, work / f"cache-first-{len(summary)}-{i}"))
            rows["PyTorch recipe"].append(timed([*recipe, str(source), str(out / recipe_out), "8"],
                                                env={"OMP_NUM_THREADS": threads}))
            rows[SPLIT].append(gradmap_run(source, work / f"out_split{len(summary)}_{i}",
                                           work / f"cache-split-{len(summary)}-{i}", split))
            if CPU_TARGET in rows:
                rows[CPU_TARGET].append(gradmap_run(source, work / f"out_cpu{len(summary)}_{i}",
                                                    work / f"cache-cpu-{len(summary)}-{i}", cpu_file))
            if SECOND_RUN in rows:
                marked = work / f"cache-second-{i}"
                gradmap_run(picture, work / f"mark{i}", marked)
                rows[SECOND_RUN].append(gradmap_run(source, work / f"out_second{i}", marked))
            rows[LATER_RUNS].append(gradmap_run(source, work / f"out_later{len(summary)}_{i}", warm))
        summary[workload] = {name: {"wall_s": statistics.median(r[0] for r in runs),
                                    "peak_rss_mb": statistics.median(r[1] for r in runs), "runs": runs}
                             for name, runs in rows.items()}
    sets = working_sets(args.model, model, forward, int(threads))
    long = None
    if args.long:
        many = work / "many"
        many.mkdir()
        for i in range(args.long):
            os.link(folder / f"photo{i % min(4, args.folder):03d}.jpg", many / f"picture{i:04d}.jpg")
        long = long_run(gradmap, model, many, work / "out_long", threads)
        print(json.dumps({k: v for k, v in long.items() if k != "samples"}), flush=True)
    per = None
    if len(summary) == 2:  # the folder's time beyond the first map: what each further picture costs
        (one, folder_sides) = summary.values()
        per = {name: (folder_sides[name]["wall_s"] - one[name]["wall_s"]) / (args.folder - 1)
               for name in ("gradmap run", "PyTorch recipe")}
    rows = [{"workload": workload, "side": side, **s} for workload, sides in summary.items() for side, s in sides.items()]
    return _report.write_results(args.out, meta, rows, per_further_picture_s=per, working_sets=sets, long_run=long)


if __name__ == "__main__":
    sys.exit(main())
