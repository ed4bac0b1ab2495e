"""Zero-TPrune — "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in
Pre-Trained Transformers" (Wang, Dedhia and Jha, CVPR 2024).

Progressive, at the ``encoder`` stage: at each pruning block the candidates still alive are
pruned in two stages.

- **I-stage** (importance): each head's attention matrix ``A`` (row = query, rows sum to 1) is the
  adjacency matrix of a directed graph; **Weighted PageRank** gives every token the importance
  ``s <- A^T s`` (a token is important when important tokens attend to it), iterated
  ``iterations`` times from the uniform ``s = 1/M``. ``A^T`` keeps ``sum(s) = 1``: ``s`` tends to the
  stationary distribution of the attention's random walk. The graph holds every real token of the
  block, the protected ones ([CLS], DeiT's distillation token) included, since they relay
  attention too; their own scores are not used (they are never pruned). Heads are averaged.
- **S-stage** (similarity): the candidates, ranked by importance, are split sequentially into the
  more important half ``I`` (``ceil(N/2)``) and the less important half ``U``; each token of ``U``
  is scored by its highest cosine similarity to a token of ``I`` (on the block's keys averaged
  over heads, ToMe's metric), and the ``N - k`` tokens of ``U`` most similar to an important one
  are pruned: a redundant copy goes, an unimportant but unique token stays.

Signals, at each cut before block ``K``: ``attention_graph`` ``(G, H, P+N, P+N)``, the per-head map
of block ``K-1`` over the ``P`` protected tokens and the ``N`` candidates, and ``keys``
``(G, N, H, hd)``, block ``K-1``'s keys; both recomputed from its q/k projections on its input (the
survivors of the earlier cuts), so the model stays on SDPA. Pruning before block ``K`` on block
``K-1``'s attention is, for the kept tokens, exactly pruning inside block ``K-1`` between its
attention and its MLP (the MLP is token-wise), on that attention; block ``K-1``'s MLP just still
sees every token.

Budget: ``keep`` is the **mean number of candidates per block** (what FLOPs, the paper's measure,
follow; as for the decoder's progressive methods, :mod:`prunekit.tokens.schedule`). Each cut keeps
the same fraction ``t`` of what is left (EViT's and DynamicViT's keep rate per pruning layer),
``t`` fitted so the mean meets ``keep``: ``t = 0.7`` at blocks 4/7/10 of 12 is a mean of 0.688 n
(``keep ≈ 135`` of DeiT-S's 196 patches). Default blocks: the cut before blocks 4, 7 and 10 of a
12-block model (pruning inside the 4th, 7th and 10th blocks), scaled to the model's depth;
``layers=(...)`` sets them.

What could be checked here: neither the paper's full text nor an official code release was
reachable (papers-with-code lists no code; a third-party re-implementation,
MahdiarKhodabakhshi/Zero-TPrune, was read: its S-stage defaults are keys, cosine, and a sequential
partition with the unimportant group pruned, as here). Unconfirmed, and chosen as follows:
- pruning between a block's attention and its MLP, on that block's attention (where ToMe and
  EViT prune);
- ``iterations = 30``, fixed (the spec's example; it also allows iterating until converged);
- heads are averaged; the paper's refinements of the head combination ("Emphasizing Informative
  Region", "Variance-based Head Filter") are known here by name only, from a third-party
  summary. ``head_variance=(lo, hi)`` is
  prunekit's reading of the latter: heads whose candidate scores, scaled to mean 1, have a variance
  outside ``[lo, hi]`` are left out of the mean (a group with none left uses every head); off by
  default, no thresholds are reproduced;
- the blocks 4/7/10 of 12 with a constant keep rate are EViT's and DynamicViT's DeiT-S
  configuration (keep rate 0.7 lands near the abstract's −34.7% FLOPs), not read from the paper;
- keys averaged over heads (ToMe's metric), not the concatenated key;
- a cut that removes at least half of its candidates cannot be served by the S-stage (only ``U``
  can be pruned): it keeps the ``k`` most important (the S-stage would prune all of ``U``).
Vectorised over groups, heads and tokens; the only loop is over the WPR iterations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register
from ..context import ProgressiveMethod, Selection, Signal, TokenContext, topk_sorted
from ..schedule import geometric_shape


def weighted_page_rank(A: torch.Tensor, iterations: int) -> torch.Tensor:
    """``(..., M, M)`` attention (row = query, rows sum to 1) -> ``(..., M)`` importance.

    ``s <- A^T s`` from ``s = 1/M``, ``iterations`` times, in fp32.
    """
    A = A.float()
    s = A.new_full(A.shape[:-1], 1.0 / A.shape[-1])  # (..., M)
    for _ in range(iterations):
        s = (s.unsqueeze(-2) @ A).squeeze(-2)  # s_i = sum_j s_j A_ji
    return s


def combine_heads(s: torch.Tensor, variance: tuple[float, float] | None = None) -> torch.Tensor:
    """``(G, H, N)`` per-head importance -> ``(G, N)``: the mean over heads, or over the heads whose
    scores scaled to mean 1 have a variance in ``variance = (lo, hi)`` (all heads where none has)."""
    if variance is None:
        return s.mean(dim=1)
    v = (s * s.shape[-1] / s.sum(dim=-1, keepdim=True).clamp_min(1e-12)).var(dim=-1)  # (G, H)
    use = (v >= variance[0]) & (v <= variance[1])
    use = use | ~use.any(dim=1, keepdim=True)
    w = use.to(s.dtype)[..., None]  # (G, H, 1)
    return (s * w).sum(dim=1) / w.sum(dim=1)


def similarity_prune(importance: torch.Tensor, metric: torch.Tensor, k: int) -> torch.Tensor:
    """The S-stage: ``(G, N)`` importance and ``(G, N, C)`` features -> ``(G, k)`` kept, ascending.

    The less important half ``U`` (``N // 2`` tokens) loses the ``N - k`` tokens whose highest
    cosine similarity to the more important half ``I`` is largest. ``N - k >= N // 2`` keeps the
    ``k`` most important. Ties: in importance the lower index ranks first; in similarity the less
    important token is pruned first.
    """
    G, N = importance.shape
    r, n_u = N - k, N // 2
    if r <= 0:
        return torch.arange(N, device=importance.device).expand(G, N)
    if r >= n_u:
        return topk_sorted(importance, k)
    order = torch.sort(importance, dim=-1, descending=True, stable=True).indices  # (G, N)
    important = order[:, : N - n_u]  # (G, N - n_u)
    unimportant = order[:, N - n_u :].flip(-1)  # (G, n_u), least important first
    x = torch.nn.functional.normalize(metric.float(), dim=-1)  # (G, N, C)
    C = x.shape[-1]
    xi = x.gather(1, important[..., None].expand(-1, -1, C))  # (G, N - n_u, C)
    xu = x.gather(1, unimportant[..., None].expand(-1, -1, C))  # (G, n_u, C)
    best = (xu @ xi.transpose(-1, -2)).amax(dim=-1)  # (G, n_u) similarity to the nearest important token
    pruned = unimportant.gather(1, torch.sort(best, dim=-1, descending=True, stable=True).indices[:, :r])
    keep = torch.ones(G, N, dtype=torch.bool, device=importance.device).scatter_(1, pruned, False)
    return keep.nonzero()[:, 1].view(G, k)  # row-major: ascending within each group


@register(
    "zero_tprune",
    family="tokens",
    paper="Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in "
    "Pre-Trained Transformers",
    stages=("encoder",),
    signals=("attention_graph@each cut block", "keys@each cut block"),
    summary="progressive: Weighted PageRank on the attention graph ranks tokens; the unimportant "
    "tokens most similar to important ones are pruned",
)
@dataclass
class ZeroTPrune(ProgressiveMethod):
    official_layers: ClassVar[tuple[int, ...]] = (4, 7, 10)
    reference_depth: ClassVar[int] = 12
    #: blocks cut before (0-based, signals from the block before each); None: 4/7/10 of 12 scaled
    layers: tuple[int, ...] | None = None
    #: Weighted PageRank iterations
    iterations: int = 30
    #: (lo, hi) variance bounds of a head's scores (scaled to mean 1) for it to count; None: all heads
    head_variance: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        it = self.iterations
        if isinstance(it, bool) or not isinstance(it, int) or it < 1:
            raise ValueError(f"zero_tprune: iterations must be an int >= 1; got {it!r}")
        hv = self.head_variance
        if hv is not None and not (len(hv) == 2 and 0 <= float(hv[0]) <= float(hv[1])):
            raise ValueError(f"zero_tprune: head_variance must be (lo, hi) with 0 <= lo <= hi; got {hv!r}")

    def shape(self, n_cuts: int):
        return geometric_shape(n_cuts)

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("attention_graph"), Signal("keys"))

    def score(self, ctx: TokenContext) -> torch.Tensor:
        """The I-stage: ``(G, N)`` Weighted PageRank importance of the candidates."""
        A = ctx.signal("attention_graph")  # (G, H, P+N, P+N)
        s = weighted_page_rank(A, self.iterations)  # (G, H, P+N)
        return combine_heads(s[..., A.shape[-1] - ctx.num_tokens :], self.head_variance)  # (G, N)

    def select(self, ctx: TokenContext, k: int) -> Selection:
        if k >= ctx.num_tokens:
            return super().select(ctx, k)
        keys = ctx.signal("keys").float().mean(dim=2)  # (G, N, hd): mean over heads
        return Selection(similarity_prune(self.score(ctx), keys, k))
