"""Gradient rules of the ops other exporters and older opsets emit (Keras/tf2onnx, TF-slim, Caffe, Paddle,
JAX, torch.onnx at opsets 7-17), each against torch autograd of the same function, and tf2onnx's NHWC
Transpose patterns as whole graphs. Old-opset ops that gradmap upgrades (Upsample, BatchNormalization
with spatial=0 or is_test, Dropout's ratio attribute) are checked after ``prepare_classifier`` against
onnxruntime running the original file and float64 central differences of it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx_ir")
import torch.nn.functional as F  # noqa: E402

from _vjp import assert_vjp_matches_torch  # noqa: E402

RNG = np.random.default_rng(29)

#: Op types whose rules the cases below test (tests/test_rules.py checks every rule has a test).
TESTED_OPS = {"PRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Softplus", "Softsign", "Mish", "Shrink", "Mean",
              "LRN", "GlobalMaxPool", "ReduceMin", "ReduceSumSquare", "ReduceL1", "ReduceLogSumExp", "ReduceLogSum",
              "DepthToSpace", "SpaceToDepth", "GatherElements"}


def randn(*shape, positive=False):
    a = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.5 if positive else a


def t(a):
    return torch.from_numpy(np.asarray(a))


def init(name, array):
    a = np.asarray(array)
    kind = {np.float32: "float", np.int64: "int64"}[a.dtype.type]
    dims = f"[{','.join(str(d) for d in a.shape)}]" if a.ndim else ""
    values = ",".join(repr(float(v)) if kind == "float" else str(int(v)) for v in a.reshape(-1))
    return f"{kind}{dims} {name} = {{{values}}}"


def graph(inputs, output, body, inits=()):
    init_text = f"<{', '.join(inits)}>" if inits else ""
    return f'<ir_version: 8, opset_import: ["" : 18]>\ng ({inputs}) => ({output}) {init_text} {{ {body} }}'


X4 = randn(2, 6, 5, 5)
SIG = "float[2,6,5,5] X"
OUT = "float[2,6,5,5] Y"
SLOPE = randn(6, 1, 1) * 0.3
GATHER_INDEX = RNG.integers(0, 5, (2, 6, 3, 5)).astype(np.int64)

CASES = [
    ("PRelu", "channel-slope", graph(SIG, OUT, "Y = PRelu(X, S)", [init("S", SLOPE)]),
     lambda X: torch.where(X > 0, X, t(SLOPE) * X), dict(X=X4)),
    ("PRelu", "wrt-slope", graph("float[6,1,1] X, float[2,6,5,5] Z", OUT, "Y = PRelu(Z, X)"),
     lambda X, Z: torch.where(Z > 0, Z, X * Z), dict(X=SLOPE, Z=X4)),
    ("Elu", "alpha", graph(SIG, OUT, "Y = Elu<alpha=0.7>(X)"), lambda X: F.elu(X, 0.7), dict(X=X4)),
    ("Selu", "default", graph(SIG, OUT, "Y = Selu(X)"), lambda X: F.selu(X), dict(X=X4)),
    ("Celu", "alpha", graph(SIG, OUT, "Y = Celu<alpha=1.5>(X)"), lambda X: F.celu(X, 1.5), dict(X=X4)),
    ("ThresholdedRelu", "alpha", graph(SIG, OUT, "Y = ThresholdedRelu<alpha=0.4>(X)"),
     lambda X: F.threshold(X, 0.4, 0.0), dict(X=X4)),
    ("Softplus", "plain", graph(SIG, OUT, "Y = Softplus(X)"), lambda X: F.softplus(X), dict(X=X4 * 3)),
    ("Softsign", "plain", graph(SIG, OUT, "Y = Softsign(X)"), lambda X: F.softsign(X), dict(X=X4 * 3)),
    ("Mish", "plain", graph(SIG, OUT, "Y = Mish(X)"), lambda X: F.mish(X), dict(X=X4 * 3)),
    ("Shrink", "soft", graph(SIG, OUT, "Y = Shrink<lambd=0.5, bias=0.5>(X)"), lambda X: F.softshrink(X, 0.5), dict(X=X4)),
    ("Shrink", "hard", graph(SIG, OUT, "Y = Shrink<lambd=0.5>(X)"), lambda X: F.hardshrink(X, 0.5), dict(X=X4)),
    ("Mean", "three-broadcast", graph(SIG, OUT, "Y = Mean(X, B, X)", [init("B", randn(6, 1, 1))]),
     lambda X: (2 * X + t(MEAN_B)) / 3, dict(X=X4)),
    ("Mean", "wrt-broadcast", graph("float[6,1,1] X, float[2,6,5,5] Z", OUT, "Y = Mean(Z, X)"),
     lambda X, Z: (Z + X) / 2, dict(X=randn(6, 1, 1), Z=X4)),
    ("LRN", "size-5", graph(SIG, OUT, "Y = LRN<size=5, alpha=0.3, beta=0.75, bias=1.5>(X)"),
     lambda X: F.local_response_norm(X, 5, alpha=0.3, beta=0.75, k=1.5), dict(X=X4)),
    ("LRN", "size-3-defaults", graph(SIG, OUT, "Y = LRN<size=3>(X)"),
     lambda X: F.local_response_norm(X, 3), dict(X=X4 * 20)),
    ("LRN", "size-1", graph(SIG, OUT, "Y = LRN<size=1, alpha=0.5>(X)"),
     lambda X: F.local_response_norm(X, 1, alpha=0.5), dict(X=X4)),
    ("GlobalMaxPool", "plain", graph(SIG, "float[2,6,1,1] Y", "Y = GlobalMaxPool(X)"),
     lambda X: X.amax(dim=(2, 3), keepdim=True), dict(X=X4)),
    ("GlobalMaxPool", "ties-split", graph(SIG, "float[2,6,1,1] Y", "Y = GlobalMaxPool(X)"),
     lambda X: X.amax(dim=(2, 3), keepdim=True), dict(X=np.round(X4))),
    ("ReduceMin", "axes", graph(SIG, "float[2,5] Y", "Y = ReduceMin<keepdims=0>(X, A)", [init("A", np.int64([1, 3]))]),
     lambda X: X.amin(dim=(1, 3)), dict(X=X4)),
    ("ReduceSumSquare", "keepdims", graph(SIG, "float[2,6,1,1] Y", "Y = ReduceSumSquare(X, A)",
                                          [init("A", np.int64([2, 3]))]),
     lambda X: (X * X).sum(dim=(2, 3), keepdim=True), dict(X=X4)),
    ("ReduceL1", "all", graph(SIG, "float[1,1,1,1] Y", "Y = ReduceL1(X)"),
     lambda X: X.abs().sum().reshape(1, 1, 1, 1), dict(X=X4)),
    ("ReduceLogSumExp", "channels", graph(SIG, "float[2,5,5] Y", "Y = ReduceLogSumExp<keepdims=0>(X, A)",
                                          [init("A", np.int64([1]))]),
     lambda X: torch.logsumexp(X, dim=1), dict(X=X4 * 3)),
    ("ReduceLogSum", "spatial", graph(SIG, "float[2,6,1,1] Y", "Y = ReduceLogSum(X, A)", [init("A", np.int64([2, 3]))]),
     lambda X: torch.log(X.sum(dim=(2, 3), keepdim=True)), dict(X=np.abs(X4) + 0.1)),
    ("DepthToSpace", "dcr", graph("float[2,8,3,4] X", "float[2,2,6,8] Y", "Y = DepthToSpace<blocksize=2>(X)"),
     lambda X: X.reshape(2, 2, 2, 2, 3, 4).permute(0, 3, 4, 1, 5, 2).reshape(2, 2, 6, 8), dict(X=randn(2, 8, 3, 4))),
    ("DepthToSpace", "crd", graph("float[2,8,3,4] X", "float[2,2,6,8] Y", 'Y = DepthToSpace<blocksize=2, mode="CRD">(X)'),
     lambda X: F.pixel_shuffle(X, 2), dict(X=randn(2, 8, 3, 4))),
    ("SpaceToDepth", "plain", graph("float[2,2,6,8] X", "float[2,8,3,4] Y", "Y = SpaceToDepth<blocksize=2>(X)"),
     lambda X: X.reshape(2, 2, 3, 2, 4, 2).permute(0, 3, 5, 1, 2, 4).reshape(2, 8, 3, 4), dict(X=randn(2, 2, 6, 8))),
    ("GatherElements", "repeated", graph(SIG, "float[2,6,3,5] Y", "Y = GatherElements<axis=2>(X, I)",
                                         [init("I", GATHER_INDEX)]),
     lambda X: torch.gather(X, 2, t(GATHER_INDEX)), dict(X=X4)),
]
MEAN_B = np.asarray([float(v) for v in CASES[11][2].split("{", 2)[1].split("}")[0].split(",")],
                    dtype=np.float32).reshape(6, 1, 1)


@pytest.mark.parametrize("op,text,fn,inputs", [(c[0], c[2], c[3], c[4]) for c in CASES],
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_rule_matches_torch_autograd(op, text, fn, inputs):
    assert_vjp_matches_torch(text, fn, inputs, wrt="X", rtol=1e-5, atol=1e-5)


def test_every_case_op_is_listed_and_registered():
    from gradmap.graph.gradient import RULES

    assert {c[0] for c in CASES} == TESTED_OPS
    assert TESTED_OPS <= set(RULES)


# -- tf2onnx's NHWC patterns as whole graphs --------------------------------------------------------------

W = randn(5, 6, 3, 3) * 0.3
G = randn(6) + 1
B = randn(6)


def test_tf2onnx_transpose_sandwiches_match_torch():
    """An unoptimized tf2onnx graph keeps TensorFlow's NHWC tensors and wraps every Conv in Transposes;
    batch norm is a Mul and an Add over the last axis, global pooling a ReduceMean over axes 1 and 2."""
    text = graph("float[2,6,7,7] X", "float[2,5] Y", """
        h = Transpose<perm=[0, 2, 3, 1]>(X)
        s = Mul(h, G)
        b = Add(s, B)
        r = Relu(b)
        c_in = Transpose<perm=[0, 3, 1, 2]>(r)
        c = Conv<pads=[1, 1, 1, 1]>(c_in, W)
        c_out = Transpose<perm=[0, 2, 3, 1]>(c)
        Y = ReduceMean<keepdims=0>(c_out, A)""",
                 [init("G", G), init("B", B), init("W", W), init("A", np.int64([1, 2]))])

    def reference(X):
        h = X.permute(0, 2, 3, 1) * t(G) + t(B)
        c = F.conv2d(F.relu(h).permute(0, 3, 1, 2), t(W), padding=1)
        return c.permute(0, 2, 3, 1).mean(dim=(1, 2))

    assert_vjp_matches_torch(text, reference, {"X": randn(2, 6, 7, 7)}, wrt="X")


def test_tf2onnx_nhwc_squeeze_and_dynamic_reshape_match_torch():
    """A Flatten of an NHWC map through a Reshape whose shape is computed from Shape (tf2onnx without
    constant folding): the shape must be propagated for the rules to see static sizes."""
    import onnx

    from gradmap.export._foreign import prepare_classifier

    text = graph("float[N,4,4,3] X", "float[N,2] Y", """
        s = Shape(X)
        n = Slice(s, zero, one)
        shape = Concat<axis=0>(n, minus_one)
        f = Reshape(X, shape)
        Y = MatMul(f, M)""", [init("zero", np.int64([0])), init("one", np.int64([1])),
                              init("minus_one", np.int64([-1])), init("M", randn(48, 2))])
    graph_ = prepare_classifier(onnx.parser.parse_model(text))
    assert graph_.layout == "nhwc"
    import onnx_ir as ir
    import onnxruntime as ort

    from gradmap.graph import add_gradient

    model = graph_.model
    add_gradient(model, target="portable")
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = randn(3, 3, 4, 4)
    logits, gradient = session.run(["logits", "gradient"], {"image": x, "target": np.asarray([0, 1, 1])})
    m = torch.from_numpy(np.asarray([[float(v) for v in text.split("M = {")[1].split("}")[0].split(",")]],
                                    np.float32).reshape(48, 2))
    xt = t(x).requires_grad_(True)
    out = xt.permute(0, 2, 3, 1).reshape(3, -1) @ m
    out[torch.arange(3), torch.tensor([0, 1, 1])].sum().backward()
    np.testing.assert_allclose(logits, out.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gradient, xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_slice_keeping_the_whole_dynamic_batch_axis_matches_torch_and_a_real_batch_slice_is_refused():
    """Keras' Cropping2D through tf2onnx: a Slice over every axis whose batch entry (start 0, end INT32 max,
    step 1: TensorFlow's end_mask) keeps the whole axis of unknown size; torch.onnx writes INT64 max there.
    A Slice that takes part of the batch axis has no rule, and says so."""
    from _vjp import onnx_vjp

    from gradmap.graph import ExportError

    big32, big64 = np.iinfo(np.int32).max, np.iinfo(np.int64).max
    x = randn(3, 7, 6, 4)
    for end in (big32, big64):
        text = graph("float[N,7,6,4] X", "float[N,5,5,4] Y", "Y = Slice(X, S, E, A)",
                     [init("S", np.int64([0, 1, 1, 0])), init("E", np.int64([end, -1, big32, big32])),
                      init("A", np.int64([0, 1, 2, 3]))])
        assert_vjp_matches_torch(text, lambda X: X[:, 1:-1, 1:, :], {"X": x}, wrt="X", rtol=0, atol=0)

    for starts, ends, steps in (([1], [big32], [1]), ([0], [2], [1]), ([0], [big32], [2])):
        text = graph("float[N,7,6,4] X", "float[N,7,6,4] Y", "Y = Slice(X, S, E, A, K)",
                     [init("S", np.int64(starts)), init("E", np.int64(ends)), init("A", np.int64([0])),
                      init("K", np.int64(steps))])
        with pytest.raises(ExportError, match=r"Slice of the dynamic axis 0 \(start .*\) has no gradient rule"):
            onnx_vjp(text, {"X": x}, wrt="X")


# -- old-opset ops through prepare_classifier ---------------------------------------------------------------

def _old_model(nodes, opset, initializers=(), shape=(1, 3, 4, 4), ir_version=4):
    from onnx import TensorProto, helper

    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def _head(model, channels, spatial, classes=4):
    """Append a flatten + MatMul head so that the graph is a classifier."""
    from onnx import helper, numpy_helper

    model.graph.node[-1].output[0] = "features"
    model.graph.node.extend([helper.make_node("Flatten", ["features"], ["flat"], axis=1),
                             helper.make_node("MatMul", ["flat", "head"], ["y"])])
    model.graph.initializer.append(numpy_helper.from_array(randn(channels * spatial, classes), "head"))
    return model


def _check_against_the_original(model, x, target=1):
    """Export through prepare_classifier; logits equal onnxruntime on the original file, the gradient
    float64 central differences of the original file (opsets onnxruntime still runs)."""
    import onnx_ir as ir
    import onnxruntime as ort

    from gradmap.export._foreign import prepare_classifier
    from gradmap.graph import add_gradient

    graph = prepare_classifier(model)
    add_gradient(graph.model, target="portable")
    session = ort.InferenceSession(ir.serde.serialize_model(graph.model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    logits, gradient = session.run(["logits", "gradient"], {"image": x, "target": np.asarray([target])})
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(logits, original.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5,
                               err_msg="the upgraded graph computes other logits than the original file")
    # float32 central differences of the original file (onnx.reference has no Upsample): the graphs
    # are smooth (Tanh of linear maps), so a step of 1e-2 leaves ~1e-4 of truncation error
    expected = np.zeros_like(x, dtype=np.float64)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = 1e-2
        up, down = (original.run(None, {"x": x + d})[0][0, target] for d in (step, -step))
        expected[i] = (float(up) - float(down)) / 2e-2
    np.testing.assert_allclose(gradient, expected, atol=2e-3 * np.abs(expected).max(),
                               err_msg="gradient differs from central differences of the original file")
    return graph


@pytest.mark.parametrize("opset,mode,scales", [(7, "nearest", (2.0, 2.0)), (7, "linear", (2.0, 3.0)),
                                               (9, "linear", (2.0, 2.0)), (9, "nearest", (3.0, 1.5))])
def test_upsample_keeps_its_asymmetric_coordinates_through_the_upgrade(opset, mode, scales):
    from onnx import TensorProto, helper

    scale = [1.0, 1.0, *scales]
    if opset < 9:
        nodes = [helper.make_node("Upsample", ["x"], ["u"], scales=scale, mode=mode)]
        inits = []
    else:
        nodes = [helper.make_node("Upsample", ["x", "s"], ["u"], mode=mode)]
        inits = [helper.make_tensor("s", TensorProto.FLOAT, [4], scale)]
    nodes.append(helper.make_node("Tanh", ["u"], ["y"]))
    model = _head(_old_model(nodes, opset, inits), 3, int(4 * scales[0]) * int(4 * scales[1]))
    graph = _check_against_the_original(model, randn(1, 3, 4, 4))
    assert any("Upsample" in n for n in graph.notes), graph.notes


def test_old_batch_norm_attributes_and_dropout_ratio_are_upgraded():
    from onnx import helper, numpy_helper

    params = [numpy_helper.from_array(a, n) for a, n in
              ((randn(3) + 1, "g"), (randn(3), "b"), (randn(3), "m"), (np.abs(randn(3)) + 0.5, "v"))]
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], is_test=1, spatial=1,
                              epsilon=1e-3),
             helper.make_node("Dropout", ["n"], ["d"], is_test=1, ratio=0.4),
             helper.make_node("Tanh", ["d"], ["y"])]
    model = _head(_old_model(nodes, 6, params, ir_version=3), 3, 16)
    model.graph.input.extend(helper.make_tensor_value_info(p.name, p.data_type, p.dims)
                             for p in model.graph.initializer)  # IR version 3: initializers are inputs too
    from gradmap.export._foreign import prepare_classifier

    graph = prepare_classifier(model)  # onnxruntime no longer runs opset-6 BatchNormalization: torch is the reference
    import onnx_ir as ir
    import onnxruntime as ort

    from gradmap.graph import add_gradient

    add_gradient(graph.model, target="portable")
    session = ort.InferenceSession(ir.serde.serialize_model(graph.model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = randn(1, 3, 4, 4)
    logits, gradient = session.run(["logits", "gradient"], {"image": x, "target": np.asarray([2])})
    values = {p.name: t(numpy_helper.to_array(p)) for p in [*params, model.graph.initializer[-1]]}
    xt = t(x).requires_grad_(True)
    n = F.batch_norm(xt, values["m"], values["v"], values["g"], values["b"], training=False, eps=1e-3)
    out = torch.tanh(n).reshape(1, -1) @ values["head"]
    out[0, 2].backward()
    np.testing.assert_allclose(logits, out.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gradient, xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_per_activation_batch_norm_of_opset_7_is_written_as_its_formula():
    from onnx import helper, numpy_helper

    shape = (3, 4, 4)
    params = [numpy_helper.from_array(a, n) for a, n in
              ((randn(*shape) + 1, "g"), (randn(*shape), "b"), (randn(*shape), "m"),
               (np.abs(randn(*shape)) + 0.5, "v"))]
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["n"], spatial=0, epsilon=1e-2),
             helper.make_node("Tanh", ["n"], ["y"])]
    model = _head(_old_model(nodes, 7, params), 3, 16)
    graph = _check_against_the_original(model, randn(1, 3, 4, 4))
    assert any("spatial=0" in n for n in graph.notes), graph.notes
