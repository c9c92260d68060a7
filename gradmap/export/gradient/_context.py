"""GradContext: what a gradient rule may use to emit nodes and read the forward graph."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir

from .._errors import ExportError

__all__ = ["GradContext", "Dim"]

Dim = "int | str"


class GradContext:
    """Emits backward nodes into a tape and answers questions about forward values.

    Rules rely on static shapes of *forward* values (torch.onnx annotates them; only the batch
    dimension is symbolic) and never on shapes of backward values, which are left unannotated.
    """

    def __init__(self, graph: ir.Graph, needs_grad: set[ir.Value]):
        self.graph = graph
        self.tape = ir.tape.Tape()
        self._needs_grad = needs_grad
        self._constants: dict[tuple, ir.Value] = {}
        self._counter = 0
        self.node: ir.Node | None = None  # the forward node whose rule is running, for error messages
        self.backprop = "vanilla"  # the ReLU rule: vanilla, guided or deconvnet (Springenberg et al. 2015)
        self._broadcastable: set[ir.Value] = set()
        self._per_channel: set[ir.Value] = set()  # broadcastable gradients shaped [N, C, 1, 1]
        # stand-ins for gradients known only at some indices of one axis: (rank, axis, size, {index: part})
        self._parts: dict[ir.Value, tuple[int, int, int, dict[int, ir.Value]]] = {}
        # (backprop, BatchNormalization node) whose per-channel factor a later Conv's adjoint already
        # applied (BN -> ReLU -> Conv, see the Conv rule): the BN rule passes the gradient through
        self.absorbed: set[tuple[str, ir.Node]] = set()
        self.captured_values: set[ir.Value] = set()  # values whose own gradient is an output (Grad-CAM's map)

    # -- emitting ---------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: ir.Value | None, **attributes) -> ir.Value:
        return self.tape.op(op_type, list(inputs), attributes or None, name=self._name(op_type))

    def op_multi(self, op_type: str, *inputs: ir.Value | None, num_outputs: int, **attributes) -> Sequence[ir.Value]:
        return self.tape.op_multi_out(op_type, list(inputs), attributes or None, num_outputs=num_outputs,
                                      name=self._name(op_type))

    def _name(self, op_type: str) -> str:
        self._counter += 1
        origin = self.node.name if self.node is not None and self.node.name else "grad"
        return f"grad/{origin}/{op_type}_{self._counter}"

    def const(self, array, dtype=None) -> ir.Value:
        """An initializer holding ``array`` (deduplicated for small constants)."""
        arr = np.asarray(array, dtype=dtype)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.size <= 64 else None
        if key is not None and key in self._constants:
            return self._constants[key]
        self._counter += 1
        value = ir.Value(name=f"grad_const_{self._counter}", shape=ir.Shape(arr.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)), const_value=ir.tensor(arr))
        self.graph.register_initializer(value)
        if key is not None:
            self._constants[key] = value
        return value

    def ints(self, values: Sequence[int]) -> ir.Value:
        return self.const(np.asarray(list(values), dtype=np.int64))

    def scalar(self, x: float) -> ir.Value:
        return self.const(np.asarray(x, dtype=np.float32))

    # -- reading the forward graph -------------------------------------------------------------
    def needs_grad(self, value: ir.Value | None) -> bool:
        return value is not None and value in self._needs_grad

    @staticmethod
    def constant_of(value: ir.Value | None) -> np.ndarray | None:
        """The value as a numpy array when it is an initializer or a Constant node's output."""
        if value is None:
            return None
        if value.const_value is not None:
            return value.const_value.numpy()
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
            attr = producer.attributes.get("value")
            if attr is not None:
                return attr.as_tensor().numpy()
            for key in ("value_float", "value_int"):
                if key in producer.attributes:
                    return np.asarray(producer.attributes[key].value)
            for key in ("value_floats", "value_ints"):
                if key in producer.attributes:
                    return np.asarray(list(producer.attributes[key].value))
        return None

    def require_constant(self, value: ir.Value | None, what: str) -> np.ndarray:
        arr = self.constant_of(value)
        if arr is None:
            raise ExportError(f"{self._where()}: {what} must be a constant for its gradient rule")
        return arr

    def dims(self, value: ir.Value) -> tuple:
        """Static dimensions of a forward value: ints, or strings for symbolic ones (the batch)."""
        shape = value.shape
        if shape is None:
            raise ExportError(f"{self._where()}: the shape of {value.name!r} is unknown")
        return tuple(d if isinstance(d, int) else str(d) for d in shape)

    def rank(self, value: ir.Value) -> int:
        return len(self.dims(value))

    def attr(self, node: ir.Node, name: str, default=None):
        a = node.attributes.get(name)
        return default if a is None else a.value

    def _where(self) -> str:
        return f"node {self.node.name!r} ({self.node.op_type})" if self.node is not None else "gradient pass"

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
        """The sum of two gradient contributions to ``like``.

        A per-channel contribution (a squeeze-and-excitation mean's) added to a full one of an
        [N, C, H, W] value with C a multiple of 16 is first spread by a nearest Resize: onnxruntime
        keeps that and a same-shape Add in its blocked NCHWc layout, where a broadcasting Add would
        take the full gradient out of it and back.
        """
        if a in self._parts and b in self._parts:
            rank, axis, size, parts_a = self._parts[a]
            _, axis_b, _, parts_b = self._parts[b]
            if axis == axis_b and not set(parts_a) & set(parts_b):
                self._counter += 1
                stand_in = ir.Value(name=f"grad_part_{self._counter}")
                self._parts[stand_in] = (rank, axis, size, {**parts_a, **parts_b})
                return stand_in
        a, b = self._assemble(a), self._assemble(b)
        if like is not None and self.is_per_channel(a) != self.is_per_channel(b):
            a, b = self._spread(a, like), self._spread(b, like)
        total = self.op("Add", a, b)
        if self.is_broadcastable(a) and self.is_broadcastable(b):
            self.broadcastable(total, per_channel=self.is_per_channel(a) and self.is_per_channel(b))
        return total

    def _spread(self, grad: ir.Value, like: ir.Value) -> ir.Value:
        """A per-channel ``grad`` of a blocked [N, C, H, W] ``like`` as a full [N, C, H, W] tensor."""
        dims = self.dims(like)
        if grad not in self._per_channel or not self.blocked_channels(like) \
                or not all(isinstance(d, int) for d in dims[2:]):
            return grad
        spread = self.op("Resize", grad, None, self.const(np.asarray([1, 1, *dims[2:]], dtype=np.float32)),
                         mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        spread.shape, spread.type = ir.Shape(like.shape), like.type
        return spread

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
        """``grad`` with the full shape of ``like`` (Expand only for a :meth:`broadcastable` one).

        A per-channel gradient of an [N, C, H, W] value with C a multiple of 16 is spread instead by
        a depthwise Conv with an all-ones H x W kernel and pads H-1, W-1 (each output is the one
        input value times 1, exact): onnxruntime runs that in its blocked NCHWc layout, so the
        backward convolutions that follow (a ResNet's whole residual trunk) need no layout reorders.
        """
        if grad is not None and grad in self._parts:
            return self._assemble(grad)
        if grad is None or grad not in self._broadcastable:
            return grad
        dims = self.dims(like)
        if grad in self._per_channel and self.blocked_channels(like) and all(isinstance(d, int) for d in dims[2:]):
            channels, height, width = dims[1:]
            return self.op("Conv", grad, self.const(np.ones((channels, 1, height, width), dtype=np.float32)),
                           group=channels, kernel_shape=[height, width],
                           pads=[height - 1, width - 1, height - 1, width - 1])
        return self.op("Expand", grad, self.shape_of(like))

    def blocked_channels(self, value: ir.Value) -> int | None:
        """C when ``value`` is [N, C, H, W] with C a multiple of 16, the channel multiple onnxruntime
        needs to keep a tensor in its blocked NCHWc layout; else None."""
        dims = self.dims(value)
        if len(dims) != 4 or not isinstance(dims[1], int) or dims[1] % 16:
            return None
        return dims[1]

    def blocked(self, grad: ir.Value, like: ir.Value) -> ir.Value:
        """``grad`` (shaped like ``like``) through a depthwise 1x1 Conv of weight 1, an exact
        identity, where ``like`` is [N, C, H, W] with C a multiple of 16: onnxruntime computes that
        Conv in its blocked NCHWc layout, so a gradient made by an op without a blocked kernel
        (ConvTranspose, ScatterElements) enters the layout once instead of every masking Mul and
        Add after it falling back to plain NCHW, with a reorder around each."""
        channels = self.blocked_channels(like)
        if channels is None:
            return grad
        return self.channel_affine(grad, channels, 1.0)

    def channel_affine(self, value: ir.Value, channels: int, scale: float, bias: float | None = None) -> ir.Value:
        """``scale * value + bias`` as a depthwise 1x1 Conv over ``channels`` channels: one
        multiply-add, so as exact as the Mul and Add it stands for, and a Conv is what onnxruntime
        keeps in its blocked NCHWc layout (C a multiple of 16), where a Mul or Sub with a scalar
        would fall back to plain NCHW with a reorder on each side."""
        weight = self.const(np.full((channels, 1, 1, 1), scale, dtype=np.float32))
        inputs = [value, weight]
        if bias is not None:
            inputs.append(self.const(np.full(channels, bias, dtype=np.float32)))
        return self.op("Conv", *inputs, group=channels, kernel_shape=[1, 1])

    def reshape_like(self, grad: ir.Value, like: ir.Value) -> ir.Value:
        return self.op("Reshape", grad, self.shape_of(like))

    def shape_of(self, value: ir.Value) -> ir.Value:
        dims = self.dims(value)
        if all(isinstance(d, int) for d in dims):
            return self.ints(dims)
        return self.op("Shape", value)

    def zeros_like(self, value: ir.Value) -> ir.Value:
        return self.op("ConstantOfShape", self.shape_of(value),
                       value=ir.tensor(np.zeros(1, dtype=np.float32)))
