"""ToMe — "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023).

Inside **every** block of a ViT, between the attention and the MLP, ``r`` tokens are merged into
their most similar partners by bipartite soft matching on the block's keys averaged over heads
(cosine), with a size-weighted average; each token's size (how many patches it stands for) is
tracked, and **proportional attention** adds ``log(size)`` to the attention logit of every key
in the following blocks. CLS (and DeiT's distillation token) never merge and stay first.
Shapes: tokens ``(B, T, C)``, sizes ``(B, T, 1)``.

Budget: ``keep`` is the number (or ratio) of mergeable tokens left after the last block. The
official code takes a constant ``r`` per block; here the ``N - keep`` removals are spread evenly
over the blocks (``r_l`` differ by at most 1), capped at half the tokens left per block
(bipartite matching cannot merge more); where the cap would bind late, earlier blocks merge
more, so ``keep`` is met exactly whenever halving ``N`` once per block can reach it. Below that
(e.g. ``keep=1`` over few blocks) more tokens are left than asked; ``stats`` report the real
count. Output token order is **not** spatial (unmerged A tokens ascending, then the B tokens), as
in the official code.

Deviations: mergeable tokens are split into A/B by original index parity exactly as the official
code does, but protected tokens are held outside the matching instead of being given ``-inf``
scores (same result for one CLS token; for DeiT the distillation token stays at index 1, where
the official code moves it behind the unmerged A tokens). Heads that average patch tokens
(``Dinov2ForImageClassification``) average the merged tokens unweighted by size. Text encoders
(BERT, post-norm) are refused: use a cut method there.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...budget import resolve_keep
from ...registry import register
from ..context import Signal, TokenContext, TokenMethod


@register(
    "tome",
    family="tokens",
    paper="Token Merging: Your ViT But Faster",
    stages=("encoder",),
    signals=("keys@every-block",),
    summary="merge similar tokens in every ViT block (bipartite soft matching, size-weighted)",
)
@dataclass
class ToMe(TokenMethod):
    prop_attn: bool = True  # proportional attention: + log(size) on every key's logit

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("keys"),)

    def merge_schedule(self, n_mergeable: int, n_blocks: int, keep: int | float) -> list[int]:
        """Tokens merged away in each block so that ``keep`` mergeable tokens are left at the end.

        Each block takes an even share of the removals still to do (shares differ by at most 1),
        or more where the remaining blocks, each able to merge at most half of what is left,
        could not reach the budget otherwise; never more than half of what is left.
        """
        target = resolve_keep(keep, n_mergeable)
        schedule, left = [], n_mergeable
        for l in range(n_blocks):
            later = n_blocks - l - 1
            share = (left - target) // (later + 1)
            must = left - target * 2**later  # so that halving `later` times can still reach `target`
            r = min(max(share, must, 0), left // 2)
            schedule.append(r)
            left -= r
        return schedule

    def score(self, ctx: TokenContext):  # pragma: no cover - merging, not scoring
        raise NotImplementedError("ToMe merges inside blocks; it has no per-token score")
