"""Training on an existing engine: a thin layer over the transformers ``Trainer``.

- :func:`train_causal_lm` trains a causal LM (or a PEFT-wrapped one) on token windows with a seed,
  a progress bar, callbacks and an optional checkpoint folder; the ``Trainer`` underneath runs the
  same call on one CPU here and, unchanged, on several GPUs under ``accelerate launch``.
- :func:`recover` is LoRA recovery after structured pruning (LLM-Pruner, CFSP): PEFT LoRA adapters
  trained with :func:`train_causal_lm`, then merged into the weights.
- :func:`train_batches` trains on ready-made batches (any model inputs, in order), e.g. ATP-LLaVA's
  threshold modules on a frozen VLM (:func:`prunekit.training.atp.train_atp`).
- :func:`pat` is PAT (pruning-aware tuning, AAAI'25): a trained mask over the hidden size with
  identity-plus-low-rank modules on hooks, merged into a physically narrower model
  (:mod:`~prunekit.training.pat_tuning`).
- :func:`ftp` is FTP (token-wise block skipping with a learned router, a reconstruction): the GA
  schedule search, the router training and an optional re-tune in one call
  (:mod:`~prunekit.training.ftp_routing`; the skipping itself is :mod:`prunekit.tokens.ftp`).
- :func:`journey` is sparse pre-training with gradual global magnitude pruning (The Journey
  Matters, ICLR'25): a :class:`SparsityScheduler` (geometric, cubic or one-shot schedules in steps,
  :mod:`~prunekit.training.schedules`) for a plain loop or the ``Trainer``, the average parameter
  count N̄, and :func:`fit_scaling_law` (Chinchilla's fit with N̄).
- :func:`precrop` is PreCropping (channel widths from layer densities at initialisation, a narrow
  network built and trained; a reconstruction) and :func:`layer_lottery` is Layers-Lottery
  (residual blocks scored at initialisation and removed before training); both return a new
  network, trained with :func:`train_network` or any loop (:mod:`~prunekit.training.precrop`,
  :mod:`~prunekit.training.layer_lottery`).
- :func:`sap` is SAP (PQ-index-driven iterative pruning with rewinding, ICLR'23) with its callback,
  and :func:`polarization` the consensus gates with the polarization regulariser (a reconstruction;
  ``variant="bn"`` the official BN polariser), cut and removed physically.
- :func:`lrp` (:func:`lrp_prune`) is pruning by explaining: LRP relevance
  (:mod:`~prunekit.training.lrp_rules`) ranks channels, neurons or ViT heads; PXP's one-shot step or
  Yeom's iterative schedule, and :class:`IterativeLRP` for a training loop.
- :func:`meta_pruning` is MetaPruning (a graph metanetwork, :func:`meta_train`, rewrites a trained
  MLP so it prunes better; then group-L2 neuron pruning to a FLOPs speed-up).
- The registry's ``training`` family (``prunekit.methods("training")``) lists them: ``pat``,
  ``ftp``, ``journey``, ``precrop``, ``layer_lottery``, ``sap``, ``polarization``, ``lrp`` and
  ``meta_pruning``, each a dataclass of options called like the function.
- :mod:`~prunekit.training.hooks`: straight-through estimators, step schedules and gradient masks
  for training-aware methods; ``train_causal_lm(loss_fn=...)`` adds their loss terms.
"""

from __future__ import annotations

from .ftp_routing import FTP, FTPResult, ftp
from .gradual import SparsityScheduler, global_magnitude_masks, prunable_linears
from .hooks import GradientMask, StepSchedule, ste_heaviside, straight_through
from .journey import Journey, JourneyReport, journey
from .layer_lottery import LayerLottery, LotteryReport, layer_lottery, layer_lottery_and_train
from .loop import TrainResult, token_windows, train_batches, train_causal_lm
from .lrp_pruning import LRP, IterativeLRP, LRPReport, lrp, lrp_prune
from .meta_pruning import MetaGNN, MetaPruning, MetaPruningReport, meta_pruning, meta_train
from .pat_tuning import PAT, PATReport, pat
from .polarization import ConsensusGates, Polarization, PolarizationReport, polarization
from .precrop import PreCrop, PreCropReport, precrop, precrop_and_train, train_network
from .recover import DEFAULT_TARGETS, RecoveryReport, lora_targets, recover
from .sap import SAP, SAPCallback, SAPReport, sap, sap_step
from .schedules import (
    ScalingLaw,
    average_param_count,
    cubic_sparsity,
    fit_scaling_law,
    geometric_sparsity,
    journey_average_fraction,
    one_shot_sparsity,
)

__all__ = [
    "DEFAULT_TARGETS",
    "FTP",
    "LRP",
    "PAT",
    "SAP",
    "ConsensusGates",
    "FTPResult",
    "GradientMask",
    "IterativeLRP",
    "Journey",
    "JourneyReport",
    "LRPReport",
    "LayerLottery",
    "LotteryReport",
    "MetaGNN",
    "MetaPruning",
    "MetaPruningReport",
    "PATReport",
    "Polarization",
    "PolarizationReport",
    "PreCrop",
    "PreCropReport",
    "RecoveryReport",
    "SAPCallback",
    "SAPReport",
    "ScalingLaw",
    "SparsityScheduler",
    "StepSchedule",
    "TrainResult",
    "average_param_count",
    "cubic_sparsity",
    "fit_scaling_law",
    "ftp",
    "geometric_sparsity",
    "global_magnitude_masks",
    "journey",
    "journey_average_fraction",
    "layer_lottery",
    "layer_lottery_and_train",
    "lora_targets",
    "lrp",
    "lrp_prune",
    "meta_pruning",
    "meta_train",
    "one_shot_sparsity",
    "pat",
    "polarization",
    "precrop",
    "precrop_and_train",
    "prunable_linears",
    "recover",
    "sap",
    "sap_step",
    "ste_heaviside",
    "straight_through",
    "token_windows",
    "train_batches",
    "train_causal_lm",
    "train_network",
]
