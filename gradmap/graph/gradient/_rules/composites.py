"""Composite rules: activations exported as several nodes, differentiated as one function.

    SiLU      Y = X * S, S = Sigmoid(X) used by this Mul alone:
              dX = dY * (S (1 - Y) + Y)                    (= dY * S (1 + X (1 - S)))
    GELU      Y = X * P, P = 0.5 * (Erf(D) + 1), D = X / sqrt 2 (torch's exported exact GELU,
              intermediates used by the pattern alone):
              dX = dY * (P + D Exp(-ln sqrt(pi) - D^2))    (Phi(X) + X phi(X), reusing P and D)
    HardSwish Y = X * H, H = HardSigmoid(X, 1/6, 1/2) used by this Mul alone (HardSwish written
              as its definition): the HardSwish rule with the forward's own H

Each takes fewer activation-sized ops than the rules of its nodes (SiLU: four instead of six;
GELU: six instead of ten) and is as exact. The pattern's inner nodes get no gradient of their own.
"""

from __future__ import annotations

import math

from .._match import constant_is, producer, single_use
from .._registry import register_composite
from ..formulas import HARD_SWISH_ALPHA
from .elementwise import hard_swish_grad

_LOG_INV_SQRT_PI = -0.5 * math.log(math.pi)


def silu_parts(node):
    """{"x", "s"} when ``node`` is Mul(X, S) or Mul(S, X) with S = Sigmoid(X) used by nothing else."""
    for x, s in (node.inputs, node.inputs[::-1]):
        sigmoid = producer(s, "Sigmoid")
        if sigmoid is not None and sigmoid.inputs[0] is x and single_use(s):
            return {"x": x, "s": s}
    return None


@register_composite("SiLU", "Mul", silu_parts)
def silu(ctx, node, dy, parts):
    x, s, y = parts["x"], parts["s"], node.outputs[0]
    one_minus_y = ctx.op("Sub", ctx.scalar(1.0), y)
    local = ctx.op("Add", ctx.op("Mul", s, one_minus_y), y)
    return [ctx.op("Mul", dy[0], local) if v is x else None for v in node.inputs]


def gelu_parts(node):
    """{"x", "d", "p"} when ``node`` is torch's exact GELU, X * (0.5 * (Erf(D) + 1)) with
    D = X / sqrt(2) (or X * (1/sqrt(2))) and P the parenthesis, every intermediate used by this
    pattern alone."""
    for x, p in (node.inputs, node.inputs[::-1]):
        half = producer(p, "Mul")
        if half is None or not single_use(p):
            continue
        for c, a in (half.inputs, half.inputs[::-1]):
            add = producer(a, "Add")
            if add is None or not constant_is(c, 0.5) or not single_use(a):
                continue
            for e, one in (add.inputs, add.inputs[::-1]):
                erf = producer(e, "Erf")
                if erf is None or not constant_is(one, 1.0) or not single_use(e):
                    continue
                d = erf.inputs[0]
                scale = producer(d, "Div") or producer(d, "Mul")
                if scale is None or scale.inputs[0] is not x or not single_use(d):
                    continue
                factor = math.sqrt(2.0) if scale.op_type == "Div" else 1.0 / math.sqrt(2.0)
                if constant_is(scale.inputs[1], factor, rtol=1e-6):
                    return {"x": x, "d": d, "p": p}
    return None


@register_composite("GELU", "Mul", gelu_parts)
def gelu(ctx, node, dy, parts):
    # x phi(x) = D exp(-D^2) / sqrt(pi) = D Exp(-ln(sqrt(pi)) - D D), with D = x / sqrt(2)
    x, d, p = parts["x"], parts["d"], parts["p"]
    e = ctx.op("Exp", ctx.op("Sub", ctx.scalar(_LOG_INV_SQRT_PI), ctx.op("Mul", d, d)))
    local = ctx.op("Add", ctx.op("Mul", d, e), p)
    return [ctx.op("Mul", dy[0], local) if v is x else None for v in node.inputs]


def hard_swish_parts(node):
    """{"x", "h"} when ``node`` is Mul(X, H) or Mul(H, X) with H = HardSigmoid(X, 1/6, 1/2) used by
    nothing else."""
    for x, h in (node.inputs, node.inputs[::-1]):
        gate = producer(h, "HardSigmoid")
        if (gate is not None and gate.inputs[0] is x and single_use(h)
                and gate.attributes.get_float("alpha", 0.2) == HARD_SWISH_ALPHA
                and gate.attributes.get_float("beta", 0.5) == 0.5):
            return {"x": x, "h": h}
    return None


@register_composite("HardSwish", "Mul", hard_swish_parts)
def hard_swish(ctx, node, dy, parts):
    x = parts["x"]
    return [hard_swish_grad(ctx, x, parts["h"], dy[0]) if v is x else None for v in node.inputs]
