"""GradContext: what a gradient rule may use to emit nodes and read the forward graph.

Every node a rule emits belongs to the *region* of that rule's call: the forward node, the
backprop rule, the gradients it received and the gradients it returned. The regions are the
anchors of the lowering passes (:mod:`gradmap.graph.lowering`), which replace a region's nodes by
an engine-specific form with the same inputs and outputs; each emitted node also carries its
region in ``metadata_props["gradmap.vjp"]`` (``OpType:forward node name``), for profiles.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import onnx_ir as ir

from ..errors import ExportError
from ._builder import Builder

__all__ = ["GradContext", "Region", "VJP_KEY"]

#: Node metadata key naming the region a backward node belongs to.
VJP_KEY = "gradmap.vjp"


@dataclass
class Region:
    """The nodes one rule call emitted, with its interface.

    ``kind`` is the forward op type, a composite's name (``SiLU``, ``GELU``, ``HardSwish``), or, for
    the sums and broadcasts between rules, ``Expand`` (a broadcastable gradient given its input's
    full shape) and ``Accumulate`` (a broadcastable contribution added to a full one).
    """

    kind: str
    node: ir.Node | None
    backprop: str
    grad_outputs: list = field(default_factory=list)
    grad_inputs: list = field(default_factory=list)
    nodes: list = field(default_factory=list)
    like: ir.Value | None = None  # Expand / Accumulate: the forward value the gradient belongs to
    parts: dict = field(default_factory=dict)  # composites: the forward values their rule used


class GradContext(Builder):
    """Emits backward nodes into a tape and answers questions about forward values.

    Rules rely on static shapes of *forward* values (torch.onnx annotates them; only the batch
    dimension is symbolic) and never on shapes of backward values, which are left unannotated.
    """

    def __init__(self, graph: ir.Graph, needs_grad: set[ir.Value]):
        super().__init__(graph, prefix="grad")
        self._needs_grad = needs_grad
        self.backprop = "vanilla"  # the ReLU rule: vanilla, guided or deconvnet (Springenberg et al. 2015)
        self._broadcastable: set[ir.Value] = set()
        self._per_channel: set[ir.Value] = set()  # broadcastable gradients shaped [N, C, 1, 1]
        # stand-ins for gradients known only at some indices of one axis: (rank, axis, size, {index: part})
        self._parts: dict[ir.Value, tuple[int, int, int, dict[int, ir.Value]]] = {}
        self.regions: list[Region] = []
        self._region: Region | None = None

    # -- regions ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def region(self, kind: str, node: ir.Node | None = None, grad_outputs=(), like: ir.Value | None = None):
        """Record the nodes emitted inside the ``with`` block as one region."""
        outer = self._region
        region = Region(kind, node, self.backprop, list(grad_outputs), like=like)
        self._region = region
        try:
            yield region
        finally:
            self._region = outer
        if region.nodes:
            self.regions.append(region)

    def _emitted(self, node: ir.Node) -> None:
        if self._region is not None:
            self._region.nodes.append(node)
            origin = self._region.node.name if self._region.node is not None else (
                self._region.like.name if self._region.like is not None else "")
            node.metadata_props[VJP_KEY] = f"{self._region.kind}:{origin}"

    def publish(self, **parts) -> None:
        """Name values of the current rule's nodes that a lowering or engine pass may rewrite
        (``region.parts``, as a composite's match names its forward values)."""
        if self._region is None:
            raise ExportError(f"{self._where()}: publish() outside a rule call")
        self._region.parts.update(parts)

    # -- reading the forward graph -------------------------------------------------------------
    def needs_grad(self, value: ir.Value | None) -> bool:
        return value is not None and value in self._needs_grad

    def optional_outputs(self, node: ir.Node, wanted: dict[int, str], shape=None,
                         dtype: ir.DataType = ir.DataType.FLOAT) -> list[ir.Value]:
        """The optional outputs ``wanted`` (position: name suffix) of forward ``node``, which it
        computes anyway (LayerNormalization's Mean and InvStdDev): where the forward graph does not
        use them yet, the context adds them to the node, named after its first output, typed
        ``dtype`` and shaped ``shape``. The only change to a forward node the gradient pass makes."""
        present = len(node.outputs)
        if present <= max(wanted):
            node.resize_outputs(max(wanted) + 1)
            for i, suffix in wanted.items():
                if i >= present:
                    out = node.outputs[i]
                    out.name = f"{node.outputs[0].name}_{suffix}"
                    out.type = ir.TensorType(dtype)
                    out.shape = ir.Shape(shape) if shape is not None else None
        return [node.outputs[i] for i in wanted]

    # -- common building blocks ------------------------------------------------------------------
    def sum_to(self, grad: ir.Value, source: "ir.Value | tuple", like: ir.Value) -> ir.Value:
        """Sum ``grad`` (shaped like the broadcast ``source``, a value or its dims) down to the
        shape of input ``like``."""
        out_dims = source if isinstance(source, tuple) else self.dims(source)
        in_dims = self.dims(like)
        lead = len(out_dims) - len(in_dims)
        if lead < 0:
            raise ExportError(f"{self._where()}: input {like.name!r} has a higher rank than the output")
        axes = list(range(lead))
        keep_axes = [lead + i for i, d in enumerate(in_dims) if d == 1 and out_dims[lead + i] != 1]
        if keep_axes:
            grad = self.op("ReduceSum", grad, self.ints(keep_axes), keepdims=1)
        if axes:
            grad = self.op("ReduceSum", grad, self.ints(axes), keepdims=0)
        return grad

    def broadcastable(self, grad: ir.Value, per_channel: bool = False) -> ir.Value:
        """Mark ``grad`` as a gradient that broadcasts to its input's shape (size-1 axes where the
        input has more) instead of having it; ``per_channel``: it is [N, C, 1, 1] for an
        [N, C, H, W] input.

        The pass then adds it to the input's other gradient contributions with a broadcasting Add
        and expands it only when it is the whole gradient: a squeeze-excitation block's mean
        gradient then costs no activation-sized Expand.
        """
        self._broadcastable.add(grad)
        if per_channel:
            self._per_channel.add(grad)
        return grad

    def is_per_channel(self, grad: ir.Value) -> bool:
        return grad in self._per_channel

    def is_broadcastable(self, grad: ir.Value) -> bool:
        return grad in self._broadcastable

    def part(self, grad: ir.Value, like: ir.Value, axis: int, index: int) -> ir.Value:
        """A stand-in for the gradient of ``like`` that is ``grad`` (size 1 along ``axis``) at
        ``index`` and 0 elsewhere. Stand-ins for the same value are merged by :meth:`accumulate`;
        when every index has its part, :meth:`materialize` concatenates them (a ViT's q, k and v
        gathered from one tensor: one Concat instead of three Pads to the full size and two Adds).
        """
        self._counter += 1
        stand_in = ir.Value(name=f"grad_part_{self._counter}")
        self._parts[stand_in] = (self.rank(like), axis, self.dims(like)[axis], {index: grad})
        return stand_in

    def accumulate(self, a: ir.Value, b: ir.Value, like: ir.Value | None = None) -> ir.Value:
        """The sum of two gradient contributions to ``like``: a broadcasting Add where one of them
        is :meth:`broadcastable` (an ``Accumulate`` region, which a lowering may rewrite)."""
        if a in self._parts and b in self._parts:
            rank, axis, size, parts_a = self._parts[a]
            _, axis_b, _, parts_b = self._parts[b]
            if axis == axis_b and not set(parts_a) & set(parts_b):
                self._counter += 1
                stand_in = ir.Value(name=f"grad_part_{self._counter}")
                self._parts[stand_in] = (rank, axis, size, {**parts_a, **parts_b})
                return stand_in
        a, b = self._assemble(a), self._assemble(b)
        mixed = like is not None and self.is_per_channel(a) != self.is_per_channel(b)
        with self.region("Accumulate", grad_outputs=[a, b], like=like) if mixed else contextlib.nullcontext() as region:
            total = self.op("Add", a, b)
            if region is not None:
                region.grad_inputs = [total]
                region.parts = {"per_channel": a if self.is_per_channel(a) else b}
        if self.is_broadcastable(a) and self.is_broadcastable(b):
            self.broadcastable(total, per_channel=self.is_per_channel(a) and self.is_per_channel(b))
        return total

    def _assemble(self, grad: ir.Value) -> ir.Value:
        if grad not in self._parts:
            return grad
        rank, axis, size, parts = self._parts[grad]
        if sorted(parts) == list(range(size)):
            if size == 1:
                return parts[0]
            return self.op("Concat", *[parts[i] for i in range(size)], axis=axis)
        total = None
        for index, part in sorted(parts.items()):
            pads = [0] * (2 * rank)
            pads[axis], pads[rank + axis] = index, size - index - 1
            padded = self.op("Pad", part, self.ints(pads))
            total = padded if total is None else self.op("Add", total, padded)
        return total

    def materialize(self, grad: ir.Value | None, like: ir.Value) -> ir.Value | None:
        """``grad`` with the full shape of ``like``: an Expand (an ``Expand`` region) for a
        :meth:`broadcastable` one, the Concat or Pads of a :meth:`part` stand-in."""
        if grad is not None and grad in self._parts:
            return self._assemble(grad)
        if grad is None or grad not in self._broadcastable:
            return grad
        with self.region("Expand", grad_outputs=[grad], like=like) as region:
            full = self.op("Expand", grad, self.shape_of(like))
            region.grad_inputs = [full]
            region.parts = {"per_channel": grad if self.is_per_channel(grad) else None}
        return full
