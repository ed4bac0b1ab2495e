"""Pieces that training-aware pruning methods plug into :func:`~prunekit.training.train_causal_lm`:
straight-through estimators, a per-step schedule callback and a gradient-mask callback. The
``Trainer`` drives them, so they run unchanged under ``accelerate launch`` on several GPUs."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from transformers import TrainerCallback


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """``hard`` in the forward pass, ``soft``'s gradient in the backward pass."""
    return soft + (hard - soft).detach()


def ste_heaviside(x: torch.Tensor) -> torch.Tensor:
    """``1[x >= 0]`` forward, identity gradient backward (PAT's ``H``; the straight-through
    estimator of Bengio et al. 2013)."""
    return straight_through((x >= 0).to(x.dtype), x)


class StepSchedule(TrainerCallback):
    """Calls ``fn(step, max_steps)`` before every optimiser step (0-based ``step``): temperatures,
    biases, loss weights and sparsity targets that follow the step count, in steps, not epochs."""

    def __init__(self, fn: Callable[[int, int], None]) -> None:
        if not callable(fn):
            raise ValueError(f"StepSchedule needs a callable fn(step, max_steps); got {fn!r}")
        self.fn = fn

    def on_step_begin(self, args, state, control, **kwargs):
        self.fn(state.global_step, state.max_steps)


class GradientMask(TrainerCallback):
    """Multiplies each parameter's gradient by its mask (1 = train, 0 = frozen entries) after the
    backward pass and before the optimiser step, e.g. to keep pruned weights at zero while tuning."""

    def __init__(self, masks: Iterable[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
        self.masks = []
        for p, m in masks:
            if tuple(m.shape) != tuple(p.shape):
                raise ValueError(
                    f"a gradient mask of shape {tuple(m.shape)} for a parameter of shape {tuple(p.shape)}"
                )
            self.masks.append((p, m.to(p.device, p.dtype)))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for p, m in self.masks:
            if p.grad is not None:
                p.grad.mul_(m)
