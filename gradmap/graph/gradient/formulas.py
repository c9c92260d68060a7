"""The math that the gradient rules and the lowering passes share.

A lowering pass (:mod:`gradmap.graph.lowering`) rewrites a rule's region into another form of the
same vector-Jacobian product, and some of those forms are built from the rule's own pieces: the
adjoint convolution's flipped kernel, a batch normalization's per-channel factor, HardSwish's gate.
They live here, published, so that a rule and a pass compute them one way and a pass imports no
rule (tests/test_lowering.py checks that no lowering module imports ``gradient._rules``).

    HARD_SWISH_ALPHA        HardSwish(x) = x HardSigmoid(x, alpha=1/6 in float32, beta=1/2)
    batch_norm_factor       s = scale / sqrt(var + eps) per channel (inference mode, constants)
    flipped_transposed      W [Cout, Cin/g, *k] -> W' [Cin, Cout/g, *k], kernel flipped: the
                            adjoint convolution's kernel, computed from W in the graph
    adjoint_conv            Conv(g, W', pads (k-1)d - p), cropped to X's spatial sizes

Each function that emits nodes takes a :class:`~gradmap.graph.gradient._builder.Builder` (a rule's
context or a lowering's rewriter) as its first argument.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["HARD_SWISH_ALPHA", "adjoint_conv", "batch_norm_factor", "flipped_transposed"]

_INT64_MIN = int(np.iinfo(np.int64).min)

#: HardSigmoid's slope in HardSwish(x) = x HardSigmoid(x, 1/6, 1/2), as ONNX's HardSwish computes it.
HARD_SWISH_ALPHA = float(np.float32(1.0 / 6.0))


def batch_norm_factor(builder, node: ir.Node) -> np.ndarray | None:
    """scale / sqrt(var + eps) (float64, one per channel) of an inference BatchNormalization with
    constant parameters, else None."""
    if builder.attr(node, "training_mode", 0) or len(node.inputs) < 5:
        return None
    scale_np, var_np = builder.constant_of(node.inputs[1]), builder.constant_of(node.inputs[4])
    if scale_np is None or var_np is None:
        return None
    eps = builder.attr(node, "epsilon", 1e-5)
    return scale_np.astype(np.float64) / np.sqrt(var_np.astype(np.float64) + eps)


def flipped_transposed(builder, weight: ir.Value, wdims: tuple, group: int) -> ir.Value:
    """W [Cout, Cin/g, *k] -> W' [Cin, Cout/g, *k], the kernel of the adjoint convolution, computed
    from W in the graph. Applied to W' (with W' dims and the same group) it gives W back."""
    c_out, c_in_g, kernel = wdims[0], wdims[1], list(wdims[2:])
    spatial = len(kernel)
    if group == 1:
        w = builder.op("Transpose", weight, perm=[1, 0, *range(2, 2 + spatial)])
    elif c_in_g == 1 and c_out == group:
        w = weight  # depthwise: [C, 1, *k] is its own transpose
    else:
        w = builder.op("Reshape", weight, builder.ints([group, c_out // group, c_in_g, *kernel]))
        w = builder.op("Transpose", w, perm=[0, 2, 1, *range(3, 3 + spatial)])
        w = builder.op("Reshape", w, builder.ints([group * c_in_g, c_out // group, *kernel]))
    axes = list(range(2, 2 + spatial))
    return builder.op("Slice", w, builder.ints([-1] * spatial), builder.ints([_INT64_MIN] * spatial),
                      builder.ints(axes), builder.ints([-1] * spatial))


def adjoint_conv(builder, g: ir.Value, flipped: ir.Value, kernel, group: int, dilations, pads, xsizes,
                 gsizes) -> tuple[ir.Value, ir.Value]:
    """Conv of ``g`` (spatial sizes ``gsizes``, dY or its zero insertion) with the flipped kernel,
    with the begin pads of the adjoint and the end pads that give X's sizes; where a pad would be
    negative (a forward pad larger than the kernel's span), it is 0 and the rows are cropped.

    Returns dX and the convolution's output (dX itself when nothing is cropped): the value a rule
    publishes as its region's ``adjoint``, whose kernel a lowering pass may rescale."""
    spatial = len(kernel)
    span = [(k - 1) * d for k, d in zip(kernel, dilations)]
    begin = [span[i] - pads[i] for i in range(spatial)]
    end = [xsizes[i] - gsizes[i] - begin[i] + span[i] for i in range(spatial)]
    conv = builder.op("Conv", g, flipped, group=group, dilations=dilations, kernel_shape=kernel,
                      pads=[max(b, 0) for b in begin] + [max(e, 0) for e in end], strides=[1] * spatial)
    dx = conv
    if min(begin + end) < 0:
        starts = [max(-b, 0) for b in begin]
        dx = builder.op("Slice", conv, builder.ints(starts), builder.ints([s + n for s, n in zip(starts, xsizes)]),
                        builder.ints(list(range(2, 2 + spatial))))
    return dx, conv
