"""Convolutions.

    Conv:  dX = ConvTranspose(dY, W) with the same group, strides, pads, dilations and the
           output_padding that restores X's spatial size (strided convolutions drop rows)
"""

from __future__ import annotations

from ..._errors import ExportError
from .._registry import register


@register("Conv")
def conv(ctx, node, dy):
    x, w = node.inputs[:2]
    if ctx.needs_grad(w) or (len(node.inputs) > 2 and ctx.needs_grad(node.inputs[2])):
        raise ExportError(f"{node.name}: Conv weights that depend on the input have no gradient rule")
    if ctx.attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ExportError(f"{node.name}: Conv with auto_pad={ctx.attr(node, 'auto_pad')} has no gradient rule")
    xdims, ydims, wdims = ctx.dims(x), ctx.dims(node.outputs[0]), ctx.dims(w)
    spatial = len(xdims) - 2
    kernel = list(ctx.attr(node, "kernel_shape", wdims[2:]))
    strides = list(ctx.attr(node, "strides", [1] * spatial))
    dilations = list(ctx.attr(node, "dilations", [1] * spatial))
    pads = list(ctx.attr(node, "pads", [0] * (2 * spatial)))
    group = ctx.attr(node, "group", 1)
    if not all(isinstance(d, int) for d in xdims[2:] + ydims[2:]):
        raise ExportError(f"{node.name}: Conv needs static spatial sizes, got {xdims} -> {ydims}")
    span = [(k - 1) * d for k, d in zip(kernel, dilations)]
    output_padding = []
    for i in range(spatial):
        full = (ydims[2 + i] - 1) * strides[i] - pads[i] - pads[spatial + i] + span[i] + 1
        output_padding.append(xdims[2 + i] - full)
    if any(p < 0 or p >= max(s, d) for p, s, d in zip(output_padding, strides, dilations)):
        raise ExportError(f"{node.name}: cannot restore input size {xdims} from {ydims}")
    dx = ctx.op("ConvTranspose", dy[0], w, group=group, strides=strides, pads=pads, dilations=dilations,
                kernel_shape=kernel, output_padding=output_padding)
    return [dx, None, None]
