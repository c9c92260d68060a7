"""Activations that other exporters and older opsets emit (Keras, TF-slim, Caffe2, Paddle, JAX).

    PRelu:           dX = Where(X > 0, dY, slope dY),     dSlope = sum_to(Where(X > 0, 0, dY X), slope)
    Elu:             dX = Where(X > 0, dY, dY (Y + alpha))
    Selu:            dX = Where(X > 0, gamma dY, dY (Y + gamma alpha))
    Celu:            dX = Where(X > 0, dY, dY Exp(X / alpha))
    ThresholdedRelu: dX = dY [X > alpha]
    Softplus:        dX = dY Sigmoid(X)
    Softsign:        dX = dY / (1 + |X|)^2
    Mish:            dX = dY (T + X Sigmoid(X) (1 - T^2)),   T = Tanh(Softplus(X))
    Shrink:          dX = dY [|X| > lambd]                   (Y = X -+ bias outside [-lambd, lambd], else 0)

[c] is Cast(c, float): 1 where c holds, else 0. At a kink (X = 0, X = alpha) the rules take the
left-hand side's derivative, as torch does for ReLU-like functions.
"""

from __future__ import annotations

import onnx_ir as ir

from .._registry import register


def _is(ctx, condition):
    return ctx.op("Cast", condition, to=ir.DataType.FLOAT)


def _positive(ctx, x):
    return ctx.op("Greater", x, ctx.scalar(0.0))


@register("PRelu")
def prelu(ctx, node, dy):
    x, slope = node.inputs
    y = node.outputs[0]
    positive = _positive(ctx, x)
    dx = dslope = None
    if ctx.needs_grad(x):
        dx = ctx.sum_to(ctx.op("Where", positive, dy[0], ctx.op("Mul", dy[0], slope)), y, x)
    if ctx.needs_grad(slope):
        dslope = ctx.sum_to(ctx.op("Where", positive, ctx.scalar(0.0), ctx.op("Mul", dy[0], x)), y, slope)
    return [dx, dslope]


@register("Elu")
def elu(ctx, node, dy):
    x, y = node.inputs[0], node.outputs[0]
    alpha = ctx.attr(node, "alpha", 1.0)
    negative = ctx.op("Mul", dy[0], ctx.op("Add", y, ctx.scalar(alpha)))
    return [ctx.op("Where", _positive(ctx, x), dy[0], negative)]


@register("Selu")
def selu(ctx, node, dy):
    x, y = node.inputs[0], node.outputs[0]
    alpha = ctx.attr(node, "alpha", 1.67326319217681884765625)
    gamma = ctx.attr(node, "gamma", 1.05070102214813232421875)
    negative = ctx.op("Mul", dy[0], ctx.op("Add", y, ctx.scalar(gamma * alpha)))
    return [ctx.op("Where", _positive(ctx, x), ctx.op("Mul", dy[0], ctx.scalar(gamma)), negative)]


@register("Celu")
def celu(ctx, node, dy):
    x = node.inputs[0]
    alpha = ctx.attr(node, "alpha", 1.0)
    negative = ctx.op("Mul", dy[0], ctx.op("Exp", ctx.op("Div", x, ctx.scalar(alpha))))
    return [ctx.op("Where", _positive(ctx, x), dy[0], negative)]


@register("ThresholdedRelu")
def thresholded_relu(ctx, node, dy):
    x = node.inputs[0]
    alpha = ctx.attr(node, "alpha", 1.0)
    return [ctx.op("Mul", dy[0], _is(ctx, ctx.op("Greater", x, ctx.scalar(alpha))))]


@register("Softplus")
def softplus(ctx, node, dy):
    return [ctx.op("Mul", dy[0], ctx.op("Sigmoid", node.inputs[0]))]


@register("Softsign")
def softsign(ctx, node, dy):
    denominator = ctx.op("Add", ctx.scalar(1.0), ctx.op("Abs", node.inputs[0]))
    return [ctx.op("Div", dy[0], ctx.op("Mul", denominator, denominator))]


@register("Mish")
def mish(ctx, node, dy):
    x = node.inputs[0]
    t = ctx.op("Tanh", ctx.op("Softplus", x))
    slope = ctx.op("Mul", ctx.op("Mul", x, ctx.op("Sigmoid", x)), ctx.op("Sub", ctx.scalar(1.0), ctx.op("Mul", t, t)))
    return [ctx.op("Mul", dy[0], ctx.op("Add", t, slope))]


@register("Shrink")
def shrink(ctx, node, dy):
    x = node.inputs[0]
    lambd = ctx.attr(node, "lambd", 0.5)
    outside = ctx.op("Greater", ctx.op("Abs", x), ctx.scalar(lambd))
    return [ctx.op("Mul", dy[0], _is(ctx, outside))]
