"""Attribution from a vision transformer's attention probabilities A_l [N, heads, T, T] and their
gradients dS/dA_l (numpy only), read from models exported with ``--attention``.

    attention rollout  (Abnar & Zuidema 2020):  Â_l = fuse_heads(A_l) (mean in the paper; max, min);
                       Ã_l = (Â_l + I) / 2, rows normalized to sum 1 (the residual connection);
                       R = Ã_L ... Ã_2 Ã_1
    attention relevance (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability", the
                       self-attention rule):  Ā_l = mean_h ReLU(dS/dA_l ⊙ A_l);  R_0 = I;
                       R_l = R_{l-1} + Ā_l R_{l-1}

The map is the rows of R for the tokens the classifier reads (the class token; DeiT's class and
distillation tokens, averaged; every pooled token for a mean-pooled ViT), over the patch tokens,
on the patch grid (``ModelMetadata.attention``), then upsampled (bilinear) to the input size. The
``*_method`` functions are the method table's implementations (see :mod:`gradmap.runtime.methods`).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from gradmap import contract
from gradmap.runtime.methods import Attribution, MethodSpec

__all__ = ["attention_rollout", "attention_relevance", "token_map", "attention_rollout_method",
           "attention_relevance_method"]

_FUSIONS = {"mean": np.mean, "max": np.max, "min": np.min}


def _check(attention: np.ndarray, what: str = "attention") -> None:
    if attention.ndim != 5 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"{what} {attention.shape} must be [N, layers, heads, T, T]")


def attention_rollout(attention: np.ndarray, head_fusion: str = "mean") -> np.ndarray:
    """The rolled-out attention R [N, T, T] of attention probabilities [N, layers, heads, T, T]."""
    _check(attention)
    if head_fusion not in _FUSIONS:
        raise ValueError(f"head_fusion {head_fusion!r} is not one of {', '.join(_FUSIONS)}")
    n, layers, _, tokens, _ = attention.shape
    identity = np.eye(tokens)
    rollout = np.broadcast_to(identity, (n, tokens, tokens)).copy()
    for layer in range(layers):
        fused = _FUSIONS[head_fusion](attention[:, layer].astype(np.float64), axis=1)
        mixed = (fused + identity) / 2
        mixed /= mixed.sum(axis=-1, keepdims=True)  # rows of max/min fusion no longer sum to 1
        rollout = mixed @ rollout
    return rollout


def attention_relevance(attention: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """Chefer et al.'s relevance R [N, T, T] from attention probabilities and their gradients."""
    _check(attention)
    if gradient.shape != attention.shape:
        raise ValueError(f"attention gradient {gradient.shape} and attention {attention.shape} differ in shape")
    n, layers, _, tokens, _ = attention.shape
    relevance = np.broadcast_to(np.eye(tokens), (n, tokens, tokens)).copy()
    for layer in range(layers):
        weighted = np.maximum(gradient[:, layer].astype(np.float64) * attention[:, layer], 0).mean(axis=1)
        relevance = relevance + weighted @ relevance
    return relevance


def token_map(relevance: np.ndarray, layout: Mapping[str, Any]) -> np.ndarray:
    """[N, T, T] -> [N, h, w]: the rows of the tokens the classifier reads (averaged), over the patch
    tokens, on the patch grid; ``layout`` is the model's ``attention`` metadata."""
    prefix, (h, w) = int(layout["prefix_tokens"]), layout["grid"]
    rows = list(layout["readout"])
    patches = relevance[:, rows, prefix:].mean(axis=1)
    if patches.shape[1] != h * w:
        raise ValueError(f"{patches.shape[1]} patch tokens do not fill the {h}x{w} grid of the model's metadata")
    return patches.reshape(-1, h, w).astype(np.float32)


def _attention_map(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, relevance) -> Attribution:
    from gradmap.runtime.cam import upsample

    if spec.method.needs_gradient:
        outs = model.run_outputs(images, targets, spec.method.outputs)
    else:  # rollout reads the forward pass alone: a full export's gradient is not computed for it
        outs = model.forward_outputs(images, targets, spec.method.outputs)
    maps = token_map(relevance(outs), model.metadata.attention)
    return Attribution(upsample(maps, images.shape[2:], order=1)[:, None], outs[contract.OUTPUT_TARGET_INDEX],
                       outs[contract.OUTPUT_LOGITS])


def attention_rollout_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                             batch_size: int = 16) -> Attribution:
    """Attention rollout [N, 1, H, W] (class-agnostic), upsampled (bilinear) to the input size."""
    return _attention_map(model, spec, images, targets,
                          lambda outs: attention_rollout(outs[contract.OUTPUT_ATTENTION], spec.head_fusion))


def attention_relevance_method(model, spec: MethodSpec, images: np.ndarray, targets: np.ndarray, *,
                               batch_size: int = 16) -> Attribution:
    """Chefer et al.'s attention relevance [N, 1, H, W] for the target class, upsampled (bilinear)."""
    return _attention_map(model, spec, images, targets,
                          lambda outs: attention_relevance(outs[contract.OUTPUT_ATTENTION],
                                                           outs[contract.OUTPUT_ATTENTION_GRADIENT]))
