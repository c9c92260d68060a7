"""Pooling and reductions.

    MaxPool:           for each kernel offset o, X_o = the strided slice of X (padded with the lowest
                       float) that window position o reads, so Y = max over o of X_o; the gradient goes
                       to the first maximum of each window (torch's rule for ties):
                         hit_o = [X_o == Y],  sel_o = hit_o * (1 - sum of sel_p for p before o)
                         dX = ConvTranspose(Concat_o(dY * sel_o), one-hot kernels, group=C, strides,
                                            dilations), cropped to X     (col2im of the routed dY;
                                            the rule publishes ``routed`` and ``spread``)
    AveragePool:       Y(o) = 1/D(o) * sum of X over window(o) inside X;
                       dX = ConvTranspose(dY / D, ones, group=C)   (D per torch's count_include_pad rule)
    GlobalAveragePool: dX = Expand(dY, Shape(X)) / (H W)
    ReduceMean:        dX = Expand(Unsqueeze(dY, axes), Shape(X)) / count
    ReduceSum:         dX = Expand(Unsqueeze(dY, axes), Shape(X))
    ReduceMax:         dX = Where(X == Y, dY, 0) / (number of maxima)   (torch.amax's even split)
    ReduceL2:          dX = X * Unsqueeze(dY / Y, axes), 0 where Y = 0 (as torch's norm backward)
    Resize (nearest, integer scales, each output a copy of input floor(i / s)):
                       dX = sum of dY over each s_h x s_w block = AveragePool(dY, s, stride s) * s_h s_w
                       (GlobalAveragePool from a 1 x 1 input; the rule publishes ``pooled`` and
                       the scalar ``factor``)
    Resize (linear, cubic; nearest at other scales): Y = A_h X A_w^T per channel (A from ONNX's
                       reference Resize of the identity); dX = A_h^T dY A_w
    TopK:              dX = ScatterElements(zeros, Indices, dValues, axis)   (distinct indices)
    GlobalMaxPool:     dX = [X == Y] dY / (number of maxima)   (ReduceMax's rule over the spatial axes)
    ReduceMin:         ReduceMax's rule
    ReduceSumSquare:   dX = 2 X Unsqueeze(dY, axes)
    ReduceL1:          dX = Sign(X) Unsqueeze(dY, axes)
    ReduceLogSumExp:   dX = Unsqueeze(dY, axes) Exp(X - Unsqueeze(Y, axes))
    ReduceLogSum:      dX = Expand(Unsqueeze(dY / Exp(Y), axes), Shape(X))

The Expands are deferred (GradContext.broadcastable): where X has other consumers, as the input of
a squeeze-excitation block does, the small gradient is added to theirs by a broadcasting Add.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx_ir as ir

from ...errors import ExportError
from .._registry import register


_LOWEST = float(np.finfo(np.float32).min)  # MaxPool's implicit padding: never a window's maximum


@register("MaxPool")
def max_pool(ctx, node, dy):
    x, y = node.inputs[0], node.outputs[0]
    if ctx.attr(node, "storage_order", 0) != 0:
        raise ExportError(f"{node.name}: MaxPool with storage_order=1 has no gradient rule")
    if ctx.attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ExportError(f"{node.name}: MaxPool with auto_pad={ctx.attr(node, 'auto_pad')} has no gradient rule")
    xdims, ydims = ctx.dims(x), ctx.dims(y)
    spatial = len(xdims) - 2
    channels = xdims[1]
    if not all(isinstance(d, int) for d in xdims[1:] + ydims[2:]):
        raise ExportError(f"{node.name}: MaxPool needs static channel and spatial sizes, got {xdims} -> {ydims}")
    kernel = list(ctx.attr(node, "kernel_shape"))
    strides = list(ctx.attr(node, "strides", [1] * spatial))
    dilations = list(ctx.attr(node, "dilations", [1] * spatial))
    pads = list(ctx.attr(node, "pads", [0] * (2 * spatial)))
    begin = pads[:spatial]
    span = [(ydims[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(spatial)]
    end = [max(0, span[i] - begin[i] - xdims[2 + i]) for i in range(spatial)]  # ceil_mode reaches past the end
    padded = x
    if any(begin) or any(end):
        padded = ctx.op("Pad", x, ctx.ints([0, 0, *begin, 0, 0, *end]), ctx.scalar(_LOWEST))
    axes = list(range(2, 2 + spatial))
    offsets = list(itertools.product(*[range(k) for k in kernel]))
    routed, taken = [], None
    for n, offset in enumerate(offsets):
        starts = [o * d for o, d in zip(offset, dilations)]
        stops = [s + (ydims[2 + i] - 1) * strides[i] + 1 for i, s in enumerate(starts)]
        window = ctx.op("Slice", padded, ctx.ints(starts), ctx.ints(stops), ctx.ints(axes), ctx.ints(strides))
        hit = ctx.op("Cast", ctx.op("Equal", window, y), to=ir.DataType.FLOAT)
        selected = hit if taken is None else ctx.op("Mul", hit, ctx.op("Sub", ctx.scalar(1.0), taken))
        if n + 1 < len(offsets):
            taken = selected if taken is None else ctx.op("Add", taken, selected)
        routed.append(ctx.op("Mul", dy[0], selected))
    unsqueezed = [ctx.op("Unsqueeze", r, ctx.ints([2])) for r in routed]
    stacked = ctx.op("Concat", *unsqueezed, axis=2) if len(unsqueezed) > 1 else unsqueezed[0]
    stacked = ctx.op("Reshape", stacked, ctx.ints([0, channels * len(offsets), *ydims[2:]]))
    one_hot = np.zeros((len(offsets), 1, *kernel), dtype=np.float32)
    for n, offset in enumerate(offsets):
        one_hot[(n, 0, *offset)] = 1.0
    spread = ctx.op("ConvTranspose", stacked, ctx.const(np.tile(one_hot, (channels,) + (1,) * (1 + spatial))),
                    group=channels, strides=strides, dilations=dilations, kernel_shape=kernel)
    ctx.publish(routed=routed, spread=spread)
    # ``spread`` covers the padded input [0, span): crop the padding, restore rows no window reads
    stops = [min(span[i], begin[i] + xdims[2 + i]) for i in range(spatial)]
    if any(begin) or stops != span:
        spread = ctx.op("Slice", spread, ctx.ints(begin), ctx.ints(stops), ctx.ints(axes))
    missing = [begin[i] + xdims[2 + i] - stops[i] for i in range(spatial)]
    if any(missing):
        spread = ctx.op("Pad", spread, ctx.ints([0] * (2 + spatial) + [0, 0, *missing]))
    return [spread]


def _torch_avgpool_divisor(size: int, out: int, k: int, s: int, pad_begin: int, pad_end: int,
                           include_pad: bool) -> np.ndarray:
    divisor = np.empty(out, dtype=np.float64)
    for o in range(out):
        start = o * s - pad_begin
        end = min(start + k, size + pad_end)
        padded = end - start
        start, end = max(start, 0), min(end, size)
        divisor[o] = padded if include_pad else end - start
    return divisor


@register("AveragePool")
def average_pool(ctx, node, dy):
    x, y = node.inputs[0], node.outputs[0]
    xdims, ydims = ctx.dims(x), ctx.dims(y)
    spatial = len(xdims) - 2
    if ctx.attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ExportError(f"{node.name}: AveragePool with auto_pad has no gradient rule")
    if any(d != 1 for d in ctx.attr(node, "dilations", [1] * spatial)):
        raise ExportError(f"{node.name}: dilated AveragePool has no gradient rule")
    kernel = list(ctx.attr(node, "kernel_shape"))
    strides = list(ctx.attr(node, "strides", [1] * spatial))
    pads = list(ctx.attr(node, "pads", [0] * (2 * spatial)))
    include_pad = bool(ctx.attr(node, "count_include_pad", 0))
    channels = xdims[1]
    if not isinstance(channels, int):
        raise ExportError(f"{node.name}: AveragePool needs a static channel count")
    # Windows of ceil_mode may hang past the padded input; trailing input rows not covered by any
    # window get no gradient, and the transposed convolution needs its output padding for that.
    inv = np.ones([1] * (2 + spatial))
    for i in range(spatial):
        d = _torch_avgpool_divisor(xdims[2 + i], ydims[2 + i], kernel[i], strides[i], pads[i],
                                   pads[spatial + i], include_pad)
        shape = [1] * (2 + spatial)
        shape[2 + i] = ydims[2 + i]
        inv = inv * (1.0 / d).reshape(shape)
    if all(ydims[2 + i] == 1 and kernel[i] - pads[i] >= xdims[2 + i] for i in range(spatial)):
        # one window over the whole input (Hugging Face's EfficientNet pools with a kernel of 2560
        # and ceil_mode): a global average, whatever the kernel's size; the transposed convolution
        # below would need a [C, 1, k, k] kernel of ones (62.5 GiB there)
        g = ctx.op("Mul", dy[0], ctx.scalar(float(inv.flat[0])))
        return [ctx.broadcastable(g, per_channel=spatial == 2)]
    end_pads = []
    output_padding = []
    for i in range(spatial):
        full = (ydims[2 + i] - 1) * strides[i] + kernel[i] - pads[i] - pads[spatial + i]
        extra = xdims[2 + i] - full
        if extra >= 0:
            end_pads.append(pads[spatial + i])
            output_padding.append(extra)
        else:  # ceil_mode: the last window reaches beyond the end padding
            end_pads.append(pads[spatial + i] - extra)
            output_padding.append(0)
    g = dy[0]
    if np.all(inv == inv.flat[0]):
        g = ctx.op("Mul", g, ctx.scalar(float(inv.flat[0])))
    else:
        g = ctx.op("Mul", g, ctx.const(inv.astype(np.float32)))
    ones = np.ones([channels, 1] + kernel, dtype=np.float32)
    if any(p >= s for p, s in zip(output_padding, strides)):
        raise ExportError(f"{node.name}: cannot restore input size {xdims} from {ydims}")
    dx = ctx.op("ConvTranspose", g, ctx.const(ones), group=channels, strides=strides,
                pads=pads[:spatial] + end_pads, kernel_shape=kernel, output_padding=output_padding)
    return [dx]


@register("GlobalAveragePool")
def global_average_pool(ctx, node, dy):
    x = node.inputs[0]
    count = math.prod(ctx.dims(x)[2:])
    return [ctx.broadcastable(ctx.op("Mul", dy[0], ctx.scalar(1.0 / count)), per_channel=ctx.rank(x) == 4)]


def _reduced_axes(ctx, node) -> list[int] | None:
    x = node.inputs[0]
    rank = ctx.rank(x)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = ctx.require_constant(node.inputs[1], "the reduction axes").reshape(-1).tolist()
    else:
        axes = ctx.attr(node, "axes", None)
    if not axes:
        if ctx.attr(node, "noop_with_empty_axes", 0):
            return None
        return list(range(rank))
    return sorted(a % rank for a in axes)


def _expand_back(ctx, node, g, axes):
    x = node.inputs[0]
    if not ctx.attr(node, "keepdims", 1):
        g = ctx.op("Unsqueeze", g, ctx.ints(axes))
    return ctx.op("Expand", g, ctx.shape_of(x))


def _keepdims(ctx, node, g, axes):
    """``g`` with the reduced axes kept as size 1: it broadcasts against X."""
    if not ctx.attr(node, "keepdims", 1):
        g = ctx.op("Unsqueeze", g, ctx.ints(axes))
    return g


def _spatial(ctx, node, axes) -> bool:
    """The reduction takes an [N, C, H, W] input's spatial axes: its gradient is [N, C, 1, 1]."""
    return ctx.rank(node.inputs[0]) == 4 and axes == [2, 3]


@register("ReduceSum")
def reduce_sum(ctx, node, dy):
    axes = _reduced_axes(ctx, node)
    if axes is None:
        return [dy[0]]
    return [ctx.broadcastable(_keepdims(ctx, node, dy[0], axes), per_channel=_spatial(ctx, node, axes)), None]


@register("ReduceMean")
def reduce_mean(ctx, node, dy):
    axes = _reduced_axes(ctx, node)
    if axes is None:
        return [dy[0]]
    dims = ctx.dims(node.inputs[0])
    sizes = [dims[a] for a in axes]
    if not all(isinstance(s, int) for s in sizes):
        raise ExportError(f"{node.name}: ReduceMean over a dynamic axis has no gradient rule")
    g = ctx.op("Mul", dy[0], ctx.scalar(1.0 / math.prod(sizes)))
    return [ctx.broadcastable(_keepdims(ctx, node, g, axes), per_channel=_spatial(ctx, node, axes)), None]


@register("ReduceMax")
def reduce_max(ctx, node, dy):
    axes = _reduced_axes(ctx, node)
    if axes is None:
        return [dy[0]]
    x, y = node.inputs[0], node.outputs[0]
    y_full = _expand_back(ctx, node, y, axes)
    hit = ctx.op("Cast", ctx.op("Equal", x, y_full), to=ir.DataType.FLOAT)
    count = ctx.op("ReduceSum", hit, ctx.ints(axes), keepdims=1)
    g = dy[0] if ctx.attr(node, "keepdims", 1) else ctx.op("Unsqueeze", dy[0], ctx.ints(axes))
    return [ctx.op("Mul", hit, ctx.op("Div", g, count)), None]


@register("ReduceL2")
def reduce_l2(ctx, node, dy):
    axes = _reduced_axes(ctx, node)
    if axes is None:
        return [dy[0]]
    x, y = node.inputs[0], node.outputs[0]
    # Y = 0 only where the whole reduced slice of X is 0, so any finite divisor gives dX = 0 there
    safe = ctx.op("Where", ctx.op("Equal", y, ctx.scalar(0.0)), ctx.scalar(1.0), y)
    return [ctx.op("Mul", x, _keepdims(ctx, node, ctx.op("Div", dy[0], safe), axes)), None]


@register("TopK")
def top_k(ctx, node, dy):
    """TopK: dX = ScatterElements(zeros, Indices, dValues, axis); the k indices along the axis are
    distinct, so each position receives at most one value (no summing). Indices carry no gradient."""
    x = node.inputs[0]
    values, indices = node.outputs[:2]
    axis = ctx.attr(node, "axis", -1) % ctx.rank(x)
    if dy[0] is None:
        return [None, None]
    return [ctx.op("ScatterElements", ctx.zeros_like(x), indices, dy[0], axis=axis), None]


def _resize_nearest_blocks(ctx, node, dy):
    """Nearest Resize by integer scales with each output a copy of input floor(i / s): the sum of dY
    over each s_h x s_w block; None (nothing emitted) for any other nearest Resize."""
    x = node.inputs[0]
    coordinates = ctx.attr(node, "coordinate_transformation_mode", "half_pixel")
    rounding = ctx.attr(node, "nearest_mode", "round_prefer_floor")
    # with an integer scale, both of these pick input floor(i / s) for output i
    if (coordinates, rounding) not in (("asymmetric", "floor"), ("half_pixel", "round_prefer_floor")):
        return None
    xdims, ydims = ctx.dims(x), ctx.dims(node.outputs[0])
    if len(xdims) != 4 or ctx.attr(node, "axes", None) is not None:
        return None
    if not all(isinstance(d, int) for d in xdims[1:] + ydims[1:]) or xdims[1] != ydims[1] \
            or any(y % x for x, y in zip(xdims[2:], ydims[2:])):
        return None
    sh, sw = ydims[2] // xdims[2], ydims[3] // xdims[3]
    if xdims[2:] == (1, 1):
        pooled = ctx.op("GlobalAveragePool", dy[0])
    else:
        pooled = ctx.op("AveragePool", dy[0], kernel_shape=[sh, sw], strides=[sh, sw])
    factor = ctx.scalar(float(sh * sw))
    ctx.publish(pooled=pooled, factor=factor)
    return [ctx.op("Mul", pooled, factor)] + [None] * (len(node.inputs) - 1)


def _resize_matrix(node, axis_in: int, axis_out: int, scale, size) -> np.ndarray:
    """A [out, in] with Resize(X) = A X along one axis: ONNX's reference Resize, with the node's own
    attributes and this axis' scale or size, applied to the identity (linear and cubic modes are
    separable, so the 2-D op is A_h X A_w^T)."""
    import onnx
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    attributes = {a.name: a.value for a in node.attributes.values()}
    inputs = ["X", "", "scales" if scale is not None else "", "sizes" if scale is None else ""]
    while inputs and inputs[-1] == "":
        inputs.pop()
    graph = helper.make_graph(
        [helper.make_node("Resize", inputs, ["Y"], **attributes)], "axis",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, axis_in, axis_in, 1])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)],
        [helper.make_tensor("scales", onnx.TensorProto.FLOAT, [4], [1, 1, float(scale), 1])] if scale is not None
        else [helper.make_tensor("sizes", onnx.TensorProto.INT64, [4], [1, axis_in, axis_out, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    eye = np.eye(axis_in, dtype=np.float32).reshape(1, axis_in, axis_in, 1)
    (out,) = ReferenceEvaluator(model).run(None, {"X": eye})
    return out[0, :, :, 0].T.astype(np.float64)  # [out, in]


@register("Resize")
def resize(ctx, node, dy):
    """Resize: nearest by integer scales, the block sums of :func:`_resize_nearest_blocks`; linear and
    cubic (any coordinate transformation, cubic_coeff_a, antialias) and any other nearest (A is then
    a selection matrix): Y = A_h X A_w^T per channel, so dX = A_h^T dY A_w (two MatMuls with constant
    matrices)."""
    mode = ctx.attr(node, "mode", "nearest")
    if mode == "nearest":
        blocks = _resize_nearest_blocks(ctx, node, dy)
        if blocks is not None:
            return blocks
    x = node.inputs[0]
    where = f"{node.name}: Resize"
    if mode not in ("nearest", "linear", "cubic") or ctx.attr(node, "coordinate_transformation_mode", "") == "tf_crop_and_resize":
        raise ExportError(f"{where} with mode={mode}, coordinate_transformation_mode="
                          f"{ctx.attr(node, 'coordinate_transformation_mode', 'half_pixel')} has no gradient rule")
    xdims, ydims = ctx.dims(x), ctx.dims(node.outputs[0])
    if len(xdims) != 4 or ctx.attr(node, "axes", None) is not None or \
            not all(isinstance(d, int) for d in xdims[1:] + ydims[1:]) or xdims[1] != ydims[1]:
        raise ExportError(f"{where} from {xdims} to {ydims}: only spatial resizes of [N, C, H, W] have a gradient rule")
    scales_in = node.inputs[2] if len(node.inputs) > 2 else None
    sizes_in = node.inputs[3] if len(node.inputs) > 3 else None
    scales = ctx.constant_of(scales_in) if scales_in is not None else None
    if scales is not None and scales.size == 0:
        scales = None
    if scales is None and sizes_in is None:
        raise ExportError(f"{where}: scales must be constants for its gradient rule")
    # sizes, constant or computed from shapes (timm's csatv2, mobilenetv5; torch's interpolate(size=...)
    # of a dynamic batch): the output's static spatial dims are those sizes
    matrices = [_resize_matrix(node, xdims[axis], ydims[axis], None if scales is None else scales[axis], None)
                for axis in (2, 3)]
    for matrix, axis in zip(matrices, (2, 3)):
        if matrix.shape != (ydims[axis], xdims[axis]):
            raise ExportError(f"{where}: its reference interpolation gives {matrix.shape[0]} values along axis {axis}, "
                              f"the graph {ydims[axis]}")
    rows = ctx.op("MatMul", ctx.const(matrices[0].T.astype(np.float32)), dy[0])
    return [ctx.op("MatMul", rows, ctx.const(matrices[1].astype(np.float32)))] + [None] * (len(node.inputs) - 1)


@register("GlobalMaxPool")
def global_max_pool(ctx, node, dy):
    """GlobalMaxPool: Y keeps the spatial axes as 1, so X == Y broadcasts: dX = [X == Y] dY / count."""
    x, y = node.inputs[0], node.outputs[0]
    hit = ctx.op("Cast", ctx.op("Equal", x, y), to=ir.DataType.FLOAT)
    count = ctx.op("ReduceSum", hit, ctx.ints(list(range(2, ctx.rank(x)))), keepdims=1)
    return [ctx.op("Mul", hit, ctx.op("Div", dy[0], count))]


@register("ReduceMin")
def reduce_min(ctx, node, dy):
    """ReduceMin: the gradient splits evenly among the minima, as ReduceMax's among the maxima."""
    return reduce_max(ctx, node, dy)


@register("ReduceSumSquare")
def reduce_sum_square(ctx, node, dy):
    axes = _reduced_axes(ctx, node)
    x = node.inputs[0]
    g = dy[0] if axes is None else _keepdims(ctx, node, dy[0], axes)
    return [ctx.op("Mul", ctx.op("Mul", x, ctx.scalar(2.0)), g), None]


@register("ReduceL1")
def reduce_l1(ctx, node, dy):
    axes = _reduced_axes(ctx, node)
    x = node.inputs[0]
    g = dy[0] if axes is None else _keepdims(ctx, node, dy[0], axes)
    return [ctx.op("Mul", ctx.op("Sign", x), g), None]


@register("ReduceLogSumExp")
def reduce_log_sum_exp(ctx, node, dy):
    axes = _reduced_axes(ctx, node)
    x, y = node.inputs[0], node.outputs[0]
    if axes is None:
        return [dy[0], None]
    g, y = _keepdims(ctx, node, dy[0], axes), _keepdims(ctx, node, y, axes)
    return [ctx.op("Mul", g, ctx.op("Exp", ctx.op("Sub", x, y))), None]


@register("ReduceLogSum")
def reduce_log_sum(ctx, node, dy):
    axes = _reduced_axes(ctx, node)
    x, y = node.inputs[0], node.outputs[0]
    if axes is None:
        return [ctx.op("Div", dy[0], x), None]
    g = _keepdims(ctx, node, ctx.op("Div", dy[0], ctx.op("Exp", y)), axes)
    return [ctx.broadcastable(g, per_channel=_spatial(ctx, node, axes)), None]
