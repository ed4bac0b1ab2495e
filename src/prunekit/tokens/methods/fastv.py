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

Precision: the row is recomputed in float32 by default. The official code scores in the model's
dtype (eager ``q kᵀ / √d`` in half precision, softmax in fp32 rounded back, head mean in half
precision); in bf16 the kept sets then differ often (on official LLaVA runs, 5 of 36 identical),
every differing token at a tie or within a few ulp of the cut. ``prune_tokens(...,
score_dtype="model")`` scores as the model's eager attention does (equal to its bf16
``output_attentions`` bit for bit; the official code divides by ``√d`` where transformers 5
multiplies by ``d^-0.5``, identical whenever ``√d`` is a power of two, e.g. ``d = 64``). Ties go to
the lower index (the official CUDA ``topk`` leaves them unspecified).

Budget: ``keep`` is the count or ratio kept (``keep=0.5`` is the paper's R = 50 %), a ratio giving
``round(keep * N)`` candidates (Python's banker's rounding, at least 1). The official HF port
computes ``round(N * (1 - R))`` from the filtering ratio ``R`` (``fastv_r``); at an exact ``.5``
boundary the two can differ by one token, because ``1 - R`` is not the decimal ``keep`` in floating
point: ``N = 15``, ``R = 0.7`` gives ``round(15 * 0.30000000000000004) = round(4.500000000000001)
= 5`` officially, while ``keep=0.3`` gives ``round(4.5) = 4``. To reproduce the official count, give
``drop_ratio=R`` instead of ``keep`` (``prune_tokens(model, "fastv", drop_ratio=0.7)``): the count
is then exactly the official ``round(N * (1 - R))`` (at least 1, where the official code could keep
none), with ``N`` the group's candidates (an image's visual tokens). ``keep`` and ``drop_ratio``
are exclusive. (The original, non-HF code takes the count ``ATTENTION_RANK`` directly: ``keep=int``.)

Deviations from the official code, by design: every batch row is pruned with its own scores (the
official code uses batch row 0 for all). On a text-only LLM (not the paper's setting), the model's
special tokens (chat-template markers, BOS) are kept by default and count against the budget
(``prune_tokens(..., protect="auto")``, ours: on SmolLM2 chat prompts at keep 0.5 it halves the KL
to dense, ``benchmarks/results/protect_special.md``); ``protect=None`` ranks every prompt token as
the official code would. A VLM's candidates are its visual tokens, never special tokens.
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
    #: the official filtering ratio R (``fastv_r``): keep round(N * (1 - R)); None: use ``keep``
    drop_ratio: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(
                f"FastV layer K must be an int >= 1 (the signal comes from layer K-1); got {self.layer!r}"
            )
        R = self.drop_ratio
        if R is not None and (
            isinstance(R, bool) or not isinstance(R, (int, float)) or not 0.0 <= R < 1.0 or R != R
        ):
            raise ValueError(f"FastV drop_ratio R must be a float in [0, 1) (R = 0.5: drop half); got {R!r}")

    @property
    def own_budget(self) -> bool:
        """With ``drop_ratio`` the method sets its own budget: ``prune_tokens`` takes no ``keep``."""
        return self.drop_ratio is not None

    def keep_count(self, keep: int | float | None, n: int) -> int:
        """``round(n * (1 - R))`` as the official HF port with ``drop_ratio`` (at least 1), else ``keep``."""
        if self.drop_ratio is None:
            return super().keep_count(keep, n)
        return max(1, min(n, round(n * (1 - self.drop_ratio)))) if n > 0 else 0

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("last_token_attention", self.layer - 1),)

    def score(self, ctx: TokenContext) -> torch.Tensor:
        return ctx.signal("last_token_attention")  # (G, N)
