"""``gradmap export keras:NAME|PATH``: Keras models through tf2onnx, without torch.

Runs where TensorFlow, Keras and tf2onnx are installed (CI's torch-free keras venv: ``pip install
'.[keras,test]'``) and skips elsewhere. The references are TensorFlow's own: ``tf.GradientTape`` on
float64 models built here as a Keras user would (``keras.config.set_dtype_policy("float64")`` before
the constructor, the exported weights cast), independently of the exporter's own reference, and
``keras.utils.load_img`` + each application's ``preprocess_input`` for the preprocessing.
Models are built at 32x32 (Keras' smallest size for these applications) with random weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import PHOTO_NAMES  # noqa: E402
from gradmap import contract  # noqa: E402
from gradmap.cli import main  # noqa: E402
from gradmap.contract import ModelMetadata  # noqa: E402
from gradmap.export.presets import preset  # noqa: E402
from gradmap.graph import ExportError  # noqa: E402
from gradmap.runtime import preprocess  # noqa: E402

SIZE = 32
# name, the preset its preprocess_input is, what its module is called in keras.applications
APPLICATIONS = [("MobileNetV3Small", "none"), ("ResNet50", "keras-caffe"), ("DenseNet121", "keras-torch")]


def _export(tmp_path, spec, **options):
    from gradmap.export._keras import export_keras

    out = tmp_path / "model.onnx"
    report = export_keras(spec, out, **options)
    return out, report


def _session(path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _metadata(path) -> ModelMetadata:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return ModelMetadata.from_props(props)


@contextlib.contextmanager
def _float64_policy():
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


def _tape(model, images_nchw, target, dtype=np.float64):
    """logits [N, K] and d logit[target] / d image (NCHW) with tf.GradientTape."""
    x = tf.constant(np.transpose(images_nchw, (0, 2, 3, 1)).astype(dtype))
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model(x, training=False)
        chosen = tf.reduce_sum(tf.gather(logits, np.asarray(target)[:, None], axis=1, batch_dims=1))
    gradient = tape.gradient(chosen, x).numpy()
    return logits.numpy().astype(np.float64), np.transpose(gradient, (0, 3, 1, 2)).astype(np.float64)


def _relative(actual, expected) -> float:
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


# -- applications against float64 GradientTape --------------------------------------------------------------

@pytest.mark.parametrize("name,expected_preset", APPLICATIONS)
def test_application_gradients_equal_float64_gradient_tape(tmp_path, name, expected_preset):
    out, report = _export(tmp_path, name, weights="none", seed=3, input_size=(SIZE, SIZE))
    assert report.logits_error is not None and report.gradient_error < 1e-4, report.summary()
    meta = _metadata(out)
    assert meta.source_model == f"keras:{name}" and meta.weights == "random (seed 3)"
    assert meta.preprocessing == preset(expected_preset, (SIZE, SIZE)), "the application's own preprocessing"
    assert len(meta.labels) == 1000 and meta.labels[0] == "tench"

    # the same weights, in a float64 model the Keras user's way, stopped at the logits
    keras.utils.set_random_seed(3)
    model32 = getattr(keras.applications, name)(weights=None, input_shape=(SIZE, SIZE, 3))
    with _float64_policy():
        model64 = getattr(keras.applications, name)(weights=None, input_shape=(SIZE, SIZE, 3),
                                                    classifier_activation=None)
    model64.set_weights([w.astype(np.float64) for w in model32.get_weights()])
    rng = np.random.default_rng(0)
    scale = 255.0 if expected_preset == "none" else 1.0  # the 0-255 input of a model that normalizes inside
    images = (rng.uniform(0, scale, (2, 3, SIZE, SIZE)) if scale > 1 else rng.standard_normal((2, 3, SIZE, SIZE)))
    images = images.astype(np.float32)
    target = np.array([7, 412])
    logits, gradient, target_index = _session(out).run(
        [contract.OUTPUT_LOGITS, contract.BACKPROP_OUTPUTS["vanilla"], contract.OUTPUT_TARGET_INDEX],
        {contract.INPUT_IMAGE: images, contract.INPUT_TARGET: target})
    assert list(target_index) == [7, 412]
    ref_logits, ref_gradient = _tape(model64, images, target)
    # gradmap's float32 graph is as close to float64 TensorFlow as a float32 computation gets (TensorFlow's own
    # float32 gradient of these models: 4e-7 to 8e-7 relative)
    assert _relative(logits, ref_logits) < 1e-5, _relative(logits, ref_logits)
    assert _relative(gradient, ref_gradient) < 1e-5, _relative(gradient, ref_gradient)


def test_every_application_module_maps_to_a_preset():
    from gradmap.export._keras import application_names, application_preset

    expected = {"ResNet50": "keras-caffe", "VGG16": "keras-caffe", "MobileNetV2": "keras-tf",
                "InceptionV3": "keras-tf", "Xception": "keras-tf", "ResNet50V2": "keras-tf",
                "DenseNet121": "keras-torch", "EfficientNetB0": "none", "ConvNeXtTiny": "none",
                "MobileNetV3Small": "none", "EfficientNetV2B0": "none"}
    names = application_names()
    for name, wanted in expected.items():
        assert application_preset(names[name]) == wanted, name
    unmatched = [n for n, f in names.items() if application_preset(f) is None]
    assert not unmatched, f"applications whose preprocess_input no preset equals: {unmatched}"


@pytest.mark.parametrize("photo", PHOTO_NAMES)
def test_application_presets_equal_load_img_and_preprocess_input(tmp_path, photos, photo):
    """gradmap's preprocessing of the preset each application gets equals keras.utils.load_img(target_size)
    (nearest) + the application module's preprocess_input, on the photo as a file."""
    from gradmap.export._keras import application_names, application_preset

    path = tmp_path / f"{photo}.png"
    Image.fromarray(photos[photo]).save(path)
    names = application_names()
    for name, size in (("ResNet50", (224, 224)), ("MobileNetV2", (160, 192)), ("DenseNet121", (224, 224)),
                       ("EfficientNetB0", (96, 128))):
        constructor = names[name]
        module = sys.modules[constructor.__module__]
        pixels = keras.utils.img_to_array(keras.utils.load_img(path, target_size=size))
        expected = np.asarray(module.preprocess_input(pixels[None].copy()))[0].transpose(2, 0, 1)
        with Image.open(path) as picture:
            tensor, _ = preprocess(picture.convert("RGB"), preset(application_preset(constructor), size))
        diff = np.abs(np.asarray(tensor, np.float64) - expected).max()
        assert diff <= 1e-6, (name, photo, diff)


# -- saved models and untrusted files ----------------------------------------------------------------------

def _small_model(lambda_layer: bool = False):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu")(inputs)
    if lambda_layer:
        x = keras.layers.Lambda(lambda t: t * 2.0)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def test_saved_keras_model_needs_a_preset_then_exports_with_parity(tmp_path):
    path = tmp_path / "small.keras"
    _small_model().save(path)
    with pytest.raises(ExportError, match="--preset"):
        _export(tmp_path, str(path))
    out, report = _export(tmp_path, str(path), preprocessing_options={"preset_name": "keras-tf"},
                          score="probability")
    assert "tf.GradientTape" in report.summary() and report.gradient_error < 1e-4
    meta = _metadata(out)
    assert meta.labels == ("0", "1", "2", "3", "4") and meta.extra["cut"] == "Softmax"
    assert meta.preprocessing == preset("keras-tf", (12, 12))


def test_guided_deconvnet_portable_target_and_a_grey_model(tmp_path):
    """--backprop guided/deconvnet (compared with the float64 converted graph), --target portable, and a
    1-channel model, which reads the luma of the RGB image (TensorFlow's reference does the same)."""
    path = tmp_path / "small.keras"
    _small_model().save(path)
    out, report = _export(tmp_path, str(path), preprocessing_options={"preset_name": "keras-tf"},
                          backprops=("vanilla", "guided", "deconvnet"), target="portable")
    assert report.gradient_error < 1e-4 and "guided, deconvnet: compared with the float64 evaluation" in \
        report.summary()
    assert {contract.BACKPROP_OUTPUTS["guided"], contract.BACKPROP_OUTPUTS["deconvnet"]} <= \
        {o.name for o in _session(out).get_outputs()}

    keras.utils.set_random_seed(2)
    inputs = keras.Input((10, 10, 1))
    x = keras.layers.Conv2D(4, 3, activation="tanh")(inputs)
    x = keras.layers.Flatten()(x)
    grey = keras.Model(inputs, keras.layers.Dense(3)(x))
    grey_path = tmp_path / "grey.keras"
    grey.save(grey_path)
    out, report = _export(tmp_path, str(grey_path), preprocessing_options={"preset_name": "none"})
    assert report.gradient_error < 1e-4 and _metadata(out).extra.get("cut") is None
    x = np.random.default_rng(3).uniform(0, 255, (1, 3, 10, 10)).astype(np.float32)
    logits = _session(out).run([contract.OUTPUT_LOGITS], {contract.INPUT_IMAGE: x,
                                                           contract.INPUT_TARGET: np.array([-1])})[0]
    luma = np.tensordot(np.asarray([0.299, 0.587, 0.114]), x[0], axes=1)[None, :, :, None]
    np.testing.assert_allclose(logits, grey(luma.astype(np.float32)).numpy(), rtol=1e-5, atol=1e-4)


def test_exact_gelu_and_dense_on_feature_maps_as_in_convnext(tmp_path):
    """ConvNeXt's block: LayerNormalization, Dense on a feature map, exact GELU (tf2onnx leaves its Erfc as
    it is; the export writes it as 1 - Erf), a residual sum, global pooling."""
    keras.utils.set_random_seed(6)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 4, strides=4)(inputs)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    y = keras.layers.Dense(16)(keras.layers.LayerNormalization(epsilon=1e-6)(y))
    y = keras.layers.Dense(8)(keras.layers.Activation("gelu")(y))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Add()([x, y]))
    outputs = keras.layers.Dense(5, activation="softmax")(keras.layers.LayerNormalization(epsilon=1e-6)(x))
    path = tmp_path / "convnext_block.keras"
    keras.Model(inputs, outputs).save(path)
    _, report = _export(tmp_path, str(path), preprocessing_options={"preset_name": "none"})
    assert report.gradient_error < 1e-4 and "tf.GradientTape" in report.summary()
    assert "Erf" in report.op_types


def _grouped_model():
    """Depthwise convolutions written as grouped Conv2D (groups == input channels), as ConvNeXt writes them:
    one with two filters per group (depth multiplier 2), one strided and dilated inside a nested Sequential."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", groups=4, activation="relu", name="dw_m2")(x)
    inner = keras.Sequential([keras.layers.Conv2D(8, 5, strides=2, padding="same", groups=8, name="dw_strided"),
                              keras.layers.Conv2D(8, 3, dilation_rate=2, groups=8, name="dw_dilated", use_bias=False)],
                             name="inner")
    x = keras.layers.GlobalAveragePooling2D()(inner(x))
    return keras.Model(inputs, keras.layers.Dense(5, name="head")(x))


def test_grouped_conv2d_with_a_group_per_channel_exports_as_depthwise(tmp_path):
    """Keras runs a grouped Conv2D as an XLA-compiled function tf2onnx cannot convert: the export rebuilds the
    depthwise ones as DepthwiseConv2D (the same weights, reshaped); the gradient equals float64 GradientTape of
    the grouped model itself."""
    from gradmap.export._keras import depthwise_rewrite

    keras.utils.set_random_seed(11)
    model32 = _grouped_model()
    path = tmp_path / "grouped.keras"
    model32.save(path)
    rebuilt, names = depthwise_rewrite(model32, "keras:grouped")
    assert names == ["dw_m2", "dw_strided", "dw_dilated"]
    kinds = {layer.name: type(layer).__name__ for layer in rebuilt.layers + rebuilt.get_layer("inner").layers}
    assert kinds["dw_m2"] == kinds["dw_strided"] == kinds["dw_dilated"] == "DepthwiseConv2D"
    assert rebuilt.get_layer("head") is model32.get_layer("head"), "the other layers are shared, not copied"

    out, report = _export(tmp_path, str(path), preprocessing_options={"preset_name": "none"})
    assert any("3 grouped Conv2D layers" in note and "DepthwiseConv2D" in note for note in report.notes), report.notes
    assert report.gradient_error < 1e-4, report.summary()
    with _float64_policy():
        model64 = _grouped_model()
    model64.set_weights([w.astype(np.float64) for w in model32.get_weights()])
    images = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    target = np.array([1, 4])
    logits, gradient = _session(out).run([contract.OUTPUT_LOGITS, contract.BACKPROP_OUTPUTS["vanilla"]],
                                         {contract.INPUT_IMAGE: images, contract.INPUT_TARGET: target})
    ref_logits, ref_gradient = _tape(model64, images, target)
    assert _relative(logits, ref_logits) < 1e-5, _relative(logits, ref_logits)
    assert _relative(gradient, ref_gradient) < 1e-5, _relative(gradient, ref_gradient)

    # several input channels per group: no DepthwiseConv2D equals it; refused by name before conversion
    inputs = keras.Input((8, 8, 4))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(6, 3, groups=2, name="pairs")(inputs))
    with pytest.raises(ExportError, match=r"keras:g: layer 'pairs' is a Conv2D with groups=2 over 4 input channels.*"
                                          r"XLA-compiled"):
        depthwise_rewrite(keras.Model(inputs, pooled), "keras:g")


def test_a_small_convnext_exports_with_float64_gradient_tape_parity(tmp_path):
    """keras.applications' own ConvNeXt builder (the blocks of ConvNeXtTiny: a grouped 7x7 Conv2D, LayerNorm,
    exact GELU, LayerScale), one block per stage, layer scale 1 so that the blocks weigh in the gradient."""
    from keras.src.applications.convnext import ConvNeXt

    def build():
        return ConvNeXt(depths=[1, 1, 1, 1], projection_dims=[8, 16, 24, 32], layer_scale_init_value=1.0,
                        input_shape=(SIZE, SIZE, 3), classes=10, name="convnext_small_test")

    keras.utils.set_random_seed(4)
    model32 = build()
    path = tmp_path / "convnext.keras"
    model32.save(path)
    out, report = _export(tmp_path, str(path), preprocessing_options={"preset_name": "none"})
    assert any("4 grouped Conv2D layers" in note for note in report.notes), report.notes
    assert report.gradient_error < 1e-4 and "Erf" in report.op_types, report.summary()
    with _float64_policy():
        model64 = ConvNeXt(depths=[1, 1, 1, 1], projection_dims=[8, 16, 24, 32], layer_scale_init_value=1.0,
                           input_shape=(SIZE, SIZE, 3), classes=10, name="convnext_small_test",
                           classifier_activation=None)
    model64.set_weights([w.astype(np.float64) for w in model32.get_weights()])
    images = np.random.default_rng(5).uniform(0, 255, (2, 3, SIZE, SIZE)).astype(np.float32)
    target = np.array([3, 9])
    logits, gradient = _session(out).run([contract.OUTPUT_LOGITS, contract.BACKPROP_OUTPUTS["vanilla"]],
                                         {contract.INPUT_IMAGE: images, contract.INPUT_TARGET: target})
    ref_logits, ref_gradient = _tape(model64, images, target)
    assert _relative(logits, ref_logits) < 1e-5, _relative(logits, ref_logits)
    assert _relative(gradient, ref_gradient) < 1e-5, _relative(gradient, ref_gradient)


def test_tensorflow_ops_tf2onnx_leaves_are_rewritten_or_named():
    import onnx
    from onnx import helper
    from scipy import special

    from gradmap.export._keras import _rewrite_tensorflow_ops

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [7])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [7])
    erfc = helper.make_node("Erfc", ["x"], ["y"], name="gelu/Erfc")
    proto = helper.make_model(helper.make_graph([erfc], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    _rewrite_tensorflow_ops(proto, "keras:m")
    onnx.checker.check_model(proto)
    values = np.array([-4, -1.5, -0.3, 0, 0.2, 1, 3], np.float32)
    got = _session_bytes(proto).run(None, {"x": values})[0]
    np.testing.assert_allclose(got, special.erfc(values.astype(np.float64)), atol=2e-7)

    call = helper.make_node("StatefulPartitionedCall", ["x"], ["y"], name="block/depthwise_conv/Call")
    proto = helper.make_model(helper.make_graph([call], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ExportError, match=r"keras:m: tf2onnx left TensorFlow ops it cannot convert: "
                                          r"StatefulPartitionedCall \(first: block/depthwise_conv/.*grouped Conv2D"):
        _rewrite_tensorflow_ops(proto, "keras:m")


def _session_bytes(proto):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_keras_file_with_lambda_code_is_refused_in_safe_mode(tmp_path):
    path = tmp_path / "lambda.keras"
    _small_model(lambda_layer=True).save(path)
    with pytest.raises(ExportError, match="safe mode refused it.*--trust-model"):
        _export(tmp_path, str(path), preprocessing_options={"preset_name": "keras-tf"})
    _, report = _export(tmp_path, str(path), preprocessing_options={"preset_name": "keras-tf"}, trust_model=True)
    assert report.gradient_error < 1e-4


def test_legacy_h5_and_saved_model_need_trust(tmp_path):
    model = _small_model()
    h5 = tmp_path / "small.h5"
    model.save(h5)
    with pytest.raises(ExportError, match=r"legacy HDF5 Keras model can run code .*--trust-model"):
        _export(tmp_path, str(h5), preprocessing_options={"preset_name": "keras-tf"})
    out, report = _export(tmp_path, str(h5), preprocessing_options={"preset_name": "keras-tf"}, trust_model=True)
    assert report.gradient_error < 1e-4
    saved = tmp_path / "saved"
    model.export(saved, verbose=False)
    with pytest.raises(ExportError, match=r"SavedModel runs the graph functions .*--trust-model"):
        _export(tmp_path, str(saved), preprocessing_options={"preset_name": "keras-tf"})
    out, report = _export(tmp_path, str(saved), preprocessing_options={"preset_name": "keras-tf"}, trust_model=True)
    assert "float64 evaluation of the converted graph" in report.summary()
    x = np.random.default_rng(2).standard_normal((1, 3, 12, 12)).astype(np.float32)
    logits = _session(out).run([contract.OUTPUT_LOGITS], {contract.INPUT_IMAGE: x,
                                                           contract.INPUT_TARGET: np.array([-1])})[0]
    probabilities = model(np.transpose(x, (0, 2, 3, 1))).numpy()
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), probabilities, atol=1e-6)


def test_bad_names_paths_and_weights_get_named_errors(tmp_path):
    from gradmap.export._keras import load_keras

    with pytest.raises(ExportError, match="NoSuchNet: not a keras.applications model"):
        load_keras("NoSuchNet")
    with pytest.raises(ExportError, match="missing.keras: no such file"):
        load_keras(str(tmp_path / "missing.keras"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(ExportError, match="not a TensorFlow SavedModel"):
        load_keras(str(tmp_path / "folder"))
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(ExportError, match="broken.keras: Keras cannot load it"):
        load_keras(str(tmp_path / "broken.keras"))
    with pytest.raises(ExportError, match="--weights .*nothing.weights.h5: no such file"):
        load_keras("MobileNetV3Small", weights=str(tmp_path / "nothing.weights.h5"), input_size=(SIZE, SIZE))
    with pytest.raises(ExportError, match="Keras refuses it"):
        load_keras("MobileNetV3Small", weights="none", input_size=(8, 8))


def test_weights_from_a_weights_file_and_imagenet_offline(tmp_path, monkeypatch):
    from gradmap.export._keras import load_keras

    keras.utils.set_random_seed(4)
    donor = keras.applications.MobileNetV3Small(weights=None, input_shape=(SIZE, SIZE, 3))
    path = tmp_path / "w.weights.h5"
    donor.save_weights(path)
    loaded = load_keras("mobilenetv3small", weights=str(path), input_size=(SIZE, SIZE))
    assert loaded.weights == "file w.weights.h5" and loaded.source == "keras:MobileNetV3Small"
    for a, b in zip(loaded.model.get_weights(), donor.get_weights()):
        np.testing.assert_array_equal(a, b)

    import urllib.error

    from keras.src.backend import config
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(config, "keras_home", lambda: str(tmp_path / "empty-keras-home"))
    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    with pytest.raises(ExportError, match=r"ImageNet weights are not in Keras' cache .*empty-keras-home.*--weights"):
        load_keras("MobileNetV3Small", weights="imagenet")


# -- the CLI, torch-free, and what runs downstream -----------------------------------------------------------

def test_cli_exports_keras_and_runs_every_method_with_nhwc_grad_cam(tmp_path, photos):
    out = tmp_path / "m.onnx"
    runner = CliRunner()
    result = runner.invoke(main, ["export", "keras:MobileNetV3Small", "--weights", "none", "--input-size",
                                  str(SIZE), "--cam-layer", "auto", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "tf.GradientTape" in result.output and "Softmax" in result.output, result.output
    cam = _session(out).run([contract.OUTPUT_CAM_ACTIVATION, contract.OUTPUT_CAM_GRADIENT], {
        contract.INPUT_IMAGE: np.random.default_rng(0).uniform(0, 255, (1, 3, SIZE, SIZE)).astype(np.float32),
        contract.INPUT_TARGET: np.array([-1])})
    assert cam[0].ndim == 4 and cam[0].shape[2] < SIZE and cam[0].shape == cam[1].shape, \
        f"an NCHW feature map: {cam[0].shape}"
    picture = tmp_path / "chelsea.png"
    Image.fromarray(photos["chelsea"]).save(picture)
    for method in ("vanilla", "smoothgrad", "integrated-gradients", "grad-cam"):
        maps = tmp_path / method
        args = ["run", str(out), str(picture), "--out", str(maps), "--method", method, "--format", "npy"]
        args += {"smoothgrad": ["--samples", "3"], "integrated-gradients": ["--steps", "4"]}.get(method, [])
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (method, result.output)
        (saved,) = maps.glob("*.map.npy")
        values = np.load(saved)
        assert np.all(np.isfinite(values)) and values.std() > 0, method
    result = runner.invoke(main, ["export", "keras:MobileNetV3Small", "--layout", "nhwc", "-o", str(out)])
    assert result.exit_code == 2 and "only for onnx:PATH" in result.output
    result = runner.invoke(main, ["export", "keras:NoSuchNet", "-o", str(out)])
    assert result.exit_code == 1 and "not a keras.applications model" in result.output


def test_load_reference_rebuilds_the_export_from_its_metadata(tmp_path):
    from gradmap.export._keras import load_reference

    path = tmp_path / "small.keras"
    _small_model().save(path)
    out, _ = _export(tmp_path, str(path), preprocessing_options={"preset_name": "keras-tf"})
    reference = load_reference(f"keras:{path}", metadata=_metadata(out))
    x = np.random.default_rng(5).standard_normal((2, 3, 12, 12)).astype(np.float32)
    target = np.array([1, 3])
    run = reference.run(x, target, score="logit")
    logits, gradient = _session(out).run([contract.OUTPUT_LOGITS, contract.BACKPROP_OUTPUTS["vanilla"]],
                                         {contract.INPUT_IMAGE: x, contract.INPUT_TARGET: target})
    assert run.logits.dtype == np.float64 and _relative(logits, run.logits) < 1e-5
    assert _relative(gradient, run.gradients["vanilla"]) < 1e-5
    # as gradmap verify calls it: DEFAULT and 0 defer to the weights and seed the export recorded
    donor = _small_model()
    donor.set_weights([w + 0.05 * (i + 1) for i, w in enumerate(donor.get_weights())])  # not the file's own
    weights = tmp_path / "w.weights.h5"
    donor.save_weights(weights)
    out2, _ = _export(tmp_path, str(path), weights=str(weights), preprocessing_options={"preset_name": "keras-tf"})
    again = load_reference(f"keras:{path}", weights="DEFAULT", seed=0, metadata=_metadata(out2))
    logits2 = _session(out2).run([contract.OUTPUT_LOGITS], {contract.INPUT_IMAGE: x, contract.INPUT_TARGET: target})[0]
    assert _relative(logits2, again.run(x, target, score="logit").logits) < 1e-5
    assert _relative(logits2, logits) > 1e-2, "the weights file's weights were not the file's own"
    info = json.loads(CliRunner().invoke(main, ["info", str(out), "--json"]).output)
    assert info["extra"]["keras_kind"] == "keras" and info["extra"]["cut"] == "Softmax"


def test_gradmap_verify_checks_a_keras_export_against_gradient_tape_without_torch(tmp_path, photo_files):
    """gradmap verify --reference keras:PATH rebuilds the float64 Keras model (its registry entry is this
    source's load_reference) and checks the file on pictures; with another model's weights it exits 1."""
    path = tmp_path / "small.keras"
    _small_model().save(path)
    out, _ = _export(tmp_path, str(path), preprocessing_options={"preset_name": "keras-tf"})
    pictures = [a for p in photo_files[:2] for a in ("--images", str(p))]
    result = CliRunner().invoke(main, ["verify", str(out), "--reference", f"keras:{path}", *pictures])
    assert result.exit_code == 0, result.output
    assert "all 2 pictures match" in result.output and result.output.count(" ok") == 2, result.output
    assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None], "verify imported torch"
    other = tmp_path / "other.keras"  # the same architecture with other weights
    model = _small_model()
    model.set_weights([w * 1.5 for w in model.get_weights()])
    model.save(other)
    wrong = CliRunner().invoke(main, ["verify", str(out), "--reference", f"keras:{other}", *pictures])
    assert wrong.exit_code == 1 and "MISMATCH" in wrong.output, wrong.output


def test_forward_only_keras_export_gives_the_full_exports_forward_maps(tmp_path, photo_files):
    """--no-gradient on a Keras model: logits checked against the float64 Keras model, occlusion and
    Score-CAM (NHWC feature map) equal to the full export's, gradient methods refused, and gradmap
    verify checks the logits on pictures."""
    from gradmap.runtime import SaliencyModel
    from gradmap.runtime.methods import MethodSpec, UnsupportedMethodError, attribute, check_supported

    path = tmp_path / "small.keras"
    _small_model().save(path)
    options = dict(preprocessing_options={"preset_name": "keras-tf"}, cam_layer="auto")
    (tmp_path / "full").mkdir()
    full_path, _ = _export(tmp_path / "full", str(path), **options)
    out, report = _export(tmp_path, str(path), gradient=False, **options)
    assert report.gradient_error is None and report.logits_error < 1e-5, report.summary()
    assert "tf.GradientTape" in report.summary()
    full, forward = SaliencyModel(full_path, provider="cpu"), SaliencyModel(out, provider="cpu")
    assert forward.metadata.format_version == 3 and not forward.metadata.gradient
    images = np.random.default_rng(1).standard_normal((2, 3, 12, 12)).astype(np.float32)
    targets = np.array([-1, 2])
    for spec in (MethodSpec("occlusion", window=4, stride=2), MethodSpec("score-cam")):
        expected = attribute(full, spec, images, targets)[2]
        actual = attribute(forward, spec, images, targets)[2]
        assert np.abs(expected).max() > 0, spec.name
        assert _relative(actual, expected) < 1e-5, spec.name
    with pytest.raises(UnsupportedMethodError, match="--no-gradient"):
        check_supported(forward, "vanilla")
    pictures = [a for p in photo_files[:2] for a in ("--images", str(p))]
    result = CliRunner().invoke(main, ["verify", str(out), "--reference", f"keras:{path}", *pictures])
    assert result.exit_code == 0 and "all 2 pictures match" in result.output, result.output


# -- the TensorFlow recipe (../shared/recipes/tensorflow2-gradienttape-resnet50.md), reproduced -----------------

#: The options docs/keras.md gives for the recipe (the test swaps --weights imagenet for the recipe model's
#: own random weights, and 224 for a smaller size: the computation is the same at every size).
RECIPE_EXPORT = ["--preset", "keras-torch", "--resize-mode", "exact", "--interpolation", "bilinear",
                 "--no-antialias", "--score", "probability"]
RECIPE_RUN = ["--reduce", "sum"]


def test_tensorflow_recipe_map_is_reproduced(tmp_path, photos):
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "keras.md").read_text()
    assert " ".join(RECIPE_EXPORT) in docs and "gradmap run resnet50.onnx stork.png " + " ".join(RECIPE_RUN) in docs

    size = 64
    picture = tmp_path / "stork.png"
    Image.fromarray(photos["astronaut"]).save(picture)
    keras.utils.set_random_seed(11)
    test_model = keras.applications.resnet50.ResNet50(weights=None, input_shape=(size, size, 3))
    weights = tmp_path / "recipe.weights.h5"
    test_model.save_weights(weights)

    # the recipe, as written (input_img, densenet.preprocess_input, GradientTape, normalize_image)
    image = tf.image.decode_png(tf.io.read_file(str(picture)))
    image = tf.expand_dims(image, axis=0)
    image = tf.cast(image, tf.float32)
    input_img = tf.image.resize(image, [size, size])
    input_img = keras.applications.densenet.preprocess_input(input_img)
    result = test_model(input_img)
    max_idx = tf.argmax(result, axis=1)
    with tf.GradientTape() as tape:
        tape.watch(input_img)
        result = test_model(input_img)
        max_score = result[0, max_idx[0]]
    grads = tape.gradient(max_score, input_img)
    g = grads[0]
    grads_norm = g[:, :, 0] + g[:, :, 1] + g[:, :, 2]
    recipe_map = ((grads_norm - tf.reduce_min(grads_norm)) / (tf.reduce_max(grads_norm) - tf.reduce_min(grads_norm)))
    recipe_map = recipe_map.numpy()

    # gradmap, with the options docs/keras.md gives
    out = tmp_path / "resnet50.onnx"
    runner = CliRunner()
    result = runner.invoke(main, ["export", "keras:ResNet50", "--weights", str(weights), "--input-size", str(size),
                                  *RECIPE_EXPORT, "-o", str(out)])
    assert result.exit_code == 0, result.output
    maps = tmp_path / "maps"
    result = runner.invoke(main, ["run", str(out), str(picture), *RECIPE_RUN, "--format", "npy", "--json",
                                  "--out", str(maps)])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.output)["images"]
    assert record["predictions"][0]["index"] == int(max_idx[0]), (record["predictions"][0], int(max_idx[0]))
    (map_file,) = maps.glob("*.map.npy")
    ours = np.load(map_file)
    assert ours.shape == recipe_map.shape
    # both are float32 computations of the same map: they differ by float32 rounding of the gradient
    # (1e-6 relative, measured) carried through the min-max scaling
    diff = np.abs(ours.astype(np.float64) - recipe_map).max()
    assert diff < 1e-4, diff


# -- Grad-CAM on NHWC feature maps against tf.GradientTape ------------------------------------------------------

def _cam_model():
    """NHWC feature maps of every kind the converted graph has: a Conv2D's (NCHW in the ONNX graph, beside
    tf2onnx's Transposes), one whose height and channels are equal (12x16x12: the shape alone does not tell
    an NHWC map from an NCHW one), and a Dense on a feature map (ConvNeXt's pointwise layers: a MatMul on the
    NHWC map itself). Not square, so that a height/width swap shows."""
    inputs = keras.Input((24, 32, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="block")(x)
    x = keras.layers.Dense(12, name="mix")(x)
    x = keras.layers.Activation("relu", name="mixed")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5, activation="softmax", name="scores")(x))


@pytest.mark.parametrize("cam_layer,layer", [("auto", "mixed"), ("mixed", "mixed"), ("block", "block"),
                                             ("mix", "mix"), ("pool", "pool")])
def test_grad_cam_equals_gradient_tape_on_the_nhwc_layer(tmp_path, cam_layer, layer):
    """--cam-layer auto and --cam-layer LAYER (a Keras layer name): the file's feature map, its gradient and
    Grad-CAM from them equal tf.GradientTape's on that NHWC layer of the float64 Keras model."""
    _assert_grad_cam_equals_gradient_tape(tmp_path, _cam_model, cam_layer, layer)


def _flatten_model():
    """VGG16's head (include_top=True), the classic Keras Grad-CAM model: the last pooled map flattened into
    Dense layers (tf2onnx: a Transpose to NHWC, then a Reshape)."""
    inputs = keras.Input((24, 32, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="c1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Dense(16, activation="relu", name="fc")(keras.layers.Flatten()(x))
    return keras.Model(inputs, keras.layers.Dense(5, activation="softmax", name="scores")(x))


@pytest.mark.parametrize("cam_layer,layer", [("auto", "pool2"), ("c2", "c2")])
def test_grad_cam_on_a_map_flattened_into_the_classifier(tmp_path, cam_layer, layer):
    """--cam-layer auto on a Flatten head takes the flattened NHWC map on its NCHW side (it was the NHWC map
    read as NCHW: 6x8x8 maps of the wrong axes)."""
    _assert_grad_cam_equals_gradient_tape(tmp_path, _flatten_model, cam_layer, layer)


def _assert_grad_cam_equals_gradient_tape(tmp_path, build, cam_layer, layer):
    from gradmap.runtime.cam import grad_cam

    keras.utils.set_random_seed(8)
    model = build()
    path = tmp_path / "cam.keras"
    model.save(path)
    out, report = _export(tmp_path, str(path), preprocessing_options={"preset_name": "keras-tf"}, cam_layer=cam_layer)
    assert _metadata(out).cam_layer.startswith(f"{cam_layer} ("), _metadata(out).cam_layer
    with _float64_policy():
        model64 = build()
    model64.set_weights([w.astype(np.float64) for w in model.get_weights()])
    model64.get_layer("scores").activation = keras.activations.linear
    both = keras.Model(model64.inputs, [model64.get_layer(layer).output, model64.output])
    images = np.random.default_rng(4).uniform(-1, 1, (2, 3, 24, 32)).astype(np.float32)
    target = np.array([1, 3])
    x = tf.constant(images.transpose(0, 2, 3, 1).astype(np.float64))
    with tf.GradientTape() as tape:
        feature_map, logits = both(x, training=False)
        chosen = tf.reduce_sum(tf.gather(logits, target[:, None], axis=1, batch_dims=1))
    gradient = tape.gradient(chosen, feature_map).numpy()
    activation = feature_map.numpy()
    # Grad-CAM on the NHWC map: the channel weights are the gradient's mean over height and width
    expected_cam = np.maximum((gradient.mean(axis=(1, 2), keepdims=True) * activation).sum(axis=-1), 0)
    got_activation, got_gradient = _session(out).run(
        [contract.OUTPUT_CAM_ACTIVATION, contract.OUTPUT_CAM_GRADIENT],
        {contract.INPUT_IMAGE: images, contract.INPUT_TARGET: target})
    assert got_activation.shape == activation.transpose(0, 3, 1, 2).shape, (got_activation.shape, activation.shape)
    assert _relative(got_activation, activation.transpose(0, 3, 1, 2)) < 1e-5
    assert _relative(got_gradient, gradient.transpose(0, 3, 1, 2)) < 1e-5
    assert np.count_nonzero(expected_cam) > expected_cam.size // 10, "a Grad-CAM worth comparing"
    assert _relative(grad_cam(got_activation, got_gradient), expected_cam) < 1e-5


def test_cam_layer_names_that_cannot_be_taken_are_refused(tmp_path):
    keras.utils.set_random_seed(8)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="norm")(x)  # tf2onnx folds it into the Conv: conv has no value
    x = keras.layers.GlobalAveragePooling2D()(x)
    path = tmp_path / "m.keras"
    keras.Model(inputs, keras.layers.Dense(3, name="scores")(x)).save(path)
    options = {"preprocessing_options": {"preset_name": "keras-tf"}, "verify": False}
    with pytest.raises(ExportError, match=r"'conv': no value of the converted graph equals the layer's output"):
        _export(tmp_path, str(path), cam_layer="conv", **options)
    with pytest.raises(ExportError, match=r"'scores': the layer's output has shape \(None, 3\)"):
        _export(tmp_path, str(path), cam_layer="scores", **options)
    with pytest.raises(ExportError, match=r"'nothing': neither a layer of the Keras model \(its feature maps: conv, "
                                          r"norm\)"):
        _export(tmp_path, str(path), cam_layer="nothing", **options)
    out, _ = _export(tmp_path, str(path), cam_layer="norm", **options)
    assert _metadata(out).cam_layer.startswith("norm (")

    with pytest.raises(ExportError, match=r"'deep': the layer is two or more models deep \(inside 'base'\)"):
        _export(tmp_path, str(_nested_model(tmp_path, depth=2)), cam_layer="deep", **options)


def _nested_model(tmp_path, depth: int = 1):
    """Transfer learning, Keras' way: a base model (Conv2D 'inner', then 'deep' in a model inside it at depth
    2) as one layer of the classifier, after a Rescaling layer."""
    keras.utils.set_random_seed(9)
    base_inputs = keras.Input((16, 20, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="inner")(base_inputs)
    if depth == 2:
        deep_inputs = keras.Input((14, 18, 6))
        x = keras.Model(deep_inputs, keras.layers.Conv2D(6, 3, activation="relu", name="deep")(deep_inputs),
                        name="outer")(x)
    x = keras.layers.Conv2D(5, 3, activation="relu", name="last")(x)
    base = keras.Model(base_inputs, x, name="base")
    inputs = keras.Input((16, 20, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(keras.layers.Rescaling(0.5, offset=0.1, name="rescale")(inputs)))
    path = tmp_path / f"nested{depth}.keras"
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="scores")(x)).save(path)
    return path


@pytest.mark.parametrize("cam_layer", ["auto", "base", "inner", "last"])
def test_cam_layer_inside_a_base_model(tmp_path, cam_layer):
    """--cam-layer on a classifier whose feature extractor is a nested Keras model: a layer of the base model
    by its name, the base model's output by the base's name; the map equals the layer's (NCHW) in Keras."""
    path = _nested_model(tmp_path)
    out, _ = _export(tmp_path, str(path), preprocessing_options={"preset_name": "keras-tf"}, cam_layer=cam_layer)
    assert _metadata(out).cam_layer.startswith(f"{cam_layer} ("), _metadata(out).cam_layer
    model = keras.saving.load_model(path)
    base = model.get_layer("base")
    layer = {"auto": "last", "base": "last"}.get(cam_layer, cam_layer)
    images = np.random.default_rng(2).uniform(-1, 1, (2, 3, 16, 20)).astype(np.float32)
    base_input = model.get_layer("rescale")(np.transpose(images, (0, 2, 3, 1)))
    expected = keras.Model(base.input, base.get_layer(layer).output)(base_input).numpy().transpose(0, 3, 1, 2)
    activation = _session(out).run([contract.OUTPUT_CAM_ACTIVATION], {contract.INPUT_IMAGE: images,
                                                                      contract.INPUT_TARGET: np.array([0, 2])})[0]
    assert activation.shape == expected.shape and _relative(activation, expected) < 1e-5
