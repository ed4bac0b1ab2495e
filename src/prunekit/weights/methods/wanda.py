"""Wanda and OWL: weights times input-activation norms, compared per output row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..calibration import LinearStats
from ..criteria import wanda
from ..method import WeightMethod


@register(
    "wanda",
    family="weights",
    paper="A Simple and Effective Pruning Approach for Large Language Models",
    stages=("after-training",),
    signals=("x_norm",),
    summary="|W| * ||X||, per output row, sequential calibration, no weight update",
)
@dataclass
class Wanda(WeightMethod):
    """Wanda (Sun et al., 2023): score ``|W_ij| * ||X_j||_2`` with the norm over every calibration
    token, compared **per output row** (the per-layer variant some libraries use is ``group="layer"``),
    no weight update. N:M via the same score inside each block. Calibrated sequentially: the next
    layer's inputs come from the pruned layer (official ``prune_wanda``)."""

    needs = frozenset({"x_norm"})

    def score(self, W: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        return wanda(W, stats.x_norm)


@register(
    "owl",
    family="weights",
    paper="Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to "
    "High Sparsity",
    stages=("after-training",),
    signals=("x_norm",),
    summary="Wanda with outlier-weighted layer-wise sparsity (M=5, lambda=0.08)",
)
@dataclass
class OWL(Wanda):
    """OWL (Yin et al., 2024) as its official code runs it: Wanda's criterion with layer
    sparsities from each layer's outlier ratio (scores above ``owl_m`` x the layer mean), min-max
    normalised to ``target +- owl_lam``. Any other criterion takes the same allocation with
    ``allocation="owl"`` (e.g. ``prune_weights(model, "sparsegpt", allocation="owl")``). The outlier
    ratios come from a first pass over the dense model, as in the official code."""

    allocation: str = "owl"
