"""Test helper: differentiate a small ONNX graph with gradmap's rules and compare with torch autograd."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

from gradmap.graph.gradient import append_vjp


def onnx_vjp(text: str, inputs: dict[str, np.ndarray], wrt: str, grad_output_seed: int = 1):
    """Run the graph in ``text`` forward and its VJP w.r.t. input ``wrt``; return (Y, dY, dX)."""
    proto = onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text), strict_mode=True)
    model = ir.serde.deserialize_model(proto)
    source = next(v for v in model.graph.inputs if v.name == wrt)
    sink = model.graph.outputs[0]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run([sink.name], inputs)
    dy = np.random.default_rng(grad_output_seed).standard_normal(y.shape).astype(np.float32)
    append_vjp(model, source, sink)
    grad_proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(grad_proto, full_check=True)
    sess = ort.InferenceSession(grad_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (dx,) = sess.run(["grad_input"], {**inputs, "grad_output": dy})
    return y, dy, dx


def assert_vjp_matches_torch(text: str, torch_fn, inputs: dict[str, np.ndarray], wrt: str = "X",
                             rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """The forward output and the VJP of the ONNX graph equal torch's for ``torch_fn(**inputs)``."""
    y, dy, dx = onnx_vjp(text, inputs, wrt)
    tensors = {k: torch.tensor(v, requires_grad=(k == wrt)) for k, v in inputs.items()}
    y_ref = torch_fn(**tensors)
    (dx_ref,) = torch.autograd.grad(y_ref, tensors[wrt], torch.from_numpy(dy))
    y_ref, dx_ref = y_ref.detach().numpy(), dx_ref.numpy()
    assert y.shape == y_ref.shape, f"forward shape {y.shape} != torch {y_ref.shape}"
    np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=atol, err_msg="forward differs from torch")
    assert dx.shape == dx_ref.shape, f"gradient shape {dx.shape} != torch {dx_ref.shape}"
    assert np.all(np.isfinite(dx)), "gradient has NaN or Inf"
    np.testing.assert_allclose(dx, dx_ref, rtol=rtol, atol=atol, err_msg="gradient differs from torch autograd")
