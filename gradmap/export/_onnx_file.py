"""``gradmap export onnx:PATH``: any ONNX image classifier file, exported without torch.

The file is untrusted input. Before onnx parses it, it passes the runtime's own checks
(:mod:`gradmap.runtime._onnx_header`, :func:`gradmap.runtime.model.check_external_data`): a
protobuf header with an IR version and a graph, and external data only from regular files inside
the model's folder. Every failure is an :class:`~gradmap.graph.ExportError` naming the file and
the reason. Then :func:`gradmap.export._foreign.prepare_classifier` makes it gradmap's forward
graph, and its float64 evaluation (:mod:`gradmap.export._onnx_reference`) is the parity reference.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import onnx

from gradmap.contract import ContractError, Preprocessing
from gradmap.graph import ExportError, ExportReport

from ._foreign import MIN_OPSET, export_graph, prepare_classifier, read_labels

__all__ = ["MAX_MODEL_BYTES", "export_onnx", "load_onnx", "load_reference"]

#: The largest model (file and external data together) the exporter reads: it holds the model in one
#: protobuf message, which cannot exceed 2 GiB.
MAX_MODEL_BYTES = 2**31 - 1


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an untrusted ONNX file, external data included, after the runtime's checks.

    Raises:
        ExportError: missing, empty, not ONNX, external data outside the model's folder or missing,
            over 2 GiB, or failing ``onnx.checker``; the message names the file.
    """
    from gradmap.runtime._onnx_header import ProtobufError, read_onnx_header
    from gradmap.runtime.errors import GradmapModelError
    from gradmap.runtime.model import check_external_data

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ExportError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ExportError(f"{path}: not a file")
    try:
        size = os.path.getsize(path)
        if size == 0:
            raise ExportError(f"{path}: not an ONNX model (empty file)")
        header = read_onnx_header(path)
    except ProtobufError as e:
        raise ExportError(f"{path}: not an ONNX model (unparseable: {e})") from e
    except OSError as e:
        raise ExportError(f"{path}: cannot read it: {e.strerror or e}") from e
    if header.ir_version is None or not header.has_graph:
        raise ExportError(f"{path}: not an ONNX model (no IR version or no graph)")
    try:
        data_files = check_external_data(path)
    except GradmapModelError as e:
        raise ExportError(str(e)) from e
    total = size + sum(os.path.getsize(f) for f in data_files)
    if total > MAX_MODEL_BYTES:
        raise ExportError(f"{path}: the model and its external data hold {total / 2**30:.1f} GiB; the exporter "
                          "holds a model in one protobuf message, which cannot exceed 2 GiB")
    try:
        proto = onnx.load(path, load_external_data=bool(data_files))
    except Exception as e:  # DecodeError, OSError, onnx's own checks of data locations
        raise ExportError(f"{path}: onnx cannot read it: {str(e).strip()[:300]}") from e
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: not a valid ONNX model (onnx.checker: "
                          f"{(str(e).strip().splitlines() or ['?'])[0][:300]})") from e
    return proto


def _labels(labels: str | Sequence[str] | None) -> Sequence[str] | None:
    if labels is None or not isinstance(labels, str):
        return labels
    return read_labels(labels)


def export_onnx(
    path: str | os.PathLike,
    output: str | os.PathLike | None,
    *,
    input_name: str | None = None,
    output_name: str | None = None,
    layout: str | None = None,
    input_size: tuple[int, int] | None = None,
    labels: str | Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
    preprocessing_options: Mapping[str, Any] | None = None,
    score: str = "logit",
    opset: int = MIN_OPSET,
    verify: bool = True,
    backprops: Sequence[str] = ("vanilla",),
    cam_layer: str | None = None,
    target: str = "portable",
    channel_multiple: int | None = None,
    external_data: bool = False,
    weights: str = "DEFAULT",
    seed: int = 0,
    gradient: bool = True,
) -> ExportReport:
    """Export the ONNX image classifier at ``path`` (see ``gradmap export --help``).

    Args:
        path: the ``.onnx`` file (its external data beside it).
        input_name, output_name: the image input and the score output, where the graph has several.
        layout: ``nchw`` or ``nhwc`` where the input's shape does not tell.
        input_size: (height, width) where the graph leaves them symbolic (default: ``--crop``).
        labels: class names, a ``--labels`` value (a file or ``imagenet``, ``imagenet-background``), or
            ``None`` (ImageNet's names for 1000 classes, else indices).
        preprocessing: the whole preprocessing; else ``preprocessing_options``: ``preset_name`` (a
            :data:`gradmap.export.presets.PRESETS` name, required: a file carries no convention) and
            field overrides.
        opset: what an older file's opset is upgraded to.
        weights, seed: accepted for the CLI's sake; a file brings its own weights.
        The other arguments are :func:`gradmap.export._foreign.export_graph`'s.

    Example:
        >>> export_onnx("mobilenet.onnx", "mobilenet.gradmap.onnx", layout="nhwc",
        ...             preprocessing_options={"preset_name": "keras-tf"})
    """
    start = time.perf_counter()
    if str(weights).upper() not in ("DEFAULT", "PRETRAINED"):
        raise ExportError(f"--weights {weights}: an ONNX file brings its own weights")
    options = dict(preprocessing_options or {})
    if input_size is None and options.get("crop") is not None:
        crop = options["crop"]
        input_size = (crop, crop) if isinstance(crop, int) else tuple(crop)
    proto = load_onnx(path)
    graph = prepare_classifier(proto, input=input_name, output=output_name, layout=layout, input_size=input_size,
                               score=score, opset=opset)
    del proto
    if preprocessing is None:
        from .presets import resolve

        try:
            preprocessing = resolve(None, graph.input_size, **options)
        except ContractError as e:
            raise ExportError(str(e)) from e
    name = os.path.basename(os.fspath(path))
    report = export_graph(graph, output, preprocessing=preprocessing, labels=_labels(labels),
                          source_model=f"onnx:{name}", weights=f"from {name}", score=score, backprops=backprops,
                          cam_layer=cam_layer, target=target, channel_multiple=channel_multiple,
                          external_data=external_data, verify=verify, gradient=gradient)
    report.seconds = time.perf_counter() - start
    return report


def load_reference(spec: str, *, metadata=None, input_name: str | None = None, output_name: str | None = None,
                   layout: str | None = None, input_size: tuple[int, int] | None = None, **_ignored):
    """The float64 reference of ``onnx:PATH`` for ``gradmap verify``: the file's own graph evaluated in
    float64 (:class:`gradmap.export._onnx_reference.OnnxReference`), prepared as the export prepared it.

    ``metadata``: the written model's :class:`~gradmap.contract.ModelMetadata`, whose extras name the
    source file's image input, score output and layout, and whose crop is the input size."""
    from ._onnx_reference import OnnxReference

    if metadata is not None:
        extra = dict(metadata.extra)
        input_name = input_name or extra.get("source_input")
        output_name = output_name or extra.get("source_output")
        layout = layout or extra.get("source_layout")
        input_size = input_size or tuple(metadata.preprocessing.crop)
    path = spec[len("onnx:"):] if spec.startswith("onnx:") else spec
    graph = prepare_classifier(load_onnx(path), input=input_name, output=output_name, layout=layout,
                               input_size=input_size)
    return OnnxReference(graph.model)
