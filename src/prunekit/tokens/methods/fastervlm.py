"""FasterVLM — "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster" (Zhang et al., 2024).

Visual tokens are ranked by the attention the vision encoder's **[CLS] query** pays them, in the
layer the VLM takes its features from (LLaVA's ``vision_feature_layer = -2``), **mean over heads**;
the top ``keep`` per image survive, in original raster order, after the projector and before the
LLM. Nothing is merged. [official code]

Signal: ``cls_attention@layer``, ``(G, N)``, recomputed from that layer's q/k (SDPA stays on).
``layer=None`` uses the VLM's feature layer; at the ``encoder`` stage of a plain ViT, ``layer`` is
the block before which tokens are cut (signal from block ``layer - 1``), default 4.

LLaVA-NeXT: the official code takes top-``K`` *per crop*; here ``keep`` applies to all of an
image's visual tokens together and the image-newline tokens are always kept (as in the official
code). A vision tower without a [CLS] token (Qwen2-VL) cannot give this signal: a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import Signal, TokenContext, TokenMethod


@register(
    "fastervlm",
    family="tokens",
    paper="[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster",
    stages=("vision", "encoder"),
    signals=("cls_attention@vision-layer",),
    summary="keep the visual tokens the [CLS] query attends to most",
)
@dataclass
class FasterVLM(TokenMethod):
    layer: int | None = None

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("cls_attention", self.layer),)

    def score(self, ctx: TokenContext) -> torch.Tensor:
        return ctx.signal("cls_attention")  # (G, N)
