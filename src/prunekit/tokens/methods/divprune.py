"""DivPrune — "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models"
(Alvar et al., CVPR 2025).

Selection as a Max–Min Diversity Problem on the **projected visual tokens** (the LLM's input
embeddings), cosine distance ``1 - cos(x_i, x_j)``, solved greedily [official code]:
the first pick is the token whose nearest other token is farthest; each next pick is the token
farthest from the selected set (max over candidates of the min distance to the set). The kept
indices are returned sorted (original order). No attention needed: SDPA/Flash friendly.

Deviations from the official code, both fixes the spec asks for: distances in fp32 (official:
model dtype), and selected tokens are excluded with ``-inf`` so exact duplicates can never be
picked twice. Ties go to the lower index (``argmax``). The image span is located from the
placeholder tokens, not a hard-coded prompt length.

Precision: in half precision the fp32 distances and the official model-dtype ones differ by a few
ulp, and the greedy path, a chain of argmaxes over many near-ties, then differs almost always
(official runs in bf16: no greedy path identical). ``prune_tokens(..., score_dtype="model")``
reproduces the official computation: ``x / ‖x‖`` and ``1 - x̂ x̂ᵀ`` in the model dtype, and the first
pick by the official rule, the second smallest of each column of the distance matrix (the
smallest is normally the token itself, whose distance to itself is not exactly 0 in half
precision), instead of the nearest *other* token. Only the ``-inf`` exclusion of chosen tokens
stays (the official code could re-pick a chosen token only where every remaining distance to the
set is at most a chosen token's rounding error). Default ``"float32"``.

Vectorised: the ``(G, N, N)`` distance matrix once, then ``K`` greedy steps each vectorised over
groups and candidates (the greedy order is inherently sequential).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod


def cosine_distance(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(G, N, D) -> (G, N, N)`` pairwise ``1 - cos``, in fp32; with ``dtype``, in that dtype as the
    official DivPrune code computes it (``x / x.norm()``, no epsilon)."""
    if dtype is not None:
        x = x.to(dtype)
        x = x / x.norm(dim=-1, keepdim=True)
        return 1.0 - x @ x.transpose(-1, -2)
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    return 1.0 - x @ x.transpose(-1, -2)


def greedy_diverse(
    dist: torch.Tensor,
    k: int,
    objective: str = "kcenter",
    bonus: torch.Tensor | None = None,
    lam: float = 0.0,
    first: str = "nearest",
) -> torch.Tensor:
    """Greedy choice of ``k`` of ``N`` items from ``(G, N, N)`` distances -> ``(G, k)`` ascending.

    Each pick maximises ``lam * bonus + (1 - lam) * spread`` over the unchosen items, where
    ``spread`` is the min (``"kcenter"``: max-min / farthest point, DivPrune) or the sum
    (``"maxsum"``) of the distances to the chosen set; the first pick uses the distance to the
    nearest other item (``first="second"``: the second smallest of each column of ``dist``, the
    official DivPrune rule, the same where an item's distance to itself is the smallest, as in
    exact arithmetic). ``bonus`` ``(G, N)`` is optional (e.g. CATP's text alignment). Ties go to
    the lower index; chosen items are excluded with ``-inf``, so duplicates are never picked twice.
    """
    G, N, _ = dist.shape
    k = min(k, N)
    if N == 1:
        nearest = torch.zeros(G, 1, dtype=dist.dtype, device=dist.device)
    elif first == "second":
        nearest = dist.topk(2, dim=-2, largest=False).values[:, 1]  # (G, N) per column
    else:
        eye = torch.eye(N, dtype=torch.bool, device=dist.device)
        nearest = dist.masked_fill(eye, float("inf")).amin(dim=-1)  # (G, N) to the nearest other token
    extra = 0.0 if bonus is None else lam * bonus
    w = 1.0 - lam if bonus is not None else 1.0
    rows = torch.arange(G, device=dist.device)
    picks = torch.empty(G, k, dtype=torch.long, device=dist.device)
    picks[:, 0] = (extra + w * nearest).argmax(dim=-1)
    to_set = dist[rows, picks[:, 0]].clone()  # (G, N) min or sum of distances to the chosen set
    chosen = torch.zeros(G, N, dtype=torch.bool, device=dist.device)
    chosen[rows, picks[:, 0]] = True
    for i in range(1, k):
        nxt = (extra + w * to_set).masked_fill(chosen, float("-inf")).argmax(dim=-1)  # (G,)
        picks[:, i] = nxt
        chosen[rows, nxt] = True
        d_new = dist[rows, nxt]
        to_set = torch.minimum(to_set, d_new) if objective == "kcenter" else to_set + d_new
    return torch.sort(picks, dim=-1).values


def max_min_diverse(dist: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max–min choice of ``k`` of ``N`` items from ``(G, N, N)`` distances -> ``(G, k)`` ascending."""
    return greedy_diverse(dist, k, "kcenter")


@register(
    "divprune",
    family="tokens",
    paper="DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
    stages=("vision", "encoder"),
    signals=("tokens",),
    summary="greedy max-min cosine diversity over the projected visual tokens",
)
@dataclass
class DivPrune(TokenMethod):
    layer: int | None = None  # only used at the encoder stage: cut before this block

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("tokens"),)

    def select(self, ctx: TokenContext, k: int) -> Selection:
        if ctx.score_dtype == "model":  # the official computation, in the model's dtype
            dist = cosine_distance(ctx.tokens, ctx.tokens.dtype)
            return Selection(greedy_diverse(dist, k, "kcenter", first="second"))
        return Selection(max_min_diverse(cosine_distance(ctx.tokens), k))

    def select_scored(
        self, ctx: TokenContext, k: int, scores: torch.Tensor | None, weight: float = 0.5
    ) -> Selection:
        """Composition: the max-min greedy with ``weight`` x the scores (min-max normalised) as a bonus."""
        if scores is None:
            return self.select(ctx, k)
        from ..compose import unit_range

        dist = cosine_distance(ctx.tokens)
        return Selection(greedy_diverse(dist, k, "kcenter", unit_range(scores), weight))
