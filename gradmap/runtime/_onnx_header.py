"""Read the top-level fields of an ONNX file (IR version, producer, opsets) without the onnx package,
and list the external-data files its tensors point to.

An ONNX file is a serialized ``ModelProto``. Its top-level fields are few and small except the graph,
which we skip by seeking, so this reads a multi-gigabyte model in microseconds. Field numbers from
onnx.proto: ir_version=1, producer_name=2, producer_version=3, domain=4, model_version=5,
doc_string=6, graph=7, opset_import=8 (OperatorSetIdProto: domain=1, version=2), metadata_props=14,
functions=25.

:func:`read_external_data` walks every tensor that can carry external data, skipping tensor payloads
by seeking (a tensor's ``raw_data`` is never read). Field numbers used:

    ModelProto          graph=7, training_info=20 (TrainingInfoProto: initialization=1, algorithm=2),
                        functions=25 (FunctionProto: node=7)
    GraphProto          node=1, initializer=5, sparse_initializer=15
    NodeProto           attribute=5
    AttributeProto      t=5, g=6, tensors=10, graphs=11, sparse_tensor=22, sparse_tensors=23
    SparseTensorProto   values=1, indices=2
    TensorProto         name=8, external_data=13 (StringStringEntryProto: key=1, value=2),
                        data_location=14 (1 = EXTERNAL)
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import BinaryIO

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


_MAX_DEPTH = 64  # subgraph nesting (If/Loop bodies); deeper is refused rather than recursed into


class ProtobufError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass
class OnnxHeader:
    ir_version: int | None = None
    producer_name: str = ""
    producer_version: str = ""
    opsets: dict[str, int] = field(default_factory=dict)
    has_graph: bool = False
    metadata: dict[str, str] = field(default_factory=dict)  # metadata_props


def _varint(stream: BinaryIO) -> int:
    result, shift = 0, 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise ProtobufError("truncated varint")
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ProtobufError("varint too long")


def _fields(stream: BinaryIO, end: int):
    """Yield (field_number, wire_type, value) with LEN values as (offset, length), skipped."""
    while stream.tell() < end:
        key = _varint(stream)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ProtobufError("field number 0")
        if wire == _VARINT:
            yield number, wire, _varint(stream)
        elif wire == _LEN:
            length = _varint(stream)
            start = stream.tell()
            if start + length > end:
                raise ProtobufError("length-delimited field runs past the end")
            yield number, wire, (start, length)
            stream.seek(start + length)
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if len(stream.read(size)) != size:
                raise ProtobufError("truncated fixed-size field")
            yield number, wire, None
        else:
            raise ProtobufError(f"unsupported wire type {wire}")
    if stream.tell() != end:
        raise ProtobufError("message ends inside a field")


def _string(stream: BinaryIO, span: tuple[int, int]) -> str:
    here = stream.tell()
    stream.seek(span[0])
    data = stream.read(span[1])
    stream.seek(here)
    return data.decode("utf-8", errors="replace")


def read_onnx_header(path: str) -> OnnxHeader:
    """Parse the top-level ModelProto fields of the file at ``path``.

    Raises:
        ProtobufError: the file is not a protobuf message (so not an ONNX model).
    """
    header = OnnxHeader()
    with open(path, "rb") as f:
        end = f.seek(0, io.SEEK_END)
        f.seek(0)
        for number, wire, value in _fields(f, end):
            if number == 1 and wire == _VARINT:
                header.ir_version = value
            elif number == 2 and wire == _LEN:
                header.producer_name = _string(f, value)
            elif number == 3 and wire == _LEN:
                header.producer_version = _string(f, value)
            elif number == 7 and wire == _LEN:
                header.has_graph = True
            elif number == 8 and wire == _LEN:
                here = f.tell()
                f.seek(value[0])
                domain, version = "", 0
                for sub, sub_wire, sub_value in _fields(f, value[0] + value[1]):
                    if sub == 1 and sub_wire == _LEN:
                        domain = _string(f, sub_value)
                    elif sub == 2 and sub_wire == _VARINT:
                        version = sub_value
                header.opsets[domain or "ai.onnx"] = version
                f.seek(here)
            elif number == 14 and wire == _LEN:
                here = f.tell()
                f.seek(value[0])
                key, text = "", ""
                for sub, sub_wire, sub_value in _fields(f, value[0] + value[1]):
                    if sub == 1 and sub_wire == _LEN:
                        key = _string(f, sub_value)
                    elif sub == 2 and sub_wire == _LEN:
                        text = _string(f, sub_value)
                header.metadata[key] = text
                f.seek(here)
    return header


@dataclass(frozen=True)
class ExternalTensor:
    """A tensor whose data lives in another file: its name, ``location`` as written in the model
    (relative to the model's folder per the ONNX spec) and ``data_location`` (1 = EXTERNAL)."""

    name: str
    location: str | None
    data_location: int


def _sub(stream: BinaryIO, span: tuple[int, int], walk, *args) -> None:
    here = stream.tell()
    stream.seek(span[0])
    walk(stream, span[0] + span[1], *args)
    stream.seek(here)


def _tensor(stream: BinaryIO, end: int, found: list[ExternalTensor], depth: int) -> None:
    name, location, data_location, has_entries = "", None, 0, False
    for number, wire, value in _fields(stream, end):
        if number == 8 and wire == _LEN:
            name = _string(stream, value)
        elif number == 14 and wire == _VARINT:
            data_location = value
        elif number == 13 and wire == _LEN:
            has_entries = True
            here = stream.tell()
            stream.seek(value[0])
            key, entry_value = "", ""
            for sub, sub_wire, sub_value in _fields(stream, value[0] + value[1]):
                if sub == 1 and sub_wire == _LEN:
                    key = _string(stream, sub_value)
                elif sub == 2 and sub_wire == _LEN:
                    entry_value = _string(stream, sub_value)
            if key == "location":
                location = entry_value
            stream.seek(here)
    if data_location == 1 or has_entries:
        found.append(ExternalTensor(name, location, data_location))


def _sparse_tensor(stream: BinaryIO, end: int, found: list[ExternalTensor], depth: int) -> None:
    for number, wire, value in _fields(stream, end):
        if number in (1, 2) and wire == _LEN:
            _sub(stream, value, _tensor, found, depth)


def _attribute(stream: BinaryIO, end: int, found: list[ExternalTensor], depth: int) -> None:
    for number, wire, value in _fields(stream, end):
        if wire != _LEN:
            continue
        if number in (5, 10):
            _sub(stream, value, _tensor, found, depth)
        elif number in (22, 23):
            _sub(stream, value, _sparse_tensor, found, depth)
        elif number in (6, 11):
            _sub(stream, value, _graph, found, depth + 1)


def _node(stream: BinaryIO, end: int, found: list[ExternalTensor], depth: int) -> None:
    for number, wire, value in _fields(stream, end):
        if number == 5 and wire == _LEN:
            _sub(stream, value, _attribute, found, depth)


def _graph(stream: BinaryIO, end: int, found: list[ExternalTensor], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise ProtobufError(f"subgraphs nested deeper than {_MAX_DEPTH} levels")
    for number, wire, value in _fields(stream, end):
        if wire != _LEN:
            continue
        if number == 1:
            _sub(stream, value, _node, found, depth)
        elif number == 5:
            _sub(stream, value, _tensor, found, depth)
        elif number == 15:
            _sub(stream, value, _sparse_tensor, found, depth)


def _function(stream: BinaryIO, end: int, found: list[ExternalTensor], depth: int) -> None:
    for number, wire, value in _fields(stream, end):
        if number == 7 and wire == _LEN:
            _sub(stream, value, _node, found, depth)


def _training_info(stream: BinaryIO, end: int, found: list[ExternalTensor], depth: int) -> None:
    for number, wire, value in _fields(stream, end):
        if number in (1, 2) and wire == _LEN:
            _sub(stream, value, _graph, found, depth + 1)


def read_external_data(path: str) -> list[ExternalTensor]:
    """Every tensor of the model at ``path`` that points to external data (initializers, sparse
    initializers, Constant and other node attributes, subgraphs, functions, training info).

    Raises:
        ProtobufError: the file is not a well-formed protobuf message.
    """
    found: list[ExternalTensor] = []
    with open(path, "rb") as f:
        end = f.seek(0, io.SEEK_END)
        f.seek(0)
        for number, wire, value in _fields(f, end):
            if wire != _LEN:
                continue
            if number == 7:
                _sub(f, value, _graph, found, 0)
            elif number == 20:
                _sub(f, value, _training_info, found, 0)
            elif number == 25:
                _sub(f, value, _function, found, 0)
    return found
