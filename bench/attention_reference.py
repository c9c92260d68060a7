"""Attention rollout and attention relevance as their papers state them, in torch: the independent
reference that tests/test_vit_methods.py checks gradmap's maps against and bench/bench_forward.py
times them against.

    rollout   (Abnar & Zuidema 2020):  fuse the heads (mean; max, min), add the identity for the
              residual connection, renormalize the rows, multiply layer by layer;
    relevance (Chefer, Gur & Wolf 2021, eq. 5-6 for self-attention):  R = I;
              R += E_h[(dS/dA ⊙ A)+] R, layer by layer.

Both return the class token's row over the patch tokens. :func:`write_out_attention` gives a
torchvision ViT's probabilities as tensors of the autograd graph (its ``nn.MultiheadAttention``
asks for no weights and runs a fused kernel).
"""

from __future__ import annotations

import torch

__all__ = ["rollout", "relevance", "write_out_attention"]

_FUSIONS = {"mean": lambda a: a.mean(dim=1), "max": lambda a: a.amax(dim=1), "min": lambda a: a.amin(dim=1)}


def rollout(attentions: list[torch.Tensor], head_fusion: str = "mean", prefix: int = 1) -> torch.Tensor:
    """[N, patches]: the rolled-out attention of the class token, from each layer's probabilities
    [N, heads, T, T]; ``prefix`` tokens (class, register) precede the patches."""
    tokens = attentions[0].shape[-1]
    eye = torch.eye(tokens, dtype=attentions[0].dtype)
    result = eye.expand(attentions[0].shape[0], tokens, tokens)
    for a in attentions:
        a = (_FUSIONS[head_fusion](a) + eye) / 2
        result = (a / a.sum(dim=-1, keepdim=True)) @ result
    return result[:, 0, prefix:]


def relevance(attentions: list[torch.Tensor], gradients: list[torch.Tensor], prefix: int = 1) -> torch.Tensor:
    """[N, patches]: Chefer et al.'s relevance of the class token, from each layer's probabilities
    and their gradients [N, heads, T, T]."""
    tokens = attentions[0].shape[-1]
    result = torch.eye(tokens, dtype=attentions[0].dtype).expand(attentions[0].shape[0], tokens, tokens)
    for a, g in zip(attentions, gradients):
        result = result + (g * a).clamp(min=0).mean(dim=1) @ result
    return result[:, 0, prefix:]


def write_out_attention(module: torch.nn.Module) -> list[torch.Tensor]:
    """Replace the attention of every encoder layer of torchvision ViT ``module`` by the same
    computation written out (in-projection, per-head softmax(q k^T / sqrt(d)), out-projection), and
    return the list each forward appends the layers' probabilities [N, heads, T, T] to (the caller
    clears it between calls). The logits are the module's own up to float rounding."""
    kept: list[torch.Tensor] = []

    def attention(mha):
        def forward(query, key, value, need_weights=False):
            n, tokens, channels = query.shape
            heads = mha.num_heads
            q, k, v = (query @ mha.in_proj_weight.T + mha.in_proj_bias).chunk(3, dim=-1)
            q, k, v = (t.reshape(n, tokens, heads, channels // heads).transpose(1, 2) for t in (q, k, v))
            probabilities = torch.softmax(q @ k.transpose(-2, -1) / (channels // heads) ** 0.5, dim=-1)
            kept.append(probabilities)
            out = (probabilities @ v).transpose(1, 2).reshape(n, tokens, channels)
            return mha.out_proj(out), None
        return forward

    for layer in module.encoder.layers:
        layer.self_attention.forward = attention(layer.self_attention)
    return kept
