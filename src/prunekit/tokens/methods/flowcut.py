"""FlowCut — "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language
Models" (Tong et al., NeurIPS 2025). Official code: github.com/TungChintao/FlowCut (spec §8).

FlowCut prunes **inside the vision tower**, progressively, about every other layer up to the layer
the VLM takes its features from (``L_sel``), with the [CLS] token as the relay of information
flow. At vision layer ``i``, from that layer's own q/k/v on its input (CLS rows only, so the tower
stays on SDPA):

- ``a``: the [CLS] attention row (softmax over all tokens, patch part, mean over heads);
- ``s``: a "semantic" row, ``softmax(v_CLS . V^T)`` per head **without scaling**, patch part, mean
  over heads;
- ``|v|``: the L1 norm of each patch's head-averaged value vector;

``score = (a / sum a + s / sum s) * |v|``, smoothed over layers by ``cum = (cum + score) / 2``
(the first scoring layer starts it). At the layers with an even number ``rpl = L_sel - i - 1`` of
layers left, the tokens after layer ``i`` are cut: ``r = round((n - K) / sqrt(rpl) * (1 - h^2))``
with ``h`` the normalised entropy of ``a / sum a`` (a flat [CLS] row prunes little early, a peaked
one a lot; the largest ``r`` over the batch's images), and at ``rpl = 0`` straight to the budget;
``K`` patches (plus [CLS]) survive, by the top ``cum``, in their original order. Scoring stops
once the sequence is at the budget. Layers from ``L_sel`` on run on ``K + 1`` tokens.

Supported: LLaVA-1.5-style models (``LlavaForConditionalGeneration``, CLIP or DINOv2 towers,
``vision_feature_select_strategy="default"``) and LLaVA-NeXT (anyres), as the official code:

- **in the tower**, each crop (the base image and every high-res tile) keeps ``K // 2`` patches
  (``K`` = the image's budget ``keep``), the same progressive cut per crop; the survivors'
  projected features go back to their grid slots before HF's unpadding and newline packing
  (``pack_image_features``), so a kept patch that unpadding removes is gone, and the newline
  tokens stay;
- **at LLM layer 1** (``stage="llm"``, a session nested inside the vision-stage one, default cut
  before layer 2: layers >= 2 see the pruned sequence): the last prompt token's attention ``rel``
  over the visual tokens, its value similarity ``sem = softmax(v_t . V^T / sqrt(d))`` over them
  (head means), ``score = (rel / sum rel + sem / sum sem) * |mean_heads(V)|_1``, the top ``keep``
  per image::

    with prune_tokens(next_model, "flowcut", keep=64):                 # 32 per crop in the tower
        with prune_tokens(next_model, "flowcut", keep=64, stage="llm"):  # 64 per image at layer 1
            next_model.generate(...)

Qwen2-VL / Qwen2.5-VL (the official Qwen variant, :class:`~prunekit.models.tower.QwenTowerCut`):
the tower keeps ``2K`` merged tokens per image, scored by a pseudo-[CLS] (the mean query of the
image) times the value norms, with the same EMA and entropy-adaptive schedule over the blocks;
each block runs on the survivors (its ``cu_seqlens``, Qwen2.5-VL's windows and the rotary
embeddings cut with them); then the same nested llm stage cuts to ``K``. Departure: a merged
token's 4 patches are kept or dropped together (the official code prunes single patches, so the
2x2 merger then joins patches that are not neighbours; spec §8 quirk). The official Qwen llm-stage
score sums the un-normalised ``rel + sem``; here the normalised form is used on every family.

The llm stage also runs on LLaVA-1.5 and plain decoders (there it scores the prompt).

Departures: the kept visual tokens keep their original position ids in the LLM (prunekit's vision
stage; the official LLaVA path shortens the input, so its positions are contiguous); ``p log p``
is 0 at ``p = 0`` (the official LLaVA code has no epsilon and gives NaN on an exactly one-hot
row); ties go to the lower index. The budget ``keep`` counts patches per image (``K``). LLM
stage: original position ids are kept (official: re-indexed contiguously).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod


def flow_score(a: torch.Tensor, s: torch.Tensor, vnorm: torch.Tensor) -> torch.Tensor:
    """``(G, n)`` [CLS] attention, semantic attention and value L1 norms -> FlowCut's score."""
    a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    s = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return (a + s) * vnorm


def prune_count(a: torch.Tensor, target: int, rpl: int) -> int:
    """Patches to remove after a layer with ``rpl`` layers left, from the [CLS] rows ``a (G, n)``
    (largest over the images); ``rpl = 0`` removes everything above ``target`` patches."""
    n = a.shape[-1]
    if rpl <= 0:
        return n - target
    p = a.double() / a.double().sum(dim=-1, keepdim=True).clamp_min(1e-300)
    ent = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(dim=-1)  # 0 log 0 = 0
    h = ent / math.log(n) if n > 1 else torch.zeros_like(ent)
    r = torch.round((n - target) / math.sqrt(rpl) * (1 - h**2))
    return int(r.max().clamp(0, n - target))


@register(
    "flowcut",
    family="tokens",
    paper="FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models",
    stages=("vision", "llm"),
    signals=(
        "tower_keep (CLS attention, CLS-value similarity, |v|, per vision layer)",
        "llm: last_token_attention, value_attention, value_norm",
    ),
    summary="progressive pruning inside the vision tower: CLS relay + value norms, EMA, entropy-adaptive",
)
@dataclass
class FlowCut(TokenMethod):
    #: the adapter runs this method inside the vision tower (see :mod:`prunekit.models.tower`)
    in_tower = True
    #: llm stage: the cut layer ``K`` (None: 2, scoring from layer 1, as the official anyres code);
    #: the vision stage ignores it
    layer: int | None = None

    def needs(self, stage: str) -> tuple[Signal, ...]:
        if stage == "llm":
            return (Signal("last_token_attention"), Signal("value_attention"), Signal("value_norm"))
        return (Signal("tower_keep"),)

    def select(self, ctx: TokenContext, k: int) -> Selection:
        if ctx.stage == "llm":
            return super().select(ctx, k)
        keep = ctx.signal("tower_keep")  # (G, K) patches the tower kept, ascending
        if keep.shape[-1] != min(k, ctx.num_tokens):
            raise ValueError(f"flowcut: the tower kept {keep.shape[-1]} patches, the budget is {k}")
        return Selection(keep)

    def score(self, ctx: TokenContext) -> torch.Tensor:
        if ctx.stage != "llm":
            raise NotImplementedError("flowcut scores inside the vision tower; it has no stand-alone score")
        return flow_score(
            ctx.signal("last_token_attention").float(),
            ctx.signal("value_attention").float(),
            ctx.signal("value_norm").float(),
        )
