"""What a weight budget removes, and in which comparison group: the *structure* part of a weight
method (criterion x structure x allocation x compensation).

Masks are ``keep`` masks: ``True`` = the weight stays. Scores: higher = more important.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

GROUPS = ("row", "layer")


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` (``n == m == 0``) or N:M (keep ``n`` of every ``m`` consecutive input
    weights of a row, e.g. 2:4 for NVIDIA's semi-structured sparse kernels)."""

    n: int = 0
    m: int = 0

    @property
    def unstructured(self) -> bool:
        return self.m == 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (``None`` for unstructured)."""
        return None if self.unstructured else 1.0 - self.n / self.m

    def __str__(self) -> str:
        return "unstructured" if self.unstructured else f"{self.n}:{self.m}"


def parse_pattern(pattern: str | Pattern) -> Pattern:
    """``"unstructured"`` or ``"N:M"`` with ``0 < N < M`` (``"2:4"``, ``"4:8"``)."""
    if isinstance(pattern, Pattern):
        return pattern
    text = str(pattern).strip().lower()
    if text == "unstructured":
        return Pattern()
    parts = text.split(":")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        n, m = (int(p) for p in parts)
        if 0 < n < m:
            return Pattern(n, m)
    raise ValueError(f"pattern must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'); got {pattern!r}")


def check_sparsity(sparsity, what: str = "the fraction of weights removed") -> float:
    """``sparsity`` as a float in [0, 1); a clear ``ValueError`` otherwise (``what`` says what it counts)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or math.isnan(sparsity):
        raise ValueError(f"sparsity must be a float in [0, 1); got {sparsity!r}")
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be a float in [0, 1) ({what}); got {s}")
    return s


def resolve_sparsity(sparsity: float | None, pattern: Pattern) -> float:
    """The target sparsity: a float in [0, 1) for unstructured masks (default 0.5); an N:M pattern
    fixes it at ``1 - N/M`` and refuses a different value."""
    if sparsity is not None:
        sparsity = check_sparsity(sparsity, "the fraction of weights removed")
    if pattern.unstructured:
        return 0.5 if sparsity is None else sparsity
    implied = pattern.sparsity
    if sparsity is not None and abs(sparsity - implied) > 1e-9:
        raise ValueError(
            f"pattern {pattern} removes exactly {implied:g} of the weights; got sparsity={sparsity}"
        )
    return implied


def keep_mask(score: torch.Tensor, sparsity: float, pattern: Pattern, group: str = "row") -> torch.Tensor:
    """The keep mask of one ``(out, in)`` weight from its scores.

    - unstructured, ``group="row"``: every output row loses its ``int(in * sparsity)`` lowest
      scores (Wanda's comparison group; a stable sort breaks ties by position);
    - unstructured, ``group="layer"``: the layer loses its ``int(numel * sparsity)`` lowest;
    - N:M: each block of ``m`` consecutive input weights of a row keeps its ``n`` highest.
    """
    out_f, in_f = score.shape
    keep = torch.ones_like(score, dtype=torch.bool)
    if not pattern.unstructured:
        if in_f % pattern.m:
            raise ValueError(f"an N:M pattern needs in_features divisible by M; {in_f} % {pattern.m} != 0")
        blocks = score.reshape(out_f, in_f // pattern.m, pattern.m)  # (out, in/m, m)
        top = blocks.topk(pattern.n, dim=-1).indices
        keep = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, top, True)
        return keep.reshape(out_f, in_f)
    if group == "row":
        k = int(in_f * sparsity)
        if k:
            low = score.argsort(dim=1, stable=True)[:, :k]  # (out, k)
            keep.scatter_(1, low, False)
        return keep
    if group == "layer":
        k = int(score.numel() * sparsity)
        if k:
            low = score.flatten().argsort(stable=True)[:k]
            keep.view(-1)[low] = False
        return keep
    raise ValueError(f"unknown comparison group {group!r}; allowed: {list(GROUPS)}")
