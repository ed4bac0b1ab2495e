"""Magnitude pruning: the baseline every LLM pruning paper reports."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..calibration import LinearStats
from ..criteria import magnitude
from ..method import WeightMethod


@register(
    "magnitude",
    family="weights",
    paper="Learning both Weights and Connections for Efficient Neural Networks (magnitude baseline)",
    stages=("after-training",),
    signals=(),
    summary="|W|, per output row by default (group='layer' for the per-layer variant)",
)
@dataclass
class Magnitude(WeightMethod):
    """Prune the weights of smallest ``|W|``. No calibration.

    The comparison group defaults to each output row, the setting of the Wanda paper's LLM
    baseline; ``group="layer"`` gives the per-layer threshold of the official Wanda repo's
    ``prune_magnitude`` (which prunes ``<= threshold``, so ties may prune a few more; here exactly
    ``int(numel * sparsity)`` go, ties broken by position)."""

    def score(self, W: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        return magnitude(W)
