"""PyramidKV — "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling"
(Cai et al., 2024). Baseline.

SnapKV's scores (:mod:`.snapkv`), but the number of entries kept falls linearly from the first
layer to the last (a pyramid) while the total over layers equals the uniform budget. Budget per
layer as in kvpress's ``PyramidKVPress`` (after KVCache-Factory), for a row of ``n`` prompt tokens
and a uniform budget ``k``: ``min = k / beta``, ``max = 2 k - min`` (if ``max > n - window``:
``max = n - window``, ``min = 2 k - max``); layer ``l`` keeps ``round(max - l (max - min) /
(n_layers - 1))``, window included; where ``n >= max >= min >= window`` fails, every layer keeps
``k`` (uniform).

Options as in SnapKV: ``heads="query"`` selects per query head on a repeated cache (see
:mod:`.snapkv`; the per-layer budgets are then per query head), and ``preset="longbench"`` gives
SnapKV's LongBench settings (window 32, kernel 7, max pooling; SnapKV's paper, not PyramidKV's).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...budget import resolve_keep
from ...registry import register
from .snapkv import SnapKV


def pyramid_budget(n: int, k: int, layer: int, n_layers: int, window: int, beta: float) -> int:
    """Entries kept at ``layer`` (kvpress's formula; see the module docstring)."""
    lo = k / beta
    hi = 2 * k - lo
    if hi >= n - window:
        hi = n - window
        lo = 2 * k - hi
    if not (n >= hi >= lo >= window) or n_layers < 2:
        return k
    return round(hi - layer * (hi - lo) / (n_layers - 1))


@register(
    "pyramidkv",
    family="kv",
    paper="PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
    stages=("after-prefill",),
    signals=("window_attention",),
    summary="SnapKV scores with per-layer budgets falling linearly with depth (same total)",
)
@dataclass
class PyramidKV(SnapKV):
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta >= 1:
            raise ValueError(f"pyramidkv: beta must be >= 1; got {self.beta!r}")

    def budget(self, n: int, keep: int | float, layer: int, n_layers: int) -> int:
        k = resolve_keep(keep, n)
        return max(1, min(n, pyramid_budget(n, k, layer, n_layers, min(self.window, n - 1), self.beta)))
