"""Sparse pre-training in one call: :func:`journey` trains a causal LM with gradual global magnitude
pruning (The Journey Matters: Average Parameter Count over Pre-training Unifies Sparse and Dense
Scaling Laws, ICLR'25, arXiv 2501.12486; official code tjingrant/sparse-llm-code) on the
transformers ``Trainer`` (:func:`~prunekit.training.train_causal_lm`) with a
:class:`~prunekit.training.gradual.SparsityScheduler` callback, and reports the average parameter
count N̄ that the paper's scaling law uses (:func:`~prunekit.training.schedules.fit_scaling_law`).

Defaults: pruning from 25 % to 75 % of the steps, the paper's recommendation [abstract]; target
sparsity 0.5, the official config's default. Departures: the Journey code sets start, end and the
frequency in steps (defaults 300, 800 and 100, placeholders); here ``start`` and ``end`` are
fractions of ``steps``, ``frequency=None`` picks about 10 intervals [ours], and the end step is
snapped to ``start_step + k·frequency`` (the schedule needs ``end - start`` divisible by the
frequency) [ours]; :class:`JourneyReport` records the steps used. Unlike the official code, pruned
weights are zeroed in place with masked gradients (not a mask multiplied in the forward pass; the
forward pass is the same), and events are counted from ``start`` (the official code fires on
``step % frequency == 0``): see :mod:`~prunekit.training.gradual` and
:func:`~prunekit.training.schedules.geometric_sparsity`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..registry import register
from . import schedules as S
from .gradual import SparsityScheduler
from .loop import train_causal_lm
from .recover import _windows

SCHEDULES = ("geometric", "cubic")


@dataclass
class JourneyReport:
    """What :func:`journey` did. ``n_params``: the prunable (chosen Linear) weights; ``n_bar``:
    their mean unpruned count over the training steps (N̄), ``n_bar_fraction = n_bar / n_params``;
    ``tokens``: tokens trained on (this process's); ``events``: ``(step, sparsity, threshold)`` of
    each pruning; ``eval_loss``: mean next-token loss on ``eval_texts`` after training (if given)."""

    schedule: str
    sparsity: float
    final_sparsity: float
    start_step: int
    end_step: int
    frequency: int
    steps: int
    n_params: int
    n_bar: float
    n_bar_fraction: float
    tokens: int
    events: list = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_loss: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)


def schedule_steps(steps: int, start: float, end: float, frequency: int | None) -> tuple[int, int, int]:
    """``(start_step, end_step, frequency)`` for fractions ``start <= end`` of ``steps``: the end is
    snapped to ``start_step + k·frequency`` (nearest ``k``); ``frequency=None`` picks
    ``round((end - start)·steps / 10)`` (at least 1) [ours]."""
    steps = S._int("steps", steps, 1)
    f0, f1 = S._fraction("start", start, closed=True), S._fraction("end", end, closed=True)
    if f1 < f0:
        raise ValueError(f"end must be >= start (fractions of the steps); got start={start}, end={end}")
    first = min(round(f0 * steps), steps - 1)
    span = round(f1 * steps) - first
    if frequency is None:
        frequency = max(1, round(span / 10))
    frequency = S._int("frequency", frequency, 1)
    last = first + round(span / frequency) * frequency
    return first, last, frequency


def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss (nats per predicted token) of ``model`` on token ``windows``."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                w = windows[i : i + batch_size].to(device)
                out = model(input_ids=w, labels=w)
                n = w.shape[0] * (w.shape[1] - 1)
                total += float(out.loss) * n
                count += n
    finally:
        model.train(was)
    return total / count


def journey(
    model: nn.Module,
    texts: Sequence[str] | torch.Tensor | Sequence[torch.Tensor],
    *,
    tokenizer=None,
    sparsity: float = 0.5,
    start: float = 0.25,
    end: float = 0.75,
    frequency: int | None = None,
    steps: int = 1000,
    schedule: str = "geometric",
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 1e-3,
    warmup_steps: int = 0,
    exclude: tuple = (),
    eval_texts=None,
    seed: int = 0,
    progress: bool = True,
    **trainer_args,
) -> JourneyReport:
    """Train ``model`` (a causal LM, e.g. a small Llama built from a config) for ``steps`` steps of
    ``batch_size`` x ``seq_len`` tokens while pruning its Linear weights (global unstructured
    magnitude; ``lm_head`` included when untied; names containing any of ``exclude`` skipped) to
    ``sparsity``, gradually from ``start`` to ``end`` (fractions of ``steps``) by the ``schedule``:
    ``"geometric"`` (the Journey code's) or ``"cubic"`` (Zhu-Gupta), one pruning every
    ``frequency`` steps. ``sparsity=0`` trains dense (the baseline of the law).

    ``texts``, ``tokenizer``: as :func:`~prunekit.training.recover` (strings with a tokenizer, or
    token ids). ``eval_texts`` (same kinds): the report's ``eval_loss``. Other keyword arguments go
    to :func:`~prunekit.training.train_causal_lm` (``lr_scheduler_type`` defaults to ``"cosine"``
    here, ``weight_decay``, ``bf16``, ...). The model is changed in place: trained and pruned.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}")
    S._fraction("sparsity", sparsity)
    first, last, frequency = schedule_steps(steps, start, end, frequency)
    windows = _windows(texts, tokenizer, seq_len)
    ev = _windows(eval_texts, tokenizer, seq_len) if eval_texts is not None else None
    if schedule == "geometric" or sparsity == 0:
        sched = SparsityScheduler.geometric(
            model, final=sparsity, start=first, end=last, frequency=frequency, exclude=exclude
        )
    else:
        sched = SparsityScheduler.cubic(
            model, final=sparsity, start=first, end=max(last, first + 1), frequency=frequency, exclude=exclude
        )
    trainer_args.setdefault("lr_scheduler_type", "cosine")
    t0 = time.perf_counter()
    try:
        res = train_causal_lm(
            model, windows, steps=steps, lr=lr, batch_size=batch_size, warmup_steps=warmup_steps, seed=seed,
            callbacks=[sched], progress=progress, **trainer_args,
        )  # fmt: skip
    finally:
        sched.remove()
    eval_loss = mean_loss(model, ev, batch_size) if ev is not None else None
    n_bar = sched.average_param_count(steps)
    return JourneyReport(
        schedule=schedule, sparsity=float(sparsity), final_sparsity=sched.realised_sparsity(),
        start_step=first, end_step=last, frequency=frequency, steps=steps, n_params=sched.n_params,
        n_bar=n_bar, n_bar_fraction=n_bar / sched.n_params, tokens=steps * batch_size * seq_len,
        events=[list(e) for e in sched.thresholds], losses=res.losses, eval_loss=eval_loss,
        seconds=time.perf_counter() - t0,
    )  # fmt: skip


@register(
    "journey",
    family="training",
    paper="The Journey Matters: Average Parameter Count over Pre-training Unifies Sparse and Dense "
    "Scaling Laws",
    stages=("during-training",),
    signals=("weight_magnitude (global)",),
    trains=True,
    summary="sparse pre-training: gradual global magnitude pruning from 25% to 75% of the steps",
)
@dataclass
class Journey:
    """The Journey schedule as a registry method: ``Journey(sparsity=0.5)(model, texts, tokenizer=tok)``
    is :func:`journey` (every option documented there)."""

    docs_from: ClassVar[str] = "prunekit.training.journey"
    taxonomy: ClassVar[dict] = {
        "which": "weights: unstructured",
        "speedup": "specific (unstructured)",
        "how": "magnitude, gradual (geometric schedule)",
    }
    sparsity: float = 0.5
    start: float = 0.25
    end: float = 0.75
    frequency: int | None = None
    steps: int = 1000
    schedule: str = "geometric"
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 0

    def __call__(self, model: nn.Module, texts, **kw) -> JourneyReport:
        return journey(model, texts, **asdict(self), **kw)
