"""Attribution methods built on a model's gradient, batched, torch-free.

    vanilla               dS/dx                                        (Simonyan et al. 2013)
    smoothgrad            mean_k dS/dx(x + e_k), e_k ~ N(0, sigma^2),   sigma = noise * (max x - min x)
                          variants: plain, squared (mean of squares), vargrad (variance)   (Smilkov et al. 2017)
    integrated-gradients  (x - x0) * sum_k w_k dS/dx(x0 + a_k (x - x0)),  Riemann trapezoid, Gauss-Legendre or
                          equal weights 1/steps at evenly spaced a_k (both ends included) on [0, 1];
                          baselines black, blurred, uniform noise  (Sundararajan et al. 2017)
    gradient-x-input      x * dS/dx
    modifiers             absolute (default), positive, negative: applied to the attribution before maps

A *gradient function* ``fn(images, targets) -> (logits, target_index, gradient)`` is what these
methods call; :func:`gradient_function` makes one from a loaded model and a gradient output (through
:meth:`SaliencyModel.run_outputs <gradmap.runtime.model.SaliencyModel.run_outputs>`, the runtime's one
way into onnxruntime).

Which method runs is the method table's business (:data:`gradmap.contract.METHOD_TABLE`): a row names
its implementation, a function ``(model, spec, images, targets, *, batch_size) -> Attribution``
(:data:`MethodImplementation`; the ``*_method`` functions here and in :mod:`gradmap.runtime.cam`), and
:func:`attribute` checks that the model has the method, calls it and applies the modifier.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from gradmap import contract
from gradmap.contract import OUTPUT_GRADIENT, OUTPUT_LOGITS, OUTPUT_TARGET_INDEX

__all__ = [
    "METHODS", "MethodSpec", "MethodImplementation", "UnsupportedMethodError", "attribute", "check_supported",
    "implementation", "GradientFn", "Attribution", "gradient_function", "vanilla", "smoothgrad",
    "integrated_gradients", "gradient_x_input", "modify", "baseline_image", "score_of", "SMOOTHGRAD_VARIANTS",
    "MODIFIERS", "model_gradient_method", "smoothgrad_method", "integrated_gradients_method",
    "gradient_x_input_method", "path_gradients", "ModelRuns", "RUN_COUNT_SETTINGS", "model_runs",
]

GradientFn = Callable[[np.ndarray, np.ndarray], "tuple[np.ndarray, np.ndarray, np.ndarray]"]
SMOOTHGRAD_VARIANTS = contract.SETTINGS["variant"].choices
#: The modifiers :func:`modify` applies; the default setting, ``auto``, leaves the values to the reduction.
AUTO_MODIFIER = contract.SETTINGS["modifier"].default
MODIFIERS = tuple(m for m in contract.SETTINGS["modifier"].choices if m != AUTO_MODIFIER)
IG_RULES = contract.SETTINGS["rule"].choices
BASELINES = contract.SETTINGS["baseline"].choices


@dataclass
class Attribution:
    """Per-pixel attribution [N, 3, H, W] for resolved targets, plus what the method reports."""

    values: np.ndarray
    target_index: np.ndarray
    logits: np.ndarray
    completeness_gap: np.ndarray | None = None  # IG: |sum attribution - (F(x) - F(x0))| per image


def gradient_function(model, output: str = OUTPUT_GRADIENT, batch_size: int = 16) -> GradientFn:
    """A gradient function over a loaded :class:`~gradmap.runtime.model.SaliencyModel`, in chunks of
    ``batch_size``; ``output`` names the gradient (``gradient``, ``gradient_guided``, ...)."""
    names = (OUTPUT_LOGITS, OUTPUT_TARGET_INDEX, output)

    def fn(images: np.ndarray, targets: np.ndarray):
        parts = [model.run_outputs(images[start:start + batch_size], targets[start:start + batch_size], names)
                 for start in range(0, len(images), batch_size)]
        return tuple(np.concatenate([p[name] for p in parts]) for name in names)

    return fn


def score_of(logits: np.ndarray, target_index: np.ndarray, score: str = "logit") -> np.ndarray:
    """The differentiated score per sample: the logit, the softmax probability or its log."""
    logits = logits.astype(np.float64)
    picked = logits[np.arange(len(logits)), target_index]
    if score == "logit":
        return picked
    log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return np.exp(picked - log_z) if score == "probability" else picked - log_z


def vanilla(fn: GradientFn, images: np.ndarray, targets: np.ndarray) -> Attribution:
    logits, target_index, gradient = fn(images, targets)
    return Attribution(gradient, target_index, logits)


def smoothgrad(fn: GradientFn, images: np.ndarray, targets: np.ndarray, *, samples: int = 50, noise: float = 0.15,
               variant: str = "plain", seed: int | None = 0, noise_draws: np.ndarray | None = None) -> Attribution:
    """SmoothGrad over ``samples`` noisy copies of each image.

    Args:
        noise: sigma as a fraction of each image's value range (max - min), 0.15 as in the paper.
        variant: ``plain`` (mean gradient), ``squared`` (mean squared gradient, SmoothGrad-Squared)
            or ``vargrad`` (variance of the gradients).
        noise_draws: explicit noise [N, samples, 3, H, W] in place of the seeded draws (tests use it
            to feed the same draws to another implementation).
    """
    if variant not in SMOOTHGRAD_VARIANTS:
        raise ValueError(f"smoothgrad variant {variant!r} is not one of {', '.join(SMOOTHGRAD_VARIANTS)}")
    if samples < 1:
        raise ValueError("smoothgrad needs at least one sample")
    logits, target_index, _ = fn(images, targets)  # resolve top-1 on the clean image, once
    n = len(images)
    if noise_draws is None:
        rng = np.random.default_rng(seed)
        sigma = noise * (images.reshape(n, -1).max(1) - images.reshape(n, -1).min(1))
        noise_draws = rng.standard_normal((n, samples, *images.shape[1:]), dtype=np.float32)
        noise_draws *= sigma.astype(np.float32)[:, None, None, None, None]
    elif noise_draws.shape != (n, samples, *images.shape[1:]):
        raise ValueError(f"noise_draws must have shape {(n, samples, *images.shape[1:])}, got {noise_draws.shape}")
    noisy = (images[:, None] + noise_draws).reshape(n * samples, *images.shape[1:])
    _, _, grads = fn(noisy, np.repeat(target_index, samples))
    grads = grads.reshape(n, samples, *images.shape[1:]).astype(np.float64)
    if variant == "plain":
        values = grads.mean(1)
    elif variant == "squared":
        values = (grads ** 2).mean(1)
    else:
        values = (grads ** 2).mean(1) - grads.mean(1) ** 2
    return Attribution(values.astype(np.float32), target_index, logits)


def baseline_image(images: np.ndarray, kind: str, mean, std, *, seed: int | None = 0, blur_sigma: float = 20.0,
                   value_range: str = "0-1") -> np.ndarray:
    """Integrated-gradients baselines in the model's normalized space: ``black`` (pixel value 0,
    i.e. (0 - mean) / std), ``blurred`` (Gaussian blur of the image, sigma in pixels) or
    ``uniform`` (uniform pixel noise over the whole pixel range, normalized). ``value_range`` is the
    model's pixel scale (:data:`gradmap.contract.VALUE_RANGES`)."""
    mean = np.asarray(mean, np.float32)[None, :, None, None]
    std = np.asarray(std, np.float32)[None, :, None, None]
    if kind == "black":
        return np.broadcast_to((0 - mean) / std, images.shape).astype(np.float32)
    if kind == "blurred":
        from scipy import ndimage  # imported here: gradmap run's default method needs no scipy

        return ndimage.gaussian_filter(images, sigma=(0, 0, blur_sigma, blur_sigma), mode="nearest").astype(np.float32)
    if kind == "uniform":
        rng = np.random.default_rng(seed)
        noise = rng.random(images.shape, dtype=np.float32)
        if value_range == "0-255":
            noise = noise * np.float32(255)
        return ((noise - mean) / std).astype(np.float32)
    raise ValueError(f"baseline {kind!r} is not one of {', '.join(BASELINES)}")


def _alphas(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    if steps < 2:
        raise ValueError("integrated gradients needs at least 2 steps")
    if rule == "trapezoid":  # Captum's riemann_trapezoid
        alphas = np.linspace(0, 1, steps)
        weights = np.full(steps, 1.0 / (steps - 1))
        weights[0] = weights[-1] = 0.5 / (steps - 1)
        return alphas, weights
    if rule == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (x + 1), 0.5 * w
    if rule == "equal-weights":  # both ends and the points between, each weighted 1/steps (PAIR saliency's)
        return np.linspace(0, 1, steps), np.full(steps, 1.0 / steps)
    raise ValueError(f"integration rule {rule!r} is not one of {', '.join(IG_RULES)}")


def path_gradients(fn: GradientFn, images: np.ndarray, baselines: np.ndarray, target_index: np.ndarray,
                   alphas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_k w_k dS/dx(x0 + a_k (x - x0)) per image, float64 [N, 3, H, W]: the gradient integrated along
    the straight path (times x - x0, the integrated-gradients attribution)."""
    n, steps = len(images), len(alphas)
    delta = (images - baselines).astype(np.float32)
    path = (baselines[:, None] + alphas.astype(np.float32)[None, :, None, None, None] * delta[:, None])
    _, _, grads = fn(path.reshape(n * steps, *images.shape[1:]), np.repeat(target_index, steps))
    grads = grads.reshape(n, steps, *images.shape[1:]).astype(np.float64)
    return (grads * weights[None, :, None, None, None]).sum(1)


def integrated_gradients(fn: GradientFn, images: np.ndarray, targets: np.ndarray, baselines: np.ndarray, *,
                         steps: int = 32, rule: str = "gauss-legendre", score: str = "logit") -> Attribution:
    """Integrated gradients from ``baselines`` (same shape as ``images``) with ``steps`` points.

    Reports the completeness gap |sum attribution - (F(x) - F(x0))| per image, F the model's score
    kind; a gap that is large against |F(x) - F(x0)| means the steps are too few.
    """
    if baselines.shape != images.shape:
        raise ValueError(f"baselines {baselines.shape} must match images {images.shape}")
    alphas, weights = _alphas(steps, rule)
    logits, target_index, _ = fn(images, targets)
    base_logits, _, _ = fn(baselines, target_index)
    n = len(images)
    delta = (images - baselines).astype(np.float32)
    values = (delta * path_gradients(fn, images, baselines, target_index, alphas, weights)).astype(np.float32)
    gap = np.abs(values.reshape(n, -1).astype(np.float64).sum(1)
                 - (score_of(logits, target_index, score) - score_of(base_logits, target_index, score)))
    return Attribution(values, target_index, logits, completeness_gap=gap)


def gradient_x_input(fn: GradientFn, images: np.ndarray, targets: np.ndarray) -> Attribution:
    logits, target_index, gradient = fn(images, targets)
    return Attribution((gradient * images).astype(np.float32), target_index, logits)


def modify(values: np.ndarray, modifier: str = "absolute") -> np.ndarray:
    """keras-vis's gradient modifiers: ``absolute`` |a|, ``positive`` max(a, 0), ``negative``
    max(-a, 0) (the counterfactual evidence), ``none``."""
    if modifier == "absolute":
        return np.abs(values)
    if modifier == "positive":
        return np.maximum(values, 0)
    if modifier == "negative":
        return np.maximum(-values, 0)
    if modifier == "none":
        return values
    raise ValueError(f"modifier {modifier!r} is not one of {', '.join(MODIFIERS)}")


# -- choosing a method for a loaded model ----------------------------------------------------------
METHODS = contract.METHODS


class MethodSpec:
    """A method and its settings, as ``gradmap run --method NAME --SETTING VALUE`` takes them.

    ``MethodSpec("smoothgrad", samples=25)``: every setting is checked against the method table
    (:data:`gradmap.contract.METHOD_TABLE`) and the others get their defaults; a setting of another
    method is checked and left out, so that one set of options serves every method (use
    :meth:`from_request` to refuse it). Settings read as attributes (``spec.samples``) or as the
    :attr:`settings` dict.

    Raises:
        ValueError: an unknown method; :class:`~gradmap.contract.MethodSettingError` (a ValueError)
            for a setting with a wrong value or a name no method has.
    """

    __slots__ = ("name", "_values")

    def __init__(self, name: str = contract.DEFAULT_METHOD, **settings: Any) -> None:
        resolved = contract.method(name).resolve(settings, strict=False)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_values", tuple(resolved.items()))

    @classmethod
    def from_request(cls, name: str, settings: dict[str, Any] | None = None) -> "MethodSpec":
        """Like the constructor, but a setting the method does not have is an error (a request's
        settings are for one method)."""
        contract.method(name).resolve(settings, strict=True)
        return cls(name, **(settings or {}))

    @property
    def method(self) -> contract.Method:
        """The method's row of the method table."""
        return contract.method(self.name)

    @property
    def settings(self) -> dict[str, Any]:
        """Every setting of the method (its own, then the common ones), defaults filled in."""
        return dict(self._values)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        for name, value in self._values:
            if name == key:
                return value
        raise AttributeError(f"method {self.name!r} has no setting {key!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("MethodSpec is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MethodSpec):
            return NotImplemented
        return (self.name, self._values) == (other.name, other._values)

    def __hash__(self) -> int:
        return hash((self.name, self._values))

    def __repr__(self) -> str:
        return f"MethodSpec({', '.join([repr(self.name), *(f'{k}={v!r}' for k, v in self._values)])})"

    def __reduce__(self):  # pickled for Ray's workers
        return (_method_spec, (self.name, self._values))


def _method_spec(name: str, values: tuple) -> MethodSpec:
    return MethodSpec(name, **dict(values))


#: A method's implementation: ``(model, spec, images, targets, *, batch_size) -> Attribution``.
MethodImplementation = Callable[..., Attribution]


class UnsupportedMethodError(ValueError):
    """The model lacks the outputs a method reads; the message names the export options that add them."""


def check_supported(model, method: "str | MethodSpec | contract.Method", where: str = "this model") -> None:
    """Raise :class:`UnsupportedMethodError` when ``model`` (a :class:`~gradmap.runtime.model.SaliencyModel`)
    does not have ``method``, saying what it supports and how to export a model that has it, or, for a
    :class:`MethodSpec`, when its settings do not fit the model: the implementation's optional
    ``check(model, spec)`` attribute raises a ValueError saying why (an occlusion window larger than
    the input)."""
    row = method if isinstance(method, contract.Method) else contract.method(getattr(method, "name", method))
    supported = model.metadata.methods
    reason = model.metadata.unsupported(row)
    if reason is not None:
        raise UnsupportedMethodError(f"{where} does not support {row.name} (it supports {', '.join(supported)}); "
                                     f"{reason}")
    # settings that depend on the model (a window larger than its input): the implementation's own check
    check = getattr(implementation(row.name), "check", None)
    if isinstance(method, MethodSpec) and check is not None:
        try:
            check(model, method)
        except ValueError as e:
            raise UnsupportedMethodError(f"{where}: {e}") from None


@dataclass(frozen=True)
class ModelRuns:
    """How many model runs (forward, or forward and backward, passes) one picture of a method takes.

    Attributes:
        count: the runs; the method adds one or two more (the clean picture, a baseline).
        settings: the settings that set ``count`` (empty: the model alone sets it, e.g. the CAM
            layer's channels for Score-CAM).
        per_unit: runs per unit of the one setting in ``settings`` (XRAI: one path per baseline).
        detail: how ``count`` follows from them, in words ("" when it is the setting's value).
    """

    count: int
    settings: tuple[str, ...] = ()
    per_unit: int = 1
    detail: str = ""


#: The settings that are a count of model runs per picture (SmoothGrad's samples, a path's steps,
#: RISE's masks); a method whose runs follow otherwise gives its implementation a ``runs`` attribute.
RUN_COUNT_SETTINGS = ("samples", "steps", "masks")


def model_runs(model, spec: "MethodSpec") -> ModelRuns | None:
    """The model runs one picture of ``spec`` takes on ``model`` (a
    :class:`~gradmap.runtime.model.SaliencyModel`, or None when only the settings are known):
    the implementation's ``runs(model, spec)`` attribute where it has one (occlusion: its windows on
    the model's input; Score-CAM: the CAM layer's channels; None when the model does not tell), else
    the value of its run-count setting (:data:`RUN_COUNT_SETTINGS`), else 1. ``gradmap serve
    --max-passes`` caps it."""
    runs = getattr(implementation(spec.name), "runs", None)
    if runs is not None:
        return runs(model, spec)
    for name in RUN_COUNT_SETTINGS:
        if name in spec.settings:
            return ModelRuns(int(spec.settings[name]), (name,))
    return ModelRuns(1)


@functools.lru_cache(maxsize=None)
def implementation(method: str) -> MethodImplementation:
    """The runtime's implementation of ``method``, from the table's ``module:function`` (imported on
    first use, so that a method's modules load only when it runs)."""
    module, _, function = contract.method(method).implementation.partition(":")
    return getattr(importlib.import_module(module), function)


def _gradient_output(method: contract.Method) -> str:
    """The one gradient output among the outputs a method reads (``gradient``, ``gradient_guided``...)."""
    (output,) = (o for o in method.outputs if o in contract.BACKPROP_OUTPUTS.values())
    return output


def model_gradient_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                           batch_size: int = 16) -> Attribution:
    """The gradient output the method reads, as the model computed it (vanilla, guided backprop, deconvnet)."""
    return vanilla(gradient_function(model, _gradient_output(spec.method), batch_size), images, targets)


def _on_device(model, spec: MethodSpec, batch_size: int):
    """The model's :class:`~gradmap.runtime.device.DeviceGradients` when its images stay on a device
    (``model.io_device``, set on the CUDA provider), else None."""
    device = getattr(model, "io_device", None)
    if device is None or getattr(model, "fixed_batch", None) is not None:
        return None
    from gradmap.runtime.device import device_gradients

    return device_gradients(model, device, _gradient_output(spec.method), batch_size)


def smoothgrad_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                      batch_size: int = 16) -> Attribution:
    on_device = _on_device(model, spec, batch_size)
    if on_device is None:
        fn = gradient_function(model, _gradient_output(spec.method), batch_size)
        return smoothgrad(fn, images, targets, samples=spec.samples, noise=spec.noise, variant=spec.variant,
                          seed=spec.seed)
    if spec.variant not in SMOOTHGRAD_VARIANTS:
        raise ValueError(f"smoothgrad variant {spec.variant!r} is not one of {', '.join(SMOOTHGRAD_VARIANTS)}")
    n = len(images)
    targets = np.full(n, -1, np.int64) if targets is None else np.asarray(targets, np.int64)
    logits, target_index = on_device.logits_and_targets(images, targets)
    sigma = spec.noise * (images.reshape(n, -1).max(1) - images.reshape(n, -1).min(1))
    total, squares = on_device.smoothgrad_sums(images, target_index, sigma, spec.samples, spec.seed)
    mean, mean_squares = total / spec.samples, squares / spec.samples
    values = {"plain": mean, "squared": mean_squares, "vargrad": mean_squares - mean ** 2}[spec.variant]
    return Attribution(values.astype(np.float32), target_index, logits)


def integrated_gradients_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                                batch_size: int = 16) -> Attribution:
    pre = model.metadata.preprocessing
    baselines = baseline_image(images, spec.baseline, pre.mean, pre.std, seed=spec.seed, value_range=pre.value_range)
    on_device = _on_device(model, spec, batch_size)
    if on_device is None:
        fn = gradient_function(model, _gradient_output(spec.method), batch_size)
        return integrated_gradients(fn, images, targets, baselines, steps=spec.steps, rule=spec.rule,
                                    score=model.metadata.score)
    alphas, weights = _alphas(spec.steps, spec.rule)
    n = len(images)
    targets = np.full(n, -1, np.int64) if targets is None else np.asarray(targets, np.int64)
    logits, target_index = on_device.logits_and_targets(images, targets)
    base_logits, _ = on_device.logits_and_targets(baselines, target_index)
    average = on_device.path_sums(images, baselines, target_index, alphas, weights)
    delta = (images - baselines).astype(np.float32)
    values = (delta * average).astype(np.float32)
    score = model.metadata.score
    gap = np.abs(values.reshape(n, -1).astype(np.float64).sum(1)
                 - (score_of(logits, target_index, score) - score_of(base_logits, target_index, score)))
    return Attribution(values, target_index, logits, completeness_gap=gap)


def gradient_x_input_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                            batch_size: int = 16) -> Attribution:
    return gradient_x_input(gradient_function(model, _gradient_output(spec.method), batch_size), images, targets)


def attribute(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *, batch_size: int = 16):
    """Run ``spec`` on a loaded :class:`~gradmap.runtime.model.SaliencyModel`.

    Returns (logits, target_index, values, completeness gap or None) with values [N, 3, H, W] for
    pixel attributions, or [N, 1, H, W] for class activation maps upsampled (bilinear) to the input
    size. Raises :class:`UnsupportedMethodError` (a ValueError) naming what to export when the model
    lacks the outputs the method reads.
    """
    check_supported(model, spec)
    result = implementation(spec.name)(model, spec, images, targets, batch_size=batch_size)
    # "auto" leaves the sign to the channel reduction: the default max reduction takes |values| (the
    # recipes' absolute gradient), the TensorFlow recipe's sum keeps it
    values = result.values if spec.modifier == AUTO_MODIFIER else modify(result.values, spec.modifier)
    return result.logits, result.target_index, values, result.completeness_gap
