"""The cpu target's lowering passes (gradmap/graph/lowering): each pass alone rewrites the portable
graph of a small network that has its pattern, and the rewritten graph gives the portable graph's
gradients (every guided and deconvnet output too), which the portable graph's own parity with
torch autograd anchors. Each pass also rewrites regions of a real network's graph (a rule whose
formula changed under a pass fails here, not silently), and no lowering module imports a rule."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gradmap import contract  # noqa: E402
from gradmap.export import ExportError, build_gradient_model, export_module  # noqa: E402
from gradmap.contract import Preprocessing  # noqa: E402
from gradmap.export._trace import trace_to_onnx  # noqa: E402
from gradmap.graph import gradient, lowering  # noqa: E402
from gradmap.graph.lowering import cpu_backward  # noqa: E402

BACKPROPS = ("vanilla", "guided", "deconvnet")


class Patterns(torch.nn.Module):
    """Every pattern a cpu pass rewrites, on feature maps of 16 and 32 channels (multiples of the
    block, so that channel padding stays out of it): BatchNormalization -> ReLU -> Conv, stride-1,
    strided, patch (stride = kernel) and depthwise strided convolutions, overlapping and disjoint max
    pooling, HardSwish (as an op and split), SiLU, squeeze-and-excitation (a per-channel gradient,
    expanded and added), a concatenation."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.patch = torch.nn.Conv2d(32, 32, 2, stride=2)
        self.strided = torch.nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.depthwise = torch.nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=32)
        self.squeeze = torch.nn.Conv2d(32, 16, 1)
        self.excite = torch.nn.Conv2d(16, 32, 1)
        self.fc = torch.nn.Linear(64, 7)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 3, stride=2, padding=1)       # overlapping windows
        x = self.conv(F.relu(self.bn(x)))                                    # pre-activation
        x = F.hardswish(self.strided(self.patch(x)))                         # windows that do not overlap
        x = x * torch.sigmoid(x)                                             # SiLU
        x = F.max_pool2d(F.relu(self.depthwise(x)), 2)                       # disjoint windows
        scale = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        x = F.hardswish(x * scale) + x
        x = torch.cat([F.relu(x), x], dim=1)                                 # concatenation
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    m = Patterns().eval()
    with torch.no_grad():  # BN factors of both signs: guided and deconvnet must not fold the negative ones
        m.bn.weight.copy_(torch.linspace(-1.5, 2.0, 16))
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.running_mean.normal_()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


SIZE = (64, 64)


def _gradients(model: ir.Model, image: np.ndarray, target: np.ndarray) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [contract.BACKPROP_OUTPUTS[b] for b in BACKPROPS]
    return session.run([contract.OUTPUT_LOGITS, *names], {contract.INPUT_IMAGE: image, contract.INPUT_TARGET: target})


PASS_NAMES = [p.__name__ for p in cpu_backward.PASSES]


def _build(module, passes=(), *, backprops=BACKPROPS, size=SIZE, block=16) -> tuple[ir.Model, dict[str, int]]:
    """``module``'s cpu-target graph in the export's explicit steps (gradmap.graph.add_gradient's),
    with the backward passes ``passes`` only, and each of them's count of rewritten regions."""
    model = trace_to_onnx(module, size)
    plan = lowering.plan("cpu", block, skip=[name for name in PASS_NAMES if name not in passes])
    request = gradient.prepare(model, backprops=backprops)
    plan.lower_forward(model.graph, request.needs_grad, request.keep)
    appended = gradient.append_gradient(model, request)
    counts = plan.lower_backward(model.graph, appended)
    return model, counts


def _histogram(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# pass -> whether it gives bit-identical gradients (the others compute the same sums in another order)
EXACT = {"fold_batch_norm": False, "conv_adjoint": False, "relu_pool_mask": False, "max_pool_indices": False,
         "relu_mask": True,
         "hard_swish_steps": True, "silu_affine": True, "resize_sum_scale": True, "spread_per_channel": True,
         "concat_split": True}


@pytest.mark.parametrize("name", list(EXACT))
def test_each_cpu_pass_alone_keeps_the_gradient(module, name):
    """The cpu target with this backward pass alone against the cpu target with none (the same
    forward rewrites, the portable rules)."""
    rng = np.random.default_rng(3)
    image = rng.standard_normal((2, 3, *SIZE), dtype=np.float32)
    target = np.asarray([-1, 4], dtype=np.int64)
    unlowered, none = _build(module)
    lowered, counts = _build(module, [name])
    assert none == {} and list(counts) == [name], (none, counts)
    assert counts[name] > 0, f"{name} rewrote nothing"
    assert ir.serde.serialize_model(lowered).graph != ir.serde.serialize_model(unlowered).graph, \
        f"{name} left the graph as it was"
    expected = _gradients(unlowered, image, target)
    actual = _gradients(lowered, image, target)
    # the forward part is the same graph, but onnxruntime may fuse or lay it out differently once the
    # backward reads other forward values (max_pool_indices pools X again): a few ulp
    logits_error = np.abs(actual[0] - expected[0]).max() / np.abs(expected[0]).max()
    assert logits_error <= 1e-6, f"{name}: the logits changed by {logits_error:.3g}"
    for backprop, a, e in zip(BACKPROPS, actual[1:], expected[1:]):
        assert np.any(e), f"{backprop}: the gradient is all zeros, nothing is compared"
        if EXACT[name]:
            np.testing.assert_array_equal(a, e, err_msg=f"{name}: {backprop} gradient changed")
        else:
            error = np.abs(a - e).max() / np.abs(e).max()
            assert error <= 1e-6, f"{name}: {backprop} gradient differs by {error:.3g} (max|Δ| / max|unlowered|)"


def test_cpu_target_uses_no_portable_forms_where_it_lowers(module):
    """All passes together: no ConvTranspose where a Conv does (stride 1 and depthwise), the max
    pools routed by Indices, the weights stored once (the adjoint kernels come from the forward's
    initializers)."""
    model, _ = build_gradient_model(module, SIZE, target="cpu", channel_multiple=16)
    counts = _histogram(model)
    assert counts.get("ConvTranspose", 0) == 2, f"only the strided dense convs use ConvTranspose: {counts}"
    assert counts.get("Equal", 0) == 1, "only the one-hot's Equal is left: the pools' window masks are gone"
    weights = [v for v in model.graph.initializers.values() if v.const_value is not None and v.const_value.size >= 16 * 9]
    sizes = sorted(v.const_value.size for v in weights)
    assert len(sizes) == len(set(v.name for v in weights))
    forward = sum(p.numel() for p in module.parameters() if p.dim() == 4)
    assert sum(v.const_value.size for v in weights if len(v.shape) == 4) <= forward + 16 * 9 * 3, \
        "adjoint kernels are stored a second time"


def test_portable_and_cpu_targets_match_torch_autograd(module, tmp_path):
    """Both targets through export_module's parity check with torch autograd, and the target in
    the metadata."""
    for target in ("portable", "cpu"):
        report = export_module(module, tmp_path / f"{target}.onnx", preprocessing=Preprocessing(crop=SIZE, resize=73),
                               target=target, backprops=("guided", "deconvnet"))
        assert report.gradient_error <= 1e-4, (target, report.gradient_error)
        props = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
        assert props["gradmap.target"] == target


def test_portable_graph_has_no_engine_specific_forms(module):
    model, _ = build_gradient_model(module, SIZE, target="portable", backprops=BACKPROPS)
    counts = _histogram(model)
    for op in ("MaxUnpool", "ScatterElements", "Resize"):
        assert op not in counts, f"portable graph uses {op}: {counts}"
    steep = [n.name for n in model.graph if n.op_type == "HardSigmoid" and n.attributes.get_float("alpha", 0.2) > 1]
    assert not steep, f"HardSigmoid used as a step function: {steep}"
    blocked = [n.name for n in model.graph if n.op_type == "Conv"
               and not n.metadata_props.get("gradmap.vjp", "Conv:").startswith("Conv:")]
    assert not blocked, f"Convs outside convolutions' adjoints (blocked-layout forms): {blocked}"
    assert "ConvTranspose" not in counts or all(
        n.inputs[1].const_value is not None and n.inputs[1].uses()[0].node is n and len(n.inputs[1].uses()) == 1
        for n in model.graph if n.op_type == "ConvTranspose"), \
        "a ConvTranspose reads a forward Conv's weight (OpenVINO 2026.4 computes that with the Conv's layout)"
    pools = [n for n in model.graph if n.op_type == "MaxPool"]
    assert all(len(n.outputs) == 1 for n in pools), "a portable MaxPool returns no Indices"


def test_portable_target_refuses_channel_padding(module):
    with pytest.raises(ExportError, match="channel padding"):
        build_gradient_model(module, SIZE, target="portable", channel_multiple=16)
    with pytest.raises(ExportError, match="unknown target"):
        build_gradient_model(module, SIZE, target="gpu")


def test_relu_pool_mask_gives_the_mask_after_routing_bit_for_bit(module):
    """The ReLU mask at the pool's resolution before the routing equals it at the ReLU's after the
    routing, to the bit: vanilla at both pools, guided at the disjoint one only (its Relu of a
    routed sum is not a sum of Relus where windows overlap), deconvnet never."""
    rng = np.random.default_rng(4)
    image = rng.standard_normal((2, 3, *SIZE), dtype=np.float32)
    target = np.asarray([-1, 2], dtype=np.int64)
    after, _ = _build(module, ["max_pool_indices", "relu_mask"])
    before, counts = _build(module, ["relu_pool_mask", "max_pool_indices", "relu_mask"])
    assert counts["relu_pool_mask"] == 3, \
        f"expected the stem pool (vanilla) and the disjoint pool (vanilla, guided): {counts}"
    masks = [_histogram(m).get("HardSigmoid", 0) for m in (after, before)]
    assert masks[1] == masks[0], "each pooled ReLU keeps one mask, on the pool's output"
    for backprop, a, e in zip(("logits",) + BACKPROPS, _gradients(before, image, target), _gradients(after, image, target)):
        assert np.any(e), backprop
        np.testing.assert_array_equal(a, e, err_msg=f"relu_pool_mask changed the {backprop} output")


class SharedRelu(torch.nn.Module):
    """A ReLU output read by a max pool and by a second branch: its gradient is a sum, and the
    mask cannot move before the pool's routing."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 5)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return self.fc(F.max_pool2d(y, 2).mean((2, 3)) + y.mean((2, 3)))


def test_relu_pool_mask_leaves_a_relu_output_read_twice():
    torch.manual_seed(1)
    shared = SharedRelu().eval()
    for p in shared.parameters():
        p.requires_grad_(False)
    model, counts = _build(shared, ["relu_pool_mask", "max_pool_indices", "relu_mask"], backprops=("vanilla",))
    assert counts["relu_pool_mask"] == 0, counts
    image = np.random.default_rng(5).standard_normal((1, 3, *SIZE), dtype=np.float32)
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (gradient,) = session.run([contract.OUTPUT_GRADIENT], {contract.INPUT_IMAGE: image,
                                                           contract.INPUT_TARGET: np.asarray([3], dtype=np.int64)})
    x = torch.from_numpy(image).requires_grad_(True)
    shared(x)[0, 3].backward()
    expected = x.grad.numpy()
    assert np.abs(gradient - expected).max() <= 1e-5 * np.abs(expected).max()


def _small_densenet():
    """torchvision's DenseNet with two layers per block: its BatchNormalization -> ReLU -> Conv
    layers and concatenations at a fraction of densenet121's tracing time."""
    from torchvision.models import DenseNet

    return DenseNet(growth_rate=16, block_config=(2, 2, 2, 2), num_init_features=32, num_classes=10)


def _torchvision(name):
    from gradmap.export._torchvision import load_torchvision

    return load_torchvision(name, "none", seed=0)[0]


#: Real networks and the cpu backward passes each must rewrite regions of (every pass in one at least).
REAL = {
    "resnet18": (lambda: _torchvision("resnet18"),
                 {"conv_adjoint", "relu_pool_mask", "max_pool_indices", "relu_mask", "spread_per_channel"}),
    "mobilenet_v3_small": (lambda: _torchvision("mobilenet_v3_small"),
                           {"conv_adjoint", "relu_mask", "hard_swish_steps", "resize_sum_scale", "spread_per_channel"}),
    "efficientnet_b0": (lambda: _torchvision("efficientnet_b0"),
                        {"conv_adjoint", "silu_affine", "resize_sum_scale", "spread_per_channel"}),
    "densenet": (_small_densenet, {"fold_batch_norm", "conv_adjoint", "relu_pool_mask", "relu_mask", "concat_split"}),
}


def test_every_pass_has_a_real_network():
    covered = set().union(*(passes for _, passes in REAL.values()))
    assert covered == set(PASS_NAMES), f"passes without a real network in REAL: {set(PASS_NAMES) - covered}"


@pytest.mark.parametrize("name", list(REAL))
def test_each_pass_finds_its_pattern_in_a_real_network(name):
    """The cpu target of a real network (random weights, 64 x 64, every backprop rule): each pass
    listed for it rewrites at least one region. A pass that matches what a rule emits or publishes
    fails here when the rule's formula changes under it, instead of leaving the portable form."""
    make, expected = REAL[name]
    torch.manual_seed(0)
    net = make().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    _, counts = _build(net, PASS_NAMES, size=(64, 64))
    idle = sorted(p for p in expected if counts[p] == 0)
    assert not idle, f"{name}: {idle} rewrote nothing ({counts})"


def _rule_imports(source: str, package: str) -> list[str]:
    """The modules under ``gradient._rules`` that ``source`` (a module of ``package``) imports,
    at its top or inside a function."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.extend(n for n in names if "gradient._rules" in n)
    return found


def test_lowering_imports_no_rule():
    """The passes read what the rules publish (region parts, gradmap.graph.gradient.formulas), not
    the rules' own modules."""
    from pathlib import Path

    folder = Path(lowering.__file__).parent
    imports = {f.name: _rule_imports(f.read_text(), "gradmap.graph.lowering") for f in sorted(folder.glob("*.py"))}
    assert len(imports) >= 5, sorted(imports)
    assert not any(imports.values()), {name: found for name, found in imports.items() if found}


def test_the_rule_import_check_catches_an_import():
    package = "gradmap.graph.lowering"
    assert _rule_imports("from ..gradient._rules.convolution import adjoint_conv", package)
    assert _rule_imports("def f():\n    from ..gradient._rules import elementwise\n", package)
    assert _rule_imports("import gradmap.graph.gradient._rules.pooling", package)
    assert _rule_imports("from gradmap.graph.gradient import _rules", package)
    assert not _rule_imports("from ..gradient.formulas import HARD_SWISH_ALPHA", package)
