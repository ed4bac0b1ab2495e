"""SparseGPT: OBS-based mask selection and weight reconstruction, one Linear at a time."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..calibration import LinearStats
from ..method import WeightMethod
from ..sparsegpt import sparsegpt
from ..structures import Pattern


@register(
    "sparsegpt",
    family="weights",
    paper="SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
    stages=("after-training",),
    signals=("hessian",),
    summary="OBS saliency w^2/[H^-1]_jj^2 per block of 128 columns, with the weight update",
)
@dataclass
class SparseGPT(WeightMethod):
    """SparseGPT (Frantar & Alistarh, 2023), as the official ``fasterprune``: the Hessian of
    ``||WX - W'X||^2`` from the calibration inputs, dampened by ``percdamp`` x its mean diagonal;
    masks chosen per block of ``blocksize`` columns (adaptive: the block's lowest saliencies over
    all rows, so ``group`` does not apply) or N:M per group; the kept weights absorb the error
    (lazy batch updates). Calibrated sequentially through the pruned layers."""

    blocksize: int = 128
    percdamp: float = 0.01

    needs = frozenset({"hessian"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blocksize < 1:
            raise ValueError(f"blocksize must be >= 1; got {self.blocksize}")
        if not 0.0 < self.percdamp <= 1.0:
            raise ValueError(f"percdamp must be in (0, 1]; got {self.percdamp}")

    def prune(
        self, W: torch.Tensor, stats: LinearStats, sparsity: float, pattern: Pattern
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        new, keep = sparsegpt(W, stats.hessian, sparsity, pattern, self.blocksize, self.percdamp)
        return new.to(W.dtype), keep
