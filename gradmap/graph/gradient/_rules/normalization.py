"""Normalizations and softmax.

    BatchNormalization (inference): dX = dY * scale / sqrt(var + eps)              (per channel)
    LayerNormalization: g = dY * scale, xh = (X - mean) * r,
                        dX = r * (g - mean(g) - xh * mean(g * xh))      (means over the normalized axes)
    Softmax:            dX = Y * (dY - ReduceSum(dY * Y, axis))
    LogSoftmax:         dX = dY - Exp(Y) * ReduceSum(dY, axis)
    InstanceNormalization: g = dY * scale, LayerNormalization's dX over the spatial axes
    GroupNormalization: (opset 21) g = dY * scale, LayerNormalization's dX over
                        Reshape(X, [N, G, -1])'s last axis, reshaped back
    LRN:                Y = X S^-beta, S = bias + alpha / size * W(X^2), W the sum over channels
                        c - floor((size-1)/2) .. c + ceil((size-1)/2):
                        dX = dY S^-beta - (2 alpha beta / size) X W'(dY Y / S), W' the mirrored window
"""

from __future__ import annotations

import numpy as np

from ...errors import ExportError
from .._registry import register
from ..formulas import batch_norm_factor


@register("BatchNormalization")
def batch_normalization(ctx, node, dy):
    x, scale, _bias, _mean, var = node.inputs[:5]
    if ctx.attr(node, "training_mode", 0):
        raise ExportError(f"{node.name}: BatchNormalization in training mode has no gradient rule (use eval mode)")
    if any(ctx.needs_grad(v) for v in node.inputs[1:]):
        raise ExportError(f"{node.name}: BatchNormalization parameters that depend on the input have no rule")
    eps = ctx.attr(node, "epsilon", 1e-5)
    rank = ctx.rank(x)
    shape = [1, -1] + [1] * (rank - 2)
    factor = batch_norm_factor(ctx, node)
    if factor is not None:
        factor_value = ctx.const(factor.astype(np.float32).reshape(shape))
    else:
        factor_value = ctx.op("Reshape", ctx.op("Div", scale, ctx.op("Sqrt", ctx.op("Add", var, ctx.scalar(eps)))),
                              ctx.ints(shape))
    return [ctx.op("Mul", dy[0], factor_value)]


@register("LayerNormalization")
def layer_normalization(ctx, node, dy):
    x, scale = node.inputs[:2]
    if any(ctx.needs_grad(v) for v in node.inputs[1:]):
        raise ExportError(f"{node.name}: LayerNormalization parameters that depend on the input have no rule")
    rank = ctx.rank(x)
    axis = ctx.attr(node, "axis", -1) % rank
    axes = ctx.ints(list(range(axis, rank)))
    # the forward node computes the statistics anyway: its optional outputs Mean and InvStdDev
    stat_shape = list(x.shape)[:axis] + [1] * (rank - axis) if x.shape is not None else None
    mean, inv_std = ctx.optional_outputs(node, {1: "mean", 2: "inv_std"}, stat_shape)
    xh = ctx.op("Mul", ctx.op("Sub", x, mean), inv_std)
    g = ctx.op("Mul", dy[0], scale)
    g_mean = ctx.op("ReduceMean", g, axes, keepdims=1)
    gx_mean = ctx.op("ReduceMean", ctx.op("Mul", g, xh), axes, keepdims=1)
    dx = ctx.op("Mul", inv_std, ctx.op("Sub", ctx.op("Sub", g, g_mean), ctx.op("Mul", xh, gx_mean)))
    return [dx, None, None]


@register("Softmax")
def softmax(ctx, node, dy):
    y = node.outputs[0]
    axis = ctx.attr(node, "axis", -1)
    inner = ctx.op("ReduceSum", ctx.op("Mul", dy[0], y), ctx.ints([axis]), keepdims=1)
    return [ctx.op("Mul", y, ctx.op("Sub", dy[0], inner))]


@register("LogSoftmax")
def log_softmax(ctx, node, dy):
    y = node.outputs[0]
    axis = ctx.attr(node, "axis", -1)
    total = ctx.op("ReduceSum", dy[0], ctx.ints([axis]), keepdims=1)
    return [ctx.op("Sub", dy[0], ctx.op("Mul", ctx.op("Exp", y), total))]


def _normalized_input_grad(ctx, x, g, axes, eps):
    """dX of (X - mean) / sqrt(var + eps) over ``axes``, given g = dY * scale (broadcast to X):
    r (g - mean(g) - xh mean(g xh)) with xh = (X - mean) r, r = 1 / sqrt(var + eps)."""
    centered = ctx.op("Sub", x, ctx.op("ReduceMean", x, axes, keepdims=1))
    variance = ctx.op("ReduceMean", ctx.op("Mul", centered, centered), axes, keepdims=1)
    inv_std = ctx.op("Reciprocal", ctx.op("Sqrt", ctx.op("Add", variance, ctx.scalar(eps))))
    xh = ctx.op("Mul", centered, inv_std)
    g_mean = ctx.op("ReduceMean", g, axes, keepdims=1)
    gx_mean = ctx.op("ReduceMean", ctx.op("Mul", g, xh), axes, keepdims=1)
    return ctx.op("Mul", inv_std, ctx.op("Sub", ctx.op("Sub", g, g_mean), ctx.op("Mul", xh, gx_mean)))


@register("InstanceNormalization")
def instance_normalization(ctx, node, dy):
    """InstanceNormalization: g = dY * scale_c, dX = LayerNormalization's formula over the spatial axes."""
    x, scale = node.inputs[:2]
    if any(ctx.needs_grad(v) for v in node.inputs[1:]):
        raise ExportError(f"{node.name}: InstanceNormalization parameters that depend on the input have no rule")
    rank = ctx.rank(x)
    if rank < 3:
        raise ExportError(f"{node.name}: InstanceNormalization of a rank {rank} tensor (needs N, C, spatial...)")
    eps = ctx.attr(node, "epsilon", 1e-5)
    g = ctx.op("Mul", dy[0], ctx.op("Reshape", scale, ctx.ints([1, -1] + [1] * (rank - 2))))
    return [_normalized_input_grad(ctx, x, g, ctx.ints(list(range(2, rank))), eps), None, None]


@register("GroupNormalization")
def group_normalization(ctx, node, dy):
    """GroupNormalization (opset 21: scale per channel): g = dY * scale, and over
    Reshape(X, [N, G, -1]): dX = LayerNormalization's formula over the last axis."""
    x, scale = node.inputs[:2]
    if any(ctx.needs_grad(v) for v in node.inputs[1:]):
        raise ExportError(f"{node.name}: GroupNormalization parameters that depend on the input have no rule")
    dims = ctx.dims(x)
    groups = int(ctx.attr(node, "num_groups"))
    channels = dims[1]
    if len(dims) < 3 or not isinstance(channels, int) or channels % groups:
        raise ExportError(f"{node.name}: GroupNormalization of shape {dims} into {groups} groups has no rule")
    eps = ctx.attr(node, "epsilon", 1e-5)
    opset = ctx.graph.opset_imports.get("", ctx.graph.opset_imports.get("ai.onnx", 18))
    if opset < 21:
        raise ExportError(f"{node.name}: GroupNormalization before opset 21 (one scale per group, deprecated by "
                          "ONNX and refused by onnx.checker) has no gradient rule: export with --opset 21")
    scale_b = ctx.op("Reshape", scale, ctx.ints([1, channels] + [1] * (len(dims) - 2)))
    g = ctx.op("Mul", dy[0], scale_b)
    grouped = ctx.ints([0, groups, -1])
    dx = _normalized_input_grad(ctx, ctx.op("Reshape", x, grouped), ctx.op("Reshape", g, grouped),
                                ctx.ints([2]), eps)
    return [ctx.reshape_like(dx, x), None, None]


def _channel_window_sum(ctx, v, like, channels: int, before: int, after: int):
    """out[:, c] = sum of v[:, c - before .. c + after] (zero outside), v shaped like the forward value
    ``like``, as a Conv with a column of ones over v reshaped to [N, 1, C, -1]: one op for any spatial rank."""
    size = before + after + 1
    column = ctx.op("Reshape", v, ctx.ints([0, 1, channels, -1]))
    ones = ctx.const(np.ones((1, 1, size, 1), dtype=np.float32))
    summed = ctx.op("Conv", column, ones, kernel_shape=[size, 1], pads=[before, 0, after, 0])
    return ctx.op("Reshape", summed, ctx.shape_of(like))


@register("LRN")
def lrn(ctx, node, dy):
    """LRN (AlexNet, GoogLeNet, Caffe models): see the module doc; S is recomputed from X."""
    x, y = node.inputs[0], node.outputs[0]
    dims = ctx.dims(x)
    if len(dims) < 3 or not all(isinstance(d, int) for d in dims[1:]):
        raise ExportError(f"{node.name}: LRN needs static channel and spatial sizes, got {dims}")
    size = int(ctx.attr(node, "size"))
    alpha, beta, bias = ctx.attr(node, "alpha", 1e-4), ctx.attr(node, "beta", 0.75), ctx.attr(node, "bias", 1.0)
    before = (size - 1) // 2
    after = size - 1 - before
    squares = _channel_window_sum(ctx, ctx.op("Mul", x, x), x, dims[1], before, after)
    s = ctx.op("Add", ctx.scalar(bias), ctx.op("Mul", squares, ctx.scalar(alpha / size)))
    direct = ctx.op("Mul", dy[0], ctx.op("Pow", s, ctx.scalar(-beta)))
    through_s = _channel_window_sum(ctx, ctx.op("Div", ctx.op("Mul", dy[0], y), s), x, dims[1], after, before)
    cross = ctx.op("Mul", ctx.op("Mul", x, through_s), ctx.scalar(2.0 * alpha * beta / size))
    return [ctx.op("Sub", direct, cross)]
