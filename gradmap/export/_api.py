"""Export a classifier to a gradmap ONNX model: trace, append the gradient, check, verify, save."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx_ir as ir
import torch

from gradmap.contract import ContractError, ModelMetadata, Preprocessing
from gradmap.graph.gradient import ATTENTION_KEY
from gradmap.graph import (ExportError, ExportReport, add_forward_outputs, add_gradient, check_forward_only, finish,
                           op_histogram, write_atomic)

from gradmap.graph.parity import TOLERANCE, Tolerance

from ._parity import verify_parity
from .presets import resolve
from ._torchvision import labels_of, load_torchvision, preprocessing_of
from ._trace import trace_to_onnx

__all__ = ["ExportReport", "export_module", "export_torchvision", "build_gradient_model", "verify_parity"]

logger = logging.getLogger(__name__)

MIN_OPSET = 18


def build_gradient_model(module: torch.nn.Module, input_size: tuple[int, int], *, score: str = "logit",
                         opset: int = MIN_OPSET, backprops: tuple[str, ...] = ("vanilla",),
                         cam_layer: str | None = None, target: str = "cpu",
                         channel_multiple: int | None = None, attention: bool = False,
                         gradient: bool = True) -> tuple[ir.Model, int]:
    """Trace ``module`` and append its input gradient(s), or with ``gradient=False`` a forward-only
    model's outputs alone. Returns the model and its forward node count."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: gradmap exports with opset {MIN_OPSET} or newer")
    model = trace_to_onnx(module, input_size, opset=opset)
    forward_nodes = sum(1 for _ in model.graph.all_nodes())
    if gradient:
        resolved = add_gradient(model, score=score, backprops=backprops, cam_layer=cam_layer, target=target,
                                channel_multiple=channel_multiple, attention=attention)
    else:
        resolved = add_forward_outputs(model, cam_layer=cam_layer, attention=attention)
    model.metadata_props["gradmap.cam_value"] = resolved or ""
    return model, forward_nodes


def export_module(
    module: torch.nn.Module,
    output: str | os.PathLike | None,
    *,
    preprocessing: Preprocessing,
    labels: Sequence[str] | None = None,
    source_model: str = "custom",
    weights: str = "custom",
    score: str = "logit",
    opset: int = MIN_OPSET,
    verify: bool = True,
    tolerance: Tolerance = TOLERANCE,
    backprops: Sequence[str] = ("vanilla",),
    cam_layer: str | None = None,
    target: str = "portable",
    channel_multiple: int | None = None,
    external_data: bool = False,
    preprocessing_options: Mapping[str, Any] | None = None,
    attention: bool = False,
    gradient: bool = True,
) -> ExportReport:
    """Export any ``torch.nn.Module`` image classifier to a gradmap ONNX model.

    Args:
        module: maps a float32 [N, 3, H, W] normalized image to logits [N, K]; put in eval mode.
        output: file to write, or ``None`` to build and verify only.
        preprocessing: how pictures become the model's input; ``preprocessing.crop`` is (H, W).
        labels: K class names; class indices when ``None``.
        score: ``logit``, ``probability`` or ``log_probability``: what the gradient differentiates.
        backprops: ReLU rules to emit, each a gradient output sharing the forward pass: ``vanilla``
            (always), ``guided`` (guided backpropagation), ``deconvnet``.
        cam_layer: ``auto``, a torch module name or an ONNX value name: adds that feature map and
            its gradient as outputs, for Grad-CAM, Grad-CAM++ and Guided Grad-CAM. On a vision
            transformer ``auto`` takes the last block's first LayerNorm, its tokens on the patch grid.
        attention: add every self-attention layer's probabilities and their gradient as outputs,
            for attention rollout and attention relevance (ViT, DeiT, BEiT: global attention).
        target: ``portable`` (default): the plain gradient graph every engine computes alike
            (onnxruntime CPU, web and WebGPU, OpenVINO, GPUs); gradmap's runtime lowers it for
            onnxruntime's CPU provider when it loads it, for the CPU it runs on. ``cpu``: lowered at
            export for onnxruntime's CPU provider (channel block ``channel_multiple``).
        channel_multiple: ``cpu`` only: pad feature maps with zero channels to a multiple of this
            (exact; the block of onnxruntime's CPU layout: 16 with AVX-512, the default whatever the
            exporting machine, 8 with AVX2), 0 for none.
        verify: compare logits and gradient with torch autograd before writing (recommended).
        tolerance: the parity policy (:class:`gradmap.graph.parity.Tolerance`: limits from torch's own
            float32 error on each batch, with a floor and a cap).
        external_data: write the weights to ``OUTPUT.data`` beside ``output`` (onnxruntime maps that
            file into memory instead of parsing the weights: a lower peak when the session is
            created); the two files then travel together.
        preprocessing_options: ``preset_name`` and field overrides applied to ``preprocessing``
            (:func:`gradmap.export.presets.resolve`; ``gradmap export``'s preprocessing options).
        gradient: ``False`` writes a forward-only model (``gradmap export --no-gradient``): the
            forward graph, ``target_index``, ``cam_activation`` and ``attention`` where asked, and
            the metadata, no backward pass (see :func:`check_forward_only`); the perturbation
            methods, EigenCAM and attention rollout serve it.

    Returns:
        An :class:`ExportReport`.

    Example:
        >>> report = export_module(my_model, "model.onnx",
        ...                        preprocessing=Preprocessing(crop=(224, 224), resize=256))
    """
    start = time.perf_counter()
    if preprocessing_options:
        try:
            preprocessing = resolve(preprocessing, preprocessing.crop, **preprocessing_options)
        except ContractError as e:
            raise ExportError(str(e)) from e
    module = module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    input_size = preprocessing.crop
    backprops = tuple(dict.fromkeys(["vanilla", *backprops])) if gradient else check_forward_only(backprops, target)
    try:
        model, forward_nodes = build_gradient_model(module, input_size, score=score, opset=opset,
                                                    backprops=backprops, cam_layer=cam_layer, target=target,
                                                    channel_multiple=channel_multiple, attention=attention,
                                                    gradient=gradient)
    except ExportError as e:
        if source_model == "custom" or not str(e).startswith("--cam-layer"):
            raise
        raise ExportError(f"{source_model}: {e}") from e
    cam_value = model.metadata_props.pop("gradmap.cam_value") or None
    attention_layers = model.metadata_props.pop(ATTENTION_KEY, None)
    num_classes = model.graph.outputs[0].shape[1]
    if labels is None:
        labels = [str(i) for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ExportError(f"{len(labels)} labels given for a model with {num_classes} outputs")
    metadata = ModelMetadata(source_model=source_model, weights=weights, preprocessing=preprocessing,
                             labels=tuple(labels), score=score, backprops=backprops, target=target,
                             cam_layer=None if cam_value is None else f"{cam_layer} ({cam_value})",
                             attention=json.loads(attention_layers) if attention_layers else None)
    proto = finish(model, metadata)
    report = ExportReport(
        path=None, source_model=source_model, weights=weights, score=score, forward_nodes=forward_nodes, target=target,
        backward_nodes=len(proto.graph.node) - forward_nodes,
        op_types=op_histogram(proto), gradient=gradient,
    )
    if verify:
        report.logits_error, report.gradient_error = verify_parity(
            module, proto, input_size, score=score, tolerance=tolerance, backprops=backprops)
    if output is not None:
        report.path = Path(output)
        report.data_path = write_atomic(proto, report.path, external_data=external_data)
    report.seconds = time.perf_counter() - start
    return report


def export_torchvision(
    model_name: str,
    output: str | os.PathLike | None,
    *,
    weights: str = "DEFAULT",
    score: str = "logit",
    seed: int = 0,
    opset: int = MIN_OPSET,
    verify: bool = True,
    tolerance: Tolerance = TOLERANCE,
    backprops: Sequence[str] = ("vanilla",),
    cam_layer: str | None = None,
    target: str = "portable",
    channel_multiple: int | None = None,
    external_data: bool = False,
    preprocessing_options: Mapping[str, Any] | None = None,
    attention: bool = False,
    gradient: bool = True,
) -> ExportReport:
    """Export a torchvision classifier by name (see ``gradmap export --help``)."""
    module, weights_desc = load_torchvision(model_name, weights, seed=seed)
    return export_module(
        module, output, preprocessing=preprocessing_of(model_name),
        labels=labels_of(model_name) or None, source_model=f"torchvision.models.{model_name}",
        weights=weights_desc, score=score, opset=opset, verify=verify, tolerance=tolerance,
        backprops=backprops, cam_layer=cam_layer, target=target, channel_multiple=channel_multiple,
        external_data=external_data, preprocessing_options=preprocessing_options, attention=attention,
        gradient=gradient,
    )
