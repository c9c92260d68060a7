"""Elementwise ops. dY is the gradient of the output; broadcast inputs get it summed back.

    Identity, Dropout: dX = dY
    Add:          dA = dY,            dB = dY
    Sub:          dA = dY,            dB = -dY
    Mul:          dA = dY * B,        dB = dY * A
    Mul(X, Sigmoid(X)) (SiLU, the Sigmoid used by this Mul alone):
                  dX = dY * (S (1 - Y) + Y)     = dY * S (1 + X (1 - S)) with S = Sigmoid(X), Y = X S
                  (1 - Y as a depthwise 1x1 Conv where C is a multiple of 16, see HardSwish)
    Div:          dA = dY / B,        dB = -dY * Y / B
    Neg:          dX = -dY
    Pow (B const): dA = dY * B * A^(B-1)
    Sqrt:         dX = dY / (2 Y)
    Reciprocal:   dX = -dY * Y^2
    Exp:          dX = dY * Y
    Log:          dX = dY / X
    Abs:          dX = dY * Sign(X)
    Relu:         dX = Where(Y > 0, dY, 0);  guided: Where(Y > 0, Relu(dY), 0);  deconvnet: Relu(dY)
    LeakyRelu:    dX = Where(X > 0, dY, alpha dY)
    Sigmoid:      dX = dY * Y * (1 - Y)
    Tanh:         dX = dY * (1 - Y^2)
    Erf:          dX = dY * 2/sqrt(pi) * exp(-X^2)
    Gelu:         dX = dY * (Phi(X) + X phi(X))         (approximate='none')
    X * (0.5 * (Erf(X / sqrt 2) + 1)) (torch's exported GELU, intermediates used by it alone):
                  dX = dY * (P + D Exp(-ln sqrt(pi) - D^2)),  P the parenthesis, D = X / sqrt 2
    HardSigmoid:  dX = Where(0 < alpha X + beta < 1, alpha dY, 0)
    HardSwish:    dX = dY * (2 HardSigmoid(X) - ([X > -3] + [X >= 3]) / 2)   (= 0, X/3 + 1/2, 1; steps exact)
                  also for Mul(X, HardSigmoid(X, 1/6, 1/2)), as the gradient pass splits HardSwish;
                  where C is a multiple of 16 each half step is a depthwise 1x1 Conv with a fused Clip
                  and 2 HardSigmoid(X) a Conv: onnxruntime keeps the whole rule in its blocked NCHWc
                  layout, next to the convolutions
    Clip:         dX = Where(min < X < max, dY, 0)
    Max, Min:     the gradient goes to the selected input (ties: the first)
    Where:        dA = Where(C, dY, 0), dB = Where(C, 0, dY)
    Cast:         dX = Cast(dY) between float types
    Sum:          dX_i = dY
    Mod (float, fmod=1): dA = dY, dB = -dY * trunc(A / B)        (integer Mod: no gradient)
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from .._registry import register

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


def _silu_parts(node):
    """(X, S) when ``node`` is Mul(X, S) or Mul(S, X) with S = Sigmoid(X) used by nothing else."""
    for x, s in (node.inputs, node.inputs[::-1]):
        producer = s.producer() if s is not None else None
        if (producer is not None and producer.op_type == "Sigmoid" and producer.domain in ("", "ai.onnx")
                and producer.inputs[0] is x and _single_use(s)):
            return x, s
    return None


def _single_use(value) -> bool:
    """Read by one node of the forward graph. Backward nodes are not in the graph while the rules
    run (they join it at the end) but count as uses, and with several backprop rules the first
    walk's nodes already read the forward values the second walk's patterns look at."""
    return (value is not None and not value.is_graph_output()
            and sum(1 for use in value.uses() if use.node.graph is not None) == 1)


def _producer(value, op_type):
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == op_type and producer.domain in ("", "ai.onnx"):
        return producer
    return None


def _constant_is(ctx, value, expected: float, rtol: float = 0.0) -> bool:
    c = ctx.constant_of(value)
    return c is not None and c.size == 1 and abs(float(c.reshape(())) - expected) <= rtol * abs(expected)


def _gelu_parts(ctx, node):
    """(X, D, P) when ``node`` is torch's exact GELU, X * (0.5 * (Erf(D) + 1)) with D = X / sqrt(2)
    (or X * (1/sqrt(2))) and P the parenthesis, every intermediate used by this pattern alone."""
    for x, p in (node.inputs, node.inputs[::-1]):
        half = _producer(p, "Mul")
        if half is None or not _single_use(p):
            continue
        for c, a in (half.inputs, half.inputs[::-1]):
            add = _producer(a, "Add")
            if add is None or not _constant_is(ctx, c, 0.5) or not _single_use(a):
                continue
            for e, one in (add.inputs, add.inputs[::-1]):
                erf = _producer(e, "Erf")
                if erf is None or not _constant_is(ctx, one, 1.0) or not _single_use(e):
                    continue
                d = erf.inputs[0]
                scale = _producer(d, "Div") or _producer(d, "Mul")
                if scale is None or scale.inputs[0] is not x or not _single_use(d):
                    continue
                factor = math.sqrt(2.0) if scale.op_type == "Div" else 1.0 / math.sqrt(2.0)
                if _constant_is(ctx, scale.inputs[1], factor, rtol=1e-6):
                    return x, d, p
    return None


_LOG_INV_SQRT_PI = -0.5 * math.log(math.pi)


@register("Mul")
def mul(ctx, node, dy):
    a, b = node.inputs
    y = node.outputs[0]
    gelu = _gelu_parts(ctx, node)
    if gelu is not None:
        # GELU'(x) = Phi(x) + x phi(x). Phi = P is the forward pass's own parenthesis and, with
        # D = x / sqrt(2), x phi(x) = D exp(-D^2) / sqrt(pi) = D Exp(-ln(sqrt(pi)) - D D): six
        # activation-sized ops where the rules of the five nodes (and the sum of x's two
        # gradients) took ten. The other nodes of the pattern get no gradient and are skipped.
        x, d, p = gelu
        e = ctx.op("Exp", ctx.op("Sub", ctx.scalar(_LOG_INV_SQRT_PI), ctx.op("Mul", d, d)))
        local = ctx.op("Add", ctx.op("Mul", d, e), p)
        return [ctx.op("Mul", dy[0], local) if v is x else None for v in node.inputs]
    hard_swish = _hard_swish_parts(node)
    if hard_swish is not None:
        # A split HardSwish: its rule, with the forward's own HardSigmoid; that node gets no
        # gradient of its own and is skipped.
        x, h = hard_swish
        return [_hard_swish_grad(ctx, x, h, dy[0]) if v is x else None for v in node.inputs]
    silu = _silu_parts(node)
    if silu is not None:
        # One rule for both nodes: the product rule plus the Sigmoid rule took six activation-sized
        # ops (two products, 1 - S, two more products, the sum); this takes four. S gets no gradient
        # of its own, so the Sigmoid node is skipped.
        x, s = silu
        channels = ctx.blocked_channels(y)
        if channels is not None:
            # 1 - Y as a depthwise 1x1 Conv (weight -1, bias 1; the same single rounding), which
            # onnxruntime runs in its blocked NCHWc layout with the Muls and the Add around it; the
            # Sub of a scalar has no blocked kernel and cost two reorders per activation
            one_minus_y = ctx.channel_affine(y, channels, -1.0, 1.0)
        else:
            one_minus_y = ctx.op("Sub", ctx.scalar(1.0), y)
        local = ctx.op("Add", ctx.op("Mul", s, one_minus_y), y)
        return [ctx.op("Mul", dy[0], local) if v is x else None for v in node.inputs]
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
    """g where condition holds, else 0. Mul by a Cast mask: onnxruntime's CPU Where took 1.9x as
    long as Cast + Mul on activation-sized tensors."""
    return ctx.op("Mul", g, ctx.op("Cast", condition, to=ir.DataType.FLOAT))


@register("Relu")
def relu(ctx, node, dy):
    # Y > 0 exactly where X > 0; reading Y leaves X to its producer alone, so onnxruntime can
    # still fuse Conv + Relu in the forward part.
    y = node.outputs[0]
    if ctx.backprop == "deconvnet":  # the gradient's own sign decides, not the forward input
        return [ctx.op("Relu", dy[0])]
    g = ctx.op("Relu", dy[0]) if ctx.backprop == "guided" else dy[0]
    mask = _blocked_step(ctx, y)
    if mask is not None:
        return [ctx.op("Mul", g, mask)]
    return [_masked(ctx, g, ctx.op("Greater", y, _zero(ctx)))]


_HUGE = 2.0 ** 127  # largest power of two in float32


def _blocked_step(ctx, y):
    """[Y > 0] for Y >= 0 (a ReLU output) as a depthwise 1x1 Conv of weight 2^127 with a HardSigmoid
    of slope 2^127 (onnxruntime fuses the two), or ``None`` where that does not pay.

    Exact: the Conv gives 2^127 Y (exactly; +inf from Y >= 2), 0 for 0 and at least 2^-22 for
    the smallest subnormal; the HardSigmoid, clip(2^127 t, 0, 1), is 0 for 0 and 1 for t >= 2^-127.
    Why: the Conv keeps the mask in onnxruntime's blocked NCHWc layout, like the backward
    convolutions around it, so the masking Mul runs there too; Greater + Cast need plain NCHW,
    and each ReLU then cost three layout reorders (its output, the incoming and the outgoing
    gradient). Only for [N, C, H, W] with C a multiple of 16, where onnxruntime blocks both.
    """
    channels = ctx.blocked_channels(y)
    if channels is None:
        return None
    return ctx.op("HardSigmoid", ctx.channel_affine(y, channels, _HUGE), alpha=_HUGE, beta=0.0)


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
    return [_hard_swish_grad(ctx, x, ctx.op("HardSigmoid", x, alpha=HARD_SWISH_ALPHA, beta=0.5), dy[0])]


def _hard_swish_parts(node):
    """(X, H) when ``node`` is Mul(X, H) or Mul(H, X) with H = HardSigmoid(X, 1/6, 1/2) used by
    nothing else: a HardSwish, as the gradient pass splits it (gradient/_layout.py)."""
    for x, h in (node.inputs, node.inputs[::-1]):
        gate = _producer(h, "HardSigmoid")
        if (gate is not None and gate.inputs[0] is x and _single_use(h)
                and gate.attributes.get_float("alpha", 0.2) == HARD_SWISH_ALPHA
                and gate.attributes.get_float("beta", 0.5) == 0.5):
            return x, h
    return None


def _hard_swish_grad(ctx, x, h, g):
    """g times HardSwish'(x), given h = HardSigmoid(x, 1/6, 1/2).

    torch's hardswish_backward: 0 up to -3, x/3 + 1/2 strictly between -3 and 3, 1 from 3 on.
    That is a ramp minus two half steps: 2 h(x) - ([x > -3] + [x >= 3]) / 2 with
    h = clip(x/6 + 1/2, 0, 1). A HardSigmoid of slope 2^100 is an exact step: 2^100 x is exact and
    2^100 x + beta has the sign of x - step, at least 2^100 ulp away from 0 unless x is the step
    itself. Cheap elementwise ops instead of two Wheres (each 2.4x a Mul on onnxruntime's CPU
    provider), two compares, a product and a sum.
    """
    channels = ctx.blocked_channels(x)
    if channels is not None:
        # In onnxruntime's blocked NCHWc layout, where the convolutions around it run. Each half
        # step is one depthwise 1x1 Conv with a fused Clip: -2^100 (x - t) is exact in sign and,
        # unless x = t, at least 2^78 away from 0, so Clip(., -1/2, 0) gives -1/2 [x > t] exactly
        # (t = -3, and the float below 3 for [x >= 3]). 2 h is a Conv of weight 2 into which
        # onnxruntime folds the Add after it. Five activation-sized ops, two of them Adds, against
        # seven (three HardSigmoids, three Adds, a Conv): mobilenet_v3_large's shape [8, 240, 28,
        # 28], forward and backward with the convolutions around them, 12.9 -> 10.0 ms.
        low = ctx.op("Clip", ctx.channel_affine(x, channels, -_STEEP, -3.0 * _STEEP), ctx.scalar(-0.5), _zero(ctx))
        high = ctx.op("Clip", ctx.channel_affine(x, channels, -_STEEP, _STEEP * _BELOW_3), ctx.scalar(-0.5), _zero(ctx))
        local = ctx.op("Add", ctx.channel_affine(h, channels, 2.0), ctx.op("Add", low, high))
        return ctx.op("Mul", g, local)
    above_minus3 = ctx.op("HardSigmoid", x, alpha=_STEEP, beta=3.0 * _STEEP)
    from3 = ctx.op("HardSigmoid", x, alpha=_STEEP, beta=-_STEEP * _BELOW_3)
    steps = ctx.op("Add", above_minus3, from3)
    half_steps = ctx.op("Mul", steps, ctx.scalar(0.5))
    return ctx.op("Mul", g, ctx.op("Sub", ctx.op("Add", h, h), half_steps))


HARD_SWISH_ALPHA = float(np.float32(1.0 / 6.0))
_STEEP = 2.0 ** 100  # a power of two: alpha x is exact
_BELOW_3 = float(np.nextafter(np.float32(3.0), np.float32(0.0)))  # [x >= 3] = [x > this]


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
        from ..._errors import ExportError

        raise ExportError(f"{node.name}: float Mod with fmod=0 is invalid ONNX (float Mod needs fmod=1)")
    grad_b = None
    if ctx.needs_grad(b):
        quotient = ctx.op("Div", a, b)
        truncated = ctx.op("Mul", ctx.op("Sign", quotient), ctx.op("Floor", ctx.op("Abs", quotient)))
        grad_b = ctx.sum_to(ctx.op("Neg", ctx.op("Mul", dy[0], truncated)), y, b)
    return [ctx.sum_to(dy[0], y, a) if ctx.needs_grad(a) else None, grad_b]
