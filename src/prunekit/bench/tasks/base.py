"""What a bench task is: data for one model kind, a quality metric, agreement with dense, and the
input its latency, memory and FLOPs are measured on."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ..models import Loaded

#: a zero-argument callable that opens the pruning under test (``nullcontext`` for dense)
Treat = Callable[[], AbstractContextManager]


class NotApplicableError(ValueError):
    """This (task, method) pair measures nothing meaningful; the message says why."""


@dataclass
class TaskOutput:
    """One evaluation: the task's metrics and a ``probe`` tensor compared with dense for agreement."""

    metrics: dict[str, float]
    probe: torch.Tensor | None = None
    n: int = 0
    tokens_kept: float | None = None  # fraction of candidate tokens kept, when a token method ran
    extra: dict = field(default_factory=dict)


class Task:
    """Base class. Subclasses set ``name``, ``kind``, ``primary`` and implement the three hooks."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # model kind: lm, vit, text-encoder
    primary: ClassVar[str] = ""  # the metric the report ranks by (a key of metrics or agreement)
    higher_is_better: ClassVar[bool] = True
    default_limit: ClassVar[int] = 100
    #: method families this task can measure ("dense" always)
    families: ClassVar[tuple[str, ...]] = ("tokens", "kv", "weights")
    why_not: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __init__(self, limit: int | None = None, seed: int = 0) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be an int >= 1 (examples to evaluate); got {limit!r}")
        self.limit = self.default_limit if limit is None else limit
        self.seed = seed
        self.prepared_for: str | None = None

    def check(self, family: str) -> None:
        if family != "dense" and family not in self.families:
            raise NotApplicableError(f"task {self.name!r} cannot measure {family} methods: {self.why_not}")

    def subsample(self, n: int) -> np.ndarray:
        """Indices of ``min(limit, n)`` examples, a seeded random subset in the original order."""
        if self.limit >= n:
            return np.arange(n)
        return np.sort(np.random.default_rng(self.seed).permutation(n)[: self.limit])

    def prepare(self, loaded: Loaded) -> None:
        """Load and tokenise the data (called once per model)."""
        raise NotImplementedError

    def evaluate(self, loaded: Loaded, treat: Treat) -> TaskOutput:
        raise NotImplementedError

    def agreement(self, dense: TaskOutput, pruned: TaskOutput) -> dict[str, float]:
        """How close the pruned outputs are to dense on the same inputs."""
        return {}

    def timing(self, loaded: Loaded) -> dict[str, Callable[[Treat], object]]:
        """Named workloads to time: ``prefill`` (one batch forward) and, for LMs, ``decode``."""
        raise NotImplementedError


def next_token_agreement(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """Top-1 match and KL(dense || pruned) of next-token log-probabilities ``(N, V)``."""
    kl = (dense.exp() * (dense - pruned)).sum(-1).clamp_min(0)
    return {
        "top1_agree": (dense.argmax(-1) == pruned.argmax(-1)).float().mean().item(),
        "kl": kl.mean().item(),
    }
