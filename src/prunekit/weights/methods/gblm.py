"""GBLM-Pruner: gradients of the language-model loss join the Wanda score."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..calibration import LinearStats
from ..criteria import gblm
from ..method import WeightMethod


@register(
    "gblm",
    family="weights",
    paper="Beyond Size: How Gradients Shape Pruning Decisions in Large Language Models",
    stages=("after-training",),
    signals=("x_norm", "grad"),
    summary="|W| * ||X|| + |W| * l2-norm of scaled per-sample gradients, per output row",
)
@dataclass
class GBLM(WeightMethod):
    """GBLM-Pruner (Das et al., 2023), as the official code (VILA-Lab/GBLM-Pruner,
    ``prune_gblm`` + ``gradient_computation.py``): score
    ``|W| * sqrt(sum_x X^2) + |W| * sqrt(sum_s (scale * g_s)^2)`` per output row, where ``g_s`` is
    the gradient of sample ``s``'s mean next-token loss on the **dense** model (one backward per
    calibration sequence) and ``scale`` = 100. ``wanda_term=False`` keeps only the gradient term
    (the official ``prune_gradient``). The official gradients come from 128 C4 sequences; here
    from the same calibration windows as the Wanda term."""

    scale: float = 100.0
    wanda_term: bool = True

    needs = frozenset({"x_norm", "grad"})

    def score(self, W: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        if stats.grad_norm is None:
            raise ValueError("GBLM needs gradient norms from calibration")
        return gblm(W, stats.x_norm if self.wanda_term else None, stats.grad_norm)
