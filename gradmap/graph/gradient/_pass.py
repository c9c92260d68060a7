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

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from gradmap import contract

from ..errors import ExportError, UnsupportedOpsError
from ..lowering import engines  # the engine workarounds every graph gets; they import no rule
from . import _rules  # noqa: F401 - registers the rules
from ._context import GradContext, Region
from ._layers import AttentionLayers, CamLayer, find_attention, find_cam_layer, to_feature_map
from ._registry import NON_DIFFERENTIABLE, RuleTable

__all__ = ["ATTENTION_KEY", "AppendedGradient", "AttentionLayers", "CamLayer", "GradientRequest", "append_forward_outputs",
           "append_gradient", "append_vjp", "differentiable_nodes", "find_cam_layer", "forward_path", "prepare",
           "score_seed"]

logger = logging.getLogger(__name__)

#: The model metadata_props entry where the pass leaves what the attention outputs hold (JSON of
#: :meth:`AttentionLayers.to_dict`) for the exporter's :class:`~gradmap.contract.ModelMetadata`.
ATTENTION_KEY = contract.METADATA_PREFIX + "attention"

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
class GradientRequest:
    """What :func:`append_gradient` is asked to append to one forward graph, checked against it by
    :func:`prepare` before anything changes the graph.

    ``keep`` holds the forward values whose own gradient becomes an output (the Grad-CAM feature
    map, the attention probabilities): a forward rewrite (:meth:`gradmap.graph.lowering.Plan.lower_forward`)
    must leave them as they are. ``needs_grad`` is the set of values on the image-to-logits path,
    as the forward graph was when prepared."""

    score: str
    backprops: tuple[str, ...]
    rules: RuleTable
    seed: Callable
    needs_grad: set[ir.Value]
    layer: CamLayer | None = None
    attention: AttentionLayers | None = None

    @property
    def keep(self) -> set[ir.Value]:
        kept = {self.layer.value} if self.layer is not None else set()
        return kept | set(self.attention.probabilities if self.attention is not None else ())


@dataclass
class AppendedGradient:
    """What :func:`append_gradient` leaves for a backward lowering
    (:meth:`gradmap.graph.lowering.Plan.lower_backward`): the regions of the rules' calls (their
    anchors), the forward graph's nodes, the forward values whose gradients are outputs, and the
    resolved Grad-CAM layer (:meth:`CamLayer.describe`; ``None`` without one)."""

    regions: list[Region]
    forward_nodes: set[ir.Node]
    keep: set[ir.Value]
    cam: str | None = None


def prepare(model: ir.Model, *, score: str = "logit", backprops: tuple[str, ...] = ("vanilla",),
            cam_layer: str | None = None, attention: bool = False, rules: RuleTable | None = None,
            seed: Callable | None = None) -> GradientRequest:
    """Check a gradient request against the forward graph of ``model``, which it leaves as it is.

    ``model`` has one input ``image`` and one output ``logits`` (see :mod:`gradmap.contract`).
    ``score`` is the score kind (:data:`contract.SCORE_KINDS`); ``backprops`` lists the ReLU rules
    to emit, one gradient output each (``vanilla`` is ``gradient``), all sharing the forward pass.
    ``cam_layer`` (``auto``, a torch module name or an ONNX value name) resolves the feature map
    whose vanilla gradient becomes ``cam_gradient`` (:func:`find_cam_layer`); ``attention`` finds
    every self-attention's probabilities (:func:`find_attention`). ``rules`` replaces the rule
    table (:meth:`RuleTable.replaced`; default: gradmap's own), ``seed`` the function that builds
    the output gradient (:func:`score_seed`'s signature): both for graphs other than gradmap's own
    (``bench/floor.py``'s floor).

    Raises:
        ExportError: an unknown score kind or backprop rule, or the logits do not depend on the
            image, or the CAM layer or the attention is not found.
        UnsupportedOpsError: an op on the image-to-logits path has no rule in the table.
    """
    if score not in contract.SCORE_KINDS:
        raise ExportError(f"unknown score kind {score!r}; choose one of {', '.join(contract.SCORE_KINDS)}")
    unknown = [b for b in backprops if b not in contract.BACKPROP_OUTPUTS]
    if unknown or "vanilla" not in backprops:
        raise ExportError(f"backprop rules must include 'vanilla' and be among "
                          f"{', '.join(contract.BACKPROP_OUTPUTS)}; got {list(backprops)}")
    rules = rules or RuleTable.default()
    graph = model.graph
    nodes, needs_grad = differentiable_nodes(graph, graph.inputs[0], graph.outputs[0])
    _check_rules(nodes, rules)
    layer = find_cam_layer(graph, nodes, cam_layer) if cam_layer else None
    attention_layers = find_attention(graph, nodes) if attention else None
    return GradientRequest(score=score, backprops=tuple(backprops), rules=rules, seed=seed or score_seed,
                           needs_grad=needs_grad, layer=layer, attention=attention_layers)


def append_gradient(model: ir.Model, request: GradientRequest | None = None) -> AppendedGradient:
    """Add the ``target`` input and the ``target_index`` and gradient outputs to ``model``, in place:
    the rules of ``request`` (:func:`prepare`; default: ``prepare(model)``, the vanilla gradient of
    the logit) and the engine passes every graph gets (:mod:`gradmap.graph.lowering.engines`),
    nothing else. The result is the portable graph, which a lowering may rewrite from the returned
    :class:`AppendedGradient`.

    With ``request.layer``, the feature map and its vanilla gradient become ``cam_activation`` and
    ``cam_gradient``, as [N, C, h, w] (a ViT's tokens on their patch grid: :mod:`._layers`). With
    ``request.attention``, every self-attention's probabilities and their vanilla gradients,
    stacked [N, layers, heads, T, T], become ``attention`` and ``attention_gradient``, and what they
    hold is written as JSON to ``model.metadata_props[ATTENTION_KEY]``. The forward graph may have
    been rewritten since :func:`prepare` (a forward lowering), as long as the values of
    ``request.keep`` are still in it.
    """
    request = request or prepare(model)
    graph = model.graph
    image, logits = graph.inputs[0], graph.outputs[0]
    nodes, needs_grad = differentiable_nodes(graph, image, logits)
    _check_rules(nodes, request.rules)  # a forward rewrite may have added ops
    layer, attention_layers = request.layer, request.attention
    cam_value = layer.value if layer is not None else None
    probabilities = list(attention_layers.probabilities) if attention_layers is not None else []
    keep = request.keep
    forward_nodes = set(graph)
    ctx = GradContext(graph, needs_grad)
    target_input = ir.Value(name=contract.INPUT_TARGET, shape=ir.Shape([logits.shape[0]]),
                            type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(target_input)
    seed, target_index = request.seed(ctx, logits, target_input, request.score)
    target_index.name = contract.OUTPUT_TARGET_INDEX
    target_index.shape = ir.Shape([logits.shape[0]])
    target_index.type = ir.TensorType(ir.DataType.INT64)
    outputs = [target_index]
    for backprop in request.backprops:
        ctx.backprop = backprop
        captured: dict[ir.Value, ir.Value] = {}
        capture = (keep if backprop == "vanilla" else set()) or None
        gradient = _reverse_walk(ctx, request.rules, nodes, image, logits, seed, capture=capture, captured=captured)
        gradient.name = contract.BACKPROP_OUTPUTS[backprop]
        outputs.append(gradient)
        if cam_value is not None and backprop == "vanilla":
            # token and channels-last maps become [N, C, h, w] here, so every CAM method reads one layout
            cam_gradient = to_feature_map(ctx, captured[cam_value], layer, logits.shape[0])
            cam_gradient.name = contract.OUTPUT_CAM_GRADIENT
            cam_activation = to_feature_map(ctx, cam_value, layer, logits.shape[0])
            cam_activation.name = contract.OUTPUT_CAM_ACTIVATION
            cam_outputs = [cam_activation, cam_gradient]
        if probabilities and backprop == "vanilla":
            missing = [p.name for p in probabilities if p not in captured]
            if missing:
                raise ExportError(f"--attention: the score does not depend on the attention probabilities {missing}")
            attention_outputs = [_stacked(ctx, probabilities, attention_layers, logits, contract.OUTPUT_ATTENTION),
                                 _stacked(ctx, [captured[p] for p in probabilities], attention_layers, logits,
                                          contract.OUTPUT_ATTENTION_GRADIENT)]
    ctx.backprop = "vanilla"
    graph.extend(ctx.tape.nodes)
    graph.outputs.extend(outputs)
    if cam_value is not None:
        graph.outputs.extend(cam_outputs)
    if attention_layers is not None:
        graph.outputs.extend(attention_outputs)
        model.metadata_props[ATTENTION_KEY] = json.dumps(attention_layers.to_dict())
    engines.apply(graph, ctx.regions, forward_nodes)
    return AppendedGradient(regions=ctx.regions, forward_nodes=forward_nodes, keep=keep,
                            cam=layer.describe() if layer is not None else None)


def forward_path(graph: ir.Graph, source: ir.Value, sink: ir.Value) -> list[ir.Node]:
    """Nodes on a path from ``source`` to ``sink``, in graph order, whatever their values' types (a
    quantized graph's integer tensors too): the forward graph a forward-only model reads."""
    depends: set[ir.Value] = {source}
    nodes = list(graph)
    for node in nodes:
        if any(v is not None and v in depends for v in node.inputs):
            depends.update(node.outputs)
    if sink not in depends:
        raise ExportError(f"the output {sink.name!r} does not depend on the input {source.name!r}")
    needed: set[ir.Value] = {sink}
    on_path: list[ir.Node] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.outputs) and any(v is not None and v in depends for v in node.inputs):
            on_path.append(node)
            needed.update(v for v in node.inputs if v is not None and v in depends)
    on_path.reverse()
    return on_path


def append_forward_outputs(model: ir.Model, *, cam_layer: str | None = None, attention: bool = False) -> str | None:
    """Add the ``target`` input and the ``target_index`` output to ``model``, and the CAM layer's and
    the attention's forward outputs, without the backward pass: a forward-only model (``gradmap export
    --no-gradient``, see :mod:`gradmap.contract`)::

        target_index   = Where(target < 0, ArgMax(logits, axis=1), target)     as append_gradient's
        cam_activation = the layer's map as [N, C, h, w]                         (``cam_layer``)
        attention      = every self-attention's probabilities, [N, layers, heads, T, T]  (``attention``)

    No gradient rule is looked up, so a classifier whose ops gradmap cannot differentiate gets one
    too. The model is modified in place; returns the resolved CAM value's name (None without
    ``cam_layer``); what the attention output holds goes to ``model.metadata_props[ATTENTION_KEY]``."""
    graph = model.graph
    image, logits = graph.inputs[0], graph.outputs[0]
    nodes = forward_path(graph, image, logits)
    layer = find_cam_layer(graph, nodes, cam_layer) if cam_layer else None
    attention_layers = find_attention(graph, nodes) if attention else None
    ctx = GradContext(graph, set())
    target_input = ir.Value(name=contract.INPUT_TARGET, shape=ir.Shape([logits.shape[0]]),
                            type=ir.TensorType(ir.DataType.INT64))
    graph.inputs.append(target_input)
    top1 = ctx.op("ArgMax", logits, axis=1, keepdims=0)
    target_index = ctx.op("Where", ctx.op("Less", target_input, ctx.const(np.int64(0))), top1, target_input)
    target_index.name = contract.OUTPUT_TARGET_INDEX
    target_index.shape = ir.Shape([logits.shape[0]])
    target_index.type = ir.TensorType(ir.DataType.INT64)
    outputs = [target_index]
    if layer is not None:
        cam_activation = to_feature_map(ctx, layer.value, layer, logits.shape[0])
        cam_activation.name = contract.OUTPUT_CAM_ACTIVATION
        outputs.append(cam_activation)
    if attention_layers is not None:
        outputs.append(_stacked(ctx, list(attention_layers.probabilities), attention_layers, logits,
                                contract.OUTPUT_ATTENTION))
        model.metadata_props[ATTENTION_KEY] = json.dumps(attention_layers.to_dict())
    graph.extend(ctx.tape.nodes)
    graph.outputs.extend(outputs)
    return layer.describe() if layer is not None else None


def _stacked(ctx: GradContext, values: list[ir.Value], layers: AttentionLayers, logits: ir.Value,
             name: str) -> ir.Value:
    """[N, heads, T, T] per layer -> one [N, layers, heads, T, T] output."""
    axis = ctx.ints([1])
    parts = [ctx.op("Unsqueeze", v, axis) for v in values]
    out = ctx.op("Concat", *parts, axis=1) if len(parts) > 1 else ctx.op("Identity", parts[0])
    out.name = name
    out.shape = ir.Shape([logits.shape[0], len(values), layers.heads, layers.tokens, layers.tokens])
    out.type = ir.TensorType(ir.DataType.FLOAT)
    return out


def append_vjp(model: ir.Model, source: ir.Value, sink: ir.Value, grad_name: str = "grad_output",
               result_name: str = "grad_input", *, engine_passes: bool = True) -> ir.Model:
    """Generic vector-Jacobian product: add input ``grad_name`` (shaped like ``sink``) and output
    ``result_name`` = grad_name^T d sink / d source. Used to test rules one op at a time.
    ``engine_passes``: run the engine workarounds (:mod:`gradmap.graph.lowering.engines`) over the
    result, as every export does; without them the graph is the rules' plain formulas."""
    graph = model.graph
    forward_nodes = set(graph)
    nodes, needs_grad = differentiable_nodes(graph, source, sink)
    rules = RuleTable.default()
    _check_rules(nodes, rules)
    ctx = GradContext(graph, needs_grad)
    seed = ir.Value(name=grad_name, shape=sink.shape, type=sink.type)
    graph.inputs.append(seed)
    result = _reverse_walk(ctx, rules, nodes, source, sink, seed)
    result.name = result_name
    graph.extend(ctx.tape.nodes)
    graph.outputs.append(result)
    if engine_passes:
        engines.apply(graph, ctx.regions, forward_nodes)
    return model


def _check_rules(nodes: list[ir.Node], rules: RuleTable) -> None:
    missing: dict[str, list[str]] = defaultdict(list)
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in rules.rules:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            missing[key].append(node.name or "<unnamed>")
    if missing:
        raise UnsupportedOpsError(dict(missing))


def _reverse_walk(ctx: GradContext, rules: RuleTable, nodes: list[ir.Node], source: ir.Value, sink: ir.Value,
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
        kind, rule, parts = node.op_type, rules.rules[node.op_type], None
        for name, match, composite_rule in rules.composites.get(node.op_type, ()):
            parts = match(node)
            if parts is not None:
                kind, rule = name, composite_rule
                break
        with ctx.region(kind, node, grad_outputs) as region:
            grad_inputs = list(rule(ctx, node, grad_outputs) if parts is None
                               else rule(ctx, node, grad_outputs, parts))
        region.parts = {**(parts or {}), **region.parts}  # a composite's match, and what the rule published
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


def score_seed(ctx: GradContext, logits: ir.Value, target: ir.Value, score: str) -> tuple[ir.Value, ir.Value]:
    """The gradient of the selected score with respect to the logits (the walk's seed) and the
    target index, as the module doc writes them."""
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
