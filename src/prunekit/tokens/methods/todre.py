"""ToDRE (stage 1) — "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient
Large Vision-Language Models" (2025).

Stage 1 keeps a small **diverse** subset of the visual tokens after the vision tower [abstract]:
greedy selection on pairwise cosine distances ``1 - cos`` of the projected visual tokens,

- ``objective="kcenter"`` (paper v1, "greedy k-center"): each next pick is the token farthest from
  the selected set (max over candidates of the *min* distance to the set) — farthest-point
  sampling, the same greedy as DivPrune;
- ``objective="maxsum"`` (paper v2, "greedy max-sum diversification"): each next pick maximises
  the *sum* of distances to the selected set.

Shapes: ``tokens`` ``(G, N, D)`` -> ``keep`` ``(G, k)`` ascending. No attention: SDPA/Flash friendly.

**No official code was found** (spec §5): the feature space, the distance, the seed and the
order below are the library's choices, all **unconfirmed** (spec §19). Seed: the token whose
nearest other token is farthest (DivPrune's rule), for both objectives; with it ``kcenter`` gives
exactly DivPrune's selection. v2's possible relevance term is not included. Ties go to the lower
index; a selected token is never picked twice.

**Stage 2** (``stage="llm"``): at decoder layer ``K`` (``layer``; default: half the depth, the
paper's "late decoder layer" is **unconfirmed**) the surviving visual tokens are ranked by
task relevance — the attention the instruction tokens (the prompt after the image) pay them in
layer ``K-1``, mean over heads and instruction rows — and the top ``keep`` survive. The paper
drops *all* visual tokens beyond some layer; prunekit budgets keep at least one, so ``keep=1`` is
that limit, and its threshold rule is unconfirmed (a top-``keep`` stands in).

Both stages together: nest the sessions, the vision stage outside::

    with prune_tokens(vlm, "todre", keep=0.1), prune_tokens(vlm, "todre", keep=1, stage="llm"):
        vlm.generate(...)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod
from ._textguided import InstructionStage
from .divprune import cosine_distance, greedy_diverse

OBJECTIVES = ("kcenter", "maxsum")


@register(
    "todre",
    family="tokens",
    paper="ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large "
    "Vision-Language Models",
    stages=("vision", "llm"),
    signals=("tokens", "instruction_attention@llm-layer K-1 (stage 2)"),
    summary="greedy k-center diversity after the projector; stage 2: instruction attention in the LLM",
)
@dataclass
class ToDRE(InstructionStage, TokenMethod):
    objective: str = "kcenter"  # "kcenter" (paper v1) | "maxsum" (paper v2)
    layer: int | None = None  # stage 2 (llm): cut layer K; None = half the decoder depth

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"todre: objective must be one of {list(OBJECTIVES)}; got {self.objective!r}")

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return self.LLM_NEEDS if stage == "llm" else (Signal("tokens"),)

    def default_cut(self, n_layers: int) -> int:
        return max(1, n_layers // 2)

    def select(self, ctx: TokenContext, k: int) -> Selection:
        if (sel := self.stage_select(ctx, k)) is not None:  # keep-all, or stage 2 (task relevance)
            return sel
        return Selection(greedy_diverse(cosine_distance(ctx.tokens), k, self.objective))

    def select_scored(
        self, ctx: TokenContext, k: int, scores: torch.Tensor | None, weight: float = 0.5
    ) -> Selection:
        """Composition: the greedy (k-center or max-sum) with ``weight`` x the scores (min-max
        normalised) as a relevance bonus."""
        if scores is None or k >= ctx.num_tokens:
            return self.select(ctx, k)
        from ..compose import unit_range

        dist = cosine_distance(ctx.tokens)
        return Selection(greedy_diverse(dist, k, self.objective, unit_range(scores), weight))
