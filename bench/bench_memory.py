"""Peak memory and cold start of one saliency map: ``gradmap run`` against the PyTorch recipe.

    python bench/bench_memory.py [--model resnet50] [--repeat 3]

Each side is a fresh process timed by /usr/bin/time -v, from process start to the map written
(the cold start a user waits for), with its peak resident set size. gradmap runs the exported
model (exported once beforehand, not timed); the recipe builds the torchvision model in-process.
Writes bench/results/memory.json and the table in README.md.
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
    parser.add_argument("--no-readme", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gradmap-bench-"))
    import skimage.data
    from PIL import Image

    picture = work / "chelsea.jpg"
    Image.fromarray(skimage.data.chelsea()).save(picture)
    model = work / f"{args.model}.onnx"
    subprocess.run([sys.executable, "-m", "gradmap.cli", "export", args.model, "--weights", "none", "-o", str(model)],
                   check=True, capture_output=True)
    gradmap = [args.gradmap] if args.gradmap else [sys.executable, "-m", "gradmap.cli"]
    rows = {"gradmap run": [], "PyTorch recipe": []}
    for i in range(args.repeat):
        out = work / f"out{i}"
        rows["gradmap run"].append(timed([*gradmap, "run", str(model), str(picture), "--out", str(out),
                                          "--format", "heatmap", "--threads", str(os.cpu_count() or 1)]))
        rows["PyTorch recipe"].append(timed([sys.executable, str(ROOT / "bench" / "pytorch_recipe.py"), args.model,
                                             str(picture), str(work / f"recipe{i}.png")]))
    summary = {name: {"cold_start_s": statistics.median(r[0] for r in runs),
                      "peak_rss_mb": statistics.median(r[1] for r in runs), "runs": runs}
               for name, runs in rows.items()}
    out = ROOT / "bench" / "results" / "memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "summary": summary}, indent=1) + "\n")
    lines = [f"One {args.model} map of a 451x300 photograph, fresh process each, medians of {args.repeat} "
             "(`python bench/bench_memory.py`):", "",
             "| | cold start (process start to map written) | peak RSS |", "|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['cold_start_s']:.2f} s | {s['peak_rss_mb']:.0f} MB |")
    print("\n".join(lines))
    if not args.no_readme:
        sys.path.insert(0, str(ROOT / "tools"))
        from update_readme import README, replace_section

        README.write_text(replace_section(README.read_text(), "memory", "\n".join(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
