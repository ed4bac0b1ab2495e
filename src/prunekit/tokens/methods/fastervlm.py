"""FasterVLM — "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster" (Zhang et al., 2024).

Visual tokens are ranked by the attention the vision encoder's **[CLS] query** pays them, in the
layer the VLM takes its features from (LLaVA's ``vision_feature_layer = -2``), **mean over heads**;
the top ``keep`` per image survive, in original raster order, after the projector and before the
LLM. Nothing is merged. [official code]

Signal: ``cls_attention@layer``, ``(G, N)``, recomputed from that layer's q/k (SDPA stays on).
``layer=None`` uses the VLM's feature layer; at the ``encoder`` stage of a plain ViT, ``layer`` is
the block before which tokens are cut (signal from block ``layer - 1``), default 4.

Which layer goes with the features (``layer=None``, VLM's ``vision_feature_layer`` p): the official
code takes ``hidden_states[p]`` as features and ``attentions[p]`` as attention. ``hidden_states``
starts with the embeddings, so ``hidden_states[p]`` is the output of layer ``p - 1``, while
``attentions[p]`` is layer ``p``. For a negative p (LLaVA's default -2) both name the same layer
(layer 22 of 24); for a positive p the official code pairs layer ``p - 1``'s features with layer
``p``'s attention, an off-by-one of its indexing, not a stated choice. Default
``pairing="output"``: the attention of the layer that outputs the features, which is what the
paper describes and what the official code does for every negative p (so for LLaVA's -2 the two
are identical); ``p = 0`` (the embeddings, output by no attention layer) is then an error.
``pairing="official"`` reproduces the official indexing (``attentions[p]``; ``p`` equal to the
tower's depth, where ``attentions[p]`` does not exist, is an error). An explicit ``layer`` ignores
``pairing``.

Precision: the [CLS] row is recomputed in float32 by default. The official code takes the
vision tower's ``output_attentions`` in the model's dtype and averages the heads there; in bf16
the kept sets then differ (on official LLaVA runs, 20 of 36 identical), every differing token at a
tie or within a few ulp of the cut. ``prune_tokens(..., score_dtype="model")`` reproduces the
official scores (equal to the tower's bf16 eager attention, head mean in bf16, bit for bit). Ties
go to the lower index (the official CUDA ``topk`` leaves them unspecified).

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
    #: which vision layer's attention goes with the features when ``layer`` is None: "output" (the
    #: layer that outputs them) or "official" (``attentions[vision_feature_layer]``, as the official code)
    pairing: str = "output"

    def __post_init__(self) -> None:
        if self.pairing not in ("output", "official"):
            raise ValueError(f"FasterVLM pairing must be 'output' or 'official'; got {self.pairing!r}")

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("cls_attention", self.layer),)

    def score(self, ctx: TokenContext) -> torch.Tensor:
        return ctx.signal("cls_attention")  # (G, N)
