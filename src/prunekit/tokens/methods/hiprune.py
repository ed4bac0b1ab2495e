"""HiPrune — "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
Vision-Language Models" (2025).

Three kinds of visual tokens survive, per image, after the vision tower [official code, spec §6]:

- **anchors**: the ``round(k * alpha / 5)`` tokens with the highest *received* attention (head
  mean, then mean over queries) in the **object layer** (``object_layer``, 1-based as in the paper:
  HF ``attentions[object_layer - 1]``, i.e. our 0-based vision layer ``object_layer - 1``; 9 for
  CLIP-L/14);
- **buffers**: each anchor's 4-neighbours ``p ± 1``, ``p ± W`` on the patch grid of width ``W``;
- **registers**: the rest of the budget, by received attention in the **deep layer**
  (``deep_layer=None``: the layer the VLM takes its features from, LLaVA's ``-2``).

Exactly ``k`` are kept, in original order. Shapes: two maps ``(G, H, N, N)`` over the patch
tokens -> ``keep`` ``(G, k)``.

``faithful=True`` reproduces the official neighbour arithmetic: ``p ± 1`` wraps across rows (the
last token of the row above counts as the left neighbour of a row's first token) and off-grid
neighbours are clamped to ``[0, N - 1]`` (so a first-row anchor also pulls in token 0, a last-row
anchor token ``N - 1``); duplicates are merged, so the register count adapts. ``faithful=False``
keeps only true grid neighbours.

Departures from the official code: (1) the adapter drops the [CLS] row and column before the
method sees the maps, so the mean over queries here is over patch queries only (the official
code averages over all queries, CLS included, then drops the CLS column); (2) the grid width comes
from ``ctx.grid`` (or ``sqrt(N)``) instead of the hard-coded 24; (3) if the candidates could
exceed ``k`` (large ``alpha``, tiny ``k``), the anchor count is capped at ``k // 5``, where the
official code would fail; (4) ties go to the lower index.

LLaVA-NeXT: as the official code, each crop (the base image and every high-res tile) is pruned on
its own map and grid (``group_by = "crop"``); unpadding may leave a tile a ``rows x cols``
rectangle, whose grid the adapter hands over. The official code splits the image's budget evenly
over the crops; here the split is in proportion to each crop's candidates after unpadding (equal
when no tile was cut), so ``keep`` stays per image as for every method.

Qwen2-VL / Qwen2.5-VL (the official Qwen2.5-VL variant): the adapter's map is over the merged
tokens of each image, from a softmax over all of its patches with the window mask ignored, as the
official code; merged rows are the mean and merged columns the sum of their 2x2 patches, so the
received attention here is proportional to the official "sum over queries, mean over each merge
group". The grid is the image's merged grid, and the deep layer defaults to the last block, as
there. The official object layer is 16 of 32 blocks: pass ``object_layer=16`` (the default 9 is
CLIP-L's). The official Qwen budget is a ratio (``keep=0.334`` etc.).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...errors import SignalUnavailableError
from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod, topk_sorted


def patch_grid(ctx: TokenContext, method: str) -> tuple[int, int]:
    """``(rows, cols)`` of the candidates: ``ctx.grid``, or a square ``sqrt(N)`` grid."""
    N = ctx.num_tokens
    if ctx.grid is not None:
        rows, cols = ctx.grid
        if rows * cols != N:
            raise ValueError(f"{method}: ctx.grid {ctx.grid} does not hold the {N} candidates")
        return rows, cols
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(
            f"{method} needs the candidates on a patch grid: {N} tokens is not a square and the "
            "adapter gave no grid (rows, cols)"
        )
    return side, side


def received_attention(attn: torch.Tensor) -> torch.Tensor:
    """``(G, H, N, N) -> (G, N)``: attention each key receives, mean over heads then queries."""
    return attn.float().mean(dim=1).mean(dim=1)


def buffer_candidates(anchors: torch.Tensor, rows: int, cols: int, faithful: bool) -> torch.Tensor:
    """Anchors and their 4-neighbours ``(G, a) -> (G, 5a)`` indices; ``-1`` marks a dropped neighbour."""
    N = rows * cols
    offsets = torch.tensor([0, -1, 1, -cols, cols], device=anchors.device)
    cand = anchors[..., None] + offsets  # (G, a, 5)
    if faithful:  # official: wrap across rows, clamp off-grid neighbours onto the first/last token
        return cand.clamp(0, N - 1).flatten(1)
    col = anchors[..., None] % cols
    ok = torch.stack(
        [
            torch.ones_like(anchors, dtype=torch.bool),
            col[..., 0] > 0,  # left neighbour in the same row
            col[..., 0] < cols - 1,  # right neighbour in the same row
            anchors >= cols,  # a row above
            anchors < N - cols,  # a row below
        ],
        dim=-1,
    )  # (G, a, 5)
    return cand.masked_fill(~ok, -1).flatten(1)


@register(
    "hiprune",
    family="tokens",
    paper="HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models",
    stages=("vision",),
    signals=("attention_map@object-layer", "attention_map@vision-layer"),
    summary="anchors (mid-layer attention) + their grid neighbours + registers (deep-layer attention)",
)
@dataclass
class HiPrune(TokenMethod):
    #: LLaVA-NeXT: one selection per crop (the official code prunes each crop)
    group_by: ClassVar[str] = "crop"
    alpha: float = 0.1  # share of the budget for anchors + buffers (5 tokens per anchor)
    object_layer: int = 9  # 1-based, as in the paper: vision layer index object_layer - 1
    deep_layer: int | None = None  # 0-based vision layer; None = the VLM's feature layer
    faithful: bool = True  # official neighbour arithmetic (wrap across rows, clamp off-grid)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"hiprune: alpha must be in [0, 1]; got {self.alpha!r}")
        if (
            isinstance(self.object_layer, bool)
            or not isinstance(self.object_layer, int)
            or self.object_layer < 1
        ):
            raise ValueError(f"hiprune: object_layer is 1-based, an int >= 1; got {self.object_layer!r}")

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("attention_map", self.object_layer - 1), Signal("attention_map", self.deep_layer))

    def _maps(self, ctx: TokenContext) -> list[torch.Tensor]:
        """The object-layer and deep-layer maps, each ``(G, H, N, N)``."""
        maps = []
        for sig in self.needs(ctx.stage):
            # ctx.signal falls back to the plain "attention_map" (another layer's) if "@layer" is missing
            if sig.layer is not None and str(sig) not in ctx.signals:
                raise SignalUnavailableError(
                    f"hiprune needs the attention maps of two vision layers; {str(sig)!r} was not "
                    f"computed on {ctx.model or 'this model'} (available: {list(ctx.signals)})"
                )
            maps.append(ctx.signal(sig.kind, sig.layer))
        return maps

    def score(self, ctx: TokenContext) -> torch.Tensor:
        """Per-token scores for composition (``"hiprune+divprune"``): the received attention of the
        object layer and of the deep layer, each normalised to sum 1, averaged. HiPrune's own
        :meth:`select` uses the two hierarchically (anchors, buffers, registers) instead."""
        s_obj, s_deep = (received_attention(m) for m in self._maps(ctx))
        return (s_obj / s_obj.sum(dim=-1, keepdim=True) + s_deep / s_deep.sum(dim=-1, keepdim=True)) / 2

    def select(self, ctx: TokenContext, k: int) -> Selection:
        G, N = ctx.num_groups, ctx.num_tokens
        if k >= N:
            return Selection(torch.arange(N, device=ctx.tokens.device).expand(G, -1))
        rows, cols = patch_grid(ctx, "hiprune")
        obj_map, deep_map = self._maps(ctx)
        s_obj, s_deep = received_attention(obj_map), received_attention(deep_map)  # (G, N) each
        n_anchor = min(round(k * self.alpha / 5), k // 5)  # Python round, as the official code
        anchors = torch.sort(s_obj, dim=-1, descending=True, stable=True).indices[:, :n_anchor]  # (G, a)
        cand = buffer_candidates(anchors, rows, cols, self.faithful)  # (G, 5a), -1 = none
        is_cand = torch.zeros(G, N + 1, dtype=torch.bool, device=s_deep.device)
        is_cand.scatter_(1, cand.where(cand >= 0, N), True)  # column N collects the dropped ones
        # Anchors and buffers (at most 5a <= k) always win; the registers fill the rest by s_deep.
        return Selection(topk_sorted(s_deep.masked_fill(is_cand[:, :N], float("inf")), k))
