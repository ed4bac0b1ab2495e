"""A treatment is what a bench run does to the model: nothing (``dense``) or one registered
method at one budget, opened as a context manager around every evaluation and timed call.

Token methods go through :func:`prunekit.prune_tokens`, KV-cache methods through
:func:`prunekit.compress_kv` (``keep`` = the fraction of the prompt's cache kept). Weight methods
are measured by ``benchmarks/weights_quality.py``, or by benching the folder ``prunekit prune``
saved (a pruned checkpoint is an ordinary model to the bench).
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from torch import nn

from .. import registry
from ..budget import validate_keep


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
        if info.family not in ("tokens", "kv"):
            raise NotImplementedError(
                f"the bench runs token and kv methods so far; {info.name!r} is a {info.family} method "
                "(weight methods: benchmarks/weights_quality.py, or `prunekit prune` then bench the "
                "saved folder)"
            )
        fields = (
            {f.name for f in dataclasses.fields(info.factory)}
            if dataclasses.is_dataclass(info.factory)
            else set()
        )
        unknown = sorted(set(self.options) - fields)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for method {info.name!r}; allowed: {sorted(fields)}"
            )

    def opener(self, model: nn.Module, stage: str | None = None):
        """A zero-argument callable returning the context manager that applies this treatment."""
        if self.method == "dense":
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
        factory = registry.get(name).factory
        if dataclasses.is_dataclass(factory):
            fields |= {f.name for f in dataclasses.fields(factory)}
    return {k: v for k, v in options.items() if k in fields}


__all__ = ["AbstractContextManager", "Treatment", "options_for"]
