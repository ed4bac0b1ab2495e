"""Token budgets: ``keep=64`` (a count) or ``keep=0.25`` (a ratio of the candidate tokens)."""

from __future__ import annotations

import math
import numbers


def validate_keep(keep: int | float) -> int | float:
    """Check a token budget and return it unchanged.

    ``keep`` is an ``int >= 1`` (tokens kept per group, e.g. per image) or a ``float`` in (0, 1]
    (the fraction of the group's candidate tokens kept). Booleans are refused.
    """
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(f"keep must be an int >= 1 (a count) or a float in (0, 1] (a ratio); got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep as a count must be an int >= 1; got {keep}")
        return int(keep)
    keep = float(keep)
    if not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise ValueError(f"keep as a ratio must be a float in (0, 1]; got {keep}")
    return keep


def resolve_keep(keep: int | float, n: int) -> int:
    """Number of tokens kept out of ``n`` candidates.

    A count is capped at ``n``; a ratio is ``round(keep * n)`` (Python rounding, as the official
    FastV-HF and DivPrune code does), at least 1 when ``n >= 1``.
    """
    keep = validate_keep(keep)
    if n <= 0:
        return 0
    if isinstance(keep, int):
        return min(keep, n)
    return max(1, min(n, round(keep * n)))
