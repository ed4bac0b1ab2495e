"""Random dropping — the baseline every token-pruning paper compares against.

Keeps ``keep`` candidates chosen uniformly at random (seeded, so runs repeat), in original order.
Works at every stage; at the ``llm`` stage ``layer`` is the cut layer K (default 2), at the
``encoder`` stage the block before which tokens are cut (default 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import Signal, TokenContext, TokenMethod


@register(
    "random",
    family="tokens",
    paper="(baseline) uniform random token dropping",
    stages=("vision", "llm", "encoder"),
    signals=(),
    summary="drop a seeded uniform-random subset",
)
@dataclass
class RandomDrop(TokenMethod):
    layer: int | None = None
    seed: int = 0

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return ()

    def score(self, ctx: TokenContext) -> torch.Tensor:
        g = ctx.generator or torch.Generator().manual_seed(self.seed)
        return torch.rand(ctx.num_groups, ctx.num_tokens, generator=g).to(ctx.tokens.device)
