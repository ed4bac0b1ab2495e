"""H2O — "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
(Zhang et al., NeurIPS 2023). Baseline.

Each cache entry's score is the attention probability it has accumulated (summed over every query
so far, per KV head: the mean over its GQA group of query heads). The budget ``k`` splits into
**heavy hitters** (``k - recent``, the highest accumulated scores) and a **recent window**
(``recent = round(k * recent_ratio)``, default half, the paper's equal split), the last real
tokens. After prefill the prompt cache is cut to ``k``; with ``decode=True`` (default, the
paper's setting) every decoding step adds the new query's attention to the scores and evicts the
lowest-scoring entry outside the recent window, so the cache stays at ``k`` entries (one in,
one out). ``keep`` = everything (1.0, or a count >= the prompt) evicts nothing, also in decoding.

Signals: the accumulated prefill attention is recomputed from the layer's q projection and the
cached keys in chunks of queries (``O(chunk x L)`` memory), so SDPA stays on; decoding recomputes
the one new query row per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import KVContext, KVMethod
from ..signals import query_probs, rotated_queries


@register(
    "h2o",
    family="kv",
    paper="H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
    stages=("after-prefill", "decode"),
    signals=("attention_sum",),
    summary="keep heavy hitters (accumulated attention) + a recent window; evicts while decoding",
)
@dataclass
class H2O(KVMethod):
    recent_ratio: float = 0.5
    decode: bool = True  # type: ignore[assignment]  # evict during decoding too
    chunk: int = 256  # prompt queries per block when accumulating the prefill attention

    def __post_init__(self) -> None:
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"h2o: recent_ratio must be in [0, 1]; got {self.recent_ratio!r}")

    def needs(self) -> tuple[str, ...]:
        return ("attention_sum",)

    def _recent_mask(self, valid_rank: torch.Tensor, n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        recent = torch.round(k.float() * self.recent_ratio).long()  # (B,)
        return valid_rank >= (n - recent)[:, None]

    def score(self, ctx: KVContext) -> torch.Tensor:
        """Accumulated attention; the recent window on top (``+ inf``-like: above every score)."""
        acc = ctx.per_kv_head(ctx.signals["attention_sum"])  # (B, Hkv, L)
        valid = ctx.valid
        rank = valid.long().cumsum(dim=1) - 1
        recent = self._recent_mask(rank, valid.sum(dim=1), ctx.budget) & valid  # (B, L)
        self._acc = acc
        return acc + recent[:, None, :].float() * (acc.amax() + 1.0)

    def after_compress(self, ctx: KVContext, idx: torch.Tensor) -> dict:
        return {"acc": self._acc.gather(2, idx)}

    def decode_step(self, session, attn, kw, cache_layer, i: int) -> torch.Tensor | None:
        """Add the new queries' attention to the scores; evict the lowest outside the recent window
        until the layer holds its prefill budget again. Returns the ``(B, Hkv, K)`` drop mask."""
        if session.full:  # keep everything: nothing is ever evicted
            return None
        h, (cos, sin) = kw["hidden_states"], kw["position_embeddings"]
        keys = cache_layer.keys  # (B, Hkv, K, D), the new tokens at the end
        B, Hkv, K, _ = keys.shape
        q = h.shape[1]
        valid = session.slot_valid[i]  # (B, Hkv, K)
        queries = rotated_queries(attn, h, cos, sin)  # (B, Hq, q, hd)
        groups = queries.shape[1] // Hkv
        key_valid = valid.repeat_interleave(groups, dim=1)  # per query head
        p = query_probs(
            queries.flatten(0, 1)[:, None],
            keys.repeat_interleave(groups, dim=1).flatten(0, 1)[:, None],
            attn.scaling,
            torch.arange(K - q, K, device=h.device),
            key_valid.flatten(0, 1),
        )  # (B*Hq, 1, q, K)
        p = p.view(B, Hkv, groups, q, K).mean(dim=2).sum(dim=2)  # (B, Hkv, K)
        extra = session.extra[i]
        acc = torch.cat([extra["acc"], torch.zeros(B, Hkv, q, device=p.device)], dim=2) + p
        extra["acc"] = acc
        budget = int(session.stats.kept[-1][i][0].shape[2])
        n_drop = K - budget
        if n_drop <= 0:
            return None
        pos = session.slot_pos[i]  # (B, Hkv, K) original positions
        recent_n = round(budget * self.recent_ratio)
        newest = pos.amax(dim=2, keepdim=True)
        protected = pos > newest - recent_n  # the last recent_n positions
        # drop order: unprotected real entries by score, then protected ones; never the placeholder
        # slots of a padded row (they keep every row at its own budget in a rectangular cache)
        cand = acc.masked_fill(protected, 1e30).masked_fill(~valid, 2e30)
        order = torch.sort(cand, dim=2, stable=True).indices[..., :n_drop]  # lowest first
        drop = torch.zeros(B, Hkv, K, dtype=torch.bool, device=h.device)
        return drop.scatter_(2, order, True)
