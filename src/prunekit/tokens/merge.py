"""Token merging by bipartite soft matching (ToMe, Bolya et al., ICLR 2023), as pure tensor code;
and DPC-kNN clustering with cluster means (SparseVLM's recycling, :func:`dpc_knn_merge`).

A plan is decided once per block from a similarity metric and then applied to every tensor that
must stay consistent (the tokens and their sizes), as in the paper's ``(merge, unmerge)`` design.
Written from the paper and the spec; shapes: ``B`` batch, ``T`` tokens, ``C`` channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MergePlan:
    """Which tokens merge where, for ``T`` tokens of which the first ``protected`` never merge.

    The mergeable tokens alternate between a source set A (merged away) and a destination set B;
    ``src`` ``(B, r)`` are A-indices merged into B-indices ``dst`` ``(B, r)``; ``unm`` ``(B, |A|-r)``
    are the A-indices kept, ascending. Output order: protected, kept A (ascending), all of B.
    ``merge`` applies the plan to any ``(B, T, C)`` tensor; ``unmerge`` maps back to ``T`` tokens.
    """

    protected: int
    a_start: int  # parity of A among the mergeable tokens (A = original even indices, as in ToMe)
    src: torch.Tensor
    dst: torch.Tensor
    unm: torch.Tensor

    @property
    def r(self) -> int:
        return self.src.shape[1]

    def __iter__(self):
        """``merge, unmerge = bipartite_soft_matching(...)``, as in the paper's code."""
        return iter((self.merge, self.unmerge))

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.protected
        rest = x[:, p:]
        return x[:, :p], rest[:, self.a_start :: 2], rest[:, 1 - self.a_start :: 2]

    def merge(self, x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        """``(B, T, C) -> (B, T - r, C)``; ``mode`` reduces the tokens landing on one destination."""
        if self.r == 0:  # nothing merges: the identity, order included
            return x
        prot, a, b = self._split(x)
        C = x.shape[-1]
        kept = a.gather(1, self.unm[..., None].expand(-1, -1, C))  # (B, |A| - r, C)
        moved = a.gather(1, self.src[..., None].expand(-1, -1, C))  # (B, r, C)
        b = b.scatter_reduce(1, self.dst[..., None].expand(-1, -1, C), moved, reduce=mode)
        return torch.cat([prot, kept, b], dim=1)

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T - r, C) -> (B, T, C)`` in the original order: every merged-away token gets the
        value of the token it was merged into (ToMe's ``unmerge``, e.g. for dense prediction)."""
        if self.r == 0:
            return x
        p, n_unm = self.protected, self.unm.shape[1]
        prot, kept, b = x[:, :p], x[:, p : p + n_unm], x[:, p + n_unm :]
        B, _, C = x.shape
        moved = b.gather(1, self.dst[..., None].expand(-1, -1, C))  # (B, r, C) their destinations
        a = x.new_zeros(B, n_unm + self.r, C)  # (B, |A|, C)
        a.scatter_(1, self.unm[..., None].expand(-1, -1, C), kept)
        a.scatter_(1, self.src[..., None].expand(-1, -1, C), moved)
        rest = x.new_zeros(B, a.shape[1] + b.shape[1], C)  # (B, T - p, C)
        rest[:, self.a_start :: 2] = a
        rest[:, 1 - self.a_start :: 2] = b
        return torch.cat([prot, rest], dim=1)


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 1) -> MergePlan:
    """Plan ``r`` merges from ``metric`` ``(B, T, C)`` (e.g. keys averaged over heads).

    The mergeable tokens (all but the first ``protected``) are split alternately into A and B by
    their original index (even indices in A, as in the official code where the CLS token sits at
    index 0 of A). Each A token's most similar B token (cosine) is its edge; the ``r`` A tokens
    with the most similar edges merge into their partners. ``r`` is capped at ``|A|`` (at most
    half of the mergeable tokens per block). The kept A tokens are returned in index order
    (the official code sorts them only when a CLS token exists; every family here has one).
    """
    p = protected
    a_start = p % 2  # mergeable index 0 is original index p: it is in A when p is even
    m = metric[:, p:].float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, a_start::2], m[:, 1 - a_start :: 2]
    r = max(0, min(r, a.shape[1], b.shape[1]))
    scores = a @ b.transpose(-1, -2)  # (B, |A|, |B|)
    best, best_dst = scores.max(dim=-1)  # each A token's partner in B
    order = best.argsort(dim=-1, descending=True, stable=True)  # strongest edges first
    src, unm = order[:, :r], order[:, r:].sort(dim=-1).values
    return MergePlan(p, a_start, src, best_dst.gather(1, src), unm)


def merge_wavg(plan: MergePlan, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: ``x (B, T, C)``, ``size (B, T, 1)`` -> merged ``x`` and ``size``.

    ``Σ size·x`` and ``Σ size`` are conserved.
    """
    merged = plan.merge(x * size, mode="sum")
    size = plan.merge(size, mode="sum")
    return merged / size, size


def merge_source(plan: MergePlan, source: torch.Tensor) -> torch.Tensor:
    """Track which original tokens each token covers: ``source (B, T, T0)`` 0/1 -> ``(B, T - r, T0)``."""
    return plan.merge(source, mode="amax")


def dpc_knn_merge(x: torch.Tensor, clusters: int, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering (density peaks with k-nearest-neighbour density, as in TCFormer and
    SparseVLM's ``cluster_and_merge``) and the plain mean of each cluster.

    ``x (S, n, D)`` -> ``(merged (S, c, D), centers (S, c))``: ``centers`` index the cluster
    centres in ``x`` (in descending centre score), ``merged[:, j]`` is the mean of the tokens
    assigned to centre ``j``. Distances are Euclidean over ``sqrt(D)``; the density of a token is
    ``exp(-mean of its k smallest squared distances)`` (``k`` defaults to ``clusters``, as in
    SparseVLM; the token itself is one of them); ``delta`` is the distance to the nearest token of
    higher density (the largest distance in the set for the densest); centres are the ``clusters``
    highest ``delta * density``; every token joins its nearest centre and a centre joins itself.
    Ties go to the lower index (the official code's random jitter is commented out there).
    """
    S, n, D = x.shape
    c = min(clusters, n)
    kk = min(k or c, n)
    xf = x if x.dtype == torch.float64 else x.float()
    dist = torch.cdist(xf, xf) / D**0.5  # (S, n, n)
    near = torch.topk(dist, kk, dim=-1, largest=False).values
    density = (-(near**2).mean(dim=-1)).exp()  # (S, n)
    higher = density[:, None, :] > density[:, :, None]  # [i, j]: j denser than i
    far = dist.flatten(1).max(dim=1).values[:, None, None]
    delta = torch.where(higher, dist, far).min(dim=-1).values
    centers = torch.sort(delta * density, dim=-1, descending=True, stable=True).indices[:, :c]  # (S, c)
    to_center = dist.gather(1, centers[:, :, None].expand(S, c, n))  # (S, c, n)
    assign = to_center.argmin(dim=1)  # (S, n) first minimum: lower centre rank on ties
    assign.scatter_(1, centers, torch.arange(c, device=x.device).expand(S, c))
    onehot = torch.nn.functional.one_hot(assign, c).to(xf.dtype)  # (S, n, c)
    merged = (onehot.transpose(1, 2) @ xf) / onehot.sum(dim=1)[..., None].clamp_min(1)
    return merged.to(x.dtype), centers
