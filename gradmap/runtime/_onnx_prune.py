"""The part of an ONNX model that computes some of its outputs, cut out at the protobuf level (no
``onnx`` package: the slim runtime has none).

onnxruntime runs every node of a graph whatever outputs a run asks for, so a gradmap model asked
only for its ``logits`` still computes the gradient. :func:`prune_to_outputs` keeps the nodes those
outputs depend on (a graph's nodes are in topological order, so one backward sweep finds them), the
graph inputs and initializers they read, and copies every other field as it is: the metadata, the
opsets, the nodes' attributes and the weights' bytes are not re-encoded. A graph with subgraphs
(If, Loop, Scan), whose nodes may read outer names implicitly, is refused (:class:`ProtobufError`).
"""

from __future__ import annotations

from gradmap.runtime._onnx_header import ProtobufError

__all__ = ["prune_to_outputs"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# ModelProto.graph; GraphProto.node, initializer, input, output, value_info; NodeProto.input, output,
# attribute; AttributeProto.g, graphs; ValueInfoProto.name; TensorProto.name
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO = 1, 5, 11, 12, 13
_NODE_INPUT, _NODE_OUTPUT, _NODE_ATTRIBUTE = 1, 2, 5
_ATTRIBUTE_GRAPHS = (6, 11)
_VALUE_INFO_NAME, _TENSOR_NAME = 1, 8


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtobufError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtobufError("varint too long")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf: memoryview, start: int, end: int):
    """Yield (number, wire, value, field_start, field_end); a LEN value is its (start, end)."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            value = (pos, pos + length)
            pos += length
        elif wire in (_I64, _I32):
            value, pos = None, pos + (8 if wire == _I64 else 4)
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
        if pos > end:
            raise ProtobufError("field runs past the end of its message")
        yield number, wire, value, field_start, pos


def _strings(buf: memoryview, span: tuple[int, int], number: int) -> list[str]:
    return [bytes(buf[v[0]:v[1]]).decode("utf-8") for n, w, v, _, _ in _fields(buf, *span) if n == number and w == _LEN]


def _name(buf: memoryview, span: tuple[int, int], number: int) -> str:
    names = _strings(buf, span, number)
    return names[0] if names else ""


def _has_subgraph(buf: memoryview, span: tuple[int, int]) -> bool:
    return any(n == _NODE_ATTRIBUTE and w == _LEN and any(an in _ATTRIBUTE_GRAPHS for an, *_ in _fields(buf, *v))
               for n, w, v, _, _ in _fields(buf, *span))


def _prune_graph(buf: memoryview, span: tuple[int, int], outputs: set[str]) -> bytes:
    fields = list(_fields(buf, *span))
    declared = {_name(buf, v, _VALUE_INFO_NAME) for n, w, v, _, _ in fields if n == _GRAPH_OUTPUT and w == _LEN}
    missing = outputs - declared
    if missing:
        raise ProtobufError(f"the graph has no output {', '.join(sorted(missing))}")
    needed = set(outputs)
    keep: set[int] = set()
    for index in reversed(range(len(fields))):
        number, wire, value, _, _ = fields[index]
        if number != _GRAPH_NODE or wire != _LEN:
            continue
        if _has_subgraph(buf, value):
            raise ProtobufError("the graph has subgraphs (If, Loop, Scan): not cut")
        if needed.intersection(_strings(buf, value, _NODE_OUTPUT)):
            keep.add(index)
            needed.update(name for name in _strings(buf, value, _NODE_INPUT) if name)
    parts = []
    for index, (number, wire, value, start, end) in enumerate(fields):
        if wire == _LEN and number == _GRAPH_NODE and index not in keep:
            continue
        if wire == _LEN and number == _GRAPH_OUTPUT and _name(buf, value, _VALUE_INFO_NAME) not in outputs:
            continue
        if wire == _LEN and number in (_GRAPH_INPUT, _GRAPH_VALUE_INFO) and \
                _name(buf, value, _VALUE_INFO_NAME) not in needed:
            continue
        if wire == _LEN and number == _GRAPH_INITIALIZER and _name(buf, value, _TENSOR_NAME) not in needed:
            continue
        parts.append(buf[start:end])
    return b"".join(parts)


def prune_to_outputs(model: bytes, outputs: "tuple[str, ...] | list[str]") -> bytes:
    """A serialized ModelProto computing only ``outputs`` (names of the graph's outputs), with the
    nodes, inputs and initializers they need.

    Raises:
        ProtobufError: not a protobuf message, no graph, an output the graph does not have, or subgraphs.
    """
    buf = memoryview(model)
    parts, found = [], False
    for number, wire, value, start, end in _fields(buf, 0, len(buf)):
        if number == _MODEL_GRAPH and wire == _LEN:
            graph = _prune_graph(buf, value, set(outputs))
            parts.append(_encode_varint(_MODEL_GRAPH << 3 | _LEN) + _encode_varint(len(graph)) + graph)
            found = True
        else:
            parts.append(buf[start:end])
    if not found:
        raise ProtobufError("no graph")
    return b"".join(parts)
