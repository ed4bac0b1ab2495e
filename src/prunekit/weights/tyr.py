"""Týr-the-Pruner, the tensor part: the local pruner (OBS group pruning + least-squares refit), the
supernet's levels, the expected weight, the parameter-conserving mutation, the multi-stage
tournament and the sparse-KL fitness (pure torch; the model pipeline is in
``prunekit.weights.methods.tyr``).

Týr-the-Pruner (NeurIPS'25), official code AMD-AGI/Tyr-the-Pruner @ c69d040
(``src/local_pruner.py``, ``src/pruner.py``, ``search_sparsity_dist.py``, ``src/metric_utils.py``).

Notation as the release: a module's weight ``W (C_out, C_in)`` is pruned on its **input** channels;
the pruner works on ``B = W^T (C_in, C_out)``, with ``H = sum X^T X`` the Gram matrix of the inputs
and ``G = H B`` the least-squares target (``min_B' ||X B' - X B||^2 = 1/2 B'^T H B' - B'^T G + c``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


# ------------------------------------------------------------------ the local pruner
def prepare(
    H: torch.Tensor, W: torch.Tensor, damp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(H_damped, B, G)`` in fp64 from a Gram matrix ``H (C_in, C_in)`` and a weight ``W (C_out,
    C_in)``: rows of ``B = W^T`` whose input never fires (``diag H = 0``) are zeroed, ``H`` gets
    ``damp * mean(diag H)`` on its diagonal, and ``G = H B`` (local_pruner.py ``prune``)."""
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0; got {damp}")
    H = H.detach().double().clone()
    B = W.detach().double().t().clone()
    dead = H.diagonal() == 0
    B[dead] = 0
    mean = H.diagonal().mean()
    H.diagonal().add_(damp * mean if float(mean) > 0 else 1.0)
    return H, B, H @ B


def group_scores(
    W: torch.Tensor, Hinv: torch.Tensor, G: torch.Tensor, group: int, live: torch.Tensor
) -> torch.Tensor:
    """The release's saliency of each group of ``group`` consecutive input channels (``+inf`` for
    groups already pruned):
    ``obj_S = sum_{i in S, c} W[i, c] * ((inv(Hinv[S, S]) W[S, :]) / 2 + G[S, :])[i, c]``,
    half the OBS error of removing ``S`` plus a first-order contribution term. For ``group = 1``
    ``inv(Hinv[S, S]) = 1 / Hinv[j, j]``. Vectorised over groups (a batched inverse of the diagonal
    blocks; the release loops over heads)."""
    n, c_out = W.shape[0] // group, W.shape[1]
    Wg, Gg = W.reshape(n, group, c_out), G.reshape(n, group, c_out)
    if group == 1:
        d = Hinv.diagonal().clone()
        d[~live] = 1.0
        obj = (Wg[:, 0] * (Wg[:, 0] / (2 * d[:, None]) + Gg[:, 0])).sum(-1)
    else:
        blocks = Hinv.reshape(n, group, n, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        eye = torch.eye(group, dtype=W.dtype, device=W.device)
        blocks = torch.where(live[:, None, None], blocks, eye)
        Hb = torch.linalg.inv(blocks)
        obj = (Wg * (Hb @ Wg / 2 + Gg)).sum((1, 2))
    return obj.masked_fill(~live, math.inf)


def refit(H: torch.Tensor, G: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The exact least-squares solution over the kept input channels ``keep (C_in,) bool``:
    ``B[K] = inv(H[K, K]) G[K]``, zeros elsewhere."""
    B = torch.zeros_like(G)
    if bool(keep.any()):
        Hk = H[keep][:, keep]
        L, info = torch.linalg.cholesky_ex(Hk)
        B[keep] = torch.cholesky_solve(G[keep], L) if int(info) == 0 else torch.linalg.solve(Hk, G[keep])
    return B


def obs_remove(W: torch.Tensor, Hinv: torch.Tensor, idx: torch.Tensor) -> None:
    """Remove input channels ``idx`` with the OBS update, in place: ``W -= Hinv[:, P] inv(Hinv[P, P])
    W[P]``, ``Hinv -= Hinv[:, P] inv(Hinv[P, P]) Hinv[P, :]``, then rows ``P`` of ``W`` and rows and
    columns ``P`` of ``Hinv`` zeroed. From the least-squares optimum this gives the optimum without
    ``P``, and ``Hinv`` restricted to the rest is ``inv(H)`` of the rest."""
    Hpp = torch.linalg.inv(Hinv[idx][:, idx])
    cols = Hinv[:, idx]
    W -= cols @ (Hpp @ W[idx])
    Hinv -= cols @ Hpp @ Hinv[idx]
    Hinv[idx] = 0
    Hinv[:, idx] = 0
    W[idx] = 0


def _remove(W, Hinv, G, group: int, live, per: int, rounds: int, buckets: int) -> list[torch.Tensor]:
    """Remove ``per`` live groups from each of the ``buckets`` over ``min(rounds, per)`` rounds (the
    first rounds taking the extra), in place; returns each round's removed groups."""
    n = len(live)
    offs = torch.arange(group, device=W.device)
    picks = []
    k = min(rounds, per)
    for size in [per // k + (1 if i < per % k else 0) for i in range(k)] if per else []:
        s = group_scores(W, Hinv, G, group, live)
        if buckets == 1:
            pick = s.topk(size, largest=False).indices
        else:
            width = n // buckets
            low = s.reshape(buckets, width).topk(size, dim=1, largest=False).indices
            pick = (low + torch.arange(buckets, device=W.device)[:, None] * width).flatten()
        obs_remove(W, Hinv, (pick[:, None] * group + offs).flatten())
        live[pick] = False
        picks.append(pick.sort().values)
    return picks


def _check(B: torch.Tensor, group: int, buckets: int, rounds: int) -> int:
    n = B.shape[0] // group
    if B.shape[0] % group or n % buckets:
        raise ValueError(
            f"{B.shape[0]} input channels do not split into {buckets} buckets of groups of {group}"
        )
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    return n


def local_prune(
    B: torch.Tensor,
    H: torch.Tensor,
    G: torch.Tensor,
    group: int,
    n_remove: int,
    rounds: int,
    buckets: int = 1,
    Hinv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Remove ``n_remove`` of the ``C_in / group`` input groups of ``B`` (``local_prune_core``).

    Over ``min(rounds, n_remove / buckets)`` rounds (the removals split as evenly as possible, the
    first rounds taking the extra), score the live groups (:func:`group_scores`), remove the
    lowest with the OBS update (:func:`obs_remove`), and finally refit the kept rows exactly
    (:func:`refit`). ``buckets > 1`` (ours, for GQA query slots): the groups form ``buckets`` equal
    consecutive buckets (KV groups) and each round removes the same number from every bucket, its
    lowest-scoring live groups. ``n_remove = 0`` returns ``B`` unchanged; ``n_remove`` = every
    group returns zeros (the module is removed).

    Returns ``(B', kept groups (n,) bool, the groups removed in each round)``."""
    n = _check(B, group, buckets, rounds)
    if not 0 <= n_remove <= n or n_remove % buckets:
        raise ValueError(f"n_remove must be a multiple of {buckets} in [0, {n}]; got {n_remove}")
    live = torch.ones(n, dtype=torch.bool, device=B.device)
    if n_remove == 0:
        return B.clone(), live, []
    if n_remove == n:
        return torch.zeros_like(B), ~live, [torch.arange(n, device=B.device)]
    W = B.clone()
    Hinv = torch.linalg.inv(H) if Hinv is None else Hinv.clone()
    picks = _remove(W, Hinv, G, group, live, n_remove // buckets, rounds, buckets)
    return refit(H, G, live.repeat_interleave(group)), live, picks


def local_prune_levels(
    B: torch.Tensor,
    H: torch.Tensor,
    G: torch.Tensor,
    group: int,
    removals: Sequence[int],
    rounds: int,
    buckets: int = 1,
    Hinv: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`local_prune` at several removal counts (ascending) along **one** OBS trajectory (ours,
    for speed): the groups removed at a level are those of the level below plus the next ones;
    each stretch between levels takes up to ``rounds`` rounds, and each level is refit exactly on
    its kept set. The release prunes every level from the dense weight independently
    (``nested=False`` in :class:`~prunekit.weights.methods.tyr.Tyr`). Returns ``(B', kept groups)``
    per level."""
    n = _check(B, group, buckets, rounds)
    r = list(removals)
    if r != sorted(r) or (r and not (r[0] >= 0 and r[-1] <= n)) or any(x % buckets for x in r):
        raise ValueError(f"removals must be ascending multiples of {buckets} in [0, {n}]; got {r}")
    W = B.clone()
    Hinv = torch.linalg.inv(H) if Hinv is None else Hinv.clone()
    live = torch.ones(n, dtype=torch.bool, device=B.device)
    done, out = 0, []
    for x in r:
        if x == n:
            out.append((torch.zeros_like(B), torch.zeros(n, dtype=torch.bool, device=B.device)))
            continue
        _remove(W, Hinv, G, group, live, (x - done) // buckets, rounds, buckets)
        done = x
        out.append((B.clone() if x == 0 else refit(H, G, live.repeat_interleave(group)), live.clone()))
    return out


def reconstruction_loss(B: torch.Tensor, H: torch.Tensor, G: torch.Tensor) -> float:
    """The release's loss ``sum(-B * G + B * (H B) / 2)`` (``||X B - X B0||^2 / 2`` less a constant)."""
    return float((-B * G + 0.5 * B * (H @ B)).sum())


# ------------------------------------------------------------------ supernet levels
def level_range(centre: int, step: int, total: int, n_levels: int) -> tuple[int, int]:
    """``(lo, hi)``: the supernet's levels ``-lo..hi`` around ``centre`` removed units, each level
    ``step`` units apart, at most ``n_levels // 2`` each way, never below 0 or above ``total``
    (pruner.py: ``min_level = min(floor(s_c / D), n // 2)``,
    ``max_level = min(floor((1 - s_c) / D), n // 2)``)."""
    half = n_levels // 2
    return min(centre // step, half), min((total - centre) // step, half)


def spread(total: int, n: int) -> torch.Tensor:
    """``total`` units over ``n`` modules as evenly as possible: module ``i`` gets
    ``floor((i + 1) total / n) - floor(i total / n)`` (ours: the initial centre when the budget is
    not a multiple of ``n``)."""
    i = torch.arange(n + 1, dtype=torch.long)
    edges = (i * total) // n
    return edges[1:] - edges[:-1]


def expected_weight(weights: Sequence[torch.Tensor], sparsities: Sequence[float]) -> torch.Tensor:
    """The expected pruned weight ``sum_l (1 - s_l) W_l / sum_l (1 - s_l)`` (the paper's expectation
    error accumulation, the release's commented-out local_pruner.py:104-108)."""
    w = torch.tensor([1.0 - s for s in sparsities], dtype=torch.float64)
    if float(w.sum()) <= 0:
        return torch.zeros_like(weights[0])
    acc = sum(float(wi) * W.double() for wi, W in zip(w, weights, strict=True))
    return (acc / w.sum()).to(weights[0].dtype)


# ------------------------------------------------------------------ search
def mutate(
    state: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    kind: torch.Tensor,
    gen: torch.Generator,
    max_flips: int = 4,
) -> torch.Tensor:
    """One offspring (search_sparsity_dist.py:253-286): ``min(randint(1, max_flips), randint(1,
    max_flips))`` flips; each moves one level down in a module that has a lower level and one level
    up in another module **of the same kind** that has a higher one. Every level step of a kind is
    the same number of units, so each kind's total is conserved exactly. ``state``, ``lo`` (as a
    non-positive bound), ``hi`` and ``kind`` are ``(n_modules,)`` integer tensors."""
    s = state.clone()
    n = len(s)
    a = int(torch.randint(1, max_flips + 1, (1,), generator=gen))
    b = int(torch.randint(1, max_flips + 1, (1,), generator=gen))
    idx = torch.arange(n)
    for _ in range(min(a, b)):
        down = idx[s > lo]
        if not len(down):
            break
        d = int(down[torch.randint(len(down), (1,), generator=gen)])
        up = idx[(s < hi) & (kind == kind[d]) & (idx != d)]
        if not len(up):
            continue
        u = int(up[torch.randint(len(up), (1,), generator=gen)])
        s[d] -= 1
        s[u] += 1
    return s


def sparse_kl(
    teacher_vals: torch.Tensor, teacher_idx: torch.Tensor, student_logits: torch.Tensor
) -> torch.Tensor:
    """Per-token ``KL(teacher || student)`` over the teacher's top-k logit indices, both
    distributions renormalised over those indices (metric_utils.py ``sparse_kl``). ``teacher_vals``
    and ``teacher_idx``: ``(..., k)``; ``student_logits``: ``(..., V)``."""
    p = torch.log_softmax(teacher_vals.float(), -1)
    q = torch.log_softmax(student_logits.float().gather(-1, teacher_idx.long()), -1)
    return (p.exp() * (p - q)).sum(-1)


def tournament(
    offspring: list[torch.Tensor],
    parent: torch.Tensor,
    survivors: Sequence[int],
    evaluate: Callable[[list[torch.Tensor], int], list[float]],
) -> tuple[torch.Tensor, float]:
    """Multi-stage selection (search_sparsity_dist.py:49-93, 288-303): at stage ``i`` every candidate
    is scored by ``evaluate(candidates, i)`` (lower is better, on that stage's data) and the best
    ``survivors[i]`` go on; the parent is re-added before the last stage (elitist). Returns the
    last stage's best and its score."""
    cands = list(offspring)
    for i, keep in enumerate(survivors):
        if i == len(survivors) - 1 and not any(torch.equal(c, parent) for c in cands):
            cands.append(parent)
        scores = evaluate(cands, i)
        order = sorted(range(len(cands)), key=lambda j: (scores[j], j))
        best = scores[order[0]]
        cands = [cands[j] for j in order[:keep]]
    return cands[0], best
