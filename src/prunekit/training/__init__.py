"""Training on an existing engine: a thin layer over the transformers ``Trainer``.

- :func:`train_causal_lm` trains a causal LM (or a PEFT-wrapped one) on token windows with a seed,
  a progress bar, callbacks and an optional checkpoint folder; the ``Trainer`` underneath runs the
  same call on one CPU here and, unchanged, on several GPUs under ``accelerate launch``.
- :func:`recover` is LoRA recovery after structured pruning (LLM-Pruner, CFSP): PEFT LoRA adapters
  trained with :func:`train_causal_lm`, then merged into the weights.
"""

from __future__ import annotations

from .loop import TrainResult, token_windows, train_causal_lm
from .recover import DEFAULT_TARGETS, RecoveryReport, lora_targets, recover

__all__ = [
    "DEFAULT_TARGETS",
    "RecoveryReport",
    "TrainResult",
    "lora_targets",
    "recover",
    "token_windows",
    "train_causal_lm",
]
