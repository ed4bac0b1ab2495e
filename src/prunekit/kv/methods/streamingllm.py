"""StreamingLLM — "Efficient Streaming Language Models with Attention Sinks" (Xiao et al., ICLR 2024).
Baseline.

Keeps the first ``n_sink`` real tokens of each row (the "attention sinks", default 4) and the most
recent ones, evicting the middle of the prompt, the same in every layer and head; computed once
after prefill, as kvpress's ``StreamingLLMPress`` does (the paper's rolling cache during decoding
is not applied: the comparison here is at a fixed fraction of the prompt cache).

Positions: cached keys keep the RoPE of their **original** positions (as kvpress); the paper
re-assigns positions inside the cache (pre-rotation keys), which a post-RoPE cache cannot do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import KVContext, KVMethod


@register(
    "streamingllm",
    family="kv",
    paper="Efficient Streaming Language Models with Attention Sinks",
    stages=("after-prefill",),
    signals=(),
    summary="keep the first n_sink tokens (attention sinks) and the most recent ones",
)
@dataclass
class StreamingLLM(KVMethod):
    n_sink: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise ValueError(f"streamingllm: n_sink must be an int >= 0; got {self.n_sink!r}")

    def indices(self, ctx: KVContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The same entries as :meth:`score`'s top-``k``, by arithmetic: row ``b``'s first
        ``min(n_sink, k)`` real tokens, then its last ``k - sinks``."""
        valid, k = ctx.valid, ctx.budget
        B, L = valid.shape
        K = int(k.max())
        start = L - valid.sum(dim=1)  # first real token (left padding)
        sinks = k.clamp(max=self.n_sink)
        j = torch.arange(K, device=valid.device)[None]  # (1, K)
        pos = torch.where(j < sinks[:, None], start[:, None] + j, L - k[:, None] + j)
        ok = j < k[:, None]
        # unused slots (rows with a smaller budget): the positions not kept, in order, marked invalid
        t = j - k[:, None]
        pos = torch.where(ok, pos, torch.where(t < start[:, None], t, t + sinks[:, None]))
        pos, order = torch.sort(pos, dim=1)
        ok = ok.gather(1, order)
        Hkv = ctx.keys.shape[1]
        return pos[:, None].expand(B, Hkv, K), ok[:, None].expand(B, Hkv, K)

    def score(self, ctx: KVContext) -> torch.Tensor:
        """Sinks first (2), then recency (position / L, in (0, 1]), the same for every head."""
        valid = ctx.valid
        rank = valid.long().cumsum(dim=1) - 1  # index among the row's real tokens
        L = valid.shape[1]
        score = torch.arange(1, L + 1, device=valid.device).float()[None] / L
        score = torch.where(rank < self.n_sink, torch.full_like(score, 2.0), score)
        return score[:, None, :].expand(-1, ctx.keys.shape[1], -1)
