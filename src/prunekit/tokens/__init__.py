"""Token pruning: pure tensor algorithms (scores, selection, merging) and one file per method."""

from .context import Selection, Signal, TokenContext, TokenMethod, topk_sorted

__all__ = ["Selection", "Signal", "TokenContext", "TokenMethod", "topk_sorted"]
