"""Small predicates over the forward graph shared by the composite rules and the lowering passes."""

from __future__ import annotations

import onnx_ir as ir

from ._builder import constant_of

__all__ = ["single_use", "producer", "constant_is"]


def single_use(value: ir.Value | None, among: "set[ir.Node] | None" = None) -> bool:
    """Read by one node of the forward graph: of ``among`` when given (the forward nodes, for a
    pass over the finished graph), else of the graph. Backward nodes are not in the graph while
    the rules run (they join it at the end) but count as uses, and with several backprop rules the
    first walk's nodes already read the forward values the second walk's patterns look at."""
    if value is None or value.is_graph_output():
        return False
    if among is not None:
        return sum(1 for use in value.uses() if use.node in among) == 1
    return sum(1 for use in value.uses() if use.node.graph is not None) == 1


def producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    """The node of type ``op_type`` (default domain) that computes ``value``, else None."""
    node = value.producer() if value is not None else None
    if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx"):
        return node
    return None


def constant_is(value: ir.Value | None, expected: float, rtol: float = 0.0) -> bool:
    """``value`` is a one-element constant equal to ``expected`` (within ``rtol``)."""
    c = constant_of(value)
    return c is not None and c.size == 1 and abs(float(c.reshape(())) - expected) <= rtol * abs(expected)
