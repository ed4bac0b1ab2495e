"""Training-data pruning: train on less data and lose nothing.

- Static scores (:mod:`~prunekit.data.scores`), one number per sample, higher = keep: :func:`el2n`
  and :func:`grand` (Paul et al., NeurIPS 2021; GraNd in DeepCore's last-layer form),
  :func:`entropy` (DeepCore's uncertainty-entropy), forgetting events (Toneva et al., ICLR 2019:
  :class:`ForgettingTracker` for a plain loop or as a transformers ``TrainerCallback``,
  :func:`forgetting_counts` from a correctness matrix) and :func:`random_scores`.
- Selection (:mod:`~prunekit.data.select`): :func:`topk` (stable, ties by index),
  :func:`random_subset`, :func:`class_balanced` (DeepCore's ``balance=True``).
- :func:`prunekit.prune_data` runs a registered data method (``random_data``, ``el2n``, ``grand``,
  ``forgetting``, ``entropy``) and returns a :class:`DataPruneReport` whose ``subset()`` is the
  pruned dataset.
- Q-Tuning (:mod:`~prunekit.data.qtuning`, Wang et al., arXiv 2509.23873): per mini-batch sample
  and answer-token pruning for fine-tuning from one no-grad forward (error-uncertainty quadrants);
  :class:`QTuningCollator` for an unchanged ``Trainer``, :func:`step_filter` for a plain loop.
- KD on the kept subset (:mod:`~prunekit.data.kd`, Ben-Baruch et al., ICML 2025): :func:`kd_loss`,
  :func:`alpha_for_fraction` (``alpha="auto"``, a prunekit heuristic), :class:`KDTrainer` (a
  transformers ``Trainer``), :func:`train_kd` (a plain loop) and the registry's ``kd_data``
  (:class:`KDData`: prune, then a :class:`KDPlan` to train with).
"""

from __future__ import annotations

from .kd import IndexedSubset, KDData, KDLoss, KDPlan, KDTrainer, alpha_for_fraction, kd_loss, train_kd
from .prune import DataPruneReport, prune_data
from .qtuning import QTuning, QTuningCallback, QTuningCollator, step_filter
from .scores import (
    ForgettingTracker,
    IndexedDataset,
    el2n,
    entropy,
    forgetting,
    forgetting_counts,
    grand,
    random_scores,
    with_index,
)
from .select import class_balanced, kept_count, random_subset, topk

__all__ = [
    "DataPruneReport",
    "ForgettingTracker",
    "IndexedDataset",
    "IndexedSubset",
    "KDData",
    "KDLoss",
    "KDPlan",
    "KDTrainer",
    "QTuning",
    "QTuningCallback",
    "QTuningCollator",
    "alpha_for_fraction",
    "class_balanced",
    "el2n",
    "entropy",
    "forgetting",
    "forgetting_counts",
    "grand",
    "kd_loss",
    "kept_count",
    "prune_data",
    "random_scores",
    "random_subset",
    "step_filter",
    "topk",
    "train_kd",
    "with_index",
]
