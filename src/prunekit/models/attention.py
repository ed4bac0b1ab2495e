"""Attention rows recomputed from captured q/k, so the model itself keeps SDPA/flash attention.

A method that needs one query row of one layer (the last prompt token at an LLM layer, the [CLS]
token at a ViT layer) gets it here from that layer's own projections, instead of switching the
whole model to eager attention.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def _rope(attn: nn.Module):
    """The ``apply_rotary_pos_emb`` of the attention module's own modeling file (family-correct)."""
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise NotImplementedError(
            f"{type(attn).__name__}: no apply_rotary_pos_emb in {type(attn).__module__}"
        )
    return fn


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    B, L, _ = x.shape
    return x.view(B, L, -1, head_dim).transpose(1, 2)  # (B, H, L, hd)


def last_query_attention(
    attn: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean softmax attention of the **last** query over all keys of a decoder layer.

    Args:
        attn: the layer's self-attention module (Llama/Qwen2/Mistral/Qwen2-VL style: q_proj,
            k_proj, head_dim, scaling; optional q_norm/k_norm).
        hidden: ``(B, L, D)`` the attention's input (after the layer's input norm).
        position_embeddings: ``(cos, sin)`` each ``(B|1, L, head_dim)`` as the layer receives them.
        key_valid: ``(B, L)`` bool, False for padding keys (they get zero probability).

    Returns ``(B, L)`` float32 probabilities (each row sums to 1).
    """
    hd = attn.head_dim
    q = _heads(attn.q_proj(hidden[:, -1:]), hd)  # (B, Hq, 1, hd)
    k = _heads(attn.k_proj(hidden), hd)  # (B, Hkv, L, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings
    rope = _rope(attn)
    q = rope(q, q, cos[:, -1:], sin[:, -1:])[0]
    k = rope(k, k, cos, sin)[0]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: (B, Hq, L, hd)
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scaling  # (B, Hq, L)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)  # (B, L)


def cls_query_attention(
    q_proj: nn.Module,
    k_proj: nn.Module,
    hidden: torch.Tensor,
    num_heads: int,
    scale: float,
    cls_index: int = 0,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean softmax attention of the [CLS] query over all tokens of an (unrotated) ViT layer.

    ``hidden``: ``(B, T, D)`` the attention's input (after the block's pre-norm).
    Returns ``(B, T)`` float32 probabilities (the CLS column included).
    """
    B, T, _ = hidden.shape
    q = (
        q_proj(hidden[:, cls_index : cls_index + 1]).view(B, 1, num_heads, -1).transpose(1, 2)
    )  # (B, H, 1, hd)
    k = k_proj(hidden).view(B, T, num_heads, -1).transpose(1, 2)  # (B, H, T, hd)
    logits = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * scale  # (B, H, T)
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)  # (B, T)
