"""timm classifiers: loading by name, weights, and preprocessing and labels from timm's own metadata.

The preprocessing is timm's ``transforms_imagenet_eval`` for the model's resolved data config,
written into :class:`~gradmap.contract.Preprocessing`:

    scale = floor(input_size / crop_pct)            (per side)
    crop_mode center, square scale:  Resize(scale)             -> resize_mode shorter
    crop_mode center, otherwise:     ResizeKeepRatio(scale)    -> resize_mode keep_ratio
    crop_mode squash:                Resize((scale_h, scale_w)) -> resize_mode exact
    crop_mode border:                ResizeKeepRatio(scale, longest=1) + CenterCropOrPad(fill=255 mean)
                                                               -> resize_mode keep_ratio_longest, pad_fill
    then CenterCrop(input_size), ToTensor, Normalize(mean, std), with the config's interpolation.
"""

from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path
from typing import Any

import torch

from gradmap.contract import INTERPOLATIONS, Preprocessing
from gradmap.graph.errors import ExportError

__all__ = ["export_timm", "load_timm", "preprocessing_from_config", "read_state_dict", "timm_labels",
           "timm_preprocessing", "load_reference"]

logger = logging.getLogger(__name__)

_INSTALL = "pip install 'gradmap[timm]'"


def _timm():
    try:
        import timm
    except ImportError as e:
        raise ExportError(f"exporting a timm model needs timm: {_INSTALL}") from e
    return timm


def _check_name(name: str) -> None:
    timm = _timm()
    architecture = name.split(".", 1)[0]
    if timm.is_model(architecture) and ("." not in name or name in timm.list_pretrained(name)):
        return
    known = timm.list_models() + (timm.list_pretrained(architecture + ".*") if timm.is_model(architecture) else [])
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    what = "pretrained tag" if timm.is_model(architecture) else "model"
    raise ExportError(f"unknown timm {what} {name!r}.{hint} 'python -c \"import timm; print(timm.list_models())\"' "
                      "lists the architectures, timm.list_pretrained() the tagged weights.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file (read with
    ``weights_only=True``); a checkpoint's ``state_dict``/``model`` entry is unwrapped."""
    if not path.is_file():
        raise ExportError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ExportError(f"reading {path.name} needs safetensors: pip install safetensors") from e
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
            raise ExportError(f"weights file {str(path)!r} is not a readable safetensors file: {e}") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise ExportError(
            f"weights file {str(path)!r} is neither safetensors nor a state dict loadable with "
            f"torch.load(weights_only=True): {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _explicit_attention(module: torch.nn.Module) -> torch.nn.Module:
    """Turn off timm's ``fused_attn`` in every attention block: they then compute softmax(q k^T s) v
    with plain products instead of F.scaled_dot_product_attention, the same math, which torch.onnx
    exports for queries of any rank (hiera's are 5-D: "only 4D query, key, and value are supported")."""
    for block in module.modules():
        if getattr(block, "fused_attn", False):
            block.fused_attn = False
    return module


def load_timm(name: str, weights: str = "pretrained", seed: int = 0,
              img_size: tuple[int, int] | None = None) -> tuple[torch.nn.Module, str]:
    """Build a timm classifier in eval mode.

    Args:
        name: a ``timm.list_models()`` name, optionally with a pretrained tag
            (``convnext_tiny.fb_in22k_ft_in1k``).
        weights: ``pretrained`` (timm's own loading and cache, the Hugging Face hub cache),
            ``none`` for random weights drawn after ``torch.manual_seed(seed)``, or the path of a
            state dict (``.safetensors``, or a ``torch.save`` file read with ``weights_only=True``).
        img_size: build the model for this input size where its constructor takes ``img_size``
            (ViTs and other models with position embeddings); others take any size as they are.

    Returns:
        The module and a description of the weights for the model's metadata.
    """
    timm = _timm()
    _check_name(name)
    kind = weights.lower()
    kwargs: dict[str, Any] = {}
    if img_size is not None:
        kwargs["img_size"] = tuple(img_size)

    def create(pretrained: bool) -> torch.nn.Module:
        try:
            return _explicit_attention(timm.create_model(name, pretrained=pretrained, **kwargs))
        except TypeError as e:
            if "img_size" not in str(e) or not kwargs:
                raise
            kwargs.clear()  # this architecture takes any input size without being told
            return _explicit_attention(timm.create_model(name, pretrained=pretrained))

    if kind in ("pretrained", "default"):
        try:
            module = create(True)
        except ExportError:
            raise
        except Exception as e:  # noqa: BLE001 - hub and download failures come as many types
            raise ExportError(
                f"could not load timm's pretrained weights for {name} ({type(e).__name__}: {e}). Without network, "
                "put them in the Hugging Face cache first (HF_HOME), pass the file with --weights PATH "
                "(.safetensors or a state dict), or use --weights none for random weights.") from e
        tag = module.pretrained_cfg.get("tag") or ""
        architecture = module.pretrained_cfg.get("architecture", name)
        return module.eval(), f"timm pretrained {architecture}{'.' + tag if tag else ''}"
    torch.manual_seed(seed)
    module = create(False)
    if kind == "none":
        from ._torchvision import _fill_zero_weights

        note = ", zero-initialized layers drawn from N(0, 0.02)" if _fill_zero_weights(module) else ""
        return module.eval(), f"none (random, seed {seed}{note})"
    path = Path(weights).expanduser()
    state = read_state_dict(path)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ExportError(f"weights file {str(path)!r} does not fit timm's {name}: {str(e).splitlines()[0]} "
                          f"{' '.join(str(e).splitlines()[1:3])}") from e
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(f"weights file {str(path)!r} does not fit timm's {name}: missing {result.missing_keys[:5]}, "
                          f"unexpected {result.unexpected_keys[:5]}")
    return module.eval(), f"file:{path.name}"


def timm_preprocessing(module: torch.nn.Module, input_size: tuple[int, int] | None = None) -> Preprocessing:
    """timm's evaluation transform of ``module`` (its resolved data config) as gradmap preprocessing.

    ``input_size`` replaces the config's input size (the crop); the resize follows from crop_pct."""
    from timm.data import resolve_model_data_config

    return preprocessing_from_config(resolve_model_data_config(module), input_size)


def preprocessing_from_config(config: dict, input_size: tuple[int, int] | None = None) -> Preprocessing:
    """gradmap preprocessing equal to ``timm.data.create_transform(**config, is_training=False)``."""
    if len(config["input_size"]) != 3 or config["input_size"][0] != 3:
        raise ExportError(f"gradmap exports RGB classifiers; this timm model takes input {config['input_size']}")
    size = tuple(input_size) if input_size is not None else tuple(config["input_size"][1:])
    crop_pct = config.get("crop_pct") or 0.875
    crop_mode = config.get("crop_mode") or "center"
    interpolation = config.get("interpolation") or "bilinear"
    if interpolation not in INTERPOLATIONS:
        raise ExportError(f"timm data config interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    scale = tuple(math.floor(s / crop_pct) for s in size)
    mean, std = tuple(config["mean"]), tuple(config["std"])
    common = dict(crop=size, interpolation=interpolation, mean=mean, std=std)
    if crop_mode == "squash":
        return Preprocessing(resize=scale, resize_mode="exact", **common)
    if crop_mode == "border":
        return Preprocessing(resize=scale, resize_mode="keep_ratio_longest",
                             pad_fill=tuple(round(255 * m) for m in mean), **common)
    if crop_mode != "center":
        raise ExportError(f"timm crop_mode {crop_mode!r} is not one of center, squash, border")
    if scale[0] == scale[1]:
        return Preprocessing(resize=scale[0], **common)
    return Preprocessing(resize=scale, resize_mode="keep_ratio", **common)


def timm_labels(module: torch.nn.Module) -> tuple[str, ...]:
    """Class names from timm's ImageNet metadata when the head is an ImageNet head (1k, 22k, ...);
    empty otherwise (the exporter then names classes by index)."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    num_classes = getattr(module, "num_classes", None)
    subset = infer_imagenet_subset(module)
    if not subset or not num_classes:
        return ()
    info = ImageNetInfo(subset)
    if info.num_classes() != num_classes:
        return ()
    return tuple(info.index_to_description(i) for i in range(num_classes))


def export_timm(name: str, output, *, weights: str = "pretrained", seed: int = 0,
                input_size: tuple[int, int] | None = None, **options):
    """Export a timm classifier by name (``gradmap export timm:NAME``).

    Args:
        name: a ``timm.list_models()`` name, optionally with a pretrained tag.
        weights: ``pretrained``, ``none`` or a weights file (see :func:`load_timm`).
        input_size: (height, width) instead of the data config's (a smaller input for tests; the
            resize keeps the config's crop_pct).
        options: passed on to :func:`gradmap.export.export_module` (score, backprops, ...).

    Returns:
        The :class:`~gradmap.export.ExportReport`.
    """
    from ._api import export_module

    module, weights_desc = load_timm(name, weights, seed=seed, img_size=input_size)
    preprocessing = timm_preprocessing(module, input_size)
    return export_module(module, output, preprocessing=preprocessing, labels=timm_labels(module) or None,
                         source_model=f"timm:{name}", weights=weights_desc, **options)


def load_reference(spec: str, *, weights: str | None = None, seed: int | None = 0, metadata=None, **_ignored):
    """torch autograd of ``timm:NAME`` (``gradmap verify --reference timm:NAME``), built for the input size
    of the file's ``metadata`` where the architecture takes one."""
    from ._parity import TorchReference

    size = tuple(metadata.preprocessing.crop) if metadata is not None else None
    weights = "pretrained" if (weights or "DEFAULT").upper() == "DEFAULT" else weights
    return TorchReference(load_timm(spec[len("timm:"):], weights, seed=seed or 0, img_size=size)[0])
