"""Pictures per second of ``gradmap run`` in one process and on Ray (1 and 2 workers), and Ray's
fixed start-up cost.

    python bench/bench_ray.py [--pictures 200] [--repeat 3]       # needs pip install '.[ray]'
    python bench/bench_ray.py --tables-only                       # the docs table from the JSON

Workload: the bundled demo model (models/demo/shapes.onnx, 64x64 input) on a folder of
``--pictures`` pictures made from the demo's ten (shifted and resized, so no two are alike), with
``gradmap run``'s default outputs (heatmap, overlay, four-panel figure) at batch 8. Every
configuration is a fresh ``gradmap run`` process timed from start to exit, so each Ray figure
includes starting a local Ray instance and its actors; the same command on one picture gives that
fixed cost (Ray on 1 picture minus one process on 1 picture), and ``rate`` is the pictures per
second after it: (N - 1) / (wall(N) - wall(1)). Medians of ``--repeat`` runs, interleaved.
Writes bench/results/ray.json and the section ``ray`` of docs/ray.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import _report

ROOT = _report.ROOT
MODEL = ROOT / "models" / "demo" / "shapes.onnx"
RESULTS = _report.RESULTS / "ray.json"
PAGE, SECTIONS = "ray.md", ("ray",)

# name, extra gradmap run arguments
CONFIGS = [
    ("one process, 1 thread", ["--threads", "1"]),
    ("one process, 2 threads", ["--threads", "2"]),
    ("Ray, 1 worker x 1 thread", ["--engine", "ray", "--workers", "1", "--threads", "1"]),
    ("Ray, 2 workers x 1 thread", ["--engine", "ray", "--workers", "2", "--threads", "1"]),
]


def make_pictures(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    demo = sorted((ROOT / "models" / "demo" / "images").glob("*.png"))
    for i in range(count):
        with Image.open(demo[i % len(demo)]) as image:
            pixels = np.roll(np.asarray(image.convert("RGB")), i // len(demo), axis=1)
        size = 64 + (i * 7) % 96
        Image.fromarray(pixels).resize((size, size)).save(folder / f"p{i:04d}.png")


def wall(inputs: Path, out: Path, extra: list[str]) -> float:
    command = [sys.executable, "-m", "gradmap.cli", "run", str(MODEL), str(inputs), "--out", str(out),
               "--batch-size", "8", "--provider", "cpu", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds


def measure(pictures: int, repeat: int) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="gradmap-bench-ray-"))
    many, one = work / "many", work / "one"
    make_pictures(many, pictures)
    make_pictures(one, 1)
    times: dict[str, dict[str, list[float]]] = {name: {"one": [], "many": []} for name, _ in CONFIGS}
    for r in range(repeat):
        for name, extra in CONFIGS:
            for kind, folder in (("one", one), ("many", many)):
                out = work / f"out-{r}-{kind}-{len(times[name][kind])}-{abs(hash(name))}"
                times[name][kind].append(wall(folder, out, extra))
                print(f"{name:<28} {kind:<4} {times[name][kind][-1]:6.2f} s", file=sys.stderr)
    rows = []
    base_one = statistics.median(times[CONFIGS[0][0]]["one"])
    for name, extra in CONFIGS:
        one_s, many_s = statistics.median(times[name]["one"]), statistics.median(times[name]["many"])
        rows.append({"config": name, "args": extra, "wall_1": one_s, "wall_n": many_s,
                     "pictures_per_s_total": pictures / many_s,
                     "pictures_per_s_after_startup": (pictures - 1) / (many_s - one_s) if many_s > one_s else None,
                     "fixed_cost_over_one_process": one_s - base_one,
                     "runs_1": times[name]["one"], "runs_n": times[name]["many"]})
    return rows


def render(results: dict) -> str:
    meta = results["meta"]
    n = meta["pictures"]
    start, end = _report.load_average(meta)
    lines = [
        _report.machine_line(meta),
        "",
        f"`python bench/bench_ray.py` on this {_report.cores(meta)}-core machine, Ray {meta['versions']['ray']} "
        f"started locally by `gradmap run --engine ray`; demo model, {n} pictures, default outputs (heatmap, "
        f"overlay, figure), batch 8; fresh process per run, medians of {meta['repeat']}; the machine was shared "
        f"(1-minute load average {start} at the start, "
        f"{end} at the end), so absolute figures are pessimistic:",
        "",
        f"| configuration | wall, 1 picture | wall, {n} pictures | {n}-picture runs, min-max | pictures/s overall "
        f"| pictures/s after start-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        after = row["pictures_per_s_after_startup"]
        lines.append(f"| {row['config']} | {row['wall_1']:.2f} s | {row['wall_n']:.2f} s | "
                     f"{min(row['runs_n']):.1f}-{max(row['runs_n']):.1f} s | {row['pictures_per_s_total']:.1f} | {'n/a' if after is None else f'{after:.1f}'} |")
    ray_rows = [r for r in results["rows"] if r["config"].startswith("Ray")]
    startup = statistics.median(r["fixed_cost_over_one_process"] for r in ray_rows)
    two = next(r for r in ray_rows if "2 workers" in r["config"])
    one = next(r for r in ray_rows if "1 worker" in r["config"])
    single = results["rows"][0]
    rates = [r["pictures_per_s_after_startup"] for r in (two, one, single)]
    if None in rates:  # a run of N pictures no slower than its run of 1: the noise exceeds the work
        lines += ["", f"Ray's fixed start-up cost (local instance, actors, model loads; Ray on 1 picture minus one "
                      f"process on 1 picture): **{startup:.1f} s**. No rate after start-up for "
                      + ", ".join(r["config"] for r in (two, one, single) if r["pictures_per_s_after_startup"] is None)
                      + f": its {results['meta']['pictures']}-picture runs were no slower than its 1-picture runs, so "
                      "the noise of this machine exceeded the work; more pictures are needed."]
        return "\n".join(lines)
    lines += [
        "",
        f"Ray's fixed start-up cost (local instance, actors, model loads; Ray on 1 picture minus one process on "
        f"1 picture): **{startup:.1f} s**. After it, 2 workers run {rates[0] / rates[1]:.2f}x "
        f"as fast as 1 worker and {rates[0] / rates[2]:.2f}x "
        f"as fast as one process with 1 thread. Read these with the spread column in mind: on a machine this "
        f"loaded, a rate after start-up is a difference of two noisy medians, and Ray runs its workers at nice 15 "
        f"(its default), so they yield to every other process; the one-process run with 2 threads was slower than "
        f"with 1 for the same reason. A quiet machine is needed for figures to plan with.",
    ]
    rate = rates[0]
    lines += [
        "",
        f"On paper, from these figures (not measured: no cluster was available): a machine like this one "
        f"explains {rate:.0f} demo pictures/s with 2 workers, so 1,000,000 pictures take "
        f"{1e6 / rate / 3600:.1f} h on one machine and, if throughput adds up across machines, "
        + ", ".join(f"{1e6 / rate / n / 60:.0f} min on {n}" for n in (4, 16, 64))
        + f" (plus ~{startup:.0f} s of start-up).",
    ]
    return "\n".join(lines)


def sections(data: dict) -> dict[str, str]:
    return {"ray": render(data)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pictures", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    _report.add_flags(parser, RESULTS)
    args = _report.parse_args(parser)

    def run():
        meta = _report.start_run(PAGE, SECTIONS, versions=("onnxruntime", "ray"), pictures=args.pictures,
                                 repeat=args.repeat, model=str(MODEL.relative_to(ROOT)))
        return _report.write_results(args.out, meta, measure(args.pictures, args.repeat))

    print(render(_report.render_or_measure(args, PAGE, sections, run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
