"""Preprocessing against torchvision's transforms, and picture loading for every PIL mode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import PHOTO_NAMES, assert_close
from gradmap.contract import Preprocessing
from gradmap.runtime import (
    ImageLoadError,
    center_crop_offsets,
    load_picture,
    preprocess,
    resized_size,
    to_rgb,
)

IMAGENET = Preprocessing()  # Resize(256), CenterCrop(224), ImageNet mean/std, bilinear


def _torchvision_reference(picture: Image.Image, p: Preprocessing, no_crop: bool) -> np.ndarray:
    pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")
    mode = getattr(transforms.InterpolationMode, p.interpolation.upper())
    steps = ([transforms.Resize(p.crop, interpolation=mode)] if no_crop else
             [transforms.Resize(p.resize, interpolation=mode), transforms.CenterCrop(p.crop)])
    pipeline = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(p.mean, p.std)])
    return pipeline(picture).numpy()


@pytest.mark.parametrize("name", PHOTO_NAMES)
@pytest.mark.parametrize("no_crop", [False, True], ids=["resize-crop", "no-crop"])
def test_matches_torchvision_on_photos(photos, name, no_crop):
    picture = Image.fromarray(photos[name]).convert("RGB")
    tensor, geometry = preprocess(picture, IMAGENET, no_crop=no_crop)
    expected = _torchvision_reference(picture, IMAGENET, no_crop)
    assert_close(tensor, expected, 1e-6, f"{name} preprocessing")
    assert tensor.dtype == np.float32
    assert geometry.original_size == (picture.height, picture.width)


@pytest.mark.parametrize("p", [
    Preprocessing(crop=(224, 224), resize=232, interpolation="bicubic"),
    Preprocessing(crop=(299, 299), resize=342, interpolation="bilinear"),
    Preprocessing(crop=(32, 48), resize=36, interpolation="nearest"),
    Preprocessing(crop=(300, 600), resize=256, interpolation="lanczos"),  # crop larger than the picture: padding
    Preprocessing(crop=(64, 64), resize=None, interpolation="box"),
], ids=["bicubic232", "inception", "nearest-rect", "lanczos-padded", "no-resize"])
def test_matches_torchvision_other_presets(photos, p):
    picture = Image.fromarray(photos["coffee"])
    if p.resize is None:
        pytest.importorskip("torch")
        transforms = pytest.importorskip("torchvision.transforms")
        ref = transforms.Compose([transforms.CenterCrop(p.crop), transforms.ToTensor(),
                                  transforms.Normalize(p.mean, p.std)])(picture).numpy()
    else:
        ref = _torchvision_reference(picture, p, False)
    assert_close(preprocess(picture, p)[0], ref, 1e-6, "preprocessing")


def test_resize_and_crop_arithmetic():
    # torchvision: shorter side -> 256, longer int(256 * long / short); crop at int(round(.../2.0))
    assert resized_size(300, 451, 256) == (256, int(256 * 451 / 300))
    assert resized_size(451, 300, 256) == (int(256 * 451 / 300), 256)
    assert center_crop_offsets(256, 384, 224, 224) == (16, 80)
    assert center_crop_offsets(225, 227, 224, 224) == (0, 2)  # round(0.5) == 0, round(1.5) == 2
    assert center_crop_offsets(20, 10, 32, 32) == (-6, -11)   # padding before = (crop - size) // 2


def test_geometry_box_in_original(photos):
    picture = Image.fromarray(photos["chelsea"])  # 451 x 300
    _, geometry = preprocess(picture, IMAGENET)
    assert geometry.resized_size == (256, 384)
    assert (geometry.crop_top, geometry.crop_left) == (16, 80)
    top, left, bottom, right = geometry.box_in_original
    assert (top, bottom) == pytest.approx((16 * 300 / 256, 240 * 300 / 256))
    assert (left, right) == pytest.approx((80 * 451 / 384, 304 * 451 / 384))
    _, whole = preprocess(picture, IMAGENET, no_crop=True)
    assert whole.box_in_original == pytest.approx((0, 0, 300, 451))


def _save(image: Image.Image, fmt: str, **kw) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    buffer.seek(0)
    return buffer


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=100)
    picture = load_picture(path)
    assert picture.size == (10, 20), "EXIF orientation 6 must swap width and height"
    top = np.asarray(picture)[:3].mean()
    bottom = np.asarray(picture)[-3:].mean()
    assert top > 200 and bottom < 50, "the white left half must end up on top after rotating clockwise"


def test_alpha_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)        # fully transparent black -> white
    rgba[0, 1] = (255, 0, 0, 255)    # opaque red stays red
    rgba[1, 0] = (0, 0, 0, 128)      # half-transparent black -> mid grey
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [255, 0, 0]
    assert abs(int(out[1, 0, 0]) - 127) <= 1
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert np.asarray(to_rgb(la))[0, 0].tolist() == [255, 255, 255]


def test_palette_with_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    out = np.asarray(to_rgb(p))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [0, 255, 0]


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    picture = load_picture(path)
    assert np.asarray(picture)[0, :, 0].tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize("mode,values,expected", [
    ("I", np.array([[0, 100, 255]], np.int32), [0, 100, 255]),
    ("I", np.array([[0, 257, 65535]], np.int32), [0, 1, 255]),
    ("F", np.array([[0.0, 0.5, 1.0]], np.float32), [0, 128, 255]),
    ("F", np.array([[-1.0, 0.0, 1.0]], np.float32), [0, 128, 255]),
])
def test_integer_and_float_modes(mode, values, expected):
    out = np.asarray(to_rgb(Image.fromarray(values, mode)))
    assert out.shape == (1, 3, 3) and out[0, :, 0].tolist() == expected


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "RGBA", "LA", "I;16", "I", "F", "RGBX", "HSV"])
def test_every_mode_becomes_rgb(photos, mode):
    base = Image.fromarray(photos["astronaut"][:40, :30])
    image = base.convert("L").convert(mode) if mode in ("I;16", "I", "F") else base.convert(mode)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (30, 40)


def test_load_errors(tmp_path, photos):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_save(Image.fromarray(photos["chelsea"]), "JPEG").getvalue()[:2000])
    for path, reason in [(empty, "empty file"), (text, "not an image"), (truncated, "cannot decode"),
                         (tmp_path / "missing.jpg", "no such file")]:
        with pytest.raises(ImageLoadError, match=reason) as info:
            load_picture(path)
        assert info.value.path == str(path)
