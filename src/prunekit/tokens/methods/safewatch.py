"""SafeWatch policy-aware pruning (PAP) — "SafeWatch: An Efficient Safety-Policy Following Video
Guardrail Model with Transparent Explanations" (Chen et al., 2024, arXiv 2412.06878).

What is known [abstract]: the guardrail's safety policies are split into chunks, and PAP "adaptively
selects the most relevant video tokens for each policy, discarding noisy or irrelevant
information". **Everything below is unconfirmed** (spec §17, §19: the repository has no pruning
code; the scoring rule and the budget are the library's stand-in, not the paper's method):

1. **policies**: the prompt's non-padding text tokens (``text_embeddings``) are split into ``C``
   chunks: ``chunks=None`` cuts each group's ``T`` text tokens into ``num_chunks`` contiguous, even
   chunks (text token ``p`` is in chunk ``floor(p * C / T)``); ``chunks=(b1, b2, ...)`` gives the
   start offsets of chunks 2.. (text tokens ``[0, b1)``, ``[b1, b2)``, ..., ``[b_last, T)``), the
   same for every group;
2. **per-policy relevance**: chunk ``c`` scores visual token ``j`` by the ``max`` (``text_pool``
   option: or ``mean``) cosine of ``j`` with the chunk's text tokens, ``(G, C, N)``;
3. **shared budget**: each chunk keeps its top ``k // C`` tokens (chosen independently), the union
   is kept, and the rest of the ``k`` slots go to the best remaining tokens by their best score
   over the non-empty chunks. Exactly ``k`` survive, in original order. Nothing is merged.

Shapes: ``tokens`` ``(G, N, D)``, ``text_embeddings`` ``(G, T, D)`` -> ``keep`` ``(G, k)`` ascending.
A chunk with no text token (``T < C``, or an offset beyond ``T``) keeps nothing of its own.

Departures: (1) the paper scores video tokens against policy chunks that SafeWatch encodes in
parallel (PEPE); here the policies are cuts of the prompt's text, and similarity (not attention)
is measured between input embeddings, as no policy encoder is available; (2) the adapter gives
the prompt's whole text (system prompt and template tokens included), not the policy spans: pass
``chunks`` to place the cuts; (3) ties go to the lower index.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod, topk_sorted
from ._textguided import check_text_pool, pool_cosine, text_cosine, text_valid


def chunk_membership(valid: torch.Tensor, num_chunks: int, bounds: tuple[int, ...] | None) -> torch.Tensor:
    """``(G, T)`` real-text mask (right-packed) -> ``(G, C, T)`` bool: text token ``p`` in chunk ``c``."""
    G, T = valid.shape
    pos = torch.arange(T, device=valid.device).expand(G, T)  # (G, T)
    if bounds is None:
        C = num_chunks
        n = valid.sum(dim=-1, keepdim=True).clamp(min=1)  # (G, 1) real text tokens
        chunk = pos * C // n  # (G, T): floor(p * C / T_real)
    else:
        C = len(bounds) + 1
        chunk = torch.bucketize(pos, torch.tensor(bounds, device=valid.device), right=True)
    member = chunk[:, None, :] == torch.arange(C, device=valid.device)[None, :, None]  # (G, C, T)
    return member & valid[:, None, :]


@register(
    "safewatch",
    family="tokens",
    paper="SafeWatch: An Efficient Safety-Policy Following Video Guardrail Model with Transparent "
    "Explanations",
    stages=("vision",),
    signals=("tokens", "text_embeddings"),
    summary="policy-aware: each text chunk keeps its most similar visual tokens, budget shared",
)
@dataclass
class SafeWatch(TokenMethod):
    num_chunks: int = 4  # policies = even contiguous chunks of the prompt's text (when chunks is None)
    chunks: tuple[int, ...] | None = None  # start offsets of chunks 2.. in the text (overrides num_chunks)
    text_pool: str = "max"  # "max" | "mean" cosine to a chunk's text tokens

    def __post_init__(self) -> None:
        if isinstance(self.num_chunks, bool) or not isinstance(self.num_chunks, int) or self.num_chunks < 1:
            raise ValueError(f"safewatch: num_chunks must be an int >= 1; got {self.num_chunks!r}")
        if self.chunks is not None:
            b = tuple(self.chunks)
            ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in b)
            if not b or not ok or any(x >= y for x, y in itertools.pairwise(b)):
                raise ValueError(
                    "safewatch: chunks must be None or strictly increasing ints >= 1 (start offsets of "
                    f"chunks 2.. in the text tokens); got {self.chunks!r}"
                )
            self.chunks = b
        check_text_pool("safewatch", self.text_pool)

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("tokens"), Signal("text_embeddings"))

    def policy_scores(self, ctx: TokenContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, C, N)`` relevance of each visual token to each policy chunk, and ``(G, C)`` which
        chunks hold text."""
        text = ctx.signal("text_embeddings")  # (G, T, D)
        member = chunk_membership(text_valid(text), self.num_chunks, self.chunks)  # (G, C, T)
        return pool_cosine(text_cosine(ctx.tokens, text), member, self.text_pool), member.any(dim=-1)

    def select(self, ctx: TokenContext, k: int) -> Selection:
        G, N = ctx.num_groups, ctx.num_tokens
        if k >= N:
            return Selection(torch.arange(N, device=ctx.tokens.device).expand(G, -1))
        scores, live = self.policy_scores(ctx)  # (G, C, N), (G, C)
        C = scores.shape[1]
        per_policy = k // C
        kept = torch.zeros(G, N, dtype=torch.bool, device=scores.device)
        if per_policy:
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
            # (G, C, q) each policy's own top q; an empty chunk picks nothing (column N, dropped)
            top = order[..., :per_policy].masked_fill(~live[..., None], N)
            kept = torch.zeros(G, N + 1, dtype=torch.bool, device=scores.device)
            kept = kept.scatter_(1, top.flatten(1), True)[:, :N]  # (G, N) union, at most C * q <= k
        best = scores.masked_fill(~live[..., None], float("-inf")).amax(dim=1)  # (G, N) best over policies
        # the union first (+inf), then the best remaining: exactly k, ascending
        return Selection(topk_sorted(best.masked_fill(kept, float("inf")), k))
