"""Parity of a gradmap model with a float64 reference: one policy for every export source.

Each source brings a :class:`Reference` of the classifier it exported: torch autograd for torchvision,
``timm:`` and ``hf:`` models (gradmap.export._parity), the float64 evaluation of the graph itself for
``onnx:`` files (gradmap.export._onnx_reference), ``tf.GradientTape`` for ``keras:`` models. The
written model runs in float32 (onnxruntime here); the reference runs the same batch twice:

    float64     the values the model should have, with the float32 run's discrete decisions
                (which inputs each ReLU passed, which element each max pool took) replayed where
                the reference can: where two candidates lie within float32 rounding of each other,
                any float32 implementation may take either branch, and the gradient then moves by
                percents around that pixel; replaying the decision compares values, not coin flips
    float32     the same computation, same decisions, in float32: how far float32 rounding alone
                moves this model on this batch ("own error", max|Δ| / max|float64|)

    limit       max(floor, factor × own error), separately for the logits and for the gradient
    refusal     the model misses a limit on every one of several random batches (a wrong rule
                misses on every batch, a decision the reference could not replay only on some);
                a batch the reference cannot decide (below) is skipped
    cannot tell factor × own error > cap: the reference's own float32 run is so far from its
                float64 run (vanishing activations, catastrophic cancellation) that no comparison
                in float32 can tell a wrong rule from rounding; when no batch can be decided, the
                model is refused as unverifiable, saying so

An engine computes in float32 as the reference's float32 run does, in another order, so its error is
of the same size as the reference's own; ``tools/parity_policy.py`` measures the factor, floor and cap
against correct models and planted wrong rules (bench/results/parity_policy.json, docs/parity.md).

Imports no framework: numpy, onnx (onnxruntime to run the model).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

from gradmap import contract

from .errors import ParityError

__all__ = ["TOLERANCE", "BatchCheck", "Decisions", "ExposedModel", "ParityResult", "Reference", "ReferenceRun",
           "Tolerance", "VANISHING", "check_batch", "check_logits", "expose_decisions", "relative_error", "run_model",
           "verify_forward", "verify_model"]

logger = logging.getLogger(__name__)

#: Logits this small come from activations that passed through float32's subnormal range.
VANISHING = 1e-30


@dataclass(frozen=True)
class Tolerance:
    """How far a float32 model may be from its float64 reference, from the reference's own float32
    error on the same batch (max|Δ| / max|reference|).

    ``factor``: an engine's float32 run differs from float64 by about as much as the reference's own
    float32 run (other summation orders, fused kernels); the factor is the margin over that.
    ``floor``: the least limit, for batches on which the reference's own float32 error happens to be
    tiny while the engine's kernels round differently (blocked layouts, folded BatchNorm).
    ``cap``: the largest limit granted; a reference whose own error would need more cannot tell a
    wrong rule from rounding, and the model is refused as unverifiable.
    """

    factor: float = 10.0
    floor: float = 1e-4
    cap: float = 5e-2

    def limit(self, own_error: float) -> float:
        """The largest accepted error, given the reference's own float32 error on the batch."""
        return max(self.floor, self.factor * own_error)

    def verifiable(self, own_error: float) -> bool:
        return self.factor * own_error <= self.cap


#: The policy every export source and ``gradmap verify`` use.
TOLERANCE = Tolerance()


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max|actual - expected| / max|expected| (inf when ``actual`` is not finite)."""
    actual = np.asarray(actual)
    if not np.all(np.isfinite(actual)):
        return float("inf")
    scale = float(np.max(np.abs(expected))) if np.size(expected) else 0.0
    diff = float(np.max(np.abs(actual.astype(np.float64) - np.asarray(expected, np.float64)))) if actual.size else 0.0
    return diff / scale if scale > 0 else diff


# -- the float32 run's decisions -----------------------------------------------------------------

@dataclass
class Decisions:
    """What one float32 run computed where a gradient takes a discrete choice: each forward MaxPool's
    input (the pooled element follows from it, first maximum on ties) and each forward Relu's output
    (which inputs pass), in graph order, with the names of those values in the model."""

    pool_inputs: list[np.ndarray] | None
    relu_outputs: list[np.ndarray] | None
    pool_names: list[str] | None = None
    relu_names: list[str] | None = None


@dataclass
class ExposedModel:
    """A copy of a gradmap model that also outputs the values its discrete choices were made on."""

    proto: "onnx.ModelProto"  # noqa: F821
    pool_inputs: list[str]  # the input of each forward MaxPool, in forward order
    relu_outputs: list[str]  # the output of each forward Relu, in forward order

    @property
    def names(self) -> list[str]:
        """The extra outputs to fetch, each once."""
        return list(dict.fromkeys([*self.pool_inputs, *self.relu_outputs]))

    def split(self, values: Mapping[str, np.ndarray]) -> Decisions:
        """The :class:`Decisions` among ``values`` (output name -> array, :attr:`names` at least)."""
        missing = [n for n in self.names if n not in values]
        if missing:
            raise ValueError(f"decision values missing for {missing[:3]}")
        return Decisions([values[n] for n in self.pool_inputs], [values[n] for n in self.relu_outputs],
                         list(self.pool_inputs), list(self.relu_outputs))


def _forward_nodes(graph) -> list:
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


def expose_decisions(proto) -> ExposedModel:
    """A copy of ``proto`` (an ``onnx.ModelProto``) that also outputs the input of every forward
    MaxPool (once per distinct input: the gradient part may pool the same tensor again, once per
    backprop rule) and the output of every forward Relu, in graph order: what a float32 run's
    discrete choices were made on."""
    import onnx

    proto = copy.deepcopy(proto)
    outputs = {o.name for o in proto.graph.output}
    forward = _forward_nodes(proto.graph)
    pools = list(dict.fromkeys(n.input[0] for n in forward if n.op_type == "MaxPool"))
    relus = [n.output[0] for n in forward if n.op_type == "Relu"]
    for name in dict.fromkeys([*pools, *relus]):
        if name not in outputs:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            outputs.add(name)
    return ExposedModel(proto, pools, relus)


# -- the reference -------------------------------------------------------------------------------

@dataclass
class ReferenceRun:
    """A reference's logits [N, K] and gradients (backprop name -> [N, 3, H, W] w.r.t. ``image``)."""

    logits: np.ndarray
    gradients: dict[str, np.ndarray]
    replayed: str = "none"  # which decisions were replayed: "pools+relus", "pools", "relus" or "none"
    gaps: list[float] = field(default_factory=list)


class Reference(Protocol):
    """A float64 reference of the classifier a model was exported from.

    ``run`` computes logits and the gradient of ``score`` of class ``target_index`` (one per sample,
    resolved: no -1) with respect to ``images`` (float32 [N, 3, H, W], the model's ``image``) in float64;
    ``run_float32`` the same computation in float32 (``None`` where the reference has no float32 form:
    the limit is then the floor). Both take the model's ``decisions`` where they can replay them."""

    name: str  # what the reference is, for messages: "torch autograd (float64)"
    own: str  # whose float32 run the own error is: "torch", "the ONNX graph", "TensorFlow"

    def run(self, images: np.ndarray, target_index: np.ndarray, *, score: str, backprops: Sequence[str],
            decisions: Decisions | None = None) -> ReferenceRun: ...

    def run_float32(self, images: np.ndarray, target_index: np.ndarray, *, score: str, backprops: Sequence[str],
                    decisions: Decisions | None = None) -> ReferenceRun | None: ...


# -- one batch -----------------------------------------------------------------------------------

@dataclass
class BatchCheck:
    """One batch compared with the reference under the policy."""

    logits_error: float
    gradient_errors: dict[str, float]
    own_logits: float  # the reference's own float32 error on this batch
    own_gradient: float
    logits_limit: float
    gradient_limit: float
    replayed: str = "none"
    problems: list[str] = field(default_factory=list)  # why the batch misses (empty: it passes)
    unverifiable: str = ""  # why the reference cannot tell a wrong rule from rounding on this batch

    @property
    def gradient_error(self) -> float:
        return max(self.gradient_errors.values(), default=0.0)

    @property
    def passed(self) -> bool:
        return not self.problems and not self.unverifiable


def _vanishing(values: np.ndarray, what: str, own: str) -> str:
    """Why a deviation may be float32's, not the graph's: values near float32's subnormal range."""
    largest = float(np.abs(values).max()) if np.size(values) else 0.0
    if largest >= VANISHING:
        return ""
    return (f"{own}'s {what} {'are' if what == 'logits' else 'is'} at most {largest:.2g}: the weights make "
            "activations vanish towards float32's subnormal range (below 1.2e-38), where float32 keeps few digits "
            "(random weights from an initializer that shrinks every layer?)")


def check_batch(values: Mapping[str, np.ndarray], reference: Reference, images: np.ndarray, target: np.ndarray, *,
                score: str, backprops: Sequence[str], decisions: Decisions | None = None,
                tolerance: Tolerance = TOLERANCE) -> BatchCheck:
    """Compare one float32 run of a gradmap model (``values``: its outputs by name, logits,
    target_index and the ``backprops`` gradients at least) on ``images`` for ``target`` (as fed: -1
    for the top class) with ``reference`` under ``tolerance``."""
    backprops = tuple(dict.fromkeys(["vanilla", *backprops]))
    target_index = np.asarray(values[contract.OUTPUT_TARGET_INDEX], dtype=np.int64)
    ref = reference.run(images, target_index, score=score, backprops=backprops, decisions=decisions)
    own = reference.run_float32(images, target_index, score=score, backprops=backprops, decisions=decisions)
    own_logits = relative_error(own.logits, ref.logits) if own is not None else 0.0
    own_gradient = max((relative_error(own.gradients[b], ref.gradients[b]) for b in backprops), default=0.0) \
        if own is not None else 0.0
    check = BatchCheck(
        logits_error=relative_error(values[contract.OUTPUT_LOGITS], ref.logits),
        gradient_errors={b: relative_error(values[contract.BACKPROP_OUTPUTS[b]], ref.gradients[b]) for b in backprops},
        own_logits=own_logits, own_gradient=own_gradient, logits_limit=tolerance.limit(own_logits),
        gradient_limit=tolerance.limit(own_gradient), replayed=ref.replayed)
    owner = getattr(reference, "own", "the reference")
    if not np.any(ref.gradients["vanilla"]):
        check.unverifiable = (f"{reference.name} gives an identically zero gradient, so parity cannot be checked "
                              "(a zero-initialized classifier head?)")
        return check
    for what, error in (("logits", own_logits), ("gradient", own_gradient)):
        if not tolerance.verifiable(error):
            hint = _vanishing(ref.logits, "logits", owner) or _vanishing(ref.gradients["vanilla"], "gradient", owner)
            check.unverifiable = (
                f"{owner}'s own float32 run differs from its float64 one by {error:.3g} ({what}), so a comparison "
                f"at {tolerance.factor:g} times that (over {tolerance.cap:g}) could not tell a wrong rule from "
                f"rounding{'; ' + hint if hint else ''}")
            return check
    _logits_problems(check, ref.logits, target_index, np.asarray(target) < 0, reference.name, owner)
    for b, error in check.gradient_errors.items():
        if error > check.gradient_limit:
            name = "gradient" if b == "vanilla" else f"{b} gradient"
            check.problems.append(f"the {name} differs from {reference.name} by {error:.3g} "
                                  f"(limit {check.gradient_limit:.3g}; {owner}'s own float32 run: {own_gradient:.3g})")
    return check


# -- the model's side ------------------------------------------------------------------------------

def _session(proto, providers: Sequence[str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=list(providers or ["CPUExecutionProvider"]))


def run_model(session, exposed: ExposedModel, images: np.ndarray, target: np.ndarray,
              backprops: Sequence[str]) -> tuple[dict[str, np.ndarray], Decisions]:
    """One run of an exposed model: its outputs by name and the decisions it took."""
    names = list(dict.fromkeys([contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX,
                                *(contract.BACKPROP_OUTPUTS[b] for b in backprops), *exposed.names]))
    values = dict(zip(names, session.run(names, {contract.INPUT_IMAGE: np.asarray(images, np.float32),
                                                 contract.INPUT_TARGET: np.asarray(target, np.int64)})))
    return values, exposed.split(values)


@dataclass
class ParityResult:
    """The batch that passed (the last one checked) and the errors of every batch checked before it."""

    logits_error: float
    gradient_error: float
    batches: list[BatchCheck]

    @property
    def passed(self) -> BatchCheck:
        return self.batches[-1]


def verify_model(proto, reference: Reference, *, input_size: tuple[int, int], score: str = "logit",
                 backprops: Sequence[str] = ("vanilla",), batch: int = 2, seed: int = 0, attempts: int = 8,
                 tolerance: Tolerance = TOLERANCE, providers: Sequence[str] | None = None) -> ParityResult:
    """Compare a gradmap model (``onnx.ModelProto``) with ``reference`` on random batches.

    The first sample of a batch asks for its top class (target -1), the others for explicit classes
    other than their top one. Every gradient output of ``backprops`` is compared. The check passes
    on the first batch within every limit; a model that misses on ``attempts`` batches is refused.

    Raises:
        ParityError: the model misses on every batch (the message gives the best batch's errors and
            limits and every batch's), or the reference cannot verify it (the message says why).
    """
    backprops = tuple(dict.fromkeys(["vanilla", *backprops]))
    rng = np.random.default_rng(seed)
    exposed = expose_decisions(proto)
    session = _session(exposed.proto, providers)
    checks: list[BatchCheck] = []
    logits_error = 0.0
    for attempt in range(attempts):
        images = rng.standard_normal((batch, 3, *input_size), dtype=np.float32)
        (plain,) = session.run([contract.OUTPUT_LOGITS], {contract.INPUT_IMAGE: images,
                                                          contract.INPUT_TARGET: np.full(batch, -1, np.int64)})
        target = np.full(batch, -1, dtype=np.int64)
        for i in range(1, batch):  # an explicit class other than the top-1 class
            target[i] = (int(plain[i].argmax()) + 1 + 7 * i) % plain.shape[1]
        values, decisions = run_model(session, exposed, images, target, backprops)
        check = check_batch(values, reference, images, target, score=score, backprops=backprops,
                            decisions=decisions, tolerance=tolerance)
        checks.append(check)
        if check.unverifiable:  # this batch cannot decide; another may (the own error varies by batch)
            continue
        logits_error = max(logits_error, check.logits_error)
        if check.passed:
            if attempt:
                logger.info("parity reached on batch %d (earlier: %s)", attempt + 1, "; ".join(
                    f"logits {c.logits_error:.2g}, gradient {c.gradient_error:.2g}" for c in checks[:-1]))
            return ParityResult(logits_error, check.gradient_error, checks)
    decided = [c for c in checks if not c.unverifiable]
    if not decided:
        raise ParityError(f"parity check cannot verify the model on any of {len(checks)} random batches: "
                          f"{checks[0].unverifiable}. The model was not written; --no-verify exports it unchecked.")
    best = min(decided, key=lambda c: max(c.logits_error / c.logits_limit, c.gradient_error / c.gradient_limit))
    every = ", ".join(f"{c.logits_error:.2g}/{c.gradient_error:.2g}" for c in decided)
    undecided = len(checks) - len(decided)
    raise ParityError(
        f"parity check failed on all {len(decided)} random batches it could decide"
        f"{f' ({undecided} more were unverifiable)' if undecided else ''}: {'; '.join(best.problems)} on the "
        f"closest batch (max|Δ| / max|reference|; logits/gradient errors of every batch: {every}). "
        f"The model was not written.")


def check_logits(logits: np.ndarray, target_index: np.ndarray, reference, images: np.ndarray, *,
                 tolerance: Tolerance = TOLERANCE) -> BatchCheck:
    """Compare one float32 run of a forward-only model (its ``logits`` and top classes ``target_index``
    on ``images``) with ``reference.logits`` under ``tolerance``, as :func:`check_batch` compares logits;
    the gradient fields stay empty."""
    ref = np.asarray(reference.logits(images), np.float64)
    own = relative_error(np.asarray(reference.logits(images, float32=True), np.float64), ref)
    check = BatchCheck(logits_error=relative_error(logits, ref), gradient_errors={}, own_logits=own,
                       own_gradient=0.0, logits_limit=tolerance.limit(own), gradient_limit=0.0)
    owner = getattr(reference, "own", "the reference")
    if not tolerance.verifiable(own):
        hint = _vanishing(ref, "logits", owner)
        check.unverifiable = (f"{owner}'s own float32 logits differ from its float64 ones by {own:.3g}, so a "
                              f"comparison at {tolerance.factor:g} times that (over {tolerance.cap:g}) could not "
                              f"tell a wrong graph from rounding{'; ' + hint if hint else ''}")
        return check
    _logits_problems(check, ref, np.asarray(target_index), np.ones(len(ref), bool), reference.name, owner)
    return check


def _logits_problems(check: BatchCheck, ref_logits: np.ndarray, target_index: np.ndarray, top_asked: np.ndarray,
                     name: str, owner: str) -> None:
    """Add to ``check.problems`` the logits over their limit and, among the samples ``top_asked`` for
    their top class, each whose ``target_index`` is not the reference's top class. A top class within
    the logits' limit of the reference's is a tie that rounding may break either way, no miss."""
    if check.logits_error > check.logits_limit:
        check.problems.append(f"logits differ from {name} by {check.logits_error:.3g} "
                              f"(limit {check.logits_limit:.3g}; {owner}'s own float32 run: {check.own_logits:.3g})")
    top = np.argmax(ref_logits, axis=1)
    scale = float(np.abs(ref_logits).max())
    for i in np.flatnonzero(top_asked & (target_index != top)):
        if ref_logits[i, top[i]] - ref_logits[i, target_index[i]] > check.logits_limit * scale:
            check.problems.append(f"sample {i}: the model's top class {int(target_index[i])} is not "
                                  f"{name}'s {int(top[i])}")


def verify_forward(proto, reference, *, input_size: tuple[int, int], batch: int = 2, seed: int = 0, attempts: int = 8,
                   tolerance: Tolerance = TOLERANCE, providers: Sequence[str] | None = None) -> ParityResult:
    """Compare a forward-only gradmap model's logits (and its top classes) with ``reference`` on
    random batches, under the same policy as :func:`verify_model`: the limit comes from the reference's
    own float32 error on each batch. ``reference`` has ``logits(images, float32=False)`` (float64
    logits [N, K] of float32 NCHW ``images``; ``float32=True``: its own float32 run); nothing is
    differentiated, so a classifier whose gradient gradmap cannot build is checked too.

    Raises:
        ParityError: the logits miss on every batch, or no batch can be decided.
    """
    rng = np.random.default_rng(seed)
    session = _session(proto, providers)
    checks: list[BatchCheck] = []
    for _ in range(attempts):
        images = rng.standard_normal((batch, 3, *input_size), dtype=np.float32)
        logits, target_index = session.run([contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX], {
            contract.INPUT_IMAGE: images, contract.INPUT_TARGET: np.full(batch, -1, np.int64)})
        check = check_logits(logits, target_index, reference, images, tolerance=tolerance)
        checks.append(check)
        if check.passed:
            return ParityResult(check.logits_error, 0.0, checks)
    decided = [c for c in checks if not c.unverifiable]
    if not decided:
        raise ParityError(f"parity check cannot verify the model on any of {len(checks)} random batches: "
                          f"{checks[0].unverifiable}. The model was not written; --no-verify exports it unchecked.")
    best = min(decided, key=lambda c: c.logits_error / c.logits_limit)
    raise ParityError(f"parity check failed on all {len(decided)} random batches it could decide: "
                      f"{'; '.join(best.problems)} on the closest batch (logits errors of every batch: "
                      f"{', '.join(f'{c.logits_error:.2g}' for c in decided)}). The model was not written.")
