"""Forward-graph rewrites before the gradient pass (gradmap/graph/lowering/cpu_forward.py): which channel
groups are padded, the squeeze-and-excitation spread, the HardSwish split, and that the
rewritten model still gives torch autograd's logits and input gradient."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gradmap.contract import Preprocessing  # noqa: E402
from gradmap.export import export_module  # noqa: E402
from gradmap.export._parity import _unpadded  # noqa: E402
from gradmap.export._trace import trace_to_onnx  # noqa: E402
from gradmap.graph.lowering.cpu_forward import pad_channels, spread_channel_scales  # noqa: E402

TOLERANCE = 1e-4  # max|Δ| / max|torch autograd|, as in test_export


class MobileBlocks(torch.nn.Module):
    """The shapes of a MobileNetV3 stage: 24 and 40 channel feature maps (not multiples of 16), a
    depthwise convolution, squeeze-and-excitation, a residual Add, max pooling, ReLU6; and a 20
    channel map that is concatenated, which the padding must leave alone."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 24, 3, stride=2, padding=1)
        self.depthwise = torch.nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.squeeze = torch.nn.Conv2d(24, 8, 1)
        self.excite = torch.nn.Conv2d(8, 24, 1)
        self.project = torch.nn.Conv2d(24, 24, 1)
        self.expand = torch.nn.Conv2d(24, 40, 1)
        self.narrow = torch.nn.Conv2d(40, 20, 3, padding=1)
        self.head = torch.nn.Conv2d(40, 32, 1)
        self.fc = torch.nn.Linear(32, 5)

    def forward(self, x):
        x = F.hardswish(self.stem(x))
        y = F.relu(self.depthwise(x))
        scale = F.hardsigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = x + self.project(y * scale)
        x = F.max_pool2d(x, 2)
        z = torch.clamp(self.expand(x), 0.0, 6.0)
        c = self.narrow(z)
        w = torch.cat([c, F.relu(c)], dim=1)
        return self.fc(F.relu(self.head(w)).mean((2, 3)))


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    m = MobileBlocks().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _channels(graph: ir.Graph) -> dict[str, int]:
    return {v.name: v.shape[1] for node in graph for v in node.outputs
            if v.shape is not None and len(v.shape) == 4 and v.dtype == ir.DataType.FLOAT}


def test_pads_the_groups_that_gain_and_keeps_the_rest(module):
    model = trace_to_onnx(module, (32, 32))
    before = _channels(model.graph)
    reference = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                     providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    (logits,) = reference.run(None, {"image": image})

    assert pad_channels(model.graph) == 2  # the 24 and the 40 channel groups
    after = _channels(model.graph)
    changed = {before[name]: after[name] for name in before if before[name] != after[name]}
    assert changed == {24: 32, 40: 48}
    assert 20 in after.values(), "the concatenated 20 channel map must keep its channels"
    assert 8 in after.values(), "the 1x1 squeeze bottleneck gains nothing and is left alone"
    assert {after[name] for name in before if before[name] == 24} == {32}
    concat = next(node.outputs[0].name for node in model.graph if node.op_type == "Concat")
    assert {after[name] for name in before if before[name] == 40 and name != concat} == {48}
    assert after[concat] == 40
    # then the squeeze-and-excitation block: its mean and its scaling Mul, now on 32 channels
    assert spread_channel_scales(model.graph) == 2
    ops = [node.op_type for node in model.graph]
    assert ops.count("GlobalAveragePool") == 1 and ops.count("Resize") == 1
    assert ops.count("ReduceMean") == 1, "the head's mean without keepdims stays as it is"
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    padded = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (padded_logits,) = padded.run(None, {"image": image})
    np.testing.assert_allclose(padded_logits, logits, rtol=1e-5, atol=1e-6 * np.abs(logits).max())


def test_padded_gradient_model_matches_torch_autograd(module, tmp_path):
    report = export_module(module, tmp_path / "m.onnx", preprocessing=Preprocessing(crop=(32, 32)),
                           backprops=("guided", "deconvnet"), target="cpu")
    assert report.logits_error <= TOLERANCE and report.gradient_error <= TOLERANCE
    proto = onnx.load(str(report.path))
    convs = {tuple(i.dims) for i in proto.graph.initializer if len(i.dims) == 4}
    assert (32, 3, 3, 3) in convs and (32, 1, 3, 3) in convs, "stem and depthwise weights padded to 32 rows"
    forward_ops = [node.op_type for node in proto.graph.node if not node.name.startswith("grad/")]
    assert forward_ops.count("GlobalAveragePool") == forward_ops.count("Resize") == forward_ops.count("ReduceMean") == 1
    _assert_hard_swish_split(proto)
    image = np.random.default_rng(7).standard_normal((2, 3, 32, 32), dtype=np.float32)
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    target = np.array([1, 4], dtype=np.int64)
    logits, _, gradient = session.run(["logits", "target_index", "gradient"], {"image": image, "target": target})
    x = torch.from_numpy(image).requires_grad_(True)
    expected = module(x)
    (expected_gradient,) = torch.autograd.grad(expected.gather(1, torch.from_numpy(target)[:, None]).sum(), x)
    scale = np.abs(expected_gradient.numpy()).max()
    assert np.abs(gradient - expected_gradient.numpy()).max() <= TOLERANCE * scale
    assert np.abs(logits - expected.detach().numpy()).max() <= TOLERANCE * np.abs(expected.detach().numpy()).max()


def _assert_hard_swish_split(proto):
    """The stem's HardSwish runs as Mul(X, HardSigmoid(X)) and the Mul rule's HardSwish pattern takes
    the gradient: the forward HardSigmoid gets none of its own (no backward node of its rule), and
    the backward computes no HardSigmoid(X, 1/6, 1/2) of the stem's convolution output again (its
    steps are HardSigmoids of slope 2^100 in the plain layout)."""
    assert not any(node.op_type == "HardSwish" for node in proto.graph.node)
    gate = next(node for node in proto.graph.node if node.op_type == "HardSigmoid" and node.name.endswith("_gate"))
    assert not any(node.name.startswith(f"grad/{gate.name}/") for node in proto.graph.node)
    stem = gate.input[0]
    backward_gates = [node for node in proto.graph.node
                      if node.name.startswith("grad/") and node.op_type == "HardSigmoid" and stem in node.input
                      and abs({a.name: a.f for a in node.attribute}.get("alpha", 0.2) - 1 / 6) < 1e-6]
    assert backward_gates == []


def test_hard_swish_split_without_padding(module, tmp_path):
    """With --channel-multiple 0 the stem has 24 channels, and the split HardSwish takes the rule's
    plain-layout form."""
    report = export_module(module, tmp_path / "plain.onnx", preprocessing=Preprocessing(crop=(32, 32)),
                           target="cpu", channel_multiple=0)
    assert report.logits_error <= TOLERANCE and report.gradient_error <= TOLERANCE
    proto = onnx.load(str(report.path))
    assert (24, 3, 3, 3) in {tuple(i.dims) for i in proto.graph.initializer}
    _assert_hard_swish_split(proto)


def test_the_grad_cam_layer_keeps_its_channels(module, tmp_path):
    report = export_module(module, tmp_path / "cam.onnx", preprocessing=Preprocessing(crop=(32, 32)),
                           cam_layer="project", target="cpu")
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)
    activation, gradient = session.run(["cam_activation", "cam_gradient"],
                                       {"image": image, "target": np.full(2, -1, dtype=np.int64)})
    assert activation.shape == gradient.shape == (2, 24, 16, 16)
    assert report.gradient_error <= TOLERANCE


def test_parity_replay_renumbers_pool_indices_of_padded_maps():
    """MaxPool's flat indices into a padded map, renumbered as indices into the unpadded one."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 24, 6, 6), dtype=np.float32)
    padded = np.concatenate([x, np.zeros((2, 8, 6, 6), dtype=np.float32)], axis=1)
    text = """<ir_version: 8, opset_import: ["" : 18]>
    g (float[N, C, 6, 6] X) => (float[N, C, 3, 3] Y, int64[N, C, 3, 3] I) {
        Y, I = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (X)
    }"""
    session = ort.InferenceSession(onnx.parser.parse_model(text).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    _, indices = session.run(None, {"X": x})
    _, padded_indices = session.run(None, {"X": padded})
    assert not np.array_equal(padded_indices[:, :24], indices), "batch 1 counts the padded channels"
    np.testing.assert_array_equal(_unpadded(padded_indices, indices.shape, x.shape), indices)
    relu = np.maximum(padded, 0)
    np.testing.assert_array_equal(_unpadded(relu, x.shape), np.maximum(x, 0))
    assert _unpadded(x, x.shape) is x


@pytest.mark.parametrize("multiple, stem_rows", [(0, 24), (8, 24), (16, 32), (32, 32)])
def test_channel_multiple_chooses_the_block(module, multiple, stem_rows):
    """0 turns padding off; 24 channels are already a multiple of 8."""
    from gradmap.export import build_gradient_model

    model, _ = build_gradient_model(module, (32, 32), channel_multiple=multiple)
    stem = next(node for node in model.graph if node.op_type == "Conv")
    assert stem.inputs[1].shape[0] == stem_rows


def test_cli_refuses_a_negative_channel_multiple(tmp_path):
    from click.testing import CliRunner

    from gradmap.cli import main

    result = CliRunner().invoke(main, ["export", "mobilenet_v3_small", "--channel-multiple", "-1",
                                       "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "--channel-multiple" in result.output
    assert not (tmp_path / "m.onnx").exists()


class PartialMeans(torch.nn.Module):
    """Means over one spatial axis of a 16-channel map (FocalNet's ``mean(2).mean(3)`` context, and a
    per-row mean used as a scale): only a mean over both spatial axes is a GlobalAveragePool."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        context = x.mean(2, keepdim=True).mean(3, keepdim=True)
        rows = x.mean(3, keepdim=True)
        return self.fc((x * context + x * rows).mean((2, 3)))


def test_only_means_over_both_spatial_axes_become_global_pools(tmp_path):
    torch.manual_seed(0)
    module = PartialMeans().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    model = trace_to_onnx(module, (8, 12))
    means = [node for node in model.graph if node.op_type == "ReduceMean"]
    spread_channel_scales(model.graph)
    assert "GlobalAveragePool" not in [node.op_type for node in model.graph], \
        "a mean over one spatial axis was rewritten as a global pool"
    assert sum(node.op_type == "ReduceMean" for node in model.graph) == len(means)
    report = export_module(module, tmp_path / "m.onnx", preprocessing=Preprocessing(crop=(8, 12), resize=None),
                           target="cpu")
    assert report.gradient_error <= TOLERANCE
