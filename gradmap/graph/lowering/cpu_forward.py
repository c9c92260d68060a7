"""Forward-graph rewrites before the gradient pass that keep onnxruntime's CPU provider in its
blocked NCHWc layout: it computes convolutions and the elementwise ops between them in blocks of 16
channels (AVX-512; 8 with AVX2), but only for tensors whose channel count is a multiple of the
block and for same-shape elementwise inputs; everything else runs in plain NCHW with a layout
reorder on each side of every op, and in a gradient graph the backward's masks and products follow
the forward out of the blocked layout.

Channel padding: feature maps whose channel count is not a multiple of 16 get zero channels up to
the next multiple (mobilenet_v3_large has 24, 40, 72, 120, 184 and 200 channel layers).

    Conv(X, W, B) -> Y[C]:     W, B get zero output rows:  Y[C'] = [Y, 0]
    Conv(X[C], W):             W gets zero input columns:  the zero channels add exact zeros
    depthwise Conv(X[C]):      W, B zero rows, group C':   Y[C'] = [Y, 0]
    channelwise ops (Relu, HardSwish, Sigmoid, Add, Mul, pools, ...): unchanged, on C' channels

Exact: every padded channel holds finite values (zero weights and bias make exact zeros, and the
channelwise ops map 0 to a finite number), and it reaches a real channel only through zero
weights, so it adds +0 to each sum; in the backward, its gradient is a sum of products with those
zero weights and flows back the same way. The logits and the input gradient have the same values.
The extra channels cost their share of arithmetic (24 -> 32 is a third more) and remove the reorders.

A group of tensors linked by channelwise ops is padded together or not at all: not when any of
them is a graph input or output, a value to keep (the Grad-CAM layer, whose channels users see),
or meets an op outside the list (Concat, Reshape, Gemm, grouped convolutions, per-channel
constants...); not when none of them is larger than 1x1 (squeeze-and-excitation bottlenecks:
nothing to gain); and not when padding adds more than a third of the channels (6 -> 16): the
gains measured were for 24 -> 32 and less.

Squeeze-and-excitation, where C is a multiple of the block:

    ReduceMean(X [N, C, H, W], axes H, W, keepdims) -> GlobalAveragePool(X)
    Mul(S [N, C, 1, 1], X [N, C, H, W])             -> Mul(Resize(S, nearest, x H, x W), X)

onnxruntime has blocked GlobalAveragePool and nearest Resize kernels but no blocked ReduceMean or
broadcasting Mul; each block's scale then costs one spread instead of a reorder of X out of and
back into the blocked layout, in the forward and again in the backward (the Resize rule sums with
a blocked GlobalAveragePool). The Resize copies values; the mean may round differently (the sum's
order), well within float32 parity.

HardSwish, where its input needs a gradient:

    HardSwish(X) -> Mul(X, HardSigmoid(X, 1/6, 1/2))      (the op's own definition)

Not a layout change: onnxruntime runs HardSwish as exactly these two ops once X is read elsewhere
(the gradient reads it), so the forward costs the same, and the HardSwish composite rule (gradient/_rules/composites.py) reuses
the forward's HardSigmoid instead of computing it again: one activation-sized op less each.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..gradient.formulas import HARD_SWISH_ALPHA

#: onnxruntime's CPU block of channels with AVX-512 (8 with AVX2): the default channel multiple.
BLOCK = 16

_UNARY = {"Relu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "LeakyRelu", "Clip", "Identity", "Dropout",
          "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
_BINARY = {"Add", "Sub", "Mul"}  # not Div: a zero channel divided by a zero channel is NaN
_SPATIAL_REDUCE = {"ReduceMean", "ReduceMax"}


def pad_channels(graph: ir.Graph, keep: set[ir.Value] = frozenset(), block: int = BLOCK) -> int:
    """Pad the channel groups of ``graph`` that can be padded and gain from it; in place.
    Returns how many groups were padded."""
    groups = _Groups()
    for node in graph:
        _link(node, groups)
    for value in [*graph.inputs, *graph.outputs, *keep]:
        if groups.known(value):
            groups.forbid(value)
    for value in groups.values():  # consumed inside a subgraph: not seen by _link
        if any(use.node.graph is not graph for use in value.uses()):
            groups.forbid(value)
    padded = 0
    members: dict[ir.Value, list[ir.Value]] = {}
    for value in groups.values():
        members.setdefault(groups.find(value), []).append(value)
    plan: dict[ir.Value, int] = {}  # value -> padded channel count
    for root, values in members.items():
        if groups.forbidden(root):
            continue
        channels = values[0].shape[1]
        if channels % block == 0 or not any(_spatial(v) > 1 for v in values):
            continue
        padded_channels = -(-channels // block) * block
        if 3 * padded_channels > 4 * channels:
            continue  # more than a third more arithmetic: measured gains stop at 24 -> 32
        plan.update((v, padded_channels) for v in values)
        padded += 1
    if not plan:
        return 0
    for node in list(graph):
        if node.op_type == "Conv" and (plan.get(node.inputs[0]) or plan.get(node.outputs[0])):
            _pad_conv(graph, node, plan)
    for value, channels in plan.items():
        dims = list(value.shape)
        dims[1] = channels
        value.shape = ir.Shape(dims)
    return padded


def _spatial(value: ir.Value) -> int:
    dims = list(value.shape)[2:]
    return int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else 2


def _feature_map(value: ir.Value | None) -> bool:
    """[N, C, H, W] float with a static C, computed (not a constant)."""
    if value is None or value.const_value is not None or value.is_initializer():
        return False
    return value.dtype == ir.DataType.FLOAT and value.shape is not None and len(value.shape) == 4 \
        and isinstance(value.shape[1], int)


class _Groups:
    """Union-find over feature maps; a group is forbidden when any member is."""

    def __init__(self):
        self._parent: dict[ir.Value, ir.Value] = {}
        self._forbidden: set[ir.Value] = set()

    def known(self, value) -> bool:
        return value in self._parent

    def values(self):
        return list(self._parent)

    def add(self, value: ir.Value) -> None:
        self._parent.setdefault(value, value)

    def find(self, value: ir.Value) -> ir.Value:
        self.add(value)
        root = value
        while self._parent[root] is not root:
            root = self._parent[root]
        while self._parent[value] is not root:
            self._parent[value], value = root, self._parent[value]
        return root

    def union(self, a: ir.Value, b: ir.Value) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self._parent[rb] = ra
            if rb in self._forbidden:
                self._forbidden.add(ra)

    def forbid(self, value: ir.Value) -> None:
        self._forbidden.add(self.find(value))

    def forbidden(self, root: ir.Value) -> bool:
        return self.find(root) in self._forbidden


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """An initializer's array (torch.onnx exports weights as initializers)."""
    return value.const_value.numpy() if value is not None and value.const_value is not None else None


def _link(node: ir.Node, groups: _Groups) -> None:
    """Record how ``node`` ties its feature maps together, or forbid them."""
    maps_in = [v for v in node.inputs if _feature_map(v)]
    maps_out = [v for v in node.outputs if _feature_map(v)]
    for v in maps_in + maps_out:
        groups.add(v)

    def forbid_all():
        for v in maps_in + maps_out:
            groups.forbid(v)

    op = node.op_type if node.domain in ("", "ai.onnx") else None
    if op == "Conv":
        x, y = node.inputs[0], node.outputs[0]
        weight = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
        bias_ok = len(node.inputs) < 3 or node.inputs[2] is None or _constant(node.inputs[2]) is not None
        group = node.attributes.get("group")
        group = group.value if group is not None else 1
        if not (_feature_map(x) and _feature_map(y)) or weight is None or not bias_ok:
            forbid_all()
        elif group == 1:
            pass  # X consumed through weight columns, Y produced by weight rows: both groups free
        elif group == x.shape[1] == y.shape[1] and weight.shape[1] == 1:
            groups.union(x, y)  # depthwise: channel c in, channel c out
        else:
            forbid_all()
        return
    if op == "MaxPool" and len(node.outputs) > 1:
        forbid_all()  # its Indices count channels
        return
    if op in _UNARY and len(maps_in) == 1 and len(maps_out) == 1 and maps_in[0] is node.inputs[0]:
        groups.union(maps_in[0], maps_out[0])
        return
    if op in _SPATIAL_REDUCE and len(maps_in) == 1 and len(maps_out) == 1 and _reduces_spatial_only(node):
        groups.union(maps_in[0], maps_out[0])
        return
    if op in _BINARY and len(maps_out) == 1:
        ok = True
        for v in node.inputs:
            if _feature_map(v) and v.shape[1] == maps_out[0].shape[1]:
                continue
            array = _constant(v)
            if array is not None and (array.ndim < 3 or array.shape[-3] == 1):
                continue  # a constant that does not vary over channels
            ok = False
        if ok:
            for v in maps_in:
                groups.union(v, maps_out[0])
            return
    forbid_all()


def _reduces_spatial_only(node: ir.Node) -> bool:
    keepdims = node.attributes.get("keepdims")
    if keepdims is not None and keepdims.value == 0:
        return False
    axes = _constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None and "axes" in node.attributes:
        axes = np.asarray(node.attributes["axes"].value)
    return axes is not None and {int(a) % 4 for a in np.ravel(axes)} == {2, 3}


def _pad_conv(graph: ir.Graph, node: ir.Node, plan: dict[ir.Value, int]) -> None:
    x, y = node.inputs[0], node.outputs[0]
    weight = _constant(node.inputs[1])
    group = node.attributes.get("group")
    depthwise = group is not None and group.value > 1
    out_channels = plan.get(y, weight.shape[0])
    in_per_group = 1 if depthwise else plan.get(x, weight.shape[1])
    padded = np.zeros((out_channels, in_per_group, *weight.shape[2:]), dtype=weight.dtype)
    padded[: weight.shape[0], : weight.shape[1]] = weight
    node.replace_input_with(1, _initializer(graph, node.inputs[1], padded))
    if len(node.inputs) > 2 and node.inputs[2] is not None and out_channels != weight.shape[0]:
        bias = _constant(node.inputs[2])
        node.replace_input_with(2, _initializer(graph, node.inputs[2], np.pad(bias, (0, out_channels - bias.size))))
    if depthwise:
        node.attributes["group"] = ir.AttrInt64("group", out_channels)


def _initializer(graph: ir.Graph, old: ir.Value, array: np.ndarray) -> ir.Value:
    name = f"{old.name}_padded"
    while name in graph.initializers:
        name += "_"
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=old.type,
                     const_value=ir.tensor(array))
    graph.register_initializer(value)
    if len(old.uses()) == 1 and old.is_initializer():
        graph.initializers.pop(old.name)
    return value


def spread_channel_scales(graph: ir.Graph, block: int = BLOCK) -> int:
    """The squeeze-and-excitation rewrites above, in place; returns how many ops were rewritten."""
    rewritten = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "ReduceMean" and _blocked_map(node.inputs[0], block) and _reduces_spatial_only(node) \
                and not node.outputs[0].is_graph_output():
            mean = node.outputs[0]
            pool = ir.node("GlobalAveragePool", [node.inputs[0]], name=f"{node.name}_global_pool")
            axes = node.inputs[1] if len(node.inputs) > 1 else None
            _typed_like(pool.outputs[0], f"{mean.name}_global_pool", mean)
            _replace(graph, node, [pool], pool.outputs[0])
            if axes is not None and axes.is_initializer() and not axes.uses():
                graph.initializers.pop(axes.name)
            rewritten += 1
        elif node.op_type == "Mul" and len(node.inputs) == 2:
            for index, (scale, x) in enumerate([node.inputs, node.inputs[::-1]]):
                if _scales_channels_of(scale, x, block):
                    height, width = x.shape[2], x.shape[3]
                    scales = ir.Value(name=f"{node.name}_spread_scales", shape=ir.Shape([4]),
                                      type=ir.TensorType(ir.DataType.FLOAT),
                                      const_value=ir.tensor(np.asarray([1, 1, height, width], dtype=np.float32)))
                    graph.register_initializer(scales)
                    spread = ir.node("Resize", [scale, None, scales], name=f"{node.name}_spread",
                                     attributes={"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                                                 "nearest_mode": "floor"})
                    graph.insert_before(node, spread)
                    _typed_like(spread.outputs[0], f"{scale.name}_spread_{rewritten}", x)
                    node.replace_input_with(index, spread.outputs[0])
                    rewritten += 1
                    break
    return rewritten


def split_hard_swish(graph: ir.Graph, needs_grad: set[ir.Value], keep: set[ir.Value] = frozenset()) -> int:
    """The HardSwish split above, in place, where X needs a gradient and Y is neither kept nor a graph
    output; returns how many were split."""
    split = 0
    for node in list(graph):
        if (node.op_type != "HardSwish" or node.domain not in ("", "ai.onnx") or node.inputs[0] not in needs_grad
                or node.outputs[0] in keep or node.outputs[0].is_graph_output()):
            continue
        x, y = node.inputs[0], node.outputs[0]
        gate = ir.node("HardSigmoid", [x], attributes={"alpha": HARD_SWISH_ALPHA, "beta": 0.5},
                       name=f"{node.name}_gate")
        product = ir.node("Mul", [x, gate.outputs[0]], name=f"{node.name}_product")
        _typed_like(gate.outputs[0], f"{y.name}_gate", y)
        _typed_like(product.outputs[0], f"{y.name}_product", y)
        _replace(graph, node, [gate, product], product.outputs[0])
        split += 1
    return split


def _typed_like(value: ir.Value, name: str, like: ir.Value) -> None:
    """Name a new node's output and give it ``like``'s shape and type."""
    value.name = name
    value.shape = ir.Shape(list(like.shape)) if like.shape is not None else None
    value.type = like.type


def _replace(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node], result: ir.Value) -> None:
    """``new_nodes`` in place of ``node``, ``result`` taking over the uses of its single output."""
    graph.insert_before(node, new_nodes)
    node.outputs[0].replace_all_uses_with(result)
    graph.remove(node, safe=True)


def _blocked_map(value: ir.Value | None, block: int) -> bool:
    return _feature_map(value) and value.shape[1] % block == 0


def _scales_channels_of(scale: ir.Value, x: ir.Value, block: int) -> bool:
    """``scale`` is [N, C, 1, 1] for a blocked [N, C, H, W] ``x`` larger than 1 x 1."""
    if not (_blocked_map(x, block) and _feature_map(scale)) or list(scale.shape) != [*list(x.shape)[:2], 1, 1]:
        return False
    height, width = x.shape[2], x.shape[3]
    return isinstance(height, int) and isinstance(width, int) and height * width > 1
