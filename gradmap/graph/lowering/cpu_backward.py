"""Lowering passes over the finished gradient graph for onnxruntime's CPU provider.

Each pass matches regions of the portable graph (one rule call each), checks a condition, and
replaces the region by a form onnxruntime's CPU provider runs faster; every replacement computes
the same values (tests/test_lowering.py compares each pass's gradient with the portable one's).
onnxruntime computes convolutions and the elementwise ops between them in a blocked NCHWc layout
of 16 channels (8 with AVX2) when the channel count is a multiple of the block; an op without a
blocked kernel puts a layout reorder on each side of itself. The passes, in order:

    fold_batch_norm      BatchNormalization -> Relu -> Conv, BN and Relu outputs read once:
                         Conv(dY, W') -> Conv(dY, W' * s), BN's dX = dY * s -> dY
                         (s = scale / sqrt(var + eps) per input channel, a row of W'; vanilla always,
                         guided and deconvnet only when every s > 0, since their Relu of the gradient
                         does not commute with a negative scale)
    conv_adjoint         strided depthwise Conv: the zero insertion by Resize and a 0/1 lattice;
                         strided dense Conv: Conv(Z(dY), W') or the patch form (1x1 Conv and
                         DepthToSpace) -> ConvTranspose(dY, W), followed by an
                         identity depthwise Conv into the layout (W from W' by the same in-graph ops,
                         folded at session creation: the file stores W once)
    relu_pool_mask       MaxPool(Relu(X)), the ReLU output pooled only: Route(dP) * [Y > 0] ->
                         Route(dP * [P > 0]), the mask at the pool's resolution (Route as in
                         max_pool_indices below; guided only for windows that share no input)
    max_pool_indices     MaxPool: window masks and ConvTranspose -> a MaxPool that returns Indices and
                         MaxUnpool(dY, Indices) (windows that share no input) or
                         ScatterElements(0, Indices, dY, add), then an identity depthwise Conv
    relu_mask            Relu (vanilla, guided): g * [Y > 0] -> g * HardSigmoid(Conv(Y, 2^127), 2^127, 0)
    hard_swish_steps     HardSwish: the half steps [X > t] / 2 -> Clip(Conv(X, -2^100, bias), -1/2, 0)
    silu_affine          SiLU: 1 - Y -> Conv(Y, -1, bias 1)
    resize_sum_scale     Resize: AveragePool(dY) * s_h s_w -> Conv(AveragePool(dY), s_h s_w)
    spread_per_channel   Expand of a per-channel gradient [N, C, 1, 1] to [N, C, H, W] -> a depthwise
                         Conv with an all-ones H x W kernel and pads H-1, W-1; a per-channel
                         contribution added to a full one -> added after a nearest Resize to H x W
    concat_split         Concat: a Slice of dY per input -> one Split of dY

The blocked forms (a depthwise 1x1 Conv, HardSigmoid and Clip fused into it) apply only where the
channel count is a multiple of the block (:meth:`Rewriter.blocked_channels`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..gradient._context import Region
from ..gradient._match import producer, single_use
from ..gradient.formulas import HARD_SWISH_ALPHA, adjoint_conv, batch_norm_factor, flipped_transposed
from ._rewrite import Rewriter

__all__ = ["PASSES"]

def _regions(regions: list[Region], *kinds: str):
    return [r for r in regions if r.kind in kinds and r.nodes]


def _published_node(region: Region, part: str) -> ir.Node | None:
    """The node that computes the value the region's rule published as ``part``, while it is in
    the graph."""
    value = region.parts.get(part)
    node = value.producer() if value is not None else None
    return node if node is not None and node.graph is not None else None


# -- BatchNormalization -> Relu -> Conv ------------------------------------------------------------
def _adjoint(region: Region) -> ir.Node | None:
    """The Conv of a Conv region's rule: the adjoint convolution with the flipped kernel
    (``None`` for the patch form)."""
    return _published_node(region, "adjoint")


def _patches(region: Region) -> bool:
    """The Conv rule's form for windows that do not overlap (a 1x1 Conv and DepthToSpace)."""
    return _published_node(region, "patches") is not None


def fold_batch_norm(rw: Rewriter, regions: list[Region]) -> int:
    by_node = {(r.backprop, r.node): r for r in _regions(regions, "BatchNormalization")}
    done = 0
    for region in _regions(regions, "Conv"):
        adjoint = _adjoint(region)
        if adjoint is None or _patches(region):
            continue  # the patch form's kernel rows are taps, not input channels
        node, x = region.node, region.node.inputs[0]
        relu = producer(x, "Relu")
        if relu is None or not single_use(x, rw.forward_nodes) or x in rw.keep:
            continue
        bn = producer(relu.inputs[0], "BatchNormalization")
        if bn is None or not single_use(relu.inputs[0], rw.forward_nodes) or relu.inputs[0] in rw.keep:
            continue
        bn_region = by_node.get((region.backprop, bn))
        factor = batch_norm_factor(rw, bn)
        if bn_region is None or factor is None or factor.size != rw.dims(x)[1]:
            continue
        if region.backprop != "vanilla" and not np.all(factor > 0):
            continue
        # the adjoint kernel W' [Cin, Cout/g, *k] has one row per input channel of the forward Conv
        rw.node = node
        flipped = adjoint.inputs[1]
        spatial = len(rw.dims(x)) - 2
        scaled = rw.op("Mul", flipped, rw.const(factor.astype(np.float32).reshape(-1, *([1] * (1 + spatial)))))
        rw.insert_before(region, adjoint)
        adjoint.replace_input_with(1, scaled)
        rw.replace(bn_region, [rw.inputs_of(bn_region)[0]] + [None] * 4)
        done += 1
    return done


# -- Conv ------------------------------------------------------------------------------------------
def conv_adjoint(rw: Rewriter, regions: list[Region]) -> int:
    """The portable rule's stride-1 form is already onnxruntime's fastest; strided convolutions
    change: a depthwise one zero-inserts by Resize and a 0/1 lattice, a dense one becomes
    ConvTranspose, which onnxruntime runs as one GEMM + col2im per image and group where the
    zero-inserted convolution would multiply s^2 times as many zeros."""
    done = 0
    for region in _regions(regions, "Conv"):
        adjoint, patches = _adjoint(region), _patches(region)
        node = region.node
        if (adjoint is None and not patches) or all(s == 1 for s in rw.attr(node, "strides", [1])):
            continue
        x = node.inputs[0]
        xdims, ydims, wdims = rw.dims(x), rw.dims(node.outputs[0]), rw.dims(node.inputs[1])
        spatial = len(xdims) - 2
        kernel = list(rw.attr(node, "kernel_shape", wdims[2:]))
        strides = list(rw.attr(node, "strides", [1] * spatial))
        dilations = list(rw.attr(node, "dilations", [1] * spatial))
        pads = list(rw.attr(node, "pads", [0] * (2 * spatial)))
        group = rw.attr(node, "group", 1)
        flipped = adjoint.inputs[1] if not patches else None
        dy = rw.inputs_of(region)[0]
        rw.node = node
        if group == xdims[1] == ydims[1] and spatial == 2 and not patches:
            g = _zero_insert(rw, dy, ydims, strides)
            inserted = [ydims[2 + i] * strides[i] for i in range(spatial)]
            dx, _ = adjoint_conv(rw, g, flipped, kernel, group, dilations, pads, list(xdims[2:]), inserted)
        else:
            span = [(k - 1) * d for k, d in zip(kernel, dilations)]
            output_padding = [xdims[2 + i] - ((ydims[2 + i] - 1) * strides[i] - pads[i] - pads[spatial + i]
                                              + span[i] + 1) for i in range(spatial)]
            if any(p < 0 or p >= max(s, d) for p, s, d in zip(output_padding, strides, dilations)):
                rw.tape = ir.tape.Tape()
                continue
            # the forward-layout kernel: W itself after the patch form, else W' flipped back (W, or
            # the BN-scaled W)
            weight = node.inputs[1] if patches else flipped_transposed(
                rw, flipped, (wdims[1] * group, wdims[0] // group, *kernel), group)
            dx = rw.op("ConvTranspose", dy, weight, group=group, strides=strides, pads=pads, dilations=dilations,
                       kernel_shape=kernel, output_padding=output_padding)
            dx = rw.blocked(dx, x)
        rw.replace(region, [dx, None, None])
        done += 1
    return done


def _zero_insert(rw, g, ydims, strides):
    """[N, C, H, W] -> [N, C, H*sh, W*sw] with each value followed by s-1 zeros along each axis.

    Nearest-neighbour upsampling times a 0/1 lattice: on onnxruntime's CPU provider this measured
    2.4x faster than Pad on a [N, C, H, 1, W, 1] view and 1.8x faster than Pad + DepthToSpace.
    For integer scales, asymmetric coordinates with floor rounding pick the same source pixels as
    the default half_pixel / round_prefer_floor, and onnxruntime runs them on a faster path.
    """
    h, w = ydims[2], ydims[3]
    sh, sw = strides
    up = rw.op("Resize", g, None, rw.const(np.asarray([1, 1, sh, sw], dtype=np.float32)), mode="nearest",
               coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    lattice = np.zeros((1, 1, h * sh, w * sw), dtype=np.float32)
    lattice[:, :, ::sh, ::sw] = 1
    return rw.op("Mul", up, rw.const(lattice))


# -- MaxPool ---------------------------------------------------------------------------------------
def _disjoint_windows(rw, node) -> bool:
    """Whether no two pooling windows share an input element (stride >= dilated kernel span, as
    VGG's 2x2 stride-2 pools): each input then receives at most one output's gradient."""
    kernel = list(rw.attr(node, "kernel_shape"))
    spatial = len(kernel)
    strides = list(rw.attr(node, "strides", [1] * spatial))
    dilations = list(rw.attr(node, "dilations", [1] * spatial))
    return all(s >= (k - 1) * d + 1 for k, s, d in zip(kernel, strides, dilations))


def _route_max(rw: Rewriter, node: ir.Node, dy: ir.Value) -> ir.Value:
    """dY of MaxPool ``node`` routed to the first maximum of each window by onnxruntime's Indices,
    entering the blocked layout (the emitted nodes; ``rw.node`` set by the caller)."""
    x = node.inputs[0]
    attributes = {name: a.value for name, a in node.attributes.items()}
    _, indices = rw.op_multi("MaxPool", x, num_outputs=2, **attributes)
    indices.type = ir.TensorType(ir.DataType.INT64)
    indices.shape = ir.Shape(node.outputs[0].shape)
    if _disjoint_windows(rw, node):
        spatial = rw.rank(x) - 2
        dx = rw.op("MaxUnpool", dy, indices, rw.shape_of(x), kernel_shape=list(rw.attr(node, "kernel_shape")),
                   strides=list(rw.attr(node, "strides", [1] * spatial)),
                   pads=list(rw.attr(node, "pads", [0] * (2 * spatial))))
    else:
        size = rw.op("Reshape", rw.op("Size", x), rw.ints([1]))
        zeros = rw.op("ConstantOfShape", size, value=ir.tensor(np.zeros(1, dtype=np.float32)))
        flat = rw.op("ScatterElements", zeros, rw.op("Reshape", indices, rw.ints([-1])),
                     rw.op("Reshape", dy, rw.ints([-1])), axis=0, reduction="add")
        dx = rw.reshape_like(flat, x)
    return rw.blocked(dx, x)


def _routed(region: Region) -> bool:
    return any(n.op_type in ("MaxUnpool", "ScatterElements") and n.graph is not None for n in region.nodes)


def max_pool_indices(rw: Rewriter, regions: list[Region]) -> int:
    """onnxruntime's MaxPool returns the first maximum's flat index over N*C*H*W, as the portable
    masks route it. The forward MaxPool keeps its single output (a second one computes Indices):
    onnxruntime has no blocked MaxPool with Indices, and a forward MaxPool in plain layout took the
    ops after it out of the blocked layout too."""
    done = 0
    for region in _regions(regions, "MaxPool"):
        if _routed(region):  # relu_pool_mask routed it already
            continue
        rw.node = region.node
        rw.replace(region, [_route_max(rw, region.node, rw.inputs_of(region)[0])])
        done += 1
    return done


# -- activations -----------------------------------------------------------------------------------
_HUGE = 2.0 ** 127  # largest power of two in float32
_STEEP = 2.0 ** 100  # a power of two: alpha x is exact
_BELOW_3 = float(np.nextafter(np.float32(3.0), np.float32(0.0)))  # [x >= 3] = [x > this]


def relu_mask(rw: Rewriter, regions: list[Region]) -> int:
    """[Y > 0] for Y >= 0 (a ReLU output) as a depthwise 1x1 Conv of weight 2^127 with a
    HardSigmoid of slope 2^127 (onnxruntime fuses the two).

    Exact: the Conv gives 2^127 Y (exactly; +inf from Y >= 2), 0 for 0 and at least 2^-22 for the
    smallest subnormal; the HardSigmoid, clip(2^127 t, 0, 1), is 0 for 0 and 1 for t >= 2^-127.
    Greater + Cast need plain NCHW, and each ReLU then cost three layout reorders (its output, the
    incoming and the outgoing gradient). Engines that compute HardSigmoid in another way (OpenVINO
    2026.4) get this wrong: the portable graph keeps the comparison."""
    done = 0
    for region in _regions(regions, "Relu"):
        y = region.node.outputs[0]
        channels = rw.blocked_channels(y)
        if region.backprop == "deconvnet" or channels is None:
            continue
        dy = rw.inputs_of(region)[0]
        rw.node = region.node
        g = rw.op("Relu", dy) if region.backprop == "guided" else dy
        rw.replace(region, [rw.op("Mul", g, _positive(rw, y, channels))])
        done += 1
    return done


def _positive(rw: Rewriter, y: ir.Value, channels: int) -> ir.Value:
    """[Y > 0] for Y >= 0 in the blocked layout (see :func:`relu_mask`)."""
    return rw.op("HardSigmoid", rw.channel_affine(y, channels, _HUGE), alpha=_HUGE, beta=0.0)


def _relu_into(rw: Rewriter, pool: Region, relus: list[Region]) -> Region | None:
    """The Relu region whose output is ``pool``'s input and whose only received gradient is the
    gradient ``pool`` returns (the pool is the ReLU output's one consumer, and that gradient is no
    graph output: Grad-CAM keeps none at a ReLU output that is pooled)."""
    x, dx = pool.node.inputs[0], pool.grad_inputs[0]
    if dx is None or dx.is_graph_output() or x in rw.keep:
        return None
    for relu in relus:
        if relu.node.outputs[0] is not x or rw.current(relu.grad_outputs[0]) is not rw.current(dx):
            continue
        inside = set(relu.nodes)
        return relu if all(use.node in inside for use in rw.current(dx).uses()) else None
    return None


def relu_pool_mask(rw: Rewriter, regions: list[Region]) -> int:
    """MaxPool(Relu(X)), the pool the ReLU output's one consumer (VGG's five pools, a ResNet's
    stem): the ReLU's mask applied to the pool's gradient dP at the pool's resolution, before the
    routing, instead of to the routed gradient at the ReLU's (four times as many elements for a 2x2
    pool): dX = Route(dP * [P > 0]).

    Exact: the routing sends dP[j] to the first maximum i of window j, where Y[i] = P[j], so
    [Y[i] > 0] = [P[j] > 0], and every other element of dY is 0 either way. Guided backprop's
    Relu(dY) commutes with the routing only where windows share no input (a sum of routed values is
    not routed Relus), so guided takes this form only there; deconvnet (no mask) never."""
    relus = _regions(regions, "Relu")
    done = 0
    for pool in _regions(regions, "MaxPool"):
        relu = _relu_into(rw, pool, relus)
        p = pool.node.outputs[0]
        channels = rw.blocked_channels(p)
        if relu is None or channels is None or relu.backprop == "deconvnet" or _routed(pool):
            continue
        if relu.backprop == "guided" and not _disjoint_windows(rw, pool.node):
            continue
        rw.node = pool.node
        dp = rw.inputs_of(pool)[0]
        g = rw.op("Relu", dp) if relu.backprop == "guided" else dp
        rw.replace(pool, [_route_max(rw, pool.node, rw.op("Mul", g, _positive(rw, p, channels)))])
        rw.replace(relu, [rw.inputs_of(relu)[0]])  # the routed gradient is the ReLU input's already
        done += 1
    return done


def hard_swish_steps(rw: Rewriter, regions: list[Region]) -> int:
    """HardSwish'(x) = 2 h(x) - ([x > -3] + [x >= 3]) / 2 with each half step one depthwise 1x1
    Conv with a fused Clip: -2^100 (x - t) is exact in sign and, unless x = t, at least 2^78 away
    from 0, so Clip(., -1/2, 0) gives -1/2 [x > t] exactly (t = -3, and the float below 3 for
    [x >= 3]). 2 h is a Conv of weight 2 into which onnxruntime folds the Add after it: five
    activation-sized ops in the blocked layout."""
    done = 0
    for region in _regions(regions, "HardSwish"):
        node = region.node
        x = region.parts.get("x", node.inputs[0])
        channels = rw.blocked_channels(x)
        if channels is None:
            continue
        dy = rw.inputs_of(region)[0]
        rw.node = node
        h = region.parts.get("h")
        if h is None:
            h = rw.op("HardSigmoid", x, alpha=HARD_SWISH_ALPHA, beta=0.5)
        zero = rw.scalar(0.0)
        low = rw.op("Clip", rw.channel_affine(x, channels, -_STEEP, -3.0 * _STEEP), rw.scalar(-0.5), zero)
        high = rw.op("Clip", rw.channel_affine(x, channels, -_STEEP, _STEEP * _BELOW_3), rw.scalar(-0.5), zero)
        local = rw.op("Add", rw.channel_affine(h, channels, 2.0), rw.op("Add", low, high))
        dx = rw.op("Mul", dy, local)
        rw.replace(region, [dx if v is x else None for v in node.inputs])
        done += 1
    return done


def silu_affine(rw: Rewriter, regions: list[Region]) -> int:
    """1 - Y as a depthwise 1x1 Conv (weight -1, bias 1; the same single rounding), which
    onnxruntime runs in its blocked layout with the Muls and the Add around it; the Sub of a
    scalar has no blocked kernel and cost two reorders per activation."""
    done = 0
    for region in _regions(regions, "SiLU"):
        node = region.node
        x, s, y = region.parts["x"], region.parts["s"], node.outputs[0]
        channels = rw.blocked_channels(y)
        if channels is None:
            continue
        dy = rw.inputs_of(region)[0]
        rw.node = node
        local = rw.op("Add", rw.op("Mul", s, rw.channel_affine(y, channels, -1.0, 1.0)), y)
        dx = rw.op("Mul", dy, local)
        rw.replace(region, [dx if v is x else None for v in node.inputs])
        done += 1
    return done


def resize_sum_scale(rw: Rewriter, regions: list[Region]) -> int:
    """The block sum's scale as a depthwise 1x1 Conv after the pool (both blocked)."""
    done = 0
    for region in _regions(regions, "Resize"):
        node = region.node
        x = node.inputs[0]
        channels = rw.blocked_channels(x)
        pooled, factor = region.parts.get("pooled"), region.parts.get("factor")
        if channels is None or pooled is None:
            continue  # not the nearest rule's block sum
        rw.node = node
        dx = rw.channel_affine(pooled, channels, float(rw.constant_of(factor).reshape(())))
        rw.replace(region, [dx] + [None] * (len(node.inputs) - 1))
        done += 1
    return done


def spread_per_channel(rw: Rewriter, regions: list[Region]) -> int:
    """A per-channel gradient [N, C, 1, 1] of a blocked [N, C, H, W] value, spread to H x W.

    As the whole gradient: a depthwise Conv with an all-ones H x W kernel and pads H-1, W-1 (each
    output is the one input value times 1, exact), so the backward convolutions that follow (a
    ResNet's whole residual trunk) need no layout reorders. Added to another contribution: a
    nearest Resize, which onnxruntime keeps in the blocked layout with a same-shape Add, where a
    broadcasting Add would take the full gradient out of it and back."""
    done = 0
    for region in _regions(regions, "Expand", "Accumulate"):
        like = region.like
        channels = rw.blocked_channels(like)
        per_channel = rw.current(region.parts.get("per_channel"))
        if channels is None or per_channel is None or not all(isinstance(d, int) for d in rw.dims(like)[2:]):
            continue
        height, width = rw.dims(like)[2:]
        if region.kind == "Expand":
            total = rw.op("Conv", per_channel, rw.const(np.ones((channels, 1, height, width), dtype=np.float32)),
                          group=channels, kernel_shape=[height, width], pads=[height - 1, width - 1, height - 1, width - 1])
        else:
            a, b = rw.inputs_of(region)
            spread = rw.op("Resize", per_channel, None, rw.const(np.asarray([1, 1, height, width], dtype=np.float32)),
                           mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
            spread.shape, spread.type = ir.Shape(like.shape), like.type
            total = rw.op("Add", *(spread if v is per_channel else v for v in (a, b)))
        rw.replace(region, [total])
        done += 1
    return done


# -- Concat ----------------------------------------------------------------------------------------
def concat_split(rw: Rewriter, regions: list[Region]) -> int:
    """A Concat's input gradients as one Split of dY instead of a Slice each: one pass over dY
    (a DenseNet concatenates every earlier layer's output, 5 to 48 inputs). Split has no blocked
    kernel either, so this is about reading dY once."""
    done = 0
    for region in _regions(regions, "Concat"):
        node = region.node
        if sum(g is not None for g in region.grad_inputs) < 2:
            continue
        axis = rw.attr(node, "axis") % rw.rank(node.outputs[0])
        sizes = [rw.dims(x)[axis] for x in node.inputs]
        rw.node = node
        parts = rw.op_multi("Split", rw.inputs_of(region)[0], rw.ints(sizes), num_outputs=len(sizes), axis=axis)
        rw.replace(region, [p if g is not None else None for p, g in zip(parts, region.grad_inputs)])
        done += 1
    return done


#: The CPU lowering's backward passes, in the order they run.
PASSES = (fold_batch_norm, conv_adjoint, relu_pool_mask, max_pool_indices, relu_mask, hard_swish_steps, silu_affine,
          resize_sum_scale, spread_per_channel, concat_split)
