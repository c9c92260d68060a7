"""Named preprocessing conventions, and export options that override a source's own preprocessing.

A model file carries no record of how its pictures were prepared; the exporter has to be told. The
conventions most classifiers were trained with have names here:

    torchvision   Resize(S / 0.875) shorter side, CenterCrop(S), x / 255, ImageNet mean/std, RGB
    keras-caffe   keras.utils.load_img(target_size=(S, S)) (nearest), BGR, x - (103.939, 116.779, 123.68) at 0-255
    keras-tf      the same resize, x / 127.5 - 1
    keras-torch   the same resize, x / 255, ImageNet mean/std
    none          the same resize, raw 0-255 RGB (models that normalize inside, e.g. Keras EfficientNet)

``S`` is the model's input size. Every field can then be overridden one by one
(:func:`override`), e.g. the TensorFlow recipe's ``tf.image.resize`` of the whole picture:
``override(preset("keras-torch", (224, 224)), resize_mode="exact", antialias=False, interpolation="bilinear")``.
Imports no framework: the Keras and bare-ONNX exports use it without torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gradmap.contract import ContractError, Preprocessing

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "KERAS_CAFFE_MEAN", "PRESETS", "OVERRIDABLE", "override", "preset",
           "resolve"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: keras.applications.imagenet_utils' caffe mean, in BGR order (the tensor's order).
KERAS_CAFFE_MEAN = (103.939, 116.779, 123.68)

#: Each preset's description, in the order ``gradmap export --help`` lists them.
PRESETS = {
    "torchvision": "resize the shorter side to S/0.875, center crop S, x/255, ImageNet mean/std (torchvision, timm)",
    "keras-caffe": "resize to S x S (nearest, keras.utils.load_img), BGR, subtract the ImageNet mean at 0-255 "
                   "(Keras ResNet50, VGG16/19)",
    "keras-tf": "resize to S x S (nearest), x/127.5 - 1 (Keras MobileNet, Inception, Xception, NASNet)",
    "keras-torch": "resize to S x S (nearest), x/255, ImageNet mean/std (Keras DenseNet)",
    "none": "resize to S x S (nearest), raw 0-255 RGB (models that normalize inside: Keras EfficientNet, ConvNeXt)",
}

#: The fields :func:`override` accepts (every field of :class:`~gradmap.contract.Preprocessing`).
OVERRIDABLE = tuple(f.name for f in dataclasses.fields(Preprocessing))


def preset(name: str, input_size: tuple[int, int]) -> Preprocessing:
    """The preprocessing of convention ``name`` (see :data:`PRESETS`) for a model input of ``input_size``
    (height, width)."""
    size = (int(input_size[0]), int(input_size[1]))
    if name == "torchvision":
        # torchvision's ImageNet presets: Resize(256) before CenterCrop(224), the same ratio at other sizes
        return Preprocessing(crop=size, resize=int(min(size) / 0.875), interpolation="bilinear",
                             mean=IMAGENET_MEAN, std=IMAGENET_STD)
    keras = dict(crop=size, resize=size, resize_mode="exact", interpolation="nearest")
    if name == "keras-caffe":
        return Preprocessing(**keras, value_range="0-255", channel_order="bgr", mean=KERAS_CAFFE_MEAN,
                             std=(1.0, 1.0, 1.0))
    if name == "keras-tf":
        # (x / 255 - 0.5) / 0.5 equals Keras' x / 127.5 - 1 bit for bit in float32 (both scale by powers of two)
        return Preprocessing(**keras, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if name == "keras-torch":
        return Preprocessing(**keras, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if name == "none":
        return Preprocessing(**keras, value_range="0-255", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    raise ContractError(f"unknown preprocessing preset {name!r}; choose one of {', '.join(PRESETS)}")


def override(base: Preprocessing, **fields: Any) -> Preprocessing:
    """``base`` with the given fields replaced (``None`` values are ignored), validated again.

    ``resize`` follows ``resize_mode``: a single size for ``shorter``, (height, width) otherwise; a
    single size given with a mode that needs two is used for both. Changing ``crop`` alone keeps the
    other fields; a ``resize`` of the old crop size (an ``exact`` resize to the input) follows the crop.
    """
    given = {k: v for k, v in fields.items() if v is not None}
    unknown = sorted(set(given) - set(OVERRIDABLE))
    if unknown:
        raise ContractError(f"unknown preprocessing field(s) {', '.join(unknown)}; "
                            f"the fields are {', '.join(OVERRIDABLE)}")
    if "crop" in given:
        given["crop"] = _pair(given["crop"], "crop")
        if "resize" not in given and base.resize_mode != "shorter" and base.resize == base.crop:
            given["resize"] = given["crop"]
    mode = given.get("resize_mode", base.resize_mode)
    resize = given.get("resize", base.resize)
    if resize is not None:
        if mode == "shorter":
            if isinstance(resize, (tuple, list)):
                if len(resize) != 2 or resize[0] != resize[1]:
                    raise ContractError(f"resize_mode 'shorter' takes one size, got {resize!r}")
                resize = resize[0]
            given["resize"] = int(resize)
        else:
            given["resize"] = _pair(resize, "resize")
    for key in ("mean", "std", "pad_fill"):
        if key in given:
            given[key] = tuple(given[key])
    return dataclasses.replace(base, **given)


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, (int, float)):
        return int(value), int(value)
    try:
        height, width = value
        return int(height), int(width)
    except (TypeError, ValueError) as e:
        raise ContractError(f"{name} must be one size or (height, width), got {value!r}") from e


def resolve(base: Preprocessing | None, input_size: tuple[int, int] | None, *, preset_name: str | None = None,
            **overrides: Any) -> Preprocessing:
    """The preprocessing an export writes: ``base`` (the source's own convention, ``None`` where the
    source has none, as a bare ONNX file), or the preset ``preset_name`` at ``input_size`` instead, with
    ``overrides`` (the export's preprocessing options, see :func:`override`) applied on top."""
    if preset_name is not None:
        if input_size is None:
            raise ContractError(f"preset {preset_name!r} needs the model's input size")
        base = preset(preset_name, input_size)
    if base is None:
        raise ContractError("this model carries no preprocessing convention: name one with --preset "
                            f"({', '.join(PRESETS)}) and adjust it with the other preprocessing options")
    return override(base, **overrides)
