"""Op-type histogram of the ONNX graph torch.onnx emits for one torchvision classifier.

Usage: python -m gradmap.export._ophist MODEL [--opset 18]

Prints {op_type: count} as JSON. The model is exported with seeded random weights and a dynamic
batch dimension, exactly as ``gradmap export`` does before the gradient pass.
``python tools/op_histogram.py`` runs this for every classifier, each in a process of its own (big
models need several GB), and writes the table of ops the gradient pass must cover.
"""

from __future__ import annotations

import argparse
import json
import sys


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
    parser.add_argument("model")
    parser.add_argument("--opset", type=int, default=18)
    args = parser.parse_args(argv)
    print(json.dumps(_histogram_of(args.model, args.opset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
