"""From a forward classifier graph to a written gradmap model, whatever framework the graph came from.

Every export source (torch, timm and Hugging Face through ``torch.onnx``; Keras through tf2onnx; a
bare ONNX file) hands over an ``ir.Model`` whose first input is ``image`` and first output is
``logits`` (see :mod:`gradmap.contract`). The steps after that are shared and import no framework:

    add_gradient(model, ...)          in place: the target's forward lowering, the gradient pass
                                      (rules and engine passes), the target's backward lowering
    add_forward_outputs(model, ...)   or, for a forward-only model (--no-gradient), its outputs alone
    finish(model, metadata)           metadata, producer, onnx.checker -> ModelProto
    write_atomic(proto, path)         no reader ever sees half a model
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import onnx_ir as ir

from gradmap import __version__
from gradmap.contract import ModelMetadata

from . import gradient, lowering
from .errors import ExportError
from .gradient import RuleTable, append_forward_outputs

__all__ = ["ExportReport", "add_forward_outputs", "add_gradient", "check_forward_only", "finish", "op_histogram",
           "write_atomic"]


@dataclass
class ExportReport:
    """What an export did and how closely the model matches its float64 reference."""

    path: Path | None
    source_model: str
    weights: str
    score: str
    forward_nodes: int
    backward_nodes: int
    target: str = "cpu"
    logits_error: float | None = None
    gradient_error: float | None = None
    seconds: float = 0.0
    op_types: dict[str, int] = field(default_factory=dict)
    data_path: Path | None = None  # the weights' file beside ``path`` (``external_data=True``)
    reference: str = "torch"  # what the parity check compared with
    notes: list[str] = field(default_factory=list)  # what the source did to the graph (a Softmax cut, ...)
    gradient: bool = True  # False: a forward-only model (--no-gradient); ``backward_nodes`` are its output nodes

    def summary(self) -> str:
        wrote = f"wrote {self.path}" + (f" and its weights {self.data_path}" if self.data_path else "")
        lines = [
            wrote if self.path else "model built (not written)",
            f"  model {self.source_model}, weights {self.weights}, score {self.score}, target {self.target}",
            f"  {self.forward_nodes} forward nodes + {self.backward_nodes} "
            f"{'gradient nodes' if self.gradient else 'output nodes, no gradient (--no-gradient)'}, "
            f"{len(self.op_types)} op types, all in the default ONNX domain",
        ]
        lines.extend(f"  {note}" for note in self.notes)
        if not self.gradient and self.logits_error is not None:
            lines.append(f"  parity with {self.reference}: logits {self.logits_error:.2e} (max|Δ| / max|reference|)")
        elif self.gradient_error is not None:
            lines.append(
                f"  parity with {self.reference}: logits {self.logits_error:.2e}, gradient {self.gradient_error:.2e} "
                f"(max|Δ| / max|reference|)"
            )
        else:
            lines.append(f"  parity with {self.reference}: not verified (--no-verify)")
        lines.append(f"  {self.seconds:.1f} s")
        return "\n".join(lines)


def add_gradient(model: ir.Model, *, score: str = "logit", backprops: tuple[str, ...] = ("vanilla",),
                 cam_layer: str | None = None, target: str = "cpu", channel_multiple: int | None = None,
                 attention: bool = False, rules: RuleTable | None = None, seed: Callable | None = None,
                 skip_lowering: tuple[str, ...] = ()) -> str | None:
    """Append the gradient outputs to a forward graph for ``target`` (in place) and check that every
    node is in the default ONNX domain. Returns the resolved CAM value's name (``None`` without
    ``cam_layer``).

    The steps, each from its own package: the lowering's plan for ``target`` and
    ``channel_multiple`` (:func:`gradmap.graph.lowering.plan`); the request checked against the
    forward graph (:func:`gradmap.graph.gradient.prepare`: ``score``, ``backprops``, ``cam_layer``,
    ``attention``, ``rules``, ``seed``); the forward lowering; the gradient pass
    (:func:`gradmap.graph.gradient.append_gradient`); the backward lowering, without the passes
    named in ``skip_lowering``. ``rules``, ``seed`` and ``skip_lowering`` build graphs other than
    gradmap's own (``bench/floor.py``'s floor)."""
    plan = lowering.plan(target, channel_multiple, skip=skip_lowering)
    request = gradient.prepare(model, score=score, backprops=backprops, cam_layer=cam_layer, attention=attention,
                               rules=rules, seed=seed)
    plan.lower_forward(model.graph, request.needs_grad, request.keep)
    appended = gradient.append_gradient(model, request)
    plan.lower_backward(model.graph, appended)
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes() if n.domain not in ("", "ai.onnx")})
    if foreign or model.functions:
        raise ExportError(f"the exported model uses ops outside the default ONNX domain: {', '.join(foreign)}")
    return appended.cam


def add_forward_outputs(model: ir.Model, *, cam_layer: str | None = None, attention: bool = False) -> str | None:
    """A forward-only model's outputs (``target_index``, and ``cam_activation``, ``attention`` where
    asked) on a forward graph (in place), no backward pass; every node must be in the default ONNX
    domain, as for :func:`add_gradient`. Returns the resolved CAM value's name (see
    :func:`~gradmap.graph.gradient.append_forward_outputs`)."""
    resolved = append_forward_outputs(model, cam_layer=cam_layer, attention=attention)
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes() if n.domain not in ("", "ai.onnx")})
    if foreign or model.functions:
        raise ExportError(f"the exported model uses ops outside the default ONNX domain: {', '.join(foreign)}")
    return resolved


def check_forward_only(backprops: "tuple[str, ...] | list[str]", target: str) -> tuple[str, ...]:
    """The backprop rules of a forward-only model, ``()``; ExportError for options that need a
    gradient: ``--backprop`` rules other than the default, and ``--target cpu`` (a lowering of the
    gradient graph; a forward-only model is plain forward ops, the same for every engine)."""
    other = [b for b in backprops if b != "vanilla"]
    if other:
        raise ExportError(f"--backprop {' '.join(other)}: a rule of the gradient, which --no-gradient leaves out")
    if target != "portable":
        raise ExportError(f"--target {target}: the lowering of the gradient graph, which --no-gradient leaves out "
                          "(a forward-only model is written portable)")
    return ()


def finish(model: ir.Model, metadata: ModelMetadata) -> onnx.ModelProto:
    """Write ``metadata`` into ``model``, serialize it and run ``onnx.checker`` (full check)."""
    model.metadata_props.update(metadata.to_props())
    model.producer_name = "gradmap"
    model.producer_version = __version__
    proto = ir.serde.serialize_model(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported model fails onnx.checker: {e}") from e
    return proto


def op_histogram(proto: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the main graph holds, sorted by op type."""
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def write_atomic(proto: onnx.ModelProto, path: Path, *, external_data: bool = False) -> Path | None:
    """Write ``proto`` to ``path`` so that no reader sees a half-written model.

    ``external_data``: tensors of 1 kB or more go to ``NAME.data`` beside the model (a relative
    location), which onnxruntime memory-maps instead of parsing them out of the protobuf. The files
    are written in a temporary folder beside ``path``, then moved into place, the data file first.
    ``proto`` is left as it was. Returns the data file's path, if one was written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    data = path.parent / f"{path.name}.data"
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(proto)  # onnx.save_model moves the tensors of the proto it saves out to the data file
            onnx.save_model(copy, staging / path.name, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
            del copy
        else:
            (staging / path.name).write_bytes(proto.SerializeToString())
        written = [f for f in (staging / data.name, staging / path.name) if f.exists()]
        for file in written:
            os.chmod(file, 0o666 & ~umask)  # temporary files are 0600; a model is as readable as any file
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data if len(written) == 2 else None
