"""Rewriting the regions of a finished gradient graph.

A lowering pass matches regions (gradient/_context.py: the nodes one rule call emitted, with
the gradients it received and returned), checks its conditions, and emits a replacement that takes
the same inputs and returns the same gradients. :class:`Rewriter` emits the replacement after the
region's last node, moves the region's consumers to the new outputs and deletes what is left unused.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..gradient._builder import Builder
from ..gradient._context import VJP_KEY, Region

__all__ = ["Rewriter", "prune"]


class Rewriter(Builder):
    """A builder for replacement nodes plus what the CPU lowering's forms need: the block size."""

    def __init__(self, graph: ir.Graph, block: int, forward_nodes: set[ir.Node], keep: set[ir.Value]):
        super().__init__(graph, prefix="grad/cpu")
        self.block = block
        self.forward_nodes = forward_nodes
        self.keep = keep  # forward values whose own gradient is an output (Grad-CAM's map)
        self._replaced: dict[ir.Value, ir.Value] = {}

    # -- regions ---------------------------------------------------------------------------------
    def current(self, value: ir.Value | None) -> ir.Value | None:
        """``value`` or what replaced it: a region's recorded inputs may come from regions
        rewritten since."""
        while value is not None and value in self._replaced:
            value = self._replaced[value]
        return value

    def inputs_of(self, region: Region) -> list:
        return [self.current(g) for g in region.grad_outputs]

    def replace(self, region: Region, outputs: list) -> None:
        """Put the nodes emitted since the last call in place of ``region``: ``outputs`` take over
        the uses of the region's gradients (``None``: keep that one)."""
        new_nodes = list(self.tape.nodes)
        self.tape = ir.tape.Tape()
        origin = region.node.name if region.node is not None else (region.like.name if region.like is not None else "")
        for node in new_nodes:
            node.metadata_props[VJP_KEY] = f"{region.kind}:{origin}"
        anchor = region.nodes[-1]
        if new_nodes:
            self.graph.insert_after(anchor, new_nodes)
        for i, (old, new) in enumerate(zip(region.grad_inputs, outputs)):
            if old is None or new is None or old is new:
                continue
            if new.shape is None and old.shape is not None:
                new.shape, new.type = ir.Shape(old.shape), old.type
            old.replace_all_uses_with(new)
            self._replaced[old] = new
            region.grad_inputs[i] = new
        for node in reversed(region.nodes):
            if node.graph is self.graph and not any(o.uses() or o.is_graph_output() for o in node.outputs):
                self.graph.remove(node, safe=True)
        region.nodes = [n for n in region.nodes if n.graph is self.graph] + new_nodes
        self.node = None

    def insert_before(self, region: Region, node: ir.Node) -> None:
        """Put the nodes emitted since the last call before ``node`` (a node of ``region``), as
        part of the region."""
        new_nodes = list(self.tape.nodes)
        self.tape = ir.tape.Tape()
        origin = region.node.name if region.node is not None else ""
        for new in new_nodes:
            new.metadata_props[VJP_KEY] = f"{region.kind}:{origin}"
        self.graph.insert_before(node, new_nodes)
        region.nodes[:0] = new_nodes
        self.node = None

    # -- onnxruntime CPU's blocked layout ---------------------------------------------------------
    def blocked_channels(self, value: ir.Value) -> int | None:
        """C when ``value`` is [N, C, H, W] with C a multiple of the block, the channel multiple
        onnxruntime needs to keep a tensor in its blocked NCHWc layout; else None."""
        if value is None or value.shape is None:
            return None
        dims = self.dims(value)
        if len(dims) != 4 or not isinstance(dims[1], int) or dims[1] % self.block:
            return None
        return dims[1]

    def channel_affine(self, value: ir.Value, channels: int, scale: float, bias: float | None = None) -> ir.Value:
        """``scale * value + bias`` as a depthwise 1x1 Conv over ``channels`` channels: one
        multiply-add, so as exact as the Mul and Add it stands for, and a Conv is what onnxruntime
        keeps in its blocked NCHWc layout, where a Mul or Sub with a scalar would fall back to plain
        NCHW with a reorder on each side."""
        weight = self.const(np.full((channels, 1, 1, 1), scale, dtype=np.float32))
        inputs = [value, weight]
        if bias is not None:
            inputs.append(self.const(np.full(channels, bias, dtype=np.float32)))
        return self.op("Conv", *inputs, group=channels, kernel_shape=[1, 1])

    def blocked(self, grad: ir.Value, like: ir.Value) -> ir.Value:
        """``grad`` (shaped like ``like``) through a depthwise 1x1 Conv of weight 1, an exact
        identity, where ``like`` is blocked: a gradient made by an op without a blocked kernel
        (ConvTranspose, ScatterElements, MaxUnpool) enters the layout once instead of every masking
        Mul and Add after it falling back to plain NCHW, with a reorder around each."""
        channels = self.blocked_channels(like)
        if channels is None:
            return grad
        return self.channel_affine(grad, channels, 1.0)


def prune(graph: ir.Graph) -> int:
    """Drop initializers nothing reads any more (constants of replaced regions); returns how many."""
    unused = [name for name, value in graph.initializers.items()
              if not value.uses() and not value.is_graph_output() and value not in graph.inputs]
    for name in unused:
        graph.initializers.pop(name)
    return len(unused)
