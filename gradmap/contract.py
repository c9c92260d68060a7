"""The interface between gradmap's exporter and its runtime.

An exported gradmap model is an ONNX file. This module names its inputs and outputs and the
metadata keys it carries, and (de)serializes that metadata. It imports nothing but the standard
library so that both halves, torch-side and torch-free, can share it.

Graph interface (format versions 1 to 3):

    inputs   image     float32 [N, 3, H, W]  normalized tensor, exactly what the source model receives
             target    int64   [N]           class per sample; -1 means that sample's top-1 class
    outputs  logits    float32 [N, K]
             target_index int64 [N]          the resolved target
             gradient  float32 [N, 3, H, W]  d score[n, target_index[n]] / d image[n]

A forward-only model (``gradmap export --no-gradient``, format version 3) has no gradient outputs:
image and target in, logits and target_index out (and ``cam_activation``, ``attention`` where exported);
it serves the methods that read the forward pass alone.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

__all__ = [
    "FORMAT_VERSION",
    "INPUT_IMAGE",
    "INPUT_TARGET",
    "OUTPUT_LOGITS",
    "OUTPUT_TARGET_INDEX",
    "OUTPUT_GRADIENT",
    "OUTPUT_GRADIENT_GUIDED",
    "OUTPUT_GRADIENT_DECONVNET",
    "OUTPUT_CAM_ACTIVATION",
    "OUTPUT_CAM_GRADIENT",
    "OUTPUT_ATTENTION",
    "OUTPUT_ATTENTION_GRADIENT",
    "OUTPUTS",
    "OUTPUT_EXPORT_OPTIONS",
    "GRADIENT_OUTPUTS",
    "GRADIENT_OPTION",
    "NO_GRADIENT_OPTION",
    "BACKPROP_OUTPUTS",
    "DEFAULT_BACKPROP",
    "SCORE_KINDS",
    "TARGETS",
    "INTERPOLATIONS",
    "RESIZE_MODES",
    "CROP_ROUNDINGS",
    "VALUE_RANGES",
    "CHANNEL_ORDERS",
    "OUTPUT_FORMATS",
    "DEFAULT_OUTPUT_FORMATS",
    "DEFAULT_TARGET",
    "REDUCTIONS",
    "DEFAULT_REDUCTION",
    "PLACEMENTS",
    "DEFAULT_PLACEMENT",
    "COLORMAPS",
    "DEFAULT_COLORMAP",
    "OVERLAYS",
    "DEFAULT_OVERLAY",
    "DEFAULT_BATCH_SIZE",
    "ENGINES",
    "PROVIDERS",
    "ENGINE_LOCAL",
    "ENGINE_RAY",
    "DEFAULT_ENGINE",
    "METHOD_KINDS",
    "KIND_GRADIENT",
    "KIND_ATTRIBUTION",
    "KIND_CAM",
    "KIND_REGION",
    "SETTING_TYPES",
    "Setting",
    "Method",
    "MethodSettingError",
    "COMMON_SETTINGS",
    "METHOD_TABLE",
    "METHODS",
    "DEFAULT_METHOD",
    "SETTINGS",
    "method",
    "methods_for",
    "methods_using",
    "props_have_gradient",
    "model_outputs",
    "ContractError",
    "Preprocessing",
    "ModelMetadata",
    "METADATA_PREFIX",
]

#: The newest model format this gradmap reads and writes. A model is written with the lowest version
#: that describes it: 2 only where its preprocessing uses a field version 1 lacks (``value_range``,
#: ``channel_order``, ``antialias``), 3 only for a forward-only model (no gradient outputs, an empty
#: ``gradmap.backprop``), so that older gradmap still reads every other model, and refuses, rather than
#: misreads, one whose pictures it would preprocess wrongly or whose gradient it would look for.
FORMAT_VERSION = 3

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
#: Extra outputs of models exported with ``--attention``: every self-attention layer's probabilities
#: and their gradient, float32 [N, layers, heads, T, T] (see :attr:`ModelMetadata.attention`).
OUTPUT_ATTENTION = "attention"
OUTPUT_ATTENTION_GRADIENT = "attention_gradient"

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
_KEY_ATTENTION = METADATA_PREFIX + "attention"


#: The gradient output of each backpropagation rule through ReLU (Springenberg et al. 2015); the
#: default rule's output comes with every export, ``gradmap export --backprop RULE`` adds the others.
BACKPROP_OUTPUTS = {
    "vanilla": OUTPUT_GRADIENT,
    "guided": OUTPUT_GRADIENT_GUIDED,
    "deconvnet": OUTPUT_GRADIENT_DECONVNET,
}
DEFAULT_BACKPROP = "vanilla"
#: Every output a gradmap model can have, in the order a model lists them.
OUTPUTS = (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, *BACKPROP_OUTPUTS.values(), OUTPUT_CAM_ACTIVATION, OUTPUT_CAM_GRADIENT,
           OUTPUT_ATTENTION, OUTPUT_ATTENTION_GRADIENT)
#: The outputs a forward-only model (``gradmap export --no-gradient``) lacks: those of the backward pass.
GRADIENT_OUTPUTS = (*BACKPROP_OUTPUTS.values(), OUTPUT_CAM_GRADIENT, OUTPUT_ATTENTION_GRADIENT)
#: The ``gradmap export`` option that writes the backward pass (default), and the one that leaves it out.
GRADIENT_OPTION, NO_GRADIENT_OPTION = "--gradient", "--no-gradient"
#: The ``gradmap export`` option that adds each optional output (the others come with every export).
OUTPUT_EXPORT_OPTIONS = {
    **{output: f"--backprop {rule}" for rule, output in BACKPROP_OUTPUTS.items() if rule != DEFAULT_BACKPROP},
    OUTPUT_CAM_ACTIVATION: "--cam-layer auto",
    OUTPUT_CAM_GRADIENT: "--cam-layer auto",
    OUTPUT_ATTENTION: "--attention",
    OUTPUT_ATTENTION_GRADIENT: "--attention",
}


def model_outputs(backprops: "tuple[str, ...] | list[str]", has_cam: bool, has_attention: bool = False
                  ) -> tuple[str, ...]:
    """The outputs of a model exported with these backpropagation rules and, or without, a CAM layer
    and the attention outputs. No rules (``()``): a forward-only model, without the gradients of the
    CAM layer and the attention."""
    gradient = DEFAULT_BACKPROP in backprops
    return (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, *(BACKPROP_OUTPUTS[b] for b in backprops if b in BACKPROP_OUTPUTS),
            *((OUTPUT_CAM_ACTIVATION,) if has_cam else ()), *((OUTPUT_CAM_GRADIENT,) if has_cam and gradient else ()),
            *((OUTPUT_ATTENTION,) if has_attention else ()),
            *((OUTPUT_ATTENTION_GRADIENT,) if has_attention and gradient else ()))


# -- gradmap run's options, shared by the CLI, the runtime and the web page --------------------------
#: What ``gradmap run --format`` writes per picture, and its default.
OUTPUT_FORMATS = ("heatmap", "overlay", "figure", "npy")
DEFAULT_OUTPUT_FORMATS = ("heatmap", "overlay", "figure")
#: Which class a map explains by default (``gradmap run --target``).
DEFAULT_TARGET = "top1"
#: Channel reductions of a [C, H, W] attribution to a map: max of |values|, signed sum, L2 norm.
REDUCTIONS = ("max", "sum", "l2")
DEFAULT_REDUCTION = "max"
#: Where a map on the model's input goes on the original picture: the crop window, or stretched over it.
PLACEMENTS = ("crop", "stretch")
DEFAULT_PLACEMENT = "crop"
#: Colormaps of heatmaps and overlays (``gradmap.runtime.colormaps`` holds their tables).
COLORMAPS = ("hot", "jet", "viridis", "gray")
DEFAULT_COLORMAP = "hot"
#: Overlays: ``peaks`` (opacity grows with the value) or ``flat`` (the recipes' one opacity).
OVERLAYS = ("peaks", "flat")
DEFAULT_OVERLAY = "peaks"
#: Pictures per model run.
DEFAULT_BATCH_SIZE = 8
#: Where ``gradmap run`` explains the pictures: this process, or Ray Data actors.
ENGINES = ("local", "ray")
#: ``--provider``'s named choices (gradmap.runtime.providers): auto, onnxruntime's CPU provider, CUDA
#: (the onnxruntime-gpu wheel), and onnxruntime's WebGPU plugin provider (onnxruntime-ep-webgpu).
PROVIDERS = ("auto", "cpu", "cuda", "webgpu")
ENGINE_LOCAL, ENGINE_RAY = ENGINES
DEFAULT_ENGINE = ENGINE_LOCAL


# -- the method table ---------------------------------------------------------------------------
# One row per attribution method: what it computes, the model outputs it reads, where it is
# implemented (in the runtime and, when the page computes it, in the web page) and its settings.
# The CLI's --method choices and setting options, `gradmap info`, the runtime's dispatch, `gradmap
# evaluate`, the web page (through model.json) and request validation all read it; no other file
# under gradmap/ spells a method's name (tests/test_method_table.py). docs/methods.md says how to
# add a method.

#: What a method's per-pixel values are, which names the array ``gradmap run --format npy`` writes:
#: ``gradient`` (the gradient of the score, SmoothGrad's statistics of it, or its guided/deconvnet
#: variant, [3, H, W]), ``attribution`` (gradients weighted by something else, [3, H, W]), ``cam``
#: (a class activation map, [1, H, W]) or ``region`` (each pixel valued by the image region it belongs
#: to, [1, H, W], signed: higher is more important, taken as it is by every reduction).
METHOD_KINDS = ("gradient", "attribution", "cam", "region")
KIND_GRADIENT, KIND_ATTRIBUTION, KIND_CAM, KIND_REGION = METHOD_KINDS
#: The types of method settings: whole numbers, real numbers, one of a list of names.
SETTING_TYPES = ("int", "float", "choice")
#: How a number setting is written as text (a query string, a form field): decimal, with an exponent.
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class MethodSettingError(ValueError):
    """A method setting has a wrong value, or the method has no such setting; the message names both."""


@dataclass(frozen=True)
class Setting:
    """One setting of a method, as ``gradmap run --NAME``, a request's settings and the web page's
    controls take it.

    ``type`` is one of :data:`SETTING_TYPES`; ``choices`` lists the values of a ``choice``;
    ``minimum`` and ``maximum`` bound an ``int`` or ``float`` (inclusive; None: unbounded).
    ``help`` says what it does, for ``--help``, the docs and the page.
    """

    name: str
    type: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"setting name {self.name!r} must be an identifier (it is a keyword argument)")
        if self.type not in SETTING_TYPES:
            raise ValueError(f"setting {self.name}: type {self.type!r} is not one of {', '.join(SETTING_TYPES)}")
        if (self.type == "choice") != bool(self.choices):
            raise ValueError(f"setting {self.name}: a choice needs choices, and only a choice has them")
        object.__setattr__(self, "choices", tuple(self.choices))
        self.check(self.default)

    def check(self, value: Any, method: str | None = None) -> Any:
        """``value`` as this setting's type (strings are parsed: query strings and form fields are
        text), or :class:`MethodSettingError` naming the setting and what is wrong."""
        where = f"{method} setting {self.name!r}" if method else f"setting {self.name!r}"
        if self.type == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise MethodSettingError(f"{where}: {value!r} is not one of {', '.join(self.choices)}")
            return value
        wanted = "an integer" if self.type == "int" else "a number"
        given = value
        try:
            if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
                raise ValueError
            if isinstance(value, str):  # decimal notation only, as the page's checkSetting reads it
                if not _DECIMAL.fullmatch(value.strip()):
                    raise ValueError
                value = float(value) if self.type == "float" or not value.strip().lstrip("+-").isdigit() else int(value)
            if self.type == "int":
                if isinstance(value, numbers.Integral):
                    value = int(value)
                elif float(value).is_integer():
                    value = int(value)
                else:
                    raise ValueError
            else:
                value = float(value)
            if not math.isfinite(value):
                raise ValueError
        except (ValueError, OverflowError):
            raise MethodSettingError(f"{where} must be {wanted}{self._range()}, got {given!r}") from None
        if (self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum):
            raise MethodSettingError(f"{where} must be {wanted}{self._range()}, got {value!r}")
        return value

    def _range(self) -> str:
        if self.minimum is not None and self.maximum is not None:
            return f" in [{self.minimum:g}, {self.maximum:g}]"
        if self.minimum is not None:
            return f" >= {self.minimum:g}"
        if self.maximum is not None:
            return f" <= {self.maximum:g}"
        return ""

    def same_definition(self, other: "Setting") -> bool:
        """Whether ``other`` is this setting (type, choices, range, help), its default aside."""
        return (self.type, self.choices, self.minimum, self.maximum, self.help) == \
            (other.type, other.choices, other.minimum, other.maximum, other.help)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field (``choices`` empty, ``minimum``/``maximum`` null where unused)."""
        return {"name": self.name, "type": self.type, "default": self.default, "help": self.help,
                "choices": list(self.choices), "minimum": self.minimum, "maximum": self.maximum}


@dataclass(frozen=True)
class Method:
    """One row of the method table (see :data:`METHOD_TABLE` and docs/methods.md).

    Args:
        name: what ``gradmap run --method`` takes.
        kind: what the per-pixel values are, one of :data:`METHOD_KINDS`.
        summary: one line: what it computes, and the paper.
        outputs: the model outputs it reads; a model has the method when it has all of them.
        implementation: ``"module:function"`` of the runtime's implementation, called as
            ``function(model, spec, images, targets, batch_size=...)`` and returning an
            :class:`~gradmap.runtime.methods.Attribution` (see :mod:`gradmap.runtime.methods`).
        web: the name of the web page's implementation, a function exported by
            ``gradmap/web/methods.js``; None when the page does not compute the method.
        settings: its settings; a setting of the same name in two methods is one setting (same
            type, choices, range and help: one ``--NAME`` option), its default may differ.
    """

    name: str
    kind: str
    summary: str
    outputs: tuple[str, ...]
    implementation: str
    web: str | None = None
    settings: tuple[Setting, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"method {self.name}: kind {self.kind!r} is not one of {', '.join(METHOD_KINDS)}")
        unknown = [o for o in self.outputs if o not in OUTPUTS]
        if unknown:
            raise ValueError(f"method {self.name}: unknown outputs {', '.join(unknown)}; outputs are {', '.join(OUTPUTS)}")
        module, _, function = self.implementation.partition(":")
        if not module or not function.isidentifier():
            raise ValueError(f"method {self.name}: implementation {self.implementation!r} is not 'module:function'")
        names = [s.name for s in self.settings]
        clashes = sorted({n for n in names if names.count(n) > 1} | {s.name for s in COMMON_SETTINGS if s.name in names})
        if clashes:
            raise ValueError(f"method {self.name}: setting {', '.join(clashes)} given twice (or a common setting)")

    @property
    def export_options(self) -> tuple[str, ...]:
        """The ``gradmap export`` options that give a model the outputs this method reads."""
        return tuple(dict.fromkeys(OUTPUT_EXPORT_OPTIONS[o] for o in self.outputs if o in OUTPUT_EXPORT_OPTIONS))

    @property
    def needs_gradient(self) -> bool:
        """Whether it reads an output of the backward pass (a forward-only model cannot serve it)."""
        return any(o in GRADIENT_OUTPUTS for o in self.outputs)

    @property
    def all_settings(self) -> tuple[Setting, ...]:
        """Its own settings, then the settings every method has (:data:`COMMON_SETTINGS`)."""
        return (*self.settings, *COMMON_SETTINGS)

    def resolve(self, values: Mapping[str, Any] | None = None, *, strict: bool = True) -> dict[str, Any]:
        """Every setting of this method with ``values`` checked and the defaults filled in.

        ``strict``: a setting this method does not have is an error (a request's settings). Else a
        setting of another method is checked and left out, so that one set of options serves every
        method, as ``gradmap run``'s options do; a name no method has is an error either way.

        Raises:
            MethodSettingError: naming the method, the setting and what is wrong with it.
        """
        values = dict(values or {})
        own = {s.name: s for s in self.all_settings}
        for name in values:
            if strict and name not in own:
                raise MethodSettingError(f"{self.name} has no setting {name!r}; its settings are {', '.join(own)}")
            if name not in SETTINGS:
                raise MethodSettingError(f"no method has a setting {name!r}; the settings are {', '.join(SETTINGS)}")
        for name, value in values.items():
            if name not in own:
                SETTINGS[name].check(value)
        return {name: setting.check(values[name], self.name) if name in values else setting.default
                for name, setting in own.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (model.json, ``gradmap info --json``): every field, export options included."""
        return {"name": self.name, "kind": self.kind, "summary": self.summary, "outputs": list(self.outputs),
                "export_options": list(self.export_options), "implementation": self.implementation,
                "web": self.web, "settings": [s.to_dict() for s in self.settings]}


# The settings; a setting several methods have is defined once and listed by each.
_SAMPLES = Setting("samples", "int", 50, "noisy copies.", minimum=1)
_NOISE = Setting("noise", "float", 0.15, "noise sigma as a fraction of the input's value range.", minimum=0)
_VARIANT = Setting("variant", "choice", "plain", "mean gradient, mean squared gradient or variance.",
                   choices=("plain", "squared", "vargrad"))
_SEED = Setting("seed", "int", 0, "seed of the random draws (noise, uniform baselines).")
_STEPS = Setting("steps", "int", 32, "points on the path.", minimum=2)
_RULE = Setting("rule", "choice", "gauss-legendre", "integration rule.",
                choices=("gauss-legendre", "trapezoid", "equal-weights"))
_BASELINE = Setting("baseline", "choice", "black", "black (pixel 0), blurred picture or uniform noise.",
                    choices=("black", "blurred", "uniform"))
_WINDOW = Setting("window", "int", 16, "side of the occluding square, in pixels of the model's input.", minimum=1)
_STRIDE = Setting("stride", "int", 8, "step between occlusion windows, in pixels (at most the window).", minimum=1)
_MASKS = Setting("masks", "int", 4000, "random masks.", minimum=1)
_GRID = Setting("grid", "int", 7, "cells per side of a random mask's grid (the RISE paper's s).", minimum=1)
_PROBABILITY = Setting("probability", "float", 0.5, "chance that a mask's cell keeps the picture.", minimum=0,
                       maximum=1)
_MASK_BATCH = Setting("mask_batch", "int", 0,
                      "masked copies per onnxruntime run (memory grows with it); 0: as many as fit in 512 MiB.",
                      minimum=0)
_MAX_SIGMA = Setting("max_sigma", "float", 50.0, "Blur IG's strongest blur, the path's start (Gaussian sigma, pixels).",
                     minimum=0.01)
_GRAD_STEP = Setting("grad_step", "float", 0.01, "sigma step of the forward difference giving the blur path's direction.",
                     minimum=1e-6, maximum=1)
_FRACTION = Setting("fraction", "float", 0.25, "share of features, smallest |gradient| first, moved at a time.",
                    minimum=0.01, maximum=1)
_MAX_DIST = Setting("max_dist", "float", 0.02, "how far a feature may run ahead of the straight path (0: plain IG, "
                    "1: unbounded), as a fraction of the path.", minimum=0, maximum=1)
_BASELINES = Setting("baselines", "choice", "black-white", "XRAI's two IG baselines: black and white pictures, or "
                     "constants at the input's min and max.", choices=("black-white", "input-range"))
_SEARCH = Setting("search", "choice", "full", "XRAI's region search: full re-scores regions after each one added, "
                  "fast ranks them once.", choices=("full", "fast"))
_AREA = Setting("area", "float", 1.0, "share of the picture XRAI ranks regions for; the rest is one region.",
                minimum=0, maximum=1)
_ORIENTATION = Setting("orientation", "choice", "activation",
                       "EigenCAM's sign of the principal component, which an SVD leaves arbitrary: activation points it "
                       "where the activations grow (loadings summing >= 0); svd keeps the sign the SVD routine returns, "
                       "as pytorch-grad-cam does.", choices=("activation", "svd"))
#: Settings every method has: they act on its per-pixel values, after the method.
COMMON_SETTINGS = (
    Setting("modifier", "choice", "auto",
            "Gradient modifier before the channel reduction: auto leaves the sign to --reduce (max takes |values|, "
            "sum keeps the sign); negative shows counter-evidence.",
            choices=("auto", "absolute", "positive", "negative", "none")),
)

_GRADIENT_OUTPUTS = (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, OUTPUT_GRADIENT)
_CAM_OUTPUTS = (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, OUTPUT_CAM_ACTIVATION, OUTPUT_CAM_GRADIENT)
_FORWARD_OUTPUTS = (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX)
_METHODS = "gradmap.runtime.methods:"
_CAM = "gradmap.runtime.cam:"
_PERTURBATION = "gradmap.runtime.perturbation:"
_PATHS = "gradmap.runtime.paths:"
_ATTENTION = "gradmap.runtime.attention:"
_HEAD_FUSION = Setting("head_fusion", "choice", "mean", "how attention rollout combines the heads of a layer "
                       "(the paper: mean).", choices=("mean", "max", "min"))

#: Every attribution method, in the order ``gradmap run --method`` and ``gradmap info`` list them.
METHOD_TABLE: tuple[Method, ...] = (
    Method("vanilla", KIND_GRADIENT, "the gradient of the class score (Simonyan et al. 2013)",
           _GRADIENT_OUTPUTS, _METHODS + "model_gradient_method", web="modelGradient"),
    Method("smoothgrad", KIND_GRADIENT, "the gradient averaged over noisy copies of the input (Smilkov et al. 2017)",
           _GRADIENT_OUTPUTS, _METHODS + "smoothgrad_method", web="smoothGrad",
           settings=(_SAMPLES, _NOISE, _VARIANT, _SEED)),
    Method("integrated-gradients", KIND_ATTRIBUTION,
           "(input - baseline) x the gradient integrated along the path between them (Sundararajan et al. 2017)",
           _GRADIENT_OUTPUTS, _METHODS + "integrated_gradients_method", settings=(_STEPS, _RULE, _BASELINE, _SEED)),
    Method("gradient-x-input", KIND_ATTRIBUTION, "the gradient times the input (Shrikumar et al. 2016)",
           _GRADIENT_OUTPUTS, _METHODS + "gradient_x_input_method", web="gradientTimesInput"),
    Method("guided-backprop", KIND_GRADIENT,
           "the gradient with ReLUs passing positive gradients of positive inputs only (Springenberg et al. 2015)",
           (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, OUTPUT_GRADIENT_GUIDED), _METHODS + "model_gradient_method",
           web="modelGradient"),
    Method("deconvnet", KIND_GRADIENT, "the gradient with ReLUs passing positive gradients (Zeiler & Fergus 2014)",
           (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, OUTPUT_GRADIENT_DECONVNET), _METHODS + "model_gradient_method",
           web="modelGradient"),
    Method("grad-cam", KIND_CAM, "a feature map weighted by its mean gradient (Selvaraju et al. 2017)",
           _CAM_OUTPUTS, _CAM + "grad_cam_method", web="gradCam"),
    Method("grad-cam++", KIND_CAM, "a feature map weighted by higher-order gradient terms (Chattopadhay et al. 2018)",
           _CAM_OUTPUTS, _CAM + "grad_cam_plus_plus_method", web="gradCamPlusPlus"),
    Method("guided-grad-cam", KIND_ATTRIBUTION,
           "guided backpropagation times the Grad-CAM map (Selvaraju et al. 2017)",
           (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, OUTPUT_GRADIENT_GUIDED, OUTPUT_CAM_ACTIVATION, OUTPUT_CAM_GRADIENT),
           _CAM + "guided_grad_cam_method", web="guidedGradCam"),
    Method("hirescam", KIND_CAM, "the feature map times its gradient, summed over channels (Draelos & Carin 2020)",
           _CAM_OUTPUTS, _CAM + "hires_cam_method", web="hiResCam"),
    Method("xgrad-cam", KIND_CAM, "a feature map weighted by its activation-weighted gradient (Fu et al. 2020)",
           _CAM_OUTPUTS, _CAM + "xgrad_cam_method", web="xGradCam"),
    Method("layer-cam", KIND_CAM, "the feature map weighted per position by its positive gradient (Jiang et al. 2021)",
           _CAM_OUTPUTS, _CAM + "layer_cam_method", web="layerCam"),
    Method("eigen-cam", KIND_CAM, "the feature map's first principal component, class-agnostic (Muhammad & Yeasin 2020)",
           (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, OUTPUT_CAM_ACTIVATION), _CAM + "eigen_cam_method", web="eigenCam",
           settings=(_ORIENTATION,)),
    # Score-CAM takes one forward pass per feature-map channel (resnet18: 512, each a large part of
    # the ~1 s a resnet18 map takes in onnxruntime-web's WebAssembly): far over the page's ~10 s
    # budget for a resnet18 map, so the page does not offer it, nor occlusion and RISE (hundreds to
    # thousands of passes)
    Method("score-cam", KIND_CAM,
           "feature-map channels weighted by the scores of the input masked by each (Wang et al. 2020); forward only",
           (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, OUTPUT_CAM_ACTIVATION), _PERTURBATION + "score_cam_method",
           settings=(_MASK_BATCH,)),
    Method("occlusion", KIND_ATTRIBUTION,
           "the score's drop when a sliding window of the baseline hides each region (Zeiler & Fergus 2014); "
           "forward only", _FORWARD_OUTPUTS, _PERTURBATION + "occlusion_method",
           settings=(_WINDOW, _STRIDE, _BASELINE, _SEED, _MASK_BATCH)),
    Method("rise", KIND_CAM,
           "random masks weighted by the class probability of the masked input (Petsiuk et al. 2018); forward only",
           _FORWARD_OUTPUTS, _PERTURBATION + "rise_method",
           settings=(_MASKS, _GRID, _PROBABILITY, _BASELINE, _SEED, _MASK_BATCH)),
    # Blur IG, Guided IG and XRAI take 100-200 gradients per map (or a segmentation): slower than
    # the page's ~10 s budget for a resnet18 map, so the page does not offer them
    Method("blur-ig", KIND_ATTRIBUTION,
           "integrated gradients along a path from a blurred copy of the input to the input (Xu et al. 2020)",
           _GRADIENT_OUTPUTS, _PATHS + "blur_ig_method",
           settings=(replace(_STEPS, default=100), _MAX_SIGMA, _GRAD_STEP)),
    Method("guided-ig", KIND_ATTRIBUTION,
           "integrated gradients along a path that moves low-gradient features first (Kapishnikov et al. 2021)",
           _GRADIENT_OUTPUTS, _PATHS + "guided_ig_method",
           settings=(replace(_STEPS, default=200), _FRACTION, _MAX_DIST, _BASELINE, _SEED)),
    Method("xrai", KIND_REGION,
           "integrated gradients summed into image regions, ranked by attribution density (Kapishnikov et al. 2019)",
           _GRADIENT_OUTPUTS, _PATHS + "xrai_method", settings=(_STEPS, _RULE, _BASELINES, _SEARCH, _AREA)),
    Method("attention-rollout", KIND_CAM,
           "the attention of the class token, rolled out through the layers with the residual (Abnar & Zuidema "
           "2020); class-agnostic", (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, OUTPUT_ATTENTION),
           _ATTENTION + "attention_rollout_method", settings=(_HEAD_FUSION,)),
    Method("attention-relevance", KIND_CAM,
           "attention weighted by its positive gradient, averaged over heads and rolled out (Chefer, Gur & Wolf "
           "2021)", (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, OUTPUT_ATTENTION, OUTPUT_ATTENTION_GRADIENT),
           _ATTENTION + "attention_relevance_method"),
)
#: The method ``gradmap run``, the Python API and the web page use when none is given.
DEFAULT_METHOD = "vanilla"

#: Method names, in table order: the choices of ``--method``.
METHODS = tuple(m.name for m in METHOD_TABLE)
_BY_NAME = {m.name: m for m in METHOD_TABLE}


def _settings_by_name() -> dict[str, Setting]:
    """Every setting by name, the common ones first: one definition per name."""
    found: dict[str, Setting] = {}
    for setting in (*COMMON_SETTINGS, *(s for m in METHOD_TABLE for s in m.settings)):
        first = found.setdefault(setting.name, setting)
        if not first.same_definition(setting):
            raise ValueError(f"two settings named {setting.name!r} differ in type, choices, range or help; "
                             "give one of them another name")
    return found


#: Every setting by name (one ``--NAME`` option each); a method's own default may differ.
SETTINGS = _settings_by_name()
if len(_BY_NAME) != len(METHOD_TABLE) or DEFAULT_METHOD not in _BY_NAME:
    raise ValueError("method names must be unique and include the default method")


def method(name: str) -> Method:
    """The table's row for ``name``; ValueError naming the methods when there is none."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def methods_using(setting: str) -> tuple[str, ...]:
    """The methods that have this setting (every method for a common setting), in table order."""
    return tuple(m.name for m in METHOD_TABLE if any(s.name == setting for s in m.all_settings))


def methods_for(backprops: "tuple[str, ...] | list[str]", has_cam: bool, has_attention: bool = False
                ) -> tuple[str, ...]:
    """The methods a model with these gradient outputs supports, in table order: those whose
    outputs it has (see :func:`model_outputs`)."""
    available = set(model_outputs(backprops, has_cam, has_attention))
    return tuple(m.name for m in METHOD_TABLE if available.issuperset(m.outputs))


def props_have_gradient(props: Mapping[str, str]) -> bool:
    """Whether a model's ``metadata_props`` describe a model with its backward pass: False only for a
    forward-only model (an empty ``gradmap.backprop``), read without checking the rest."""
    try:
        return json.loads(props.get(_KEY_BACKPROP) or '["vanilla"]') != []
    except json.JSONDecodeError:
        return True


class ContractError(ValueError):
    """A model file or metadata does not follow gradmap's model contract."""


_ATTENTION_FIELDS = frozenset({"layers", "heads", "tokens", "prefix_tokens", "grid", "readout"})


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
    #: ``--attention``: what the attention outputs hold: ``layers``, ``heads``, ``tokens`` (T),
    #: ``prefix_tokens`` (class, distillation and register tokens before the patches), ``grid``
    #: ([h, w] of the patch tokens) and ``readout`` (the token indices the classifier reads).
    attention: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.score not in SCORE_KINDS:
            raise ContractError(f"score kind {self.score!r} is not one of {', '.join(SCORE_KINDS)}")
        unknown = [b for b in self.backprops if b not in BACKPROP_OUTPUTS]
        if unknown or (self.backprops and DEFAULT_BACKPROP not in self.backprops):
            raise ContractError(f"backprop rules must include {DEFAULT_BACKPROP!r} and be among {', '.join(BACKPROP_OUTPUTS)}, "
                                f"or be none (a forward-only model); got {list(self.backprops)}")
        object.__setattr__(self, "backprops", tuple(self.backprops))
        if self.format_version is None:
            object.__setattr__(self, "format_version", self.lowest_format_version)
        elif not self.backprops and self.format_version < 3:
            raise ContractError(f"gradmap.backprop is empty (a forward-only model), which format version "
                                f"{self.format_version} does not allow: forward-only models are version 3")
        if self.target not in TARGETS:
            raise ContractError(f"target {self.target!r} is not one of {', '.join(TARGETS)}")
        if not self.labels:
            raise ContractError("a gradmap model needs at least one class label")
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def gradient(self) -> bool:
        """Whether the model has its backward pass; False for ``gradmap export --no-gradient``."""
        return bool(self.backprops)

    @property
    def lowest_format_version(self) -> int:
        """The lowest model format that describes this model (see :data:`FORMAT_VERSION`)."""
        return max(self.preprocessing.format_version, 1 if self.gradient else 3)

    def export_options(self, name: "str | Method") -> tuple[str, ...]:
        """The ``gradmap export`` options that give a model like this one ``method``: the method's own
        (:attr:`Method.export_options`), led by ``--gradient`` where it reads the backward pass this
        forward-only model lacks."""
        row = name if isinstance(name, Method) else method(name)
        if row.needs_gradient and not self.gradient:
            return (GRADIENT_OPTION, *row.export_options)
        return row.export_options

    def unsupported(self, name: "str | Method") -> str | None:
        """Why this model does not support ``method``, with the export options that add it; None
        when it does."""
        row = name if isinstance(name, Method) else method(name)
        if row.name in self.methods:
            return None
        if row.needs_gradient and not self.gradient:
            return (f"{row.name} reads the gradient and the model was exported without one ({NO_GRADIENT_OPTION}); "
                    f"export it with {' '.join(self.export_options(row))}")
        return f"export it with {' '.join(row.export_options)}"

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs this model has (see :func:`model_outputs`)."""
        return model_outputs(self.backprops, self.cam_layer is not None, self.attention is not None)

    @property
    def methods(self) -> tuple[str, ...]:
        """Attribution methods this model supports (see :func:`methods_for`)."""
        return methods_for(self.backprops, self.cam_layer is not None, self.attention is not None)

    def to_props(self) -> dict[str, str]:
        """Serialize to the string key/value pairs of ONNX ``metadata_props``."""
        return {
            _KEY_FORMAT: str(self.lowest_format_version),
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
            **({_KEY_ATTENTION: json.dumps(dict(self.attention))} if self.attention is not None else {}),
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
            attention = json.loads(props[_KEY_ATTENTION]) if props.get(_KEY_ATTENTION) else None
        except json.JSONDecodeError as e:
            raise ContractError(f"gradmap metadata is not valid JSON: {e}") from e
        if not isinstance(labels, list):
            raise ContractError("gradmap.labels must be a JSON list of class names")
        if attention is not None and not (isinstance(attention, dict) and _ATTENTION_FIELDS <= set(attention)):
            raise ContractError(f"gradmap.attention must be a JSON object with {', '.join(sorted(_ATTENTION_FIELDS))}")
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
            attention=attention,
        )
