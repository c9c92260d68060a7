"""Hugging Face Transformers image classifiers (``AutoModelForImageClassification``): loading from a
local directory or a hub id (through the user's Hugging Face cache), preprocessing from the image
processor's config, labels from ``config.id2label``.

The image processor's steps as gradmap preprocessing (Transformers' PIL backend, which resizes with
PIL as gradmap's runtime does; its torchvision backend resizes tensors, slightly differently):

    size {height, width}                 -> resize_mode exact
    size {shortest_edge}                 -> resize_mode shorter (the longer side truncated, as there)
    size {shortest_edge} + crop_pct      -> ConvNeXT's: shortest_edge < 384: shorter int(edge / crop_pct)
                                            and a center crop to edge x edge; else exact edge x edge
    do_center_crop, crop_size            -> crop, crop_rounding floor ((size - crop) // 2, as there)
    rescale_factor r, rescale_offset     -> x r (- 1), folded with do_normalize's mean and std into
                                            gradmap's (x / 255 - mean) / std
    resize_short (PP-LCNet's, torchvision -> resize_mode keep_ratio (resize_short, resize_short): the shorter
    backend only)                           side to resize_short, both sides rounded, as there
    do_flip_channel_order (MobileViT),   -> the exported graph flips RGB to BGR before the model, so
    PP-LCNet's processor (always BGR)       the gradient is still with respect to the RGB image
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from gradmap.contract import Preprocessing
from gradmap.graph.errors import ExportError

__all__ = ["export_hf", "load_hf", "hf_preprocessing", "hf_labels", "load_reference"]

logger = logging.getLogger(__name__)

_INSTALL = "pip install 'gradmap[hf]'"
# PIL's resampling filter numbers, as Transformers stores them
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ExportError(f"exporting a Hugging Face model needs transformers: {_INSTALL}") from e
    return transformers


class _Classifier(torch.nn.Module):
    """pixel_values -> logits, with the channel flip some processors apply folded in."""

    def __init__(self, model: torch.nn.Module, flip_channels: bool):
        super().__init__()
        self.model = model
        self.flip_channels = flip_channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.flip_channels:
            image = image.flip(1)
        out = self.model(pixel_values=image)
        logits = getattr(out, "logits", None)
        if logits is None:
            # PP-LCNet's classifier returns its class scores as last_hidden_state [N, num_labels]
            scores = getattr(out, "last_hidden_state", None)
            if scores is None or scores.ndim != 2 or scores.shape[1] != self.model.config.num_labels:
                raise ExportError(f"{type(self.model).__name__} returns no logits (its output has "
                                  f"{', '.join(k for k in out.keys())})")
            logits = scores
        return logits


def _config_and_processor(source: str) -> tuple[Any, dict]:
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - hub, cache and parse failures come as many types
        where = "directory" if Path(source).is_dir() else "hub id (looked up in the Hugging Face cache)"
        raise ExportError(f"hf:{source}: cannot read a Transformers config from this {where}: "
                          f"{type(e).__name__}: {e}") from e
    try:
        processor, _ = transformers.ImageProcessingMixin.get_image_processor_dict(source)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"hf:{source}: no image processor config (preprocessor_config.json): {e}") from e
    return config, processor


def load_hf(source: str, weights: str = "pretrained", seed: int = 0) -> tuple[torch.nn.Module, str, dict, Any]:
    """Build a Transformers image classifier as a module mapping ``image`` to logits.

    Args:
        source: a local directory (``save_pretrained``'s) or a hub id in the Hugging Face cache.
        weights: ``pretrained`` (the directory's or the hub id's weights), ``none`` (random weights
            from the config, after ``torch.manual_seed(seed)``) or a state dict / ``.safetensors`` file.

    Returns:
        The module (eval mode), a description of the weights, the image processor's config and the model config.
    """
    transformers = _transformers()
    config, processor = _config_and_processor(source)
    auto = transformers.AutoModelForImageClassification
    if type(config) not in auto._model_mapping:
        names = sorted({c.model_type for c in auto._model_mapping.keys() if hasattr(c, "model_type")})
        raise ExportError(f"hf:{source}: model type {config.model_type!r} is not an image classifier "
                          f"(AutoModelForImageClassification knows {', '.join(names)})")
    kind = weights.lower()
    if kind in ("pretrained", "default"):
        try:
            model = auto.from_pretrained(source, attn_implementation="eager")
        except Exception as e:  # noqa: BLE001
            raise ExportError(f"hf:{source}: cannot load its weights ({type(e).__name__}: {e}); pass a weights file "
                              "with --weights PATH or use --weights none") from e
        desc = f"hf pretrained {Path(source).name if Path(source).is_dir() else source}"
    else:
        torch.manual_seed(seed)
        model = auto.from_config(config, attn_implementation="eager")
        desc = f"none (random, seed {seed})"
        if kind == "none":
            from ._torchvision import _fill_zero_weights

            if _fill_zero_weights(model):  # a zero-initialized head makes every logit and the gradient constant
                desc = f"none (random, seed {seed}, zero-initialized layers drawn from N(0, 0.02))"
        if kind != "none":
            from ._timm import read_state_dict

            path = Path(weights).expanduser()
            state = read_state_dict(path)
            result = model.load_state_dict(state, strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise ExportError(f"weights file {str(path)!r} does not fit hf:{source}: missing "
                                  f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
            desc = f"file:{path.name}"
    model.config.return_dict = True
    flip = flips_channels(processor)
    return _Classifier(model.eval(), flip).eval(), desc, processor, config


def flips_channels(processor: dict) -> bool:
    """Whether the processor hands the model BGR pixels: MobileViT's flag, PP-LCNet's always."""
    return bool(processor.get("do_flip_channel_order", False)) or \
        str(processor.get("image_processor_type", "")).startswith("PPLCNet")


def _size(d: Any, what: str) -> dict:
    if isinstance(d, int):
        return {"height": d, "width": d}
    if not isinstance(d, dict):
        raise ExportError(f"image processor {what} {d!r} is neither a size nor a size dict")
    return d


def hf_preprocessing(processor: dict, source: str = "") -> Preprocessing:
    """gradmap preprocessing equal to the image processor's (PIL backend) for ``processor``, a
    ``preprocessor_config.json`` dict (see the module docstring)."""
    where = f"hf:{source}: image processor" if source else "image processor"
    resample = processor.get("resample", 2)
    interpolation = _RESAMPLE.get(int(resample)) if isinstance(resample, int) else None
    if interpolation is None:
        raise ExportError(f"{where}: resample {resample!r} is not a PIL filter number")
    resize: Any = None
    mode = "shorter"
    crop = None
    if processor.get("do_resize", True) and processor.get("resize_short") is not None:
        # PP-LCNet's processor: the shorter side to resize_short, both sides rounded
        if processor.get("size_divisor") not in (None, 1):
            raise ExportError(f"{where}: size_divisor {processor['size_divisor']} (sides rounded up to its "
                              "multiples) is not supported")
        short = int(processor["resize_short"])
        resize, mode = (short, short), "keep_ratio"
    elif processor.get("do_resize", True):
        size = _size(processor.get("size"), "size")
        if "height" in size and "width" in size:
            resize, mode = (int(size["height"]), int(size["width"])), "exact"
            crop = resize
        elif set(size) == {"shortest_edge"}:
            edge = int(size["shortest_edge"])
            crop_pct = processor.get("crop_pct")
            if crop_pct is not None and processor.get("image_processor_type", "").startswith("ConvNext"):
                if edge < 384:
                    resize, crop = int(edge / crop_pct), (edge, edge)
                else:
                    resize, mode, crop = (edge, edge), "exact", (edge, edge)
            else:
                resize = edge
        else:
            raise ExportError(f"{where}: size {size} is not supported (height/width or shortest_edge)")
    if processor.get("do_center_crop", False):
        crop_size = _size(processor.get("crop_size"), "crop_size")
        crop = (int(crop_size["height"]), int(crop_size["width"]))
    if crop is None:
        raise ExportError(f"{where}: neither a fixed resize nor a center crop gives a fixed input size")
    # pixel values: (x r + offset - mean) / std with x in 0..255 = (x / 255 - mean') / std'
    rescale = float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0
    offset = -1.0 if processor.get("rescale_offset", False) else 0.0
    if processor.get("do_normalize", False):
        mean = processor.get("image_mean", (0.5, 0.5, 0.5))
        std = processor.get("image_std", (0.5, 0.5, 0.5))
        mean = [mean] * 3 if isinstance(mean, (int, float)) else list(mean)
        std = [std] * 3 if isinstance(std, (int, float)) else list(std)
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    if len(mean) != 3 or len(std) != 3:
        raise ExportError(f"{where}: image_mean/image_std need three values, got {mean}, {std}")
    k = rescale * 255.0
    gm_mean = tuple((m - offset) / k for m in mean)
    gm_std = tuple(s / k for s in std)
    return Preprocessing(crop=crop, resize=resize, resize_mode=mode, interpolation=interpolation,
                         mean=gm_mean, std=gm_std, crop_rounding="floor")


def hf_labels(config: Any) -> tuple[str, ...]:
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if sorted(id2label) != list(range(len(id2label))):
        return ()
    return tuple(id2label[i] for i in range(len(id2label)))


def export_hf(source: str, output, *, weights: str = "pretrained", seed: int = 0, **options):
    """Export a Transformers image classifier (``gradmap export hf:MODEL_ID_OR_DIR``); ``options``
    go to :func:`gradmap.export.export_module`."""
    from ._api import export_module

    module, weights_desc, processor, config = load_hf(source, weights, seed=seed)
    preprocessing = hf_preprocessing(processor, source)
    labels = hf_labels(config)
    return export_module(module, output, preprocessing=preprocessing, labels=labels or None,
                         source_model=f"hf:{source}", weights=weights_desc, **options)


def load_reference(spec: str, *, weights: str | None = None, seed: int | None = 0, metadata=None, **_ignored):
    """torch autograd of ``hf:MODEL_ID_OR_DIR`` (``gradmap verify --reference hf:...``)."""
    from ._parity import TorchReference

    weights = "pretrained" if (weights or "DEFAULT").upper() == "DEFAULT" else weights
    return TorchReference(load_hf(spec[len("hf:"):], weights, seed=seed or 0)[0])
