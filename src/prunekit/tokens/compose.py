"""Composition: one method's scores, another method's selection (score x select).

``Compose("hiprune", "divprune")`` ranks tokens by HiPrune's scores and selects them with
DivPrune's diversity greedy; through the public API it is ``prune_tokens(model,
"hiprune+divprune", keep)`` or ``prune_tokens(model, Compose(...), keep)``. The scorer is any
method with a ``score()``; the selector is any method, through its :meth:`select_scored`:

- top-k methods (the default): the ``k`` highest scores;
- ``divprune`` / ``todre``: the greedy diversity pick with the scores (min-max normalised per
  group) as a relevance bonus of weight ``weight`` — ``weight=0`` is pure diversity, ``1`` pure
  scores (a prunekit extension: the papers select on diversity alone);
- ``holov``: the crop-wise budget and in-crop ranking, on the scores (shifted to be non-negative)
  instead of [CLS] attention.

The composition runs at the stages both methods run at, and needs the scorer's signals.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch

from .. import registry
from .context import Selection, Signal, TokenContext, TokenMethod


def unit_range(scores: torch.Tensor) -> torch.Tensor:
    """Per-group min-max normalisation of ``(G, N)`` scores to [0, 1] (constant groups -> 0)."""
    s = scores.float()
    lo, hi = s.amin(dim=-1, keepdim=True), s.amax(dim=-1, keepdim=True)
    return (s - lo) / (hi - lo).clamp_min(1e-12)


def _build(name: str, options: dict) -> TokenMethod:
    info = registry.get(name)
    if info.family != "tokens":
        raise ValueError(f"method {info.name!r} is a {info.family} method; compose takes token methods")
    return info.factory(**options)


@dataclass
class Compose(TokenMethod):
    """Scores of ``score`` (a method name), selection of ``select`` (a method name)."""

    score_method: str = "fastervlm"
    select_method: str = "divprune"
    score_options: dict = field(default_factory=dict)
    select_options: dict = field(default_factory=dict)
    #: weight of the scores in a diversity selector's greedy objective
    weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.weight) <= 1.0:
            raise ValueError(f"compose: weight must be in [0, 1]; got {self.weight!r}")
        self.scorer = _build(self.score_method, self.score_options)
        self.selector = _build(self.select_method, self.select_options)
        if type(self.scorer).score is TokenMethod.score:
            raise ValueError(
                f"compose: {self.scorer.name!r} has no per-token score (it selects directly); "
                "use a scoring method (e.g. fastv, fastervlm, hiprune) as the scorer"
            )
        sel = type(self.selector)
        if sel.select_scored is TokenMethod.select_scored and sel.select is not TokenMethod.select:
            raise ValueError(
                f"compose: {self.selector.name!r} selects by its own rule, which takes no scores; "
                "selectors: any top-k method (e.g. fastv), divprune, todre, holov"
            )
        if getattr(self.scorer, "in_tower", False) or getattr(self.selector, "in_tower", False):
            raise ValueError("compose: flowcut prunes inside the vision tower and cannot be composed")
        self.name = f"{self.scorer.name}+{self.selector.name}"
        if getattr(self.scorer, "group_by", "image") == "crop":  # its per-crop maps (LLaVA-NeXT)
            self.group_by = "crop"
        self.layer = self.scorer.layer
        stages = registry.get(self.selector.name).stages
        self.stages = tuple(s for s in registry.get(self.scorer.name).stages if s in stages)
        if not self.stages:
            raise ValueError(
                f"compose: {self.scorer.name!r} runs at {list(registry.get(self.scorer.name).stages)} and "
                f"{self.selector.name!r} at {list(stages)}: no common stage"
            )
        if self.scorer.cuts(32) is not None or self.selector.cuts(32) is not None:
            # progressive (several-layer) cuts cannot be composed; a method progressive only inside
            # the LLM (VFlowOpt's llm stage) still composes at its other stages
            self.stages = tuple(s for s in self.stages if s not in ("llm", "encoder"))
            if not self.stages:
                raise ValueError("compose: progressive (several-layer) methods cannot be composed")

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (*self.scorer.needs(stage), Signal("tokens"))

    def for_family(self, family: str, has_cls: bool) -> TokenMethod:
        out = copy.copy(self)
        out.scorer = self.scorer.for_family(family, has_cls)
        out.selector = self.selector.for_family(family, has_cls)
        return out

    def score(self, ctx: TokenContext) -> torch.Tensor:
        return self.scorer.score(ctx)

    def select(self, ctx: TokenContext, k: int) -> Selection:
        return self.selector.select_scored(ctx, k, self.scorer.score(ctx), self.weight)


def parse(name: str, options: dict) -> Compose:
    """``"a+b"`` plus options: each option goes to the method that has it (``weight`` to the
    composition); an option neither has is refused, naming both sets."""
    score, select = (s.strip() for s in name.split("+", 1))
    a, b = registry.get(score).factory, registry.get(select).factory
    fa = {f.name for f in dataclasses.fields(a)} if dataclasses.is_dataclass(a) else set()
    fb = {f.name for f in dataclasses.fields(b)} if dataclasses.is_dataclass(b) else set()
    opts = dict(options)
    weight = opts.pop("weight", 0.5)
    unknown = sorted(set(opts) - fa - fb)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for {name!r}; {score} takes {sorted(fa)}, {select} takes "
            f"{sorted(fb)}, and the composition takes ['weight']"
        )
    return Compose(
        score,
        select,
        {k: v for k, v in opts.items() if k in fa},
        {k: v for k, v in opts.items() if k in fb and k not in fa},
        weight,
    )
