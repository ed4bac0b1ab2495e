"""Gradual global magnitude pruning during training, following a sparsity schedule in steps: the
Journey code's pruning (The Journey Matters, ICLR'25, arXiv 2501.12486; tjingrant/sparse-llm-code,
``MaxText/train.py`` ``prune``), for a plain PyTorch loop and for the transformers ``Trainer``.

Selection, as the Journey code: one global threshold over all chosen weights,
``thr = sort(|w ⊙ m|)[n - ⌊keep · n⌋]`` (already-pruned zeros count in ``n``), and the new mask
``m ← m ⊙ (|w| >= thr)``. Masks only grow sparser.

Departures:

- The Journey code keeps a mask parameter and multiplies it into the forward pass; here the pruned
  weights are set to zero in place, their gradients are masked in the backward pass (a hook on the
  weight, so gradient clipping sees the masked gradient, as the Journey code's chain rule does) and
  they are zeroed again after every optimiser step (Adam's moments would otherwise move them). The
  forward pass is the same.
- ``⌊keep · n⌋`` is taken with a 1e-9 guard (``⌊keep · n + 1e-9⌋``) so that, e.g., ``keep = 0.3``
  stored as 0.29999... does not lose one weight to rounding [ours].
- Weights tied to an embedding (a tied ``lm_head``) are not pruned by default; the Journey code
  prunes the logits projection only when it is untied, too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from . import schedules as S


def prunable_linears(model: nn.Module, exclude: str | Sequence[str] = ()) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` in ``model`` whose weight is not shared with an
    embedding (a tied ``lm_head``) and whose name contains none of ``exclude`` (substrings, as the
    Journey code's ``do_not_prune_kw``); each weight once. Every Linear of the model counts (exclude
    a vision tower by name); GPT-2's ``Conv1D`` is not an ``nn.Linear`` and is not taken."""
    if isinstance(exclude, str):
        exclude = (exclude,)
    exclude = tuple(exclude)
    if not all(isinstance(e, str) and e for e in exclude):
        raise ValueError(f"exclude must be non-empty name substrings; got {exclude!r}")
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or any(e in name for e in exclude):
            continue
        if id(m.weight) in tied or id(m.weight) in seen:
            continue
        seen.add(id(m.weight))
        out.append((name, m))
    return out


def global_magnitude_masks(
    weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], sparsity: float
) -> tuple[list[torch.Tensor], float]:
    """The Journey code's global threshold: new masks (bool) for ``weights`` at ``sparsity`` of all
    their entries (zeros already masked count), and the threshold. Pure; nothing is modified."""
    sparsity = S._fraction("sparsity", sparsity, closed=True)
    pairs = list(zip(weights, masks, strict=True))
    scores = torch.cat([(w.detach() * m).abs().flatten().float() for w, m in pairs])
    n = scores.numel()
    keep = math.floor((1.0 - sparsity) * n + 1e-9)
    if keep <= 0:
        return [torch.zeros_like(m, dtype=torch.bool) for m in masks], math.inf
    idx = n - keep  # the sorted position of the threshold, 0-based
    thr = float(torch.kthvalue(scores, idx + 1).values) if idx > 0 else float(scores.min())
    return [m.bool() & (w.detach().abs() >= thr) for w, m in zip(weights, masks, strict=True)], thr


class SparsityScheduler(TrainerCallback):
    """Global unstructured magnitude pruning of ``model``'s Linear weights following ``schedule``, a
    function of the optimiser step giving the sparsity (of all chosen weights together) the weights
    of that step must have: the model is pruned whenever its value changes (it must not decrease).
    The factories :meth:`geometric` (the Journey code's), :meth:`cubic` (Zhu-Gupta) and
    :meth:`one_shot` build it from :mod:`~prunekit.training.schedules`.

    Chosen weights: :func:`prunable_linears` (every Linear, ``lm_head`` included when untied, minus
    ``exclude``). Masks are bool tensors in :attr:`masks` (one per weight, in order).

    **Plain PyTorch loop** (``step`` counts the optimiser steps done, as an LR scheduler)::

        sched = SparsityScheduler.geometric(model, final=0.5, start=250, end=750, frequency=50)
        for batch in batches:            # the constructor applied the schedule's step 0
            model(**batch).loss.backward()  # gradients of pruned weights are masked here (hooks)
            optimizer.step(); optimizer.zero_grad()
            sched.step()                 # re-zero pruned weights; prune if the next step is an event

    **transformers Trainer**: pass the object itself as a callback
    (``train_causal_lm(..., callbacks=[sched])``); it calls :meth:`step` at each step's end.
    :meth:`remove` takes the gradient hooks off (the weights stay pruned).
    """

    def __init__(
        self, model: nn.Module, schedule: Callable[[int], float], *, exclude: str | Sequence[str] = ()
    ) -> None:
        if not callable(schedule):
            raise ValueError(f"schedule must be a function step -> sparsity; got {schedule!r}")
        chosen = prunable_linears(model, exclude)
        if not chosen:
            raise ValueError("the model has no Linear weight to prune (after exclude)")
        self.schedule = schedule
        self.names = [n for n, _ in chosen]
        self.weights = [m.weight for _, m in chosen]
        self.masks = [torch.ones_like(w, dtype=torch.bool) for w in self.weights]
        self.n_params = sum(w.numel() for w in self.weights)
        self.sparsity = 0.0  # the schedule's value at the last pruning
        self.thresholds: list[tuple[int, float, float]] = []  # (step, sparsity, threshold) per event
        self.nonzero: dict[int, int] = {}  # step -> nonzero chosen weights during that step
        self._step = 0
        self._hooks = [
            w.register_hook(functools.partial(_mask_grad, m))
            for w, m in zip(self.weights, self.masks, strict=True)
            if w.requires_grad
        ]
        self._apply(0)

    # --- factories -------------------------------------------------------------------------------
    @classmethod
    def geometric(cls, model, *, final: float, start: int, end: int, frequency: int, exclude=()):
        """The Journey code's schedule (:func:`~prunekit.training.schedules.geometric_sparsity`)."""
        S.geometric_sparsity(0, start=start, end=end, final=final, frequency=frequency)  # validates
        fn = functools.partial(S.geometric_sparsity, start=start, end=end, final=final, frequency=frequency)
        return cls(model, fn, exclude=exclude)

    @classmethod
    def cubic(cls, model, *, final: float, start: int, end: int, frequency: int = 1, initial: float = 0.0,
              exclude=()):  # fmt: skip
        """Zhu-Gupta (:func:`~prunekit.training.schedules.cubic_sparsity`), applied at
        ``start, start + frequency, ...`` and at ``end``."""
        S.cubic_sparsity(0, start=start, end=end, final=final, initial=initial)  # validates
        frequency = S._int("frequency", frequency, 1)

        def fn(step: int) -> float:
            if step >= end:
                return S.cubic_sparsity(end, start=start, end=end, final=final, initial=initial)
            if step < start:
                return S.cubic_sparsity(step, start=start, end=end, final=final, initial=initial)
            at = start + (step - start) // frequency * frequency
            return S.cubic_sparsity(at, start=start, end=end, final=final, initial=initial)

        return cls(model, fn, exclude=exclude)

    @classmethod
    def one_shot(cls, model, *, final: float, at: int = 0, exclude=()):
        """All at step ``at`` (:func:`~prunekit.training.schedules.one_shot_sparsity`)."""
        S.one_shot_sparsity(0, at=at, final=final)  # validates
        return cls(model, functools.partial(S.one_shot_sparsity, at=at, final=final), exclude=exclude)

    # --- the loop ---------------------------------------------------------------------------------
    def step(self, step: int | None = None) -> None:
        """Call after each optimiser step: ``step`` = optimiser steps done so far (default: one more
        than at the last call). Zeroes the pruned weights again and prunes if ``schedule(step)``
        differs from the current sparsity."""
        self._apply(self._step + 1 if step is None else S._int("step", step))

    def _apply(self, step: int) -> None:
        self._step = step
        target = float(self.schedule(step))
        if target < self.sparsity - 1e-12:
            raise ValueError(
                f"the schedule went down from sparsity {self.sparsity} to {target} at step {step}: "
                "masks only grow sparser"
            )
        with torch.no_grad():
            if target != self.sparsity:
                new, thr = global_magnitude_masks(self.weights, self.masks, target)
                for m, nm in zip(self.masks, new, strict=True):
                    m.copy_(nm)  # in place: the gradient hooks hold these tensors
                self.sparsity = target
                self.thresholds.append((step, target, thr))
            for w, m in zip(self.weights, self.masks, strict=True):
                w.masked_fill_(~m.to(w.device), 0)
        self.nonzero[step] = int(sum(int(m.sum()) for m in self.masks))

    def realised_sparsity(self) -> float:
        """The fraction of the chosen weights that are exactly zero now."""
        return sum(int((w == 0).sum()) for w in self.weights) / self.n_params

    def average_param_count(self, total_steps: int | None = None) -> float:
        """N̄: the mean over steps ``0 .. total_steps-1`` (default: every step recorded but the
        last, i.e. the steps trained) of the chosen weights left unpruned during each step."""
        steps = sorted(self.nonzero)
        if total_steps is None:
            total_steps = max(len(steps) - 1, 1)
        missing = [t for t in range(total_steps) if t not in self.nonzero]
        if missing:
            raise ValueError(f"no record for step(s) {missing[:5]}: call step() after every optimiser step")
        return sum(self.nonzero[t] for t in range(total_steps)) / total_steps

    def remove(self) -> None:
        """Take the gradient hooks off (the pruned weights stay zero)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # --- Trainer callback -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        g = state.global_step
        if g > 0 and self._step == 0:  # resumed from a Trainer checkpoint: its weights carry the zeros
            with torch.no_grad():
                for w, m in zip(self.weights, self.masks, strict=True):
                    m.copy_(w != 0)
            self.sparsity = float(self.schedule(g))
        if g != self._step:
            self._apply(g)

    def on_step_end(self, args, state, control, **kwargs):
        self._apply(state.global_step)

    def callback(self) -> SparsityScheduler:
        """The ``TrainerCallback`` (the scheduler itself)."""
        return self


def _mask_grad(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad * mask.to(grad.device)
