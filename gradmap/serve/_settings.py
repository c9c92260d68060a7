"""What a request may ask for, checked in one place: the method, its settings, the target and the response.

The names, choices and defaults are ``gradmap run``'s (``--method``, ``--samples``, ``--target``,
``--reduce``, ``--format``...), taken from :mod:`gradmap.contract` and the runtime, not spelled again
here. A request gives them as JSON ``parameters`` (KServe V1, Open Inference Protocol) or as query
parameters (``POST /explain/NAME?method=smoothgrad&samples=25``); either way they go through
:func:`read_settings`, which raises :class:`BadRequest` naming the parameter and the reason.

The result splits in two: :class:`BatchKey` (what decides the numbers: only requests with equal keys
share a model run) and :class:`ResponseOptions` (how the numbers are shown, drawn per request).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from gradmap import contract
from gradmap.runtime.colormaps import COLORMAPS
from gradmap.runtime.errors import TargetError
from gradmap.runtime.render import OVERLAYS, RenderOptions
from gradmap.runtime.methods import BASELINES, IG_RULES, MODIFIERS, SMOOTHGRAD_VARIANTS, MethodSpec
from gradmap.runtime.postprocess import PLACEMENTS, REDUCTIONS
from gradmap.runtime.saliency import Target, parse_target

__all__ = ["ARRAY_OUTPUTS", "BadRequest", "BatchKey", "OUTPUTS", "PICTURE_OUTPUTS", "PREDICT", "ResponseOptions",
           "read_settings"]

PREDICT = "predict"

#: Arrays a response can carry, on the model's input grid: the min-max map [h, w] (``.map.npy``), its
#: histogram-equalized form, and the method's attribution [C, h, w] (``.gradient.npy`` and its kin).
ARRAY_OUTPUTS = ("map", "equalized", "attribution")
#: ``gradmap run``'s pictures (PNG, on the original picture): its output formats but the arrays.
PICTURE_OUTPUTS = tuple(f for f in contract.OUTPUT_FORMATS if f != "npy")
#: Everything ``format`` may list: the arrays and ``gradmap run``'s pictures.
OUTPUTS = ARRAY_OUTPUTS + PICTURE_OUTPUTS
DEFAULT_OUTPUTS = ("map",)


class BadRequest(ValueError):
    """A request the server refuses: ``status`` (4xx) and the reason, for the JSON error body."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class BatchKey:
    """What decides a request's numbers. Pictures whose requests have equal keys run as one batch."""

    model: str
    kind: str  # "explain" or PREDICT
    method: MethodSpec = MethodSpec()
    target: Target = Target("top", 1)
    reduce: str = "max"
    clip: tuple[float, float] | None = None
    no_crop: bool = False


@dataclass(frozen=True)
class ResponseOptions:
    """How a request's maps are returned: ``outputs`` among :data:`OUTPUTS`, drawn with ``render``."""

    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    render: RenderOptions = RenderOptions()


# -- the method part: the one place that knows how methods and their settings are described --------
# Today: MethodSpec's fields and defaults, the choice lists and lower bounds `gradmap run` declares,
# and which method reads which setting. With contract's method table this block becomes: the
# setting names of the table's rows, `Setting.check` for types and ranges, and
# `MethodSpec.from_request(method, settings)` in `_method_spec`.
_METHOD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MethodSpec) if f.name != "name"}
_METHOD_CHOICES = {"variant": SMOOTHGRAD_VARIANTS, "rule": IG_RULES, "baseline": BASELINES,
                   "modifier": ("auto",) + MODIFIERS}
_METHOD_MINIMUM = {"samples": 1, "steps": 2, "noise": 0.0}
_SETTINGS_READ_BY = {"smoothgrad": ("samples", "noise", "variant", "seed"),
                     "integrated-gradients": ("steps", "rule", "baseline", "seed")}
#: Settings whose value multiplies the work of one picture (model runs per picture).
_PASSES = ("samples", "steps")


def _method_spec(method: str, values: Mapping[str, Any], model_name: str, metadata: contract.ModelMetadata,
                 max_passes: int) -> MethodSpec:
    """The method with its settings from ``values`` (typed already), checked against the model and
    the server's limit on passes. A setting the method does not read takes its default, so that it
    does not split batches (``gradmap run`` ignores it too)."""
    if method not in contract.METHODS:
        raise BadRequest(f"unknown method {method!r}; choose one of {', '.join(contract.METHODS)}")
    if method not in metadata.methods:
        raise BadRequest(f"model {model_name!r} does not support {method}; it supports {', '.join(metadata.methods)}")
    settings = {}
    for name, default in _METHOD_DEFAULTS.items():
        if name not in _SETTINGS_READ_BY.get(method, ()) and name != "modifier":
            settings[name] = default
            continue
        value = values[name]
        if name in _METHOD_MINIMUM and value < _METHOD_MINIMUM[name]:
            raise BadRequest(f"parameter {name!r} must be at least {_METHOD_MINIMUM[name]}, got {value}")
        if name in _PASSES and value > max_passes:
            raise BadRequest(f"parameter {name!r} is {value}; this server allows at most {max_passes} "
                             "(--max-passes)")
        settings[name] = value
    try:
        return MethodSpec(method, **settings)
    except ValueError as e:
        raise BadRequest(str(e)) from None


# -- the other parameters: gradmap run's options of the same names ---------------------------------
_RENDER_DEFAULTS = RenderOptions()
_COMMON = {"method": "vanilla", "target": "top1", "reduce": "max", "clip_percentile": None, "no_crop": False,
           "format": ",".join(DEFAULT_OUTPUTS), "colormap": _RENDER_DEFAULTS.colormap,
           "overlay": _RENDER_DEFAULTS.overlay, "alpha": None, "placement": _RENDER_DEFAULTS.placement,
           "equalize": _RENDER_DEFAULTS.equalize}
_CHOICES = {"reduce": REDUCTIONS, "colormap": tuple(COLORMAPS), "overlay": OVERLAYS, "placement": PLACEMENTS,
            **_METHOD_CHOICES}
KNOWN = tuple(_COMMON) + tuple(_METHOD_DEFAULTS)


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise BadRequest(f"parameter {name!r} must be true or false, got {value!r}")


def _number(name: str, value: Any, kind: Callable[[Any], Any]) -> Any:
    if isinstance(value, bool):
        raise BadRequest(f"parameter {name!r} must be a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise BadRequest(f"parameter {name!r} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {value!r}") from None
    if kind is float and number != number:
        raise BadRequest(f"parameter {name!r} must be a number, got NaN")
    if kind is int and isinstance(value, float) and value != int(value):
        raise BadRequest(f"parameter {name!r} must be an integer, got {value!r}")
    return number


def _typed(name: str, value: Any, default: Any) -> Any:
    if name in _CHOICES:
        if not isinstance(value, str) or value not in _CHOICES[name]:
            raise BadRequest(f"parameter {name!r} is {value!r}; choose one of {', '.join(_CHOICES[name])}")
        return value
    if isinstance(default, bool):
        return _boolean(name, value)
    if isinstance(default, int):
        return _number(name, value, int)
    if isinstance(default, float) or name in ("alpha", "clip_percentile"):
        return _number(name, value, float)
    return value


def read_settings(params: Mapping[str, Any], model_name: str, metadata: contract.ModelMetadata, *,
                  max_top: int, max_passes: int, kind: str = "explain") -> tuple[BatchKey, ResponseOptions]:
    """Check a request's parameters against the model and the server's limits.

    Args:
        params: parameter name to value (JSON values or query strings); absent ones take ``gradmap
            run``'s defaults.
        model_name, metadata: the model the request is for (its methods and labels).
        max_top: the largest K of a ``topK`` target (each rank is one more model run).
        max_passes: the largest ``samples`` (SmoothGrad) or ``steps`` (integrated gradients).
        kind: ``explain``, or :data:`PREDICT` (the classes only: it takes no parameters).

    Raises:
        BadRequest: an unknown parameter, a value of the wrong type or out of range, a method the
            model does not support, a target that does not fit its labels.
    """
    unknown = [name for name in params if name not in KNOWN]
    if unknown:
        raise BadRequest(f"unknown parameter {', '.join(map(repr, unknown))}; known: {', '.join(KNOWN)}")
    if kind == PREDICT and params:
        raise BadRequest(f"predict takes no parameters ({', '.join(map(repr, params))}): it returns the classes "
                         "only; explain computes maps")
    values = {name: (default if params.get(name) is None else _typed(name, params[name], default))
              for name, default in {**_COMMON, **_METHOD_DEFAULTS}.items()}

    method = _method_spec(values["method"], values, model_name, metadata, max_passes)
    try:
        target = parse_target(values["target"] if not isinstance(values["target"], bool) else str(values["target"]),
                              metadata.labels)
    except TargetError as e:
        raise BadRequest(f"parameter 'target': {e}") from None
    if target.kind == "top" and target.value > max_top:
        raise BadRequest(f"parameter 'target' is top{target.value}; this server explains at most top{max_top} "
                         "(--max-top)")
    if values["reduce"] not in REDUCTIONS:
        raise BadRequest(f"parameter 'reduce' is {values['reduce']!r}; choose one of {', '.join(REDUCTIONS)}")
    clip = values["clip_percentile"]
    if clip is not None and not 0 <= clip <= 100:
        raise BadRequest(f"parameter 'clip_percentile' must be in [0, 100], got {clip}")
    alpha = values["alpha"]
    if alpha is not None and not 0 <= alpha <= 1:
        raise BadRequest(f"parameter 'alpha' must be in [0, 1], got {alpha}")
    outputs = values["format"]
    outputs = [o.strip() for o in (outputs.split(",") if isinstance(outputs, str) else outputs) if str(o).strip()] \
        if isinstance(outputs, (str, list, tuple)) else None
    if not outputs or any(not isinstance(o, str) or o not in OUTPUTS for o in outputs):
        raise BadRequest(f"parameter 'format' is {values['format']!r}; list some of {', '.join(OUTPUTS)}")
    key = BatchKey(model_name, kind, method, target, values["reduce"],
                   None if clip is None else (0.0, float(clip)), values["no_crop"])
    if kind == PREDICT:
        key = BatchKey(model_name, PREDICT)
    render = RenderOptions(equalize=values["equalize"], placement=values["placement"], colormap=values["colormap"],
                           alpha=alpha, overlay=values["overlay"])
    return key, ResponseOptions(tuple(dict.fromkeys(outputs)), render)
