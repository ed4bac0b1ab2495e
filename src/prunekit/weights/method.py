"""The interface of a weight method: criterion x structure x allocation x compensation.

A method is a dataclass. It declares the calibration statistics it needs (``needs``), scores a
Linear's weights (``score``) and, by default, keeps the highest scores under the pattern and
comparison group; a compensating method (SparseGPT) overrides ``prune`` to also update the
weights it keeps. ``allocation`` shares the global sparsity among decoder layers (``uniform`` or
``owl``) and works with any criterion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .calibration import LinearStats
from .structures import GROUPS, Pattern, keep_mask

ALLOCATIONS = ("uniform", "owl")


@dataclass
class WeightMethod:
    group: str = "row"  # comparison group of unstructured masks: "row" (per output) or "layer"
    allocation: str = "uniform"  # "uniform" or "owl" (outlier-weighted layer-wise sparsity)
    owl_m: float = 5.0  # OWL: a score is an outlier above owl_m x the layer's mean score
    owl_lam: float = 0.08  # OWL: layer sparsities span target +- owl_lam

    name: ClassVar[str] = "?"
    #: calibration statistics: "x_norm" (input feature norms), "hessian" (X^T X), "grad" (GBLM)
    needs: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {list(GROUPS)}; got {self.group!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {list(ALLOCATIONS)}; got {self.allocation!r}")
        if self.owl_m <= 0:
            raise ValueError(f"owl_m must be > 0; got {self.owl_m}")

    @property
    def calibration_needs(self) -> frozenset[str]:
        """Everything the engine must gather, including what the allocation needs."""
        return self.needs | ({"x_norm"} if self.allocation == "owl" else frozenset())

    def score(self, W: torch.Tensor, stats: LinearStats) -> torch.Tensor:
        """``(out, in)`` importance of each weight; higher = kept first."""
        raise NotImplementedError

    def prune(
        self, W: torch.Tensor, stats: LinearStats, sparsity: float, pattern: Pattern
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(new weights or None, keep mask)`` of one Linear at ``sparsity``."""
        return None, keep_mask(self.score(W, stats), sparsity, pattern, self.group)
