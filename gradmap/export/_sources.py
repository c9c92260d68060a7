"""Where ``gradmap export MODEL`` finds MODEL: torchvision by name, ``timm:NAME``, ``hf:MODEL_ID_OR_DIR``,
``onnx:PATH``, ``keras:NAME|PATH``."""

from __future__ import annotations

import os

__all__ = ["SOURCES", "export_named_model"]

#: Prefixes of MODEL and what they name; a name without one is a torchvision model.
SOURCES = {
    "timm:": "a timm.list_models() name, optionally with a pretrained tag",
    "hf:": "a Hugging Face Transformers image classifier: a local directory or a hub id in the HF cache",
    "onnx:": "any ONNX image classifier file (no torch needed)",
    "keras:": "a keras.applications name or a saved Keras model (.keras; .h5 and SavedModel with --trust-model)",
}


def export_named_model(model_name: str, output: str | os.PathLike | None, *, weights: str = "DEFAULT",
                       seed: int = 0, **options):
    """Export MODEL from its source (see :data:`SOURCES`); ``options`` go to ``export_module``
    (``export_onnx`` for ``onnx:PATH``).

    ``weights``: for torchvision a weights name, ``none`` or a file; for timm and Hugging Face
    ``DEFAULT``/``pretrained`` (the source's own weights and cache), ``none`` (random, seeded) or a
    file (a state dict or ``.safetensors``).
    """
    if model_name.startswith("timm:"):
        from ._timm import export_timm

        return export_timm(model_name[len("timm:"):], output, weights=_pretrained(weights), seed=seed, **options)
    if model_name.startswith("onnx:"):
        from ._onnx_file import export_onnx

        return export_onnx(model_name[len("onnx:"):], output, weights=weights, seed=seed, **options)
    if model_name.startswith("keras:"):
        from ._keras import export_keras

        return export_keras(model_name[len("keras:"):], output, weights=weights, seed=seed, **options)
    if model_name.startswith("hf:"):
        from ._hf import export_hf

        return export_hf(model_name[len("hf:"):], output, weights=_pretrained(weights), seed=seed, **options)
    from ._api import export_torchvision

    return export_torchvision(model_name, output, weights=weights, seed=seed, **options)


def _pretrained(weights: str) -> str:
    return "pretrained" if weights.upper() == "DEFAULT" else weights
