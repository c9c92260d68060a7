"""Read the top-level fields of an ONNX file (IR version, producer, opsets) without the onnx package.

An ONNX file is a serialized ``ModelProto``. Its top-level fields are few and small except the graph,
which we skip by seeking, so this reads a multi-gigabyte model in microseconds. Field numbers from
onnx.proto: ir_version=1, producer_name=2, producer_version=3, domain=4, model_version=5,
doc_string=6, graph=7, opset_import=8 (OperatorSetIdProto: domain=1, version=2), metadata_props=14.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import BinaryIO

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class ProtobufError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass
class OnnxHeader:
    ir_version: int | None = None
    producer_name: str = ""
    producer_version: str = ""
    opsets: dict[str, int] = field(default_factory=dict)
    has_graph: bool = False


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
    return header
