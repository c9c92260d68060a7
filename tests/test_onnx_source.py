"""gradmap export onnx:PATH: foreign classifier graphs made ready for the gradient pass, exported and
checked against references independent of gradmap's rules (float64 central differences of the source
graph itself, element by element; torch autograd where torch is installed).

Runs without torch: the torch cross-check at the end skips itself.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx_ir")
import onnxruntime as ort  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from gradmap import contract  # noqa: E402
from gradmap.cli import main  # noqa: E402
from gradmap.contract import Preprocessing  # noqa: E402
from gradmap.export._foreign import LUMA, export_graph, imagenet_labels, prepare_classifier, read_labels  # noqa: E402
from gradmap.export._onnx_file import export_onnx, load_onnx  # noqa: E402
from gradmap.export._onnx_reference import OnnxReference, to_double  # noqa: E402
from gradmap.graph import ExportError, ParityError  # noqa: E402

RNG = np.random.default_rng(0)


def model(text: str, opset: int = 18, **weights: np.ndarray) -> onnx.ModelProto:
    """A model from ONNX text (graph only) and its initializers."""
    proto = onnx.parser.parse_model(f'<ir_version: 8, opset_import: ["" : {opset}]>\n' + text)
    proto.graph.initializer.extend(numpy_helper.from_array(np.asarray(w, np.float32) if w.dtype.kind == "f" else w, k)
                                   for k, w in weights.items())
    return proto


def randn(*shape, scale=0.5):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


# a small convolutional classifier, NCHW, ending in Softmax (the Softmax taken off by a {cut} marker)
CNN = """
g (float[N, 3, 8, 8] pixels) => (float[N, 5] {out}) {{
    c = Conv <pads = [1, 1, 1, 1]> (pixels, w)
    a = Tanh (c)
    p = GlobalAveragePool (a)
    f = Flatten (p)
    {last}
}}"""


def cnn(softmax: str | None = "Softmax", opset: int = 18) -> onnx.ModelProto:
    last = "scores = Gemm <transB = 1> (f, fc, b)" if softmax is None else \
        f"z = Gemm <transB = 1> (f, fc, b)\n    scores = {softmax} <axis = 1> (z)"
    weights = np.random.default_rng(1)
    return model(CNN.format(out="scores", last=last), opset=opset,
                 w=(weights.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32),
                 fc=(weights.standard_normal((5, 4)) * 2).astype(np.float32),
                 b=(weights.standard_normal(5) * 0.1).astype(np.float32))


def numeric_gradient(proto: onnx.ModelProto, x: np.ndarray, score, eps: float = 1e-5) -> np.ndarray:
    """d score(output) / d input by float64 central differences of ``proto`` itself, element by element."""
    evaluator = ReferenceEvaluator(to_double(proto))
    name = proto.graph.input[0].name
    x = x.astype(np.float64)

    def f(point):
        return float(score(evaluator.run(None, {name: point})[0]))

    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = eps
        grad[i] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


def session(proto: onnx.ModelProto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def export(graph, tmp_path, name="m.onnx", **options):
    options.setdefault("preprocessing", Preprocessing(crop=graph.input_size, resize=None))
    options.setdefault("target", "portable")
    report = export_graph(graph, tmp_path / name, **options)
    return report, ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])


def run(sess, x, target):
    return dict(zip(["logits", "target_index", "gradient"],
                    sess.run(["logits", "target_index", "gradient"],
                             {"image": x.astype(np.float32), "target": np.asarray(target, np.int64)})))


# -- the entrance ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["portable", "cpu"])
def test_trailing_softmax_is_cut_and_the_logit_gradient_matches_central_differences(tmp_path, target):
    source = cnn("Softmax")
    graph = prepare_classifier(source)
    assert (graph.layout, graph.cut, graph.input_size, graph.num_classes) == ("nchw", "Softmax", (8, 8), 5)
    assert any("Softmax" in note for note in graph.notes), graph.notes
    report, sess = export(graph, tmp_path, target=target)
    assert report.gradient_error is not None and report.gradient_error < 1e-4, report.summary()
    x = randn(1, 3, 8, 8, scale=1.0)
    out = run(sess, x, [2])
    probabilities = session(source).run(None, {"pixels": x})[0]
    shifted = np.exp(out["logits"] - out["logits"].max(axis=1, keepdims=True))
    np.testing.assert_allclose(shifted / shifted.sum(axis=1, keepdims=True), probabilities, atol=1e-6,
                               err_msg="softmax of the exported logits differs from the file's output")
    expected = numeric_gradient(cnn(None), x, lambda y: y[0, 2])
    np.testing.assert_allclose(out["gradient"], expected, rtol=1e-4, atol=1e-6,
                               err_msg="gradient of the logit before the cut Softmax differs from central differences")


@pytest.mark.parametrize("score,op", [("log_probability", "LogSoftmax"), ("probability", "Softmax")])
def test_probability_scores_after_the_cut_equal_the_file_own_output(tmp_path, score, op):
    source = cnn(op)
    graph = prepare_classifier(source, score=score)
    assert graph.cut == op
    _, sess = export(graph, tmp_path, score=score)
    x = randn(1, 3, 8, 8, scale=1.0)
    out = run(sess, x, [3])
    expected = numeric_gradient(source, x, lambda y: y[0, 3])  # the file's own probability (or its log)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out["gradient"], expected, atol=1e-4 * scale,
                               err_msg=f"--score {score} gradient differs from central differences of the file's {op}")


NHWC_TF2ONNX = """
g (float[N, 8, 8, 3] input) => (float[N, 5] probs) {
    t = Transpose <perm = [0, 3, 1, 2]> (input)
    c = Conv <pads = [1, 1, 1, 1]> (t, w)
    r = Relu (c)
    back = Transpose <perm = [0, 2, 3, 1]> (r)
    m = ReduceMean <keepdims = 0> (back, axes)
    z = MatMul (m, fc)
    probs = Softmax (z)
}"""


def nhwc_tf2onnx():
    return model(NHWC_TF2ONNX, w=randn(4, 3, 3, 3), fc=randn(4, 5, scale=2), axes=np.asarray([1, 2], np.int64))


def test_tf2onnx_nhwc_input_transpose_is_folded_and_cam_auto_finds_the_nchw_map(tmp_path):
    source = nhwc_tf2onnx()
    graph = prepare_classifier(source)
    assert graph.layout == "nhwc" and graph.cut == "Softmax"
    ops = [n.op_type for n in graph.model.graph]
    assert ops.count("Transpose") == 1, f"the input's Transpose should fold into the NCHW image: {ops}"
    report, _ = export(graph, tmp_path, cam_layer="auto")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = randn(1, 3, 8, 8, scale=1.0)
    names = ["logits", "gradient", contract.OUTPUT_CAM_ACTIVATION]
    logits, gradient, cam = sess.run(names, {"image": x, "target": np.asarray([1])})
    weights = {t.name: numpy_helper.to_array(t) for t in source.graph.initializer}
    feature_map = model(NHWC_TF2ONNX.replace("(float[N, 5] probs)", "(float[N, 4, 8, 8] r)"), **weights)
    relu = session(feature_map).run(None, {"input": x.transpose(0, 2, 3, 1)})[0]
    np.testing.assert_allclose(cam, relu, atol=1e-6, err_msg="cam_activation is not the NCHW feature map")
    assert "Relu" in report.op_types
    plain = model(NHWC_TF2ONNX.replace("probs = Softmax (z)", "probs = Identity (z)"), **weights)
    expected = numeric_gradient(plain, x.transpose(0, 2, 3, 1), lambda y: y[0, 1]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-6,
                               err_msg="gradient w.r.t. the NCHW image is not the transposed NHWC gradient")


def test_cam_layer_named_on_the_nhwc_side_of_a_transpose_is_taken_on_its_nchw_side(tmp_path):
    graph = prepare_classifier(nhwc_tf2onnx())
    export(graph, tmp_path, cam_layer="back")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    cam = sess.run([contract.OUTPUT_CAM_ACTIVATION], {"image": randn(1, 3, 8, 8), "target": np.asarray([0])})[0]
    assert cam.shape == (1, 4, 8, 8), f"the NCHW map (the Transpose's input), got {cam.shape}"


NHWC_PLAIN = """
g (float[N, 6, 6, 3] x) => (float[N, 4] y) {
    h = MatMul (x, w)
    a = Tanh (h)
    y = ReduceMean <keepdims = 0> (a, axes)
}"""


def test_nhwc_graph_without_a_transpose_gets_one_and_cam_gets_an_nchw_view(tmp_path):
    source = model(NHWC_PLAIN, w=randn(3, 4), axes=np.asarray([1, 2], np.int64))
    graph = prepare_classifier(source)
    assert graph.layout == "nhwc" and graph.cut is None
    assert any("transposed" in note for note in graph.notes), graph.notes
    _, sess = export(graph, tmp_path, cam_layer="auto")
    x = randn(2, 3, 6, 6, scale=1.0)
    gradient, cam, cam_gradient = sess.run(["gradient", contract.OUTPUT_CAM_ACTIVATION, contract.OUTPUT_CAM_GRADIENT],
                                           {"image": x, "target": np.asarray([0, 3])})
    a = np.tanh(x.transpose(0, 2, 3, 1) @ numpy_helper.to_array(source.graph.initializer[0]))
    np.testing.assert_allclose(cam, a.transpose(0, 3, 1, 2), atol=1e-6, err_msg="the NHWC map's NCHW view")
    assert cam_gradient.shape == cam.shape
    expected = np.zeros_like(cam)
    expected[0, 0], expected[1, 3] = 1 / 36, 1 / 36  # d mean / d map
    np.testing.assert_allclose(cam_gradient, expected, atol=1e-7, err_msg="gradient of the NCHW view of the map")
    for n, t in enumerate([0, 3]):
        numeric = numeric_gradient(source, x[n:n + 1].transpose(0, 2, 3, 1), lambda y, t=t: y[0, t])
        np.testing.assert_allclose(gradient[n:n + 1], numeric.transpose(0, 3, 1, 2), rtol=1e-4, atol=1e-6)


def test_one_channel_input_reads_the_luma_of_the_rgb_image(tmp_path):
    source = model("""
        g (float[N, 1, 6, 6] gray) => (float[N, 3] y) {
            c = Conv (gray, w)
            s = Sigmoid (c)
            f = Flatten (s)
            y = MatMul (f, fc)
        }""", w=randn(2, 1, 3, 3), fc=randn(32, 3))
    graph = prepare_classifier(source)
    assert graph.channels == 1 and any("luma" in n for n in graph.notes)
    _, sess = export(graph, tmp_path)
    x = randn(1, 3, 6, 6, scale=1.0)
    out = run(sess, x, [1])
    gray = np.tensordot(np.asarray(LUMA, np.float32), x, axes=([0], [1]))[:, None]
    np.testing.assert_allclose(out["logits"], session(source).run(None, {"gray": gray})[0], rtol=1e-5, atol=1e-6)
    d_gray = numeric_gradient(source, gray, lambda y: y[0, 1])
    np.testing.assert_allclose(out["gradient"], np.asarray(LUMA).reshape(1, 3, 1, 1) * d_gray, rtol=1e-4, atol=1e-6)


def test_conv_head_scores_are_flattened(tmp_path):
    source = model("""
        g (float[N, 3, 4, 4] x) => (float[N, 7, 1, 1] y) {
            c = Conv (x, w)
            y = GlobalAveragePool (c)
        }""", w=randn(7, 3, 3, 3))
    graph = prepare_classifier(source)
    assert graph.num_classes == 7 and any("flattened" in n for n in graph.notes)
    _, sess = export(graph, tmp_path)
    x = randn(1, 3, 4, 4)
    np.testing.assert_allclose(run(sess, x, [-1])["logits"], session(source).run(None, {"x": x})[0].reshape(1, 7),
                               atol=1e-6)


def test_symbolic_size_is_fixed_from_input_size(tmp_path):
    source = model("""
        g (float[N, 3, H, W] x) => (float[N, 4] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w)
            p = GlobalMaxPool (c)
            y = Flatten (p)
        }""", w=randn(4, 3, 3, 3))
    with pytest.raises(ExportError, match="give --input-size"):
        prepare_classifier(source)
    graph = prepare_classifier(source, input_size=(6, 10))
    assert graph.input_size == (6, 10)
    assert [d for d in graph.model.graph.inputs[0].shape][1:] == [3, 6, 10]


REFUSALS = {
    "int-input": ("g (int64[N, 3, 8, 8] x) => (float[N, 2] y) { f = Cast <to = 1> (x)\n y = ReduceMean <axes = [2, 3], keepdims = 0> (f) }",
                  {}, "int64, not float32"),
    "rank-2": ("g (float[N, 12] x) => (float[N, 12] y) { y = Relu (x) }", {}, "rank 2, not 4"),
    "five-channels": ("g (float[N, 5, 8, 8] x) => (float[N, 5] y) { y = ReduceMean <axes = [2, 3], keepdims = 0> (x) }",
                      {}, "no axis of 1 or 3 channels"),
    "ambiguous-layout": ("g (float[N, 3, 8, 3] x) => (float[N, 3] y) { y = ReduceMean <axes = [2, 3], keepdims = 0> (x) }",
                         {}, "give --layout"),
    "two-images": ("g (float[N, 3, 8, 8] a, float[N, 3, 8, 8] b) => (float[N, 3] y) { s = Add (a, b)\n y = ReduceMean <axes = [2, 3], keepdims = 0> (s) }",
                   {}, "several inputs could be the image"),
    "extra-input": ("g (float[N, 3, 8, 8] a, float[N, 3] b) => (float[N, 3] y) { m = ReduceMean <axes = [2, 3], keepdims = 0> (a)\n y = Add (m, b) }",
                    {}, "other inputs besides the image"),
    "independent-output": ("g (float[N, 3, 8, 8] x) => (float[N, 3] y) { s = Shape (x)\n c = Cast <to = 1> (s)\n y = Slice (c, one, four) }",
                           {"one": np.asarray([1], np.int64), "four": np.asarray([4], np.int64)}, "does not depend on the image"),
    "two-scores": ("g (float[N, 3, 8, 8] x) => (float[N, 3] y, float[N, 3] z) { y = ReduceMean <axes = [2, 3], keepdims = 0> (x)\n z = ReduceMax <axes = [2, 3], keepdims = 0> (x) }",
                   {}, "several outputs could be the scores"),
    "map-output": ("g (float[N, 3, 8, 8] x) => (float[N, 3, 8, 8] y) { y = Relu (x) }", {}, "not \\[N, K\\]"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_graphs_that_are_not_image_classifiers_are_refused_with_the_reason(name):
    text, weights, message = REFUSALS[name]
    with pytest.raises(ExportError, match=message):
        prepare_classifier(model(text, **weights))


def test_input_and_output_names_settle_ambiguity_and_unknown_names_are_refused():
    text, _, _ = REFUSALS["two-scores"]
    graph = prepare_classifier(model(text), output="z")
    assert graph.output_name == "z" and graph.model.graph.outputs[0].name == "logits"
    assert [n.op_type for n in graph.model.graph] == ["ReduceMax"], "the other output's branch should be removed"
    with pytest.raises(ExportError, match="no output of that name .*'y', 'z'"):
        prepare_classifier(model(text), output="probs")
    text, _, _ = REFUSALS["two-images"]
    with pytest.raises(ExportError, match="other inputs besides the image 'a'"):
        prepare_classifier(model(text), input="a")
    with pytest.raises(ExportError, match="no input of that name"):
        prepare_classifier(model(text), input="c")
    text, _, _ = REFUSALS["ambiguous-layout"]
    assert prepare_classifier(model(text), layout="nchw", input_size=(8, 3)).layout == "nchw"
    with pytest.raises(ExportError, match="is fixed at 8x8"):
        prepare_classifier(cnn(), input_size=(16, 16))


def test_reserved_names_inside_the_source_graph_are_renamed():
    source = model("""
        g (float[N, 3, 4, 4] x) => (float[N, 3] gradient) {
            target = Relu (x)
            gradient = ReduceMean <axes = [2, 3], keepdims = 0> (target)
        }""")
    graph = prepare_classifier(source)
    names = {v.name for n in graph.model.graph for v in n.outputs}
    assert "target" not in names and "logits" in names, names


def test_a_wrong_gradient_rule_is_refused_by_central_differences(tmp_path, monkeypatch):
    """The float64 graph and the float32 model share the rules; the central differences do not."""
    from gradmap.graph.gradient._registry import RULES

    correct = RULES["Tanh"]

    def doubled(ctx, node, dy):
        return [ctx.op("Mul", g, ctx.scalar(2.0)) for g in correct(ctx, node, dy)]

    monkeypatch.setitem(RULES, "Tanh", doubled)
    with pytest.raises(ParityError, match="central differences"):
        export(prepare_classifier(cnn()), tmp_path)
    assert not (tmp_path / "m.onnx").exists(), "a refused model must not be written"


def test_guided_backprop_is_refused_without_relu(tmp_path):
    with pytest.raises(ExportError, match="no Relu node"):
        export(prepare_classifier(cnn()), tmp_path, backprops=("vanilla", "guided"))


# -- the float64 reference's own evaluator ---------------------------------------------------------------

@pytest.mark.parametrize("attrs,shape,w_shape", [
    ("<pads = [1, 0, 2, 1], strides = [2, 1]>", (2, 4, 9, 8), (6, 4, 3, 3)),
    ("<dilations = [2, 2], group = 2>", (1, 4, 9, 9), (6, 2, 3, 3)),
    ("<group = 4, pads = [1, 1, 1, 1]>", (2, 4, 7, 7), (4, 1, 3, 3)),
    ("<auto_pad = \"SAME_UPPER\", strides = [2, 2]>", (1, 3, 7, 8), (5, 3, 3, 3)),
])
def test_reference_conv_equals_onnxruntime(attrs, shape, w_shape):
    from gradmap.export._onnx_reference import _reference_ops

    proto = model(f"g (float{list(shape)} x) => (float y) {{ y = Conv {attrs} (x, w) }}", w=randn(*w_shape))
    x = randn(*shape)
    ours = ReferenceEvaluator(to_double(proto), new_ops=_reference_ops()).run(None, {"x": x.astype(np.float64)})[0]
    np.testing.assert_allclose(ours, session(proto).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,attrs,shape,w_shape", [
    ("ConvTranspose", "<strides = [2, 2], pads = [1, 0, 0, 1], output_padding = [1, 0]>", (2, 4, 5, 5), (4, 3, 3, 3)),
    ("ConvTranspose", "<group = 4, strides = [2, 2], dilations = [1, 2]>", (1, 4, 4, 4), (4, 1, 2, 3)),
    ("MaxPool", "<kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]>", (2, 3, 9, 9), None),
    ("MaxPool", "<kernel_shape = [3, 3], strides = [2, 2], ceil_mode = 1>", (1, 2, 8, 8), None),
    ("MaxPool", "<kernel_shape = [2, 2], dilations = [2, 2]>", (1, 2, 7, 7), None),
])
def test_reference_conv_transpose_and_max_pool_equal_onnxruntime(op, attrs, shape, w_shape):
    from gradmap.export._onnx_reference import _reference_ops

    weight = {"w": randn(*w_shape)} if w_shape else {}
    inputs = "x, w" if w_shape else "x"
    proto = model(f"g (float{list(shape)} x) => (float y) {{ y = {op} {attrs} ({inputs}) }}", **weight)
    x = randn(*shape)
    ours = ReferenceEvaluator(to_double(proto), new_ops=_reference_ops()).run(None, {"x": x.astype(np.float64)})[0]
    np.testing.assert_allclose(ours, session(proto).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_reference_float32_run_measures_rounding_only():
    graph = prepare_classifier(cnn())
    reference = OnnxReference(graph.model)
    x = randn(2, 3, 8, 8, scale=1.0)
    exact = reference.run(x, np.asarray([0, 4]), score="logit")
    rounded = reference.run_float32(x, np.asarray([0, 4]), score="logit")
    assert exact.logits.dtype == np.float64 and exact.gradients["vanilla"].shape == x.shape
    error = np.abs(rounded.gradients["vanilla"] - exact.gradients["vanilla"]).max() / np.abs(exact.gradients["vanilla"]).max()
    assert 0 < error < 1e-5, f"float32 evaluation differs from float64 by {error}"
    assert reference.checked and all(r.get("error", 0) < 1e-6 for r in reference.checked), reference.checked


# -- labels ----------------------------------------------------------------------------------------------

def test_labels_from_files_json_and_the_shipped_imagenet_list(tmp_path):
    assert len(imagenet_labels()) == 1000 and imagenet_labels()[0] == "tench"
    assert read_labels("imagenet-background")[:2] == ("background", "tench")
    (tmp_path / "l.txt").write_text("cat\ndog \nbird\n\n")
    assert read_labels(str(tmp_path / "l.txt")) == ("cat", "dog", "bird")
    (tmp_path / "l.json").write_text(json.dumps(["a", "b"]))
    assert read_labels(str(tmp_path / "l.json")) == ("a", "b")
    with pytest.raises(ExportError, match="no such file"):
        read_labels(str(tmp_path / "missing.txt"))
    with pytest.raises(ExportError, match="3 labels given for a model with 5 outputs"):
        export(prepare_classifier(cnn()), tmp_path, labels=("a", "b", "c"))


# -- untrusted files -------------------------------------------------------------------------------------

def _with_external_data(tmp_path, location: str, name: str = "m.onnx") -> str:
    """The CNN with its conv weight stored externally at ``location`` (as written in the file)."""
    proto = cnn()
    weight = next(t for t in proto.graph.initializer if t.name == "w")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    entry = weight.external_data.add()
    entry.key, entry.value = "location", location
    path = tmp_path / "model" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return str(path)


def test_damaged_and_hostile_files_get_a_named_error(tmp_path):
    cases = {}
    cases["missing"] = (str(tmp_path / "nope.onnx"), "no such file")
    (tmp_path / "empty.onnx").write_bytes(b"")
    cases["empty"] = (str(tmp_path / "empty.onnx"), "empty file")
    (tmp_path / "garbage.onnx").write_bytes(bytes(range(256)) * 4)
    cases["garbage"] = (str(tmp_path / "garbage.onnx"), "not an ONNX model")
    whole = cnn().SerializeToString()
    (tmp_path / "truncated.onnx").write_bytes(whole[: len(whole) // 2])
    cases["truncated"] = (str(tmp_path / "truncated.onnx"), "not an ONNX model")
    cases["folder"] = (str(tmp_path), "not a file")
    broken = cnn()
    broken.graph.node[1].input[0] = "nowhere"
    (tmp_path / "broken.onnx").write_bytes(broken.SerializeToString())
    cases["undefined-input"] = (str(tmp_path / "broken.onnx"), "not a valid ONNX model")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(108, np.float32).tobytes())
    cases["parent"] = (_with_external_data(tmp_path, "../secret.bin", "parent.onnx"), "contains '..'")
    cases["absolute"] = (_with_external_data(tmp_path, str(secret), "absolute.onnx"), "absolute path")
    (tmp_path / "model").mkdir(exist_ok=True)
    link = tmp_path / "model" / "link.bin"
    if not link.exists():
        os.symlink(secret, link)
    cases["symlink"] = (_with_external_data(tmp_path, "link.bin", "symlink.onnx"), "outside the model's folder")
    cases["missing-data"] = (_with_external_data(tmp_path, "gone.bin", "gone.onnx"), "missing from the model's folder")
    for name, (path, message) in cases.items():
        with pytest.raises(ExportError, match=message):
            load_onnx(path)
        result = CliRunner().invoke(main, ["export", f"onnx:{path}", "-o", str(tmp_path / "out.onnx"),
                                           "--preset", "none"])
        assert result.exit_code == 1 and message.split("(")[0] in result.output, (name, result.output)
        assert isinstance(result.exception, SystemExit), f"{name}: {result.exception!r} escaped as a traceback"


def test_external_data_inside_the_folder_is_read(tmp_path):
    proto = cnn()
    path = _with_external_data(tmp_path, "weights.bin")
    weight = next(t for t in proto.graph.initializer if t.name == "w")
    (tmp_path / "model" / "weights.bin").write_bytes(numpy_helper.to_array(weight).tobytes())
    loaded = load_onnx(path)
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in loaded.graph.initializer if t.name == "w")),
                                  numpy_helper.to_array(weight))


# -- the command line ------------------------------------------------------------------------------------

def test_cli_exports_an_onnx_file_and_runs_its_maps(tmp_path):
    source = tmp_path / "cnn.onnx"
    source.write_bytes(cnn().SerializeToString())
    out = tmp_path / "g.onnx"
    runner = CliRunner()
    result = runner.invoke(main, ["export", f"onnx:{source}", "-o", str(out)])
    assert result.exit_code == 1 and "--preset" in result.output, result.output
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\ne\n")
    result = runner.invoke(main, ["export", f"onnx:{source}", "-o", str(out), "--preset", "keras-tf",
                                  "--labels", str(labels), "--score", "probability", "--target", "portable"])
    assert result.exit_code == 0, result.output
    assert "Softmax" in result.output and "parity with float64 evaluation of the ONNX graph" in result.output
    result = runner.invoke(main, ["info", str(out), "--json"])
    info = json.loads(result.output)
    assert info["labels_preview"] == ["a", "b", "c", "d", "e"] and info["score"] == "probability"
    assert info["extra"]["source_input"] == "pixels" and info["extra"]["cut"] == "Softmax"
    picture = tmp_path / "p.png"
    from PIL import Image

    Image.fromarray((RNG.uniform(0, 255, (20, 24, 3))).astype(np.uint8)).save(picture)
    for method in ("vanilla", "smoothgrad", "integrated-gradients", "gradient-x-input"):
        result = runner.invoke(main, ["run", str(out), str(picture), "--out", str(tmp_path / "maps"), "--method",
                                      method, "--samples", "3", "--steps", "4", "--format", "npy"])
        assert result.exit_code == 0, (method, result.output)
    result = runner.invoke(main, ["export", "resnet18", "-o", str(out), "--layout", "nhwc"])
    assert result.exit_code == 2 and "only for onnx:PATH" in result.output


def test_cli_exports_an_onnx_file_forward_only(tmp_path):
    """--no-gradient: the forward graph and the metadata; occlusion and Score-CAM give the maps of the full
    export; an op without a gradient rule (CumSum) exports forward-only, checked against the graph's
    float64 evaluation, and the gradient methods are refused saying why."""
    from gradmap.runtime import SaliencyModel
    from gradmap.runtime.methods import MethodSpec, UnsupportedMethodError, attribute, check_supported

    from _onnx_cnn import cnn_file

    source = cnn_file(tmp_path)
    runner = CliRunner()
    paths = {}
    for name, options in (("full", []), ("forward", ["--no-gradient"])):
        paths[name] = tmp_path / f"{name}.onnx"
        result = runner.invoke(main, ["export", f"onnx:{source}", "-o", str(paths[name]), "--preset", "torchvision",
                                      "--crop", "64", "--cam-layer", "auto", *options])
        assert result.exit_code == 0, result.output
    assert "output nodes, no gradient (--no-gradient)" in result.output and "parity with float64 evaluation of " \
        "the ONNX graph: logits" in result.output, result.output
    full, forward = (SaliencyModel(paths[k], provider="cpu", threads=1) for k in ("full", "forward"))
    assert forward.metadata.methods == ("eigen-cam", "score-cam", "occlusion", "rise")
    images = RNG.standard_normal((2, 3, 64, 64)).astype(np.float32)
    targets = np.array([-1, 2], np.int64)
    for spec in (MethodSpec("occlusion", window=16, stride=8), MethodSpec("score-cam")):
        expected = attribute(full, spec, images, targets)[2]
        actual = attribute(forward, spec, images, targets)[2]
        assert np.abs(expected).max() > 0
        assert np.abs(actual - expected).max() <= 1e-5 * np.abs(expected).max(), spec.name
    with pytest.raises(UnsupportedMethodError, match="grad-cam reads the gradient"):
        check_supported(forward, "grad-cam")
    integrated = model('''
        g (float[N, 3, 64, 64] x) => (float[N, 5] y) {
            s = CumSum (x, axis)
            c = Conv <pads = [1, 1, 1, 1]> (s, w)
            r = Relu (c)
            p = GlobalAveragePool (r)
            f = Flatten (p)
            y = Gemm <transB = 1> (f, fc)
        }''', axis=np.array(3, np.int64), w=RNG.standard_normal((4, 3, 3, 3)) * 0.1,
        fc=RNG.standard_normal((5, 4)))
    path = tmp_path / "cumsum.onnx"
    path.write_bytes(integrated.SerializeToString())
    result = runner.invoke(main, ["export", f"onnx:{path}", "-o", str(tmp_path / "c.onnx"), "--preset", "torchvision",
                                  "--crop", "64"])
    assert result.exit_code == 1 and "CumSum" in result.output, result.output
    result = runner.invoke(main, ["export", f"onnx:{path}", "-o", str(tmp_path / "c.onnx"), "--preset", "torchvision",
                                  "--crop", "64", "--no-gradient"])
    assert result.exit_code == 0, result.output
    assert SaliencyModel(tmp_path / "c.onnx", provider="cpu").metadata.methods == ("occlusion", "rise")


# -- torch.onnx at old opsets against torch autograd --------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("opset", [7, 9, 11, 13, 17])
def test_torch_onnx_exports_at_old_opsets_match_torch_autograd(tmp_path, opset):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(opset)
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6), nn.Softmax(dim=1)).eval()
    for bn in (module[1], module[5]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    path = tmp_path / f"op{opset}.onnx"
    torch.onnx.export(module, torch.zeros(1, 3, 16, 16), str(path), opset_version=opset, dynamo=False,
                      input_names=["input.1"], output_names=["prob"])
    report = export_onnx(path, tmp_path / "g.onnx", preprocessing_options={"preset_name": "torchvision"},
                         backprops=("vanilla", "guided"), target="cpu")
    assert f"opset {opset}" in " ".join(report.notes) or opset >= 18
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 16, 16)
    logits, gradient = sess.run(["logits", "gradient"], {"image": x.numpy(), "target": np.asarray([4])})
    reference = nn.Sequential(*list(module)[:-1]).double()
    xd = x.double().requires_grad_(True)
    out = reference(xd)
    (grad,) = torch.autograd.grad(out[0, 4], xd)
    np.testing.assert_allclose(logits, out.detach().numpy(), rtol=1e-5, atol=1e-5,
                               err_msg=f"opset {opset}: logits differ from torch")
    np.testing.assert_allclose(gradient, grad.numpy(), rtol=1e-4, atol=1e-5 * np.abs(grad.numpy()).max(),
                               err_msg=f"opset {opset}: gradient differs from torch autograd")


def test_onnx_export_runs_with_torch_unimportable(tmp_path):
    """gradmap export onnx: in a process where importing torch (or TensorFlow, JAX) fails."""
    import subprocess
    import sys
    import textwrap

    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "onnx", "tf2onnx_keras_cnn.onnx")
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "torchvision", "tensorflow", "keras", "jax", "paddle"):
            sys.modules[name] = None
        from gradmap.cli import main
        sys.argv = ["gradmap", "export", "onnx:{fixture}", "-o", {str(tmp_path / "m.onnx")!r}, "--preset", "keras-tf",
                    "--cam-layer", "auto"]
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow", "jax") and sys.modules[m]]
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-3000:]
    assert (tmp_path / "m.onnx").exists()


def test_reference_replays_the_float32_relu_decisions_it_is_given():
    """A ReLU whose input float32 rounding puts on the other side of zero must not count as a wrong
    rule: the reference takes the float32 run's pass mask (values stay float64) for the vanilla gradient."""
    from types import SimpleNamespace

    source = model("""
        g (float[N, 3, 4, 4] x) => (float[N, 2] y) {
            c = Conv (x, w)
            r = Relu (c)
            f = Flatten (r)
            y = MatMul (f, fc)
        }""", w=randn(4, 3, 1, 1), fc=randn(64, 2))
    graph = prepare_classifier(source)
    relu = next(n.outputs[0].name for n in graph.model.graph if n.op_type == "Relu")
    reference = OnnxReference(graph.model)
    x = randn(1, 3, 4, 4, scale=1.0)
    natural = reference.run(x, np.asarray([1]), score="logit")
    assert natural.replayed == "none" and np.any(natural.gradients["vanilla"])
    closed = np.zeros((1, 8, 4, 4), np.float32)  # every ReLU closed, with 4 channels of padding as a lowered model has
    replayed = reference.run(x, np.asarray([1]), score="logit",
                             decisions=SimpleNamespace(relu_names=[relu], relu_outputs=[closed]))
    assert replayed.replayed == "relus"
    assert not np.any(replayed.gradients["vanilla"]), "every ReLU closed: the replayed gradient must vanish"
    np.testing.assert_allclose(replayed.logits, 0.0, atol=1e-12)
    opened = np.ones((1, 4, 4, 4), np.float32)
    linear = reference.run(x, np.asarray([1]), score="logit",
                           decisions=SimpleNamespace(relu_names=[relu], relu_outputs=[opened]))
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in source.graph.initializer}
    expected = np.einsum("oc,o...->c...", weights["w"][:, :, 0, 0], weights["fc"][:, 1].reshape(4, 4, 4))
    np.testing.assert_allclose(linear.gradients["vanilla"][0], expected, rtol=1e-10, atol=1e-12,
                               err_msg="every ReLU open: the gradient of the linear map")


@pytest.mark.parametrize("op,attrs", [
    ("Conv", 'auto_pad = "SAME_UPPER", strides = [2, 2]'), ("Conv", 'auto_pad = "SAME_LOWER", strides = [2, 3]'),
    ("Conv", 'auto_pad = "VALID", dilations = [2, 1]'), ("MaxPool", 'auto_pad = "SAME_UPPER", kernel_shape = [3, 2], strides = [2, 2]'),
    ("AveragePool", 'auto_pad = "SAME_LOWER", kernel_shape = [3, 3], strides = [2, 2]'),
])
def test_auto_pad_becomes_explicit_pads_with_the_same_values(tmp_path, op, attrs):
    inputs = "x, w" if op == "Conv" else "x"
    source = model(f"""
        g (float[N, 3, 9, 7] x) => (float[N, 4] y) {{
            c = {op} <{attrs}> ({inputs})
            t = Tanh (c)
            f = Flatten (t)
            y = MatMul (f, fc)
        }}""", **({"w": randn(4, 3, 3, 3)} if op == "Conv" else {}))
    inferred = onnx.shape_inference.infer_shapes(source)
    features = int(np.prod([d.dim_value for d in next(v for v in inferred.graph.value_info if v.name == "f")
                            .type.tensor_type.shape.dim][1:]))
    source.graph.initializer.append(numpy_helper.from_array(randn(features, 4), "fc"))
    graph = prepare_classifier(source)
    assert not any(n.attributes.get("auto_pad") for n in graph.model.graph), "auto_pad left in the graph"
    assert any("auto_pad" in note for note in graph.notes)
    _, sess = export(graph, tmp_path)
    x = randn(2, 3, 9, 7, scale=1.0)
    np.testing.assert_allclose(run(sess, x, [0, 1])["logits"], session(source).run(None, {"x": x})[0], rtol=1e-5,
                               atol=1e-5, err_msg=f"{op} {attrs}: explicit pads change the values")


def test_shape_arithmetic_fixed_by_the_input_size_is_folded(tmp_path):
    """torch.onnx splits ShuffleNet's channels with Slices whose ends it computes from Shape, Gather and
    Div: ONNX shape inference leaves their outputs' channel counts unknown, and the Concat's and the
    mean's gradient rules need them static. The fixed input size makes them constants."""
    source = model("""
        g (float[1, 3, 6, 6] x) => (float[1, 3] y) {
            k = Conv <pads = [1, 1, 1, 1]> (x, w)
            s = Shape (k)
            c = Gather <axis = 0> (s, one)
            half = Div (c, two)
            end = Unsqueeze (half, zero)
            a = Slice (k, zero, end, one_axis)
            b = Slice (k, end, big, one_axis)
            j = Concat <axis = 1> (b, a)
            m = ReduceMean <keepdims = 0> (j, axes)
            y = MatMul (m, fc)
        }""", one=np.asarray(1, np.int64), two=np.asarray(2, np.int64), zero=np.asarray([0], np.int64),
        one_axis=np.asarray([1], np.int64), big=np.asarray([1 << 30], np.int64), axes=np.asarray([2, 3], np.int64),
        fc=randn(4, 3), w=randn(4, 3, 3, 3))
    graph = prepare_classifier(source)
    assert any("folded" in note for note in graph.notes), graph.notes
    _, sess = export(graph, tmp_path)
    x = randn(1, 3, 6, 6, scale=1.0)
    out = run(sess, x, [1])
    np.testing.assert_allclose(out["logits"], session(source).run(None, {"x": x})[0], rtol=1e-5, atol=1e-6)
    expected = numeric_gradient(source, x, lambda y: y[0, 1])
    np.testing.assert_allclose(out["gradient"], expected, rtol=1e-4, atol=1e-6)
