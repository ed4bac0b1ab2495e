"""FoPru — "FoPru: Focal Pruning for Efficient Large Vision-Language Models" (2024).

Visual tokens are pruned after the vision tower by a *significance* vector taken from one
vision layer's attention map (head mean) [abstract; details from a 3rd-party review and an
anonymous re-implementation, spec §7 — **unconfirmed**]:

- ``M = A.mean(heads)`` ``(N, N)``; ``s_recv = M.mean(queries)`` (attention received) and
  ``s_row = M.mean(keys)``; the one with the larger variance is the significance (per group);
- ``strategy="rank"`` (global view): the top ``k`` by significance;
- ``strategy="row"`` (local view): whole image rows ranked by their summed significance; the top
  ``k // W`` rows are kept entire (``W`` = grid width).

Survivors are returned in original order [abstract]. Shapes: ``attention_map`` ``(G, H, N, N)``
over the patch tokens -> ``keep`` ``(G, k)``.

Unconfirmed (spec §19): the layer (the review says penultimate; ``layer=None`` = the VLM's feature
layer, LLaVA's ``-2``), whether CLS is excluded (here it is: the adapter drops its row and column,
so ``s_row[i] = (1 - a_i,CLS) / N`` and is not constant), which vector wins in practice, and the
variance estimator (unbiased here; the choice cannot change which vector wins).

Families: LLaVA-1.5; LLaVA-NeXT per crop (each crop's own map and grid, the image's budget split
over its crops in proportion to their tokens; unconfirmed, the paper evaluates LLaVA-1.5); and
Qwen2-VL / Qwen2.5-VL (maps between merged tokens, each image with its own grid; see
:class:`~prunekit.models.vlm.Qwen2VLAdapter`).

Departure: the row strategy keeps exactly ``k`` tokens like every method here; the
``k mod W`` slots that whole rows cannot fill go to the most significant tokens outside the kept
rows (the re-implementation keeps ``floor(rows * ratio)`` whole rows only, i.e. fewer than ``k``;
its function version even slices by token count, a bug not reproduced). Ties go to the lower index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod, topk_sorted
from .hiprune import patch_grid

STRATEGIES = ("rank", "row")


def significance(attn: torch.Tensor) -> torch.Tensor:
    """``(G, H, N, N) -> (G, N)``: received or row-mean attention, whichever varies more."""
    M = attn.float().mean(dim=1)  # (G, N, N) [query, key]
    s_recv, s_row = M.mean(dim=1), M.mean(dim=2)  # (G, N) each
    use_recv = s_recv.var(dim=-1, keepdim=True) > s_row.var(dim=-1, keepdim=True)  # (G, 1)
    return torch.where(use_recv, s_recv, s_row)


@register(
    "fopru",
    family="tokens",
    paper="FoPru: Focal Pruning for Efficient Large Vision-Language Models",
    stages=("vision",),
    signals=("attention_map@vision-layer",),
    summary="rank tokens (or whole image rows) by vision-layer attention significance",
)
@dataclass
class FoPru(TokenMethod):
    group_by: ClassVar[str] = "crop"  # LLaVA-NeXT: one selection per crop (its own map and grid)
    strategy: str = "rank"  # "rank" (global top-k) | "row" (whole image rows)
    layer: int | None = None  # 0-based vision layer; None = the VLM's feature layer

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"fopru: strategy must be one of {list(STRATEGIES)}; got {self.strategy!r}")

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("attention_map", self.layer),)

    def score(self, ctx: TokenContext) -> torch.Tensor:
        return significance(ctx.signal("attention_map", self.layer))  # (G, N)

    def select(self, ctx: TokenContext, k: int) -> Selection:
        G, N = ctx.num_groups, ctx.num_tokens
        if k >= N:
            return Selection(torch.arange(N, device=ctx.tokens.device).expand(G, -1))
        sig = self.score(ctx)  # (G, N)
        if self.strategy == "rank":
            return Selection(topk_sorted(sig, k))
        rows, cols = patch_grid(ctx, "fopru")
        row_score = sig.view(G, rows, cols).sum(dim=-1)  # (G, rows)
        top_rows = torch.sort(row_score, dim=-1, descending=True, stable=True).indices[:, : k // cols]
        in_row = torch.zeros(G, rows, dtype=torch.bool, device=sig.device).scatter_(1, top_rows, True)
        in_row = in_row[:, :, None].expand(G, rows, cols).reshape(G, N)  # (G, N)
        # The whole rows (k // cols * cols <= k tokens) always win; the leftover slots go by significance.
        return Selection(topk_sorted(sig.masked_fill(in_row, float("inf")), k))
