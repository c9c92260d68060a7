"""Preprocessing conventions beyond torchvision's (model format 2): the 0-255 pixel scale, BGR channel
order and tf.image.resize's bilinear resize without antialiasing, with the named presets.

The references here are written independently from the conventions' own definitions (Keras'
``imagenet_utils._preprocess_numpy_input`` formulas, a float64 half-pixel bilinear resize through
``scipy.ndimage.map_coordinates``); tests/test_keras_source.py compares the same steps with Keras and
TensorFlow themselves where TensorFlow is installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import PHOTO_NAMES, assert_close
from gradmap import contract
from gradmap.contract import ContractError, ModelMetadata, Preprocessing
from gradmap.export.presets import KERAS_CAFFE_MEAN, PRESETS, override, preset
from gradmap.runtime import preprocess
from gradmap.runtime.methods import baseline_image
from gradmap.runtime.preprocess import resize_bilinear_no_antialias

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _keras_load_img(picture: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """keras.utils.load_img(target_size=size): Pillow's nearest resize to (width, height), as float32."""
    return np.asarray(picture.resize((size[1], size[0]), Image.Resampling.NEAREST), dtype=np.float32)


def _keras_preprocess_input(x: np.ndarray, mode: str) -> np.ndarray:
    """keras.applications.imagenet_utils' numpy preprocessing, [H, W, 3] float32 RGB -> NHWC as Keras gives."""
    x = x.copy()
    if mode == "tf":
        x /= 127.5
        x -= 1.0
        return x
    if mode == "torch":
        x /= 255.0
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    else:  # caffe
        x = x[..., ::-1]
        mean, std = [103.939, 116.779, 123.68], None
    for c in range(3):
        x[..., c] -= mean[c]
        if std is not None:
            x[..., c] /= std[c]
    return x


@pytest.mark.parametrize("name", PHOTO_NAMES)
@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_keras_presets_equal_keras_formulas(photos, name, mode):
    picture = Image.fromarray(photos[name])
    p = preset(f"keras-{mode}", (224, 224))
    tensor, geometry = preprocess(picture, p)
    expected = _keras_preprocess_input(_keras_load_img(picture, (224, 224)), mode).transpose(2, 0, 1)
    assert_close(tensor, expected, 0.0 if mode != "torch" else 1e-6, f"keras {mode} preprocessing of {name}")
    assert geometry.resized_size == (224, 224) and (geometry.crop_top, geometry.crop_left) == (0, 0)


def test_none_preset_is_raw_pixels(photos):
    picture = Image.fromarray(photos["rocket"])
    tensor, _ = preprocess(picture, preset("none", (96, 128)))
    assert_close(tensor, _keras_load_img(picture, (96, 128)).transpose(2, 0, 1), 0.0, "raw 0-255 RGB")


def test_torchvision_preset_is_the_default_preprocessing():
    assert preset("torchvision", (224, 224)) == Preprocessing()
    assert preset("torchvision", (160, 160)).resize == 182


def _half_pixel_bilinear_reference(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Half-pixel-centered bilinear sampling, edges clamped (TensorFlow's definition), interpolated in
    float64. The source coordinates are float32, as TensorFlow's kernel computes them: in float64 they
    move by up to 3e-5 pixels at 500 pixels, which moves a value by up to 0.006 on a sharp edge."""
    in_h, in_w = pixels.shape[:2]
    f32 = np.float32
    ys = ((np.arange(height, dtype=f32) + f32(0.5)) * f32(in_h / height) - f32(0.5)).astype(np.float64)
    xs = ((np.arange(width, dtype=f32) + f32(0.5)) * f32(in_w / width) - f32(0.5)).astype(np.float64)
    grid = np.meshgrid(np.clip(ys, 0, in_h - 1), np.clip(xs, 0, in_w - 1), indexing="ij")
    return np.stack([ndimage.map_coordinates(pixels[..., c].astype(np.float64), grid, order=1)
                     for c in range(pixels.shape[2])], axis=-1)


@pytest.mark.parametrize("size", [(224, 224), (100, 333), (700, 900)], ids=["shrink", "mixed", "enlarge"])
def test_resize_without_antialias_is_half_pixel_bilinear(photos, size):
    pixels = photos["astronaut"]
    resized = resize_bilinear_no_antialias(pixels, *size)
    assert resized.dtype == np.float32 and resized.shape == (*size, 3)
    # float32 weights against float64 ones: a few float32 ulps of 255
    assert_close(resized, _half_pixel_bilinear_reference(pixels, *size), 1e-4, "half-pixel bilinear")


def test_resize_without_antialias_keeps_float_values(photos):
    resized = resize_bilinear_no_antialias(photos["coffee"], 123, 171)
    assert np.any(resized != np.round(resized)), "tf.image.resize gives float pixels; they must not be rounded"


def test_tensorflow_recipe_preprocessing(photos):
    """The TensorFlow recipe: tf.image.resize of the whole picture to 224 x 224 (float), then
    densenet.preprocess_input (torch mode), no crop."""
    p = override(preset("keras-torch", (224, 224)), interpolation="bilinear", antialias=False)
    picture = Image.fromarray(photos["chelsea"])
    tensor, _ = preprocess(picture, p)
    resized = _half_pixel_bilinear_reference(photos["chelsea"], 224, 224)
    expected = ((resized / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    assert_close(tensor, expected, 2e-6, "recipe preprocessing")


def test_bgr_uses_mean_in_tensor_order(photos):
    picture = Image.fromarray(photos["coffee"])
    p = Preprocessing(crop=(64, 64), resize=(64, 64), resize_mode="exact", channel_order="bgr",
                      value_range="0-255", mean=KERAS_CAFFE_MEAN, std=(1.0, 1.0, 1.0))
    tensor, _ = preprocess(picture, p)
    rgb = np.asarray(picture.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
    assert_close(tensor[0], rgb[..., 2] - np.float32(103.939), 0.0, "channel 0 is blue minus the blue mean")
    assert_close(tensor[2], rgb[..., 0] - np.float32(123.68), 0.0, "channel 2 is red minus the red mean")


def test_format_version_is_the_lowest_that_describes_the_model():
    plain = ModelMetadata(source_model="m", weights="w", preprocessing=Preprocessing(), labels=("a", "b"))
    assert plain.to_props()["gradmap.format_version"] == "1"
    assert "value_range" not in json.loads(plain.to_props()["gradmap.preprocessing"])
    for name in ("keras-caffe", "none"):
        meta = ModelMetadata(source_model="m", weights="w", preprocessing=preset(name, (32, 32)), labels=("a", "b"))
        props = meta.to_props()
        assert props["gradmap.format_version"] == "2" and meta.format_version == 2
        again = ModelMetadata.from_props(props)
        assert again.preprocessing == meta.preprocessing and again.format_version == 2
    tf_resize = Preprocessing(crop=(32, 32), resize=(32, 32), resize_mode="exact", antialias=False)
    props = ModelMetadata(source_model="m", weights="w", preprocessing=tf_resize, labels=("a",)).to_props()
    assert props["gradmap.format_version"] == "2" and json.loads(props["gradmap.preprocessing"])["antialias"] is False


def test_newer_format_is_refused_with_upgrade_hint():
    props = ModelMetadata(source_model="m", weights="w", preprocessing=Preprocessing(), labels=("a",)).to_props()
    props["gradmap.format_version"] = str(contract.FORMAT_VERSION + 1)
    with pytest.raises(ContractError, match="upgrade gradmap"):
        ModelMetadata.from_props(props)


@pytest.mark.parametrize("fields, message", [
    (dict(value_range="0-2"), "value_range '0-2' is not one of 0-1, 0-255"),
    (dict(channel_order="grb"), "channel_order 'grb' is not one of rgb, bgr"),
    (dict(antialias=False, interpolation="bicubic"), "interpolation 'bicubic' has no such mode"),
    (dict(antialias="no"), "antialias must be true or false"),
])
def test_bad_fields_are_named(fields, message):
    with pytest.raises(ContractError, match=message):
        Preprocessing(**fields)


def test_override_and_bad_presets():
    base = preset("keras-tf", (224, 224))
    moved = override(base, crop=160)
    assert moved.crop == (160, 160) and moved.resize == (160, 160), "an exact resize to the input follows the crop"
    assert override(preset("torchvision", (224, 224)), resize=(300, 300)).resize == 300
    assert override(base, mean=None) == base
    with pytest.raises(ContractError, match="unknown preprocessing preset 'caffe'"):
        preset("caffe", (224, 224))
    with pytest.raises(ContractError, match="unknown preprocessing field"):
        override(base, colour="red")
    with pytest.raises(ContractError, match="resize_mode 'shorter' takes one size"):
        override(preset("torchvision", (224, 224)), resize=(300, 200))
    assert list(PRESETS) == ["torchvision", "keras-caffe", "keras-tf", "keras-torch", "none"]


def test_uniform_baseline_spans_the_pixel_range():
    images = np.zeros((1, 3, 8, 8), np.float32)
    unit = baseline_image(images, "uniform", (0, 0, 0), (1, 1, 1), seed=3)
    wide = baseline_image(images, "uniform", (0, 0, 0), (1, 1, 1), seed=3, value_range="0-255")
    assert_close(wide, unit * 255, 1e-4, "0-255 uniform baseline")
    assert unit.max() <= 1 and wide.max() > 200
