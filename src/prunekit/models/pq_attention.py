"""The attention function of SpAtten's progressive quantisation, plugged into transformers'
attention interface under its own name for the duration of a context manager (the model's
``config._attn_implementation`` is set back on exit, also after an exception)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..kv.quantize import PQStats, progressive_attention
from .decoder import decoder_layers

NAME = "prunekit_spatten_pq"


def _forward(module: nn.Module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    cfg = module._prunekit_pq  # set by progressive_quantization
    n_rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)  # (B, H, Lk, D)
    Lq, Lk = query.shape[2], key.shape[2]
    if attention_mask is None:  # causal, no padding: the queries are the last Lq positions
        q_pos = torch.arange(Lk - Lq, Lk, device=query.device)
        key_valid = (torch.arange(Lk, device=query.device)[None, :] <= q_pos[:, None])[None, None]
    elif attention_mask.dtype == torch.bool:
        key_valid = attention_mask[..., :Lk]
    else:  # additive
        key_valid = attention_mask[..., :Lk] > torch.finfo(attention_mask.dtype).min / 2
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = progressive_attention(query, key, value, key_valid, scale, cfg["total_bits"], cfg["msb_bits"],
                                cfg["threshold"], cfg["stats"])  # fmt: skip
    return out.transpose(1, 2).contiguous(), None  # (B, Lq, H, D), as transformers' kernels


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextmanager
def progressive_quantization(
    model: nn.Module,
    total_bits: int = 12,
    msb_bits: int = 6,
    threshold: float = 0.1,
    stats: PQStats | None = None,
) -> Iterator[PQStats]:
    """Inside the block every decoder attention of ``model`` runs SpAtten's two-pass quantised
    attention (see :mod:`prunekit.kv.quantize`); yields the :class:`PQStats` it fills (``stats``,
    or a new one)."""
    if not 0 < msb_bits < total_bits <= 16:
        raise ValueError(
            f"need 0 < msb_bits < total_bits <= 16; got msb_bits={msb_bits}, total_bits={total_bits}"
        )
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a probability in [0, 1]; got {threshold}")
    _, layers = decoder_layers(model)
    attns = [getattr(layer, "self_attn", None) for layer in layers]
    if any(a is None or not hasattr(a, "config") for a in attns):
        raise UnsupportedModelError(
            f"{type(model).__name__}: decoder layers without a transformers self_attn"
        )
    _register()
    stats = PQStats() if stats is None else stats
    cfg = {"total_bits": total_bits, "msb_bits": msb_bits, "threshold": threshold, "stats": stats}
    configs = {id(a.config): a.config for a in attns}
    old = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for a in attns:
            a._prunekit_pq = cfg
        for c in configs.values():
            c._attn_implementation = NAME
        yield stats
    finally:
        for k, c in configs.items():
            c._attn_implementation = old[k]
        for a in attns:
            a.__dict__.pop("_prunekit_pq", None)
