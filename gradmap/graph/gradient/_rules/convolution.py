"""Convolutions.

    Conv:  W' = W with input and output channels swapped per group and the kernel flipped
           (Reshape, Transpose and a Slice with steps -1 of W itself, which engines fold into a
           constant when they load the model: the file stores W once)
           dX = Conv(Z(dY), W', pads (k-1)d - p), cropped to X's size, where Z inserts s-1 zeros
           after each value along each strided axis (Unsqueeze, Pad, Reshape) and is dY itself
           for stride 1 (W' and Conv from :mod:`..formulas`; the rule publishes the Conv's output
           as ``adjoint``)
    ConvTranspose: dX = Conv(dY, W, strides, dilations, pads, group)
    Col2Im: dX = im2col(dY) = Reshape(Conv(dY, one-hot kernels, group=C, strides, dilations, pads), [N, C k, L])

    Conv, 2-D, group 1, stride s in both axes, kernel <= s, dilation 1 (patches that do not overlap:
    a ViT's patch embedding, ConvNeXt's stem and downsampling, 1x1 strided shortcuts):
           dX = DepthToSpace(Conv(dY, W_p), s), cropped to X, with W_p [s s Cin, Cout, 1, 1] the
           kernel's taps (zero past k) by row (i s + j) Cin + c: each input pixel is one tap of one
           window, so the gradient is a per-position product, not a convolution over zeros (the
           rule publishes the Conv's output as ``patches``)

A convolution with the flipped kernel is the textbook adjoint and the op every engine runs
fastest; the adjoint reads the flipped kernel, a value of its own, never the forward's weight in
another layout (docs/engines.md lists the engine bugs this avoids).
"""

from __future__ import annotations

import numpy as np

from ...errors import ExportError
from .._registry import register
from ..formulas import adjoint_conv, flipped_transposed


def zero_insert(ctx, g, channels: int, sizes: list[int], strides: list[int]):
    """[N, C, *S] -> [N, C, *(S s)]: each value followed by s-1 zeros along each axis."""
    spatial = len(sizes)
    axes = [3 + 2 * i for i in range(spatial)]  # a new axis after each spatial axis
    g = ctx.op("Unsqueeze", g, ctx.ints(axes))
    rank = 2 + 2 * spatial
    pads = [0] * (2 * rank)
    for i, s in enumerate(strides):
        pads[rank + axes[i]] = s - 1
    g = ctx.op("Pad", g, ctx.ints(pads))
    return ctx.op("Reshape", g, ctx.ints([0, channels, *(n * s for n, s in zip(sizes, strides))]))


def patch_adjoint(ctx, g, w, wdims, stride: int, pads, xsizes, ysizes):
    """dX of a Conv whose windows do not overlap (see the module doc), and the 1x1 Conv of the taps
    (the value the rule publishes as ``patches``)."""
    c_out, c_in, kh, kw = wdims
    taps = w if (kh, kw) == (stride, stride) else ctx.op(
        "Pad", w, ctx.ints([0, 0, 0, 0, 0, 0, stride - kh, stride - kw]))
    taps = ctx.op("Reshape", ctx.op("Transpose", taps, perm=[2, 3, 1, 0]), ctx.ints([stride * stride * c_in, c_out, 1, 1]))
    patches = ctx.op("Conv", g, taps, kernel_shape=[1, 1])
    dx = ctx.op("DepthToSpace", patches, blocksize=stride, mode="DCR")
    full = [n * stride for n in ysizes]  # dX over the padded input, from its first row
    stops = [min(f, p + x) for f, p, x in zip(full, pads[:2], xsizes)]
    if any(pads[:2]) or stops != full:
        dx = ctx.op("Slice", dx, ctx.ints(pads[:2]), ctx.ints(stops), ctx.ints([2, 3]))
    missing = [p + x - stop for p, x, stop in zip(pads[:2], xsizes, stops)]
    if any(missing):  # rows past the last window get no gradient
        dx = ctx.op("Pad", dx, ctx.ints([0, 0, 0, 0, 0, 0, *missing]))
    return dx, patches


@register("Conv")
def conv(ctx, node, dy):
    x, w = node.inputs[:2]
    if ctx.needs_grad(w) or (len(node.inputs) > 2 and ctx.needs_grad(node.inputs[2])):
        raise ExportError(f"{node.name}: Conv weights that depend on the input have no gradient rule")
    if ctx.attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ExportError(f"{node.name}: Conv with auto_pad={ctx.attr(node, 'auto_pad')} has no gradient rule")
    xdims, ydims, wdims = ctx.dims(x), ctx.dims(node.outputs[0]), ctx.dims(w)
    spatial = len(xdims) - 2
    if not all(isinstance(d, int) for d in xdims[1:] + ydims[2:] + wdims):
        raise ExportError(f"{node.name}: Conv needs static channel, spatial and weight sizes, got {xdims} -> {ydims}")
    kernel = list(ctx.attr(node, "kernel_shape", wdims[2:]))
    strides = list(ctx.attr(node, "strides", [1] * spatial))
    dilations = list(ctx.attr(node, "dilations", [1] * spatial))
    pads = list(ctx.attr(node, "pads", [0] * (2 * spatial)))
    group = ctx.attr(node, "group", 1)
    if (spatial == 2 and group == 1 and strides[0] == strides[1] > 1 and dilations == [1, 1]
            and max(kernel) <= strides[0]):
        dx, patches = patch_adjoint(ctx, dy[0], w, wdims, strides[0], pads, list(xdims[2:]), list(ydims[2:]))
        ctx.publish(patches=patches)
        return [dx, None, None]
    g, gsizes = dy[0], list(ydims[2:])
    if any(s > 1 for s in strides):
        g = zero_insert(ctx, g, ydims[1], gsizes, strides)
        gsizes = [n * s for n, s in zip(gsizes, strides)]
    flipped = flipped_transposed(ctx, w, wdims, group)
    dx, adjoint = adjoint_conv(ctx, g, flipped, kernel, group, dilations, pads, list(xdims[2:]), gsizes)
    ctx.publish(adjoint=adjoint)
    return [dx, None, None]


@register("Col2Im")
def col2im(ctx, node, dy):
    """Col2Im (torch's fold): dX = Reshape(Conv(dY, E, group=C, strides, dilations, pads), [N, C k, L]),
    E [C k, 1, *block] one-hot kernels, one per block position (the im2col of dY, torch's unfold)."""
    block_shape = node.inputs[2]
    block = [int(b) for b in ctx.require_constant(block_shape, "Col2Im block_shape").reshape(-1)]
    channels = ctx.dims(node.outputs[0])[1]
    if not isinstance(channels, int):
        raise ExportError(f"{node.name}: Col2Im with a dynamic channel count has no gradient rule")
    positions = int(np.prod(block))
    spatial = len(block)
    eye = np.eye(positions, dtype=np.float32).reshape(positions, 1, *block)
    kernel = np.tile(eye, (channels, 1) + (1,) * spatial)
    patches = ctx.op("Conv", dy[0], ctx.const(kernel), group=channels, kernel_shape=block,
                     strides=list(ctx.attr(node, "strides", [1] * spatial)),
                     dilations=list(ctx.attr(node, "dilations", [1] * spatial)),
                     pads=list(ctx.attr(node, "pads", [0] * 2 * spatial)))
    return [ctx.op("Reshape", patches, ctx.ints([0, channels * positions, -1])), None, None]


@register("ConvTranspose")
def conv_transpose(ctx, node, dy):
    """ConvTranspose: dX = Conv(dY, W, strides, dilations, pads, group), the convolution whose adjoint
    the forward is (W [Cin, Cout/g, *k] is that convolution's kernel as it stands). The output
    padding only adds rows the convolution's windows skip again."""
    x, w = node.inputs[:2]
    if ctx.needs_grad(w) or (len(node.inputs) > 2 and ctx.needs_grad(node.inputs[2])):
        raise ExportError(f"{node.name}: ConvTranspose weights that depend on the input have no gradient rule")
    if ctx.attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ExportError(f"{node.name}: ConvTranspose with auto_pad={ctx.attr(node, 'auto_pad')} has no gradient rule")
    if ctx.attr(node, "output_shape", None) is not None:
        raise ExportError(f"{node.name}: ConvTranspose with output_shape has no gradient rule (give pads instead)")
    xdims, ydims, wdims = ctx.dims(x), ctx.dims(node.outputs[0]), ctx.dims(w)
    spatial = len(xdims) - 2
    if not all(isinstance(d, int) for d in xdims[1:] + ydims[2:] + wdims):
        raise ExportError(f"{node.name}: ConvTranspose needs static channel, spatial and weight sizes, "
                          f"got {xdims} -> {ydims}")
    kernel = list(ctx.attr(node, "kernel_shape", wdims[2:]))
    strides = list(ctx.attr(node, "strides", [1] * spatial))
    dilations = list(ctx.attr(node, "dilations", [1] * spatial))
    pads = list(ctx.attr(node, "pads", [0] * (2 * spatial)))
    group = ctx.attr(node, "group", 1)
    for i in range(spatial):
        size = (ydims[2 + i] + pads[i] + pads[spatial + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        if size != xdims[2 + i]:
            raise ExportError(f"{node.name}: ConvTranspose from {xdims} to {ydims}: its adjoint convolution gives "
                              f"{size} along axis {2 + i}, not {xdims[2 + i]}")
    dx = ctx.op("Conv", dy[0], w, kernel_shape=kernel, strides=strides, dilations=dilations, pads=pads, group=group)
    return [dx, None, None]
