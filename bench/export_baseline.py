"""Gradient models exported by an earlier gradmap commit, for timing it beside today's graph.

    python bench/export_baseline.py --rev f082100 --out /tmp/gradmap-baseline [--models resnet50 ...]
    python bench/bench_speed.py --baseline /tmp/gradmap-baseline

Checks out ``--rev`` into a temporary git worktree and, in a child Python whose ``gradmap`` is that
worktree's, exports each torchvision model with random weights (``load_torchvision(name, "none")``,
the same seeded weights bench_speed.py uses) at its own input size with that commit's defaults. Writes
``OUT/NAME.onnx`` and ``OUT/baseline.json`` (the commit). The worktree is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ["resnet50", "vgg19", "mobilenet_v3_large", "efficientnet_b0", "densenet121", "vit_b_16",
                  "convnext_tiny"]

_CHILD = r"""
import sys
from pathlib import Path
import onnx_ir as ir
import gradmap
worktree, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
if not Path(gradmap.__file__).resolve().is_relative_to(worktree):
    raise SystemExit(f"gradmap imported from {gradmap.__file__}, not from the worktree {worktree}")
from gradmap.export._api import build_gradient_model
from gradmap.export._torchvision import input_size_of, load_torchvision
for name in sys.argv[3:]:
    module, _ = load_torchvision(name, "none")
    for p in module.parameters():
        p.requires_grad_(False)
    model, _ = build_gradient_model(module, input_size_of(name))
    ir.save(model, out / f"{name}.onnx")
    print(name, "exported", flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="the gradmap commit to export with")
    parser.add_argument("--out", required=True, help="folder for NAME.onnx and baseline.json")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.rev], check=True, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="gradmap-baseline-") as tmp:
        worktree = Path(tmp) / "src"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), commit], check=True,
                       capture_output=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(worktree)}
            subprocess.run([sys.executable, "-c", _CHILD, str(worktree), str(out), *args.models], check=True, env=env,
                           cwd=tmp)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    (out / "baseline.json").write_text(json.dumps({"rev": args.rev, "commit": commit, "models": args.models}) + "\n")
    print(f"baseline models of {commit[:10]} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
