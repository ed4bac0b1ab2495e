"""Token pruning for state-space models — "Exploring Token Pruning in Vision State Space Models"
(Zhan, Kong et al., NeurIPS 2024; official code ZLKong/ToP-ViM), applied to transformers' Mamba
classes (``MambaModel``, ``MambaForCausalLM``): transformers has no vision Mamba (ViM,
PlainMamba), so this is the paper's technique on the Mamba blocks those models are made of,
cutting the tokens of a Mamba sequence between blocks (:mod:`prunekit.models.ssm`).

- **SSM-specific importance**: a token's importance at a pruning block is the sum over channels
  of the block's scan output at that token (the gated output of the selective scan, the input of
  ``out_proj``), with negative values clipped to 0 first (``clip=True``; the paper's ablation
  finds clipping best). The released code sums the unclipped output (``clip=False``).
- **Pruning-aware hidden-state alignment** (``alignment``): ViT-style pruning gathers the top-k
  tokens and so reorders and compacts the sequence, which disrupts the scan, whose recurrence
  and short convolution depend on neighbouring positions. ``"align"`` (the paper's description,
  default) keeps every position: a pruned token becomes an empty position (zero input to every
  later mixer), so the kept tokens' convolution windows and state decay span the positions they
  spanned in the dense model. The paper obtains the speed with a scan kernel that skips the
  empty positions through a position map; that kernel is CUDA work not reproduced here, so in
  prunekit ``"align"`` measures the quality of the alignment at dense cost. ``"contract"`` keeps
  the kept tokens in their original order and shortens the sequence (the released code's
  gather; the compute saving is real); ``"naive"`` orders them by importance, as a ViT top-k
  gather does (the failure the paper starts from), for the ablation.

Schedule: the released ViM-S configuration prunes after blocks 5, 10 and 15 of 24 keeping 0.8 of
the remaining tokens each time (``ft_log/mamba_small_progressive_start_5_gap_5_ratio_0.8``).
Here the cut layers default to before blocks 5, 10, 15 of 24, scaled to the model's depth; the
budget ``keep`` is the mean number of candidates per block, and each cut keeps the same fraction
of what is left (``keep=0.70`` at 5/10/15 of 24 is the released rate 0.8).

Departures from the released code, and what is unconfirmed:
- the released code scores token ``i`` with the *backward* scan's output at index ``i``, which
  belongs to token ``L-1-i`` (``xai_b`` is computed on the flipped sequence and used unflipped);
  transformers' Mamba is unidirectional and prunekit scores each token with its own output;
- the released code keeps its [CLS] token in the middle of the sequence; here the last token
  (which a causal LM predicts from) is protected and stays last;
- the alignment's exact equations are not in the released code (which gathers, as
  ``"contract"``); ``"align"`` is prunekit's reading of the paper's description, **unconfirmed**.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register
from ..context import ProgressiveMethod, Signal, TokenContext
from ..schedule import geometric_shape

ALIGNMENTS = ("align", "contract", "naive")


@register(
    "top_ssm",
    family="tokens",
    paper="Exploring Token Pruning in Vision State Space Models",
    stages=("encoder",),
    signals=("ssm_output@each cut block",),
    summary="progressive: clipped scan-output importance; pruned tokens kept as empty positions "
    "so the scan's neighbourhoods stay aligned (Mamba models)",
)
@dataclass
class TopSSM(ProgressiveMethod):
    official_layers: ClassVar[tuple[int, ...]] = (5, 10, 15)
    reference_depth: ClassVar[int] = 24
    #: blocks cut before (0-based, importance from the block before each); None: 5/10/15 of 24 scaled
    layers: tuple[int, ...] | None = None
    #: clip negative scan outputs to 0 before summing over channels (the paper); False: released code
    clip: bool = True
    #: how the kept tokens are laid out for the later blocks: "align", "contract" or "naive"
    alignment: str = "align"

    def __post_init__(self) -> None:
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"top_ssm: alignment must be one of {list(ALIGNMENTS)}; got {self.alignment!r}")

    def shape(self, n_cuts: int):
        return geometric_shape(n_cuts)

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("ssm_output"),)

    def importance(self, scan: torch.Tensor) -> torch.Tensor:
        """``(..., N, d_inner)`` scan output -> ``(..., N)``: channels summed (after clipping at 0)."""
        scan = scan.float()
        return (scan.clamp_min(0) if self.clip else scan).sum(dim=-1)

    def score(self, ctx: TokenContext) -> torch.Tensor:
        return self.importance(ctx.signal("ssm_output"))
