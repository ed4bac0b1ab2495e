"""Progressive token schedules: cuts at several decoder layers (or encoder blocks), each keeping
fewer candidates.

A progressive method (PyramidDrop, TransPrune, SparseVLM; Zero-TPrune in an encoder) drops
candidates at layers ``l_1 < l_2 < ... < l_m``, keeping ``c_1 >= c_2 >= ... >= c_m`` of the
group's ``n``. Its budget
``keep`` is, as in those papers' comparisons ("64 tokens" for a progressive method), the **mean
number of candidates per layer** (decoder layer or encoder block; what FLOPs follow):

    mean = (l_1 * n + sum_i (l_{i+1} - l_i) * c_i) / n_layers,   l_{m+1} = n_layers

Each method gives the *shape* of its schedule as ratios ``r_i(t)`` of ``n`` for a knob ``t`` in
``[0, 1]`` (``t = 1`` keeps everything, the ratios fall monotonically as ``t`` falls); ``t`` is
found by bisection so the mean matches ``keep``. Official layer numbers are given for the
paper's model depth and scaled to the model at hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

ShapeFn = Callable[[float], Sequence[float]]


def scale_layers(official: Sequence[int], reference_depth: int, n_layers: int) -> tuple[int, ...]:
    """Official cut layers of a ``reference_depth``-layer model mapped to ``n_layers`` layers.

    ``round(l * n_layers / reference_depth)``, clamped to ``[1, n_layers - 1]`` and de-duplicated
    (a tiny model may get fewer cuts than the paper's).
    """
    if n_layers < 2:
        raise ValueError(f"a progressive cut needs a model of at least 2 layers; got {n_layers}")
    scaled = (min(max(round(l * n_layers / reference_depth), 1), n_layers - 1) for l in official)
    return tuple(sorted(set(scaled)))


def check_layers(layers: Sequence[int], n_layers: int, method: str) -> tuple[int, ...]:
    """Cut layers must be ascending distinct ints in ``[1, n_layers - 1]``."""
    ok = (
        len(layers) > 0
        and all(isinstance(l, int) and not isinstance(l, bool) and 1 <= l <= n_layers - 1 for l in layers)
        and list(layers) == sorted(set(layers))
    )
    if not ok:
        raise ValueError(
            f"{method}: cut layers must be ascending distinct ints in [1, {n_layers - 1}] for this "
            f"{n_layers}-layer decoder; got {list(layers)}"
        )
    return tuple(layers)


def cut_layers(
    layers, official: Sequence[int], reference_depth: int, n_layers: int, method: str
) -> tuple[int, ...]:
    """A method's cut layers: its ``layers`` option checked, or (``None``) its official layers
    scaled from ``reference_depth`` to ``n_layers``."""
    if layers is None:
        return scale_layers(official, reference_depth, n_layers)
    return check_layers(tuple(layers), n_layers, method)


def mean_tokens(layers: Sequence[int], counts: Sequence[float], n: float, n_layers: int) -> float:
    """Mean candidates per layer of the schedule (``n`` before the first cut)."""
    ends = [*layers[1:], n_layers]
    return (layers[0] * n + sum((e - l) * c for l, e, c in zip(layers, ends, counts, strict=True))) / n_layers


def fit_counts(
    layers: Sequence[int], n_layers: int, n: int, keep: int, shape: ShapeFn, method: str
) -> tuple[int, ...]:
    """Counts per cut whose mean per layer is ``keep`` (nearest after rounding).

    ``keep >= n`` keeps everything. A ``keep`` below what the cut layers allow (all of ``n`` up to
    the first cut, then one token) raises a ValueError naming the reachable range.
    """
    if keep >= n:
        return tuple(n for _ in layers)
    lowest = mean_tokens(layers, [1] * len(layers), n, n_layers)
    if keep < lowest - 1e-9:
        raise ValueError(
            f"{method}: keep={keep} tokens per layer (mean over the model's {n_layers} layers) is "
            f"unreachable with cuts at layers {list(layers)}: every layer before {layers[0]} sees all "
            f"{n} candidates, so the mean is at least {lowest:.1f}; allowed keep: {lowest:.1f} to {n}. "
            "Give earlier cut layers (option 'layers') or a larger keep"
        )

    def counts(t: float) -> list[float]:
        return [min(float(n), max(1.0, n * r)) for r in shape(t)]

    lo, hi = 0.0, 1.0  # mean(counts(t)) grows with t
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean_tokens(layers, counts(mid), n, n_layers) < keep:
            lo = mid
        else:
            hi = mid
    out: list[int] = []
    for c in counts(hi):
        c = max(1, min(n, round(c)))
        out.append(min(c, out[-1]) if out else c)  # non-increasing after rounding
    return tuple(out)


def group_counts(method, n: int, keep: int | float, n_layers: int) -> tuple[int, ...]:
    """A progressive method's counts per cut for a group of ``n`` candidates under the session's
    budget ``keep``. A fraction that longer groups reach but a short one cannot (a 3-token sentence
    cannot average 45 % when the layers before the first cut see all of it) keeps the smallest
    whole mean its cuts allow rather than failing the batch. A fraction no group size can reach
    (below ``first cut / layers``) and a count below the reachable range raise."""
    from ..budget import resolve_keep

    k = resolve_keep(keep, n)
    layers = method.cuts(n_layers)
    if isinstance(keep, float) and keep >= layers[0] / n_layers:
        k = max(k, math.ceil(mean_tokens(layers, [1] * len(layers), n, n_layers) - 1e-9))
    return method.counts(n, min(k, n), n_layers)


def power_shape(ratios: Sequence[float]) -> ShapeFn:
    """Official ratios ``r_i`` bent by a power: ``r_i ** a`` with ``a = 1/t - 1``.

    ``t = 1/2`` gives the official schedule exactly, ``t -> 1`` keeps everything, ``t -> 0`` one
    token per cut. (TransPrune, SparseVLM.)
    """

    def shape(t: float) -> list[float]:
        a = 1.0 / max(t, 1e-12) - 1.0
        return [r**a for r in ratios]

    return shape


def geometric_shape(m: int) -> ShapeFn:
    """PyramidDrop's ``lambda ** i`` for ``i = 1..m`` with ``lambda = t``."""
    return lambda t: [t ** (i + 1) for i in range(m)]
