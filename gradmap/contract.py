"""The interface between gradmap's exporter and its runtime.

An exported gradmap model is an ONNX file. This module names its inputs and outputs and the
metadata keys it carries, and (de)serializes that metadata. It imports nothing but the standard
library so that both halves, torch-side and torch-free, can share it.

Graph interface (format versions 1 and 2):

    inputs   image     float32 [N, 3, H, W]  normalized tensor, exactly what the source model receives
             target    int64   [N]           class per sample; -1 means that sample's top-1 class
    outputs  logits    float32 [N, K]
             target_index int64 [N]          the resolved target
             gradient  float32 [N, 3, H, W]  d score[n, target_index[n]] / d image[n]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

__all__ = [
    "FORMAT_VERSION",
    "INPUT_IMAGE",
    "INPUT_TARGET",
    "OUTPUT_LOGITS",
    "OUTPUT_TARGET_INDEX",
    "OUTPUT_GRADIENT",
    "SCORE_KINDS",
    "TARGETS",
    "INTERPOLATIONS",
    "RESIZE_MODES",
    "CROP_ROUNDINGS",
    "VALUE_RANGES",
    "CHANNEL_ORDERS",
    "ContractError",
    "OUTPUT_GRADIENT_GUIDED",
    "OUTPUT_GRADIENT_DECONVNET",
    "OUTPUT_CAM_ACTIVATION",
    "OUTPUT_CAM_GRADIENT",
    "BACKPROP_OUTPUTS",
    "METHODS",
    "WEB_METHODS",
    "CAM_METHODS",
    "METHOD_EXPORT_OPTIONS",
    "ATTRIBUTION_KINDS",
    "OUTPUT_FORMATS",
    "DEFAULT_OUTPUT_FORMATS",
    "methods_for",
    "Preprocessing",
    "ModelMetadata",
    "METADATA_PREFIX",
]

#: The newest model format this gradmap reads and writes. A model is written with the lowest version
#: that describes it: 2 only where its preprocessing uses a field version 1 lacks (``value_range``,
#: ``channel_order``, ``antialias``), so that older gradmap still reads every other model, and refuses,
#: rather than misreads, one whose pictures it would preprocess wrongly.
FORMAT_VERSION = 2

INPUT_IMAGE = "image"
INPUT_TARGET = "target"
OUTPUT_LOGITS = "logits"
OUTPUT_TARGET_INDEX = "target_index"
OUTPUT_GRADIENT = "gradient"
#: Extra outputs of models exported with other backpropagation rules or a Grad-CAM layer.
OUTPUT_GRADIENT_GUIDED = "gradient_guided"
OUTPUT_GRADIENT_DECONVNET = "gradient_deconvnet"
OUTPUT_CAM_ACTIVATION = "cam_activation"
OUTPUT_CAM_GRADIENT = "cam_gradient"

#: Backpropagation rules through ReLU (Springenberg et al. 2015) and the output each one fills.
BACKPROP_OUTPUTS = {
    "vanilla": OUTPUT_GRADIENT,
    "guided": OUTPUT_GRADIENT_GUIDED,
    "deconvnet": OUTPUT_GRADIENT_DECONVNET,
}

#: What the gradient differentiates: the raw logit, the softmax probability or its log.
SCORE_KINDS = ("logit", "probability", "log_probability")

#: What an exported graph is written for. ``portable``: the gradient pass's plain vector-Jacobian
#: products in standard ONNX ops every engine agrees on (onnxruntime CPU, web/WebAssembly, WebGPU,
#: OpenVINO). ``cpu``: the same graph lowered for onnxruntime's CPU provider (blocked layout, fused
#: masks, MaxPool indices); exact, but other engines may compute it wrongly or slowly. Models written
#: before this key existed are ``cpu`` models.
TARGETS = ("cpu", "portable")

#: Resampling filters understood by the runtime's preprocessing (PIL names, lower case).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")

#: How the resize step sizes the picture (see :class:`Preprocessing`).
RESIZE_MODES = ("shorter", "exact", "keep_ratio", "keep_ratio_longest")
#: Where the center crop starts: torchvision's round((size - crop) / 2) or Hugging Face's floor.
CROP_ROUNDINGS = ("round", "floor")
#: The pixel scale ``mean`` and ``std`` apply to: ``0-1`` (x / 255, torchvision's ToTensor, Keras'
#: ``torch`` and ``tf`` modes) or ``0-255`` (Keras' ``caffe`` mode and models that normalize inside).
VALUE_RANGES = ("0-1", "0-255")
#: The channel order of the ``image`` tensor: ``rgb``, or ``bgr`` (Keras' ``caffe`` mode, OpenCV-trained
#: models); ``mean`` and ``std`` are given in the tensor's order.
CHANNEL_ORDERS = ("rgb", "bgr")

METADATA_PREFIX = "gradmap."
_KEY_FORMAT = METADATA_PREFIX + "format_version"
_KEY_SOURCE = METADATA_PREFIX + "source_model"
_KEY_WEIGHTS = METADATA_PREFIX + "weights"
_KEY_PREPROCESSING = METADATA_PREFIX + "preprocessing"
_KEY_LABELS = METADATA_PREFIX + "labels"
_KEY_SCORE = METADATA_PREFIX + "score"
_KEY_BACKPROP = METADATA_PREFIX + "backprop"
_KEY_CAM_LAYER = METADATA_PREFIX + "cam_layer"
_KEY_METHODS = METADATA_PREFIX + "methods"
_KEY_EXTRA = METADATA_PREFIX + "extra"
_KEY_TARGET = METADATA_PREFIX + "target"


#: Every attribution method, in the order ``gradmap run --method`` and ``gradmap info`` list them.
METHODS = ("vanilla", "smoothgrad", "integrated-gradients", "gradient-x-input", "guided-backprop", "deconvnet",
           "grad-cam", "grad-cam++", "guided-grad-cam")
#: The methods the ``gradmap web`` page computes in the browser (integrated gradients stays in Python).
WEB_METHODS = tuple(m for m in METHODS if m != "integrated-gradients")
#: Methods whose map is a class activation map [1, H, W] rather than a per-channel pixel attribution.
CAM_METHODS = ("grad-cam", "grad-cam++")
#: What ``gradmap export`` needs for the methods that need more than the plain gradient output.
METHOD_EXPORT_OPTIONS = {"guided-backprop": "--backprop guided", "deconvnet": "--backprop deconvnet",
                         "grad-cam": "--cam-layer auto", "grad-cam++": "--cam-layer auto",
                         "guided-grad-cam": "--backprop guided --cam-layer auto"}
#: What a method's per-pixel values are, which names their ``.npy`` output: ``gradient`` (the gradient
#: of the score, or SmoothGrad's statistics of it, or its guided/deconvnet variant), ``attribution``
#: (integrated gradients, gradient x input, guided Grad-CAM: gradients weighted by something else) or
#: ``cam`` (a class activation map).
ATTRIBUTION_KINDS = {"vanilla": "gradient", "smoothgrad": "gradient", "guided-backprop": "gradient",
                     "deconvnet": "gradient", "integrated-gradients": "attribution",
                     "gradient-x-input": "attribution", "guided-grad-cam": "attribution",
                     "grad-cam": "cam", "grad-cam++": "cam"}
#: What ``gradmap run --format`` writes per picture, and its default.
OUTPUT_FORMATS = ("heatmap", "overlay", "figure", "npy")
DEFAULT_OUTPUT_FORMATS = ("heatmap", "overlay", "figure")


def methods_for(backprops: "tuple[str, ...] | list[str]", has_cam: bool) -> tuple[str, ...]:
    """The attribution methods a model with these gradient outputs supports, in :data:`METHODS` order."""
    needs = {"guided-backprop": "guided" in backprops, "deconvnet": "deconvnet" in backprops,
             "grad-cam": has_cam, "grad-cam++": has_cam, "guided-grad-cam": has_cam and "guided" in backprops}
    return tuple(m for m in METHODS if needs.get(m, True))


class ContractError(ValueError):
    """A model file or metadata does not follow gradmap's model contract."""


#: Preprocessing fields written only when they differ from these defaults (older readers read the rest).
_OPTIONAL_DEFAULTS = {"resize_mode": "shorter", "crop_rounding": "round", "pad_fill": (0, 0, 0),
                      "value_range": "0-1", "channel_order": "rgb", "antialias": True}
#: The fields format version 1 lacks: a model that uses one is written as version 2.
_VERSION_2_FIELDS = ("value_range", "channel_order", "antialias")


@dataclass(frozen=True)
class Preprocessing:
    """How a picture becomes the ``image`` tensor, as torchvision's, timm's and Hugging Face's
    evaluation transforms do: resize, center crop (zero or ``pad_fill`` padding where the crop is
    larger), scale to [0, 1], normalize.

    ``resize`` and ``resize_mode`` (see :data:`RESIZE_MODES`):

    - ``shorter`` (default): ``resize`` is the length of the shorter side, the longer one is
      truncated (torchvision ``Resize(int)``); ``None`` skips resizing.
    - ``exact``: ``resize`` is (height, width) (torchvision ``Resize((h, w))``: timm's ``squash``
      crop mode, Hugging Face ``size={height, width}``).
    - ``keep_ratio``: ``resize`` is (height, width); the picture is scaled by the smaller of the two
      ratios so it covers that box, each side rounded (timm ``ResizeKeepRatio``, its ``center`` crop
      mode for a non-square input).
    - ``keep_ratio_longest``: the same with the larger ratio, so the picture fits inside the box
      (timm's ``border`` crop mode, which pads with ``pad_fill``).

    ``crop`` is the (height, width) of the center crop, which is also the model's input size;
    ``crop_rounding`` places it at ``round((size - crop) / 2)`` (``round``, Python's, as
    torchvision's ``CenterCrop``) or ``(size - crop) // 2`` (``floor``, as Hugging Face's
    ``center_crop``). ``mean``/``std`` are per-channel, applied after scaling pixels to [0, 1].

    ``value_range`` (see :data:`VALUE_RANGES`) is the pixel scale ``mean``/``std`` apply to, and
    ``channel_order`` (:data:`CHANNEL_ORDERS`) the tensor's channel order, ``mean``/``std`` in that
    order: Keras' ``caffe`` mode is ``0-255``, ``bgr``, mean (103.939, 116.779, 123.68), std 1.
    ``antialias=False`` resizes as ``tf.image.resize`` does by default (bilinear, half-pixel centers,
    no antialiasing filter when shrinking, float pixels not rounded to 8 bits); ``True`` is Pillow's
    resize, as torchvision, timm, Hugging Face and ``keras.utils.load_img`` do.

    Metadata written before these fields existed reads as ``shorter``/``round``/zero fill,
    ``0-1``/``rgb``/antialiased; fields at their defaults are not written, so models that don't use
    them read in older gradmap too (:attr:`format_version`).
    """

    crop: tuple[int, int] = (224, 224)
    resize: "int | tuple[int, int] | None" = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize_mode: str = "shorter"
    crop_rounding: str = "round"
    pad_fill: tuple[int, int, int] = (0, 0, 0)
    value_range: str = "0-1"
    channel_order: str = "rgb"
    antialias: bool = True

    def __post_init__(self) -> None:
        crop = tuple(int(c) for c in self.crop)
        if len(crop) != 2 or min(crop) <= 0:
            raise ContractError(f"preprocessing crop must be two positive sizes, got {self.crop!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ContractError(
                f"preprocessing resize_mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.resize_mode == "shorter":
            if isinstance(self.resize, (tuple, list)) or (self.resize is not None and int(self.resize) <= 0):
                raise ContractError(f"preprocessing resize must be a positive size or None, got {self.resize!r}")
            resize = None if self.resize is None else int(self.resize)
        else:
            if not isinstance(self.resize, (tuple, list)) or len(self.resize) != 2 or min(self.resize) <= 0:
                raise ContractError(f"preprocessing resize_mode {self.resize_mode!r} needs resize = (height, width), "
                                    f"got {self.resize!r}")
            resize = (int(self.resize[0]), int(self.resize[1]))
        if self.interpolation not in INTERPOLATIONS:
            raise ContractError(
                f"preprocessing interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
            )
        if self.crop_rounding not in CROP_ROUNDINGS:
            raise ContractError(
                f"preprocessing crop_rounding {self.crop_rounding!r} is not one of {', '.join(CROP_ROUNDINGS)}")
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if len(mean) != 3 or len(std) != 3:
            raise ContractError("preprocessing mean and std need three values each (RGB)")
        if min(std) <= 0:
            raise ContractError(f"preprocessing std must be positive, got {std}")
        if self.value_range not in VALUE_RANGES:
            raise ContractError(
                f"preprocessing value_range {self.value_range!r} is not one of {', '.join(VALUE_RANGES)}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ContractError(
                f"preprocessing channel_order {self.channel_order!r} is not one of {', '.join(CHANNEL_ORDERS)}")
        if not isinstance(self.antialias, bool):
            raise ContractError(f"preprocessing antialias must be true or false, got {self.antialias!r}")
        if not self.antialias and self.interpolation != "bilinear":
            raise ContractError("preprocessing antialias=false is tf.image.resize's bilinear resize; "
                                f"interpolation {self.interpolation!r} has no such mode: use 'bilinear'")
        fill = tuple(int(v) for v in self.pad_fill)
        if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
            raise ContractError(f"preprocessing pad_fill must be three values in 0..255, got {self.pad_fill!r}")
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "resize", resize)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "pad_fill", fill)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop"] = list(self.crop)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if isinstance(self.resize, tuple):
            d["resize"] = list(self.resize)
        for key, default in _OPTIONAL_DEFAULTS.items():  # written only when used: older readers keep reading the rest
            if getattr(self, key) == default:
                del d[key]
        if "pad_fill" in d:
            d["pad_fill"] = list(self.pad_fill)
        return d

    @property
    def format_version(self) -> int:
        """The lowest model format that describes this preprocessing: 2 where a field of version 2 is used."""
        return 2 if any(getattr(self, key) != _OPTIONAL_DEFAULTS[key] for key in _VERSION_2_FIELDS) else 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        try:
            resize = d.get("resize")
            return cls(
                crop=tuple(d["crop"]),
                resize=tuple(resize) if isinstance(resize, list) else resize,
                interpolation=d.get("interpolation", "bilinear"),
                mean=tuple(d["mean"]),
                std=tuple(d["std"]),
                resize_mode=d.get("resize_mode", "shorter"),
                crop_rounding=d.get("crop_rounding", "round"),
                pad_fill=tuple(d.get("pad_fill", (0, 0, 0))),
                value_range=d.get("value_range", "0-1"),
                channel_order=d.get("channel_order", "rgb"),
                antialias=d.get("antialias", True),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ContractError(f"preprocessing metadata is incomplete or malformed: {e}") from e


@dataclass(frozen=True)
class ModelMetadata:
    """Everything the runtime needs to know about an exported model, stored as ONNX metadata_props."""

    source_model: str
    weights: str
    preprocessing: Preprocessing
    labels: tuple[str, ...]
    score: str = "logit"
    backprops: tuple[str, ...] = ("vanilla",)
    cam_layer: str | None = None
    target: str = "cpu"
    format_version: int | None = None  # read: the file's; new: the lowest that describes the model
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format_version is None:
            object.__setattr__(self, "format_version", self.preprocessing.format_version)
        if self.score not in SCORE_KINDS:
            raise ContractError(f"score kind {self.score!r} is not one of {', '.join(SCORE_KINDS)}")
        unknown = [b for b in self.backprops if b not in BACKPROP_OUTPUTS]
        if unknown or "vanilla" not in self.backprops:
            raise ContractError(f"backprop rules must include 'vanilla' and be among {', '.join(BACKPROP_OUTPUTS)}; "
                                f"got {list(self.backprops)}")
        object.__setattr__(self, "backprops", tuple(self.backprops))
        if self.target not in TARGETS:
            raise ContractError(f"target {self.target!r} is not one of {', '.join(TARGETS)}")
        if not self.labels:
            raise ContractError("a gradmap model needs at least one class label")
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def methods(self) -> tuple[str, ...]:
        """Attribution methods this model supports (see :func:`methods_for`)."""
        return methods_for(self.backprops, self.cam_layer is not None)

    def to_props(self) -> dict[str, str]:
        """Serialize to the string key/value pairs of ONNX ``metadata_props``."""
        return {
            _KEY_FORMAT: str(self.preprocessing.format_version),
            _KEY_SOURCE: self.source_model,
            _KEY_WEIGHTS: self.weights,
            _KEY_PREPROCESSING: json.dumps(self.preprocessing.to_dict()),
            _KEY_LABELS: json.dumps(list(self.labels)),
            _KEY_SCORE: self.score,
            _KEY_BACKPROP: json.dumps(list(self.backprops)),
            _KEY_CAM_LAYER: self.cam_layer or "",
            _KEY_METHODS: json.dumps(list(self.methods)),
            _KEY_TARGET: self.target,
            _KEY_EXTRA: json.dumps(dict(self.extra)),
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> "ModelMetadata":
        """Parse ``metadata_props``; raise :class:`ContractError` saying what is missing or wrong."""
        if _KEY_FORMAT not in props:
            raise ContractError(
                "no gradmap metadata (key 'gradmap.format_version' is missing): "
                "this ONNX file was not written by 'gradmap export'"
            )
        try:
            version = int(props[_KEY_FORMAT])
        except ValueError as e:
            raise ContractError(f"gradmap.format_version is not an integer: {props[_KEY_FORMAT]!r}") from e
        if version > FORMAT_VERSION:
            raise ContractError(
                f"model uses gradmap format version {version}; this gradmap reads up to "
                f"{FORMAT_VERSION}: upgrade gradmap"
            )
        missing = [k for k in (_KEY_SOURCE, _KEY_PREPROCESSING, _KEY_LABELS, _KEY_SCORE) if k not in props]
        if missing:
            raise ContractError(f"gradmap metadata is incomplete, missing: {', '.join(missing)}")
        try:
            preprocessing = Preprocessing.from_dict(json.loads(props[_KEY_PREPROCESSING]))
            labels = json.loads(props[_KEY_LABELS])
            extra = json.loads(props.get(_KEY_EXTRA, "{}"))
            backprops = json.loads(props.get(_KEY_BACKPROP, '["vanilla"]'))
        except json.JSONDecodeError as e:
            raise ContractError(f"gradmap metadata is not valid JSON: {e}") from e
        if not isinstance(labels, list):
            raise ContractError("gradmap.labels must be a JSON list of class names")
        return cls(
            source_model=props[_KEY_SOURCE],
            weights=props.get(_KEY_WEIGHTS, ""),
            preprocessing=preprocessing,
            labels=tuple(labels),
            score=props[_KEY_SCORE],
            backprops=tuple(backprops) if isinstance(backprops, list) else ("vanilla",),
            cam_layer=props.get(_KEY_CAM_LAYER) or None,
            target=props.get(_KEY_TARGET) or "cpu",
            format_version=version,
            extra=extra if isinstance(extra, dict) else {},
        )
