"""Ops that move values around without arithmetic.

    Reshape, Flatten, Squeeze, Unsqueeze: dX = Reshape(dY, Shape(X))
    Transpose:  dX = Transpose(dY, inverse(perm))
    Expand:     dX = sum_to(dY, X)
    Concat:     dX_i = Slice(dY, offset_i, offset_i + size_i, axis)
    Split:      dX = Concat(dY_i or zeros, axis)
    Slice:      dX = Pad(dY, starts, size - ends); step k > 1: zeros interleaved first; the whole of a
                dynamic axis (start 0, step 1, end INT32 max or more) is the identity there
    Gather:     dX = ScatterND(zeros, indices, dY, reduction=add) along axis; a scalar index i: dY in
                row i and 0 elsewhere (Pad), and the rows of several such Gathers of one tensor are
                concatenated when they cover its axis (GradContext.part)
    Pad:        constant mode: dX = Slice(dY, pads_begin, -pads_end), zeros where negative pads
                cropped; reflect, edge and wrap: per padded axis, the centre of dY plus each border
                folded back onto its sources
    ScatterND:  dData = ScatterND(dY, indices, 0), dUpdates = GatherND(dY, indices)
    GatherND:   dX = ScatterND(zeros, indices, dY, reduction=add)
    Tile:       dX = sum over the tiles of dY
    DepthToSpace: DCR: dX = SpaceToDepth(dY, b); CRD: the inverse Reshape-Transpose-Reshape of dY
    SpaceToDepth: dX = DepthToSpace(dY, b, DCR)
    GatherElements: dX = ScatterElements(zeros, indices, dY, axis, reduction=add)
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...errors import ExportError
from .._registry import register

_INT64_MAX = np.iinfo(np.int64).max
#: A Slice end this large on an axis of unknown size (the batch) means "to the end": torch.onnx writes
#: INT64 max, tf2onnx INT32 max (a TensorFlow strided_slice's end_mask, as Keras' Cropping2D has on the
#: batch axis); an axis longer than 2**31 - 1 could not hold pictures in memory.
_TO_THE_END = np.iinfo(np.int32).max


@register("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx, node, dy):
    return [ctx.reshape_like(dy[0], node.inputs[0]), None]


@register("Transpose")
def transpose(ctx, node, dy):
    rank = ctx.rank(node.inputs[0])
    perm = list(ctx.attr(node, "perm", list(reversed(range(rank)))))
    inverse = [0] * rank
    for i, p in enumerate(perm):
        inverse[p] = i
    return [ctx.op("Transpose", dy[0], perm=inverse)]


@register("Expand")
def expand(ctx, node, dy):
    return [ctx.sum_to(dy[0], node.outputs[0], node.inputs[0]), None]


@register("Concat")
def concat(ctx, node, dy):
    rank = ctx.rank(node.outputs[0])
    axis = ctx.attr(node, "axis") % rank
    sizes = [ctx.dims(x)[axis] for x in node.inputs]
    if not all(isinstance(s, int) for s in sizes):
        raise ExportError(f"{node.name}: Concat along a dynamic axis has no gradient rule")
    starts = np.cumsum([0, *sizes[:-1]]).tolist()
    return [ctx.op("Slice", dy[0], ctx.ints([start]), ctx.ints([start + size]), ctx.ints([axis]))
            if ctx.needs_grad(x) else None for x, start, size in zip(node.inputs, starts, sizes)]


@register("Split")
def split(ctx, node, dy):
    axis = ctx.attr(node, "axis", 0)
    parts = [g if g is not None else ctx.zeros_like(y) for g, y in zip(dy, node.outputs)]
    return [ctx.op("Concat", *parts, axis=axis), None]


@register("Slice")
def slice_(ctx, node, dy):
    x = node.inputs[0]
    dims = ctx.dims(x)
    rank = len(dims)
    starts = ctx.require_constant(node.inputs[1], "Slice starts").reshape(-1)
    ends = ctx.require_constant(node.inputs[2], "Slice ends").reshape(-1)
    axes = (ctx.require_constant(node.inputs[3], "Slice axes").reshape(-1)
            if len(node.inputs) > 3 and node.inputs[3] is not None else np.arange(len(starts)))
    steps = (ctx.require_constant(node.inputs[4], "Slice steps").reshape(-1)
             if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(len(starts), dtype=np.int64))
    g = dy[0]
    out_dims = list(ctx.dims(node.outputs[0]))
    pads = [0] * (2 * rank)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % rank
        size = dims[axis]
        if not isinstance(size, int):
            if start == 0 and end >= _TO_THE_END and step == 1:
                continue  # the whole dynamic axis: the identity there
            raise ExportError(f"{node.name}: Slice of the dynamic axis {axis} (start {int(start)}, end {int(end)}, "
                              f"step {int(step)}) has no gradient rule; only the whole axis (start 0, step 1, end "
                              f"at least {_TO_THE_END}) has one")
        if step == 0:
            raise ExportError(f"{node.name}: Slice with step 0 is not valid ONNX")
        begin, stop, _ = slice(int(start), int(end) if end < _INT64_MAX else None, int(step)).indices(size)
        count = len(range(begin, stop, int(step)))
        if count == 0:
            raise ExportError(f"{node.name}: empty Slice has no gradient rule")
        if step < 0:
            # x[begin::step] taken backwards (a flip when step is -1): reversing dy makes it the
            # gradient of the forward slice x[last::-step] from the smallest index taken
            g = ctx.op("Slice", g, ctx.ints([-1]), ctx.ints([-_INT64_MAX]), ctx.ints([axis]), ctx.ints([-1]))
            begin, step = begin + (count - 1) * int(step), -int(step)
        if step > 1:
            # x[begin::step]: every gradient value followed by step-1 zeros, then padded into place
            g, out_dims = _interleave_zeros(ctx, g, out_dims, axis, int(step))
            taken = count * int(step)
            if taken > size - begin:  # the last value's trailing zeros reach past the input
                taken = size - begin
                g = ctx.op("Slice", g, ctx.ints([0]), ctx.ints([taken]), ctx.ints([axis]))
                out_dims[axis] = taken
        else:
            taken = count
        pads[axis] = begin
        pads[rank + axis] = size - begin - taken
    if not any(pads):
        return [g]
    return [ctx.op("Pad", g, ctx.ints(pads))]


def _interleave_zeros(ctx, g, dims, axis, step):
    """Along ``axis`` of size n: [a, b, ...] -> [a, 0 x (step-1), b, 0 x (step-1), ...] (n*step long)."""
    n = dims[axis]
    expanded = list(dims[:axis + 1]) + [1] + list(dims[axis + 1:])
    shape = [0 if not isinstance(d, int) else d for d in expanded]
    g = ctx.op("Reshape", g, ctx.ints(shape))
    pads = [0] * (2 * len(expanded))
    pads[len(expanded) + axis + 1] = step - 1
    g = ctx.op("Pad", g, ctx.ints(pads))
    new_dims = list(dims)
    new_dims[axis] = n * step
    g = ctx.op("Reshape", g, ctx.ints([0 if not isinstance(d, int) else d for d in new_dims]))
    return g, new_dims


@register("Gather")
def gather(ctx, node, dy):
    data, indices = node.inputs
    dims = ctx.dims(data)
    rank = len(dims)
    axis = ctx.attr(node, "axis", 0) % rank
    size = dims[axis]
    const = ctx.constant_of(indices)
    if const is not None and const.ndim == 0 and isinstance(size, int):
        # x[..., i, ...]: put the gradient back in row i
        index = int(const) % size
        g = ctx.op("Unsqueeze", dy[0], ctx.ints([axis]))
        return [ctx.part(g, data, axis, index), None]
    # General case, dynamic shapes included: bring the gathered axis to the front, scatter-add
    # the rows of dY (duplicate indices accumulate), and move the axis back.
    index_rank = ctx.rank(indices)
    out_rank = rank - 1 + index_rank
    # dY dims are data[:axis] + indices + data[axis+1:]; move the index dims to the front
    perm = list(range(axis, axis + index_rank)) + list(range(axis)) + list(range(axis + index_rank, out_rank))
    g = ctx.op("Transpose", dy[0], perm=perm) if perm != list(range(out_rank)) else dy[0]
    rest_perm = [axis] + [i for i in range(rank) if i != axis]
    rest = [dims[i] for i in rest_perm[1:]]
    if all(isinstance(d, int) for d in [size, *rest]):
        axis_size, rows_shape, zeros_shape = ctx.ints([size]), ctx.ints([-1, *rest]), ctx.ints([size, *rest])
    else:  # shapes computed in the graph
        data_shape = ctx.op("Shape", data)
        axis_size = ctx.op("Gather", data_shape, ctx.ints([axis]))
        rest_shape = ctx.op("Gather", data_shape, ctx.ints(rest_perm[1:]))
        rows_shape = ctx.op("Concat", ctx.ints([-1]), rest_shape, axis=0)
        zeros_shape = ctx.op("Concat", axis_size, rest_shape, axis=0)
    g = ctx.op("Reshape", g, rows_shape)
    idx = ctx.op("Reshape", indices, ctx.ints([-1, 1]))
    if indices.dtype != ir.DataType.INT64:
        idx = ctx.op("Cast", idx, to=ir.DataType.INT64)
    idx = ctx.op("Where", ctx.op("Less", idx, ctx.const(np.int64(0))), ctx.op("Add", idx, axis_size), idx)
    zeros = ctx.op("ConstantOfShape", zeros_shape, value=ir.tensor(np.zeros(1, dtype=np.float32)))
    scattered = ctx.op("ScatterND", zeros, idx, g, reduction="add")
    inverse = [0] * rank
    for i, p in enumerate(rest_perm):
        inverse[p] = i
    if inverse != list(range(rank)):
        scattered = ctx.op("Transpose", scattered, perm=inverse)
    return [scattered, None]


@register("Pad")
def pad(ctx, node, dy):
    x = node.inputs[0]
    mode = ctx.attr(node, "mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise ExportError(f"{node.name}: Pad mode {mode!r} has no gradient rule")
    rank = ctx.rank(x)
    pads = ctx.require_constant(node.inputs[1], "Pad pads").reshape(-1).astype(np.int64)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        axes = [int(a) % rank for a in ctx.require_constant(node.inputs[3], "Pad axes").reshape(-1)]
    else:
        axes = list(range(rank))
    n = len(axes)
    if mode == "constant":
        # positive pads added a border: cut it off; negative pads cropped the input (NASNet's
        # Pad(-1)): the cropped rows get zeros
        starts = [max(int(p), 0) for p in pads[:n]]
        ends = [-int(p) if p > 0 else _INT64_MAX for p in pads[n:]]
        grad = dy[0]
        if any(starts) or any(e != _INT64_MAX for e in ends):
            grad = ctx.op("Slice", grad, ctx.ints(starts), ctx.ints(ends), ctx.ints(axes))
        if (pads < 0).any():
            restore = [0] * (2 * rank)
            for i, axis in enumerate(axes):
                restore[axis] = max(-int(pads[i]), 0)
                restore[rank + axis] = max(-int(pads[n + i]), 0)
            grad = ctx.op("Pad", grad, ctx.ints(restore))
        return [grad, None, None, None]
    if (pads < 0).any():
        raise ExportError(f"{node.name}: Pad mode {mode!r} with negative pads has no gradient rule")
    # reflect, edge and wrap copy input values into the border: padding along several axes is one
    # gather per axis (they commute), so the gradient folds each border back onto its sources, axis by axis.
    dims = ctx.dims(x)
    grad = dy[0]
    for axis, before, after in zip(axes, (int(p) for p in pads[:n]), (int(p) for p in pads[n:])):
        if before == after == 0:
            continue
        size = dims[axis]
        if not isinstance(size, int):
            raise ExportError(f"{node.name}: Pad mode {mode!r} needs a static size on axis {axis}, got {size!r}")
        limit = {"reflect": size - 1, "wrap": size, "edge": None}[mode]
        if limit is not None and max(before, after) > limit:
            raise ExportError(f"{node.name}: Pad mode {mode!r} pads axis {axis} (size {size}) by "
                              f"{max(before, after)}, more than {limit}: no gradient rule for repeated folding")
        grad = _fold_border(ctx, grad, mode, rank, axis, size, before, after)
    return [grad, None, None, None]


def _fold_border(ctx, grad, mode: str, rank: int, axis: int, size: int, before: int, after: int):
    """Gradient of a reflect/edge/wrap Pad along one axis: the centre plus each border slice added
    where its values came from (reflect: reversed, one in from the edge; edge: summed onto the edge
    element; wrap: from the opposite end)."""
    total = before + size + after

    def piece(start: int, end: int, step: int = 1):
        return ctx.op("Slice", grad, ctx.ints([start]), ctx.ints([end]), ctx.ints([axis]), ctx.ints([step]))

    def placed(part, at: int, length: int):
        pads = [0] * (2 * rank)
        pads[axis], pads[rank + axis] = at, size - at - length
        return ctx.op("Pad", part, ctx.ints(pads))

    result = piece(before, before + size)
    if before:
        if mode == "wrap":
            part, at, length = piece(0, before), size - before, before
        elif mode == "reflect":  # positions before-1 .. 0 hold x[1 .. before]
            part, at, length = piece(before - 1, -(total + 1), -1), 1, before
        else:
            part, at, length = ctx.op("ReduceSum", piece(0, before), ctx.ints([axis]), keepdims=1), 0, 1
        result = ctx.op("Add", result, placed(part, at, length))
    if after:
        start = before + size
        if mode == "wrap":
            part, at, length = piece(start, total), 0, after
        elif mode == "reflect":  # positions total-1 .. start hold x[size-1-after .. size-2]
            part, at, length = piece(total - 1, start - 1, -1), size - 1 - after, after
        else:
            part, at, length = ctx.op("ReduceSum", piece(start, total), ctx.ints([axis]), keepdims=1), size - 1, 1
        result = ctx.op("Add", result, placed(part, at, length))
    return result


@register("ScatterND")
def scatter_nd(ctx, node, dy):
    data, indices, updates = node.inputs
    if ctx.attr(node, "reduction", "none") != "none":
        raise ExportError(f"{node.name}: ScatterND with a reduction has no gradient rule")
    d_data = d_updates = None
    if ctx.needs_grad(data):
        d_data = ctx.op("ScatterND", dy[0], indices, ctx.zeros_like(updates))
    if ctx.needs_grad(updates):
        d_updates = ctx.op("GatherND", dy[0], indices)
    return [d_data, None, d_updates]


@register("GatherND")
def gather_nd(ctx, node, dy):
    """dX = ScatterND(0, I, dY, reduction=add): repeated indices add up."""
    data, indices = node.inputs
    if ctx.attr(node, "batch_dims", 0) != 0:
        raise ExportError(f"{node.name}: GatherND with batch_dims has no gradient rule")
    zeros = ctx.op("ConstantOfShape", ctx.op("Shape", data), value=ir.tensor(np.zeros(1, dtype=np.float32)))
    return [ctx.op("ScatterND", zeros, indices, dy[0], reduction="add"), None]


@register("Tile")
def tile(ctx, node, dy):
    x = node.inputs[0]
    dims = ctx.dims(x)
    repeats = ctx.require_constant(node.inputs[1], "Tile repeats").reshape(-1).tolist()
    if not all(isinstance(d, int) for d, r in zip(dims, repeats) if r != 1):
        raise ExportError(f"{node.name}: Tile along a dynamic axis has no gradient rule")
    # [r0*d0, r1*d1, ...] -> [r0, d0, r1, d1, ...] -> sum over the r axes
    split_shape = []
    for d, r in zip(dims, repeats):
        split_shape += [int(r), d if isinstance(d, int) else -1]
    g = ctx.op("Reshape", dy[0], ctx.ints(split_shape))
    g = ctx.op("ReduceSum", g, ctx.ints(list(range(0, 2 * len(dims), 2))), keepdims=0)
    return [g, None]


@register("DepthToSpace")
def depth_to_space(ctx, node, dy):
    """DepthToSpace moves values without arithmetic: its gradient is the inverse move of dY."""
    x = node.inputs[0]
    block = int(ctx.attr(node, "blocksize"))
    if ctx.attr(node, "mode", "DCR") == "DCR":
        return [ctx.op("SpaceToDepth", dy[0], blocksize=block)]
    n, c_in, h, w = ctx.dims(x)
    if not all(isinstance(d, int) for d in (c_in, h, w)):
        raise ExportError(f"{node.name}: DepthToSpace (CRD) needs static channel and spatial sizes")
    c = c_in // (block * block)
    # CRD: X [N, C b b, H, W] -> [N, C, b, b, H, W] -> [N, C, H, b, W, b] -> [N, C, H b, W b]
    g = ctx.op("Reshape", dy[0], ctx.ints([0, c, h, block, w, block]))
    g = ctx.op("Transpose", g, perm=[0, 1, 3, 5, 2, 4])
    return [ctx.op("Reshape", g, ctx.ints([0, c_in, h, w]))]


@register("SpaceToDepth")
def space_to_depth(ctx, node, dy):
    return [ctx.op("DepthToSpace", dy[0], blocksize=int(ctx.attr(node, "blocksize")), mode="DCR")]


@register("GatherElements")
def gather_elements(ctx, node, dy):
    data, indices = node.inputs
    axis = ctx.attr(node, "axis", 0) % ctx.rank(data)
    return [ctx.op("ScatterElements", ctx.zeros_like(data), indices, dy[0], axis=axis, reduction="add"), None]
