"""Train a causal LM on token windows with the transformers ``Trainer``.

The ``Trainer`` owns the loop (AdamW, linear warm-up/decay, gradient clipping, accumulation,
mixed precision, checkpoints, resume, distributed data parallel through accelerate), so the call
below runs unchanged on one CPU and under ``accelerate launch`` / ``torchrun`` on several GPUs.
What this layer adds: token windows in, the per-step training losses and the wall time out, a
seed that fixes everything random (LoRA dropout, data order), and no side effects on the run
folder unless a checkpoint folder is asked for.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class TrainResult:
    """What :func:`train_causal_lm` did. ``losses``: the training loss (mean per token) of each
    forward pass, in order: one per step unless ``gradient_accumulation_steps`` is given (then one
    per micro-batch, as the ``Trainer`` scales it); under data parallelism, this process's."""

    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    #: the named terms of ``loss_fn`` per forward pass (floats), when it returns a dict
    terms: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def token_windows(ids: torch.Tensor | Sequence[torch.Tensor], seq_len: int) -> torch.Tensor:
    """Token windows ``(N, seq_len)``: a 2-D tensor is taken as windows (its width must be
    ``seq_len``); 1-D tensors are concatenated (packed, as LM pretraining does) and cut into
    non-overlapping windows, the incomplete tail dropped."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (tokens per training window); got {seq_len!r}")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        if ids.shape[1] != seq_len:
            raise ValueError(f"token windows have width {ids.shape[1]}; seq_len is {seq_len}")
        out = ids
    else:
        parts = [ids] if isinstance(ids, torch.Tensor) else list(ids)
        if any(not isinstance(p, torch.Tensor) or p.dim() != 1 for p in parts):
            raise ValueError("token ids must be a 2-D (windows, seq_len) tensor or 1-D tensors")
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        n = flat.numel() // seq_len
        out = flat[: n * seq_len].view(n, seq_len)
    if out.shape[0] == 0:
        raise ValueError(f"no training window: the texts hold fewer than seq_len={seq_len} tokens")
    if out.is_floating_point():
        raise ValueError(f"token ids must be integers; got dtype {out.dtype}")
    return out.long()


class _Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        w = self.windows[i]
        return {"input_ids": w, "labels": w}  # the model shifts the labels itself


def train_causal_lm(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    callbacks: Sequence = (),
    checkpoint_dir: str | None = None,
    save_steps: int | None = None,
    resume: bool | str = False,
    progress: bool = True,
    loss_fn=None,
    lm_loss: bool = True,
    **trainer_args,
) -> TrainResult:
    """Train ``model`` (its trainable parameters: freeze the rest, or wrap it with PEFT first) for
    ``steps`` optimiser steps on ``windows`` ``(N, T)`` of token ids, next-token loss on every
    position. Batches are ``batch_size`` windows per device; the data are
    reshuffled every pass (seeded), so ``steps`` may exceed one epoch.

    ``callbacks``: transformers ``TrainerCallback`` objects (schedules, gradient masks, ...; see
    :mod:`prunekit.training.hooks`).
    ``loss_fn(model, inputs, outputs, step)``: extra loss terms, added to the next-token loss (or
    alone with ``lm_loss=False``): a scalar tensor, or a dict of named scalar tensors (summed; each
    term is recorded in ``TrainResult.terms``). ``step`` is the optimiser step being taken (0-based),
    for schedules; ``outputs`` are the model's outputs on ``inputs`` (logits included).
    ``checkpoint_dir``: where the ``Trainer`` saves checkpoints every ``save_steps`` steps (default:
    at the end only); ``resume=True`` (or a checkpoint path) continues from the latest one. Without
    it a throw-away folder is used and nothing is saved. Extra keyword arguments go to
    ``TrainingArguments`` (e.g. ``bf16=True`` on a GPU).

    Deterministic under ``seed`` on a given machine and thread count (the ``Trainer`` seeds torch,
    numpy and Python before building the model's data order and dropout masks).
    """
    for name, v, lo in (("steps", steps, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
    return _run(
        model, _Windows(windows), None, steps=steps, lr=lr, batch_size=batch_size, warmup_steps=warmup_steps,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, callbacks=callbacks,
        checkpoint_dir=checkpoint_dir, save_steps=save_steps, resume=resume, progress=progress,
        loss_fn=loss_fn, lm_loss=lm_loss, in_order=False, **trainer_args,
    )  # fmt: skip


def train_batches(
    model: nn.Module,
    batches: Sequence[dict],
    *,
    steps: int,
    lr: float = 1e-4,
    seed: int = 0,
    callbacks: Sequence = (),
    loss_fn=None,
    lm_loss: bool = True,
    progress: bool = True,
    **options,
) -> TrainResult:
    """Train ``model``'s trainable parameters for ``steps`` optimiser steps on ready-made batches
    (dicts of model inputs, e.g. a VLM's ``input_ids``, ``pixel_values`` and ``labels``), taken in
    order and cycled. The model's own loss (``outputs.loss``) plus ``loss_fn``'s terms, as in
    :func:`train_causal_lm`, whose other options (``lr_scheduler_type``, ``max_grad_norm``,
    checkpoints, resume, ...) apply too."""
    if not batches:
        raise ValueError("train_batches needs at least one batch; got none")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    return _run(model, _Batches(list(batches)), _first, steps=steps, lr=lr, batch_size=1, seed=seed,
                callbacks=callbacks, loss_fn=loss_fn, lm_loss=lm_loss, progress=progress, in_order=True,
                **options)  # fmt: skip


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def _first(items: list[dict]) -> dict:
    return items[0]  # each item is a whole batch already


def _run(
    model: nn.Module,
    dataset,
    collator,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    callbacks: Sequence,
    loss_fn,
    lm_loss: bool,
    progress: bool,
    in_order: bool,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    checkpoint_dir: str | None = None,
    save_steps: int | None = None,
    resume: bool | str = False,
    **trainer_args,
) -> TrainResult:
    """The ``Trainer`` run behind :func:`train_causal_lm` and :func:`train_batches`."""

    from transformers import PrinterCallback, Trainer, TrainingArguments

    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr!r}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameter (requires_grad=True)")
    if loss_fn is None and not lm_loss:
        raise ValueError("lm_loss=False needs a loss_fn: there would be nothing to train on")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable (model, inputs, outputs, step) -> loss; got {loss_fn!r}")
    losses: list[float] = []

    terms: list[dict] = []

    class _Recording(Trainer):
        def _get_train_sampler(self, *args, **kw):
            if in_order:  # ready-made batches are taken in order, as a hand-written loop would
                return torch.utils.data.SequentialSampler(self.train_dataset)
            return super()._get_train_sampler(*args, **kw)

        def compute_loss(self, model, inputs, return_outputs=False, **kw):
            if loss_fn is None:
                out = super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)
                loss = out[0] if return_outputs else out
            else:
                loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kw)
                extra = loss_fn(model, inputs, outputs, self.state.global_step)
                if isinstance(extra, dict):
                    if model.training:
                        terms.append({k: float(v.detach()) for k, v in extra.items()})
                    extra = sum(extra.values())
                loss = loss + extra if lm_loss else extra
                out = (loss, outputs) if return_outputs else loss
            if model.training:
                losses.append(float(loss.detach()))
            return out

    device = next(model.parameters()).device
    schedule = trainer_args.pop("lr_scheduler_type", "linear")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=checkpoint_dir or tmp,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            warmup_steps=warmup_steps,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            lr_scheduler_type=schedule,
            optim="adamw_torch",
            seed=seed,
            data_seed=seed,
            logging_strategy="no",
            save_strategy="steps" if checkpoint_dir else "no",
            save_steps=save_steps or steps,
            report_to="none",
            disable_tqdm=not progress,
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            remove_unused_columns=False,
            **trainer_args,
        )
        trainer = _Recording(
            model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=list(callbacks)
        )
        if not progress:
            trainer.remove_callback(PrinterCallback)  # it would print the final metrics
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume or None)
        seconds = time.perf_counter() - t0
    return TrainResult(steps=trainer.state.global_step, losses=losses, seconds=seconds, terms=terms)
