"""Loading torchvision classifiers and reading their preprocessing and labels from weight metadata."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import torch
import torchvision

from gradmap.contract import Preprocessing
from gradmap.graph.errors import ExportError

__all__ = ["classifier_names", "load_torchvision", "preprocessing_of", "labels_of", "input_size_of", "load_reference"]

logger = logging.getLogger(__name__)


def classifier_names() -> list[str]:
    """The image classification models of ``torchvision.models`` (80 in torchvision 0.2x)."""
    return list(torchvision.models.list_models(module=torchvision.models))


def _check_name(name: str) -> None:
    names = classifier_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ExportError(
            f"unknown model {name!r}: not one of torchvision's {len(names)} classification models.{hint} "
            "'python -c \"import torchvision; print(torchvision.models.list_models(module=torchvision.models))\"' lists them."
        )


def _default_weights(name: str):
    return torchvision.models.get_model_weights(name).DEFAULT


def preprocessing_of(name: str) -> Preprocessing:
    """The evaluation preprocessing of the model's default torchvision weights."""
    _check_name(name)
    transform = _default_weights(name).transforms()
    crop = transform.crop_size
    resize = transform.resize_size
    if len(resize) != 1:  # torchvision's presets resize the shorter side; keep that contract explicit
        raise ExportError(f"{name}: unsupported resize size {resize} in its torchvision preset")
    return Preprocessing(
        crop=(crop[0], crop[0]) if len(crop) == 1 else tuple(crop),
        resize=int(resize[0]),
        interpolation=transform.interpolation.value,
        mean=tuple(transform.mean),
        std=tuple(transform.std),
    )


def input_size_of(name: str) -> tuple[int, int]:
    return preprocessing_of(name).crop


def labels_of(name: str) -> tuple[str, ...]:
    categories = _default_weights(name).meta.get("categories")
    return tuple(categories) if categories else ()


def load_torchvision(name: str, weights: str = "DEFAULT", seed: int = 0) -> tuple[torch.nn.Module, str]:
    """Build a torchvision classifier in eval mode.

    Args:
        name: one of :func:`classifier_names`.
        weights: a weights name of that model (``DEFAULT``, ``IMAGENET1K_V1``, ...) fetched by
            torchvision's own mechanism (its cache under ``$TORCH_HOME``), ``none`` for random
            weights drawn after ``torch.manual_seed(seed)``, or the path of a state-dict file, read
            with ``torch.load(weights_only=True)``.

    Returns:
        The module and a description of the weights for the model's metadata.
    """
    _check_name(name)
    if weights.lower() == "none":
        torch.manual_seed(seed)
        module = torchvision.models.get_model(name, weights=None)
        notes = []
        if name in _FIXED_STD_INIT:
            _he_init(module)
            notes.append("He init")
        if _fill_zero_weights(module):
            notes.append("zero-initialized layers drawn from N(0, 0.02)")
        return module.eval(), f"none (random, seed {seed}{''.join(', ' + n for n in notes)})"

    path = Path(weights).expanduser()
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt") or path.exists():
        if not path.is_file():
            raise ExportError(f"weights file {str(path)!r} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
            raise ExportError(
                f"weights file {str(path)!r} is not a state dict loadable with torch.load(weights_only=True): {e}"
            ) from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ExportError(f"weights file {str(path)!r} holds a {type(state).__name__}, not a state dict")
        # Build the module as torchvision does for its pretrained weights (GoogLeNet and Inception
        # v3 then normalize inputs differently), so official checkpoints saved to disk load as-is.
        torch.manual_seed(seed)
        module = _build_like_pretrained(name)
        try:
            result = module.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise ExportError(f"weights file {str(path)!r} does not fit {name}: {str(e).splitlines()[0]}") from e
        # Auxiliary classifiers (GoogLeNet, Inception v3) play no part in evaluation.
        missing = [k for k in result.missing_keys if not k.startswith("aux")]
        if missing or result.unexpected_keys:
            raise ExportError(
                f"weights file {str(path)!r} does not fit {name}: "
                f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
        _drop_aux(module)
        return module.eval(), f"file:{path.name}"

    enum = torchvision.models.get_model_weights(name)
    try:
        weight = enum.DEFAULT if weights.upper() == "DEFAULT" else enum[weights]
    except KeyError:
        options = ", ".join(["DEFAULT", *enum.__members__])
        raise ExportError(f"unknown weights {weights!r} for {name}; choose one of {options}, 'none' or a file path") from None
    try:
        module = torchvision.models.get_model(name, weights=weight)
    except Exception as e:  # noqa: BLE001 - download failures surface as many exception types
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weight.url).name
        raise ExportError(
            f"could not load {name} weights {weight} ({type(e).__name__}: {e}). Without network, place the file "
            f"{Path(weight.url).name} at {cache} (torchvision's cache; set TORCH_HOME to move it), pass a "
            "local state-dict file with --weights PATH, or use --weights none for random weights."
        ) from e
    return module.eval(), str(weight)


# torchvision draws these models' weights from a truncated normal of fixed std (0.01 / 0.1).
# With BatchNorm at its initial statistics, activations then vanish (GoogLeNet ends at 1e-11) or
# explode (Inception v3's logits reach 1e12) and float32 rounding swamps the result: that, not the
# exporter, is why a random Inception v3 disagrees with torch. He initialization keeps them sane.
_FIXED_STD_INIT = ("googlenet", "inception_v3")


@torch.no_grad()
def _he_init(module: torch.nn.Module) -> None:
    """He-normal convolutions and linear layers, unit-scale normalizations.

    The norms matter for Transformers' EfficientNet, whose init draws BatchNorm scales from
    N(0, 0.02): with them, activations shrink 50x per layer and end in subnormal floats.
    """
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, norms) and getattr(m, "weight", None) is not None:
            torch.nn.init.ones_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)


@torch.no_grad()
def _fill_zero_weights(module: torch.nn.Module) -> bool:
    """torchvision zero-initializes some layers (the ViT classification head), which makes every
    logit constant and the input gradient identically zero: nothing to see, nothing to verify.
    Random weights for export draw such layers from N(0, 0.02^2) instead, like the other heads."""
    filled = False
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not torch.any(m.weight):
            torch.nn.init.trunc_normal_(m.weight, std=0.02)
            filled = True
    return filled


def _build_like_pretrained(name: str) -> torch.nn.Module:
    builder = torchvision.models.get_model_builder(name)
    if name in ("googlenet", "inception_v3"):
        return builder(weights=None, transform_input=True, aux_logits=True, init_weights=False)
    return builder(weights=None)


def _drop_aux(module: torch.nn.Module) -> None:
    if getattr(module, "aux_logits", False):
        module.aux_logits = False
        for attr in ("aux1", "aux2", "AuxLogits"):
            if hasattr(module, attr):
                setattr(module, attr, None)


def load_reference(spec: str, *, weights: str | None = None, seed: int | None = 0, metadata=None, **_ignored):
    """torch autograd of the torchvision model ``spec`` (``gradmap verify --reference resnet50``)."""
    from ._parity import TorchReference

    return TorchReference(load_torchvision(spec, weights or "DEFAULT", seed=seed or 0)[0])
