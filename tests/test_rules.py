"""Every gradient rule on single-op graphs, with its attribute variants, against torch autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx_ir")
import torch.nn.functional as F  # noqa: E402

from gradmap.export import UnsupportedOpsError  # noqa: E402
from gradmap.graph.gradient import NON_DIFFERENTIABLE, RULES  # noqa: E402

from _vjp import assert_vjp_matches_torch, onnx_vjp  # noqa: E402

HEADER = '<ir_version: 8, opset_import: ["" : 18]>\n'
RNG = np.random.default_rng(0)


def randn(*shape, positive=False):
    a = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.5 if positive else a


def t(array):
    return torch.from_numpy(np.asarray(array))


def init(name, array):
    """ONNX text for an initializer holding ``array``."""
    a = np.asarray(array)
    kind = {np.float32: "float", np.int64: "int64"}[a.dtype.type]
    dims = f"[{','.join(str(d) for d in a.shape)}]" if a.ndim else ""
    values = ",".join(repr(float(v)) if kind == "float" else str(int(v)) for v in a.reshape(-1))
    return f"{kind}{dims} {name} = {{{values}}}"


def graph(inputs: str, output: str, body: str, inits: list[str] | None = None) -> str:
    init_text = f"<{', '.join(inits)}>" if inits else ""
    return HEADER + f"g ({inputs}) => ({output}) {init_text} {{ {body} }}"


CASES: list[tuple[str, str, str, object, dict]] = []  # (op, id, text, torch_fn, inputs)


def case(op: str, id_: str, text: str, fn, **inputs):
    if list(inputs) == ["X"]:
        fn = (lambda f: lambda X: f(X))(fn)  # torch functions take positional tensors
    CASES.append((op, f"{op}-{id_}", text, fn, inputs))


X4 = randn(2, 3, 8, 8)
X4_SIG = "float[2,3,8,8] X"

# -- elementwise -----------------------------------------------------------------------------------
B_CH = randn(1, 3, 1, 1)
B_POS = randn(3, 1, 1, positive=True)
case("Identity", "plain", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Identity(X)"), lambda X: X * 1, X=X4)
case("Dropout", "inference", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Dropout(X)"), lambda X: X * 1, X=X4)
case("Add", "broadcast-rhs", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Add(X, B)", [init("B", B_CH)]),
     lambda X: X + t(B_CH), X=X4)
case("Add", "same-input-twice", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Add(X, X)"), lambda X: X + X, X=X4)
case("Add", "broadcast-lhs-wrt", graph("float[3,1,8] X, float[2,3,4,8] Z", "float[2,3,4,8] Y", "Y = Add(X, Z)"),
     lambda X, Z: X + Z, X=randn(3, 1, 8), Z=randn(2, 3, 4, 8))
case("Sum", "three", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Sum(X, B, X)", [init("B", B_CH)]),
     lambda X: X + t(B_CH) + X, X=X4)
case("Sub", "rhs", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Sub(B, X)", [init("B", B_CH)]),
     lambda X: t(B_CH) - X, X=X4)
case("Sub", "lhs", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Sub(X, B)", [init("B", B_CH)]),
     lambda X: X - t(B_CH), X=X4)
case("Mul", "broadcast", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Mul(X, B)", [init("B", B_CH)]),
     lambda X: X * t(B_CH), X=X4)
case("Mul", "square", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Mul(X, X)"), lambda X: X * X, X=X4)
case("Mul", "wrt-broadcast-operand", graph("float[3,1,1] X, float[2,3,8,8] Z", "float[2,3,8,8] Y", "Y = Mul(Z, X)"),
     lambda X, Z: Z * X, X=randn(3, 1, 1), Z=randn(2, 3, 8, 8))
case("Div", "numerator", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Div(X, B)", [init("B", B_POS)]),
     lambda X: X / t(B_POS), X=X4)
case("Div", "denominator", graph("float[3,1,1] X, float[2,3,8,8] Z", "float[2,3,8,8] Y", "Y = Div(Z, X)"),
     lambda X, Z: Z / X, X=randn(3, 1, 1, positive=True), Z=randn(2, 3, 8, 8))
case("Neg", "plain", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Neg(X)"), lambda X: -X, X=X4)
case("Pow", "square", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Pow(X, P)", [init("P", np.float32([2.0]))]),
     lambda X: X ** 2, X=X4)
case("Pow", "fractional", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Pow(X, P)", [init("P", np.float32([1.5]))]),
     lambda X: X ** 1.5, X=np.abs(X4) + 0.1)
case("Pow", "exponent", graph("float[2,3] X", "float[2,3] Y", "Y = Pow(B, X)", [init("B", randn(2, 3, positive=True))]),
     lambda X: torch.pow(t(B_POW), X), X=randn(2, 3))
B_POW = np.asarray(  # the same base as in the initializer above, read back from the case text
    [float(v) for v in CASES[-1][2].split("{", 2)[1].split("}")[0].split(",")], dtype=np.float32).reshape(2, 3)
case("Sqrt", "plain", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Sqrt(X)"), torch.sqrt, X=np.abs(X4) + 0.1)
case("Reciprocal", "plain", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Reciprocal(X)"), torch.reciprocal,
     X=np.abs(X4) + 0.5)
case("Exp", "plain", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Exp(X)"), torch.exp, X=X4)
case("Log", "plain", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Log(X)"), torch.log, X=np.abs(X4) + 0.1)
case("Abs", "plain", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Abs(X)"), torch.abs, X=X4)
case("Relu", "plain", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Relu(X)"), F.relu, X=X4)
case("Relu", "zeros", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Relu(X)"), F.relu, X=np.where(X4 > 0.5, X4, 0).astype(np.float32))
# 16 channels: the mask is a depthwise Conv + steep HardSigmoid; exact on zeros, -0, subnormals and overflow
X16 = randn(2, 16, 4, 4)
X16.reshape(-1)[:8] = [0.0, -0.0, 1e-45, 1e-40, 1.2e-38, 3e38, -1e-45, 2.0 ** -22]
case("Relu", "blocked-channels-extremes", graph("float[2,16,4,4] X", "float[2,16,4,4] Y", "Y = Relu(X)"), F.relu,
     X=X16)
case("LeakyRelu", "alpha", graph(X4_SIG, "float[2,3,8,8] Y", "Y = LeakyRelu<alpha=0.2>(X)"),
     lambda X: F.leaky_relu(X, 0.2), X=X4)
case("Sigmoid", "plain", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Sigmoid(X)"), torch.sigmoid, X=X4)
# Mul(X, Sigmoid(X)) is SiLU: one rule for both nodes when the Sigmoid feeds only that Mul
case("Mul", "silu", graph(X4_SIG, "float[2,3,8,8] Y", "S = Sigmoid(X)\n Y = Mul(X, S)"), F.silu, X=X4 * 3)
case("Mul", "silu-sigmoid-first", graph(X4_SIG, "float[2,3,8,8] Y", "S = Sigmoid(X)\n Y = Mul(S, X)"), F.silu, X=X4 * 3)
# 16 channels: 1 - Y is a depthwise 1x1 Conv (the blocked-layout form)
case("Mul", "silu-blocked-channels", graph("float[2,16,4,4] X", "float[2,16,4,4] Y", "S = Sigmoid(X)\n Y = Mul(X, S)"),
     F.silu, X=randn(2, 16, 4, 4) * 3)
case("Mul", "silu-sigmoid-shared", graph(X4_SIG, "float[2,3,8,8] Y", "S = Sigmoid(X)\n P = Mul(X, S)\n Y = Add(P, S)"),
     lambda X: F.silu(X) + torch.sigmoid(X), X=X4 * 3)
case("Mul", "sigmoid-of-other", graph(X4_SIG + ", float[2,3,8,8] B", "float[2,3,8,8] Y", "S = Sigmoid(B)\n Y = Mul(X, S)"),
     lambda X, B: X * torch.sigmoid(B), X=X4, B=randn(2, 3, 8, 8))
case("Tanh", "plain", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Tanh(X)"), torch.tanh, X=X4)
case("Erf", "plain", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Erf(X)"), torch.erf, X=X4)
HEADER20 = HEADER.replace('"" : 18', '"" : 20')
# torch's exported exact GELU, matched as one pattern by the Mul rule (operand orders swapped, Mul by
# 1/sqrt(2)); with an intermediate used elsewhere the five nodes' own rules apply
GELU_CONSTS = [init("R", np.float32(math.sqrt(2.0))), init("Q", np.float32(1 / math.sqrt(2.0))),
               init("O", np.float32(1.0)), init("H", np.float32(0.5))]
case("Mul", "exported-gelu", graph(X4_SIG, "float[2,3,8,8] Y",
                                   "D = Div(X, R)\n E = Erf(D)\n A = Add(E, O)\n P = Mul(H, A)\n Y = Mul(X, P)", GELU_CONSTS),
     lambda X: F.gelu(X), X=X4 * 2)
case("Mul", "exported-gelu-swapped", graph(X4_SIG, "float[2,3,8,8] Y",
                                           "D = Mul(X, Q)\n E = Erf(D)\n A = Add(O, E)\n P = Mul(A, H)\n Y = Mul(P, X)",
                                           GELU_CONSTS),
     lambda X: F.gelu(X), X=X4 * 2)
case("Mul", "exported-gelu-erf-reused", graph(X4_SIG, "float[2,3,8,8] Y",
                                              "D = Div(X, R)\n E = Erf(D)\n A = Add(E, O)\n P = Mul(H, A)\n G = Mul(X, P)\n"
                                              " Y = Add(G, E)", GELU_CONSTS),
     lambda X: F.gelu(X) + torch.erf(X / math.sqrt(2.0)), X=X4 * 2)
case("Gelu", "exact", HEADER20 + f"g ({X4_SIG}) => (float[2,3,8,8] Y) {{ Y = Gelu(X) }}", F.gelu, X=X4 * 2)
case("Gelu", "tanh", HEADER20 + f"g ({X4_SIG}) => (float[2,3,8,8] Y) {{ Y = Gelu<approximate=\"tanh\">(X) }}",
     lambda X: F.gelu(X, approximate="tanh"), X=X4 * 2)
case("HardSigmoid", "torch", graph(X4_SIG, "float[2,3,8,8] Y", "Y = HardSigmoid<alpha=0.16666667, beta=0.5>(X)"),
     F.hardsigmoid, X=X4 * 4)
case("HardSwish", "plain", graph(X4_SIG, "float[2,3,8,8] Y", "Y = HardSwish(X)"), F.hardswish, X=X4 * 4)
# the gradient's steps at -3 and 3 (both sides inclusive in torch), their float neighbours, the
# kink of the ramp, and values whose 2^100-fold overflows float32 (to an infinite affine part)
HS_EDGES = np.array([-3.0, 3.0, -1.5, 0.0, 1e30, -1e30], dtype=np.float32)
HS_EDGES = np.concatenate([HS_EDGES, np.nextafter(HS_EDGES[:2], np.float32(np.inf)),
                           np.nextafter(HS_EDGES[:2], np.float32(-np.inf))])
HS_X = (X4 * 4).reshape(-1).copy()
HS_X[:HS_EDGES.size] = HS_EDGES
case("HardSwish", "steps-and-overflow", graph(X4_SIG, "float[2,3,8,8] Y", "Y = HardSwish(X)"), F.hardswish,
     X=HS_X.reshape(X4.shape))
# 16 channels: the half steps are a depthwise 1x1 Conv (the blocked-layout form); same edges
HS_X16 = (randn(2, 16, 4, 4) * 4).reshape(-1)
HS_X16[:HS_EDGES.size] = HS_EDGES
case("HardSwish", "blocked-channels-steps", graph("float[2,16,4,4] X", "float[2,16,4,4] Y", "Y = HardSwish(X)"),
     F.hardswish, X=HS_X16.reshape(2, 16, 4, 4))
# X also read by another node (as in a gradient graph, which reads it); plain NCHW and blocked. The
# Mul rule's pattern for the split form append_gradient makes of it (test_layout.py) by hand:
for name, shape, x in [("shared-input", "2,3,8,8", HS_X.reshape(X4.shape)),
                       ("shared-input-blocked", "2,16,4,4", HS_X16.reshape(2, 16, 4, 4))]:
    case("HardSwish", name, graph(f"float[{shape}] X", f"float[{shape}] Y", "H = HardSwish(X)\n Y = Mul(H, X)"),
         lambda X: F.hardswish(X) * X, X=x)
case("Mul", "hardswish-by-hand", graph("float[2,16,4,4] X", "float[2,16,4,4] Y",
                                       "H = HardSigmoid<alpha=0.16666667, beta=0.5>(X)\n Y = Mul(X, H)"),
     F.hardswish, X=HS_X16.reshape(2, 16, 4, 4))
case("Clip", "relu6", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Clip(X, L, H)",
                            [init("L", np.float32(0)), init("H", np.float32(6))]),
     lambda X: F.relu6(X), X=X4 * 5)
case("Clip", "min-only", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Clip(X, L)", [init("L", np.float32(-0.5))]),
     lambda X: torch.clamp(X, min=-0.5), X=X4)
case("Max", "broadcast", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Max(X, B)", [init("B", B_CH)]),
     lambda X: torch.maximum(X, t(B_CH)), X=X4)
case("Min", "two-inputs", graph(X4_SIG, "float[2,3,8,8] Y", "Y = Min(X, B)", [init("B", B_CH)]),
     lambda X: torch.minimum(X, t(B_CH)), X=X4)
COND = (randn(1, 3, 8, 8) > 0)
case("Where", "both-branches", graph(X4_SIG + ", bool[1,3,8,8] C", "float[2,3,8,8] Y", "N = Neg(X)\n Y = Where(C, X, N)"),
     lambda X, C: torch.where(C, X, -X), X=X4, C=COND)
case("Where", "scalar-branch", graph(X4_SIG + ", bool[1,3,8,8] C", "float[2,3,8,8] Y", "Y = Where(C, Z, X)",
                                     [init("Z", np.float32(0))]),
     lambda X, C: torch.where(C, torch.tensor(0.0), X), X=X4, C=COND)
case("Cast", "float-to-double-and-back", graph(X4_SIG, "float[2,3,8,8] Y", "D = Cast<to=11>(X)\n E = Mul(D, D)\n Y = Cast<to=1>(E)"),
     lambda X: (X.double() * X.double()).float(), X=X4)

# -- linear ----------------------------------------------------------------------------------------
W = randn(5, 12)
case("MatMul", "2d-weight", graph("float[4,12] X", "float[4,5] Y", "Y = MatMul(X, WT)", [init("WT", W.T.copy())]),
     lambda X: X @ t(W.T.copy()), X=randn(4, 12))
case("MatMul", "batched-broadcast", graph("float[2,3,4,6] X", "float[2,3,4,5] Y", "Y = MatMul(X, M)",
                                          [init("M", randn(3, 6, 5))]),
     lambda X: X @ t(M3), X=randn(2, 3, 4, 6))
M3 = np.asarray([float(v) for v in CASES[-1][2].split("{", 2)[1].split("}")[0].split(",")], dtype=np.float32).reshape(3, 6, 5)
case("MatMul", "both-depend", graph("float[2,3,4,6] X", "float[2,3,4,4] Y", "T = Transpose<perm=[0,1,3,2]>(X)\n Y = MatMul(X, T)"),
     lambda X: X @ X.transpose(-1, -2), X=randn(2, 3, 4, 6))
case("MatMul", "rhs-broadcast-wrt", graph("float[6,5] X, float[2,3,4,6] Z", "float[2,3,4,5] Y", "Y = MatMul(Z, X)"),
     lambda X, Z: Z @ X, X=randn(6, 5), Z=randn(2, 3, 4, 6))
BIAS = randn(5)
case("Gemm", "transB", graph("float[4,12] X", "float[4,5] Y", "Y = Gemm<transB=1>(X, W, B)", [init("W", W), init("B", BIAS)]),
     lambda X: F.linear(X, t(W), t(BIAS)), X=randn(4, 12))
case("Gemm", "alpha-beta", graph("float[4,12] X", "float[4,5] Y", "Y = Gemm<alpha=0.5, beta=2.0>(X, WT, B)",
                                 [init("WT", W.T.copy()), init("B", BIAS)]),
     lambda X: 0.5 * X @ t(W.T.copy()) + 2 * t(BIAS), X=randn(4, 12))
case("Gemm", "transA", graph("float[12,4] X", "float[4,5] Y", "Y = Gemm<transA=1, transB=1>(X, W)", [init("W", W)]),
     lambda X: X.T @ t(W).T, X=randn(12, 4))
case("Gemm", "wrt-B", graph("float[12,5] X", "float[4,5] Y", "Y = Gemm(A, X)", [init("A", randn(4, 12))]),
     lambda X: t(GEMM_A) @ X, X=randn(12, 5))
GEMM_A = np.asarray([float(v) for v in CASES[-1][2].split("{", 2)[1].split("}")[0].split(",")], dtype=np.float32).reshape(4, 12)
case("Gemm", "wrt-B-transposed", graph("float[5,12] X", "float[4,5] Y", "Y = Gemm<transB=1>(A, X)", [init("A", GEMM_A)]),
     lambda X: t(GEMM_A) @ X.T, X=randn(5, 12))
case("Einsum", "attention-scores", graph("float[2,3,4,8] X", "float[2,3,4,4] Y", "Y = Einsum<equation=\"bhid,bhjd->bhij\">(X, X)"),
     lambda X: torch.einsum("bhid,bhjd->bhij", X, X), X=randn(2, 3, 4, 8))
case("Einsum", "weight", graph("float[2,4,8] X", "float[2,4,5] Y", "Y = Einsum<equation=\"bid,de->bie\">(X, E)",
                               [init("E", randn(8, 5))]),
     lambda X: torch.einsum("bid,de->bie", X, t(EIN_E)), X=randn(2, 4, 8))
EIN_E = np.asarray([float(v) for v in CASES[-1][2].split("{", 2)[1].split("}")[0].split(",")], dtype=np.float32).reshape(8, 5)

# -- convolution -----------------------------------------------------------------------------------
def conv_case(id_, cin, cout, k, stride, pad, dil, groups, size=9):
    w = randn(cout, cin // groups, k, k)
    x = randn(2, cin, size, size)
    out = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
    text = graph(f"float[2,{cin},{size},{size}] X", f"float[2,{cout},{out},{out}] Y",
                 f"Y = Conv<strides=[{stride},{stride}], pads=[{pad},{pad},{pad},{pad}], dilations=[{dil},{dil}], group={groups}, kernel_shape=[{k},{k}]>(X, W, B)",
                 [init("W", w), init("B", randn(cout))])
    b = np.asarray([float(v) for v in text.split("B = {")[1].split("}")[0].split(",")], dtype=np.float32)
    case("Conv", id_, text, lambda X: F.conv2d(X, t(w), t(b), stride, pad, dil, groups), X=x)


def conv_transpose_case(id_, cin, cout, k, stride, pad, dil, groups, out_pad=0, size=5):
    w = randn(cin, cout // groups, k, k)
    out = (size - 1) * stride - 2 * pad + dil * (k - 1) + out_pad + 1
    text = graph(f"float[2,{cin},{size},{size}] X", f"float[2,{cout},{out},{out}] Y",
                 f"Y = ConvTranspose<strides=[{stride},{stride}], pads=[{pad},{pad},{pad},{pad}], "
                 f"dilations=[{dil},{dil}], group={groups}, kernel_shape=[{k},{k}], "
                 f"output_padding=[{out_pad},{out_pad}]>(X, W, B)",
                 [init("W", w), init("B", randn(cout))])
    b = np.asarray([float(v) for v in text.split("B = {")[1].split("}")[0].split(",")], dtype=np.float32)
    case("ConvTranspose", id_, text,
         lambda X: F.conv_transpose2d(X, t(w), t(b), stride, pad, out_pad, groups, dil), X=randn(2, cin, size, size))


conv_transpose_case("plain", 3, 4, 3, 1, 1, 1, 1)
conv_transpose_case("stride2-output-padding", 4, 6, 3, 2, 1, 1, 1, out_pad=1)
conv_transpose_case("2x2-stride2", 4, 4, 2, 2, 0, 1, 1)
conv_transpose_case("grouped-dilated", 4, 6, 3, 2, 2, 2, 2, out_pad=1)
conv_transpose_case("depthwise", 4, 4, 3, 1, 1, 1, 4)


conv_case("plain", 3, 4, 3, 1, 1, 1, 1)
conv_case("stride2-drops-row", 3, 4, 3, 2, 1, 1, 1, size=10)
conv_case("stride2-odd", 3, 4, 3, 2, 1, 1, 1, size=9)
conv_case("7x7-stride2-pad3", 3, 4, 7, 2, 3, 1, 1, size=16)
conv_case("dilation2", 3, 4, 3, 1, 2, 2, 1)
conv_case("groups", 4, 6, 3, 1, 1, 1, 2)
conv_case("depthwise-stride2", 4, 4, 3, 2, 1, 1, 4)
conv_case("1x1-stride2", 4, 8, 1, 2, 0, 1, 1, size=8)
conv_case("patchify", 3, 4, 4, 4, 0, 1, 1, size=16)
conv_case("patchify-drops-rows", 3, 4, 4, 4, 0, 1, 1, size=18)
conv_case("2x2-stride3-padded", 3, 5, 2, 3, 1, 1, 1, size=11)
conv_case("1x1-stride2-odd", 4, 8, 1, 2, 0, 1, 1, size=9)
conv_case("pad-past-kernel", 3, 4, 1, 1, 1, 1, 1, size=6)
conv_case("depthwise-stride2-even", 4, 4, 3, 2, 1, 1, 4, size=10)
conv_case("depthwise-5x5-stride2-pad2", 6, 6, 5, 2, 2, 1, 6, size=9)
conv_case("depthwise-5x5-stride2-pad2-even", 6, 6, 5, 2, 2, 1, 6, size=10)
conv_case("depthwise-dilated", 4, 4, 3, 1, 2, 2, 4)
conv_case("depthwise-stride2-no-pad", 4, 4, 3, 2, 0, 1, 4, size=10)
conv_case("depthwise-stride3", 4, 4, 3, 3, 1, 1, 4, size=11)
conv_case("depthwise-multiplier", 3, 6, 3, 1, 1, 1, 3)
conv_case("large-pad-falls-back", 3, 4, 3, 1, 3, 1, 1)
conv_case("3x3-stride2-no-pad", 3, 5, 3, 2, 0, 1, 1, size=11)
conv_case("5x5-stride3-pad2", 3, 4, 5, 3, 2, 1, 1, size=13)
conv_case("groups-stride2", 4, 6, 3, 2, 1, 1, 2, size=10)
conv_case("2x2-stride2-downsample", 3, 4, 2, 2, 0, 1, 1, size=9)
conv_case("1x1-stride2-odd", 4, 8, 1, 2, 0, 1, 1, size=9)
conv_case("dilated-stride2-falls-back", 3, 4, 3, 2, 2, 2, 1, size=10)
# 16 input channels: the transposed convolution's result enters the blocked layout by a depthwise identity
conv_case("blocked-3x3-stride2", 16, 32, 3, 2, 1, 1, 1, size=9)
conv_case("blocked-1x1-stride2", 16, 32, 1, 2, 0, 1, 1, size=8)


# -- pooling and reductions ------------------------------------------------------------------------
def pool_size(size, k, s, p, ceil):
    out = (size + 2 * p - k + ((s - 1) if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


for k, s, p, ceil in [(3, 2, 1, 0), (3, 2, 0, 1), (2, 2, 0, 0), (3, 1, 1, 0), (3, 2, 1, 1)]:
    o = pool_size(9, k, s, p, ceil)
    case("MaxPool", f"k{k}s{s}p{p}ceil{ceil}",
         graph("float[2,3,9,9] X", f"float[2,3,{o},{o}] Y",
               f"Y = MaxPool<kernel_shape=[{k},{k}], strides=[{s},{s}], pads=[{p},{p},{p},{p}], ceil_mode={ceil}>(X)"),
         lambda X, k=k, s=s, p=p, ceil=ceil: F.max_pool2d(X, k, s, p, ceil_mode=bool(ceil)), X=randn(2, 3, 9, 9))
case("MaxPool", "blocked-channels",
     graph("float[2,16,9,9] X", "float[2,16,5,5] Y", "Y = MaxPool<kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1]>(X)"),
     lambda X: F.max_pool2d(X, 3, 2, 1), X=randn(2, 16, 9, 9))
# disjoint windows take the MaxUnpool path; integer-valued inputs tie inside windows (the first wins)
TIED_X = np.round(randn(2, 16, 9, 9) * 1.5).astype(np.float32)
for k, s, p, ceil in [(2, 2, 0, 0), (2, 3, 1, 1), (3, 3, 0, 1)]:
    o = pool_size(9, k, s, p, ceil)
    case("MaxPool", f"disjoint-ties-k{k}s{s}p{p}ceil{ceil}",
         graph("float[2,16,9,9] X", f"float[2,16,{o},{o}] Y",
               f"Y = MaxPool<kernel_shape=[{k},{k}], strides=[{s},{s}], pads=[{p},{p},{p},{p}], ceil_mode={ceil}>(X)"),
         lambda X, k=k, s=s, p=p, ceil=ceil: F.max_pool2d(X, k, s, p, ceil_mode=bool(ceil)), X=TIED_X)
RELU_X = np.maximum(randn(2, 3, 9, 9), 0).astype(np.float32)
case("MaxPool", "after-relu-ties",
     graph("float[2,3,9,9] X", "float[2,3,5,5] Y",
           "R = Relu(X)\n Y = MaxPool<kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1]>(R)"),
     lambda X: F.max_pool2d(F.relu(X), 3, 2, 1), X=RELU_X - 0.5)
for k, s, p, ceil, cip in [(3, 1, 1, 0, 1), (2, 2, 0, 0, 0), (3, 2, 1, 1, 1), (3, 2, 1, 1, 0), (3, 2, 0, 1, 1), (3, 1, 1, 0, 0)]:
    o = pool_size(9, k, s, p, ceil)
    case("AveragePool", f"k{k}s{s}p{p}ceil{ceil}pad{cip}",
         graph("float[2,3,9,9] X", f"float[2,3,{o},{o}] Y",
               f"Y = AveragePool<kernel_shape=[{k},{k}], strides=[{s},{s}], pads=[{p},{p},{p},{p}], ceil_mode={ceil}, count_include_pad={cip}>(X)"),
         lambda X, k=k, s=s, p=p, ceil=ceil, cip=cip: F.avg_pool2d(X, k, s, p, ceil_mode=bool(ceil), count_include_pad=bool(cip)),
         X=randn(2, 3, 9, 9))
# one window over everything (Hugging Face's EfficientNet: AvgPool2d(2560, ceil_mode=True) on a 7x7 map)
case("AveragePool", "kernel-past-input-ceil",
     graph("float[2,3,7,7] X", "float[2,3,1,1] Y",
           "Y = AveragePool<kernel_shape=[2560,2560], strides=[2560,2560], ceil_mode=1>(X)"),
     lambda X: F.avg_pool2d(X, 2560, ceil_mode=True), X=randn(2, 3, 7, 7))
case("GlobalAveragePool", "plain", graph(X4_SIG, "float[2,3,1,1] Y", "Y = GlobalAveragePool(X)"),
     lambda X: F.adaptive_avg_pool2d(X, 1), X=X4)
for keep in (0, 1):
    shape = "2,3,1,1" if keep else "2,3"
    case("ReduceMean", f"spatial-keepdims{keep}",
         graph(X4_SIG, f"float[{shape}] Y", f"Y = ReduceMean<keepdims={keep}>(X, A)", [init("A", np.int64([2, 3]))]),
         lambda X, keep=keep: X.mean(dim=(2, 3), keepdim=bool(keep)), X=X4)
    case("ReduceSum", f"channels-keepdims{keep}",
         graph(X4_SIG, f"float[{'2,1,8,8' if keep else '2,8,8'}] Y", f"Y = ReduceSum<keepdims={keep}>(X, A)",
               [init("A", np.int64([1]))]),
         lambda X, keep=keep: X.sum(dim=1, keepdim=bool(keep)), X=X4)
# 16 channels: a per-channel gradient is spread by a depthwise all-ones Conv instead of an Expand
X16_RECT = randn(2, 16, 5, 7)
case("GlobalAveragePool", "blocked-channels", graph("float[2,16,5,7] X", "float[2,16,1,1] Y", "Y = GlobalAveragePool(X)"),
     lambda X: F.adaptive_avg_pool2d(X, 1), X=X16_RECT)
case("ReduceMean", "blocked-channels-keepdims0",
     graph("float[2,16,5,7] X", "float[2,16] Y", "Y = ReduceMean<keepdims=0>(X, A)", [init("A", np.int64([-1, 2]))]),
     lambda X: X.mean(dim=(2, 3)), X=X16_RECT)
case("ReduceSum", "blocked-channels-two-consumers",
     graph("float[2,16,5,7] X", "float[2,16,1,1] Y", "M = ReduceMean(X, A)\n S = ReduceSum(X, A)\n Y = Mul(M, S)",
           [init("A", np.int64([2, 3]))]),
     lambda X: X.mean(dim=(2, 3), keepdim=True) * X.sum(dim=(2, 3), keepdim=True), X=X16_RECT)
# nearest Resize with integer scales (gradmap's own spread of squeeze-and-excitation scales)
case("Resize", "nearest-from-1x1-blocked",
     graph("float[2,16,1,1] X", "float[2,16,5,7] Y",
           'Y = Resize<mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor">(X, , S)',
           [init("S", np.float32([1, 1, 5, 7]))]),
     lambda X: F.interpolate(X, size=(5, 7), mode="nearest"), X=randn(2, 16, 1, 1))
case("Resize", "nearest-x2x3-default-coordinates",
     graph("float[2,3,3,4] X", "float[2,3,6,12] Y", 'Y = Resize<mode="nearest">(X, , S)',
           [init("S", np.float32([1, 1, 2, 3]))]),
     lambda X: F.interpolate(X, scale_factor=(2, 3), mode="nearest"), X=randn(2, 3, 3, 4))
case("Resize", "nearest-x2-blocked",
     graph("float[2,16,3,4] X", "float[2,16,6,8] Y",
           'Y = Resize<mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor">(X, , S)',
           [init("S", np.float32([1, 1, 2, 2]))]),
     lambda X: F.interpolate(X, scale_factor=2, mode="nearest"), X=randn(2, 16, 3, 4))
# a per-channel gradient added to a full one of a 16-channel map: spread by a Resize, then a same-shape Add
case("GlobalAveragePool", "blocked-plus-input",
     graph("float[2,16,5,7] X", "float[2,16,5,7] Y", "M = GlobalAveragePool(X)\n Y = Mul(X, M)"),
     lambda X: X * F.adaptive_avg_pool2d(X, 1), X=X16_RECT)
case("ReduceMean", "negative-axis", graph(X4_SIG, "float[2,3,8,1] Y", "Y = ReduceMean(X, A)", [init("A", np.int64([-1]))]),
     lambda X: X.mean(dim=-1, keepdim=True), X=X4)
# deferred Expand: the reduction's gradient is added to X's other gradient by a broadcasting Add,
# and expanded when it is X's whole gradient (the single-op cases above)
case("ReduceMean", "squeeze-excitation",
     graph(X4_SIG, "float[2,3,8,8] Y", "M = ReduceMean(X, A)\n S = Sigmoid(M)\n Y = Mul(X, S)",
           [init("A", np.int64([2, 3]))]),
     lambda X: X * torch.sigmoid(X.mean(dim=(2, 3), keepdim=True)), X=X4)
case("GlobalAveragePool", "plus-input", graph(X4_SIG, "float[2,3,8,8] Y", "M = GlobalAveragePool(X)\n Y = Add(X, M)"),
     lambda X: X + F.adaptive_avg_pool2d(X, 1), X=X4)
case("ReduceSum", "two-reductions-then-input",
     graph(X4_SIG, "float[2,3,8,8] Y",
           "C = ReduceSum(X, A1)\n H = ReduceSum<keepdims=1>(X, A2)\n Z = Add(C, H)\n Y = Mul(X, Z)",
           [init("A1", np.int64([1])), init("A2", np.int64([2, 3]))]),
     lambda X: X * (X.sum(dim=1, keepdim=True) + X.sum(dim=(2, 3), keepdim=True)), X=X4)
case("ReduceMean", "two-reductions-only",
     graph(X4_SIG, "float[2,1,1,1] Y", "M = ReduceMean(X, A1)\n N = ReduceMean(X, A2)\n Z = Mul(M, N)\n"
           " Y = ReduceMean(Z, A3)",
           [init("A1", np.int64([1])), init("A2", np.int64([2, 3])), init("A3", np.int64([1, 2, 3]))]),
     lambda X: (X.mean(dim=1, keepdim=True) * X.mean(dim=(2, 3), keepdim=True)).mean(dim=(1, 2, 3), keepdim=True),
     X=X4)
case("ReduceMax", "channels", graph(X4_SIG, "float[2,8,8] Y", "Y = ReduceMax<keepdims=0>(X, A)", [init("A", np.int64([1]))]),
     lambda X: X.amax(dim=1), X=X4)
case("ReduceMax", "ties", graph("float[2,4] X", "float[2,1] Y", "Y = ReduceMax(X, A)", [init("A", np.int64([1]))]),
     lambda X: X.amax(dim=1, keepdim=True), X=np.float32([[1, 3, 3, 0], [2, 2, 2, 2]]))

case("ReduceL2", "last-axis-keepdims", graph("float[2,3,8] X", "float[2,3,1] Y", "Y = ReduceL2(X, A)", [init("A", np.int64([-1]))]),
     lambda X: torch.linalg.vector_norm(X, dim=-1, keepdim=True), X=randn(2, 3, 8))
case("ReduceL2", "zero-slice", graph("float[2,4] X", "float[2] Y", "Y = ReduceL2<keepdims=0>(X, A)", [init("A", np.int64([1]))]),
     lambda X: torch.linalg.vector_norm(X, dim=1), X=np.float32([[0, 0, 0, 0], [1, -2, 3, 0.5]]))

# -- normalization ---------------------------------------------------------------------------------
BN = [randn(3), randn(3), randn(3), randn(3, positive=True)]
case("BatchNormalization", "inference",
     graph(X4_SIG, "float[2,3,8,8] Y", "Y = BatchNormalization<epsilon=0.001>(X, S, B, M, V)",
           [init(n, a) for n, a in zip("SBMV", BN)]),
     lambda X: F.batch_norm(X, t(BN[2]), t(BN[3]), t(BN[0]), t(BN[1]), False, 0.1, 1e-3), X=X4)
LN_S, LN_B = randn(8), randn(8)
case("LayerNormalization", "last-axis",
     graph("float[2,5,8] X", "float[2,5,8] Y", "Y = LayerNormalization<epsilon=1e-6>(X, S, B)", [init("S", LN_S), init("B", LN_B)]),
     lambda X: F.layer_norm(X, (8,), t(LN_S), t(LN_B), 1e-6), X=randn(2, 5, 8) * 3 + 1)
LN2_S = randn(4, 8)
case("LayerNormalization", "two-axes-no-bias",
     graph("float[2,4,8] X", "float[2,4,8] Y", "Y = LayerNormalization<axis=1>(X, S)", [init("S", LN2_S)]),
     lambda X: F.layer_norm(X, (4, 8), t(LN2_S), None, 1e-5), X=randn(2, 4, 8))
for axis in (-1, 1):
    case("Softmax", f"axis{axis}", graph("float[2,5,7] X", "float[2,5,7] Y", f"Y = Softmax<axis={axis}>(X)"),
         lambda X, axis=axis: torch.softmax(X, dim=axis), X=randn(2, 5, 7) * 2)
    case("LogSoftmax", f"axis{axis}", graph("float[2,5,7] X", "float[2,5,7] Y", f"Y = LogSoftmax<axis={axis}>(X)"),
         lambda X, axis=axis: torch.log_softmax(X, dim=axis), X=randn(2, 5, 7) * 2)

# -- shape -----------------------------------------------------------------------------------------
case("Reshape", "flatten", graph(X4_SIG, "float[2,192] Y", "Y = Reshape(X, S)", [init("S", np.int64([2, -1]))]),
     lambda X: X.reshape(2, -1), X=X4)
case("Flatten", "axis1", graph(X4_SIG, "float[2,192] Y", "Y = Flatten<axis=1>(X)"), lambda X: X.flatten(1), X=X4)
case("Squeeze", "axis", graph("float[2,3,1,8] X", "float[2,3,8] Y", "Y = Squeeze(X, A)", [init("A", np.int64([2]))]),
     lambda X: X.squeeze(2), X=randn(2, 3, 1, 8))
case("Unsqueeze", "axes", graph("float[2,3,8] X", "float[2,1,3,8,1] Y", "Y = Unsqueeze(X, A)", [init("A", np.int64([1, 4]))]),
     lambda X: X[:, None, :, :, None], X=randn(2, 3, 8))
case("Transpose", "perm", graph(X4_SIG, "float[2,8,8,3] Y", "Y = Transpose<perm=[0,2,3,1]>(X)"),
     lambda X: X.permute(0, 2, 3, 1), X=X4)
case("Transpose", "default-reverse", graph("float[2,3,5] X", "float[5,3,2] Y", "Y = Transpose(X)"),
     lambda X: X.permute(2, 1, 0), X=randn(2, 3, 5))
case("Expand", "broadcast", graph("float[3,1,8] X", "float[2,3,4,8] Y", "Y = Expand(X, S)", [init("S", np.int64([2, 3, 4, 8]))]),
     lambda X: X.expand(2, 3, 4, 8), X=randn(3, 1, 8))
case("Concat", "channels-with-constant", graph(X4_SIG, "float[2,7,8,8] Y", "R = Relu(X)\n Y = Concat<axis=1>(X, C, R)",
                                               [init("C", randn(2, 1, 8, 8))]),
     lambda X: torch.cat([X, t(CONCAT_C), F.relu(X)], 1), X=X4)
CONCAT_C = np.asarray([float(v) for v in CASES[-1][2].split("{", 2)[1].split("}")[0].split(",")], dtype=np.float32).reshape(2, 1, 8, 8)
case("Concat", "negative-axis", graph("float[2,3,4] X", "float[2,3,8] Y", "Y = Concat<axis=-1>(X, X)"),
     lambda X: torch.cat([X, X], -1), X=randn(2, 3, 4))
case("Split", "sizes-all-used", graph(X4_SIG, "float[2,3,8,8] Y", "A, B = Split<axis=1>(X, S)\n C = Mul(B, B)\n Y = Concat<axis=1>(C, A)",
                                      [init("S", np.int64([1, 2]))]),
     lambda X: torch.cat([X[:, 1:] * X[:, 1:], X[:, :1]], 1), X=X4)
case("Split", "unused-output", graph("float[2,6,4] X", "float[2,2,4] Y", "A, B, C = Split<axis=1, num_outputs=3>(X)\n Y = Mul(A, C)"),
     lambda X: X[:, 0:2] * X[:, 4:6], X=randn(2, 6, 4))
case("Slice", "class-token", graph("float[2,5,8] X", "float[2,1,8] Y", "Y = Slice(X, S, E, A)",
                                   [init("S", np.int64([0])), init("E", np.int64([1])), init("A", np.int64([1]))]),
     lambda X: X[:, 0:1], X=randn(2, 5, 8))
case("Slice", "negative-and-open-end", graph("float[2,5,8] X", "float[2,3,6] Y", "Y = Slice(X, S, E, A)",
                                             [init("S", np.int64([2, 1])), init("E", np.int64([9223372036854775807, -1])),
                                              init("A", np.int64([1, -1]))]),
     lambda X: X[:, 2:, 1:-1], X=randn(2, 5, 8))
case("Slice", "patch-merging-step2", graph("float[2,8,8,3] X", "float[2,4,4,3] Y", "Y = Slice(X, S, E, A, P)",
                                           [init("S", np.int64([0, 1])), init("E", np.int64([9223372036854775807, 8])),
                                            init("A", np.int64([1, 2])), init("P", np.int64([2, 2]))]),
     lambda X: X[:, 0::2, 1::2], X=randn(2, 8, 8, 3))
case("Slice", "step3-odd-size", graph("float[2,3,10] X", "float[2,3,3] Y", "Y = Slice(X, S, E, A, P)",
                                      [init("S", np.int64([1])), init("E", np.int64([9])), init("A", np.int64([2])),
                                       init("P", np.int64([3]))]),
     lambda X: X[:, :, 1:9:3], X=randn(2, 3, 10))
case("Slice", "flip", graph("float[2,3,7] X", "float[2,3,7] Y", "Y = Slice(X, S, E, A, P)",
                            [init("S", np.int64([-1])), init("E", np.int64([-9223372036854775807])),
                             init("A", np.int64([2])), init("P", np.int64([-1]))]),
     lambda X: X.flip(2), X=randn(2, 3, 7))
case("Slice", "backwards-step3", graph("float[2,3,10] X", "float[2,3,3] Y", "Y = Slice(X, S, E, A, P)",
                                       [init("S", np.int64([8])), init("E", np.int64([0])), init("A", np.int64([2])),
                                        init("P", np.int64([-3]))]),
     lambda X: X[:, :, [8, 5, 2]], X=randn(2, 3, 10))
case("Gather", "scalar-index", graph("float[2,5,8] X", "float[2,8] Y", "Y = Gather<axis=1>(X, I)", [init("I", np.int64(0))]),
     lambda X: X[:, 0], X=randn(2, 5, 8))
case("Gather", "negative-scalar", graph("float[2,5,8] X", "float[2,5] Y", "Y = Gather<axis=2>(X, I)", [init("I", np.int64(-1))]),
     lambda X: X[:, :, -1], X=randn(2, 5, 8))
# scalar Gathers of one tensor: their rows are concatenated when they cover the axis (q, k, v of a
# ViT), padded and summed otherwise; a repeated index is summed
GATHER_INITS = [init("I0", np.int64(0)), init("I1", np.int64(1)), init("I2", np.int64(-1))]
case("Gather", "rows-covering-the-axis",
     graph("float[2,3,4] X", "float[2,4] Y",
           "A = Gather<axis=1>(X, I0)\n B = Gather<axis=1>(X, I1)\n C = Gather<axis=1>(X, I2)\n M = Mul(B, B)\n"
           " S = Add(A, M)\n Y = Mul(S, C)", GATHER_INITS),
     lambda X: (X[:, 0] + X[:, 1] * X[:, 1]) * X[:, 2], X=randn(2, 3, 4))
case("Gather", "rows-partly-and-repeated",
     graph("float[2,3,4] X", "float[2,4] Y",
           "A = Gather<axis=1>(X, I0)\n B = Gather<axis=1>(X, I2)\n C = Gather<axis=1>(X, I0)\n M = Mul(B, C)\n"
           " Y = Add(A, M)", GATHER_INITS),
     lambda X: X[:, 0] + X[:, 2] * X[:, 0], X=randn(2, 3, 4))
case("Gather", "rows-and-whole-tensor",
     graph("float[2,3,4] X", "float[2,3,4] Y", "A = Gather<axis=1>(X, I1)\n U = Unsqueeze(A, I1)\n Y = Mul(X, U)",
           GATHER_INITS),
     lambda X: X * X[:, 1:2], X=randn(2, 3, 4))
case("Gather", "index-matrix-with-repeats", graph("float[6,4] X", "float[2,3,4] Y", "Y = Gather(X, I)",
                                                  [init("I", np.int64([[0, 2, 2], [5, -1, 1]]))]),
     lambda X: X[t(np.int64([[0, 2, 2], [5, 5, 1]]))], X=randn(6, 4))
case("Gather", "middle-axis-vector", graph("float[2,6,4] X", "float[2,3,4] Y", "Y = Gather<axis=1>(X, I)",
                                           [init("I", np.int64([4, 0, 4]))]),
     lambda X: X[:, [4, 0, 4]], X=randn(2, 6, 4))
case("Pad", "constant", graph(X4_SIG, "float[2,3,11,9] Y", "Y = Pad(X, P, V)",
                              [init("P", np.int64([0, 0, 1, 0, 0, 0, 2, 1])), init("V", np.float32(0.5))]),
     lambda X: F.pad(X, (0, 1, 1, 2), value=0.5), X=X4)
case("Pad", "axes", graph(X4_SIG, "float[2,3,8,11] Y", "Y = Pad(X, P, V, A)",
                          [init("P", np.int64([2, 1])), init("V", np.float32(0)), init("A", np.int64([-1]))]),
     lambda X: F.pad(X, (2, 1)), X=X4)
# negative pads crop (NASNet's ZeroPad2d((-1, 0, -1, 0))): the cropped rows get zeros
case("Pad", "negative-crops", graph(X4_SIG, "float[2,3,8,7] Y", "Y = Pad(X, P, V)",
                                    [init("P", np.int64([0, 0, -1, 0, 0, 0, 1, -1])), init("V", np.float32(0))]),
     lambda X: F.pad(X, (0, -1, -1, 1)), X=X4)
# reflect (torch "reflect"), edge ("replicate") and wrap ("circular", opset 19): borders fold back
# onto their sources; pads are asymmetric, up to the largest each mode allows (reflect: size - 1)
for mode, torch_mode in (("reflect", "reflect"), ("edge", "replicate"), ("wrap", "circular")):
    most = 7 if mode == "reflect" else 8
    header = HEADER.replace('"" : 18', '"" : 19') if mode == "wrap" else HEADER
    case("Pad", f"{mode}-two-axes", header + graph(X4_SIG, f"float[2,3,{8 + 1 + most},{8 + 3 + 2}] Y",
                                                     f'Y = Pad<mode="{mode}">(X, P)',
                                                     [init("P", np.int64([0, 0, 1, 3, 0, 0, most, 2]))])[len(HEADER):],
         lambda X, m=torch_mode, most=most: F.pad(X, (3, 2, 1, most), mode=m), X=X4)
    case("Pad", f"{mode}-axes-input", header + graph(X4_SIG, "float[2,3,8,10] Y", f'Y = Pad<mode="{mode}">(X, P, , A)',
                                                       [init("P", np.int64([0, 2])), init("A", np.int64([-1]))])[len(HEADER):],
         lambda X, m=torch_mode: F.pad(X, (0, 2, 0, 0), mode=m), X=X4)
case("ScatterND", "overwrite-rows", graph("float[4,3] X, float[2,3] U", "float[4,3] Y", "Y = ScatterND(X, I, U)",
                                          [init("I", np.int64([[1], [3]]))]),
     lambda X, U: X.index_put((t(np.int64([1, 3])),), U), X=randn(4, 3), U=randn(2, 3))
case("ScatterND", "updates", graph("float[2,3] X", "float[4,3] Y", "Y = ScatterND(D, I, X)",
                                   [init("D", np.zeros((4, 3), np.float32)), init("I", np.int64([[1], [3]]))]),
     lambda X: torch.zeros(4, 3).index_put((t(np.int64([1, 3])),), X), X=randn(2, 3))
case("GatherND", "rows-with-repeats", graph("float[4,3] X", "float[3,3] Y", "Y = GatherND(X, I)",
                                            [init("I", np.int64([[1], [3], [1]]))]),
     lambda X: X[t(np.int64([1, 3, 1]))], X=randn(4, 3))
case("GatherND", "elements", graph("float[2,3,4] X", "float[2] Y", "Y = GatherND(X, I)",
                                   [init("I", np.int64([[0, 2, 1], [1, 0, 3]]))]),
     lambda X: X[t(np.int64([0, 1])), t(np.int64([2, 0])), t(np.int64([1, 3]))], X=randn(2, 3, 4))
case("GatherND", "elements-with-repeats", graph("float[2,3,4] X", "float[4] Y", "Y = GatherND(X, I)",
                                                [init("I", np.int64([[0, 2, 1], [1, 0, 3], [0, 2, 1], [-1, -3, 3]]))]),
     lambda X: X[t(np.int64([0, 1, 0, 1])), t(np.int64([2, 0, 2, 0])), t(np.int64([1, 3, 1, 3]))], X=randn(2, 3, 4))
case("GatherND", "unique-rows", graph("float[4,3] X", "float[2,3] Y", "Y = GatherND(X, I)",
                                      [init("I", np.int64([[2], [0]]))]),
     lambda X: X[t(np.int64([2, 0]))], X=randn(4, 3))
case("Tile", "repeats", graph("float[2,3,4] X", "float[2,6,12] Y", "Y = Tile(X, R)", [init("R", np.int64([1, 2, 3]))]),
     lambda X: X.repeat(1, 2, 3), X=randn(2, 3, 4))


@pytest.mark.parametrize("op,text,fn,inputs", [c[0:1] + c[2:] for c in CASES], ids=[c[1] for c in CASES])
def test_rule_matches_torch_autograd(op, text, fn, inputs):
    wrt = "X"
    assert_vjp_matches_torch(text, fn, inputs, wrt=wrt, rtol=1e-5, atol=1e-5)


def test_every_rule_is_tested():
    from test_rules_foreign import TESTED_OPS as FOREIGN_OPS  # other exporters' and older opsets' ops
    from test_rules_norm import TESTED_OPS  # the normalization, Mod and TopK rules' cases

    tested = {c[0] for c in CASES} | TESTED_OPS | FOREIGN_OPS
    untested = sorted(set(RULES) - tested)
    assert not untested, f"gradient rules without a test against torch: {untested}"


def test_rule_and_non_differentiable_tables_are_disjoint():
    assert not set(RULES) & NON_DIFFERENTIABLE


def test_unsupported_op_lists_every_op_type_and_node():
    text = graph("float[2,3] X", "float[2,3] Y", "A = Acos(X)\n B = Asin(A)\n C = Acos(B)\n Y = Add(C, X)")
    with pytest.raises(UnsupportedOpsError) as info:
        onnx_vjp(text, {"X": np.zeros((2, 3), np.float32)}, "X")
    message = str(info.value)
    assert "Acos" in message and "Asin" in message and "2 op type(s)" in message, message
    assert set(info.value.missing) == {"Acos", "Asin"}
    assert len(info.value.missing["Acos"]) == 2


def test_pad_beyond_a_single_fold_is_refused_by_name():
    # reflect copies at most size - 1 values per side (onnxruntime and torch refuse more)
    import onnx.parser
    from onnx_ir import serde

    from gradmap.graph.errors import ExportError
    from gradmap.graph.gradient import append_vjp

    text = graph("float[1,1,3,3] X", "float[1,1,3,9] Y", 'Y = Pad<mode="reflect">(X, P)',
                 [init("P", np.int64([0, 0, 0, 3, 0, 0, 0, 3]))])
    model = serde.deserialize_model(onnx.parser.parse_model(text))
    with pytest.raises(ExportError, match=r"Pad mode 'reflect' pads axis 3 \(size 3\) by 3, more than 2"):
        append_vjp(model, model.graph.inputs[0], model.graph.outputs[0])


def test_branch_not_depending_on_input_gets_no_backward_nodes():
    text = graph("float[2,3] X, float[2,3] Z", "float[2,3] Y", "A = Relu(Z)\n B = Exp(A)\n Y = Mul(X, B)")
    import onnx
    import onnx_ir as ir

    from gradmap.graph.gradient import append_vjp

    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text)))
    append_vjp(model, model.graph.inputs[0], model.graph.outputs[0])
    backward = [n.op_type for n in model.graph if n.name and n.name.startswith("grad/")]
    assert "Relu" not in backward and "Exp" not in backward and "Where" not in backward, backward
    assert math.isfinite(len(backward))


def test_gather_nd_with_repeated_indices_is_exact_on_several_threads():
    """onnxruntime's CPU ScatterND(reduction=add) loses updates to repeated indices on several
    threads (this case: off by 5.8 with a plain ScatterND on 2 threads); the GatherND rule must not
    use it there. 4096 rows gathered from 4, run 10 times on 2 threads."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from gradmap.graph.gradient import append_vjp

    index = np.repeat(np.arange(4), 1024)[:, None].astype(np.int64)
    text = graph("float[4,512] X", "float[4096,512] Y", "Y = GatherND(X, I)", [init("I", index)])
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(onnx.parser.parse_model(text)))
    append_vjp(model, model.graph.inputs[0], model.graph.outputs[0])
    assert "ScatterND" not in [n.op_type for n in model.graph]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    x = randn(4, 512)
    dy = np.random.default_rng(3).standard_normal((4096, 512)).astype(np.float32)
    expected = dy.reshape(4, 1024, 512).astype(np.float64).sum(axis=1)
    for _ in range(10):
        (dx,) = session.run(["grad_input"], {"X": x, "grad_output": dy})
        np.testing.assert_allclose(dx, expected, rtol=1e-5, atol=1e-3)
