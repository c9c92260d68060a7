"""A small ONNX classifier file for the parity and verify tests (numpy and onnx only: the torch-free ONNX
venv runs tests/test_verify.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def cnn_file(folder: Path) -> Path:
    """A small ONNX classifier (Conv, Relu, MaxPool, Conv, Relu, GlobalAveragePool, Gemm) taking 64x64,
    seeded: the same file every time."""
    rng = np.random.default_rng(3)
    proto = onnx.parser.parse_model('''<ir_version: 8, opset_import: ["" : 18]>
        g (float[N, 3, 64, 64] pixels) => (float[N, 5] scores) {
            c1 = Conv <pads = [1, 1, 1, 1]> (pixels, w1, b1)
            r1 = Relu (c1)
            p1 = MaxPool <kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]> (r1)
            c2 = Conv <pads = [1, 1, 1, 1]> (p1, w2, b2)
            r2 = Relu (c2)
            g2 = GlobalAveragePool (r2)
            f = Flatten (g2)
            scores = Gemm <transB = 1> (f, fc, fb)
        }''')
    weights = {"w1": (6, 3, 3, 3), "b1": (6,), "w2": (8, 6, 3, 3), "b2": (8,), "fc": (5, 8), "fb": (5,)}
    proto.graph.initializer.extend(numpy_helper.from_array((rng.standard_normal(s) * 0.4).astype(np.float32), k)
                                   for k, s in weights.items())
    path = Path(folder) / "cnn.onnx"
    onnx.save(proto, str(path))
    return path
