"""Elementwise ops. dY is the gradient of the output; broadcast inputs get it summed back.

    Identity, Dropout: dX = dY
    Add:          dA = dY,            dB = dY
    Sub:          dA = dY,            dB = -dY
    Mul:          dA = dY * B,        dB = dY * A
    Div:          dA = dY / B,        dB = -dY * Y / B
    Neg:          dX = -dY
    Pow (B const): dA = dY * B * A^(B-1)
    Sqrt:         dX = dY / (2 Y)
    Reciprocal:   dX = -dY * Y^2
    Exp:          dX = dY * Y
    Log:          dX = dY / X
    Abs:          dX = dY * Sign(X)
    Relu:         dX = dY * [Y > 0];  guided: Relu(dY) * [Y > 0];  deconvnet: Relu(dY)
    LeakyRelu:    dX = Where(X > 0, dY, alpha dY)
    Sigmoid:      dX = dY * Y * (1 - Y)
    Tanh:         dX = dY * (1 - Y^2)
    Erf:          dX = dY * 2/sqrt(pi) * exp(-X^2)
    Gelu:         dX = dY * (Phi(X) + X phi(X))         (approximate='none')
    HardSigmoid:  dX = Where(0 < alpha X + beta < 1, alpha dY, 0)
    HardSwish:    dX = dY * (2 HardSigmoid(X) - ([X > -3] + [X >= 3]) / 2)   (= 0, X/3 + 1/2, 1; exact)
    Clip:         dX = Where(min < X < max, dY, 0)
    Max, Min:     the gradient goes to the selected input (ties: the first)
    Where:        dA = Where(C, dY, 0), dB = Where(C, 0, dY)
    Cast:         dX = Cast(dY) between float types
    Sum:          dX_i = dY
    Mod (float, fmod=1): dA = dY, dB = -dY * trunc(A / B)        (integer Mod: no gradient)
    Mean:         dX_i = dY / n                                    (n inputs, broadcast)

[c] is Cast(c, float): 1 where c holds, else 0. Activations written as several nodes (SiLU, the
exported GELU, HardSwish as a product) have composite rules in composites.py.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from .._registry import register
from ..formulas import HARD_SWISH_ALPHA

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}


@register("Identity", "Dropout")
def identity(ctx, node, dy):
    return [dy[0]]


@register("Add")
def add(ctx, node, dy):
    a, b = node.inputs
    y = node.outputs[0]
    return [
        ctx.sum_to(dy[0], y, a) if ctx.needs_grad(a) else None,
        ctx.sum_to(dy[0], y, b) if ctx.needs_grad(b) else None,
    ]


@register("Sum")
def sum_(ctx, node, dy):
    y = node.outputs[0]
    return [ctx.sum_to(dy[0], y, x) if ctx.needs_grad(x) else None for x in node.inputs]


@register("Sub")
def sub(ctx, node, dy):
    a, b = node.inputs
    y = node.outputs[0]
    return [
        ctx.sum_to(dy[0], y, a) if ctx.needs_grad(a) else None,
        ctx.sum_to(ctx.op("Neg", dy[0]), y, b) if ctx.needs_grad(b) else None,
    ]


@register("Mul")
def mul(ctx, node, dy):
    a, b = node.inputs
    y = node.outputs[0]
    return [
        ctx.sum_to(ctx.op("Mul", dy[0], b), y, a) if ctx.needs_grad(a) else None,
        ctx.sum_to(ctx.op("Mul", dy[0], a), y, b) if ctx.needs_grad(b) else None,
    ]


@register("Div")
def div(ctx, node, dy):
    a, b = node.inputs
    y = node.outputs[0]
    da = db = None
    if ctx.needs_grad(a):
        da = ctx.sum_to(ctx.op("Div", dy[0], b), y, a)
    if ctx.needs_grad(b):
        db = ctx.sum_to(ctx.op("Neg", ctx.op("Div", ctx.op("Mul", dy[0], y), b)), y, b)
    return [da, db]


@register("Neg")
def neg(ctx, node, dy):
    return [ctx.op("Neg", dy[0])]


@register("Pow")
def pow_(ctx, node, dy):
    a, b = node.inputs
    y = node.outputs[0]
    if ctx.needs_grad(b):
        # d a^b / d b = a^b ln a; only meaningful for a > 0
        db = ctx.sum_to(ctx.op("Mul", ctx.op("Mul", dy[0], y), ctx.op("Log", a)), y, b)
    else:
        db = None
    da = None
    if ctx.needs_grad(a):
        exponent = ctx.constant_of(b)
        if exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 2.0:
            local = ctx.op("Mul", a, ctx.scalar(2.0))
        else:
            bf = b if b.dtype in _FLOATS else ctx.op("Cast", b, to=ir.DataType.FLOAT)
            local = ctx.op("Mul", bf, ctx.op("Pow", a, ctx.op("Sub", bf, ctx.scalar(1.0))))
        da = ctx.sum_to(ctx.op("Mul", dy[0], local), y, a)
    return [da, db]


@register("Sqrt")
def sqrt(ctx, node, dy):
    return [ctx.op("Div", dy[0], ctx.op("Mul", node.outputs[0], ctx.scalar(2.0)))]


@register("Reciprocal")
def reciprocal(ctx, node, dy):
    y = node.outputs[0]
    return [ctx.op("Neg", ctx.op("Mul", dy[0], ctx.op("Mul", y, y)))]


@register("Exp")
def exp(ctx, node, dy):
    return [ctx.op("Mul", dy[0], node.outputs[0])]


@register("Log")
def log(ctx, node, dy):
    return [ctx.op("Div", dy[0], node.inputs[0])]


@register("Abs")
def abs_(ctx, node, dy):
    return [ctx.op("Mul", dy[0], ctx.op("Sign", node.inputs[0]))]


def _zero(ctx):
    return ctx.scalar(0.0)


def _masked(ctx, g, condition):
    """g where condition holds, else 0, as a product with the condition cast to 0/1 (a Mul and a
    Cast are the cheapest elementwise ops; a Where took 1.9x as long as Cast + Mul on
    activation-sized tensors on a CPU)."""
    return ctx.op("Mul", g, ctx.op("Cast", condition, to=ir.DataType.FLOAT))


@register("Relu")
def relu(ctx, node, dy):
    # Y > 0 exactly where X > 0; reading Y leaves X to its producer alone, so an engine can
    # still fuse Conv + Relu in the forward part.
    y = node.outputs[0]
    if ctx.backprop == "deconvnet":  # the gradient's own sign decides, not the forward input
        return [ctx.op("Relu", dy[0])]
    g = ctx.op("Relu", dy[0]) if ctx.backprop == "guided" else dy[0]
    return [_masked(ctx, g, ctx.op("Greater", y, _zero(ctx)))]


@register("LeakyRelu")
def leaky_relu(ctx, node, dy):
    x = node.inputs[0]
    alpha = ctx.attr(node, "alpha", 0.01)
    return [ctx.op("Where", ctx.op("Greater", x, _zero(ctx)), dy[0], ctx.op("Mul", dy[0], ctx.scalar(alpha)))]


@register("Sigmoid")
def sigmoid(ctx, node, dy):
    y = node.outputs[0]
    return [ctx.op("Mul", dy[0], ctx.op("Mul", y, ctx.op("Sub", ctx.scalar(1.0), y)))]


@register("Tanh")
def tanh(ctx, node, dy):
    y = node.outputs[0]
    return [ctx.op("Mul", dy[0], ctx.op("Sub", ctx.scalar(1.0), ctx.op("Mul", y, y)))]


@register("Erf")
def erf(ctx, node, dy):
    x = node.inputs[0]
    local = ctx.op("Mul", ctx.scalar(2.0 / math.sqrt(math.pi)), ctx.op("Exp", ctx.op("Neg", ctx.op("Mul", x, x))))
    return [ctx.op("Mul", dy[0], local)]


@register("Gelu")
def gelu(ctx, node, dy):
    x = node.inputs[0]
    if ctx.attr(node, "approximate", "none") == "tanh":
        # y = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        c = math.sqrt(2.0 / math.pi)
        x2 = ctx.op("Mul", x, x)
        u = ctx.op("Mul", ctx.scalar(c), ctx.op("Add", x, ctx.op("Mul", ctx.scalar(0.044715), ctx.op("Mul", x2, x))))
        t = ctx.op("Tanh", u)
        du = ctx.op("Mul", ctx.scalar(c), ctx.op("Add", ctx.scalar(1.0), ctx.op("Mul", ctx.scalar(3 * 0.044715), x2)))
        sech2 = ctx.op("Sub", ctx.scalar(1.0), ctx.op("Mul", t, t))
        local = ctx.op("Add", ctx.op("Mul", ctx.scalar(0.5), ctx.op("Add", ctx.scalar(1.0), t)),
                       ctx.op("Mul", ctx.op("Mul", ctx.scalar(0.5), x), ctx.op("Mul", sech2, du)))
    else:
        cdf = ctx.op("Mul", ctx.scalar(0.5), ctx.op("Add", ctx.scalar(1.0),
                                                      ctx.op("Erf", ctx.op("Mul", x, ctx.scalar(1 / math.sqrt(2.0))))))
        pdf = ctx.op("Mul", ctx.scalar(1 / math.sqrt(2 * math.pi)),
                     ctx.op("Exp", ctx.op("Mul", ctx.scalar(-0.5), ctx.op("Mul", x, x))))
        local = ctx.op("Add", cdf, ctx.op("Mul", x, pdf))
    return [ctx.op("Mul", dy[0], local)]


@register("HardSigmoid")
def hard_sigmoid(ctx, node, dy):
    x = node.inputs[0]
    alpha = ctx.attr(node, "alpha", 0.2)
    beta = ctx.attr(node, "beta", 0.5)
    z = ctx.op("Add", ctx.op("Mul", x, ctx.scalar(alpha)), ctx.scalar(beta))
    inside = ctx.op("And", ctx.op("Greater", z, _zero(ctx)), ctx.op("Less", z, ctx.scalar(1.0)))
    return [_masked(ctx, ctx.op("Mul", dy[0], ctx.scalar(alpha)), inside)]


@register("HardSwish")
def hard_swish(ctx, node, dy):
    x = node.inputs[0]
    return [hard_swish_grad(ctx, x, ctx.op("HardSigmoid", x, alpha=HARD_SWISH_ALPHA, beta=0.5), dy[0])]


def hard_swish_grad(ctx, x, h, g):
    """g times HardSwish'(x), given h = HardSigmoid(x, 1/6, 1/2).

    torch's hardswish_backward: 0 up to -3, x/3 + 1/2 strictly between -3 and 3, 1 from 3 on,
    which is 2 h(x) - ([x > -3] + [x >= 3]) / 2: every term exact (2h and the halves are powers of
    two times exact values).
    """
    steps = ctx.op("Add", ctx.op("Cast", ctx.op("Greater", x, ctx.scalar(-3.0)), to=ir.DataType.FLOAT),
                   ctx.op("Cast", ctx.op("GreaterOrEqual", x, ctx.scalar(3.0)), to=ir.DataType.FLOAT))
    local = ctx.op("Sub", ctx.op("Add", h, h), ctx.op("Mul", steps, ctx.scalar(0.5)))
    return ctx.op("Mul", g, local)


@register("Clip")
def clip(ctx, node, dy):
    x = node.inputs[0]
    lo = node.inputs[1] if len(node.inputs) > 1 else None
    hi = node.inputs[2] if len(node.inputs) > 2 else None
    inside = None
    if lo is not None:
        inside = ctx.op("Greater", x, lo)
    if hi is not None:
        below = ctx.op("Less", x, hi)
        inside = below if inside is None else ctx.op("And", inside, below)
    if inside is None:
        return [dy[0]]
    return [_masked(ctx, dy[0], inside), None, None]


@register("Max", "Min")
def max_min(ctx, node, dy):
    y = node.outputs[0]
    taken = None  # first input equal to the result takes the gradient
    grads = []
    for x in node.inputs:
        hit = ctx.op("Equal", x, y)
        if taken is not None:
            hit = ctx.op("And", hit, ctx.op("Not", taken))
        taken = hit if taken is None else ctx.op("Or", taken, hit)
        grads.append(ctx.sum_to(ctx.op("Where", hit, dy[0], _zero(ctx)), y, x) if ctx.needs_grad(x) else None)
    return grads


@register("Where")
def where(ctx, node, dy):
    cond, a, b = node.inputs
    y = node.outputs[0]
    return [
        None,
        ctx.sum_to(ctx.op("Where", cond, dy[0], _zero(ctx)), y, a) if ctx.needs_grad(a) else None,
        ctx.sum_to(ctx.op("Where", cond, _zero(ctx), dy[0]), y, b) if ctx.needs_grad(b) else None,
    ]


@register("Cast")
def cast(ctx, node, dy):
    x = node.inputs[0]
    return [ctx.op("Cast", dy[0], to=x.dtype) if x.dtype != node.outputs[0].dtype else dy[0]]




@register("Mod")
def mod(ctx, node, dy):
    """Mod (float, fmod=1; Y = A - B trunc(A / B)): dA = dY, dB = -dY * trunc(A / B).
    Integer Mod carries no gradient (integers never need one)."""
    a, b = node.inputs
    y = node.outputs[0]
    if y.dtype not in _FLOATS:
        return [None, None]
    if not ctx.attr(node, "fmod", 0):
        from ...errors import ExportError

        raise ExportError(f"{node.name}: float Mod with fmod=0 is invalid ONNX (float Mod needs fmod=1)")
    grad_b = None
    if ctx.needs_grad(b):
        quotient = ctx.op("Div", a, b)
        truncated = ctx.op("Mul", ctx.op("Sign", quotient), ctx.op("Floor", ctx.op("Abs", quotient)))
        grad_b = ctx.sum_to(ctx.op("Neg", ctx.op("Mul", dy[0], truncated)), y, b)
    return [ctx.sum_to(dy[0], y, a) if ctx.needs_grad(a) else None, grad_b]


@register("Mean")
def mean(ctx, node, dy):
    """Mean (variadic, broadcasting): dX_i = sum_to(dY / n, X_i)."""
    y = node.outputs[0]
    g = ctx.op("Mul", dy[0], ctx.scalar(1.0 / len(node.inputs)))
    return [ctx.sum_to(g, y, x) if ctx.needs_grad(x) else None for x in node.inputs]
