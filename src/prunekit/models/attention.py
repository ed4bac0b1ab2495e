"""Attention rows recomputed from captured q/k, so the model itself keeps SDPA/flash attention.

A method that needs one query row of one layer (the last prompt token at an LLM layer, the [CLS]
token at a ViT layer) gets it here from that layer's own projections, instead of switching the
whole model to eager attention.

Precision (``dtype``, from ``prune_tokens(..., score_dtype=...)``): by default (``dtype=None``,
``score_dtype="float32"``) the logits ``q kᵀ`` are taken in float32 from the layer's q/k (which
are in the model's dtype), softmax and head mean in float32. With ``score_dtype="model"`` (``dtype``
the model's dtype, e.g. bfloat16) they are computed as the model's own eager attention computes
the probabilities it returns with ``output_attentions=True``, which is what the official code of
FastV and FasterVLM scores with: ``q kᵀ`` and ``* scaling`` in the model dtype, softmax in float32
rounded to the model dtype, head mean in the model dtype; the result is then upcast (exactly) to
float32. In half precision the two orders differ by a few ulp, enough to swap tokens at the cut.
Bit equality with the eager probabilities is tested on CPU. Only the needed query rows are
recomputed; on a GPU the matmul kernel for one row may accumulate in another order than the one
for the full map, so a rare 1-ulp difference can remain there (not measured: no GPU in the tests).
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


SCORE_DTYPES = ("float32", "model")


def score_dtype(choice: str, like: torch.Tensor) -> torch.dtype | None:
    """The ``dtype`` argument of this module's functions for a session's ``score_dtype``: ``None``
    (float32 recomputation) for ``"float32"``, the dtype of ``like`` (the model's) for ``"model"``."""
    return like.dtype if choice == "model" else None


def probabilities(logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax over the last dim: float32 (``dtype=None``), or as HF's eager attention: in float32,
    rounded to ``dtype``."""
    if dtype is None:
        return logits.softmax(dim=-1)
    return logits.softmax(dim=-1, dtype=torch.float32).to(dtype)


def decoder_logits(
    attn: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    last_only: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-head **pre-softmax** attention logits ``q k^T * scaling`` of a decoder layer, recomputed
    from its q/k, unmasked: ``(B, H, Lq, L)`` float32, or in ``dtype`` when given (see the module
    docstring) (``Lq = 1`` with ``last_only``).

    Args as :func:`decoder_attention`.
    """
    hd = attn.head_dim
    cos, sin = position_embeddings
    q_in, q_cos, q_sin = (hidden[:, -1:], cos[:, -1:], sin[:, -1:]) if last_only else (hidden, cos, sin)
    q = _heads(attn.q_proj(q_in), hd)  # (B, Hq, Lq, hd)
    k = _heads(attn.k_proj(hidden), hd)  # (B, Hkv, L, hd)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    rope = _rope(attn)
    q = rope(q, q, q_cos, q_sin)[0]
    k = rope(k, k, cos, sin)[0]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA: (B, Hq, L, hd)
    if dtype is not None:  # as the model's eager attention: product and scaling in its dtype
        return (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * attn.scaling
    return (q.float() @ k.float().transpose(-1, -2)) * attn.scaling


def causal_allowed(Lq: int, L: int, key_valid: torch.Tensor | None, device) -> torch.Tensor:
    """Which keys each of the last ``Lq`` queries may see: ``(Lq, L)``, or ``(B, 1, Lq, L)`` with
    ``key_valid (B, L)`` (padding keys hidden; a query always sees itself, so no row is empty)."""
    q_pos = torch.arange(L - Lq, L, device=device)[:, None]  # queries are the last Lq keys
    k_pos = torch.arange(L, device=device)[None, :]
    allowed = k_pos <= q_pos  # (Lq, L) causal
    if key_valid is not None:
        allowed = ((allowed[None] & key_valid[:, None, :]) | (k_pos == q_pos)[None])[:, None]
    return allowed


def decoder_attention(
    attn: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_valid: torch.Tensor | None = None,
    last_only: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-head causal softmax attention of a decoder layer, recomputed from its q/k.

    Args:
        attn: the layer's self-attention module (Llama/Qwen2/Mistral/Qwen2-VL style: q_proj,
            k_proj, head_dim, scaling; optional q_norm/k_norm).
        hidden: ``(B, L, D)`` the attention's input (after the layer's input norm).
        position_embeddings: ``(cos, sin)`` each ``(B|1, L, head_dim)`` as the layer receives them.
        key_valid: ``(B, L)`` bool, False for padding keys (they get zero probability).
        last_only: only the last query row (``Lq = 1``), O(L) instead of O(L^2).
        dtype: ``None`` (float32), or the model's dtype to score as its eager attention does.

    Returns ``(B, H, Lq, L)`` probabilities, float32 (or in ``dtype``).
    """
    logits = decoder_logits(attn, hidden, position_embeddings, last_only, dtype)  # (B, Hq, Lq, L)
    allowed = causal_allowed(logits.shape[2], logits.shape[3], key_valid, hidden.device)
    return probabilities(logits.masked_fill(~allowed, float("-inf")), dtype)


def last_query_attention(
    attn: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_valid: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Head-mean attention of the **last** query over all keys of a decoder layer: ``(B, L)`` float32
    (with ``dtype``: the mean taken in ``dtype``, as FastV's official code, then upcast)."""
    A = decoder_attention(attn, hidden, position_embeddings, key_valid, last_only=True, dtype=dtype)
    return A.mean(dim=1)[:, 0].float()


def encoder_attention(
    q_proj: nn.Module,
    k_proj: nn.Module,
    hidden: torch.Tensor,
    num_heads: int,
    scale: float,
    query: int | None = None,
    key_valid: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-head softmax attention of an (unrotated, bidirectional) ViT / encoder layer.

    ``hidden``: ``(B, T, D)`` the attention's input. ``query``: one query row only (e.g. 0 for
    [CLS]), else all. Returns ``(B, H, Tq, T)`` probabilities, float32, or in ``dtype`` computed as
    the model's eager attention (module docstring).
    """
    B, T, _ = hidden.shape
    q_in = hidden if query is None else hidden[:, query : query + 1]
    q = q_proj(q_in).view(B, q_in.shape[1], num_heads, -1).transpose(1, 2)  # (B, H, Tq, hd)
    k = k_proj(hidden).view(B, T, num_heads, -1).transpose(1, 2)  # (B, H, T, hd)
    if dtype is None:
        logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, Tq, T)
    else:
        logits = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    return probabilities(logits, dtype)


def cls_query_attention(
    q_proj: nn.Module,
    k_proj: nn.Module,
    hidden: torch.Tensor,
    num_heads: int,
    scale: float,
    cls_index: int = 0,
    key_valid: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Head-mean softmax attention of the [CLS] query over all tokens: ``(B, T)`` float32 (CLS column
    included); with ``dtype`` the mean is taken in ``dtype`` (FasterVLM's official code), then upcast."""
    A = encoder_attention(q_proj, k_proj, hidden, num_heads, scale, cls_index, key_valid, dtype)
    return A.mean(dim=1)[:, 0].float()
