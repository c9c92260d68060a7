"""gradmap's torch-free runtime: run an exported gradmap model and turn its gradients into pictures.

Imports only numpy, onnxruntime, pillow, scipy, scikit-image and threadpoolctl (never torch).

    >>> from gradmap.runtime import SaliencyModel, compute_saliency
    >>> model = SaliencyModel("resnet50.gradmap.onnx", provider="cpu")
    >>> result = compute_saliency(model, "cat.jpg", target="top1")
    >>> result.predictions(5)[0].label, result.maps[0].saliency_map.shape
"""

from __future__ import annotations

from gradmap.runtime.colormaps import COLORMAPS, apply_colormap, colormap_table
from gradmap.runtime.errors import GradmapModelError, ImageLoadError, NonFiniteGradientError, TargetError
from gradmap.runtime.io import (
    DEFAULT_FORMATS,
    FORMATS,
    IMAGE_EXTENSIONS,
    OutputLayout,
    atomic_write,
    expand_inputs,
    save_npy,
    save_png,
    write_rendered,
)
from gradmap.runtime.model import ModelOutputs, SaliencyModel, TensorInfo, resolve_providers
from gradmap.runtime.postprocess import (
    PLACEMENTS,
    REDUCTIONS,
    check_finite,
    clip_percentile,
    equalize_histogram,
    map_to_original,
    normalize_min_max,
    reduce_channels,
    softmax,
    top_k,
)
from gradmap.runtime.jobs import (
    ExplainedPicture,
    JobSettings,
    RunSummary,
    explain_and_write,
    failed_record,
    run_job,
    write_outputs,
)
from gradmap.runtime.preprocess import (
    CropGeometry,
    EncodedPicture,
    center_crop_offsets,
    load_picture,
    open_picture,
    preprocess,
    resized_size,
    to_rgb,
)
from gradmap.runtime.render import RenderOptions, render_figure, render_heatmap, render_outputs, render_overlay
from gradmap.runtime.saliency import (
    ImageSaliency,
    Prediction,
    SaliencyMap,
    Target,
    compute_saliency,
    iter_saliency,
    parse_target,
)

__all__ = [
    "COLORMAPS", "DEFAULT_FORMATS", "FORMATS", "IMAGE_EXTENSIONS", "PLACEMENTS", "REDUCTIONS",
    "CropGeometry", "EncodedPicture", "ExplainedPicture", "GradmapModelError", "ImageLoadError", "ImageSaliency",
    "JobSettings", "ModelOutputs", "RunSummary",
    "NonFiniteGradientError", "OutputLayout", "Prediction", "RenderOptions", "SaliencyMap",
    "SaliencyModel", "Target", "TargetError", "TensorInfo",
    "apply_colormap", "atomic_write", "center_crop_offsets", "check_finite", "clip_percentile",
    "colormap_table", "compute_saliency", "equalize_histogram", "expand_inputs", "explain_and_write",
    "failed_record", "iter_saliency",
    "load_picture", "map_to_original", "normalize_min_max", "open_picture", "parse_target", "preprocess",
    "reduce_channels", "render_figure", "render_heatmap", "render_outputs", "render_overlay", "resized_size",
    "resolve_providers", "run_job", "save_npy", "save_png", "softmax", "to_rgb", "top_k", "write_outputs",
    "write_rendered",
]
