"""Peak memory and wall time of saliency maps: ``gradmap run`` against the PyTorch recipe.

    python bench/bench_memory.py [--model resnet50] [--repeat 3] [--folder 20]

Two workloads: one map of a photograph (the cold start a user waits for: process start to map
written), and a folder of ``--folder`` photographs (scikit-image's four, repeated) at batch 8,
gradmap's default batch size. Each side is a fresh process timed by /usr/bin/time -v, with its peak
resident set size. gradmap runs the exported model (exported once beforehand, not timed); the
recipe (bench/pytorch_recipe.py) builds the torchvision model in-process and batches the folder
the same way. Writes bench/results/memory.json and the table in README.md.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``cmd`` under /usr/bin/time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    hours = int(wall.group(1) or 0)
    seconds = hours * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    return seconds, int(rss.group(1)) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gradmap", default=None, help="gradmap executable of the slim runtime venv (default: "
                                                        "this interpreter's)")
    parser.add_argument("--folder", type=int, default=20, help="photographs in the folder workload (0: skip it)")
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
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
    gradmap = [args.gradmap] if args.gradmap else [sys.executable, "-m", "gradmap.cli"]
    recipe = [sys.executable, str(ROOT / "bench" / "pytorch_recipe.py"), args.model]
    threads = str(os.cpu_count() or 1)
    workloads = {"one map of a 451x300 photograph": (picture, "recipe.png")}
    if args.folder:
        workloads[f"{args.folder} photographs, batch 8"] = (folder, "recipe")
    summary: dict = {}
    for workload, (source, recipe_out) in workloads.items():
        rows = {"gradmap run": [], "PyTorch recipe": []}
        for i in range(args.repeat):
            out = work / f"out{len(summary)}_{i}"
            rows["gradmap run"].append(timed([*gradmap, "run", str(model), str(source), "--out", str(out),
                                              "--format", "heatmap", "--batch-size", "8", "--threads", threads]))
            rows["PyTorch recipe"].append(timed([*recipe, str(source), str(out / recipe_out), "8"]))
        summary[workload] = {name: {"wall_s": statistics.median(r[0] for r in runs),
                                    "peak_rss_mb": statistics.median(r[1] for r in runs), "runs": runs}
                             for name, runs in rows.items()}
    out = ROOT / "bench" / "results" / "memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "summary": summary}, indent=1) + "\n")
    lines = [f"{args.model}, random weights, {threads} threads, fresh process each, medians of {args.repeat} "
             "(`python bench/bench_memory.py`); wall time from process start to the last map written:", "",
             "| work | | wall time | peak RSS |", "|---|---|---|---|"]
    for workload, sides in summary.items():
        for name, s in sides.items():
            lines.append(f"| {workload} | {name} | {s['wall_s']:.2f} s | {s['peak_rss_mb']:.0f} MB |")
    print("\n".join(lines))
    if not args.no_readme:
        sys.path.insert(0, str(ROOT / "tools"))
        from update_readme import README, replace_section

        README.write_text(replace_section(README.read_text(), "memory", "\n".join(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
