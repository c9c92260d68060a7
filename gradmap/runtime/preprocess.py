"""From a picture file to the model's ``image`` tensor, exactly as torchvision's presets do it.

torchvision's classification presets are ``Resize(resize) -> CenterCrop(crop) -> ToTensor ->
Normalize(mean, std)`` on a PIL image. This module reproduces them on PIL + numpy (tests compare with
torchvision to 1e-6) and remembers where the crop came from so a saliency map can be put back onto the
original picture.

Conversion to RGB (:func:`to_rgb`), for every PIL mode:

- alpha (RGBA, LA, PA, P with transparency, RGBa, La) is composited over a **white** background, as
  a browser shows a transparent picture on a white page; dropping alpha instead would expose whatever
  colour the transparent pixels happen to hold (often black).
- 16-bit grey (``I;16*``) is scaled to 8 bits by ``round(v / 257)`` (65535 -> 255), not clipped.
- 32-bit integer (``I``) is taken as 8-bit when it lies in [0, 255], as 16-bit when in [0, 65535],
  otherwise stretched min-max; float (``F``) in [0, 1] is scaled by 255, otherwise stretched min-max.
- everything else (1, L, P, CMYK, YCbCr, LAB, HSV...) goes through PIL's own ``convert("RGB")``.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from gradmap.contract import Preprocessing
from gradmap.runtime.errors import ImageLoadError

__all__ = [
    "CropGeometry",
    "EncodedPicture",
    "PIL_FILTERS",
    "center_crop_offsets",
    "keep_ratio_size",
    "load_picture",
    "normalize_pixels",
    "open_picture",
    "preprocess",
    "resize_bilinear_no_antialias",
    "resized_size",
    "to_rgb",
]

logger = logging.getLogger(__name__)

PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class CropGeometry:
    """Where the model's input came from.

    ``original_size`` is the picture's (height, width) after EXIF orientation, ``resized_size`` its
    size after ``Resize``, and ``crop_top``/``crop_left``/``crop_size`` the crop window in resized
    pixels (negative offsets when the crop is larger than the picture and got zero padding).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_top: int
    crop_left: int
    crop_size: tuple[int, int]

    @property
    def box_in_original(self) -> tuple[float, float, float, float]:
        """The crop window in original-picture pixels: (top, left, bottom, right), possibly outside."""
        sy = self.original_size[0] / self.resized_size[0]
        sx = self.original_size[1] / self.resized_size[1]
        return (self.crop_top * sy, self.crop_left * sx,
                (self.crop_top + self.crop_size[0]) * sy, (self.crop_left + self.crop_size[1]) * sx)


@dataclass(frozen=True)
class EncodedPicture:
    """A picture file's bytes, read elsewhere (e.g. by a Ray read task), and the path they came from:
    decoded exactly as the file at ``path`` would be, and named ``path`` in results and errors.
    ``data=None`` reads the file at ``path`` instead."""

    path: str
    data: bytes | None = None


def to_rgb(picture: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = picture.mode
    if mode == "RGB":
        return picture
    if mode == "P" and "transparency" in picture.info:
        picture, mode = picture.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = picture.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(picture).astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"mode {mode} picture contains NaN or Inf")
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if mode == "F" and low >= 0 and high <= 1:
            scaled = values * 255.0
        elif mode != "F" and low >= 0 and high <= 255 and not mode.startswith("I;16"):
            scaled = values
        elif mode != "F" and low >= 0 and high <= 65535:
            scaled = values / 257.0
        else:
            scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
        grey = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    return picture.convert("RGB")


def load_picture(path: str | os.PathLike[str]) -> Image.Image:
    """Open a picture, apply its EXIF orientation and convert it to RGB (see :func:`open_picture`).

    Raises:
        ImageLoadError: missing, empty, truncated or unreadable file, a decompression bomb, or a mode
            that cannot be converted.
    """
    return open_picture(path)[0]


def open_picture(path: str | os.PathLike[str], data: bytes | None = None) -> tuple[Image.Image, list[str]]:
    """Like :func:`load_picture`, also returning notes about what was done (e.g. the first frame of
    an animated GIF or multi-page TIFF was used).

    A picture over PIL's ``Image.MAX_IMAGE_PIXELS`` (about 89 megapixels) is refused before it is
    decoded: PIL only warns up to twice that limit and would decode it, so the warning is turned
    into an error here.

    Args:
        path: the picture file, or the name of ``data``.
        data: the file's bytes, when they were read already; ``path`` is then only its name.

    Raises:
        ImageLoadError: as :func:`load_picture`.
    """
    path = os.fspath(path)
    notes: list[str] = []
    try:
        if (os.path.getsize(path) if data is None else len(data)) == 0:
            raise ImageLoadError(path, "empty file")
        # catch_warnings is process-global: a DecompressionBombWarning from another thread's load in
        # the same instant is also raised, in that thread -- a refusal, never a silent huge decode.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as opened:
                frames = getattr(opened, "n_frames", 1)
                if frames > 1:
                    notes.append(f"{opened.format} with {frames} frames: used the first")
                    opened.seek(0)
                opened.load()
                picture = ImageOps.exif_transpose(opened)
                picture.load()
                return to_rgb(picture), notes
    except ImageLoadError:
        raise
    except FileNotFoundError as e:
        raise ImageLoadError(path, "no such file") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        size = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(size.group(1)):,} pixels" if size else str(e)
        raise ImageLoadError(path, f"refused as a possible decompression bomb: {pixels}, over PIL's limit of "
                                   f"{Image.MAX_IMAGE_PIXELS:,} (Image.MAX_IMAGE_PIXELS)") from e
    except Image.UnidentifiedImageError as e:
        raise ImageLoadError(path, "not an image (PIL cannot identify it)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageLoadError(path, f"cannot decode image: {e}") from e


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """Size after torchvision's ``Resize(resize)``: shorter side ``resize``, longer side truncated.

    Mirrors ``torchvision.transforms.functional._compute_resized_output_size``.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_h, new_w


def keep_ratio_size(height: int, width: int, box: tuple[int, int], longest: bool = False) -> tuple[int, int]:
    """Size after timm's ``ResizeKeepRatio(box)``: both sides divided by the smaller ratio of picture
    to box (``longest``: the larger one), each rounded with Python's round."""
    ratio_h, ratio_w = height / box[0], width / box[1]
    ratio = max(ratio_h, ratio_w) if longest else min(ratio_h, ratio_w)
    return round(height / ratio), round(width / ratio)


def center_crop_offsets(height: int, width: int, crop_height: int, crop_width: int,
                        rounding: str = "round") -> tuple[int, int]:
    """(top, left) of the center crop window; negative where the crop pads the picture.

    ``round`` (torchvision's ``CenterCrop``, timm's ``CenterCropOrPad``): pad ``(crop - size) // 2``
    before (the extra pixel after), crop at ``int(round((size - crop) / 2.0))`` -- Python's round,
    so halves go to even. ``floor`` (Hugging Face's ``center_crop``): ``(size - crop) // 2`` either way.
    """
    def offset(size: int, crop: int) -> int:
        if rounding == "floor":
            return (size - crop) // 2
        return -((crop - size) // 2) if crop > size else int(round((size - crop) / 2.0))

    return offset(height, crop_height), offset(width, crop_width)


def _half_pixel_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (or columns) and weights of TensorFlow's half-pixel bilinear resize, in float32 as
    its kernel computes them (resize_bilinear_op.cc: ``(x + 0.5f) * scale - 0.5f``, the lower tap
    clamped at 0, the upper one ``ceil`` clamped at the last pixel)."""
    scale = np.float32(in_size / out_size)
    source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(source)
    lower = np.maximum(floor, 0).astype(np.int64)
    upper = np.minimum(np.ceil(source), in_size - 1).astype(np.int64)
    return lower, upper, (source - floor).astype(np.float32)


def resize_bilinear_no_antialias(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """``tf.image.resize(pixels, (height, width))`` with its defaults (bilinear, half-pixel centers, no
    antialiasing): [H, W, C] pixels (any numeric type) to float32 [height, width, C], not rounded.

    The same float32 operations in the same order as TensorFlow's CPU kernel:
    ``top = tl + (tr - tl) * dx``, ``bottom = bl + (br - bl) * dx``, ``top + (bottom - top) * dy``.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    y0, y1, dy = _half_pixel_taps(pixels.shape[0], height)
    x0, x1, dx = _half_pixel_taps(pixels.shape[1], width)
    dx = dx[None, :, None]
    top_rows, bottom_rows = pixels[y0], pixels[y1]
    top = top_rows[:, x0] + (top_rows[:, x1] - top_rows[:, x0]) * dx
    bottom = bottom_rows[:, x0] + (bottom_rows[:, x1] - bottom_rows[:, x0]) * dx
    return (top + (bottom - top) * dy[:, None, None]).astype(np.float32)


def crop_window(pixels: np.ndarray, top: int, left: int, size: tuple[int, int], fill=0) -> np.ndarray:
    """The ``size`` window of ``pixels`` ([H, W, ...]) at (top, left), ``fill`` (zero, as
    torchvision's CenterCrop pads; per channel for timm's border mode) where it reaches past the
    picture (negative offsets included)."""
    crop_h, crop_w = size
    window = np.empty((crop_h, crop_w, *pixels.shape[2:]), dtype=pixels.dtype)
    window[...] = np.asarray(fill, dtype=pixels.dtype)
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(top + crop_h, pixels.shape[0]), min(left + crop_w, pixels.shape[1])
    window[src_top - top:src_bottom - top, src_left - left:src_right - left] = \
        pixels[src_top:src_bottom, src_left:src_right]
    return window


def preprocess(picture: Image.Image, preprocessing: Preprocessing, *, no_crop: bool = False
               ) -> tuple[np.ndarray, CropGeometry]:
    """Turn an RGB picture into the model's normalized input and the crop geometry.

    Args:
        picture: an RGB PIL image (see :func:`load_picture`).
        preprocessing: the model's :class:`~gradmap.contract.Preprocessing`.
        no_crop: resize the whole picture to the input size (``Resize((h, w))``, as the VGG-19 recipe
            does) instead of resize + center crop, so that the map covers all of the picture.

    Returns:
        float32 array [3, h, w] equal to torchvision's ``Normalize(ToTensor(CenterCrop(Resize(p))))``
        (timm's eval transform and Hugging Face's PIL image processors likewise, per ``resize_mode``
        and ``crop_rounding``), and the :class:`CropGeometry`.
    """
    if picture.mode != "RGB":
        picture = to_rgb(picture)
    crop_h, crop_w = preprocessing.crop
    height, width = picture.height, picture.width
    if no_crop:
        new_size = (crop_h, crop_w)
    elif preprocessing.resize is None:
        new_size = (height, width)
    elif preprocessing.resize_mode == "exact":
        new_size = preprocessing.resize
    elif preprocessing.resize_mode in ("keep_ratio", "keep_ratio_longest"):
        new_size = keep_ratio_size(height, width, preprocessing.resize,
                                   longest=preprocessing.resize_mode == "keep_ratio_longest")
    else:
        new_size = resized_size(height, width, preprocessing.resize)
    if not preprocessing.antialias:  # tf.image.resize: float pixels, not rounded to 8 bits
        pixels = np.asarray(picture, dtype=np.uint8)
        if new_size != (height, width):
            pixels = resize_bilinear_no_antialias(pixels, *new_size)
    else:
        if new_size != (height, width):  # torchvision returns the picture untouched when sizes agree
            picture = picture.resize((new_size[1], new_size[0]), PIL_FILTERS[preprocessing.interpolation])
        pixels = np.asarray(picture, dtype=np.uint8)
    top, left = (0, 0) if no_crop else center_crop_offsets(new_size[0], new_size[1], crop_h, crop_w,
                                                          preprocessing.crop_rounding)

    window = crop_window(pixels, top, left, (crop_h, crop_w), preprocessing.pad_fill)
    geometry = CropGeometry((height, width), new_size, top, left, (crop_h, crop_w))
    return normalize_pixels(window, preprocessing), geometry


def normalize_pixels(window: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """[h, w, 3] RGB pixel values on the 0-255 scale to the model's float32 [3, h, w] tensor.

    The same float32 operations, in the same order, as ToTensor (x / 255) and Normalize
    ((x - m) / s), and as Keras' ``preprocess_input`` (``caffe``: channels reversed, then x - m on the
    0-255 scale; ``tf``: x / 127.5 - 1, which equals (x / 255 - 0.5) / 0.5 bit for bit; ``torch``:
    x / 255, then (x - m) / s).
    """
    tensor = window.transpose(2, 0, 1).astype(np.float32)
    if preprocessing.value_range == "0-1":
        tensor = tensor / np.float32(255)
    if preprocessing.channel_order == "bgr":
        tensor = tensor[::-1]
    mean = np.asarray(preprocessing.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(preprocessing.std, dtype=np.float32)[:, None, None]
    tensor = (tensor - mean) / std
    return np.ascontiguousarray(tensor, dtype=np.float32)
