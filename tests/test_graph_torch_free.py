"""The graph code imports no framework: the gradient pass, lowering, metadata and writing run with
torch made unimportable (the Keras and bare-ONNX export paths stand on this).

Each check runs in a fresh interpreter in which ``import torch`` raises ImportError, so it fails if
anything on the path imports torch, even transitively.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("onnx_ir")

_BLOCK_TORCH = textwrap.dedent("""
    import sys
    for name in ("torch", "torchvision", "tensorflow", "keras", "jax"):
        sys.modules[name] = None  # import raises ImportError
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_the_blocker_blocks():
    result = _run("import torch")
    assert result.returncode != 0 and "import of torch halted" in result.stderr, "the test's torch blocker does not work"


def test_graph_package_builds_writes_and_runs_a_gradient_model_without_torch(tmp_path):
    out = tmp_path / "tiny.onnx"
    result = _run(f"""
        import numpy as np, onnx, onnx_ir as ir, onnxruntime as ort
        import gradmap.export  # the sources' package must import without torch too
        from gradmap import contract
        from gradmap.graph import add_gradient, finish, write_atomic
        w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
        fc = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32)
        text = '''
            <ir_version: 8, opset_import: ["" : 18]>
            g (float[N, 3, 8, 8] image) => (float[N, 5] logits) {{
                c = Conv <pads = [1, 1, 1, 1]> (image, w)
                r = Relu (c)
                p = GlobalAveragePool (r)
                f = Flatten (p)
                logits = MatMul (f, fc)
            }}'''
        proto = onnx.parser.parse_model(text)
        proto.graph.initializer.extend([onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(fc, "fc")])
        proto = onnx.shape_inference.infer_shapes(proto)
        for target in ("portable", "cpu"):
            model = ir.serde.deserialize_model(proto)
            add_gradient(model, target=target)
            meta = contract.ModelMetadata(source_model="tiny", weights="random",
                                          preprocessing=contract.Preprocessing(crop=(8, 8), resize=None),
                                          labels=tuple("abcde"), target=target)
            written = finish(model, meta)
            write_atomic(written, {str(out)!r})
            sess = ort.InferenceSession({str(out)!r}, providers=["CPUExecutionProvider"])
            x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
            logits, index, grad = sess.run(["logits", "target_index", "gradient"],
                                           {{"image": x, "target": np.array([-1, 3])}})
            assert grad.shape == x.shape and index[1] == 3 and np.isfinite(grad).all()
        import sys
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None], "torch was imported"
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_torch_export_says_how_to_install_torch_when_it_is_missing():
    result = _run("""
        import gradmap.export
        try:
            gradmap.export.export_torchvision
        except ImportError as e:
            print("ImportError", e.name)
    """)
    assert result.returncode == 0 and "ImportError torch" in result.stdout, result.stderr[-2000:]
