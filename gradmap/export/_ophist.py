"""Op-type histograms of the ONNX graphs torch.onnx emits for torchvision's classifiers.

Usage: python -m gradmap.export._ophist [MODEL ...] [--out docs/op_histogram.json]

Each model is exported in a child process (big models need several GB) with seeded random
weights and a dynamic batch dimension, exactly as ``gradmap export`` does before the gradient
pass. The result maps model name to {op_type: count}; the gradient pass must cover the union.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def _histogram_of(name: str, opset: int) -> dict[str, int]:
    import collections

    from gradmap.export._torchvision import input_size_of, load_torchvision
    from gradmap.export._trace import trace_to_onnx

    module, _ = load_torchvision(name, "none")
    model = trace_to_onnx(module, input_size_of(name), opset=opset)
    counts = collections.Counter(
        (node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}")
        for node in model.graph.all_nodes()
    )
    return dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--out", default="docs/op_histogram.json")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_histogram_of(args.models[0], args.opset)))
        return 0
    import torchvision

    names = args.models or torchvision.models.list_models(module=torchvision.models)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    for name in names:
        if name in result and "error" not in result[name]:
            continue
        proc = subprocess.run(
            [sys.executable, "-m", "gradmap.export._ophist", "--child", "--opset", str(args.opset), name],
            capture_output=True, text=True, timeout=args.timeout,
        )
        if proc.returncode == 0:
            result[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            result[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        print(name, result[name], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
