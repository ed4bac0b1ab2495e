"""CATP (stage 1) — "CATP: Contextually Adaptive Token Pruning for Efficient and Enhanced Multimodal
In-Context Learning" (AAAI 2026, arXiv 2508.07871).

What is known: CATP prunes the image tokens of interleaved multi-image in-context prompts in two
stages [abstract]; stage 1, after the projector, selects each image's tokens "by jointly optimizing
diversity and alignment with the paired text" [3rd-party TL;DR]. **No official code was found: the
objective below is the spec's library stand-in (§13c), unconfirmed (§19)**:

greedy, per image, ``argmax_j  lam * align_j + (1 - lam) * min_{s in S} dist(j, s)`` over the tokens
``j`` not yet in the selected set ``S``, where

- ``dist`` = cosine distance ``1 - cos`` of the projected visual tokens (DivPrune's, reused from
  :mod:`.divprune`), and for the first pick (``S`` empty) each token's distance to its nearest
  other token (DivPrune's seed rule), so ``lam=0`` is exactly DivPrune;
- ``align_j`` = the ``max`` (``text_pool`` option: or ``mean``) cosine of token ``j`` with the
  text-token input embeddings (``text_embeddings``, padding rows ignored); ``lam=1`` is the top-``k``
  by alignment.

Shapes: ``tokens`` ``(G, N, D)``, ``text_embeddings`` ``(G, T, D)`` -> ``keep`` ``(G, k)`` ascending.
Each image is one group, so the per-image budgets (the paper removes 77.8 % of all image tokens)
are the engine's; text tokens are never candidates. ``K`` greedy steps, each vectorised over groups
and tokens. Nothing is merged.

Departures: (1) the "paired text" of an image (its demonstration's text) is not given by the
adapter: every image of a sample is aligned with the sample's whole prompt text (all
demonstrations, the query and the template); (2) similarity of input embeddings stands in for any
cross-modal encoder; (3) alignment (a cosine in [-1, 1]) and diversity (a distance in [0, 2]) are
added unscaled; (4) ties go to the lower index.

**Stage 2** (``stage="llm"``): inside a shallow decoder layer ``K`` (``layer``, default 2) the
image tokens still present are ranked by cross-modal attention — the attention the instruction
tokens after the group (the prompt after that image) pay them in layer ``K-1``, mean over heads
and rows — and the top ``keep`` survive. The paper prunes "progressively" in shallow layers; its
layers, counts and attention variant are **unconfirmed**, so one cut stands in. Nest the
sessions for both stages (vision outside, llm inside); see :mod:`.todre`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod
from ._textguided import InstructionStage, check_text_pool, text_relevance
from .divprune import cosine_distance, greedy_diverse


def greedy_diverse_aligned(dist: torch.Tensor, align: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """Greedy choice of ``k`` of ``N`` items maximising ``lam * align + (1 - lam) * min distance to
    the chosen set``, from ``dist`` ``(G, N, N)`` and ``align`` ``(G, N)`` -> ``(G, k)`` ascending."""
    return greedy_diverse(dist, k, "kcenter", bonus=align, lam=lam)


@register(
    "catp",
    family="tokens",
    paper="CATP: Contextually Adaptive Token Pruning for Efficient and Enhanced Multimodal In-Context "
    "Learning",
    stages=("vision", "llm"),
    signals=("tokens", "text_embeddings", "instruction_attention@llm-layer K-1 (stage 2)"),
    summary="stage 1: greedy max-min diversity plus alignment with the prompt text, per image",
)
@dataclass
class CATP(InstructionStage, TokenMethod):
    lam: float = 0.5  # weight of text alignment against diversity, in [0, 1]
    text_pool: str = "max"  # "max" | "mean" cosine to the text tokens
    layer: int | None = None  # stage 2 (llm): cut layer K; None = 2

    def __post_init__(self) -> None:
        if isinstance(self.lam, bool) or not isinstance(self.lam, int | float) or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"catp: lam must be a float in [0, 1]; got {self.lam!r}")
        check_text_pool("catp", self.text_pool)

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return self.LLM_NEEDS if stage == "llm" else (Signal("tokens"), Signal("text_embeddings"))

    def select(self, ctx: TokenContext, k: int) -> Selection:
        if (sel := self.stage_select(ctx, k)) is not None:  # keep-all, or stage 2 (cross-modal)
            return sel
        align = text_relevance(ctx.tokens, ctx.signal("text_embeddings"), self.text_pool)  # (G, N)
        return Selection(greedy_diverse_aligned(cosine_distance(ctx.tokens), align, k, self.lam))
