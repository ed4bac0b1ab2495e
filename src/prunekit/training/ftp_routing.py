"""FTP in one call: :func:`ftp` runs the three stages of FTP (Fine-grained Token-wise Pruner,
arXiv 2412.11494, a **reconstruction**: no official code exists; see :mod:`prunekit.tokens.ftp` for
every part that is ours or third-party) on a frozen causal LM and returns a saveable
:class:`FTPResult` whose :meth:`~FTPResult.skipping` context makes the model skip tokens.

1. the genetic-algorithm search of per-block sparsity with the static router
   (:func:`~prunekit.tokens.ftp.ga_schedule`);
2. the router trained with the guide, sparsity and distillation losses, the LLM frozen
   (:func:`~prunekit.tokens.ftp.train_router`, on the transformers ``Trainer`` through
   :func:`~prunekit.training.train_causal_lm`, so ``accelerate launch`` scales it out);
3. optionally (``retune=True``), the GA again with the trained router.

Data split [ours]: the first ``calib_windows`` windows of ``seq_len`` tokens score the GA; the
router trains on the windows after them (or on all windows when there are no others).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..registry import register
from ..tokens import ftp as F
from .recover import _windows

FORMAT = "prunekit-ftp-router/1"


@dataclass
class FTPResult:
    """A trained FTP router and its per-block schedule (what :func:`ftp` returns).

    ``with result.skipping(model):`` runs ``model`` (the one it was trained on) with token skipping;
    :meth:`save` / :meth:`load` keep it as one safetensors file (the schedule in its metadata)."""

    router: F.FTPRouter
    schedule: list[float]
    sparsity: float
    kv: str = "drop"
    ga_fitness: list[float] = field(default_factory=list)
    retune_fitness: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    terms_last: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def skipping(self, model: nn.Module, *, kv: str | None = None, threshold: float = F.DECODE_THRESHOLD):
        """:func:`~prunekit.tokens.ftp.token_skipping` with this router and schedule (``kv``: the
        training's mode unless given)."""
        return F.token_skipping(model, self.router, self.schedule, kv=kv or self.kv, threshold=threshold)

    def to_dict(self) -> dict:
        return {
            "sparsity": self.sparsity, "kv": self.kv, "schedule": self.schedule,
            "ga_fitness": self.ga_fitness, "retune_fitness": self.retune_fitness,
            "steps": len(self.losses), "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None, "terms_last": self.terms_last,
            "seconds": self.seconds,
        }  # fmt: skip

    def save(self, path: str | Path) -> None:
        """The router's weights as safetensors; schedule, sparsity and kv in the file's metadata."""
        from safetensors.torch import save_file

        hidden = self.router.net[0].out_features
        meta = {"format": FORMAT, "schedule": json.dumps(self.schedule), "sparsity": repr(self.sparsity),
                "kv": self.kv, "hidden": str(hidden)}  # fmt: skip
        state = {k: v.detach().contiguous().cpu() for k, v in self.router.state_dict().items()}
        save_file(state, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> FTPResult:
        """A result saved by :meth:`save` (weights only: the training record is not kept)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an FTP router saved by prunekit (format {meta.get('format')!r})")
        router = F.FTPRouter(hidden=int(meta["hidden"]))
        router.load_state_dict(load_file(str(path)))
        router.eval()
        return cls(router, json.loads(meta["schedule"]), float(meta["sparsity"]), meta["kv"])


def ftp(
    model: nn.Module,
    texts: Sequence[str] | torch.Tensor | Sequence[torch.Tensor],
    *,
    tokenizer=None,
    sparsity: float = 0.3,
    seq_len: int = 128,
    calib_windows: int = 4,
    population: int = 16,
    generations: int = 10,
    steps: int = 300,
    lr: float = 1e-3,
    tail: int | None = 32,
    kv: str = "drop",
    retune: bool = False,
    hidden: int = 64,
    seed: int = 0,
    progress: bool = True,
    **loss_weights,
) -> FTPResult:
    """Train FTP's token router for a mean token sparsity ``sparsity`` (fraction of token-block
    computations skipped) on the frozen ``model``; returns an :class:`FTPResult`. The model's
    weights are not changed (tested); use ``with result.skipping(model): model.generate(...)``.

    ``texts`` and ``tokenizer`` as in :func:`~prunekit.training.recover`. ``tail``: the GA's fitness
    and the distillation count only the last ``tail`` positions of each window (the positions a
    prefill serves; ``None``: all) [ours]. ``population``, ``generations``: the GA [3rd-party: 16 and
    10]; ``steps``, ``lr``: the router (batch 1) [3rd-party: batch 1; steps and lr ours];
    ``loss_weights``: ``distill``, ``sparsity``, ``guide``, ``guide_until`` of
    :func:`~prunekit.tokens.ftp.ftp_loss`. ``retune``: FTP's stage 3, the GA again with the trained
    router (its own ``population`` x ``generations``).
    """
    if kv not in F.KV_MODES:
        raise ValueError(f"kv must be one of {F.KV_MODES}; got {kv!r}")
    for name, v, lo in (("seq_len", seq_len, 2), ("calib_windows", calib_windows, 1), ("steps", steps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
    unknown = sorted(set(loss_weights) - {"distill", "guide", "guide_until", "sparsity_weight"})
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown}; loss weights: distill, guide, guide_until, sparsity_weight"
        )
    if "sparsity_weight" in loss_weights:
        loss_weights["sparsity"] = loss_weights.pop("sparsity_weight")
    windows = _windows(texts, tokenizer, seq_len)
    if windows.shape[0] < calib_windows:
        raise ValueError(
            f"texts give {windows.shape[0]} windows of {seq_len} tokens; "
            f"the GA needs calib_windows={calib_windows}"
        )
    device = next(model.parameters()).device
    calib = windows[:calib_windows].to(device)
    train = windows[calib_windows:] if windows.shape[0] > calib_windows else windows
    was_training = model.training
    model.eval()
    seconds = {}
    try:
        t0 = time.perf_counter()
        ga = {"population": population, "generations": generations, "kv": kv, "tail": tail}
        schedule, ga_fit = F.ga_schedule(model, calib, sparsity, seed=seed, **ga)
        seconds["ga"] = time.perf_counter() - t0
        router = F.FTPRouter(hidden=hidden, seed=seed).to(device)
        res = F.train_router(
            model, router, train, schedule, steps=steps, lr=lr, seed=seed, kv=kv, progress=progress,
            tail=tail, **loss_weights,
        )  # fmt: skip
        seconds["router"] = res.seconds
        model.eval()
        retune_fit: list[float] = []
        if retune:
            t0 = time.perf_counter()
            schedule, retune_fit = F.ga_schedule(model, calib, sparsity, router=router, seed=seed + 1, **ga)
            seconds["retune"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    last = res.terms[-1] if res.terms else {}
    return FTPResult(router, schedule, sparsity, kv, ga_fit, retune_fit, res.losses, last, seconds)


@register(
    "ftp",
    family="training",
    paper="FTP: A Fine-grained Token-wise Pruner for Large Language Models via Token Routing",
    stages=("after-training",),
    signals=("position", "attention_received@previous block", "attention_rank", "block_sparsity"),
    trains=True,
    summary="a tiny router shared by all blocks lets each token skip blocks; GA-searched per-block sparsity",
)
@dataclass
class FTP:
    """FTP's options as a registry method: ``FTP(sparsity=0.3)(model, texts, tokenizer=tok)`` is
    :func:`ftp` (a reconstruction: see :mod:`prunekit.tokens.ftp` for what is unconfirmed)."""

    docs_from: ClassVar[str] = "prunekit.tokens.ftp"
    taxonomy: ClassVar[dict] = {
        "which": "tokens: per-block computation (in the LLM)",
        "speedup": "universal (prefill; fewer token-block computations)",
        "how": "learned (a tiny router trained on the frozen model; GA-searched block sparsity)",
    }
    sparsity: float = 0.3
    seq_len: int = 128
    calib_windows: int = 4
    population: int = 16
    generations: int = 10
    steps: int = 300
    lr: float = 1e-3
    tail: int | None = 32
    kv: str = "drop"
    retune: bool = False

    def __call__(self, model: nn.Module, texts, **kw) -> FTPResult:
        return ftp(model, texts, **asdict(self), **kw)
