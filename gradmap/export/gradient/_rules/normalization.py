"""Normalizations and softmax.

    BatchNormalization (inference): dX = dY * scale / sqrt(var + eps)              (per channel)
    LayerNormalization: g = dY * scale, xh = (X - mean) * r,
                        dX = r * (g - mean(g) - xh * mean(g * xh))      (means over the normalized axes)
    Softmax:            dX = Y * (dY - ReduceSum(dY * Y, axis))
    LogSoftmax:         dX = dY - Exp(Y) * ReduceSum(dY, axis)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..._errors import ExportError
from .._registry import register


@register("BatchNormalization")
def batch_normalization(ctx, node, dy):
    x, scale, _bias, _mean, var = node.inputs[:5]
    if ctx.attr(node, "training_mode", 0):
        raise ExportError(f"{node.name}: BatchNormalization in training mode has no gradient rule (use eval mode)")
    if any(ctx.needs_grad(v) for v in node.inputs[1:]):
        raise ExportError(f"{node.name}: BatchNormalization parameters that depend on the input have no rule")
    eps = ctx.attr(node, "epsilon", 1e-5)
    rank = ctx.rank(x)
    scale_np, var_np = ctx.constant_of(scale), ctx.constant_of(var)
    shape = [1, -1] + [1] * (rank - 2)
    if scale_np is not None and var_np is not None:
        factor = (scale_np.astype(np.float64) / np.sqrt(var_np.astype(np.float64) + eps)).astype(np.float32)
        factor_value = ctx.const(factor.reshape([1, -1] + [1] * (rank - 2)))
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
    if len(node.outputs) < 3:
        # The forward node already computes the statistics; expose them instead of recomputing.
        node.resize_outputs(3)
        stat_shape = ir.Shape(list(x.shape)[:axis] + [1] * (rank - axis)) if x.shape is not None else None
        for i, suffix in ((1, "mean"), (2, "inv_std")):
            out = node.outputs[i]
            out.name = f"{node.outputs[0].name}_{suffix}"
            out.type = ir.TensorType(ir.DataType.FLOAT)
            out.shape = stat_shape
    mean, inv_std = node.outputs[1], node.outputs[2]
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
