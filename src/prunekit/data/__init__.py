"""Data pruning (placeholder on branch h/qtuning; the lead merges the full package from h/data-core)."""

from .qtuning import QTuning, QTuningCallback, QTuningCollator, step_filter

__all__ = ["QTuning", "QTuningCallback", "QTuningCollator", "step_filter"]
