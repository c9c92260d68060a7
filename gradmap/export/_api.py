"""Export a classifier to a gradmap ONNX model: trace, append the gradient, check, verify, save."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch

from gradmap import __version__, contract
from gradmap.contract import ModelMetadata, Preprocessing

from ._errors import ExportError, ParityError
from ._torchvision import labels_of, load_torchvision, preprocessing_of
from ._trace import trace_to_onnx
from .gradient import append_gradient

__all__ = ["ExportReport", "export_module", "export_torchvision", "build_gradient_model", "verify_parity"]

logger = logging.getLogger(__name__)

#: Largest accepted max|ORT - torch| / max|torch|, for logits and for the gradient.
DEFAULT_TOLERANCE = 1e-4
MIN_OPSET = 18


@dataclass
class ExportReport:
    """What an export did and how closely the model matches torch."""

    path: Path | None
    source_model: str
    weights: str
    score: str
    forward_nodes: int
    backward_nodes: int
    logits_error: float | None = None
    gradient_error: float | None = None
    seconds: float = 0.0
    op_types: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"wrote {self.path}" if self.path else "model built (not written)",
            f"  model {self.source_model}, weights {self.weights}, score {self.score}",
            f"  {self.forward_nodes} forward nodes + {self.backward_nodes} gradient nodes, "
            f"{len(self.op_types)} op types, all in the default ONNX domain",
        ]
        if self.gradient_error is not None:
            lines.append(
                f"  parity with torch: logits {self.logits_error:.2e}, gradient {self.gradient_error:.2e} "
                "(max|Δ| / max|torch|)"
            )
        else:
            lines.append("  parity with torch: not verified (--no-verify)")
        lines.append(f"  {self.seconds:.1f} s")
        return "\n".join(lines)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    scale = float(np.max(np.abs(expected)))
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    if not np.all(np.isfinite(actual)):
        return float("inf")
    return diff / scale if scale > 0 else diff


def build_gradient_model(module: torch.nn.Module, input_size: tuple[int, int], *, score: str = "logit",
                         opset: int = MIN_OPSET) -> tuple[ir.Model, int]:
    """Trace ``module`` and append its input gradient. Returns the model and its forward node count."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: gradmap exports with opset {MIN_OPSET} or newer")
    model = trace_to_onnx(module, input_size, opset=opset)
    forward_nodes = sum(1 for _ in model.graph.all_nodes())
    append_gradient(model, score=score)
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes() if n.domain not in ("", "ai.onnx")})
    if foreign or model.functions:
        raise ExportError(f"the exported model uses ops outside the default ONNX domain: {', '.join(foreign)}")
    return model, forward_nodes


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _expose_pooling_decisions(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``proto`` that also outputs the argmax indices of every MaxPool, in graph order."""
    proto = copy.deepcopy(proto)
    names = [n.output[1] for n in proto.graph.node if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in names)
    return proto, names


@contextlib.contextmanager
def _replayed_max_pooling(decisions: list[np.ndarray]):
    """Make torch's max_pool2d pick the elements onnxruntime picked (flat indices over N*C*H*W).

    Values are read from torch's own input at those positions, so the reference stays float64
    torch autograd; only near-ties are resolved as in the ONNX run.
    """
    functional = torch.nn.functional
    original = functional.max_pool2d
    remaining = list(decisions)

    def replay(input, *args, return_indices=False, **kwargs):
        natural = original(input, *args, **kwargs)
        if not remaining or tuple(remaining[0].shape) != tuple(natural.shape):
            raise _ReplayMismatch()
        index = torch.from_numpy(remaining.pop(0))
        picked = input.reshape(-1)[index.reshape(-1)].reshape(index.shape)
        return (picked, index) if return_indices else picked

    functional.max_pool2d = replay
    try:
        yield remaining
    finally:
        functional.max_pool2d = original


class _ReplayMismatch(Exception):
    pass


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


def _reference_with_decisions(module, image, target, score, decisions):
    """torch autograd, with max pooling replaying onnxruntime's choices when they can be matched
    call by call (torch's F.max_pool2d calls in execution order against the graph's MaxPool nodes)."""
    if decisions:
        try:
            with _replayed_max_pooling(decisions) as remaining:
                result = _torch_reference(module, image, target, score)
            if not remaining:
                return result
        except _ReplayMismatch:
            pass
        logger.info("max pooling could not be matched call by call; comparing with plain autograd")
    return _torch_reference(module, image, target, score)


def verify_parity(module: torch.nn.Module, proto: onnx.ModelProto, input_size: tuple[int, int], *,
                  score: str = "logit", batch: int = 2, seed: int = 0,
                  tolerance: float = DEFAULT_TOLERANCE, attempts: int = 8) -> tuple[float, float]:
    """Compare the ONNX model with torch autograd (float64) on random batches.

    The first sample of a batch uses target -1 (its top-1 class), the others explicit classes
    that are not their top-1. Logits and resolved targets must match on the first batch.

    The gradient of a network with max pooling or ReLU is piecewise constant in its input: where
    two pooled values lie within float32 rounding of each other, any float32 implementation
    (torch's own included) may route the gradient to the other one, which moves it by a few
    percent around that pixel; a random 224x224 image meets such a near-tie in an early max pool
    about every other time. So the reference replays onnxruntime's max-pooling choices (values
    still come from torch in float64), and a batch that still misses the tolerance (a ReLU input
    within rounding of zero) is drawn again, up to ``attempts`` times: a wrong rule misses on
    every batch, a near-tie only on some.
    Raises :class:`ParityError` with the smallest deviation seen when no batch passes.
    Returns (logits error, gradient error) as max|Δ| / max|torch|.
    """
    rng = np.random.default_rng(seed)
    proto, decision_names = _expose_pooling_decisions(proto)
    session = _session(proto)
    reference = copy.deepcopy(module).double()
    errors: list[float] = []
    logits_error = None
    try:
        for attempt in range(attempts):
            image = rng.standard_normal((batch, 3, *input_size), dtype=np.float32)
            with torch.no_grad():
                plain = reference(torch.from_numpy(image).double()).numpy()
            num_classes = plain.shape[1]
            target = np.full(batch, -1, dtype=np.int64)
            for i in range(1, batch):  # an explicit class different from the top-1 class
                target[i] = (int(plain[i].argmax()) + 1 + 7 * i) % num_classes
            logits, target_index, gradient, *decisions = session.run(
                [contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_GRADIENT, *decision_names],
                {contract.INPUT_IMAGE: image, contract.INPUT_TARGET: target},
            )
            ref_logits, ref_target, ref_grad = _reference_with_decisions(reference, image, target, score, decisions)
            error = _relative_error(logits, ref_logits)
            logits_error = error if logits_error is None else max(logits_error, error)
            problems = []
            if error > tolerance:
                problems.append(f"logits differ from torch by {error:.3g} (max|Δ| / max|torch|)")
            if not np.array_equal(target_index, ref_target):
                problems.append(f"resolved targets {target_index.tolist()} differ from torch's {ref_target.tolist()}")
            if problems:
                raise ParityError(f"parity check failed (tolerance {tolerance:g}): " + "; ".join(problems)
                                  + ". The model was not written.")
            errors.append(_relative_error(gradient, ref_grad))
            if errors[-1] <= tolerance:
                if attempt:
                    logger.info("gradient parity reached on batch %d after near-ties (errors %s)", attempt + 1,
                                ", ".join(f"{e:.2g}" for e in errors))
                return logits_error, errors[-1]
    finally:
        del reference
    raise ParityError(
        f"parity check failed (tolerance {tolerance:g}): the gradient differs from torch autograd by "
        f"{min(errors):.3g} at best over {len(errors)} random batches (max|Δ| / max|torch|; "
        f"all: {', '.join(f'{e:.2g}' for e in errors)}). The model was not written."
    )


def _write_atomic(proto: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_module(
    module: torch.nn.Module,
    output: str | os.PathLike | None,
    *,
    preprocessing: Preprocessing,
    labels: Sequence[str] | None = None,
    source_model: str = "custom",
    weights: str = "custom",
    score: str = "logit",
    opset: int = MIN_OPSET,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """Export any ``torch.nn.Module`` image classifier to a gradmap ONNX model.

    Args:
        module: maps a float32 [N, 3, H, W] normalized image to logits [N, K]; put in eval mode.
        output: file to write, or ``None`` to build and verify only.
        preprocessing: how pictures become the model's input; ``preprocessing.crop`` is (H, W).
        labels: K class names; class indices when ``None``.
        score: ``logit``, ``probability`` or ``log_probability``: what the gradient differentiates.
        verify: compare logits and gradient with torch autograd before writing (recommended).

    Returns:
        An :class:`ExportReport`.

    Example:
        >>> report = export_module(my_model, "model.onnx",
        ...                        preprocessing=Preprocessing(crop=(224, 224), resize=256))
    """
    start = time.perf_counter()
    module = module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    input_size = preprocessing.crop
    model, forward_nodes = build_gradient_model(module, input_size, score=score, opset=opset)
    num_classes = model.graph.outputs[0].shape[1]
    if labels is None:
        labels = [str(i) for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ExportError(f"{len(labels)} labels given for a model with {num_classes} outputs")
    metadata = ModelMetadata(source_model=source_model, weights=weights, preprocessing=preprocessing,
                             labels=tuple(labels), score=score)
    model.metadata_props.update(metadata.to_props())
    model.producer_name = "gradmap"
    model.producer_version = __version__
    proto = ir.serde.serialize_model(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported model fails onnx.checker: {e}") from e
    report = ExportReport(
        path=None, source_model=source_model, weights=weights, score=score, forward_nodes=forward_nodes,
        backward_nodes=len(proto.graph.node) - forward_nodes,
        op_types=dict(sorted(_histogram(proto).items())),
    )
    if verify:
        report.logits_error, report.gradient_error = verify_parity(
            module, proto, input_size, score=score, tolerance=tolerance)
    if output is not None:
        report.path = Path(output)
        _write_atomic(proto, report.path)
    report.seconds = time.perf_counter() - start
    return report


def _histogram(proto: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def export_torchvision(
    model_name: str,
    output: str | os.PathLike | None,
    *,
    weights: str = "DEFAULT",
    score: str = "logit",
    seed: int = 0,
    opset: int = MIN_OPSET,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """Export a torchvision classifier by name (see ``gradmap export --help``)."""
    module, weights_desc = load_torchvision(model_name, weights, seed=seed)
    return export_module(
        module, output, preprocessing=preprocessing_of(model_name),
        labels=labels_of(model_name) or None, source_model=f"torchvision.models.{model_name}",
        weights=weights_desc, score=score, opset=opset, verify=verify, tolerance=tolerance,
    )
