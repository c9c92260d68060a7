"""Engine workarounds: one named pass per engine bug, over the finished gradient graph.

The gradient rules (:mod:`gradmap.graph.gradient`) write each vector-Jacobian product as its plain
formula. Some engines compute one of those plain forms wrongly, or cannot load it; each such bug is
isolated on a minimal graph in ``tests/engines`` (``ENGINE_BUGS``, the key every pass here names),
and the pass below rewrites exactly that form into an equal one the engine gets right. Every target
gets these passes (the same file runs on every engine); the cpu target's lowering runs after them.

    openvino-shared-square-constant    a square constant matrix or a ConvTranspose kernel that the
        (own_weight_copy)              forward graph reads too, read by the rule's Transpose, Gemm or
                                       Conv: read through two reversals of its first axis instead, a
                                       value equal to it that engines fold into a constant of its own
                                       at load (the file still stores it once)
    webgpu-grouped-convtranspose-2x2   MaxPool whose windows tile the input (kernel = stride, 2-D):
        (tiled_pool_depth_to_space)    the routed gradients placed by DepthToSpace (offset-major
                                       channels, DCR) instead of the grouped one-hot ConvTranspose
    openvino-empty-concat              a Concat piece that is an empty Gather (Gather(Shape(X), []))
        (drop_empty_concat_pieces)     is dropped (a Concat of one piece is that piece)
    onnxruntime-cpu-scatternd-repeated-indices
        (repeated_scatter_as_matmul)   ScatterND(0, I, U, reduction=add) with constant repeated
                                       indices I: a MatMul of U's rows with the constant count matrix
                                       [I_j = i] (exact and deterministic)

Each pass returns how many places it rewrote; ``tests/test_engine_passes.py`` checks that each one
fires on its pattern and leaves the graph's outputs equal on onnxruntime CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_ir as ir

from ..gradient._builder import Builder
from ..gradient._context import VJP_KEY, Region
from ..gradient._match import producer

__all__ = ["ENGINE_PASSES", "EnginePass", "EngineRewriter", "apply"]

_INT64_MIN = int(np.iinfo(np.int64).min)

#: Largest constant count matrix repeated_scatter_as_matmul builds (float32 entries: 64 MB).
SCATTER_MATRIX_LIMIT = 1 << 24


class EngineRewriter(Builder):
    """Emits replacement nodes into the finished graph, keeping the regions (the lowering's anchors)
    in step: new nodes join the region of the node they serve, replaced values are replaced in every
    region's interface too, and constants no node reads any more are dropped."""

    def __init__(self, graph: ir.Graph, regions: list[Region], forward_nodes: set[ir.Node]):
        super().__init__(graph, prefix="grad/engine")
        self.regions = regions
        self.forward_nodes = forward_nodes
        inputs = set(graph.inputs)
        for value in graph.initializers.values():  # share small constants with the rules' (as they do)
            array = value.const_value.numpy() if value.const_value is not None else None
            if array is not None and array.size <= 64 and value not in inputs:
                self._constants.setdefault((array.dtype.str, array.shape, array.tobytes()), value)

    def region_of(self, node: ir.Node) -> Region | None:
        return next((r for r in self.regions if any(n is node for n in r.nodes)), None)

    def emit_before(self, node: ir.Node, region: Region | None) -> None:
        """Put the nodes emitted since the last call before ``node``, in ``node``'s region."""
        new_nodes = list(self.tape.nodes)
        self.tape = ir.tape.Tape()
        if not new_nodes:
            return
        if region is not None:
            origin = region.node.name if region.node is not None else (region.like.name if region.like is not None else "")
            for new in new_nodes:
                new.metadata_props[VJP_KEY] = f"{region.kind}:{origin}"
            at = next(i for i, n in enumerate(region.nodes) if n is node)
            region.nodes[at:at] = new_nodes
        self.graph.insert_before(node, new_nodes)

    def substitute(self, old: ir.Value, new: ir.Value, dead: list[ir.Node]) -> None:
        """``new`` takes over every use of ``old`` (graph, regions); then the nodes of ``dead`` that
        nothing reads any more are removed (consumers first), with the constants only they read."""
        if new.shape is None and old.shape is not None:
            new.shape, new.type = ir.Shape(old.shape), old.type
        old.replace_all_uses_with(new)
        for region in self.regions:
            region.grad_outputs = [new if v is old else v for v in region.grad_outputs]
            region.grad_inputs = [new if v is old else v for v in region.grad_inputs]
            region.parts = {k: (new if v is old else v) for k, v in region.parts.items()}
        self.remove_unused(dead)

    def remove_unused(self, nodes: list[ir.Node]) -> None:
        constants = []
        for node in nodes:  # consumers first
            if node.graph is not self.graph or any(o.uses() or o.is_graph_output() for o in node.outputs):
                continue
            constants += [v for v in node.inputs if v is not None and v.const_value is not None]
            self.graph.remove(node, safe=True)
            for region in self.regions:
                if any(n is node for n in region.nodes):
                    region.nodes = [n for n in region.nodes if n is not node]
        inputs = set(self.graph.inputs)
        for value in constants:
            if value.name in self.graph.initializers and not value.uses() and value not in inputs \
                    and not value.is_graph_output():
                self.graph.initializers.pop(value.name)
                self._constants = {k: v for k, v in self._constants.items() if v is not value}


# -- openvino-shared-square-constant ----------------------------------------------------------------------
def own_weight_copy(rw: EngineRewriter) -> int:
    """A forward weight that the backward graph reads in another layout gets a value of its own:
    a square constant matrix (its last two axes equal) read by a MatMul or Gemm rule's nodes, and
    any ConvTranspose kernel read by its rule's adjoint Conv."""
    done = 0
    for region in rw.regions:
        node = region.node
        if node is None or region.kind not in ("MatMul", "Gemm", "ConvTranspose"):
            continue
        if region.kind == "ConvTranspose":
            weights = [node.inputs[1]]
        else:
            weights = [v for v in node.inputs[:2] if _square_constant(rw, v)]
        for weight in weights:
            for reader in [n for n in region.nodes if n.graph is rw.graph and any(v is weight for v in n.inputs)]:
                rw.node = node
                copy = weight
                for _ in range(2):
                    copy = rw.op("Slice", copy, rw.ints([-1]), rw.ints([_INT64_MIN]), rw.ints([0]), rw.ints([-1]))
                rw.emit_before(reader, region)
                for i, v in enumerate(reader.inputs):
                    if v is weight:
                        reader.replace_input_with(i, copy)
                done += 1
    return done


def _square_constant(rw: EngineRewriter, value: ir.Value | None) -> bool:
    array = rw.constant_of(value)
    return array is not None and array.ndim >= 2 and array.shape[-1] == array.shape[-2]


# -- webgpu-grouped-convtranspose-2x2 ------------------------------------------------------------------
def tiled_pool_depth_to_space(rw: EngineRewriter) -> int:
    """MaxPool windows that tile the input (2-D, kernel k x k = stride, no dilation): each routed
    gradient is one position of every k x k block, so DepthToSpace(Concat(routed, channels), k, DCR)
    places them, where the rule's grouped ConvTranspose with one-hot kernels does the same."""
    done = 0
    for region in rw.regions:
        node = region.node
        if region.kind != "MaxPool" or "spread" not in region.parts:
            continue
        kernel = list(rw.attr(node, "kernel_shape"))
        strides = list(rw.attr(node, "strides", [1] * len(kernel)))
        dilations = list(rw.attr(node, "dilations", [1] * len(kernel)))
        if not (len(kernel) == 2 and kernel[0] == kernel[1] == strides[0] == strides[1] and dilations == [1, 1]):
            continue
        spread = region.parts["spread"]
        transpose = producer(spread, "ConvTranspose")
        if transpose is None or transpose.graph is not rw.graph:
            continue
        routed = region.parts["routed"]
        rw.node = node
        stacked = rw.op("Concat", *routed, axis=1) if len(routed) > 1 else routed[0]
        placed = rw.op("DepthToSpace", stacked, blocksize=kernel[0], mode="DCR")
        rw.emit_before(transpose, region)
        dead = [transpose]
        reshape = producer(transpose.inputs[0], "Reshape")
        if reshape is not None:
            dead.append(reshape)
            concat = producer(reshape.inputs[0], "Concat")
            unsqueezes = [producer(v, "Unsqueeze") for v in (concat.inputs if concat is not None else reshape.inputs[:1])]
            dead += ([concat] if concat is not None else []) + [u for u in unsqueezes if u is not None]
        rw.substitute(spread, placed, dead)
        region.parts["spread"] = placed
        done += 1
    return done


# -- openvino-empty-concat -------------------------------------------------------------------------------
def drop_empty_concat_pieces(rw: EngineRewriter) -> int:
    """Concat pieces that are Gathers with constant empty indices (nothing) are dropped; a Concat
    left with one piece is replaced by it."""
    done = 0
    for region in rw.regions:
        for concat in [n for n in region.nodes if n.op_type == "Concat" and n.graph is rw.graph]:
            empty = [v for v in concat.inputs if _empty_gather(rw, v)]
            if not empty or len(empty) == len(concat.inputs):
                continue
            kept = [v for v in concat.inputs if v not in empty]
            dead = [concat] + [v.producer() for v in empty]
            if len(kept) == 1:
                rw.substitute(concat.outputs[0], kept[0], dead)
            else:
                rw.node = region.node
                joined = rw.op("Concat", *kept, axis=rw.attr(concat, "axis"))
                rw.emit_before(concat, region)
                rw.substitute(concat.outputs[0], joined, dead)
            done += 1
    return done


def _empty_gather(rw: EngineRewriter, value: ir.Value | None) -> bool:
    gather = producer(value, "Gather")
    if gather is None:
        return False
    indices = rw.constant_of(gather.inputs[1])
    return indices is not None and indices.size == 0


# -- onnxruntime-cpu-scatternd-repeated-indices -----------------------------------------------------------
def repeated_scatter_as_matmul(rw: EngineRewriter) -> int:
    """ScatterND(zeros shaped like X, I, U, reduction=add) with constant indices I of which some
    repeat: dX[i] = sum_j [I_j = i] U[j], a MatMul with the constant count matrix (rows of X x
    updates, up to :data:`SCATTER_MATRIX_LIMIT` entries), reshaped like X."""
    done = 0
    for region in rw.regions:
        for scatter in [n for n in region.nodes if n.op_type == "ScatterND" and n.graph is rw.graph]:
            if rw.attr(scatter, "reduction", "none") != "add":
                continue
            zeros, indices, updates = scatter.inputs
            fill = producer(zeros, "ConstantOfShape")
            shape = producer(fill.inputs[0], "Shape") if fill is not None else None
            value = fill.attributes.get("value") if fill is not None else None
            index = rw.constant_of(indices)
            if shape is None or index is None or not index.size or \
                    (value is not None and np.any(value.as_tensor().numpy() != 0)):
                continue
            data = shape.inputs[0]
            depth = index.shape[-1]
            lead = rw.dims(data)[:depth]
            if not all(isinstance(d, int) for d in lead):
                continue
            flat = index.reshape(-1, depth)
            flat = np.where(flat < 0, flat + np.asarray(lead), flat)  # negative indices count from the end
            positions = np.ravel_multi_index(tuple(flat.T), lead)
            rows, count = int(np.prod(lead)), len(positions)
            if len(np.unique(positions)) == count or rows * count > SCATTER_MATRIX_LIMIT:
                continue
            matrix = np.zeros((rows, count), dtype=np.float32)
            np.add.at(matrix, (positions, np.arange(count)), 1.0)
            rw.node = region.node
            g = rw.op("Reshape", updates, rw.ints([count, -1]))
            g = rw.op("MatMul", rw.const(matrix), g)
            dx = rw.reshape_like(g, data)
            rw.emit_before(scatter, region)
            rw.substitute(scatter.outputs[0], dx, [scatter, fill, shape])
            done += 1
    return done


@dataclass(frozen=True)
class EnginePass:
    """A workaround for one engine bug: ``bug`` is its key in ``tests/engines``' ``ENGINE_BUGS``."""

    bug: str
    run: Callable[[EngineRewriter], int]

    @property
    def name(self) -> str:
        return self.run.__name__


#: The passes, in the order they run.
ENGINE_PASSES: tuple[EnginePass, ...] = (
    EnginePass("openvino-shared-square-constant", own_weight_copy),
    EnginePass("webgpu-grouped-convtranspose-2x2", tiled_pool_depth_to_space),
    EnginePass("openvino-empty-concat", drop_empty_concat_pieces),
    EnginePass("onnxruntime-cpu-scatternd-repeated-indices", repeated_scatter_as_matmul),
)


def apply(graph: ir.Graph, regions: list[Region], forward_nodes: set[ir.Node],
          passes: tuple[EnginePass, ...] = ENGINE_PASSES) -> dict[str, int]:
    """Run ``passes`` over the backward regions of ``graph``, in place; returns each pass's count."""
    rw = EngineRewriter(graph, regions, forward_nodes)
    return {p.name: p.run(rw) for p in passes}
