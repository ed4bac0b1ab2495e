"""Selecting samples from scores: top-k, random and class-balanced (DeepCore's ``balance=True``).

``keep`` is a fraction in (0, 1] of the ``N`` samples, kept count ``round(keep·N)`` and at least 1
(the data-pruning spec's step 3; Python's rounding, half to even, as DeepCore's ``round``), or an
int count in 1..N. Every selector returns the kept indices as a ``(k,)`` long tensor in
**ascending order** (the dataset's own order; a ``Subset`` of them iterates as the full set does).
Sorting is stable, so equal scores are broken by index: the lower index is kept first.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["class_balanced", "kept_count", "random_subset", "topk"]


def kept_count(keep: int | float, n: int) -> int:
    """How many of ``n`` samples ``keep`` keeps: ``round(keep·n)`` (at least 1) for a fraction in
    (0, 1], the count itself for an int in 1..n. Clear errors for anything else."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be an int >= 0 (the number of samples); got {n!r}")
    if n == 0:
        raise ValueError("empty dataset: there are no samples to select from (N = 0)")
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"keep must be a fraction in (0, 1] or an int count in 1..{n}; got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if not 1 <= keep <= n:
            raise ValueError(f"keep={keep} is out of range: a count must be in 1..{n} (the dataset's size)")
        return int(keep)
    keep = float(keep)
    if math.isnan(keep) or not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} is out of range: a fraction must be in (0, 1]")
    return max(1, min(n, round(keep * n)))


def _scores(scores) -> torch.Tensor:
    s = torch.as_tensor(scores).detach().cpu()
    if s.dim() != 1:
        raise ValueError(f"scores must be one number per sample, shape (N,); got shape {tuple(s.shape)}")
    if s.is_complex() or s.dtype == torch.bool:
        raise ValueError(f"scores must be real numbers; got dtype {s.dtype}")
    s = s.double()
    if bool(torch.isnan(s).any()):
        raise ValueError(f"scores hold NaN (at index {int(torch.isnan(s).nonzero()[0])}): nothing to rank by")
    return s


def _order(scores: torch.Tensor, descending: bool) -> torch.Tensor:
    """Indices by score, best first; stable, so ties go to the lower index."""
    return torch.sort(scores, descending=descending, stable=True).indices


def topk(scores, keep: int | float, descending: bool = True, balance_labels=None) -> torch.Tensor:
    """The indices of the ``keep`` best samples by ``scores`` ``(N,)``: the highest with
    ``descending=True`` (the hard-keeping rule of EL2N, GraNd, forgetting), the lowest otherwise;
    ties broken by index. ``balance_labels`` ``(N,)``: select per class instead
    (:func:`class_balanced`). Returned in ascending index order."""
    s = _scores(scores)
    if balance_labels is not None:
        return class_balanced(s, balance_labels, keep, descending=descending)
    k = kept_count(keep, s.numel())
    return _order(s, descending)[:k].sort().values


def random_subset(n: int, keep: int | float, seed: int = 0) -> torch.Tensor:
    """``kept_count(keep, n)`` indices drawn uniformly without replacement from ``range(n)`` by a
    generator seeded with ``seed`` (``torch.randperm``: the same subset for the same seed), ascending."""
    k = kept_count(keep, n)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:k].sort().values


def class_balanced(scores, labels, keep: int | float, descending: bool = True) -> torch.Tensor:
    """Per-class top-k, DeepCore's ``balance=True``: each class keeps its best samples by
    ``scores``, ties by index; ascending indices out.

    Budgets: a fraction ``f`` keeps ``round(f·n_c)`` of each class's ``n_c`` samples, as DeepCore,
    but at least one per class [ours: DeepCore's ``round`` can drop a small class entirely], so the
    total can differ from ``round(f·N)``. An int count ``k`` is shared out in proportion to the class
    sizes by largest remainders (ties to the smaller class id) so that exactly ``k`` are kept [ours:
    DeepCore takes fractions only]."""
    s = _scores(scores)
    y = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if y.numel() != s.numel():
        raise ValueError(f"{y.numel()} labels for {s.numel()} scores: give one label per sample")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids; got dtype {y.dtype}")
    n = s.numel()
    k = kept_count(keep, n)
    classes, sizes = torch.unique(y, return_counts=True)  # ascending class ids
    if isinstance(keep, numbers.Integral) and not isinstance(keep, bool):
        quota = sizes.double() * k / n
        budget = quota.floor().long()
        rest = k - int(budget.sum())
        if rest:
            frac = quota - budget  # the largest remainders get one more; a stable sort breaks ties by class
            budget[torch.sort(frac, descending=True, stable=True).indices[:rest]] += 1
    else:
        budget = torch.tensor([max(1, round(float(keep) * int(c))) for c in sizes]).clamp(max=sizes)
    kept = []
    for c, b in zip(classes.tolist(), budget.tolist(), strict=True):  # a loop over classes, not samples
        members = (y == c).nonzero().reshape(-1)  # ascending
        kept.append(members[_order(s[members], descending)[:b]])
    return torch.cat(kept).sort().values
