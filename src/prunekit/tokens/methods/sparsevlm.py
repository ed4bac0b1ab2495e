"""SparseVLM — "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference" (Zhang et al., ICML 2025). Baseline, v1 behaviour.

**Raters**: the instruction tokens (the prompt tokens after the image) most relevant to the image,
chosen from the input embeddings: ``m = mean_over_visual softmax_over_text(V T^T)``, raters are
the text tokens with ``m > mean(m)``. At decoder layers 2, 6 and 15 (0-based, of LLaVA's 32;
scaled to the model's depth) the surviving visual tokens are ranked by the attention the raters
pay them (the cut layer's own q/k on its normed input, softmax over all keys, causal, mean over
heads and raters) and the top ones kept.

Budget: ``keep`` is the mean number of candidates per decoder layer (the paper's "64 / 128 / 192"
are such averages). The schedule's shape is the official v1 table nearest to the budget (576
tokens: 64 -> 66/30/17, 96 -> 238/48/26, 128 -> 303/110/36, 192 -> 300/200/110), bent by a power
so the mean matches ``keep`` exactly.

**Recycling** (v1, ``recycle=True``, the default): at each cut, the top 30 % (+1) of the pruned
tokens by the same rater attention are clustered by DPC-kNN (:func:`~prunekit.tokens.merge.
dpc_knn_merge`, ``int(n / 10) + 1`` clusters, k-NN density over as many neighbours) and each
cluster's mean hidden state survives as one more token — as in the official ``cluster_and_merge``,
so a cut keeps its schedule's count **plus** the clusters (the stats count them).

Departures from the official code: a recycled token takes the slot and the position id of its
cluster's centre (v1 appends the clusters after the kept visual tokens and re-indexes positions;
the llm stage does not create new sequence slots); position ids are kept (v2.0 keeps them too;
v2.0 also disables recycling, ``recycle=False``). The official cap of ``n - 1`` kept tokens is
dropped so that ``keep`` = everything is the dense model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register
from ..context import ProgressiveMethod, Selection, Signal, TokenContext, topk_sorted
from ..merge import dpc_knn_merge
from ..schedule import power_shape

#: official v1 schedule for LLaVA-1.5 (576 visual tokens, cuts at layers 2/6/15 of 32)
V1_SCHEDULE = {64: (66, 30, 17), 96: (238, 48, 26), 128: (303, 110, 36), 192: (300, 200, 110)}


def raters(visual: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(G, N, D)`` visual and ``(G, T, D)`` text embeddings, ``(G, T)`` validity -> ``(G, T)`` bool
    raters: ``m = mean_visual softmax_text(V T^T)``, ``m > mean(m)`` over the real text tokens."""
    logits = (visual.float() @ text.float().transpose(1, 2)).masked_fill(~mask[:, None, :], float("-inf"))
    m = logits.softmax(dim=-1).mean(dim=1)  # (G, T)
    mean = (m * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1)
    return (m > mean) & mask


@register(
    "sparsevlm",
    family="tokens",
    paper="SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference",
    stages=("llm",),
    signals=("instruction_attention@each cut layer", "instruction_embeddings", "input_embeddings"),
    summary="progressive: text 'raters' attention at layers 2/6/15 of 32; recycles pruned tokens (DPC-kNN)",
)
@dataclass
class SparseVLM(ProgressiveMethod):
    official_layers: ClassVar[tuple[int, ...]] = (2, 6, 15)
    #: cut layers (0-based decoder layer whose input is cut); None: 2/6/15 of 32 scaled to the depth
    layers: tuple[int, ...] | None = None
    #: v1's recycling of the best pruned tokens into DPC-kNN cluster means
    recycle: bool = True
    #: share of the pruned tokens recycled (official: the top 30 %, plus one)
    recycle_ratio: float = 0.3

    def shape(self, n_cuts: int):
        raise NotImplementedError("SparseVLM picks its shape from the budget; see counts()")

    def counts(self, n: int, keep: int, n_layers: int) -> tuple[int, ...]:
        from ..schedule import fit_counts

        layers = self.cuts(n_layers)
        nearest = min(V1_SCHEDULE, key=lambda b: abs(b / 576 - keep / n))
        ratios = [c / 576 for c in V1_SCHEDULE[nearest]][-len(layers) :]
        ratios += [ratios[-1]] * (len(layers) - len(ratios))
        return fit_counts(layers, n_layers, n, keep, power_shape(ratios), self.name)

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (
            Signal("instruction_attention"),
            Signal("instruction_mask"),
            Signal("instruction_embeddings"),
            Signal("input_embeddings"),
        )

    def score(self, ctx: TokenContext) -> torch.Tensor:
        mask = ctx.signal("instruction_mask")
        r = raters(ctx.signal("input_embeddings"), ctx.signal("instruction_embeddings"), mask)
        r = torch.where(r.any(dim=1, keepdim=True), r, mask)  # no rater (one text token): all raters
        attn = ctx.signal("instruction_attention")  # (G, T, N)
        return (attn * r[..., None]).sum(dim=1) / r.sum(dim=1, keepdim=True).clamp_min(1)

    def select_scored(
        self, ctx: TokenContext, k: int, scores: torch.Tensor | None, weight: float = 0.5
    ) -> Selection:
        """Top-``k`` by the scores; with ``recycle``, plus one token per DPC-kNN cluster of the
        best pruned tokens, in the slot of the cluster's centre (values: the cluster means)."""
        n = ctx.num_tokens
        if not self.recycle or k >= n or scores is None:
            return super().select_scored(ctx, k, scores, weight)
        G = ctx.num_groups
        keep = topk_sorted(scores, k)  # (G, k)
        dropped = torch.ones(G, n, dtype=torch.bool, device=scores.device).scatter_(1, keep, False)
        pruned = dropped.nonzero()[:, 1].view(G, n - k)  # ascending
        n_rec = min(int((n - k) * self.recycle_ratio) + 1, n - k)
        best = topk_sorted(scores.gather(1, pruned), n_rec)  # among the pruned
        rec = pruned.gather(1, best)  # (G, n_rec) candidate indices
        x = ctx.tokens.gather(1, rec[..., None].expand(-1, -1, ctx.tokens.shape[-1]))
        merged, centers = dpc_knn_merge(x, int(n_rec / 10) + 1)
        slots = rec.gather(1, centers)  # (G, c) candidate index of each centre
        all_idx, order = torch.sort(torch.cat([keep, slots], dim=1), dim=1)
        values = torch.cat([ctx.tokens.gather(1, keep[..., None].expand(-1, -1, x.shape[-1])), merged], dim=1)
        return Selection(all_idx, values.gather(1, order[..., None].expand(-1, -1, x.shape[-1])))
