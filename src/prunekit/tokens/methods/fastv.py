"""FastV — "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for
Large Vision-Language Models" (Chen et al., ECCV 2024).

At decoder layer ``K`` (``layer``, default 2) the candidate tokens (a VLM's visual tokens; on a
text-only LLM the prompt tokens before the last one) are ranked by the attention the **last
prompt token** pays them in layer ``K-1``, averaged over heads; the top ``keep`` survive from layer
``K`` on, in original order with their **original position ids** (official code). Layers below
``K`` keep the full KV cache; decoding attends to the kept tokens only.

Signal: ``last_token_attention@K-1``, ``(G, N)``. The adapter recomputes that one row from layer
``K-1``'s q/k (RoPE applied, GQA keys repeated), so SDPA stays on — the official code switches
that layer to eager attention instead; the two agree to float precision (tested).

Budget: the HF port uses ``round(N * (1 - R))``; here ``keep`` is the count or ratio kept
(``keep=0.5`` is the paper's R = 50 %). Deviation from the official code, by design: every batch
row is pruned with its own scores (the official code uses batch row 0 for all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import Signal, TokenContext, TokenMethod


@register(
    "fastv",
    family="tokens",
    paper="An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for LVLMs",
    stages=("llm",),
    signals=("last_token_attention@llm-layer K-1",),
    summary="drop candidates with low last-token attention at LLM layer K",
)
@dataclass
class FastV(TokenMethod):
    layer: int = 2  # K: tokens are dropped from the input of decoder layer K onward

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(
                f"FastV layer K must be an int >= 1 (the signal comes from layer K-1); got {self.layer!r}"
            )

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("last_token_attention", self.layer - 1),)

    def score(self, ctx: TokenContext) -> torch.Tensor:
        return ctx.signal("last_token_attention")  # (G, N)
