"""Parity of an exported model with torch autograd: logits, resolved targets and the gradient.

The reference is torch autograd in float64. The gradient of a network with max pooling or ReLU is
piecewise constant in its input: where two pooled values, or a ReLU input and zero, lie within
float32 rounding of each other, any float32 implementation (torch's own included) may take the
other branch, which moves the gradient by a few percent around that pixel. For a random GoogLeNet,
a relative input change of 1e-6 moves torch's float64 gradient by 3.4%, and a random 224x224 image
meets such a near-tie in an early max pool about every other time; wide_resnet50_2 meets ~5 ReLU
near-zeros per batch of 2. So the reference replays the decisions onnxruntime took (values still
come from torch in float64), and a batch that still misses the tolerance is drawn again: a wrong
rule misses on every batch, a near-tie only on some.

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
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch

from gradmap import contract
from gradmap.graph.errors import ParityError

__all__ = ["DEFAULT_TOLERANCE", "Decisions", "ExposedModel", "Reference", "expose_decisions", "relative_error",
           "replay_reference", "verify_parity"]

logger = logging.getLogger(__name__)

#: Largest accepted max|ORT - torch| / max|torch|, for logits and for the gradient.
DEFAULT_TOLERANCE = 1e-4


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max|actual - expected| / max|expected| (inf when ``actual`` is not finite)."""
    if not np.all(np.isfinite(actual)):
        return float("inf")
    scale = float(np.max(np.abs(expected)))
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    return diff / scale if scale > 0 else diff


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


@dataclass
class ExposedModel:
    """A copy of a gradmap model that also outputs the values its discrete choices were made on."""

    proto: onnx.ModelProto
    pool_inputs: list[str]  # the input of each forward MaxPool, in forward order
    relu_outputs: list[str]  # the output of each forward Relu, in forward order

    @property
    def names(self) -> list[str]:
        """The extra outputs to fetch, each once."""
        return list(dict.fromkeys([*self.pool_inputs, *self.relu_outputs]))

    def split(self, values: Mapping[str, np.ndarray]) -> "Decisions":
        """The :class:`Decisions` among ``values`` (output name -> array, :attr:`names` at least)."""
        missing = [n for n in self.names if n not in values]
        if missing:
            raise ValueError(f"decision values missing for {missing[:3]}")
        return Decisions([values[n] for n in self.pool_inputs], [values[n] for n in self.relu_outputs])


@dataclass
class Decisions:
    """What one float32 run computed where a gradient takes a discrete choice: each forward MaxPool's
    input (the pooled element follows from it, first maximum on ties) and each forward Relu's output
    (which inputs pass)."""

    pool_inputs: list[np.ndarray] | None
    relu_outputs: list[np.ndarray] | None


def _forward_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes ``logits`` depends on, in graph order: the forward part, whatever the gradient
    part (which may hold its own MaxPool and Relu nodes, e.g. Relu(dY) of guided backprop) adds."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needed: set[int] = set()
    stack = [contract.OUTPUT_LOGITS]
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        needed.add(producer[name])
        stack.extend(i for i in nodes[producer[name]].input if i)
    return [nodes[i] for i in sorted(needed)]


def _expose_decisions(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """(model, pool input names, relu output names): :func:`expose_decisions` as a tuple."""
    exposed = expose_decisions(proto)
    return exposed.proto, exposed.pool_inputs, exposed.relu_outputs


def expose_decisions(proto: onnx.ModelProto) -> ExposedModel:
    """A copy of ``proto`` that also outputs the input of every forward MaxPool (once per distinct
    input: the gradient part may pool the same tensor again, once per backprop rule) and the output
    of every forward Relu, in graph order: what a float32 run's discrete choices were made on."""
    proto = copy.deepcopy(proto)
    outputs = {o.name for o in proto.graph.output}
    forward = _forward_nodes(proto.graph)
    pools = list(dict.fromkeys(n.input[0] for n in forward if n.op_type == "MaxPool"))
    relus = [n.output[0] for n in forward if n.op_type == "Relu"]
    for name, elem in [*((p, onnx.TensorProto.FLOAT) for p in pools), *((r, onnx.TensorProto.FLOAT) for r in relus)]:
        if name not in outputs:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
            outputs.add(name)
    return ExposedModel(proto, pools, relus)


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


VANISHING = 1e-30  # logits this small come from activations that passed through float32's subnormals


def verify_parity(module: torch.nn.Module, proto: onnx.ModelProto, input_size: tuple[int, int], *,
                  score: str = "logit", batch: int = 2, seed: int = 0, backprops: tuple[str, ...] = ("vanilla",),
                  tolerance: float = DEFAULT_TOLERANCE, attempts: int = 8) -> tuple[float, float]:
    """Compare the ONNX model with float64 torch autograd on random batches (see the module doc).

    The first sample of a batch uses target -1 (its top-1 class), the others explicit classes
    that are not their top-1. Logits and resolved targets must match on every batch.
    Every gradient output of ``backprops`` is compared, each with the same replayed decisions;
    guided and deconvnet ReLU rules apply to every F.relu call of the torch module (nn.ReLU
    included), as to every forward Relu node of the graph.
    Raises :class:`ParityError` with the deviation when no batch passes.
    Returns (logits error, largest gradient error) as max|Δ| / max|torch|.
    """
    rng = np.random.default_rng(seed)
    exposed = expose_decisions(proto)
    session = _session(exposed.proto)
    reference = copy.deepcopy(module).double()
    errors: list[float] = []
    logits_error = 0.0
    gradient_names = [contract.BACKPROP_OUTPUTS[b] for b in backprops]
    fetch = list(dict.fromkeys([contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, *gradient_names, *exposed.names]))
    for attempt in range(attempts):
        image = rng.standard_normal((batch, 3, *input_size), dtype=np.float32)
        with torch.no_grad():
            plain = reference(torch.from_numpy(image).double()).numpy()
        num_classes = plain.shape[1]
        target = np.full(batch, -1, dtype=np.int64)
        for i in range(1, batch):  # an explicit class different from the top-1 class
            target[i] = (int(plain[i].argmax()) + 1 + 7 * i) % num_classes
        values = dict(zip(fetch, session.run(fetch, {contract.INPUT_IMAGE: image, contract.INPUT_TARGET: target})))
        decisions = exposed.split(values)
        references = [replay_reference(reference, image, target, score, decisions, mode) for mode in backprops]
        ref = references[0]
        if not np.any(ref.gradient):
            raise ParityError("torch autograd gives an identically zero gradient on random inputs, so parity "
                              "cannot be checked (a zero-initialized classifier head?). The model was not written; "
                              "pass --no-verify to export it unchecked.")
        error = relative_error(values[contract.OUTPUT_LOGITS], ref.logits)
        logits_error = max(logits_error, error)
        problems = []
        if error > tolerance:
            problems.append(f"logits differ from torch by {error:.3g} (max|Δ| / max|torch|)")
            hint = _vanishing(ref.logits, "logits")
            if hint:
                problems.append(hint)
            else:
                with torch.no_grad():  # the module's own float32 run, on a float32 copy (not the reference)
                    own = copy.deepcopy(module).float()(torch.from_numpy(image)).numpy()
                own_error = relative_error(own, ref.logits)
                if own_error > tolerance / 2:
                    problems.append(f"torch's own float32 run differs from its float64 one by {own_error:.3g} on "
                                    "this batch: the model's float32 rounding is near the tolerance, so this may be "
                                    "rounding rather than a wrong graph (--no-verify exports it unchecked)")
        target_index = values[contract.OUTPUT_TARGET_INDEX]
        if not np.array_equal(target_index, ref.target_index):
            problems.append(f"resolved targets {target_index.tolist()} differ from torch's {ref.target_index.tolist()}")
        if problems:
            raise ParityError(f"parity check failed (tolerance {tolerance:g}): " + "; ".join(problems)
                              + ". The model was not written.")
        errors.append(max(relative_error(values[name], r.gradient) for name, r in zip(gradient_names, references)))
        if errors[-1] <= tolerance:
            if attempt:
                logger.info("gradient parity reached on batch %d (earlier batches: %s)", attempt + 1,
                            ", ".join(f"{e:.2g}" for e in errors[:-1]))
            return logits_error, errors[-1]
    hint = _vanishing(ref.logits, "logits") or _vanishing(ref.gradient, "gradient")
    raise ParityError(
        f"parity check failed (tolerance {tolerance:g}): the gradient differs from torch autograd by "
        f"{min(errors):.3g} at best over {len(errors)} random batches (max|Δ| / max|torch|; "
        f"all: {', '.join(f'{e:.2g}' for e in errors)}){'; ' + hint if hint else ''}. The model was not written."
    )


def _vanishing(values: np.ndarray, what: str) -> str:
    """Why a deviation may be float32's, not the graph's: values near float32's subnormal range."""
    largest = float(np.abs(values).max())
    if largest >= VANISHING:
        return ""
    return (f"torch's {what} {'are' if what == 'logits' else 'is'} at most {largest:.2g}: the weights make activations vanish towards float32's "
            "subnormal range (below 1.2e-38), where float32 keeps few digits (random weights from an "
            "initializer that shrinks every layer?)")
