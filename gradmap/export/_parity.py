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
"""

from __future__ import annotations

import contextlib
import copy
import logging

import numpy as np
import onnx
import onnxruntime as ort
import torch

from gradmap import contract

from ._errors import ParityError

__all__ = ["DEFAULT_TOLERANCE", "verify_parity", "relative_error"]

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


def _expose_decisions(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """A copy of ``proto`` that also outputs the argmax indices of every MaxPool and the output of
    every Relu, in graph order: the discrete choices a float32 run made."""
    proto = copy.deepcopy(proto)
    known = {o.name for o in proto.graph.output}
    # Pools in the order of their inputs' producers, the forward order: the gradient pass adds the
    # MaxPool that returns the indices beside each forward MaxPool, at the end of the graph, in
    # backward order.
    produced_at = {o: i for i, n in enumerate(proto.graph.node) for o in n.output}
    pooling = [(produced_at.get(n.input[0], -1), i, n.output[1]) for i, n in enumerate(proto.graph.node)
               if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]]
    pools = [name for _, _, name in sorted(pooling)]
    relus = [n.output[0] for n in proto.graph.node if n.op_type == "Relu" and n.output[0] not in known]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in pools)
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in relus)
    return proto, pools, relus


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
def _replayed(pool_indices: list[np.ndarray] | None, relu_outputs: list[np.ndarray] | None,
              mode: str = "vanilla", overrides: list[float] | None = None):
    """Make torch's F.max_pool2d and F.relu take onnxruntime's decisions, call by call in order:
    the pooled element (flat indices over N*C*H*W) and which ReLU inputs pass; F.relu also
    backpropagates by ``mode``. Yields a function telling whether every decision was used.

    With ``overrides``, each replayed call appends how far torch's own values are from agreeing with
    the decisions it was given, relative to the call's largest |input|: the largest |input| of a ReLU
    whose sign disagrees, or the largest gap between the natural maximum and the replayed element of
    a pooling window. A replay of the run on the same input only settles float32 near-ties (~1e-6);
    decisions taken on other inputs show as gaps of order 1."""
    functional = torch.nn.functional
    original_pool, original_relu = functional.max_pool2d, functional.relu
    pools = None if pool_indices is None else list(pool_indices)
    relus = None if relu_outputs is None else list(relu_outputs)

    def replay_pool(input, *args, return_indices=False, **kwargs):
        natural = original_pool(input, *args, **kwargs)
        if not pools or tuple(_unpadded(pools[0], natural.shape).shape) != tuple(natural.shape):
            raise _ReplayMismatch()
        index = torch.from_numpy(_unpadded(pools.pop(0), natural.shape, tuple(input.shape)))
        picked = input.reshape(-1)[index.reshape(-1)].reshape(index.shape)
        if overrides is not None:
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


def _reference_with_decisions(module, image, target, score, pools, relus, mode="vanilla"):
    """torch autograd replaying max-pooling and ReLU decisions when they match call by call;
    max pooling alone, or no replay, when they do not. ReLUs backpropagate by ``mode``."""
    for replay in ((pools, relus), (pools, None), (None, None)):
        try:
            with _replayed(*replay, mode=mode) as all_used:
                result = _torch_reference(module, image, target, score)
                if all_used():
                    return result
        except _ReplayMismatch:
            pass
    raise AssertionError("unreachable: plain autograd always matches")


def verify_parity(module: torch.nn.Module, proto: onnx.ModelProto, input_size: tuple[int, int], *,
                  score: str = "logit", batch: int = 2, seed: int = 0, backprops: tuple[str, ...] = ("vanilla",),
                  tolerance: float = DEFAULT_TOLERANCE, attempts: int = 8) -> tuple[float, float]:
    """Compare the ONNX model with float64 torch autograd on random batches (see the module doc).

    The first sample of a batch uses target -1 (its top-1 class), the others explicit classes
    that are not their top-1. Logits and resolved targets must match on every batch.
    Every gradient output of ``backprops`` is compared; guided and deconvnet ReLU rules apply to
    every F.relu call of the torch module (nn.ReLU included), as to every Relu node of the graph.
    Raises :class:`ParityError` with the deviation when no batch passes.
    Returns (logits error, largest gradient error) as max|Δ| / max|torch|.
    """
    rng = np.random.default_rng(seed)
    proto, pool_names, relu_names = _expose_decisions(proto)
    session = _session(proto)
    reference = copy.deepcopy(module).double()
    errors: list[float] = []
    logits_error = 0.0
    for attempt in range(attempts):
        image = rng.standard_normal((batch, 3, *input_size), dtype=np.float32)
        with torch.no_grad():
            plain = reference(torch.from_numpy(image).double()).numpy()
        num_classes = plain.shape[1]
        target = np.full(batch, -1, dtype=np.int64)
        for i in range(1, batch):  # an explicit class different from the top-1 class
            target[i] = (int(plain[i].argmax()) + 1 + 7 * i) % num_classes
        gradient_names = [contract.BACKPROP_OUTPUTS[b] for b in backprops]
        logits, target_index, *outputs = session.run(
            [contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, *gradient_names, *pool_names, *relu_names],
            {contract.INPUT_IMAGE: image, contract.INPUT_TARGET: target},
        )
        gradients, decisions = outputs[:len(backprops)], outputs[len(backprops):]
        pools, relus = decisions[:len(pool_names)], decisions[len(pool_names):]
        references = [_reference_with_decisions(reference, image, target, score, pools, relus, mode)
                      for mode in backprops]
        ref_logits, ref_target, ref_grad = references[0]
        if not np.any(ref_grad):
            raise ParityError("torch autograd gives an identically zero gradient on random inputs, so parity "
                              "cannot be checked (a zero-initialized classifier head?). The model was not written; "
                              "pass --no-verify to export it unchecked.")
        error = relative_error(logits, ref_logits)
        logits_error = max(logits_error, error)
        problems = []
        if error > tolerance:
            problems.append(f"logits differ from torch by {error:.3g} (max|Δ| / max|torch|)")
        if not np.array_equal(target_index, ref_target):
            problems.append(f"resolved targets {target_index.tolist()} differ from torch's {ref_target.tolist()}")
        if problems:
            raise ParityError(f"parity check failed (tolerance {tolerance:g}): " + "; ".join(problems)
                              + ". The model was not written.")
        errors.append(max(relative_error(g, r[2]) for g, r in zip(gradients, references)))
        if errors[-1] <= tolerance:
            if attempt:
                logger.info("gradient parity reached on batch %d (earlier batches: %s)", attempt + 1,
                            ", ".join(f"{e:.2g}" for e in errors[:-1]))
            return logits_error, errors[-1]
    raise ParityError(
        f"parity check failed (tolerance {tolerance:g}): the gradient differs from torch autograd by "
        f"{min(errors):.3g} at best over {len(errors)} random batches (max|Δ| / max|torch|; "
        f"all: {', '.join(f'{e:.2g}' for e in errors)}). The model was not written."
    )
