"""Attention signals for KV methods, from a layer's own q projection and its cached keys.

The cached keys already carry RoPE, so only the queries needed are projected and rotated here:
the model itself keeps SDPA (or flash) attention.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.attention import _heads, _rope


def rotated_queries(
    attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """``(B, r, Dm)`` normed hidden states of ``r`` rows -> their queries ``(B, Hq, r, hd)`` with RoPE."""
    q = _heads(attn.q_proj(hidden), attn.head_dim)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    return _rope(attn)(q, q, cos, sin)[0]


def query_probs(
    q: torch.Tensor, keys: torch.Tensor, scaling: float, q_index: torch.Tensor, key_valid: torch.Tensor
) -> torch.Tensor:
    """Softmax attention ``(B, Hq, r, L)`` (fp32) of queries ``q`` ``(B, Hq, r, hd)`` sitting at
    sequence indices ``q_index`` ``(r,)`` over ``keys`` ``(B, Hkv, L, hd)``: causal by index, padding
    keys (``key_valid`` ``(B, L)`` False) at 0; a query always sees itself."""
    B, Hq, r, hd = q.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    # GQA without copying the keys: each KV head's group of query heads as one block of rows
    qg = q.float().reshape(B, Hkv, (Hq // Hkv) * r, hd)
    logits = (qg @ keys.float().transpose(-1, -2)).view(B, Hq, r, L) * scaling  # (B, Hq, r, L)
    k_idx = torch.arange(L, device=q.device)
    allowed = (k_idx[None, :] <= q_index[:, None])[None] & key_valid[:, None, :]  # (B, r, L)
    allowed = allowed | (k_idx[None, :] == q_index[:, None])[None]
    return logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)


def window_attention(
    attn: nn.Module, hidden: torch.Tensor, pe: tuple, keys: torch.Tensor, valid: torch.Tensor, window: int
) -> torch.Tensor:
    """Attention of the last ``window`` prompt queries over every key: ``(B, Hq, w, L)``."""
    L = hidden.shape[1]
    w = max(1, min(window, L - 1))
    cos, sin = pe
    q = rotated_queries(attn, hidden[:, -w:], cos[:, -w:], sin[:, -w:])
    return query_probs(q, keys, attn.scaling, torch.arange(L - w, L, device=hidden.device), valid)


def attention_sum(
    attn: nn.Module,
    hidden: torch.Tensor,
    pe: tuple,
    keys: torch.Tensor,
    valid: torch.Tensor,
    chunk: int = 256,
) -> torch.Tensor:
    """Attention each key receives, summed over all real prompt queries: ``(B, Hq, L)``.

    Computed in chunks of ``chunk`` queries, so memory stays ``O(chunk * L)`` per head.
    """
    L = hidden.shape[1]
    cos, sin = pe
    total = None
    for s in range(0, L, chunk):
        e = min(L, s + chunk)
        q = rotated_queries(attn, hidden[:, s:e], cos[:, s:e], sin[:, s:e])
        p = query_probs(q, keys, attn.scaling, torch.arange(s, e, device=hidden.device), valid)
        p = p * valid[:, None, s:e, None]  # padding queries add nothing
        part = p.sum(dim=2)
        total = part if total is None else total + part
    return total
