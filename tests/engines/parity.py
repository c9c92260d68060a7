"""An engine's gradient against float64 torch autograd replaying that engine's own decisions.

The gradient of a ReLU / max-pool network jumps where a ReLU input or two pooled values lie within
float32 rounding of each other, and every engine rounds differently. So each engine runs a copy of
the model that also outputs the values its decisions were made on (every forward MaxPool's input and
Relu's output, gradmap.export._parity.expose_decisions), and torch replays those decisions in
float64. A replay only settles near-ties: the test also requires that wherever torch's own decision
differs, the deciding value is within NEAR_TIE of the layer's largest |input|, so an engine whose
forward values are wrong cannot hide behind its own decisions.

The limits are the export's own policy (:class:`gradmap.graph.parity.Tolerance`): a factor times
torch's own float32 error on the batch (replaying the same decisions), at least the floor; a batch on
which that would exceed the cap cannot tell a wrong engine from rounding and is reported as such.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from gradmap import contract
from gradmap.export._parity import ExposedModel, expose_decisions, relative_error, replay_reference
from gradmap.graph.parity import TOLERANCE, Tolerance

from . import EngineError, run_engine

__all__ = ["NEAR_TIE", "Exported", "EngineCheck", "export_for_engines", "check_engine", "batch_for"]

#: Largest gap, relative to the layer's largest |input|, at which torch's own float64 decision may
#: differ from the replayed one (a float32 near-tie; decisions of a wrong forward differ by ~1).
NEAR_TIE = 1e-5
OUTPUTS = [contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX, contract.OUTPUT_GRADIENT]


@dataclass
class Exported:
    name: str
    target: str  # export target: "portable" or "cpu" (see export_for_engines)
    module: object  # the torch module, float64
    path: Path  # the exported model
    exposed_path: Path  # the same model with its decision values as extra outputs
    exposed: ExposedModel
    input_size: tuple[int, int]
    export_note: str = ""
    _ort_cpu: dict = field(default_factory=dict)
    _single: object = None  # a float32 copy of ``module``: torch's own rounding, for the limits

    def float32_module(self):
        if self._single is None:
            import copy

            self._single = copy.deepcopy(self.module).float()
        return self._single


@dataclass
class EngineCheck:
    engine: str
    model: str
    target: str
    ok: bool = False
    error: str | None = None  # the engine failed to load or run the model
    problems: list[str] = field(default_factory=list)
    logits_error: float | None = None
    gradient_error: float | None = None  # against torch replaying this engine's decisions
    vs_ort_cpu: float | None = None  # gradient against onnxruntime CPU's on the same inputs
    own_logits: float | None = None  # torch's own float32 error on the batch, replaying the same decisions
    own_gradient: float | None = None
    logits_limit: float | None = None  # the tolerance's limits from those
    gradient_limit: float | None = None
    largest_override: float | None = None
    replayed: str | None = None
    run_ms: float | None = None  # the last run in the session (of the copy with decision outputs)
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "fails" if self.error else ("right" if self.ok else "wrong")


def supports_target() -> bool:
    from gradmap.export import export_module

    return "target" in inspect.signature(export_module).parameters


def export_for_engines(module, name: str, out_dir: Path, input_size: tuple[int, int], *, resize: int | None = None,
                       target: str = "portable", verify: bool = False) -> Exported:
    """Export ``module`` for ``target``. Until gradmap has export targets, ``portable`` means no channel
    padding (``channel_multiple=0``) and ``cpu`` the default export."""
    import torch

    from gradmap.contract import Preprocessing
    from gradmap.export import export_module

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.{target}.onnx"
    kwargs = {}
    if supports_target():
        kwargs["target"] = target
        note = f"target={target}"
    elif target == "portable":
        kwargs["channel_multiple"] = 0
        note = "channel_multiple=0 (no export targets yet)"
    else:
        note = "default export (no export targets yet)"
    export_module(module, path, preprocessing=Preprocessing(crop=input_size, resize=resize), source_model=name,
                  verify=verify, **kwargs)
    exposed = expose_decisions(onnx.load(str(path)))
    exposed_path = out_dir / f"{name}.{target}.decisions.onnx"
    onnx.save(exposed.proto, str(exposed_path))
    exposed.proto = None  # the file holds it; keep memory low
    reference = module.to(torch.float64)
    return Exported(name, target, reference, path, exposed_path, exposed, tuple(input_size), note)


def batch_for(exported: Exported, seed: int = 0, batch: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Random images and targets: -1 (top-1) for the first sample, explicit classes for the others."""
    import torch

    rng = np.random.default_rng(seed)
    image = rng.standard_normal((batch, 3, *exported.input_size), dtype=np.float32)
    with torch.no_grad():
        logits = exported.module(torch.from_numpy(image).double()).numpy()
    target = np.full(batch, -1, dtype=np.int64)
    for i in range(1, batch):
        target[i] = (int(logits[i].argmax()) + 1 + 7 * i) % logits.shape[1]
    return image, target


def _ort_cpu_gradient(exported: Exported, image, target) -> np.ndarray:
    key = (image.tobytes(), target.tobytes())
    if key not in exported._ort_cpu:
        exported._ort_cpu.clear()
        outputs = run_engine("ort_cpu", exported.path, {contract.INPUT_IMAGE: image, contract.INPUT_TARGET: target},
                             [contract.OUTPUT_GRADIENT]).outputs
        exported._ort_cpu[key] = outputs[contract.OUTPUT_GRADIENT]
    return exported._ort_cpu[key]


def check_engine(engine: str, exported: Exported, image: np.ndarray, target: np.ndarray, *,
                 tolerance: Tolerance = TOLERANCE, repeat: int = 1) -> EngineCheck:
    """Run ``exported`` (its copy with the decision outputs) on ``engine`` ``repeat`` times in one
    session and compare the first run with torch replaying the engine's decisions, within
    ``tolerance``'s limits for torch's own float32 error on the batch; ``run_ms`` is the last run's time."""
    check = EngineCheck(engine, exported.name, exported.target)
    feeds = {contract.INPUT_IMAGE: image, contract.INPUT_TARGET: target}
    try:
        result = run_engine(engine, exported.exposed_path, feeds, OUTPUTS + exported.exposed.names, repeat=repeat)
        check.run_ms = result.run_ms[-1]
    except EngineError as e:
        check.error = e.reason
        return check
    check.notes = result.notes
    values = result.outputs
    overrides: list[float] = []
    decisions = exported.exposed.split(values)
    reference = replay_reference(exported.module, image, target, "logit", decisions, overrides=overrides)
    own = replay_reference(exported.float32_module(), image, target, "logit", decisions)
    check.own_logits = relative_error(own.logits, reference.logits)
    check.own_gradient = relative_error(own.gradient, reference.gradient)
    check.logits_limit = tolerance.limit(check.own_logits)
    check.gradient_limit = tolerance.limit(check.own_gradient)
    check.replayed = reference.replayed
    check.largest_override = max(overrides, default=0.0)
    check.logits_error = relative_error(values[contract.OUTPUT_LOGITS], reference.logits)
    check.gradient_error = relative_error(values[contract.OUTPUT_GRADIENT], reference.gradient)
    try:
        check.vs_ort_cpu = relative_error(values[contract.OUTPUT_GRADIENT], _ort_cpu_gradient(exported, image, target))
    except EngineError as e:
        check.notes.append(f"onnxruntime CPU for comparison: {e.reason}")
    for what, own_error in (("logits", check.own_logits), ("gradient", check.own_gradient)):
        if not tolerance.verifiable(own_error):
            check.problems.append(f"unverifiable: torch's own float32 {what} differ from float64 by {own_error:.3g}, "
                                  f"over {tolerance.cap:g} / {tolerance.factor:g}")
    if not check.logits_error <= check.logits_limit:
        check.problems.append(f"logits differ from torch by {check.logits_error:.3g} (limit {check.logits_limit:.3g})")
    if not np.array_equal(values[contract.OUTPUT_TARGET_INDEX], reference.target_index):
        check.problems.append(f"target_index {values[contract.OUTPUT_TARGET_INDEX].tolist()} != torch's "
                              f"{reference.target_index.tolist()}")
    if check.largest_override > NEAR_TIE:
        check.problems.append(f"the engine's forward decisions differ from torch's beyond near-ties "
                              f"(gap {check.largest_override:.3g} of the layer's largest |input|)")
    if not check.gradient_error <= check.gradient_limit:
        check.problems.append(f"gradient differs from torch replaying the engine's decisions by "
                              f"{check.gradient_error:.3g} (limit {check.gradient_limit:.3g})")
    check.ok = not check.problems
    return check

