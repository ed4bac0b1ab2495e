"""HoloV — "Don't Just Chase "Highlighted Tokens" in MLLMs: Revisiting Visual Holistic Context
Retention" (NeurIPS 2025).

The budget ``k`` is spread over spatial **crops** of the image so that survivors cover the whole
scene, not only its salient spots [abstract; algorithm from the official code, spec §9]:

1. per token: ``a_s = 1000 * a`` (``a`` = [CLS] attention of the feature layer, head mean) plus
   ``alpha`` times the variance of its cosine similarities to the other tokens of its crop
   (projected tokens), rescaled to attention's magnitude inside the crop; a crop's score is the
   mean over its tokens;
2. crop weights ``w = score / (sum + 1e-6)``; ``alloc = floor(w * k)``, the leftover slots one each
   to the highest-weight crops;
3. inside a crop, its ``alloc`` tokens with the highest [CLS] attention (the score of step 1 only
   allocates budget).

Shapes: ``cls_attention`` ``(G, N)``, ``tokens`` ``(G, N, D)`` -> ``keep`` ``(G, k)``.

``attention``: ``"cls"`` (the [CLS] row, LLaVA), ``"received"`` (the official Qwen2.5-VL variant:
the feature layer's map, head mean, then mean over queries, per merged token; see
:class:`~prunekit.models.vlm.Qwen2VLAdapter`), or ``"auto"`` (default): ``"cls"`` where the vision
tower has a [CLS] token, else ``"received"``. The official Qwen code also sets
``num_crops = max(1, int(1024 / 576 * N / k))`` (16 at the reference 64 of 576) and uses 1-D chunks;
here ``num_crops`` stays an option (16) and ``"2d"`` crops use the image's merged grid.

Crops: ``crops="2d"`` (default) cuts the patch grid into ``sqrt(num_crops) x sqrt(num_crops)``
rectangles (bands as even as possible, the first ones one larger), the paper's "spatial crops";
``crops="1d"`` reproduces the official code, which cuts the *flattened raster sequence* into
``num_crops`` contiguous chunks (576 / 16 = 36 tokens = 1.5 image rows on LLaVA-1.5). Which one
the paper means is **unconfirmed** (spec §19). The official constants are kept: ``num_crops=16``,
``alpha=0.09``, the ``1000`` factor, the ``1e-6`` guards, the zeroed self-similarity counted in
the variance, and a one-token crop scored by its unscaled attention.

Note: because the variance is rescaled to the crop's mean attention before the crop mean, a
crop's score is ``mean(a_s) * (1 + alpha * v / (v + 1e-6))`` with ``v`` its mean variance, i.e.
essentially ``1.09 * mean(a_s)``: the similarity term only matters for near-zero ``v``.

Departures from the official code (both the fixes spec §9 asks for): (1) a crop's surplus
(``alloc`` above its size) is not lost and the output is not zero-padded to ``k``: the freed
slots go to the highest-attention tokens not yet kept, so exactly ``k`` real tokens survive;
(2) survivors are returned in original order (official: crop order, descending attention inside a
crop). Ties go to the lower index. LLaVA-NeXT: the official code runs on all crops' tokens as one
sequence (1-D chunks); ``"2d"`` needs one grid per group (``ctx.grid`` or a square ``N``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod, topk_sorted
from .hiprune import patch_grid, received_attention

ATTENTIONS = ("auto", "cls", "received")

CROPS = ("2d", "1d")


def even_split(n: int, parts: int, device: torch.device | None = None) -> torch.Tensor:
    """Part index of each of ``n`` items cut into ``parts`` contiguous runs, the first ``n % parts``
    one longer (the official chunking) -> ``(n,)`` long."""
    sizes = torch.full((parts,), n // parts, dtype=torch.long)
    sizes[: n % parts] += 1
    return torch.repeat_interleave(torch.arange(parts), sizes).to(device)


def crop_ids(
    rows: int, cols: int, num_crops: int, crops: str, device: torch.device | None = None
) -> torch.Tensor:
    """Crop index of each raster token ``(rows * cols,)``: 1-D chunks, or 2-D grid rectangles."""
    if crops == "1d":
        return even_split(rows * cols, num_crops, device)
    side = math.isqrt(num_crops)
    row_band, col_band = even_split(rows, side, device), even_split(cols, side, device)
    return (row_band[:, None] * side + col_band[None, :]).flatten()  # (rows * cols,)


def crop_scores(
    a: torch.Tensor, x: torch.Tensor, crop: torch.Tensor, num_crops: int, alpha: float
) -> torch.Tensor:
    """Official per-crop score ``(G, C)`` from attention ``a`` ``(G, N)``, tokens ``x`` ``(G, N, D)``."""
    member = torch.nn.functional.one_hot(crop, num_crops).to(a.dtype)  # (N, C)
    n = member.sum(dim=0)  # (C,) tokens per crop

    def crop_mean(v: torch.Tensor) -> torch.Tensor:  # (G, N) -> (G, C)
        return (v @ member) / n.clamp(min=1)

    f = torch.nn.functional.normalize(x.float(), dim=-1)
    same = crop[:, None] == crop[None, :]  # (N, N) same crop
    S = (f @ f.transpose(-1, -2)) * (same & ~torch.eye(len(crop), dtype=torch.bool, device=x.device))
    n_tok = n[crop]  # (N,) size of each token's crop
    denom = (n_tok - 1).clamp(min=1)
    mean = S.sum(dim=-1) / denom  # (G, N)
    # over the crop's members, the zeroed diagonal included (official quirk)
    var = (((S - mean[..., None]) ** 2) * same).sum(dim=-1) / denom  # (G, N)
    a_s = 1000.0 * a
    var_s = var * crop_mean(a_s.abs())[:, crop] / (crop_mean(var.abs())[:, crop] + 1e-6)
    score = crop_mean(a_s + alpha * var_s)  # (G, C)
    return torch.where(n > 1, score, crop_mean(a))  # a one-token crop: its unscaled attention


def allocate(w: torch.Tensor, k: int) -> torch.Tensor:
    """``floor(w * k)`` per crop, the leftover slots one each to the highest weights -> ``(G, C)``."""
    alloc = torch.floor(w * k).long()
    rem = k - alloc.sum(dim=-1, keepdim=True)  # (G, 1)
    order = torch.sort(w, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(w.shape[-1], device=w.device).expand_as(order)
    )
    return alloc + (rank < rem).long()


def rank_in_crop(a: torch.Tensor, crop: torch.Tensor, num_crops: int) -> torch.Tensor:
    """``(G, N)``: each token's place in its crop by descending ``a`` (0 = highest; lower index on ties)."""
    G, N = a.shape
    by_a = torch.sort(a, dim=-1, descending=True, stable=True).indices  # (G, N)
    by_crop = torch.sort(crop[by_a], dim=-1, stable=True).indices  # crops contiguous, a descending inside
    perm = by_a.gather(1, by_crop)  # (G, N) token at each sorted place
    n = torch.bincount(crop, minlength=num_crops)
    start = torch.cumsum(n, 0) - n  # (C,) first place of each crop
    place = torch.arange(N, device=a.device).expand(G, N) - start[crop[perm]]
    return torch.empty_like(perm).scatter_(1, perm, place)


@register(
    "holov",
    family="tokens",
    paper='Don\'t Just Chase "Highlighted Tokens" in MLLMs: Revisiting Visual Holistic Context Retention',
    stages=("vision",),
    signals=("cls_attention@vision-layer (or attention_map, attention='received')", "tokens"),
    summary="spread the budget over spatial crops, then keep each crop's top [CLS]-attention tokens",
)
@dataclass
class HoloV(TokenMethod):
    crops: str = "2d"  # "2d": grid rectangles (paper) | "1d": raster chunks (official code)
    num_crops: int = 16
    alpha: float = 0.09  # weight of the intra-crop similarity variance
    layer: int | None = None  # 0-based vision layer of the [CLS] row; None = the VLM's feature layer
    attention: str = "auto"  # "cls" | "received" (Qwen variant) | "auto": "cls" where there is a [CLS]

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"holov: attention must be one of {list(ATTENTIONS)}; got {self.attention!r}")
        if self.crops not in CROPS:
            raise ValueError(f"holov: crops must be one of {list(CROPS)}; got {self.crops!r}")
        if isinstance(self.num_crops, bool) or not isinstance(self.num_crops, int) or self.num_crops < 1:
            raise ValueError(f"holov: num_crops must be an int >= 1; got {self.num_crops!r}")
        if self.crops == "2d" and math.isqrt(self.num_crops) ** 2 != self.num_crops:
            raise ValueError(
                f"holov: crops='2d' needs a square num_crops (4, 9, 16, ...); got {self.num_crops}"
            )

    def for_family(self, family: str, has_cls: bool) -> TokenMethod:
        if self.attention != "auto":
            return self
        return replace(self, attention="cls" if has_cls else "received")

    def needs(self, stage: str) -> tuple[Signal, ...]:
        kind = "attention_map" if self.attention == "received" else "cls_attention"
        return (Signal(kind, self.layer), Signal("tokens"))

    def _attention(self, ctx: TokenContext) -> torch.Tensor:
        """``(G, N)``: the [CLS] row, or the received attention of the map (Qwen variant)."""
        if self.attention == "received":
            return received_attention(ctx.signal("attention_map", self.layer))
        return ctx.signal("cls_attention", self.layer).float()

    def select(self, ctx: TokenContext, k: int) -> Selection:
        return self._crop_select(ctx, k, None)

    def select_scored(
        self, ctx: TokenContext, k: int, scores: torch.Tensor | None, weight: float = 0.5
    ) -> Selection:
        """Composition: crop budgets and in-crop ranking on ``scores`` (shifted to >= 0 and
        normalised to sum 1 per group, like an attention row) instead of [CLS] attention."""
        if scores is None:
            return self.select(ctx, k)
        s = scores.float() - scores.float().amin(dim=-1, keepdim=True)
        return self._crop_select(ctx, k, s / s.sum(dim=-1, keepdim=True).clamp_min(1e-12))

    def _crop_select(self, ctx: TokenContext, k: int, a: torch.Tensor | None) -> Selection:
        G, N = ctx.num_groups, ctx.num_tokens
        if k >= N:
            return Selection(torch.arange(N, device=ctx.tokens.device).expand(G, -1))
        try:
            rows, cols = patch_grid(ctx, "holov") if self.crops == "2d" else (1, N)
        except ValueError as e:  # e.g. LLaVA-NeXT: an image's crops packed without their newlines
            raise ValueError(f"{e}; crops='1d' (the official contiguous chunks) works on any group") from None
        side = math.isqrt(self.num_crops)
        if self.crops == "2d" and (rows < side or cols < side):
            raise ValueError(f"holov: a {rows}x{cols} grid cannot be cut into {side}x{side} crops")
        C = self.num_crops if self.crops == "2d" else min(self.num_crops, N)
        crop = crop_ids(rows, cols, C, self.crops, ctx.tokens.device)  # (N,)
        if a is None:
            a = self._attention(ctx)  # (G, N)
        score = crop_scores(a, ctx.tokens, crop, C, self.alpha)  # (G, C)
        alloc = allocate(score / (score.sum(dim=-1, keepdim=True) + 1e-6), k)  # (G, C)
        picked = rank_in_crop(a, crop, C) < alloc.gather(1, crop.expand(G, -1))  # (G, N), <= k per group
        # A crop's surplus (alloc > its size) goes to the best remaining tokens instead of zero padding.
        return Selection(topk_sorted(a.masked_fill(picked, float("inf")), k))
