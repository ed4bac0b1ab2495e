"""STUN stage 1 as pure tensor functions: co-selection, distances, greedy clustering with
rejection, one global threshold for the expert budget, and each cluster's representative.

STUN (Structured-Then-Unstructured pruning for MoE; official code thnkinbtfly/STUN @ 21b0153,
``assemble_logit_patterns.py`` and ``merge_weight.py``; see ``specs/structured.md`` section 4):

1. :func:`coselection`: ``C[i, j]`` = how many calibration tokens chose experts ``i`` and ``j``
   together. The official code counts the top-2 pair only (Mixtral and Arctic route top-2); we
   count every pair inside the model's top-k (OLMoE: top-8), and ``pairs="top2"`` is the official
   count. With top-2 routing the two agree.
2. :func:`distances`: ``D = -C / |mean(-C)|`` (mean over every entry, diagonal included,
   ``--divide_mean``), diagonal ``+inf``. ``mix_weight=w`` adds the Euclidean distance between the
   router rows: ``D = w * (-C / |mean|) + cdist(R, R)`` (the official ``--mix_weight``).
3. :func:`merges`: greedy agglomerative clustering with rejection (``greedy_but_reject_mixed``):
   take the closest pair ``(v1, v2)`` left with distance ``< tau``; merge their clusters if every
   distance from ``v1`` to a member of ``v2``'s cluster and from ``v2`` to a member of ``v1``'s is
   ``< tau``, else mark the pair tried. The check reads the distances as computed in step 2 (the
   tried marks only steer the pair order): ours, the spec does not say which matrix the official
   check reads. A layer keeps at least ``min_clusters`` clusters (prunekit: the layer's top_k, so
   routing still finds k experts; the official cap is 127 merges).
4. :func:`plan_clusters`: **one global threshold** for every layer, so layers lose different
   numbers of experts. The official search moves ``tau`` in steps (0.1, doubled while the
   direction holds, halved after a reversal) until the total cluster count equals the target,
   and exits with an error when stuck. We bisect (over the distinct distances) for the smallest
   ``tau`` whose total is at most the target, then take the merges of every layer under that
   ``tau`` in order of distance across layers and stop at the exact target: each layer's result
   is a prefix of its own merge sequence under one threshold, and the budget is met exactly
   (ties, e.g. the many pairs never selected together, all at distance 0, would make a pure
   threshold jump past it).
5. :func:`representatives`: each cluster keeps the member whose flattened ``[gate, up, down]``
   weights are nearest (L2) to the cluster's mean, **unchanged**, with its own router row
   (``dsatur_select_mean_weight_merge``, ``dsatur_merge_gates``). The official code averages the
   members instead when a layer ends with two clusters or fewer (``merge_max_clusters=2``); not
   done here: prunekit keeps every expert unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch

PAIRS = ("topk", "top2")


def coselection(top_index: torch.Tensor, num_experts: int, pairs: str = "topk") -> torch.Tensor:
    """``(E, E)`` co-selection counts from the routers' choices ``top_index (tokens, k)`` (sorted by
    weight, as ``torch.topk`` returns them); the diagonal is 0."""
    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {list(PAIRS)}; got {pairs!r}")
    idx = top_index[:, :2] if pairs == "top2" else top_index
    hot = torch.zeros(idx.shape[0], num_experts, dtype=torch.float64)
    hot.scatter_(1, idx.cpu().long(), 1.0)
    C = hot.T @ hot
    C.fill_diagonal_(0.0)
    return C


def normalized(C: torch.Tensor, top_index: torch.Tensor) -> torch.Tensor:
    """Co-selection divided by ``sqrt(f_i f_j)`` (``f``: how often each expert was selected): the
    cosine of the two experts' selection vectors. Raw counts grow with an expert's popularity, so on
    a router without load balancing the most used experts look the most "similar" and are merged
    first; this removes that bias. Ours (not in STUN's code, where Mixtral and Arctic are load
    balanced)."""
    f = torch.bincount(top_index.flatten().cpu(), minlength=C.shape[0]).double().clamp(min=1)
    return C.double() / (f[:, None] * f[None, :]).sqrt()


def distances(
    C: torch.Tensor,
    router: torch.Tensor | None = None,
    mix_weight: float | None = None,
    divide_mean: bool = True,
) -> torch.Tensor:
    """STUN's expert distance (see the module docstring); the diagonal is ``+inf``."""
    D = -C.double()
    if divide_mean:
        mean = D.mean().abs()
        if mean > 0:
            D = D / mean
    if mix_weight is not None:
        if router is None:
            raise ValueError("mix_weight needs the router weight")
        R = router.detach().double().cpu()
        D = mix_weight * D + torch.cdist(R, R)
    D = D.clone()
    D.fill_diagonal_(math.inf)
    return D


def merges(D: torch.Tensor, tau: float, min_clusters: int) -> list[tuple[float, torch.Tensor]]:
    """The merge sequence of one layer under threshold ``tau``: ``(distance, labels after the merge)``
    for each accepted merge, in order (labels: ``(E,)``, a cluster id per expert).

    The pairs are visited in increasing distance, ties in row-major order: the order in which the
    official loop's repeated ``argmin`` (each tried pair then set to ``+inf``) meets them."""
    return _Layer(D).merges(tau, min_clusters)


class _Layer:
    """One layer's distances with its pairs sorted once (the threshold search revisits them)."""

    def __init__(self, D: torch.Tensor) -> None:
        self.D = D.detach().double().cpu().numpy()
        self.E = self.D.shape[0]
        self.iu, self.ju = np.triu_indices(self.E, 1)
        self.d = self.D[self.iu, self.ju]
        self.order = np.argsort(self.d, kind="stable")

    def merges(self, tau: float, min_clusters: int) -> list[tuple[float, torch.Tensor]]:
        D, labels, n, out = self.D, np.arange(self.E), self.E, []
        for p in self.order:
            if n <= min_clusters or not self.d[p] < tau:
                break
            v1, v2 = self.iu[p], self.ju[p]
            c1, c2 = labels[v1], labels[v2]
            if c1 == c2:
                continue
            m1, m2 = labels == c1, labels == c2
            if (D[v1, m2] < tau).all() and (D[v2, m1] < tau).all():
                labels[m2] = c1
                n -= 1
                out.append((float(self.d[p]), torch.from_numpy(labels.copy())))
        return out


def plan_clusters(Ds: list[torch.Tensor], target: int, mins: list[int]) -> list[torch.Tensor]:
    """Cluster labels ``(E_l,)`` per layer with ``target`` clusters in total under one global
    threshold (see the module docstring, step 4). ``mins[l]``: the fewest clusters layer ``l`` may
    keep. The count only changes where ``tau`` passes a distance, so the bisection runs over the
    distinct distances (just above each)."""
    total = sum(D.shape[0] for D in Ds)
    if not sum(mins) <= target <= total:
        raise ValueError(
            f"cannot keep {target} experts in total: between {sum(mins)} (top_k per layer) and {total}"
        )
    layers = [_Layer(D) for D in Ds]
    finite = np.unique(np.concatenate([x.d[np.isfinite(x.d)] for x in layers]))
    if target == total or finite.size == 0:
        return [torch.arange(D.shape[0]) for D in Ds]
    taus = np.nextafter(finite, np.inf)  # tau just above each distance admits it

    def count(tau: float) -> int:
        return sum(x.E - len(x.merges(tau, k)) for x, k in zip(layers, mins, strict=True))

    if count(taus[-1]) > target:
        raise ValueError(f"no threshold merges experts down to {target}: the rejection rule stops at "
                         f"{count(taus[-1])}")  # fmt: skip
    lo, hi = -1, len(taus) - 1  # count(taus[hi]) <= target; lo: below every distance (no merge)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(taus[mid]) <= target:
            hi = mid
        else:
            lo = mid
    seqs = [x.merges(taus[hi], k) for x, k in zip(layers, mins, strict=True)]
    events = sorted((d, layer, step) for layer, seq in enumerate(seqs) for step, (d, _) in enumerate(seq))
    taken = [0] * len(Ds)
    for _, layer, _ in events[: total - target]:
        taken[layer] += 1
    return [
        seq[t - 1][1] if t else torch.arange(D.shape[0]) for D, seq, t in zip(Ds, seqs, taken, strict=True)
    ]


def representatives(labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(E,)`` bool: the member of each cluster nearest (L2) to the mean of its members'
    flattened weights ``weights (E, P)`` (ties: the lowest index)."""
    E = labels.shape[0]
    W = weights.detach().double().cpu()
    _, dense = labels.unique(return_inverse=True)
    n_c = int(dense.max()) + 1
    sums = torch.zeros(n_c, W.shape[1], dtype=torch.float64).index_add_(0, dense, W)
    sizes = torch.bincount(dense, minlength=n_c).double()
    dist = (W - (sums / sizes[:, None])[dense]).norm(dim=1)
    # within each cluster the smallest distance, then the lowest index: sort by (cluster, dist, index)
    order = torch.argsort(dist, stable=True)
    order = order[torch.argsort(dense[order], stable=True)]
    first = torch.ones(E, dtype=torch.bool)
    first[1:] = dense[order][1:] != dense[order][:-1]
    keep = torch.zeros(E, dtype=torch.bool)
    keep[order[first]] = True
    return keep
