"""SpAtten — "SpAtten: Efficient Sparse Attention Architecture with Cascade Token and Head Pruning"
(Wang et al., HPCA 2021). Software version of its two pruning mechanisms, at the ``llm`` stage
(decoder layers of an LLM or a VLM's language model) and at the ``encoder`` stage (ViT, DeiT,
DINOv2, CLIP vision and BERT blocks, e.g. DINOv2-S and all-MiniLM-L6-v2; SpAtten itself evaluates
BERT and GPT-2). The two stages share the cascade head pruning
(:class:`prunekit.models.heads.HeadCascade`) and the importance's definition.

- **Cascade token pruning**: a token's importance is the attention probability it has received,
  summed over heads, over the (real) queries and over every layer so far; at each cut layer the
  least important candidates are dropped, and a dropped token stays dropped in all later layers
  (keys and values included: the KV cache of those layers never holds it).
- **Cascade head pruning** (``head_keep < 1``): a head's importance is the magnitude of its output
  (L2 norm per token, summed over tokens) accumulated over the layers so far; at the same cut
  layers the least important heads are switched off (their output zeroed before ``o_proj``), by
  head index, for every later layer and for decoding. The number alive falls linearly from all
  heads to ``round(head_keep * H)`` at the last cut. (In software the masked heads are still
  computed: this measures the quality, not the saving, of head pruning.)

At the encoder stage the candidates are the patch tokens (or the non-[CLS], non-padding text
tokens); [CLS] (and DeiT's distillation token) is never pruned but its attention counts. The
importance at the cut before block ``K`` sums the attention of blocks ``0 .. K-1`` (each on the
tokens alive at that block), and the heads are ranked by their output magnitude over the same
blocks, as in the decoder.

Budget: ``keep`` is the mean number of candidates per decoder layer or encoder block (as for
the other progressive methods); the schedule is geometric over the cut layers. Cut layers: every
fourth layer of 32, from 4 to 28, scaled to the model's depth (12 blocks: 2, 3, 4, 6, 8, 9, 10;
6 blocks: 1 to 5). SpAtten is a hardware paper whose per-layer ratios are tuned per task, so this
schedule is **unconfirmed** (the library's choice); ``layers=`` sets others. The importance is
recomputed from q/k for every layer before the last cut (``O(L^2)`` per layer, the model stays on
SDPA).

SpAtten's **progressive quantisation** (attend with the keys' most significant bits first,
refetch the rest when the attention is not confident) changes how attention is computed; it is
a separate switch, :func:`prunekit.kv.progressive_quantization`, for decoders. Not implemented:
SpAtten's decode-time token pruning and its top-k engine (here ``torch.sort``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register
from ..context import ProgressiveMethod, Signal, TokenContext
from ..schedule import geometric_shape


@register(
    "spatten",
    family="tokens",
    paper="SpAtten: Efficient Sparse Attention Architecture with Cascade Token and Head Pruning",
    stages=("llm", "encoder"),
    signals=("cumulative_attention@every layer before the cut", "head output magnitudes"),
    summary="progressive: cumulative attention (cascade token pruning) + cascade head pruning",
)
@dataclass
class SpAtten(ProgressiveMethod):
    official_layers: ClassVar[tuple[int, ...]] = (4, 8, 12, 16, 20, 24, 28)
    #: cut layers (0-based decoder layer whose input is cut); None: every 4th of 32, scaled
    layers: tuple[int, ...] | None = None
    #: fraction of attention heads alive after the last cut (1.0: no head pruning)
    head_keep: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.head_keep <= 1.0:
            raise ValueError(f"spatten: head_keep must be in (0, 1]; got {self.head_keep!r}")

    def shape(self, n_cuts: int):
        return geometric_shape(n_cuts)

    def head_counts(self, n_heads: int, n_cuts: int) -> tuple[int, ...] | None:
        """Heads alive after each cut: linear from ``n_heads`` to ``round(head_keep * n_heads)``."""
        if self.head_keep >= 1.0:
            return None
        last = max(1, round(self.head_keep * n_heads))
        return tuple(round(n_heads + (last - n_heads) * (c + 1) / n_cuts) for c in range(n_cuts))

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("cumulative_attention"),)

    def score(self, ctx: TokenContext) -> torch.Tensor:
        return ctx.signal("cumulative_attention")
