"""Builder: emits ONNX nodes into a tape and reads static facts of the forward graph.

Shared by the gradient pass (:class:`~._context.GradContext`) and the lowering passes
(:mod:`gradmap.graph.lowering`), which emit replacement nodes the same way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir

from ..errors import ExportError

__all__ = ["Builder", "constant_of"]


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


class Builder:
    """Emits nodes into ``self.tape`` and registers constants as initializers of ``graph``."""

    def __init__(self, graph: ir.Graph, prefix: str = "grad"):
        self.graph = graph
        self.tape = ir.tape.Tape()
        self.prefix = prefix
        self._constants: dict[tuple, ir.Value] = {}
        self._counter = 0
        self.node: ir.Node | None = None  # the forward node being handled, for names and error messages

    # -- emitting ---------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: ir.Value | None, **attributes) -> ir.Value:
        value = self.tape.op(op_type, list(inputs), attributes or None, name=self._name(op_type))
        self._emitted(self.tape.nodes[-1])
        return value

    def op_multi(self, op_type: str, *inputs: ir.Value | None, num_outputs: int, **attributes) -> Sequence[ir.Value]:
        values = self.tape.op_multi_out(op_type, list(inputs), attributes or None, num_outputs=num_outputs,
                                        name=self._name(op_type))
        self._emitted(self.tape.nodes[-1])
        return values

    def _emitted(self, node: ir.Node) -> None:
        """Hook for subclasses: ``node`` was just emitted."""

    def _name(self, op_type: str) -> str:
        self._counter += 1
        origin = self.node.name if self.node is not None and self.node.name else self.prefix
        return f"{self.prefix}/{origin}/{op_type}_{self._counter}"

    def const(self, array, dtype=None) -> ir.Value:
        """An initializer holding ``array`` (deduplicated for small constants)."""
        arr = np.asarray(array, dtype=dtype)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.size <= 64 else None
        if key is not None and key in self._constants:
            return self._constants[key]
        self._counter += 1
        name = f"{self.prefix}_const_{self._counter}"
        while name in self.graph.initializers:
            name += "_"
        value = ir.Value(name=name, shape=ir.Shape(arr.shape),
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
    constant_of = staticmethod(constant_of)

    def require_constant(self, value: ir.Value | None, what: str) -> np.ndarray:
        arr = constant_of(value)
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

    @staticmethod
    def attr(node: ir.Node, name: str, default=None):
        a = node.attributes.get(name)
        return default if a is None else a.value

    def _where(self) -> str:
        return f"node {self.node.name!r} ({self.node.op_type})" if self.node is not None else "gradient pass"

    # -- small building blocks -------------------------------------------------------------------
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
