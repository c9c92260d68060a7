"""Lowering a portable gradmap model for onnxruntime's CPU provider from the file alone.

``gradmap export`` writes the portable graph: the forward classifier, then the backward that the
gradient pass appended, every backward node tagged with its rule's region
(``metadata_props["gradmap.vjp"]``). The CPU lowering has two halves: forward rewrites that must
come before the gradient pass (channel padding changes the shapes every rule reads) and backward
passes over the regions of the rules' calls. So the lowering at load works in three steps, each
from what the file holds:

1. the forward graph: the nodes the ``logits`` output depends on (no backward node feeds the
   logits), with the ``image`` input; the ``target`` input, the gradient outputs and the backward
   nodes are dropped;
2. the export's settings from its metadata (:class:`gradmap.contract.ModelMetadata`: score,
   backprop rules) and the graph: the Grad-CAM feature map (the forward value the
   ``cam_activation`` output is made from) and whether it has the attention outputs;
3. :func:`gradmap.graph.add_gradient` with ``target="cpu"`` and the block of the CPU at hand: the
   forward rewrites, the rules (whose regions the backward passes rewrite) and the passes.

The result is, node for node, the graph ``gradmap export --target cpu --channel-multiple BLOCK``
writes from the same forward graph, so it gives the same numbers. Nothing of the export's
in-memory state is needed; a file of another gradmap version lowers the same way as long as its
forward graph and metadata follow :mod:`gradmap.contract`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir

from gradmap import contract

from ..errors import ExportError

__all__ = ["LoweringReport", "forward_of", "lower_for_cpu"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoweringReport:
    """What :func:`lower_for_cpu` did: the block, the nodes dropped and added."""

    block: int
    forward_nodes: int
    portable_nodes: int
    lowered_nodes: int
    cam_value: str | None


def forward_of(model: ir.Model) -> tuple[int, str | None, bool]:
    """Cut ``model`` (a gradmap model) back to its forward graph, in place: ``image`` -> ``logits``.

    Returns the number of nodes kept, the Grad-CAM feature map's value name (``None`` without one:
    the forward value the ``cam_activation`` output is made from) and whether the model has the
    attention outputs.

    Raises:
        ExportError: the graph has no ``image`` input or ``logits`` output, or its
            ``cam_activation`` output is not made from one forward value.
    """
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    outputs = {v.name: v for v in graph.outputs}
    if contract.INPUT_IMAGE not in inputs or contract.OUTPUT_LOGITS not in outputs:
        raise ExportError(f"not a gradmap model: it needs an input {contract.INPUT_IMAGE!r} and an output "
                          f"{contract.OUTPUT_LOGITS!r} (has inputs {sorted(inputs)}, outputs {sorted(outputs)})")
    logits = outputs[contract.OUTPUT_LOGITS]
    needed = _ancestors([logits])
    cam_value = None
    activation = outputs.get(contract.OUTPUT_CAM_ACTIVATION)
    if activation is not None:
        # the output is the map itself (an Identity) or its reshape onto [N, C, h, w] (tokens, channels last)
        made_from = {v for node in _ancestors([activation]) - needed for v in node.inputs
                     if v is not None and v.producer() in needed}
        if len(made_from) != 1:
            raise ExportError(f"the {contract.OUTPUT_CAM_ACTIVATION!r} output is not made from one forward value "
                              f"({sorted(v.name for v in made_from)})")
        cam_value = next(iter(made_from)).name
    attention = contract.OUTPUT_ATTENTION in outputs
    graph.outputs.clear()
    graph.outputs.append(logits)
    for name in [n for n in inputs if n != contract.INPUT_IMAGE]:
        graph.inputs.remove(inputs[name])
    for node in reversed(list(graph)):  # consumers before producers
        if node not in needed:
            graph.remove(node, safe=True)
    unused = [name for name, value in graph.initializers.items() if not value.uses() and not value.is_graph_output()]
    for name in unused:
        graph.initializers.pop(name)
    return len(needed), cam_value, attention


def _ancestors(values: list[ir.Value]) -> set[ir.Node]:
    """The nodes the ``values`` depend on."""
    found: set[ir.Node] = set()
    stack = [v.producer() for v in values if v.producer() is not None]
    while stack:
        node = stack.pop()
        if node in found:
            continue
        found.add(node)
        stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
    return found


def lower_for_cpu(model: ir.Model, block: int) -> LoweringReport:
    """Lower the portable gradmap model ``model`` for onnxruntime's CPU provider with channel
    multiple ``block`` (16 with AVX-512, 8 with AVX2; 0: no channel padding), in place.

    Raises:
        ExportError: the model is not a portable gradmap model, or its forward graph does not take
            the gradient pass (an op without a rule: then it could not have been exported either).
    """
    from .._model import add_gradient  # the export's gradient step, as gradmap export runs it

    try:
        metadata = contract.ModelMetadata.from_props(dict(model.metadata_props))
    except contract.ContractError as e:
        raise ExportError(f"not a gradmap model: {e}") from e
    if metadata.target != "portable":
        raise ExportError(f"the model's target is {metadata.target!r}: only a portable model is lowered")
    if block < 0:
        raise ExportError(f"the block must be 0 (no channel padding) or positive, not {block}")
    portable_nodes = sum(1 for _ in model.graph)
    forward_nodes, cam_value, attention = forward_of(model)
    add_gradient(model, score=metadata.score, backprops=tuple(metadata.backprops), cam_layer=cam_value,
                 target="cpu", channel_multiple=block, attention=attention)
    report = LoweringReport(block=block, forward_nodes=forward_nodes, portable_nodes=portable_nodes,
                            lowered_nodes=sum(1 for _ in model.graph), cam_value=cam_value)
    logger.debug("lowered for the CPU: %s", report)
    return report
