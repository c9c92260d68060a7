"""What a request may ask for, checked in one place: the method, its settings, the target and the response.

The names, choices and defaults are ``gradmap run``'s (``--method``, ``--target``, ``--reduce``,
``--format``...), taken from :mod:`gradmap.contract`, not spelled again here; the method and its
settings (``samples``, ``steps``...) are the method table's (``contract.METHOD_TABLE``), checked by
:meth:`MethodSpec.from_request`: every method and setting the table has is accepted, and a setting
the requested method does not have is refused. A request gives them as JSON ``parameters`` (KServe
V1, Open Inference Protocol) or as query parameters (``POST /explain/NAME?method=smoothgrad&samples=25``);
either way they go through :func:`read_settings`, which raises :class:`BadRequest` naming the
parameter and the reason.

The result splits in two: :class:`BatchKey` (what decides the numbers: only requests with equal keys
share a model run) and :class:`ResponseOptions` (how the numbers are shown, drawn per request).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from gradmap import contract
from gradmap.runtime.colormaps import COLORMAPS
from gradmap.runtime.errors import TargetError
from gradmap.runtime.render import OVERLAYS, RenderOptions
from gradmap.runtime.methods import RUN_COUNT_SETTINGS, MethodSpec, ModelRuns, check_supported, model_runs
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
    reduce: str = contract.DEFAULT_REDUCTION
    clip: tuple[float, float] | None = None
    no_crop: bool = False


@dataclass(frozen=True)
class ResponseOptions:
    """How a request's maps are returned: ``outputs`` among :data:`OUTPUTS`, drawn with ``render``."""

    outputs: tuple[str, ...] = DEFAULT_OUTPUTS
    render: RenderOptions = RenderOptions()


# -- the method part: the method table (contract.METHOD_TABLE) describes methods and settings --------
if not set(RUN_COUNT_SETTINGS) <= set(contract.SETTINGS):  # pragma: no cover - a renamed setting must not slip the cap
    raise ImportError(f"gradmap serve caps settings the method table lacks: {set(RUN_COUNT_SETTINGS) - set(contract.SETTINGS)}")


def too_many_runs(spec: MethodSpec, runs: ModelRuns, max_passes: int, given: Mapping[str, Any] = ()) -> str | None:
    """Why one picture of ``spec`` is more model runs than ``--max-passes`` allows, naming the
    settings (given by the request, or the method's defaults), the limit, the option that raises it
    and what the request may send instead; None when it fits."""
    if runs.count <= max_passes:
        return None
    name = spec.name
    values = ", ".join(f"{s}={spec.settings[s]}" for s in runs.settings)
    if not runs.settings:
        what = name
    elif any(s in given for s in runs.settings):
        what = f"{name} with {values}"
    else:
        what = f"{name} at its default {values}"
    detail = f" ({runs.detail})" if runs.detail else ""
    fixes = []
    if len(runs.settings) == 1 and max_passes // runs.per_unit >= 1:
        fixes.append(f"send {runs.settings[0]}={max_passes // runs.per_unit} or less")
    elif runs.settings:
        fixes.append(f"send a larger {' or '.join(runs.settings)}")
    fixes.append(f"start the server with --max-passes {runs.count} or more")
    return (f"{what} takes {runs.count} model runs per picture{detail}; this server allows at most {max_passes} "
            f"(--max-passes): {', or '.join(fixes)}")


def over_max_passes(model: Any, max_passes: int) -> dict[str, str]:
    """The methods of ``model`` whose default settings take more model runs per picture than
    ``max_passes``, each with the reason a request for it at those settings gets (the server logs
    them at startup and lists them in its model metadata)."""
    found = {}
    for name in model.metadata.methods:
        spec = MethodSpec(name)
        runs = model_runs(model, spec)
        reason = too_many_runs(spec, runs, max_passes) if runs is not None else None
        if reason is not None:
            found[name] = reason
    return found


def _method_spec(method: Any, settings: Mapping[str, Any], model_name: str, metadata: contract.ModelMetadata,
                 max_passes: int, model: Any = None) -> MethodSpec:
    """The method with the request's ``settings``, checked by the method table
    (:meth:`MethodSpec.from_request`: a setting the method does not have, a wrong type or a value out
    of range is refused, naming the setting), against the model and the server's limit on model runs
    per picture (:func:`~gradmap.runtime.methods.model_runs`; with ``model`` None, from the settings alone)."""
    try:
        row = contract.method(method)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    reason = metadata.unsupported(row)
    if reason is not None:  # as gradmap run's check_supported says it
        raise BadRequest(f"model {model_name!r} does not support {row.name} (it supports "
                         f"{', '.join(metadata.methods)}); {reason}")
    try:
        spec = MethodSpec.from_request(row.name, dict(settings))
    except ValueError as e:  # contract.MethodSettingError
        raise BadRequest(str(e)) from None
    if model is not None:
        try:  # settings that depend on the model (a window larger than its input), as gradmap run refuses them
            check_supported(model, spec, f"model {model_name!r}")
        except ValueError as e:
            raise BadRequest(str(e)) from None
    runs = model_runs(model, spec)
    refused = too_many_runs(spec, runs, max_passes, settings) if runs is not None else None
    if refused is not None:
        raise BadRequest(refused)
    return spec


# -- the other parameters: gradmap run's options of the same names ---------------------------------
_RENDER_DEFAULTS = RenderOptions()
_COMMON = {"method": contract.DEFAULT_METHOD, "target": contract.DEFAULT_TARGET, "reduce": contract.DEFAULT_REDUCTION,
           "clip_percentile": None, "no_crop": False,
           "format": ",".join(DEFAULT_OUTPUTS), "colormap": _RENDER_DEFAULTS.colormap,
           "overlay": _RENDER_DEFAULTS.overlay, "alpha": None, "placement": _RENDER_DEFAULTS.placement,
           "equalize": _RENDER_DEFAULTS.equalize}
_CHOICES = {"reduce": REDUCTIONS, "colormap": tuple(COLORMAPS), "overlay": OVERLAYS, "placement": PLACEMENTS}
#: Every parameter a request may give: gradmap run's options, then the method table's settings.
KNOWN = tuple(_COMMON) + tuple(contract.SETTINGS)
if set(_COMMON) & set(contract.SETTINGS):  # pragma: no cover - the table must not take a parameter's name
    raise ImportError(f"method settings named like gradmap serve's parameters: {set(_COMMON) & set(contract.SETTINGS)}")


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
                  max_top: int, max_passes: int, kind: str = "explain", model: Any = None
                  ) -> tuple[BatchKey, ResponseOptions]:
    """Check a request's parameters against the model and the server's limits.

    Args:
        params: parameter name to value (JSON values or query strings); absent ones take ``gradmap
            run``'s defaults.
        model_name, metadata: the model the request is for (its methods and labels).
        max_top: the largest K of a ``topK`` target (each rank is one more model run).
        max_passes: the most model runs one picture may take (SmoothGrad's ``samples``, a path's
            ``steps``, RISE's ``masks``, occlusion's windows, Score-CAM's channels).
        kind: ``explain``, or :data:`PREDICT` (the classes only: it takes no parameters).
        model: the loaded model, when there is one: its input size and CAM layer count the runs of
            occlusion and Score-CAM, and settings that do not fit it are refused.

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
              for name, default in _COMMON.items()}
    settings = {name: params[name] for name in contract.SETTINGS if params.get(name) is not None}

    method = _method_spec(values["method"], settings, model_name, metadata, max_passes, model)
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
