"""LVLM_CSP — "LVLM_CSP: Accelerating Large Vision Language Models via Clustering, Scattering, and
Pruning for Reasoning Segmentation" (2025, arXiv 2504.10854).

The paper acts **inside the LLM**, in three groups of decoder layers [abstract]: (1) *clustering*:
the first layers see only a small set of representative image tokens; (2) *scattering*: all image
tokens are active again; (3) *pruning*: most image tokens are dropped, by the attention of the
[SEG] token [3rd-party]. Its stage-1 representatives are studied as random, uniform
(``S[i] = i * floor(N / N_c)``), CLS-attention top-``N_c`` or segmenter-driven [3rd-party review].
**No official code was found; layer boundaries, budgets and how the stages hand over are
unconfirmed (spec §16, §19).**

This is a one-shot **vision-stage stand-in** that keeps the three ideas, the library's choices:

1. **clustering**: ``n_clusters`` representatives are picked by ``seeds`` (``"uniform"``: the
   spec's ``S[i] = i * floor(N / N_c)``; ``"random"``: ``ctx.generator``, else ``seed``; ``"cls"``:
   top-``N_c`` [CLS] attention), then refined by ``iters`` steps of spherical k-means on the
   projected visual tokens (assign each token to the most cosine-similar centroid, ties to the
   lower cluster; a centroid = the normalised sum of its members; an empty cluster keeps its
   centroid);
2. **scattering**: the budget ``k`` is spread over the clusters in proportion to their sizes
   (largest remainder, exact integers; ties to the lower cluster), so every region of the image
   keeps its share and no cluster gets more than its members;
3. **pruning**: inside each cluster, its quota of tokens with the highest text relevance survive
   (the ``max``, ``text_pool`` option: or ``mean``, cosine to the prompt's text-token embeddings,
   padding rows ignored) — a stand-in for the [SEG] token's attention, which exists only once the
   LLM has produced [SEG].

Exactly ``k`` are kept, in original order. Shapes: ``tokens`` ``(G, N, D)``, ``text_embeddings``
``(G, T, D)`` (and ``cls_attention`` ``(G, N)`` for ``seeds="cls"``) -> ``keep`` ``(G, k)``.
Vectorised over groups and tokens; the ``iters`` k-means steps are the only loop.

Departures: everything above is a stand-in, as listed; in particular nothing runs inside the LLM
(compose with an ``llm``-stage cut for a late pruning stage), the segmenter-driven variant is not
offered (no segmenter), and k-means refinement of the representatives is the library's addition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod
from ._textguided import check_text_pool, keep_from_mask, split_in_proportion, text_relevance

SEEDS = ("uniform", "random", "cls")


def uniform_seeds(n: int, n_clusters: int) -> torch.Tensor:
    """The spec's uniform representatives ``S[i] = i * floor(N / N_c)``, ``i < N_c`` -> ``(N_c,)``."""
    return torch.arange(n_clusters) * (n // n_clusters)


def spherical_kmeans(x: torch.Tensor, seeds: torch.Tensor, iters: int) -> torch.Tensor:
    """Cluster ``x`` ``(G, N, D)`` from the seed tokens ``(G, C)`` -> ``(G, N)`` cluster of each token.

    Cosine k-means: assign to the most similar centroid (ties to the lower cluster), then each
    centroid becomes the normalised sum of its members; an empty cluster keeps its centroid.
    """
    f = torch.nn.functional.normalize(x.float(), dim=-1)  # (G, N, D)
    cent = f.gather(1, seeds[..., None].expand(-1, -1, f.shape[-1]))  # (G, C, D)
    C = seeds.shape[1]
    assign = (f @ cent.transpose(-1, -2)).argmax(dim=-1)  # (G, N)
    for _ in range(iters):
        onehot = torch.nn.functional.one_hot(assign, C).float()  # (G, N, C)
        total = onehot.transpose(-1, -2) @ f  # (G, C, D)
        empty = onehot.sum(dim=1)[..., None] == 0  # (G, C, 1)
        cent = torch.where(empty, cent, torch.nn.functional.normalize(total, dim=-1))
        assign = (f @ cent.transpose(-1, -2)).argmax(dim=-1)
    return assign


def quota_keep(cluster: torch.Tensor, quota: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """Keep, in each cluster ``c``, its ``quota[:, c]`` highest-``score`` tokens (ties to the lower
    index): ``cluster`` ``(G, N)``, ``quota`` ``(G, C)``, ``score`` ``(G, N)`` -> ``(G, N)`` bool."""
    G, N = cluster.shape
    by_score = torch.sort(score, dim=-1, descending=True, stable=True).indices  # (G, N)
    by_cluster = torch.sort(cluster.gather(1, by_score), dim=-1, stable=True).indices
    order = by_score.gather(1, by_cluster)  # (G, N): tokens grouped by cluster, best score first
    c_sorted = cluster.gather(1, order)
    pos = torch.arange(N, device=cluster.device).expand(G, N)
    size = torch.nn.functional.one_hot(cluster, quota.shape[1]).sum(dim=1)  # (G, C)
    start = torch.cumsum(size, dim=-1) - size  # (G, C) first slot of each cluster in `order`
    rank = pos - start.gather(1, c_sorted)  # (G, N) rank inside its cluster
    ok = rank < quota.gather(1, c_sorted)
    return torch.zeros(G, N, dtype=torch.bool, device=cluster.device).scatter_(1, order, ok)


@register(
    "lvlm_csp",
    family="tokens",
    paper="LVLM_CSP: Accelerating Large Vision Language Models via Clustering, Scattering, and Pruning "
    "for Reasoning Segmentation",
    stages=("vision",),
    signals=("tokens", "text_embeddings"),
    summary="cluster the visual tokens, spread the budget over clusters, keep the most text-relevant",
)
@dataclass
class LVLMCSP(TokenMethod):
    n_clusters: int = 16  # representatives / clusters (capped at N)
    seeds: str = "uniform"  # "uniform" | "random" | "cls": how the representatives are picked
    iters: int = 10  # k-means refinement steps (0 = clusters of the representatives as picked)
    text_pool: str = "max"  # "max" | "mean" cosine to the text tokens
    seed: int = 0  # seeds="random" without ctx.generator
    layer: int | None = None  # seeds="cls": 0-based vision layer of the [CLS] row; None = feature layer

    def __post_init__(self) -> None:
        for name in ("n_clusters", "iters"):
            v, low = getattr(self, name), 1 if name == "n_clusters" else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"lvlm_csp: {name} must be an int >= {low}; got {v!r}")
        if self.seeds not in SEEDS:
            raise ValueError(f"lvlm_csp: seeds must be one of {list(SEEDS)}; got {self.seeds!r}")
        check_text_pool("lvlm_csp", self.text_pool)

    def needs(self, stage: str) -> tuple[Signal, ...]:
        sigs = (Signal("tokens"), Signal("text_embeddings"))
        return (*sigs, Signal("cls_attention", self.layer)) if self.seeds == "cls" else sigs

    def representatives(self, ctx: TokenContext) -> torch.Tensor:
        """``(G, C)`` the stage-1 representative tokens, ``C = min(n_clusters, N)``."""
        G, N = ctx.num_groups, ctx.num_tokens
        C, dev = min(self.n_clusters, N), ctx.tokens.device
        if self.seeds == "uniform":
            return uniform_seeds(N, C).to(dev).expand(G, C)
        if self.seeds == "random":
            g = ctx.generator or torch.Generator().manual_seed(self.seed)
            noise = torch.rand(G, N, generator=g, device=g.device).to(dev)
        else:
            noise = ctx.signal("cls_attention", self.layer).float()  # (G, N)
        return torch.sort(noise, dim=-1, descending=True, stable=True).indices[:, :C]

    def select(self, ctx: TokenContext, k: int) -> Selection:
        G, N = ctx.num_groups, ctx.num_tokens
        if k >= N:
            return Selection(torch.arange(N, device=ctx.tokens.device).expand(G, -1))
        cluster = spherical_kmeans(ctx.tokens, self.representatives(ctx), self.iters)  # (G, N)
        size = torch.nn.functional.one_hot(cluster, min(self.n_clusters, N)).sum(dim=1)  # (G, C)
        quota = split_in_proportion(size, k)  # (G, C), sums to k, each <= its cluster's size
        relevance = text_relevance(ctx.tokens, ctx.signal("text_embeddings"), self.text_pool)  # (G, N)
        return Selection(keep_from_mask(quota_keep(cluster, quota, relevance), k))
