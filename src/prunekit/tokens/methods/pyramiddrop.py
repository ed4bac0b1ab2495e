"""PyramidDrop — "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction" (Xing et al., CVPR 2025). Baseline.

The LLM is split into stages at decoder layers 8, 16 and 24 (of LLaVA-1.5's 32; scaled to the
model's depth). At the input of each cut layer the candidates still alive are ranked by the
attention the **last instruction token** (the last prompt token) pays them, computed from the
cut layer's own q/k on its normed input (softmax over all keys, causal, mean over heads), and the
top ``n * lambda**i`` survive stage ``i`` — a pyramid.

Budget: ``keep`` is the mean number of candidates per decoder layer, as in the paper's "64 / 128 /
192 tokens" comparisons; ``lambda`` is fitted so the schedule meets it (the official
``lambda = 0.5`` with cuts at 8/16/24 of 32 layers is a mean of 0.47 n, i.e. ``keep ≈ 270`` of 576).

Departures from the official code: position ids are kept (the official code re-indexes the
survivors contiguously); counts are rounded (official: ``int()``); every batch row is ranked
on its own, with left padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register
from ..context import ProgressiveMethod, Signal, TokenContext
from ..schedule import geometric_shape


@register(
    "pyramiddrop",
    family="tokens",
    paper="PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual "
    "Redundancy Reduction",
    stages=("llm",),
    signals=("last_token_attention@each cut layer",),
    summary="progressive: keep n*lambda^i by last-instruction-token attention at layers 8/16/24 of 32",
)
@dataclass
class PyramidDrop(ProgressiveMethod):
    official_layers: ClassVar[tuple[int, ...]] = (8, 16, 24)
    #: cut layers (0-based decoder layer whose input is cut); None: 8/16/24 of 32 scaled to the depth
    layers: tuple[int, ...] | None = None

    def shape(self, n_cuts: int):
        return geometric_shape(n_cuts)

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("last_token_attention"),)

    def score(self, ctx: TokenContext) -> torch.Tensor:
        return ctx.signal("last_token_attention")
