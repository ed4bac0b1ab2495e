"""SnapKV — "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al., 2024).
Baseline.

Per layer, after prefill: the last ``window`` prompt tokens are the observation window; each
earlier key is scored by the attention the window's queries pay it (softmax over all keys, causal,
averaged over the window), smoothed along the sequence by 1-D pooling (``kernel``); the window
itself is always kept (score = max + 1, as kvpress ``SnapKVPress``). The top ``keep`` entries per
head survive. The window's rows are recomputed from the layer's q projection and the cached keys,
so SDPA stays on.

**Which heads select** (``heads``), on grouped-query (GQA) models:

- ``heads="kv"`` (default, as kvpress): one selection per KV head, scored by the mean over the query
  heads of its group. The cache keeps the model's layout (``Hkv`` heads), so at ``keep=0.5`` it
  holds half the dense cache.
- ``heads="query"`` (the official code, FasterDecoding/SnapKV): the KV heads are repeated to one
  per query head (``repeat_kv``) and every query head keeps its own top entries from its own
  scores. The compressed cache then holds ``Hq`` heads, ``Hq / Hkv`` times the entries of
  ``heads="kv"`` at the same ``keep`` (SmolLM2-135M: 9 query, 3 KV heads, so ``keep=0.5`` holds
  1.5x the dense cache; ``keep / 3`` holds the same memory as ``heads="kv"``). The engine expands
  the layer's cache, runs that layer's attention with ``num_key_value_groups = 1`` and repeats each
  new token's key/value for the rest of the generation (see :mod:`prunekit.kv.engine`). On a model
  without GQA both settings select the same entries. Run side by side with the official code on
  identical tensors of a GQA model (issue 21), ``heads="kv"`` kept a different set in all 36
  layer/head cases compared (Jaccard 0.42-0.67); ``heads="query"`` is that code's rule (tested here
  against an independent reference of it: repeat the KV heads, score and take the top entries per
  query head).

**Settings.** The defaults ``window=64, kernel=5, pooling="avg"`` are the official ``SnapKVCluster``
class defaults (and kvpress's). The paper's LongBench runs use ``window=32, kernel=7,
pooling="max"`` (the repository's ``experiments/LongBench/config/*_w32_k7_maxpool.json``):
``preset="longbench"`` selects them. A preset fills the options left at their defaults; an option
given with another value wins. (The official ``init_snapkv`` falls back to ``window=32, kernel=5,
avg`` when a model config names none; no preset for that.)

**Measured** (SmolLM2-135M, needle in 1k tokens, 10 prompts, keep 0.5;
``benchmarks/results/snapkv_gqa.md``): with the class defaults SnapKV finds the key 0.2 of the
time grouped and 0.3 per query head (a cache 1.5x the dense one; 0.0 at keep 1/6, the grouped
run's memory), where H2O finds it every time. The LongBench settings find it every time, grouped or
per query head (at 2k tokens too: 1.0, against 0.3 for the defaults either way), and so does
kernel 7 alone, with average or max pooling; max pooling over 5 (0.3) or window 32 (0.2) alone do
not help. On this model the grouped scoring is not what loses the key; the pooling kernel is. (A
likely reading: the key is six tokens, a space and five digits, and a kernel of 7 spreads the score
of any attended token over the whole span.) The defaults
stay the official class's (and kvpress's, for side-by-side runs); for retrieval of exact spans,
``preset="longbench"`` or ``kernel=7`` is the better choice here.

Other departures from the official code: scores are the window rows' mean, not their sum (same
ranking); rows of a padded batch are scored on their own real tokens (the official code takes one
unpadded row); a prompt shorter than ``window + 1`` real tokens uses a window of its length minus
one (kvpress asserts; the official code never meets it, since it asserts ``budget > window`` and
leaves a prompt no longer than the budget whole); a budget below ``window`` keeps only part of the
window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import KVContext, KVMethod

POOLINGS = ("avg", "max")
HEADS = ("kv", "query")
#: named settings: ``default`` = the official ``SnapKVCluster`` class (and kvpress), ``longbench`` =
#: the paper's LongBench runs
PRESETS: dict[str, dict[str, object]] = {
    "default": {"window": 64, "kernel": 5, "pooling": "avg"},
    "longbench": {"window": 32, "kernel": 7, "pooling": "max"},
}


def pooled(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D pooling along the last dim with odd ``kernel``, stride 1, same length (zero padding for
    ``avg`` counted in the mean, as ``F.avg_pool1d``; ``-inf`` padding for ``max``)."""
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    if pooling == "avg":
        x = torch.nn.functional.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        x = torch.nn.functional.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    return x.reshape(shape)


def snap_scores(ctx: KVContext, window: int, kernel: int, pooling: str, heads: str = "kv") -> torch.Tensor:
    """``(B, Hkv, L)`` (``heads="kv"``) or ``(B, Hq, L)`` (``heads="query"``): pooled window
    attention; the window gets ``max + 1``."""
    A = ctx.signals["window_attention"]  # (B, Hq, w, L)
    w = A.shape[2]
    L = A.shape[-1]
    s = A.mean(dim=2)  # (B, Hq, L)
    body = pooled(s[..., : L - w], kernel, pooling)
    if heads == "kv":
        body = ctx.per_kv_head(body)  # (B, Hkv, L - w)
    top = body.amax(dim=-1, keepdim=True) + 1 if body.shape[-1] else torch.ones_like(body[..., :1])
    return torch.cat([body, top.expand(-1, -1, w)], dim=-1)


@register(
    "snapkv",
    family="kv",
    paper="SnapKV: LLM Knows What You are Looking for Before Generation",
    stages=("after-prefill",),
    signals=("window_attention",),
    summary="keep keys the last `window` prompt queries attend to (pooled), plus the window",
)
@dataclass
class SnapKV(KVMethod):
    window: int = 64
    kernel: int = 5
    pooling: str = "avg"
    heads: str = "kv"  # "query": one selection per query head on a repeated cache (official code)
    preset: str = "default"  # "longbench": window 32, kernel 7, max pooling (the paper's LongBench)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"{self.name}: preset must be one of {list(PRESETS)}; got {self.preset!r}")
        base = PRESETS["default"]
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) == base[key]:  # left at its default: the preset's value
                setattr(self, key, value)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"{self.name}: window must be an int >= 1; got {self.window!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel must be an odd int >= 1; got {self.kernel!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{self.name}: pooling must be one of {list(POOLINGS)}; got {self.pooling!r}")
        if self.heads not in HEADS:
            raise ValueError(f"{self.name}: heads must be one of {list(HEADS)}; got {self.heads!r}")

    @property
    def per_query_head(self) -> bool:
        return self.heads == "query"

    def needs(self) -> tuple[str, ...]:
        return ("window_attention",)

    def score(self, ctx: KVContext) -> torch.Tensor:
        return snap_scores(ctx, self.window, self.kernel, self.pooling, self.heads)
