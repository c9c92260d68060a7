"""The gradient pass: append d score / d image to a forward classifier graph.

    target_index = Where(target < 0, ArgMax(logits, axis=1), target)
    onehot       = Cast(Equal(Unsqueeze(target_index, 1), Range(0, K)))
    seed         = onehot                              score = logit
                 = p_t * (onehot - Softmax(logits))    score = probability
                 = onehot - Softmax(logits)            score = log_probability
    gradient     = reverse walk from logits (seed) to image, one VJP rule per node

Samples are independent in an eval-mode classifier, so the gradient of the sum of the selected
scores over the batch is, per sample, the gradient of that sample's score.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from gradmap import contract

from ..errors import ExportError, UnsupportedOpsError
from . import _rules  # noqa: F401 - registers the rules
from ._context import GradContext
from ._registry import COMPOSITES, NON_DIFFERENTIABLE, RULES

__all__ = ["Appended", "append_gradient", "append_vjp", "check_rules", "check_settings", "differentiable_nodes",
           "find_cam_layer"]

logger = logging.getLogger(__name__)

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}


def _is_float(value: ir.Value) -> bool:
    return value.dtype in _FLOAT_TYPES


def differentiable_nodes(graph: ir.Graph, source: ir.Value, sink: ir.Value) -> tuple[list[ir.Node], set[ir.Value]]:
    """Nodes on a path from ``source`` to ``sink`` through which a gradient flows, in graph order,
    and the set of values that need a gradient."""
    depends: set[ir.Value] = {source}
    nodes = list(graph)
    for node in nodes:
        if node.op_type in NON_DIFFERENTIABLE and node.domain in ("", "ai.onnx"):
            continue
        if any(v is not None and v in depends for v in node.inputs):
            depends.update(o for o in node.outputs if _is_float(o))
    if sink not in depends:
        raise ExportError(f"the output {sink.name!r} does not depend on the input {source.name!r}")
    needed: set[ir.Value] = {sink}
    on_path: list[ir.Node] = []
    for node in reversed(nodes):
        if not any(o in needed for o in node.outputs):
            continue
        if node.op_type in NON_DIFFERENTIABLE and node.domain in ("", "ai.onnx"):
            continue
        dep_inputs = [v for v in node.inputs if v is not None and v in depends]
        if dep_inputs:
            on_path.append(node)
            needed.update(dep_inputs)
    on_path.reverse()
    return on_path, needed & depends


@dataclass
class Appended:
    """What :func:`append_gradient` added: the Grad-CAM feature map's name (None without one), the
    regions of the rules' calls (the anchors of a backward lowering) and the forward nodes."""

    cam_value: str | None
    regions: list
    forward_nodes: set


def check_settings(score: str, backprops: tuple[str, ...]) -> None:
    """Refuse an unknown score kind or backprop rule, and backprops without ``vanilla``."""
    if score not in contract.SCORE_KINDS:
        raise ExportError(f"unknown score kind {score!r}; choose one of {', '.join(contract.SCORE_KINDS)}")
    unknown = [b for b in backprops if b not in contract.BACKPROP_OUTPUTS]
    if unknown or "vanilla" not in backprops:
        raise ExportError(f"backprop rules must include 'vanilla' and be among "
                          f"{', '.join(contract.BACKPROP_OUTPUTS)}; got {list(backprops)}")


def append_gradient(model: ir.Model, score: str = "logit", *, backprops: tuple[str, ...] = ("vanilla",),
                    cam_layer: "str | ir.Value | None" = None) -> Appended:
    """Add the ``target`` input and the ``target_index`` and gradient outputs to ``model``: the
    rules' plain vector-Jacobian products (the portable graph).

    ``model`` has one input ``image`` and one output ``logits`` (see :mod:`gradmap.contract`).
    ``backprops`` lists the ReLU rules to emit, one gradient output each (``vanilla`` is
    ``gradient``); all share the forward pass. ``cam_layer`` (``auto``, a torch module name, an
    ONNX value name or the value) adds that feature map and its vanilla gradient as
    ``cam_activation`` and ``cam_gradient``. The model is modified in place. An engine's lowering
    is not this pass's business: :func:`gradmap.graph.add_gradient` runs the steps (forward
    lowering, this pass, backward lowering over the returned regions).
    """
    check_settings(score, backprops)
    graph = model.graph
    image, logits = graph.inputs[0], graph.outputs[0]
    nodes, needs_grad = differentiable_nodes(graph, image, logits)
    check_rules(nodes)
    if isinstance(cam_layer, ir.Value):
        cam_value = cam_layer
    else:
        cam_value = find_cam_layer(graph, nodes, cam_layer) if cam_layer else None
    forward_nodes = set(graph)
    ctx = GradContext(graph, needs_grad)
    target_input = ir.Value(name=contract.INPUT_TARGET, shape=ir.Shape([logits.shape[0]]),
                            type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(target_input)
    seed, target_index = _seed(ctx, logits, target_input, score)
    target_index.name = contract.OUTPUT_TARGET_INDEX
    target_index.shape = ir.Shape([logits.shape[0]])
    target_index.type = ir.TensorType(ir.DataType.INT64)
    outputs = [target_index]
    for backprop in backprops:
        ctx.backprop = backprop
        captured: dict[ir.Value, ir.Value] = {}
        gradient = _reverse_walk(ctx, nodes, image, logits, seed,
                                 capture={cam_value} if (cam_value is not None and backprop == "vanilla") else None,
                                 captured=captured)
        gradient.name = contract.BACKPROP_OUTPUTS[backprop]
        outputs.append(gradient)
        if cam_value is not None and backprop == "vanilla":
            cam_gradient = ctx.op("Identity", captured[cam_value])
            cam_gradient.name = contract.OUTPUT_CAM_GRADIENT
            cam_gradient.shape, cam_gradient.type = ir.Shape(cam_value.shape), cam_value.type
            cam_activation = ctx.op("Identity", cam_value)
            cam_activation.name = contract.OUTPUT_CAM_ACTIVATION
            cam_activation.shape, cam_activation.type = ir.Shape(cam_value.shape), cam_value.type
            cam_outputs = [cam_activation, cam_gradient]
    ctx.backprop = "vanilla"
    graph.extend(ctx.tape.nodes)
    graph.outputs.extend(outputs)
    if cam_value is not None:
        graph.outputs.extend(cam_outputs)
    return Appended(cam_value.name if cam_value is not None else None, ctx.regions, forward_nodes)


_GLOBAL_POOLS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")


def find_cam_layer(graph: ir.Graph, nodes: list[ir.Node], name: str) -> ir.Value:
    """The feature map for Grad-CAM: ``auto`` = the input of the last global spatial pooling on the
    path to the logits, or else the last [N, C, H, W] map flattened into the classifier; otherwise a torch module name (its last output, from the exporter's
    ``pkg.torch.onnx.name_scopes``) or an ONNX value name."""
    if name == "auto":
        for node in reversed(nodes):
            if node.op_type not in _GLOBAL_POOLS:
                continue
            x = node.inputs[0]
            dims = x.shape
            if dims is None or len(dims) != 4 or not all(isinstance(d, int) and d > 1 for d in list(dims)[2:]):
                continue
            if node.op_type.startswith("Reduce"):
                axes = GradContext.constant_of(node.inputs[1]) if len(node.inputs) > 1 else None
                if axes is None or sorted(int(a) % 4 for a in axes.reshape(-1)) != [2, 3]:
                    continue
            return x
        # no global pooling (VGG flattens its last 7x7 map into the classifier): the map that is flattened
        for node in reversed(nodes):
            if node.op_type not in ("Reshape", "Flatten"):
                continue
            x, y = node.inputs[0], node.outputs[0]
            if (x.shape is not None and y.shape is not None and len(x.shape) == 4 and len(y.shape) == 2
                    and all(isinstance(d, int) and d > 1 for d in list(x.shape)[2:])):
                return x
        raise ExportError("--cam-layer auto: no [N, C, H, W] feature map is pooled or flattened on the way to the "
                          "logits (a ViT pools a class token, not a feature map): name a layer instead")
    for value in (v for n in nodes for v in n.outputs):
        if value.name == name:
            return value
    found = None
    for node in nodes:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes", "")
        if f"'{name}'" in scopes:
            found = node.outputs[0]
    if found is None:
        raise ExportError(f"--cam-layer {name!r}: no module or value of that name on the path to the logits")
    if found.shape is None or len(found.shape) != 4:
        raise ExportError(f"--cam-layer {name!r}: its output {found.name} has shape {found.shape}, "
                          "not a [N, C, H, W] feature map")
    return found


def append_vjp(model: ir.Model, source: ir.Value, sink: ir.Value, grad_name: str = "grad_output",
               result_name: str = "grad_input") -> ir.Model:
    """Generic vector-Jacobian product: add input ``grad_name`` (shaped like ``sink``) and output
    ``result_name`` = grad_name^T d sink / d source. Used to test rules one op at a time."""
    graph = model.graph
    nodes, needs_grad = differentiable_nodes(graph, source, sink)
    check_rules(nodes)
    ctx = GradContext(graph, needs_grad)
    seed = ir.Value(name=grad_name, shape=sink.shape, type=sink.type)
    graph.inputs.append(seed)
    result = _reverse_walk(ctx, nodes, source, sink, seed)
    result.name = result_name
    graph.extend(ctx.tape.nodes)
    graph.outputs.append(result)
    return model


def check_rules(nodes: list[ir.Node]) -> None:
    """Refuse nodes without a rule, all of them in one :class:`UnsupportedOpsError`."""
    missing: dict[str, list[str]] = defaultdict(list)
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in RULES:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            missing[key].append(node.name or "<unnamed>")
    if missing:
        raise UnsupportedOpsError(dict(missing))


def _reverse_walk(ctx: GradContext, nodes: list[ir.Node], source: ir.Value, sink: ir.Value,
                  seed: ir.Value, capture: set[ir.Value] | None = None,
                  captured: dict[ir.Value, ir.Value] | None = None) -> ir.Value:
    """Emit the backward nodes; return an Identity-named value holding d sink / d source.
    The complete gradients of the values in ``capture`` are stored in ``captured``."""
    grads: dict[ir.Value, ir.Value] = {sink: seed}
    for node in reversed(nodes):
        grad_outputs = [ctx.materialize(grads.pop(o, None), o) for o in node.outputs]
        for o, g in zip(node.outputs, grad_outputs):
            _annotate(g, o)
        if capture:
            for o, g in zip(node.outputs, grad_outputs):
                if o in capture and g is not None:
                    captured[o] = g
        if all(g is None for g in grad_outputs):
            continue
        ctx.node = node
        kind, rule, parts = node.op_type, RULES[node.op_type], None
        for name, match, composite_rule in COMPOSITES.get(node.op_type, ()):
            parts = match(node)
            if parts is not None:
                kind, rule = name, composite_rule
                break
        with ctx.region(kind, node, grad_outputs) as region:
            grad_inputs = list(rule(ctx, node, grad_outputs) if parts is None
                               else rule(ctx, node, grad_outputs, parts))
        region.parts = parts or {}
        region.grad_inputs = grad_inputs
        for value, grad in zip(node.inputs, grad_inputs):
            if grad is None or not ctx.needs_grad(value):
                continue
            # a value with several consumers: its gradient is the sum of their contributions
            if value not in grads:
                grads[value] = grad
            else:
                grads[value] = ctx.accumulate(grads[value], grad, like=value)
    ctx.node = None
    if source not in grads:
        raise ExportError(f"no gradient reached the input {source.name!r}")
    result = ctx.op("Identity", ctx.materialize(grads[source], source))
    result.shape = ir.Shape(source.shape) if source.shape is not None else None
    result.type = source.type
    return result


def _annotate(grad: ir.Value | None, value: ir.Value) -> None:
    """Give the complete gradient of ``value`` its shape (the forward value's): engines plan
    layouts and fusions from known shapes (onnxruntime keeps an elementwise op in its blocked
    layout only when it can prove its inputs' shapes equal, which the symbolic batch dimension of
    a Reshape to a computed shape hides)."""
    if grad is None or grad.shape is not None or grad.producer() is None or value.shape is None:
        return
    grad.shape = ir.Shape(value.shape)
    if grad.type is None:
        grad.type = value.type


def _seed(ctx: GradContext, logits: ir.Value, target: ir.Value, score: str) -> tuple[ir.Value, ir.Value]:
    num_classes = ctx.dims(logits)[1]
    if not isinstance(num_classes, int):
        raise ExportError(f"the number of classes must be static, got {num_classes!r}")
    top1 = ctx.op("ArgMax", logits, axis=1, keepdims=0)
    target_index = ctx.op("Where", ctx.op("Less", target, ctx.const(np.int64(0))), top1, target)
    classes = ctx.const(np.arange(num_classes, dtype=np.int64)[None, :])
    onehot = ctx.op("Cast", ctx.op("Equal", ctx.op("Unsqueeze", target_index, ctx.ints([1])), classes),
                    to=ir.DataType.FLOAT)
    if score == "logit":
        return onehot, target_index
    prob = ctx.op("Softmax", logits, axis=1)
    residual = ctx.op("Sub", onehot, prob)
    if score == "log_probability":
        return residual, target_index
    p_target = ctx.op("ReduceSum", ctx.op("Mul", prob, onehot), ctx.ints([1]), keepdims=1)
    return ctx.op("Mul", p_target, residual), target_index
