"""Parity of an exported model with torch autograd: the torch sources' reference for the shared policy.

The policy (limits from the reference's own float32 error, retries, refusals) is gradmap.graph.parity's,
shared with the ``onnx:`` and ``keras:`` sources; this module is its torch reference. The reference is
torch autograd in float64, and the same module in float32 for torch's own rounding on the batch. The
gradient of a network with max pooling or ReLU is piecewise constant in its input: where two pooled
values, or a ReLU input and zero, lie within float32 rounding of each other, any float32
implementation (torch's own included) may take the other branch, which moves the gradient by a few
percent around that pixel. For a random GoogLeNet, a relative input change of 1e-6 moves torch's
float64 gradient by 3.4%, and a random 224x224 image meets such a near-tie in an early max pool about
every other time; wide_resnet50_2 meets ~5 ReLU near-zeros per batch of 2. So both of torch's runs
replay the decisions onnxruntime took (values stay torch's own), and a batch that still misses is
drawn again: a wrong rule misses on every batch, a near-tie only on some.

The decisions are read from the forward part alone (the nodes ``logits`` depends on): each ReLU's
output, and each max pool's input, from which torch recomputes the pooled element (first maximum on
ties), so graphs without a MaxPool Indices output (the portable target) are checked the same way.
:func:`expose_decisions` and :func:`replay_reference` serve any engine's run, not only onnxruntime's
(tests/engines/parity.py).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import torch

from gradmap.graph.parity import (TOLERANCE, Decisions, ExposedModel, ReferenceRun, Tolerance, expose_decisions,
                                  relative_error, verify_forward, verify_model)

__all__ = ["DEFAULT_TOLERANCE", "Decisions", "ExposedModel", "Reference", "TorchReference", "expose_decisions",
           "relative_error", "replay_reference", "verify_parity"]

logger = logging.getLogger(__name__)

#: The least limit of the shared policy (gradmap.graph.parity.TOLERANCE.floor): a limit the engine tests
#: (tests/engines) hold every engine's gradient to, with the decisions replayed.
DEFAULT_TOLERANCE = TOLERANCE.floor


def _expose_decisions(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """(model, pool input names, relu output names): :func:`expose_decisions` as a tuple."""
    exposed = expose_decisions(proto)
    return exposed.proto, exposed.pool_inputs, exposed.relu_outputs


class _ReplayMismatch(Exception):
    pass


class _ReLU(torch.autograd.Function):
    """ReLU with a given pass mask and a backward rule: vanilla, guided or deconvnet
    (Springenberg et al. 2015, as Captum's GuidedBackprop and Deconvolution apply them)."""

    @staticmethod
    def forward(ctx, input, passed, mode):
        ctx.save_for_backward(passed)
        ctx.mode = mode
        return torch.where(passed, input, torch.zeros((), dtype=input.dtype))

    @staticmethod
    def backward(ctx, grad):
        (passed,) = ctx.saved_tensors
        if ctx.mode == "deconvnet":
            return grad.clamp(min=0), None, None
        if ctx.mode == "guided":
            grad = grad.clamp(min=0)
        return torch.where(passed, grad, torch.zeros((), dtype=grad.dtype)), None, None


@contextlib.contextmanager
def _replayed(pool_inputs: list[np.ndarray] | None, relu_outputs: list[np.ndarray] | None,
              mode: str = "vanilla", overrides: list[float] | None = None):
    """Make torch's F.max_pool2d and F.relu take a float32 run's decisions, call by call in order:
    each pool picks, per window, the first maximum of the input that run computed (torch's CPU
    max_pool2d on those float32 values, which takes the first maximum as onnxruntime's MaxPool and
    gradmap's portable rule do), and each ReLU passes where that run's output is positive; F.relu
    also backpropagates by ``mode``. Values stay torch's own (float64). Yields a function telling
    whether every decision was used.

    With ``overrides``, each replayed call appends how far torch's own values are from agreeing with
    the decisions it was given, relative to the call's largest |input|: the largest |input| of a ReLU
    whose sign disagrees, or the largest gap between the natural maximum and the replayed element of
    a pooling window. A replay of the run on the same input only settles float32 near-ties (~1e-6);
    decisions taken on other inputs show as gaps of order 1."""
    functional = torch.nn.functional
    original_pool, original_relu = functional.max_pool2d, functional.relu
    pools = None if pool_inputs is None else list(pool_inputs)
    relus = None if relu_outputs is None else list(relu_outputs)

    def replay_pool(input, *args, **kwargs):
        if len(args) > 5:  # return_indices given by position (kernel, stride, padding, dilation, ceil_mode, ...)
            kwargs["return_indices"] = args[5]
            args = args[:5]
        return_indices = kwargs.pop("return_indices", False)
        if not pools or tuple(_unpadded(pools[0], input.shape).shape) != tuple(input.shape):
            raise _ReplayMismatch()
        computed = torch.from_numpy(np.ascontiguousarray(_unpadded(pools.pop(0), input.shape), dtype=np.float32))
        _, index = original_pool(computed, *args, return_indices=True, **kwargs)
        picked = input.flatten(-2).gather(-1, index.flatten(-2)).view(index.shape)
        if overrides is not None:
            natural = original_pool(input, *args, **kwargs)
            gap = (natural - picked).detach().abs().max() / input.detach().abs().max().clamp(min=1e-300)
            overrides.append(float(gap))
        return (picked, index) if return_indices else picked

    def replay_relu(input, inplace=False):
        if relus is None:
            passed = input > 0
        elif not relus or tuple(_unpadded(relus[0], input.shape).shape) != tuple(input.shape):
            raise _ReplayMismatch()
        else:
            passed = torch.from_numpy(_unpadded(relus.pop(0), input.shape) > 0)
            if overrides is not None:
                disagree = input.detach()[passed != (input > 0)]
                overrides.append(float(disagree.abs().max() / input.detach().abs().max().clamp(min=1e-300))
                                 if disagree.numel() else 0.0)
        return _ReLU.apply(input, passed, mode)

    if pools is not None:
        functional.max_pool2d = replay_pool
    if relus is not None or mode != "vanilla":
        functional.relu = replay_relu
    try:
        yield lambda: not pools and not relus
    finally:
        functional.max_pool2d, functional.relu = original_pool, original_relu


def _unpadded(array: np.ndarray, shape, indexed_shape=None) -> np.ndarray:
    """``array`` with the channels gradmap's export padded on (see gradient/_layout.py) dropped, when it
    has ``shape`` but for more channels; else as it is. With ``indexed_shape`` the array holds
    MaxPool's flat indices into a tensor of that shape (but for the padded channels), renumbered."""
    shape = tuple(shape)
    if array.ndim != len(shape) or array.ndim < 2 or array.shape[1] <= shape[1] \
            or array.shape[:1] + array.shape[2:] != shape[:1] + shape[2:]:
        return array
    padded_channels, channels = array.shape[1], shape[1]
    array = array[:, :channels]
    if indexed_shape is None:
        return np.ascontiguousarray(array)
    plane = int(np.prod(indexed_shape[2:]))
    batch, channel = np.divmod(array // plane, padded_channels)
    return (batch * channels + channel) * plane + array % plane


def _torch_reference(module: torch.nn.Module, image: np.ndarray, target: np.ndarray, score: str):
    """Logits, resolved targets and input gradient from torch autograd, in the module's dtype."""
    dtype = next(iter(module.parameters()), torch.empty(0)).dtype
    x = torch.from_numpy(image).to(dtype).requires_grad_(True)
    logits = module(x)
    resolved = torch.where(torch.from_numpy(target) < 0, logits.argmax(dim=1), torch.from_numpy(target))
    if score == "logit":
        values = logits
    elif score == "probability":
        values = torch.softmax(logits, dim=1)
    else:
        values = torch.log_softmax(logits, dim=1)
    selected = values.gather(1, resolved[:, None]).sum()
    (grad,) = torch.autograd.grad(selected, x)
    return logits.detach().numpy(), resolved.numpy(), grad.numpy()


@dataclass
class Reference:
    """torch autograd's logits, resolved targets and gradient, and which decisions it replayed."""

    logits: np.ndarray
    target_index: np.ndarray
    gradient: np.ndarray
    replayed: str  # which decisions were replayed: "pools+relus", "pools", "relus" or "none"


def replay_reference(module: torch.nn.Module, image: np.ndarray, target: np.ndarray, score: str,
                     decisions: Decisions, mode: str = "vanilla", overrides: list[float] | None = None) -> Reference:
    """torch autograd of ``module`` (float64 for the reference) replaying ``decisions``: the max
    pooling and ReLU choices when both match the module's F.max_pool2d and F.relu calls one by one;
    else as many of the two kinds as match (a graph whose Relu nodes do not all come from F.relu,
    say). ReLUs backpropagate by ``mode`` (vanilla, guided, deconvnet). ``overrides`` receives, per
    replayed call of the replay used, how far torch's own values are from those decisions (see
    ``_replayed``)."""
    pools, relus = decisions.pool_inputs, decisions.relu_outputs
    full = "+".join(kind for kind, values in (("pools", pools), ("relus", relus)) if values) or "none"
    tried = set()
    for replay in ((pools, relus), (pools, None), (None, relus), (None, None)):
        name = "+".join(kind for kind, values in zip(("pools", "relus"), replay) if values) or "none"
        if name in tried:
            continue
        tried.add(name)
        gaps: list[float] = []
        try:
            with _replayed(*replay, mode=mode, overrides=gaps) as all_used:
                result = _torch_reference(module, image, target, score)
                if all_used():
                    if overrides is not None:
                        overrides.extend(gaps)
                    if name != full:
                        logger.info("decision replay: %s only (%d pools, %d relus exposed)", name,
                                    len(pools or ()), len(relus or ()))
                    return Reference(*result, replayed=name)
        except _ReplayMismatch:
            pass
    return Reference(*_torch_reference(module, image, target, score), replayed="none")


class TorchReference:
    """torch autograd of a module as the parity reference (:class:`gradmap.graph.parity.Reference`): float64
    for the values, a float32 copy for its own rounding, both replaying the model's decisions."""

    name = "torch autograd (float64)"
    own = "torch"

    def __init__(self, module: torch.nn.Module):
        self._double = copy.deepcopy(module).double()
        self._single = copy.deepcopy(module).float()

    def _run(self, module, images, target_index, score, backprops, decisions) -> ReferenceRun:
        decisions = decisions or Decisions(None, None)
        runs = [replay_reference(module, images, np.asarray(target_index, np.int64), score, decisions, mode)
                for mode in backprops]
        return ReferenceRun(logits=runs[0].logits.astype(np.float64), replayed=runs[0].replayed,
                            gradients={b: r.gradient.astype(np.float64) for b, r in zip(backprops, runs)})

    def run(self, images, target_index, *, score, backprops=("vanilla",), decisions=None) -> ReferenceRun:
        return self._run(self._double, images, target_index, score, backprops, decisions)

    def logits(self, images, *, float32: bool = False) -> np.ndarray:
        """The module's logits in float64, or ``float32`` (torch's own rounding): the forward-only check."""
        module = self._single if float32 else self._double
        with torch.no_grad():
            x = torch.from_numpy(np.asarray(images, np.float32 if float32 else np.float64))
            return module(x).reshape(len(images), -1).numpy().astype(np.float64)

    def run_float32(self, images, target_index, *, score, backprops=("vanilla",), decisions=None) -> ReferenceRun:
        return self._run(self._single, images, target_index, score, backprops, decisions)


def verify_parity(module: torch.nn.Module, proto: onnx.ModelProto, input_size: tuple[int, int], *,
                  score: str = "logit", batch: int = 2, seed: int = 0, backprops: Sequence[str] = ("vanilla",),
                  tolerance: Tolerance = TOLERANCE, attempts: int = 8) -> tuple[float, float]:
    """Compare the ONNX model with torch autograd of ``module`` on random batches, under the shared
    policy (:func:`gradmap.graph.parity.verify_model`): the limits come from torch's own float32 error
    on each batch, with the decisions of the model's float32 run replayed in both of torch's runs.

    Guided and deconvnet ReLU rules apply to every F.relu call of the torch module (nn.ReLU
    included), as to every forward Relu node of the graph.
    Raises :class:`ParityError` with the deviation when no batch passes.
    Returns (logits error, gradient error of the batch that passed) as max|Δ| / max|torch|.
    """
    if not backprops:  # a forward-only model: its logits
        result = verify_forward(proto, TorchReference(module), input_size=input_size, batch=batch, seed=seed,
                                attempts=attempts, tolerance=tolerance)
        return result.logits_error, None
    result = verify_model(proto, TorchReference(module), input_size=input_size, score=score, backprops=backprops,
                          batch=batch, seed=seed, attempts=attempts, tolerance=tolerance)
    return result.logits_error, result.gradient_error
