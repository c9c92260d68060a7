"""The entrance for graphs gradmap did not trace itself: any ONNX image classifier.

A bare ONNX file (a model zoo's, a vendor's, ``torch.onnx``'s at an old opset, jax2onnx's,
paddle2onnx's) and what tf2onnx makes of a Keras model arrive as an ``onnx.ModelProto``.
:func:`prepare_classifier` turns it into the forward graph the gradient pass expects;
:func:`export_graph` then finishes the export as ``export_module`` does for torch modules.

    opset         older than MIN_OPSET: upgraded with onnx.version_converter
    shapes        ONNX shape inference with data propagation (tf2onnx leaves values untyped)
    image input   the float32 4-D input with 1 or 3 channels, NCHW or NHWC (--input, --layout)
    score output  the [N, K] output (or [N, K, 1, 1], [N, 1, 1, K]) that depends on it (--output)
    softmax       a trailing Softmax / LogSoftmax is cut: the score is taken before it
    interface     image [N, 3, H, W] (NCHW; a Transpose to an NHWC input, the luma of the RGB
                  picture for a 1-channel input) and logits [N, K]

Imports no framework: onnx, onnx-ir and numpy (onnxruntime for the parity check).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnx import numpy_helper

from gradmap import contract
from gradmap.contract import ModelMetadata, Preprocessing
from gradmap.graph import (ExportError, ExportReport, add_forward_outputs, add_gradient, check_forward_only, finish,
                           op_histogram, write_atomic)
from gradmap.graph.gradient import NON_DIFFERENTIABLE

__all__ = ["ClassifierGraph", "MIN_OPSET", "export_graph", "imagenet_labels", "prepare_classifier", "read_labels"]

logger = logging.getLogger(__name__)

#: The opset gradmap's gradient graphs are written in (ReduceMean and ReduceMax take their axes
#: as an input from opset 18 on); older files are upgraded to it.
MIN_OPSET = 18
LAYOUTS = ("nchw", "nhwc")

#: ITU-R 601-2 luma, the weights of PIL's ``convert("L")``: a 1-channel model sees the grey
#: picture of the RGB ``image`` (with equal mean and std on the three channels, the luma of the
#: normalized channels is the normalized luma).
LUMA = (0.299, 0.587, 0.114)

# ops a score passes through unchanged on its way to the output, before a trailing softmax
_PASS_THROUGH = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
# names the gradient pass gives to the values it adds: a source value of one of these names is renamed
_RESERVED = (contract.INPUT_IMAGE, contract.INPUT_TARGET, contract.OUTPUT_LOGITS, contract.OUTPUT_TARGET_INDEX,
             *contract.BACKPROP_OUTPUTS.values(), contract.OUTPUT_CAM_ACTIVATION, contract.OUTPUT_CAM_GRADIENT)


@dataclass
class ClassifierGraph:
    """A foreign classifier graph made ready for the gradient pass.

    ``model``'s first (only) input is ``image``, float32 [N, 3, H, W] (NCHW), its first (only)
    output ``logits`` [N, K]; every value is shape-inferred.
    """

    model: ir.Model
    input_name: str  # the image input's name in the source file
    output_name: str  # the score output's name in the source file
    layout: str  # the source input's layout, "nchw" or "nhwc"
    cut: str | None  # "Softmax" / "LogSoftmax" when the file ends in one and the score is taken before it
    notes: list[str] = field(default_factory=list)  # what was done to the graph, for the export report
    input_size: tuple[int, int] = (0, 0)  # (H, W) of ``image``
    num_classes: int = 0
    channels: int = 3  # the source input's channels (1: the graph reads the luma of ``image``)
    source_opset: int = 0  # the file's default-domain opset before any upgrade
    fixed_batch: int | None = None  # a batch size the graph fixes, else None

    @property
    def has_relu(self) -> bool:
        return any(n.op_type == "Relu" for n in self.model.graph.all_nodes())


def prepare_classifier(proto: onnx.ModelProto, *, input: str | None = None, output: str | None = None,
                       layout: str | None = None, input_size: tuple[int, int] | None = None,
                       score: str = "logit", opset: int = MIN_OPSET) -> ClassifierGraph:
    """Turn any ONNX image classifier into gradmap's forward graph (see the module doc).

    Args:
        proto: the classifier (not modified); external data already loaded.
        input: the image input's name, when the graph has several candidates.
        output: the score output's name, when the graph has several candidates.
        layout: ``nchw`` or ``nhwc``, when the input's shape does not tell.
        input_size: (height, width) for an input whose height and width are symbolic.
        score: ``logit``, ``probability`` or ``log_probability`` (only for the report's note: a
            trailing softmax is cut in every case, and gradmap's seed applies the score's own).
        opset: the default-domain opset an older file is upgraded to (at least :data:`MIN_OPSET`).

    Raises:
        ExportError: naming the input or output and why the graph cannot be used.

    Example:
        >>> graph = prepare_classifier(onnx.load("mobilenet.onnx"), layout="nhwc", input_size=(224, 224))
        >>> graph.model.graph.inputs[0].name, graph.cut
        ('image', 'Softmax')
    """
    if layout is not None and layout not in LAYOUTS:
        raise ExportError(f"--layout {layout!r}: choose nchw or nhwc")
    if score not in contract.SCORE_KINDS:
        raise ExportError(f"unknown score kind {score!r}; choose one of {', '.join(contract.SCORE_KINDS)}")
    if input_size is not None:
        input_size = _checked_size(input_size)
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: gradmap's gradient graphs need opset {MIN_OPSET} or newer")
    notes: list[str] = []
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    source_opset = _default_opset(work)
    _per_activation_batch_norms(work, notes)
    work = _upgrade_opset(work, source_opset, opset, notes)
    _drop_initializer_inputs(work)
    _asymmetric_upsampling(work, source_opset, notes)
    if work.functions:
        work = onnx.inliner.inline_local_functions(work)
        notes.append("inlined the file's local functions")
    image_info, source_layout, channels = _find_image_input(work.graph, input, layout)
    size = _fix_spatial_size(work, image_info, source_layout, input_size)
    work = _infer_shapes(work, notes)
    if _fold_shape_arithmetic(work, notes):
        work = _infer_shapes(work, notes)

    model = ir.serde.deserialize_model(work)
    graph = model.graph
    _explicit_pads(graph, notes)
    image = next(v for v in graph.inputs if v.name == image_info.name)
    batch = image.shape[0] if image.shape is not None else None
    fixed_batch = batch if isinstance(batch, int) else None
    score_value = _find_score_output(graph, image, output)
    output_name = score_value.name
    score_value, cut = _cut_softmax(score_value, notes, score)
    logits = _as_scores(graph, score_value, fixed_batch, notes)
    num_classes = logits.shape[1] if logits.shape is not None else None

    for value in _all_values(graph):
        if value.name in _RESERVED and value is not image:
            value.name = _unique(graph, f"{value.name}_source")
    new_image = _nchw_image(graph, image, source_layout, channels, size, notes)
    graph.outputs.clear()
    graph.outputs.append(logits)
    logits.name = contract.OUTPUT_LOGITS
    ir_passes.RemoveUnusedNodesPass()(model)
    ir_passes.RemoveUnusedOpsetsPass()(model)
    graph.sort()
    model.ir_version = max(model.ir_version or 0, 8)  # opset 18 needs IR version 8
    # the values the rewrite added get their shapes from ONNX's own inference
    model = ir.serde.deserialize_model(_infer_shapes(ir.serde.serialize_model(model)))
    logits = model.graph.outputs[0]
    if logits.shape is None or len(logits.shape) != 2 or not isinstance(logits.shape[1], int):
        raise ExportError(f"the score output {output_name!r} has shape {_shape_text(logits)} after the rewrite; "
                          "gradmap needs [N, K] with a static number of classes K")
    num_classes = logits.shape[1]
    del new_image
    return ClassifierGraph(model=model, input_name=image_info.name, output_name=output_name, layout=source_layout,
                           cut=cut, notes=notes, input_size=size, num_classes=num_classes, channels=channels,
                           source_opset=source_opset, fixed_batch=fixed_batch)


# -- the file as it comes -------------------------------------------------------------------------

def _checked_size(size) -> tuple[int, int]:
    try:
        height, width = (int(s) for s in size)
    except (TypeError, ValueError) as e:
        raise ExportError(f"--input-size {size!r}: give the height and width, e.g. 224,224") from e
    if height <= 0 or width <= 0:
        raise ExportError(f"--input-size {size!r}: height and width must be positive")
    return height, width


def _drop_initializer_inputs(proto: onnx.ModelProto) -> None:
    """Files before IR version 4 list every initializer among the graph inputs too (the opset
    converter still wants them there): they are weights, not inputs."""
    weights = {t.name for t in proto.graph.initializer}
    if any(i.name in weights for i in proto.graph.input):
        kept = [i for i in proto.graph.input if i.name not in weights]
        del proto.graph.input[:]
        proto.graph.input.extend(kept)


def _per_activation_batch_norms(proto: onnx.ModelProto, notes: list[str]) -> None:
    """BatchNormalization with ``spatial=0`` (opsets 7 and 8: statistics per activation, shaped
    [C, H, W]) has no counterpart in later opsets: it becomes its formula,
    (X - mean) / Sqrt(var + epsilon) * scale + B, in ops every opset has (onnx.version_converter
    refuses it).
    """
    nodes = []
    rewritten = 0
    for node in proto.graph.node:
        spatial = next((a.i for a in node.attribute if a.name == "spatial"), 1)
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx") and spatial == 0:
            x, scale, bias, mean, var = node.input[:5]
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            prefix = f"{node.name or node.output[0]}_gradmap_bn"
            eps_name = f"{prefix}_epsilon"
            proto.graph.initializer.append(numpy_helper.from_array(np.asarray(eps, np.float32), eps_name))
            helper = onnx.helper
            nodes += [helper.make_node("Sub", [x, mean], [f"{prefix}_centered"]),
                      helper.make_node("Add", [var, eps_name], [f"{prefix}_var"]),
                      helper.make_node("Sqrt", [f"{prefix}_var"], [f"{prefix}_std"]),
                      helper.make_node("Div", [f"{prefix}_centered", f"{prefix}_std"], [f"{prefix}_normalized"]),
                      helper.make_node("Mul", [f"{prefix}_normalized", scale], [f"{prefix}_scaled"]),
                      helper.make_node("Add", [f"{prefix}_scaled", bias], [node.output[0]])]
            rewritten += 1
        else:
            nodes.append(node)
    if rewritten:
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
        notes.append(f"{rewritten} BatchNormalization node(s) with spatial=0 written as their formula")


def _asymmetric_upsampling(proto: onnx.ModelProto, source_opset: int, notes: list[str]) -> None:
    """Upsample (opsets 7 to 9, deprecated since) maps output pixel i to input i / scale, as Resize's
    ``asymmetric`` coordinates with ``floor`` rounding; onnx.version_converter turns it into a Resize
    with Resize's defaults (``half_pixel``), which changes a linear upsampling's values. Resize came
    with opset 10, so in a file older than that every Resize is a converted Upsample: they get
    Upsample's coordinates back. An Upsample left in a newer file becomes such a Resize."""
    helper = onnx.helper
    count = 0
    for i, node in enumerate(proto.graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Upsample":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
            proto.graph.node[i].CopyFrom(helper.make_node(
                "Resize", [node.input[0], "", node.input[1]], list(node.output), name=node.name, mode=mode))
            node = proto.graph.node[i]
        elif node.op_type != "Resize" or source_opset >= 10:
            continue
        kept = [a for a in node.attribute if a.name not in ("coordinate_transformation_mode", "nearest_mode")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.extend([helper.make_attribute("coordinate_transformation_mode", "asymmetric"),
                               helper.make_attribute("nearest_mode", "floor")])
        count += 1
    if count:
        notes.append(f"{count} Upsample node(s) as Resize with Upsample's asymmetric coordinates")


def _default_opset(proto: onnx.ModelProto) -> int:
    versions = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise ExportError("the model imports no version of the default ONNX opset")
    return max(versions)


def _upgrade_opset(proto: onnx.ModelProto, opset: int, wanted: int, notes: list[str]) -> onnx.ModelProto:
    if opset >= wanted:
        return proto
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(proto, wanted)
    except Exception as e:  # the converter raises RuntimeError, ValidationError, IndexError...
        message = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"onnx.version_converter cannot upgrade the model from opset {opset} to {wanted}, "
                          f"which gradmap's gradient graph needs: {message}") from e
    notes.append(f"opset {opset} upgraded to {wanted} (onnx.version_converter)")
    return upgraded


def _infer_shapes(proto: onnx.ModelProto, notes: list[str] | None = None) -> onnx.ModelProto:
    """ONNX shape inference with data propagation. Annotations the file carries that contradict its
    own graph (jax2onnx 0.17 writes some NHWC shapes on NCHW values) are dropped and inferred anew;
    a graph whose every shape cannot be inferred keeps what can be."""
    inference = onnx.shape_inference
    try:
        return inference.infer_shapes(proto, data_prop=True, strict_mode=True)
    except Exception as first:  # InferenceError, or a schema error of an op inference cannot type
        if proto.graph.value_info:
            cleared = onnx.ModelProto()
            cleared.CopyFrom(proto)
            del cleared.graph.value_info[:]
            try:
                inferred = inference.infer_shapes(cleared, data_prop=True, strict_mode=True)
                if notes is not None:
                    notes.append("the file's shape annotations contradict its graph: inferred anew "
                                 f"({str(first).strip().splitlines()[-1][:160]})")
                return inferred
            except Exception:
                pass
        try:
            return inference.infer_shapes(proto, data_prop=True)
        except Exception as e:  # InferenceError on an inconsistent graph
            raise ExportError(f"ONNX shape inference fails on the model: {str(e).strip()[:400]}") from e


#: Ops of the shape arithmetic exporters write (torch.onnx's TorchScript exporter computes a Reshape's
#: target from Shape, Gather, Div and Concat) that :func:`_fold_shape_arithmetic` evaluates.
_SHAPE_ARITHMETIC = {"Shape", "Gather", "Concat", "Div", "Mul", "Add", "Sub", "Cast", "Slice", "Squeeze",
                     "Unsqueeze", "Constant", "Floor", "Ceil", "Range", "Identity", "Equal", "Where", "ReduceProd",
                     "Max", "Min", "Neg", "Abs", "Mod", "Size", "ConstantOfShape", "Expand", "Reshape"}
_FOLD_LIMIT = 4096  # elements: larger results stay computed (they are data, not shapes)


def _fold_shape_arithmetic(proto: onnx.ModelProto, notes: list[str]) -> int:
    """Replace by constants what the fixed input size determines: each Shape of a value whose shape is
    static, and each shape-arithmetic node whose inputs are all constants and whose result is small.

    ONNX's data propagation stops at ops such as Div, so a Reshape whose target torch.onnx computed
    (ShuffleNet's channel shuffle) would otherwise keep symbolic dimensions, which the gradient rules
    need static. Returns the number of nodes folded."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    opset = _default_opset(proto)
    shapes = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = _tensor_dims(info)
        if dims is not None and all(isinstance(d, int) and d > 0 for d in dims):
            shapes[info.name] = dims
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    kept, folded = [], {}
    for node in graph.node:
        values = None
        if node.domain in ("", "ai.onnx") and node.op_type in _SHAPE_ARITHMETIC and not any(
                o in outputs for o in node.output):
            if node.op_type == "Shape" and node.input[0] in shapes:
                dims = shapes[node.input[0]]
                start = next((a.i for a in node.attribute if a.name == "start"), 0)
                end = next((a.i for a in node.attribute if a.name == "end"), len(dims))
                values = [np.asarray(dims[start:end] if end else dims[start:], dtype=np.int64)]
            elif node.op_type != "Shape" and all(i == "" or i in constants for i in node.input):
                try:
                    single = helper.make_model(
                        helper.make_graph([node], "fold", [], [helper.make_value_info(o, onnx.TypeProto())
                                                               for o in node.output],
                                          [numpy_helper.from_array(constants[i], i) for i in node.input if i]),
                        opset_imports=[helper.make_opsetid("", opset)])
                    values = [np.asarray(v) for v in ReferenceEvaluator(single).run(None, {})]
                except Exception:  # an op the reference cannot evaluate: left to the graph
                    values = None
        if values is not None and all(v.size <= _FOLD_LIMIT for v in values):
            for name, value in zip(node.output, values):
                constants[name] = value
                folded[name] = value
            continue
        kept.append(node)
    if not folded:
        return 0
    used = {i for n in kept for i in n.input} | outputs
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items() if k in used)
    notes.append(f"{len(folded)} value(s) of shape arithmetic fixed by the input size folded to constants")
    return len(folded)


def _tensor_dims(info: onnx.ValueInfoProto) -> list | None:
    """[int | str | None] per axis (a dim_param's name, None when unknown), or None without a shape."""
    tensor = info.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]


def _elem_name(elem: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem).name
    except Exception:  # undefined or string types
        return onnx.TensorProto.DataType.Name(elem).lower()


def _layout_of(dims: list, layout: str | None) -> tuple[str, int] | str:
    """(layout, channels) of a 4-D input, or why it is not an image input."""
    if layout is not None:
        axis = 1 if layout == "nchw" else 3
        d = dims[axis]
        if isinstance(d, int) and d not in (1, 3):
            return f"{d} channels on axis {axis} ({layout.upper()}), not 1 or 3"
        return layout, d if isinstance(d, int) else 3
    first, last = dims[1] in (1, 3), dims[3] in (1, 3)
    if first and not last:
        return "nchw", dims[1]
    if last and not first:
        return "nhwc", dims[3]
    if first and last:
        return f"shape {_dims_text(dims)}: axis 1 and axis 3 could both hold the channels (give --layout)"
    if not isinstance(dims[1], int) and not isinstance(dims[3], int):
        return f"shape {_dims_text(dims)}: the channel count is not fixed (give --layout)"
    return f"shape {_dims_text(dims)}: no axis of 1 or 3 channels at position 1 (NCHW) or 3 (NHWC)"


def _dims_text(dims) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _find_image_input(graph: onnx.GraphProto, name: str | None, layout: str | None):
    """(value info, layout, channels) of the image input; refuses with the candidates' reasons."""
    inputs = list(graph.input)
    if not inputs:
        raise ExportError("the model has no input")
    reasons = {}
    found = []
    for info in inputs:
        if name is not None and info.name != name:
            continue
        elem = info.type.tensor_type.elem_type
        dims = _tensor_dims(info)
        if not info.type.HasField("tensor_type"):
            reasons[info.name] = "not a tensor"
        elif elem != onnx.TensorProto.FLOAT:
            reasons[info.name] = f"{_elem_name(elem)}, not float32"
        elif dims is None or len(dims) != 4:
            reasons[info.name] = f"rank {len(dims) if dims is not None else 'unknown'}, not 4"
        else:
            verdict = _layout_of(dims, layout)
            if isinstance(verdict, str):
                reasons[info.name] = verdict
            else:
                found.append((info, *verdict))
    names = ", ".join(repr(i.name) for i in inputs)
    if name is not None and not found and name not in reasons:
        raise ExportError(f"--input {name!r}: the model has no input of that name (its inputs: {names})")
    if not found:
        why = "; ".join(f"{n!r}: {r}" for n, r in reasons.items())
        raise ExportError(f"no image input: gradmap needs a float32 4-D input with 1 or 3 channels, NCHW or NHWC "
                          f"({why})")
    if len(found) > 1:
        raise ExportError("several inputs could be the image: " + ", ".join(repr(f[0].name) for f in found)
                          + "; choose one with --input NAME")
    info = found[0][0]
    others = [i.name for i in inputs if i.name != info.name]
    if others:
        raise ExportError(f"the model has other inputs besides the image {info.name!r}: {', '.join(map(repr, others))}; "
                          "gradmap models take the picture alone (fix the others as constants in the file)")
    return found[0]


def _fix_spatial_size(proto: onnx.ModelProto, info: onnx.ValueInfoProto, layout: str,
                      size: tuple[int, int] | None) -> tuple[int, int]:
    """The (H, W) of the image input, written into the graph where it is symbolic."""
    dims = info.type.tensor_type.shape.dim
    axes = (2, 3) if layout == "nchw" else (1, 2)
    channel_axis = 1 if layout == "nchw" else 3
    if not dims[channel_axis].HasField("dim_value"):  # --layout on an input of symbolic channels
        dims[channel_axis].Clear()
        dims[channel_axis].dim_value = 3
        del proto.graph.value_info[:]
    have = [dims[a].dim_value if dims[a].HasField("dim_value") else None for a in axes]
    if all(h is not None for h in have):
        if size is not None and tuple(size) != tuple(have):
            raise ExportError(f"--input-size {size[0]},{size[1]}: the input {info.name!r} is fixed at "
                              f"{have[0]}x{have[1]}")
        return have[0], have[1]
    if size is None:
        raise ExportError(f"the input {info.name!r} has a symbolic height or width "
                          f"({_dims_text(_tensor_dims(info))}): give --input-size H,W")
    for axis, want, known in zip(axes, size, have):
        if known is not None and known != want:
            raise ExportError(f"--input-size {size[0]},{size[1]}: the input {info.name!r} fixes axis {axis} at {known}")
        dims[axis].Clear()
        dims[axis].dim_value = want
    # annotations written for the symbolic size would contradict the fixed one: inference redoes them
    del proto.graph.value_info[:]
    return size


# -- the graph: score output, softmax, interface ----------------------------------------------------

_WINDOWED = ("Conv", "MaxPool", "AveragePool", "LpPool")


def _explicit_pads(graph: ir.Graph, notes: list[str]) -> None:
    """``auto_pad`` SAME_UPPER / SAME_LOWER / VALID (jax2onnx, paddle2onnx, TensorFlow's "same") as the
    explicit ``pads`` they stand for, from the input's static size: out = ceil(in / stride), the
    padding split evenly with the odd one at the end (UPPER) or the beginning (LOWER)."""
    count = 0
    for node in graph.all_nodes():
        if node.op_type not in _WINDOWED or node.domain not in ("", "ai.onnx"):
            continue
        mode = node.attributes.get_string("auto_pad", "NOTSET")
        if mode == "NOTSET":
            continue
        x = node.inputs[0]
        spatial = list(x.shape)[2:] if x.shape is not None else None
        if node.op_type == "Conv":
            w = node.inputs[1]
            kernel = node.attributes.get_ints("kernel_shape", None) or (list(w.shape)[2:] if w.shape else None)
        else:
            kernel = node.attributes.get_ints("kernel_shape", None)
        if spatial is None or kernel is None or not all(isinstance(d, int) for d in [*spatial, *kernel]):
            continue  # the rule names the problem
        rank = len(spatial)
        strides = list(node.attributes.get_ints("strides", [1] * rank))
        dilations = list(node.attributes.get_ints("dilations", [1] * rank))
        begin, end = [0] * rank, [0] * rank
        if mode in ("SAME_UPPER", "SAME_LOWER"):
            for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
                total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
                small, large = total // 2, total - total // 2
                begin[i], end[i] = (large, small) if mode == "SAME_LOWER" else (small, large)
        node.attributes.pop("auto_pad")
        node.attributes["pads"] = ir.AttrInt64s("pads", begin + end)
        count += 1
    if count:
        notes.append(f"auto_pad written as explicit pads on {count} node(s)")


def _shape_text(value: ir.Value) -> str:
    if value.shape is None:
        return "unknown"
    return "[" + ", ".join(str(d) for d in value.shape) + "]"


def _depends_on(graph: ir.Graph, source: ir.Value) -> set[ir.Value]:
    """Values a gradient can flow to from ``source`` (as the gradient pass sees it)."""
    depends = {source}
    for node in graph:
        if node.op_type in NON_DIFFERENTIABLE and node.domain in ("", "ai.onnx"):
            continue
        if any(v is not None and v in depends for v in node.inputs):
            depends.update(node.outputs)
    return depends


def _class_axis(value: ir.Value) -> int | None:
    """The axis holding the classes of a score value shaped [N, K], [N, K, 1, 1], [N, 1, 1, K]...:
    the one non-batch axis longer than 1; None for other shapes."""
    if value.shape is None or len(value.shape) < 2:
        return None
    rest = list(value.shape)[1:]
    long = [i + 1 for i, d in enumerate(rest) if not (isinstance(d, int) and d == 1)]
    if len(rest) == 1:
        return 1
    if len(long) == 1 and isinstance(value.shape[long[0]], int):
        return long[0]
    return None


def _find_score_output(graph: ir.Graph, image: ir.Value, name: str | None) -> ir.Value:
    outputs = list(graph.outputs)
    depends = _depends_on(graph, image)
    names = ", ".join(repr(o.name) for o in outputs)
    if name is not None:
        chosen = [o for o in outputs if o.name == name]
        if not chosen:
            raise ExportError(f"--output {name!r}: the model has no output of that name (its outputs: {names})")
        value = chosen[0]
        if value not in depends:
            raise ExportError(f"the output {name!r} does not depend on the input {image.name!r} through "
                              "differentiable ops")
        if value.dtype != ir.DataType.FLOAT:
            raise ExportError(f"the output {name!r} is {value.dtype}, not float32")
        if _class_axis(value) is None and not _rank1_scores(value, image):
            raise ExportError(f"the output {name!r} has shape {_shape_text(value)}; gradmap needs scores "
                              "[N, K] (or [N, K, 1, 1])")
        return value
    reasons = {}
    found = []
    for value in outputs:
        if value not in depends:
            reasons[value.name] = "does not depend on the image"
        elif value.dtype != ir.DataType.FLOAT:
            reasons[value.name] = f"{value.dtype}, not float32"
        elif _class_axis(value) is None and not _rank1_scores(value, image):
            reasons[value.name] = f"shape {_shape_text(value)}, not [N, K]"
        else:
            found.append(value)
    if not found:
        why = "; ".join(f"{n!r}: {r}" for n, r in reasons.items())
        raise ExportError(f"no score output: gradmap needs a float32 [N, K] output that depends on the image ({why})")
    if len(found) > 1:
        raise ExportError("several outputs could be the scores: " + ", ".join(
            f"{v.name!r} {_shape_text(v)}" for v in found) + "; choose one with --output NAME")
    return found[0]


def _rank1_scores(value: ir.Value, image: ir.Value) -> bool:
    """Scores [K] of a graph fixed at batch 1 (an exporter that squeezed the batch away)."""
    return (value.shape is not None and len(value.shape) == 1 and isinstance(value.shape[0], int)
            and image.shape is not None and image.shape[0] == 1)


def _cut_softmax(value: ir.Value, notes: list[str], score: str) -> tuple[ir.Value, str | None]:
    """The value before a trailing Softmax / LogSoftmax over the classes, and which it was."""
    current = value
    while True:
        node = current.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return value, None
        if node.op_type in ("Softmax", "LogSoftmax"):
            break
        if node.op_type not in _PASS_THROUGH:
            return value, None
        current = node.inputs[0]
    before = node.inputs[0]
    axis = _class_axis(before)
    rank = len(before.shape) if before.shape is not None else None
    node_axis = node.attributes.get_int("axis", -1)
    if axis is None or rank is None or node_axis % rank != axis:
        return value, None
    what = {"logit": "gradmap differentiates the value before it (--score logit)",
            "probability": "gradmap's probability seed applies the same softmax (--score probability)",
            "log_probability": "gradmap's log-probability seed applies the same log-softmax (--score log_probability)"}
    notes.append(f"the file ends in {node.op_type} ({node.name or 'unnamed'}): the score is taken before it; "
                 + what[score])
    return before, node.op_type


def _as_scores(graph: ir.Graph, value: ir.Value, fixed_batch: int | None, notes: list[str]) -> ir.Value:
    """``value`` as [N, K]: flattened from [N, K, 1, 1] and the like, unsqueezed from [K]."""
    if value.shape is None or len(value.shape) == 2:
        return value
    if len(value.shape) == 1:
        node = ir.node("Unsqueeze", [value, _int64_constant(graph, [0])])
        notes.append(f"scores {_shape_text(value)} unsqueezed to [1, K]")
    else:
        node = ir.node("Flatten", [value], attributes={"axis": 1})
        notes.append(f"scores {_shape_text(value)} flattened to [N, K]")
    graph.append(node)
    return node.outputs[0]


def _int64_constant(graph: ir.Graph, values) -> ir.Value:
    array = np.asarray(values, dtype=np.int64)
    value = ir.Value(name=_unique(graph, "gradmap_const"), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.INT64), const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def _nchw_image(graph: ir.Graph, source: ir.Value, layout: str, channels: int, size: tuple[int, int],
                notes: list[str]) -> ir.Value:
    """Make ``image`` [N, 3, H, W] the graph's input, feeding ``source`` (the file's input)
    through the luma of a 1-channel input and the Transpose to an NHWC one."""
    batch = source.shape[0] if source.shape is not None else "N"
    if layout == "nchw" and channels == 3:
        source.name = contract.INPUT_IMAGE
        return source
    image = ir.Value(name=contract.INPUT_IMAGE, shape=ir.Shape([batch, 3, *size]),
                     type=ir.TensorType(ir.DataType.FLOAT))
    x = image
    added = []
    if channels == 1:
        weight = ir.Value(name=_unique(graph, "gradmap_luma"), shape=ir.Shape([1, 3, 1, 1]),
                          type=ir.TensorType(ir.DataType.FLOAT),
                          const_value=ir.tensor(np.asarray(LUMA, dtype=np.float32).reshape(1, 3, 1, 1)))
        graph.register_initializer(weight)
        node = ir.node("Conv", [x, weight], attributes={"kernel_shape": [1, 1]}, name="gradmap_luma")
        added.append(node)
        x = node.outputs[0]
        notes.append("the model reads one channel: it gets the luma of the RGB image "
                     f"({' R + '.join(str(c) for c in LUMA)} B, as PIL's convert('L'))")
    if layout == "nhwc":
        consumers = [use.node for use in source.uses()]
        folded = [n for n in consumers if n.op_type == "Transpose" and n.domain in ("", "ai.onnx")
                  and list(n.attributes.get_ints("perm", [])) == [0, 3, 1, 2]]
        for node in folded:  # tf2onnx's own Transpose back to NCHW: the two cancel
            node.outputs[0].replace_all_uses_with(x)
        if len(folded) < len(consumers):
            node = ir.node("Transpose", [x], attributes={"perm": [0, 2, 3, 1]}, name="gradmap_to_nhwc")
            added.append(node)
            source.replace_all_uses_with(node.outputs[0])
            notes.append("NHWC input: the NCHW image is transposed to it")
        else:
            notes.append("NHWC input: its Transpose to NCHW now reads the NCHW image directly")
    else:
        source.replace_all_uses_with(x)
    graph.inputs.clear()
    graph.inputs.append(image)
    if added:
        graph.insert_before(next(iter(graph)), added) if len(graph) else graph.extend(added)
    return image


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from node.outputs


def _unique(graph: ir.Graph, name: str) -> str:
    taken = {v.name for v in _all_values(graph)}
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{name}_{i}"
    return candidate


# -- labels -------------------------------------------------------------------------------------------

#: ``--labels`` values that name a shipped class list instead of a file.
NAMED_LABELS = {
    "imagenet": "ImageNet's 1000 classes (torchvision's names)",
    "imagenet-background": "a background class, then ImageNet's 1000 (TF-slim and other 1001-class heads)",
}


def imagenet_labels() -> tuple[str, ...]:
    """ImageNet-1k's class names in index order (torchvision's names), shipped with gradmap: Keras'
    ``decode_predictions`` downloads its list, and a bare ONNX file carries none."""
    from importlib import resources

    text = resources.files("gradmap.export").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


def read_labels(spec: str) -> tuple[str, ...]:
    """Class names from ``--labels``: a name of :data:`NAMED_LABELS`, or a file with one name per line
    (a trailing empty line ignored) or a JSON list of names."""
    import json

    if spec == "imagenet":
        return imagenet_labels()
    if spec == "imagenet-background":
        return ("background", *imagenet_labels())
    path = Path(spec)
    if not path.is_file():
        raise ExportError(f"--labels {spec}: no such file (or give {' or '.join(NAMED_LABELS)})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(f"--labels {spec}: cannot read it as UTF-8 text: {e}") from e
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExportError(f"--labels {spec}: not a valid JSON list: {e}") from e
        if not isinstance(labels, list) or not all(isinstance(x, (str, int)) for x in labels):
            raise ExportError(f"--labels {spec}: the JSON must be a list of class names")
        labels = [str(x) for x in labels]
    else:
        labels = text.splitlines()
        while labels and not labels[-1].strip():
            labels.pop()
        labels = [line.strip() for line in labels]
    if not labels:
        raise ExportError(f"--labels {spec}: the file lists no class")
    return tuple(labels)


def _default_labels(num_classes: int, notes: list[str]) -> tuple[str, ...]:
    if num_classes == 1000:
        notes.append("labels: ImageNet's 1000 classes (1000 outputs and no --labels)")
        return imagenet_labels()
    if num_classes == 1001:
        notes.append("labels: class indices; a 1001-class head with a background class first takes "
                     "--labels imagenet-background")
    return tuple(str(i) for i in range(num_classes))


# -- the export -----------------------------------------------------------------------------------

def resolve_cam_layer(graph: ClassifierGraph, cam_layer: str | None) -> str | None:
    """The NCHW feature map for Grad-CAM, as a value name of ``graph.model``.

    ``auto`` first asks the gradient pass (the input of the last global pooling, or the map
    flattened into the classifier); in graphs converted from NHWC frameworks the pooled map is
    NHWC (tf2onnx: ``Transpose(perm=[0, 2, 3, 1])`` then ``ReduceMean(axes=[1, 2])``; jax2onnx:
    ``ReduceSum(axes=[1, 2])`` then ``Div``): then the Transpose's NCHW input is the map, or an NCHW
    view is spliced in. A NAME that a Transpose turns
    from NCHW to NHWC or back is taken on its NCHW side. A map the gradient pass finds flattened into
    the classifier (Keras' ``Flatten``, as in VGG16: tf2onnx's ``Transpose(perm=[0, 2, 3, 1])`` then
    ``Reshape``), and a NAME, are NHWC where their producers say so (:func:`_map_layout`): they are taken
    on their NCHW side too.
    """
    if cam_layer is None:
        return None
    from gradmap.graph.gradient._pass import differentiable_nodes, find_cam_layer

    model_graph = graph.model.graph
    image, logits = model_graph.inputs[0], model_graph.outputs[0]
    nodes, _ = differentiable_nodes(model_graph, image, logits)
    if cam_layer != "auto":
        value = next((o for n in nodes for o in n.outputs if o.name == cam_layer), None)
        if value is None:
            return cam_layer  # the gradient pass names the problem
        return _nchw_side(model_graph, value, nhwc=_map_layout(value) == "nhwc")
    try:
        found = find_cam_layer(model_graph, nodes, "auto")
    except ExportError:
        pooled = _pooled_map(nodes)
        if pooled is None:
            raise
        return _nchw_side(model_graph, *pooled)
    if found.layout == "nchw" and _map_layout(found.value) == "nhwc":
        return _nchw_side(model_graph, found.value, nhwc=True)
    return found.name


#: ops whose 4-D output has the layout of their first 4-D input
_LAYOUT_KEEPING = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip",
                   "Softplus", "Erf", "Neg", "Abs", "Sqrt", "Exp", "Identity", "Dropout", "Add", "Sub", "Mul", "Div",
                   "Max", "Min", "Sum", "Mean", "Pow", "Cast"}
#: ops that only take (and give) NCHW maps
_NCHW_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "BatchNormalization", "InstanceNormalization",
             "LRN", "DepthToSpace", "SpaceToDepth"}


def _map_layout(value: ir.Value) -> str | None:
    """``"nhwc"`` or ``"nchw"`` for a 4-D value whose producers tell (a Transpose to NHWC or NCHW, or an
    op that works on NCHW maps, through elementwise ops), else None."""
    for _ in range(64):
        producer = value.producer()
        if producer is None or value.shape is None or len(value.shape) != 4:
            return None
        if producer.op_type == "Transpose":
            perm = list(producer.attributes.get_ints("perm", []))
            return {(0, 2, 3, 1): "nhwc", (0, 3, 1, 2): "nchw"}.get(tuple(perm))
        if producer.op_type in _NCHW_OPS:
            return "nchw"
        if producer.op_type not in _LAYOUT_KEEPING:
            return None
        inputs = [v for v in producer.inputs if v is not None and v.shape is not None and len(v.shape) == 4
                  and v.producer() is not None]
        if not inputs:
            return None
        value = inputs[0]
    return None


def _pooled_map(nodes: list[ir.Node]) -> tuple[ir.Value, bool] | None:
    """(map, is NHWC) of the last global pooling on the path to the logits that the gradient pass
    does not look for: a ReduceMean, ReduceMax or ReduceSum (JAX's mean is a ReduceSum and a Div)
    over axes 1 and 2 of an [N, h, w, C] map, or a ReduceSum over axes 2 and 3 of an [N, C, h, w] one."""
    from gradmap.graph.gradient._builder import constant_of

    for node in reversed(nodes):
        if node.op_type not in ("ReduceMean", "ReduceMax", "ReduceSum") or len(node.inputs) < 2:
            continue
        x = node.inputs[0]
        axes = constant_of(node.inputs[1])
        if x.shape is None or len(x.shape) != 4 or axes is None:
            continue
        axes = sorted(int(a) % 4 for a in axes.reshape(-1))
        spatial = [1, 2] if axes == [1, 2] else [2, 3] if axes == [2, 3] and node.op_type == "ReduceSum" else None
        if spatial and all(isinstance(x.shape[a], int) and x.shape[a] > 1 for a in spatial):
            return x, spatial == [1, 2]
    return None


def _nchw_side(graph: ir.Graph, value: ir.Value, nhwc: bool = False) -> str:
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and \
            list(producer.attributes.get_ints("perm", [])) == [0, 2, 3, 1]:
        return producer.inputs[0].name
    for use in value.uses():
        node = use.node
        if node.op_type == "Transpose" and list(node.attributes.get_ints("perm", [])) == [0, 3, 1, 2]:
            return node.outputs[0].name
    if not nhwc:
        return value.name
    # an NHWC map without a Transpose beside it: splice in an NCHW view and its way back
    uses = [(u.node, u.idx) for u in value.uses()]
    to_nchw = ir.node("Transpose", [value], attributes={"perm": [0, 3, 1, 2]}, name=_unique(graph, "gradmap_cam_nchw"))
    back = ir.node("Transpose", [to_nchw.outputs[0]], attributes={"perm": [0, 2, 3, 1]},
                   name=_unique(graph, "gradmap_cam_nhwc"))
    for node, index in uses:
        node.replace_input_with(index, back.outputs[0])
    n, h, w, c = value.shape
    to_nchw.outputs[0].name = _unique(graph, f"{value.name}_nchw")
    to_nchw.outputs[0].shape, to_nchw.outputs[0].type = ir.Shape([n, c, h, w]), value.type
    back.outputs[0].name = _unique(graph, f"{value.name}_nhwc")
    back.outputs[0].shape, back.outputs[0].type = ir.Shape(value.shape), value.type
    graph.insert_after(value.producer(), [to_nchw, back]) if value.producer() is not None else \
        graph.insert_before(next(iter(graph)), [to_nchw, back])
    return to_nchw.outputs[0].name


def export_graph(graph: ClassifierGraph, output: str | os.PathLike | None, *, preprocessing: Preprocessing,
                 labels: Sequence[str] | None = None, source_model: str = "onnx", weights: str = "from the file",
                 score: str = "logit", backprops: Sequence[str] = ("vanilla",), cam_layer: str | None = None,
                 cam_label: str | None = None, target: str = "portable", channel_multiple: int | None = None,
                 external_data: bool = False, verify: bool = True, reference=None,
                 extra: Mapping[str, object] | None = None, gradient: bool = True) -> ExportReport:
    """Append the gradient to a prepared foreign graph, check it against ``reference`` and write it.

    Args:
        graph: from :func:`prepare_classifier`; its model is modified (the gradient is appended).
        output: file to write, or ``None`` to build and verify only.
        preprocessing: how pictures become ``image``; its crop must be the graph's input size.
        labels: K class names; ``None``: ImageNet's for 1000 classes, else class indices.
        reference: a float64 reference of the same classifier (:class:`gradmap.graph.parity.Reference`
            protocol: ``run`` and ``run_float32``); ``None``: the float64 evaluation of the graph itself
            (:mod:`gradmap.export._onnx_reference`).
        extra: more entries for the metadata's ``extra`` (what a source needs to rebuild its reference).
        cam_label: how the metadata names ``cam_layer`` (a source's own layer name for a value it resolved).
        gradient: ``False``: a forward-only model, its logits checked against ``reference.logits``.
        The other arguments are ``export_module``'s.

    Returns:
        An :class:`ExportReport` whose ``notes`` say what was done to the graph.
    """
    start = time.perf_counter()
    backprops = tuple(dict.fromkeys(["vanilla", *backprops])) if gradient else check_forward_only(backprops, target)
    if tuple(preprocessing.crop) != tuple(graph.input_size):
        raise ExportError(f"the preprocessing crops {preprocessing.crop[0]}x{preprocessing.crop[1]} but the model "
                          f"takes {graph.input_size[0]}x{graph.input_size[1]}")
    modified = [b for b in backprops if b != "vanilla"]
    if modified and not graph.has_relu:
        raise ExportError(f"--backprop {' '.join(modified)} changes how gradients pass ReLUs, and this graph has no "
                          "Relu node (its activations are other ops): the map would be the vanilla gradient")
    num_classes = graph.num_classes
    notes = list(graph.notes)
    labels = _default_labels(num_classes, notes) if labels is None else tuple(labels)
    if len(labels) != num_classes:
        raise ExportError(f"{len(labels)} labels given for a model with {num_classes} outputs")
    if verify and reference is None:
        from ._onnx_reference import OnnxReference

        reference = OnnxReference(graph.model)
    model = graph.model
    cam_name = resolve_cam_layer(graph, cam_layer)
    forward_nodes = sum(1 for _ in model.graph.all_nodes())
    if gradient:
        cam_value = add_gradient(model, score=score, backprops=backprops, cam_layer=cam_name, target=target,
                                 channel_multiple=channel_multiple)
    else:
        cam_value = add_forward_outputs(model, cam_layer=cam_name)
    extra = {"source_input": graph.input_name, "source_output": graph.output_name, "source_layout": graph.layout,
             "source_opset": graph.source_opset, **(extra or {})}
    if graph.cut:
        extra["cut"] = graph.cut
    metadata = ModelMetadata(source_model=source_model, weights=weights, preprocessing=preprocessing, labels=labels,
                             score=score, backprops=backprops, target=target, extra=extra,
                             cam_layer=None if cam_value is None else f"{cam_label or cam_layer} ({cam_value})")
    proto = finish(model, metadata)
    report = ExportReport(path=None, source_model=source_model, weights=weights, score=score,
                          forward_nodes=forward_nodes, backward_nodes=len(proto.graph.node) - forward_nodes,
                          target=target, op_types=op_histogram(proto), notes=notes,
                          reference=getattr(reference, "name", "none"), gradient=gradient)
    if verify and not gradient:
        from gradmap.graph.parity import verify_forward

        report.logits_error = verify_forward(proto, reference, input_size=graph.input_size,
                                             batch=graph.fixed_batch or 2, attempts=6).logits_error
    elif verify:
        report.logits_error, report.gradient_error = check_parity(
            proto, reference, graph.input_size, score=score, backprops=backprops, fixed_batch=graph.fixed_batch,
            notes=report.notes)
        report.notes.extend(getattr(reference, "notes", ()))
    if output is not None:
        report.path = Path(output)
        report.data_path = write_atomic(proto, report.path, external_data=external_data)
    report.seconds = time.perf_counter() - start
    return report


# -- parity ---------------------------------------------------------------------------------------

def check_parity(proto: onnx.ModelProto, reference, input_size: tuple[int, int], *, score: str,
                 backprops: tuple[str, ...], fixed_batch: int | None = None, attempts: int = 6, seed: int = 0,
                 notes: list[str] | None = None) -> tuple[float, float]:
    """Logits and gradients of the written model (onnxruntime, CPU) against ``reference`` in float64
    on random batches, under the policy every source shares (:func:`gradmap.graph.parity.verify_model`:
    limits from the reference's own float32 error on each batch, a batch that misses drawn again).
    Returns (logits error, gradient error)."""
    from gradmap.graph.parity import verify_model

    result = verify_model(proto, reference, input_size=input_size, score=score, backprops=backprops,
                          batch=fixed_batch or 2, seed=seed, attempts=attempts)
    return result.logits_error, result.gradient_error
