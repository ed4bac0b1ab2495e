"""TransPrune — "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model"
(CVPR 2026).

Progressive pruning inside the LLM, at the input of decoder layers 7, 9 and 12 (0-based; "after
layers 7 / 9 / 12" 1-based, of LLaVA's 32, scaled to the model's depth). Each surviving candidate
is scored by

- **TTV**, token transition variation, summed over the layers from the one before the first cut
  up to the cut: for each sub-layer (attention, FFN) with normed input ``x`` and output ``y``
  (before the residual add), ``|y| / |x| * softmax_sequence(1 - cos(x, y))``;
- **IGA**, instruction-guided attention: the cut layer's own attention (q/k on its normed input,
  softmax over all keys, causal, mean over heads) from the instruction tokens (the prompt tokens
  after the image) to the candidates, averaged over those queries;

each normalised to sum 1 over the group's candidates (``+ 1e-8``), then added. ``iga=False``
uses TTV alone (the paper: "TTV alone can serve as an effective criterion").

Budget: ``keep`` is the mean number of candidates per decoder layer. The official ratios of the
original count, ``(0.875, 0.625, 0.125)``, give a mean of about 0.41 n at 32 layers; other budgets
bend them by a power (``r ** a``, see :func:`prunekit.tokens.schedule.power_shape`). A budget
below what the first cut allows (every layer before it sees all candidates) is refused with the
reachable range: give earlier ``layers``.

Departures from the official code: the TTV softmax runs over each sequence's own real tokens
(official: over the whole batch, which the code notes only works at batch size 1); position ids
are kept (official: re-indexed contiguously).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register
from ..context import ProgressiveMethod, Signal, TokenContext
from ..schedule import power_shape
from ._textguided import instruction_mean

OFFICIAL_RATIOS = (0.875, 0.625, 0.125)


@register(
    "transprune",
    family="tokens",
    paper="TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model",
    stages=("llm",),
    signals=("transition@llm layers", "instruction_attention@each cut layer"),
    summary="progressive: token transition variation + instruction attention at layers 7/9/12 of 32",
)
@dataclass
class TransPrune(ProgressiveMethod):
    official_layers: ClassVar[tuple[int, ...]] = (7, 9, 12)
    #: cut layers (0-based decoder layer whose input is cut); None: 7/9/12 of 32 scaled to the depth
    layers: tuple[int, ...] | None = None
    #: add instruction-guided attention to TTV (False: TTV alone)
    iga: bool = True

    def shape(self, n_cuts: int):
        ratios = OFFICIAL_RATIOS[-n_cuts:] if n_cuts <= 3 else OFFICIAL_RATIOS + (0.125,) * (n_cuts - 3)
        return power_shape(ratios)

    def needs(self, stage: str) -> tuple[Signal, ...]:
        sigs = (Signal("transition"),)
        return (*sigs, Signal("instruction_attention"), Signal("instruction_mask")) if self.iga else sigs

    def score(self, ctx: TokenContext) -> torch.Tensor:
        ttv = ctx.signal("transition")
        score = ttv / (ttv.sum(dim=-1, keepdim=True) + 1e-8)
        if self.iga:
            iga = instruction_mean(ctx.signal("instruction_attention"), ctx.signal("instruction_mask"))
            score = score + iga / (iga.sum(dim=-1, keepdim=True) + 1e-8)
        return score
