"""BatchNormalization -> ReLU -> Conv (DenseNet's pre-activation layers): the BN factor is folded into
the Conv's adjoint weights (gradient/_rules/convolution.py). Checked against torch for vanilla,
guided and deconvnet backprop with BN factors of both signs, where guided and deconvnet must not
fold (their ReLU rule is not linear in the gradient)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402

from gradmap import contract  # noqa: E402
from gradmap.contract import Preprocessing  # noqa: E402
from gradmap.export import export_module  # noqa: E402

TOLERANCE = 1e-4  # max|Δ| / max|torch autograd|, as in test_export


class PreActivation(torch.nn.Module):
    """Two DenseNet layers (BN -> ReLU -> 1x1 Conv -> BN -> ReLU -> 3x3 Conv, outputs concatenated),
    a strided transition (BN -> ReLU -> 3x3 stride-2 Conv, whose adjoint is a ConvTranspose) and a
    grouped pre-activation Conv (after an average pool: a BN right after a Conv is folded into it by
    the exporter, as the one inside each layer is); BN statistics and scales random, some scales negative."""

    def __init__(self, negative: bool):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.layers = torch.nn.ModuleList()
        channels = 16
        for _ in range(2):
            self.layers.append(torch.nn.Sequential(
                torch.nn.BatchNorm2d(channels), torch.nn.ReLU(), torch.nn.Conv2d(channels, 24, 1, bias=False),
                torch.nn.BatchNorm2d(24), torch.nn.ReLU(), torch.nn.Conv2d(24, 8, 3, padding=1, bias=False)))
            channels += 8
        self.transition = torch.nn.Sequential(torch.nn.BatchNorm2d(channels), torch.nn.ReLU(),
                                              torch.nn.Conv2d(channels, 32, 3, stride=2, padding=1, bias=False))
        self.grouped = torch.nn.Sequential(torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                                           torch.nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False))
        self.fc = torch.nn.Linear(32, 5)
        for bn in (m for m in self.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            n = bn.num_features
            scale = torch.rand(n, generator=g) + 0.5
            if negative:
                scale[::3] *= -1
            bn.weight.data = scale
            bn.bias.data = torch.randn(n, generator=g) * 0.5
            bn.running_mean.data = torch.randn(n, generator=g) * 0.5
            bn.running_var.data = torch.rand(n, generator=g) + 0.5

    def forward(self, x):
        features = self.stem(x)
        for layer in self.layers:
            features = torch.cat([features, layer(features)], 1)
        y = self.transition(features)
        y = y + self.grouped(torch.nn.functional.avg_pool2d(y, 3, 1, 1))  # a BN the exporter cannot fold
        return self.fc(y.mean((2, 3)))


def _torch_gradients(module, image, target):
    """Vanilla, guided and deconvnet input gradients by torch autograd, the last two through backward
    hooks on the ReLU modules: guided keeps the positive part of the ReLU's input gradient (its mask
    is already applied), deconvnet passes the positive part of the output gradient, without mask."""
    results = {}
    for kind in ("vanilla", "guided", "deconvnet"):
        hooks = []
        for m in module.modules():
            if isinstance(m, torch.nn.ReLU) and kind != "vanilla":
                if kind == "guided":
                    hooks.append(m.register_full_backward_hook(lambda mod, gi, go: (gi[0].clamp(min=0),)))
                else:
                    hooks.append(m.register_full_backward_hook(lambda mod, gi, go: (go[0].clamp(min=0),)))
        x = torch.from_numpy(image).requires_grad_(True)
        out = module(x)
        (grad,) = torch.autograd.grad(out.gather(1, torch.from_numpy(target)[:, None]).sum(), x)
        results[kind] = grad.numpy()
        for h in hooks:
            h.remove()
    return results


@pytest.mark.parametrize("negative", [False, True], ids=["positive-bn", "negative-bn"])
def test_preactivation_gradients_match_torch(negative, tmp_path):
    module = PreActivation(negative).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    # the cpu target, whose lowering folds BatchNormalization into the backward pass (the portable
    # default keeps the rule's nodes; the runtime folds them when it lowers the file at load)
    report = export_module(module, tmp_path / "m.onnx", preprocessing=Preprocessing(crop=(16, 16)),
                           backprops=("guided", "deconvnet"), target="cpu")
    proto = onnx.load(str(report.path))
    bn_nodes = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
    assert len(bn_nodes) == 4, bn_nodes  # each layer's first, the transition's and the grouped block's
    bn_rule_nodes = [n for n in proto.graph.node
                     if n.op_type == "Mul" and any(n.name.startswith(f"grad/{b}/") for b in bn_nodes)]
    # vanilla folds every BN; guided and deconvnet fold only when all factors are positive
    assert len(bn_rule_nodes) == (2 * len(bn_nodes) if negative else 0)

    image = np.random.default_rng(5).standard_normal((2, 3, 16, 16), dtype=np.float32)
    target = np.array([1, 3], dtype=np.int64)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    names = [contract.BACKPROP_OUTPUTS[k] for k in ("vanilla", "guided", "deconvnet")]
    ours = dict(zip(("vanilla", "guided", "deconvnet"), session.run(names, {"image": image, "target": target})))
    expected = _torch_gradients(module, image, target)
    for kind in ours:
        scale = np.abs(expected[kind]).max()
        assert scale > 0
        error = np.abs(ours[kind] - expected[kind]).max() / scale
        assert error <= TOLERANCE, f"{kind}: gradient differs by {error:.3g}"
    if negative:  # the guided gradient really differs from a folded (sign-flipped) one
        assert np.abs(expected["guided"] - expected["vanilla"]).max() > 0.1 * np.abs(expected["vanilla"]).max()


def test_grad_cam_layer_inside_a_folded_chain_keeps_its_own_gradient(tmp_path):
    """A Grad-CAM layer that is a folded ReLU's output must get its true gradient, not the one
    scaled by the BN factor: the fold is skipped there."""
    module = PreActivation(negative=True).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    relu = module.layers[1][1]  # the second layer's first ReLU, between its BN and its 1x1 Conv
    report = export_module(module, tmp_path / "m.onnx", preprocessing=Preprocessing(crop=(16, 16)),
                           cam_layer="layers.1.1")
    image = np.random.default_rng(6).standard_normal((2, 3, 16, 16), dtype=np.float32)
    target = np.array([0, 2], dtype=np.int64)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    activation, gradient = session.run([contract.OUTPUT_CAM_ACTIVATION, contract.OUTPUT_CAM_GRADIENT],
                                       {"image": image, "target": target})
    kept = {}
    handle = relu.register_forward_hook(lambda mod, args, out: kept.setdefault("y", out))
    out = module(torch.from_numpy(image).requires_grad_(True))
    handle.remove()
    (expected,) = torch.autograd.grad(out.gather(1, torch.from_numpy(target)[:, None]).sum(), kept["y"])
    np.testing.assert_allclose(activation, kept["y"].detach().numpy(), rtol=1e-5, atol=1e-5)
    scale = np.abs(expected.numpy()).max()
    assert np.abs(gradient - expected.numpy()).max() <= TOLERANCE * scale
