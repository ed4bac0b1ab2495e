"""KVCrush — "KVCrush: Key Value Cache Size-Reduction Using Similarity in Head-Behaviour" (2025).

On top of any importance-based KV method (``base``: ``snapkv``, ``pyramidkv``, ``h2o``,
``streamingllm``), part of each budget goes to **representatives of the tokens the base method
would evict**, so the kept set covers the whole token distribution [paper]:

1. every prompt token gets a **binary head-behaviour vector**: bit ``h`` is 1 when the token's
   score in head ``h`` is above that head's mean over the row's real tokens (the paper's
   "attention above a threshold" variant). ``bits="kv_heads"`` (default) uses the base scores per
   KV head (``Hkv`` bits); ``bits="query_heads"`` uses the attention each query head pays (the
   base's signal averaged over its rows, ``Hq`` bits), which on GQA models with few KV heads
   (SmolLM2: 3, so at most 8 buckets) gives the representatives room to differ from the base;
2. the budget ``k`` splits into ``k - r`` base tokens per head (the base method's top scores) and
   ``r = round(k * crush_ratio)`` representatives;
3. the tokens no head keeps are **bucketed** by their vector, at low cost: ``grouping="hash"``
   packs the bits into one integer (exact signatures; ``Hkv <= 62``), ``grouping="anchor"`` uses
   the Hamming distance to an all-ones anchor vector (``Hkv + 1`` buckets, the paper's cheapest
   variant);
4. one representative per bucket, the member with the highest base score (mean over heads), the
   largest buckets first; a representative is kept in every head. If there are fewer buckets
   than ``r``, the free slots go back to the base method's next tokens.

The bucketing is **unconfirmed** in detail (which anchors, which member represents a bucket):
these are the library's choices. Nothing is merged; positions keep their RoPE.

Paged and quantised caches: the selection is a set of token indices computed from scores, so on
a paged cache it runs at page granularity (score a page by its tokens' max, a page's bits by
their OR) and on a quantised cache the kept indices select quantised blocks; neither changes
the algorithm. (The engine here edits a plain ``DynamicCache``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ... import registry
from ...registry import register
from ..context import KVContext, KVMethod

GROUPINGS = ("hash", "anchor")
BITS = ("kv_heads", "query_heads")


def head_bits(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(B, Hkv, L)`` scores -> ``(B, L, Hkv)`` bool: above the head's mean over real tokens."""
    s = scores.float().masked_fill(~valid[:, None, :], 0.0)
    mean = s.sum(dim=-1, keepdim=True) / valid.sum(dim=-1)[:, None, None].clamp_min(1)
    return ((s > mean) & valid[:, None, :]).transpose(1, 2)


def bucket_ids(bits: torch.Tensor, grouping: str) -> torch.Tensor:
    """``(B, L, H)`` bits -> ``(B, L)`` long bucket keys (equal key = same bucket)."""
    H = bits.shape[-1]
    if grouping == "anchor":
        return (~bits).sum(dim=-1)  # Hamming distance to the all-ones anchor
    if H > 62:
        raise ValueError(f"kvcrush: grouping='hash' packs {H} head bits into an int64; use 'anchor'")
    weights = 2 ** torch.arange(H, device=bits.device)
    return (bits.long() * weights).sum(dim=-1)


def representatives_batch(
    importance: torch.Tensor, candidate: torch.Tensor, keys: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """Rows at once: ``importance`` ``(B, L)``, ``candidate`` ``(B, L)`` bool (evicted by every
    head), bucket ``keys`` ``(B, L)``, ``r`` ``(B,)`` -> ``(B, L)`` bool, at most ``r[b]``
    representatives per row: the best member of each bucket, the largest buckets first (ties: the
    lower key). Vectorised: buckets of all rows are numbered together (row-major keys)."""
    B = candidate.shape[0]
    out = torch.zeros_like(candidate)
    if not bool(candidate.any()):
        return out
    b, pos = candidate.nonzero(as_tuple=True)
    span = int(keys.max()) + 1
    gkey = b * span + keys[b, pos]  # bucket ids unique across rows
    uniq, inv = torch.unique(gkey, return_inverse=True)  # sorted: by row, then key
    size = torch.bincount(inv, minlength=len(uniq))
    imp = importance[b, pos].float()
    order = torch.argsort(imp, descending=True, stable=True)
    order = order[torch.argsort(inv[order], stable=True)]  # by bucket, best member first
    first = torch.ones(len(order), dtype=torch.bool, device=order.device)
    first[1:] = inv[order][1:] != inv[order][:-1]
    best = order[first]  # one member per bucket, in bucket order
    row = uniq // span
    by_size = torch.argsort(size, descending=True, stable=True)  # largest first, lower key on ties
    by_size = by_size[torch.argsort(row[by_size], stable=True)]  # grouped by row, largest first
    start = torch.searchsorted(row[by_size], torch.arange(B, device=row.device))
    rank = torch.arange(len(by_size), device=row.device) - start[row[by_size]]
    chosen = by_size[rank < r[row[by_size]]]  # bucket ids kept
    out[b[best[chosen]], pos[best[chosen]]] = True
    return out


def representatives(
    importance: torch.Tensor, candidate: torch.Tensor, keys: torch.Tensor, r: int
) -> torch.Tensor:
    """One row of :func:`representatives_batch`: ``(L,)`` tensors and a count ``r``."""
    return representatives_batch(importance[None], candidate[None], keys[None], torch.tensor([r]))[0]


@register(
    "kvcrush",
    family="kv",
    paper="KVCrush: Key Value Cache Size-Reduction Using Similarity in Head-Behaviour",
    stages=("after-prefill",),
    signals=("the base method's",),
    summary="a base method's top tokens + one representative per head-behaviour bucket of the evicted",
)
@dataclass
class KVCrush(KVMethod):
    base: str = "snapkv"
    crush_ratio: float = 0.25  # share of the budget for bucket representatives
    grouping: str = "hash"
    base_options: dict = field(default_factory=dict)
    bits: str = "kv_heads"  # "query_heads": one bit per attention head (needs an attention signal)

    def __post_init__(self) -> None:
        if not 0.0 <= self.crush_ratio < 1.0:
            raise ValueError(f"kvcrush: crush_ratio must be in [0, 1); got {self.crush_ratio!r}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"kvcrush: grouping must be one of {list(GROUPINGS)}; got {self.grouping!r}")
        if self.bits not in BITS:
            raise ValueError(f"kvcrush: bits must be one of {list(BITS)}; got {self.bits!r}")
        info = registry.get(self.base)
        if info.family != "kv" or info.name == "kvcrush":
            raise ValueError(f"kvcrush: base must be another kv method; got {self.base!r}")
        self.inner: KVMethod = info.factory(**self.base_options)
        if self.inner.decode:
            raise ValueError(f"kvcrush: base {self.base!r} evicts while decoding; use a prefill-time base")
        self.window = self.inner.window
        if self.bits == "query_heads" and not self.inner.needs():
            raise ValueError(
                f"kvcrush: bits='query_heads' reads the base's attention signal; {self.base!r} has none"
            )

    @property
    def per_query_head(self) -> bool:
        """The base's (e.g. ``base_options={"heads": "query"}`` for SnapKV): then every head above
        is a query head of a repeated cache."""
        return self.inner.per_query_head

    def needs(self) -> tuple[str, ...]:
        return self.inner.needs()

    def _bit_scores(self, ctx: KVContext, s: torch.Tensor) -> torch.Tensor:
        """``(B, H, L)`` per-head scores the bits are read from: the base's per KV head, or the
        attention each query head pays (``window_attention`` averaged over its rows, or
        ``attention_sum``)."""
        if self.bits == "kv_heads":
            return s
        sig = ctx.signals
        per_q = sig["window_attention"].mean(dim=2) if "window_attention" in sig else sig["attention_sum"]
        return per_q.float()

    def budget(self, n: int, keep: int | float, layer: int, n_layers: int) -> int:
        return self.inner.budget(n, keep, layer, n_layers)

    def score(self, ctx: KVContext) -> torch.Tensor:
        s = self.inner.score(ctx).float()  # (B, Hkv, L)
        valid = ctx.valid
        s = s.masked_fill(~valid[:, None, :], float("-inf"))
        k = ctx.budget
        r = torch.round(k.float() * self.crush_ratio).long()
        # the base method's choice per head, then who is evicted by every head
        rank = torch.argsort(torch.argsort(s, dim=-1, descending=True, stable=True), dim=-1)  # (B, Hkv, L)
        base_kept = rank < (k - r)[:, None, None]
        evicted = ~base_kept.any(dim=1) & valid  # (B, L)
        keys = bucket_ids(head_bits(self._bit_scores(ctx, s), valid), self.grouping)
        finite = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
        importance = finite.mean(dim=1)
        rep = representatives_batch(importance, evicted, keys, r)  # (B, L)
        # representatives first in every head, then the base scores (base tokens and any refill)
        top = finite.amax() - finite.amin() + 1.0
        return s + rep[:, None, :].float() * top * 2
