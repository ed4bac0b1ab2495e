"""ToMe — "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023).

Inside **every** block of a ViT, between the attention and the MLP, ``r`` tokens are merged into
their most similar partners by bipartite soft matching on the block's keys averaged over heads
(cosine), with a size-weighted average; each token's size (how many patches it stands for) is
tracked, and **proportional attention** adds ``log(size)`` to the attention logit of every key
in the following blocks. CLS (and DeiT's distillation token) never merge and stay first.
Shapes: tokens ``(B, T, C)``, sizes ``(B, T, 1)``.

Budget, two ways (give exactly one):

- ``r=16`` (the paper's and official code's setting): a constant ``r`` per block, capped as the
  official code caps it at half the tokens left, ``r_l = min(r, (T_l - protected) // 2)``, so
  ``prune_tokens(vit, "tome", r=16)`` reproduces the official run (ViT-B/16 with ``r = 16``:
  ``[16] * 11 + [10]``; ViT-L/16 with ``r = 8``: ``[8] * 23 + [6]``, at 224 px the cap binds in the
  last block). A list gives one ``r`` per block (the official list form; missing blocks merge
  nothing). ``keep`` is then not given
  (``keep=None``): the number of tokens left is whatever the capped schedule leaves, and
  ``stats`` report it. Giving both ``r`` and ``keep`` is an error.
- ``keep`` (prunekit's budget, the default way): the number (or ratio) of mergeable tokens left
  after the last block. The ``N - keep`` removals are spread evenly over the blocks (``r_l``
  differ by at most 1), capped at half the tokens left per block (bipartite matching cannot
  merge more); where the cap would bind late, earlier blocks merge more, so ``keep`` is met
  exactly whenever halving ``N`` once per block can reach it. Below that (e.g. ``keep=1`` over
  few blocks) more tokens are left than asked; ``stats`` report the real count. Where the
  official constant ``r`` is capped, no ``keep`` reproduces it (the final count can match, the
  per-block schedule and so the features cannot): use ``r`` for a paper's configuration.

Output token order is **not** spatial (unmerged A tokens ascending, then the B tokens), as in the
official code.

Deviations: mergeable tokens are split into A/B by their index parity in the block's input
exactly as the official code does, but protected tokens are held outside the matching instead of
being given ``-inf`` scores (the same plan and the same output order: the official code also
keeps DeiT's distillation token at index 1, right after CLS). Heads that average patch tokens
(``Dinov2ForImageClassification``) average the merged tokens unweighted by size. Text encoders
(BERT, post-norm) are refused: use a cut method there. The official ``(r, inflection)`` schedule
form is not offered (give its list of per-block ``r`` instead).
"""

from __future__ import annotations

import numbers
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
    #: tokens merged per block (the official budget), or one per block as a list; None: use ``keep``
    r: int | list[int] | None = None

    def __post_init__(self) -> None:
        r = self.r
        ok = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0  # noqa: E731
        if r is None or ok(r):
            return
        if isinstance(r, (list, tuple)) and r and all(ok(v) for v in r):
            self.r = [int(v) for v in r]
            return
        raise ValueError(
            f"ToMe r must be an int >= 0 (tokens merged per block) or a non-empty list of them (one per "
            f"block); got {r!r}"
        )

    @property
    def own_budget(self) -> bool:
        """With ``r`` the method sets its own budget: ``prune_tokens`` takes no ``keep``."""
        return self.r is not None

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("keys"),)

    def merge_schedule(self, n_mergeable: int, n_blocks: int, keep: int | float | None) -> list[int]:
        """Tokens merged away in each block: with ``r``, the official constant (or listed) ``r`` capped
        at half the mergeable tokens left; else so that ``keep`` mergeable tokens are left at the end.

        With ``keep``, each block takes an even share of the removals still to do (shares differ by
        at most 1), or more where the remaining blocks, each able to merge at most half of what is
        left, could not reach the budget otherwise; never more than half of what is left.
        """
        if self.r is not None:
            wanted = [self.r] * n_blocks if isinstance(self.r, int) else (self.r + [0] * n_blocks)[:n_blocks]
            schedule, left = [], n_mergeable
            for r in wanted:  # official: r = min(r, (T - protected) // 2), T the block's tokens
                schedule.append(min(r, left // 2))
                left -= schedule[-1]
            return schedule
        if keep is None:
            raise ValueError("ToMe needs a budget: keep (tokens left) or r (tokens merged per block)")
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
