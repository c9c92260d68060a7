"""Gradient rules of InstanceNormalization, GroupNormalization, float Mod, TopK, Col2Im and linear and cubic
Resize against torch autograd."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx_ir")
import torch.nn.functional as F  # noqa: E402

from gradmap.graph.gradient import NON_DIFFERENTIABLE, RULES  # noqa: E402

from _vjp import assert_vjp_matches_torch, onnx_vjp  # noqa: E402

RNG = np.random.default_rng(22)


def randn(*shape, positive=False):
    a = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.5 if positive else a


def init(name, array):
    a = np.asarray(array)
    kind = {np.float32: "float", np.int64: "int64"}[a.dtype.type]
    dims = f"[{','.join(str(d) for d in a.shape)}]" if a.ndim else ""
    values = ",".join(repr(float(v)) if kind == "float" else str(int(v)) for v in a.reshape(-1))
    return f"{kind}{dims} {name} = {{{values}}}"


def graph(inputs, output, body, inits=(), opset=18):
    init_text = f"<{', '.join(inits)}>" if inits else ""
    return (f'<ir_version: {10 if opset > 18 else 8}, opset_import: ["" : {opset}]>\n'
            f"g ({inputs}) => ({output}) {init_text} {{ {body} }}")


def t(a):
    return torch.from_numpy(np.asarray(a))


X = randn(2, 6, 5, 4) * 3 + 1  # a non-zero mean per instance, so the mean's gradient matters
SCALE6, BIAS6 = randn(6), randn(6)
MOD_A = randn(2, 3, 4) * 5

CASES = [
    ("InstanceNormalization", "affine",
     graph("float[2,6,5,4] X", "float[2,6,5,4] Y", "Y = InstanceNormalization<epsilon=0.001>(X, S, B)",
           [init("S", SCALE6), init("B", BIAS6)]),
     lambda X: F.instance_norm(X, weight=t(SCALE6), bias=t(BIAS6), eps=1e-3), X),
    ("InstanceNormalization", "rank3",
     graph("float[2,6,7] X", "float[2,6,7] Y", "Y = InstanceNormalization(X, S, B)",
           [init("S", SCALE6), init("B", BIAS6)]),
     lambda X: F.instance_norm(X, weight=t(SCALE6), bias=t(BIAS6), eps=1e-5), randn(2, 6, 7) * 2 - 1),
    # opset 21: scale and bias per channel (torch's nn.GroupNorm)
    ("GroupNormalization", "opset21-per-channel",
     graph("float[2,6,5,4] X", "float[2,6,5,4] Y", "Y = GroupNormalization<num_groups=3, epsilon=0.0001>(X, S, B)",
           [init("S", SCALE6), init("B", BIAS6)], opset=21),
     lambda X: F.group_norm(X, 3, weight=t(SCALE6), bias=t(BIAS6), eps=1e-4), X),
    ("GroupNormalization", "opset21-one-group",  # PoolFormer's GroupNorm1
     graph("float[2,6,5,4] X", "float[2,6,5,4] Y", "Y = GroupNormalization<num_groups=1>(X, S, B)",
           [init("S", SCALE6), init("B", BIAS6)], opset=21),
     lambda X: F.group_norm(X, 1, weight=t(SCALE6), bias=t(BIAS6), eps=1e-5), X),
    ("Mod", "fmod-dividend",
     graph("float[2,3,4] X", "float[2,3,4] Y", "Y = Mod<fmod=1>(X, B)", [init("B", np.float32(0.7))]),
     lambda X: torch.fmod(X, 0.7), randn(2, 3, 4) * 3),
    ("Mod", "fmod-divisor",  # B depends on X: dB = -dY trunc(A / B), negative quotients included
     graph("float[2,3,4] X", "float[2,3,4] Y", "Y = Mod<fmod=1>(A, X)", [init("A", MOD_A)]),
     lambda X: torch.fmod(t(MOD_A), X), randn(2, 3, 4, positive=True)),
    # torch's fold (MobileViTV2's attention), overlapping blocks summed; strided, padded and dilated
    ("Col2Im", "overlapping",
     graph("float[2,12,16] X", "float[2,3,5,5] Y", "Y = Col2Im(X, S, B)",
           [init("S", np.int64([5, 5])), init("B", np.int64([2, 2]))]),
     lambda X: F.fold(X, (5, 5), (2, 2)), randn(2, 12, 16)),
    ("Col2Im", "stride2-pad1-dilation2",
     graph("float[2,8,12] X", "float[2,2,7,6] Y",
           "Y = Col2Im<strides=[2,2], pads=[1,1,1,1], dilations=[2,2]>(X, S, B)",
           [init("S", np.int64([7, 6])), init("B", np.int64([2, 2]))]),
     lambda X: F.fold(X, (7, 6), (2, 2), dilation=2, padding=1, stride=2), randn(2, 8, 12)),
    # bilinear and bicubic upsampling (timm's CoaT, feature pyramids): torch's modes as exported
    ("Resize", "bilinear-scale2",
     graph("float[2,3,5,4] X", "float[2,3,10,8] Y", 'Y = Resize<mode="linear">(X, , S)',
           [init("S", np.float32([1, 1, 2, 2]))]),
     lambda X: F.interpolate(X, scale_factor=2, mode="bilinear", align_corners=False), randn(2, 3, 5, 4)),
    ("Resize", "bilinear-align-corners-sizes",
     graph("float[2,3,6,5] X", "float[2,3,11,7] Y",
           'Y = Resize<mode="linear", coordinate_transformation_mode="align_corners">(X, , , Z)',
           [init("Z", np.int64([2, 3, 11, 7]))]),
     lambda X: F.interpolate(X, size=(11, 7), mode="bilinear", align_corners=True), randn(2, 3, 6, 5)),
    # sizes computed in the graph (torch's interpolate(size=...) of a dynamic batch: timm's csatv2)
    ("Resize", "bilinear-computed-sizes",
     graph("float[2,3,6,5] X", "float[2,3,11,7] Y",
           'B = Shape<end=2>(X)\n Z = Concat<axis=0>(B, HW)\n Y = Resize<mode="linear">(X, , , Z)',
           [init("HW", np.int64([11, 7]))]),
     lambda X: F.interpolate(X, size=(11, 7), mode="bilinear", align_corners=False), randn(2, 3, 6, 5)),
    ("Resize", "bilinear-scale1.5",
     graph("float[2,3,6,4] X", "float[2,3,9,6] Y", 'Y = Resize<mode="linear">(X, , S)',
           [init("S", np.float32([1, 1, 1.5, 1.5]))]),
     lambda X: F.interpolate(X, scale_factor=1.5, mode="bilinear", align_corners=False,
                             recompute_scale_factor=False), randn(2, 3, 6, 4)),
    ("Resize", "bicubic-downsample",
     graph("float[2,3,9,8] X", "float[2,3,4,5] Y",
           'Y = Resize<mode="cubic", cubic_coeff_a=-0.75, '
           'coordinate_transformation_mode="pytorch_half_pixel">(X, , , Z)',
           [init("Z", np.int64([2, 3, 4, 5]))]),
     lambda X: F.interpolate(X, size=(4, 5), mode="bicubic", align_corners=False), randn(2, 3, 9, 8)),
    ("TopK", "last-axis",
     graph("float[2,3,8] X", "float[2,3,3] Y", "Y, I = TopK<axis=-1>(X, K)", [init("K", np.int64([3]))]),
     lambda X: torch.topk(X, 3, dim=-1).values, randn(2, 3, 8)),
    ("TopK", "smallest-axis1",
     graph("float[2,5,4] X", "float[2,2,4] Y", "Y, I = TopK<axis=1, largest=0>(X, K)", [init("K", np.int64([2]))]),
     lambda X: torch.topk(X, 2, dim=1, largest=False).values, randn(2, 5, 4)),
]

#: op types this file tests (tests/test_rules.py's completeness check counts them)
TESTED_OPS = frozenset(c[0] for c in CASES)


@pytest.mark.parametrize("op,text,fn,x", [(c[0], c[2], c[3], c[4]) for c in CASES],
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_rule_matches_torch_autograd(op, text, fn, x):
    assert op in RULES, f"{op} has no gradient rule"
    assert_vjp_matches_torch(text, fn, {"X": x}, wrt="X", rtol=1e-5, atol=1e-5)


def test_mod_mixed_signs_and_broadcast_divisor():
    """fmod takes the dividend's sign; the gradient of a broadcast divisor is summed back."""
    a = np.float32([[-5.5, 5.5, -0.3, 2.0], [7.25, -7.25, 0.9, -3.1]])
    b = np.float32([[1.5], [-2.0]])
    text = graph("float[2,1] X", "float[2,4] Y", "Y = Mod<fmod=1>(A, X)", [init("A", a)])
    assert_vjp_matches_torch(text, lambda X: torch.fmod(t(a), X), {"X": b}, wrt="X", rtol=1e-6, atol=1e-6)


def test_integer_mod_carries_no_gradient():
    """An integer Mod on the way (index arithmetic) is not on the gradient's path."""
    text = graph("float[2,4] X", "float[2,4] Y",
                 "S = Shape(X)\n M = Mod(S, D)\n F = Cast<to=1>(M)\n R = ReduceSum(F)\n Y = Mul(X, R)",
                 [init("D", np.int64([3]))])
    x = randn(2, 4)
    _, dy, dx = onnx_vjp(text, {"X": x}, "X")
    np.testing.assert_allclose(dx, dy * float((2 % 3) + (4 % 3)), rtol=1e-6)


def test_float_mod_without_fmod_is_refused():
    import onnx
    import onnx_ir as ir

    from gradmap.export import ExportError
    from gradmap.graph.gradient import append_vjp

    # fmod=0 on floats is invalid ONNX; built by hand, it must be refused, not differentiated as fmod
    text = graph("float[2,3] X", "float[2,3] Y", "Y = Mod(X, B)", [init("B", np.float32(0.5))])
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    with pytest.raises(ExportError, match="fmod=1"):
        append_vjp(model, model.graph.inputs[0], model.graph.outputs[0])


def test_registry_has_no_pseudo_ops_and_mod_is_differentiable():
    from onnx import defs

    assert "Mod" in RULES and "Mod" not in NON_DIFFERENTIABLE
    assert "TopK" in RULES
    not_onnx = sorted(op for op in NON_DIFFERENTIABLE | set(RULES) if not defs.has(op))
    assert not not_onnx, f"not ONNX operators: {not_onnx}"


def test_group_normalization_before_opset_21_is_refused_by_name():
    import onnx
    import onnx_ir as ir

    from gradmap.export import ExportError
    from gradmap.graph.gradient import append_vjp

    text = graph("float[2,6,5,4] X", "float[2,6,5,4] Y", "Y = GroupNormalization<num_groups=3>(X, S, B)",
                 [init("S", np.ones(3, np.float32)), init("B", np.zeros(3, np.float32))])
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    with pytest.raises(ExportError, match="before opset 21.*--opset 21"):
        append_vjp(model, model.graph.inputs[0], model.graph.outputs[0])
