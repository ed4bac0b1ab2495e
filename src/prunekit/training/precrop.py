"""PreCropping / PreCrop: a narrow dense network whose channel widths follow the layer-wise density a
pruning-at-initialisation (PAI) score gives, built at random initialisation and trained normally.

**A reconstruction** (spec ``training-aware.md`` §8): PreCropping (v1, "PreCropping: Channel-level
Compression at Initialization") and PreCrop / PreConfig (v2, the ICLR submission) have **no official
code**; what follows is read from the abstracts and the spec, and every step marked *ours* is
unconfirmed.

1. **Densities** ``d_l`` per prunable layer (every Conv and Linear weight, shortcut convs and the
   classifier included):

   - ``mode="v1"``: the chosen PAI score at θ₀, one global threshold at ``density``, ``d_l =
     kept_l / N_l`` (:func:`~prunekit.training.init_scores.layer_densities`). ``score="snip"``:
     ``|g⊙w|`` on ``batch``; ``"grasp"``: ``−w⊙Hg`` on ``batch``, the highest removed;
     ``"synflow"``: the iterative, data-free SynFlow mask (``synflow_rounds`` rounds, exponential
     schedule), run on a float64 copy so a deep net does not overflow.
   - ``mode="v2"``: the closed form ``d_l = min(1, λ/N_l)`` with ``Σ d_l N_l = density · Σ N_l``
     (:func:`~prunekit.training.init_scores.precrop_densities`; derived in the spec, *ours*,
     unconfirmed against the paper). No score is computed (``score`` is ignored, ``batch`` only gives
     the input shape).

   A layer the threshold empties (``d_l = 0``, layer collapse) is floored at one weight,
   ``d_l = 1/N_l``, so its logarithm is finite (*ours*).
2. **Widths.** Layer ``l`` reads group ``i(l)`` and writes group ``o(l)``
   (:func:`~prunekit.models.convnets.layer_groups`), so with keep ratios α its kept fraction is
   ``α_i α_o``. Solve ``min Σ_l (log α_i(l) + log α_o(l) − log d_l)²`` subject to ``log α <= log
   alpha_max`` (``alpha_max=1``: never wider; above 1: PreConfig's widening), an exact
   bounded least-squares solve (an active-set NNLS). The image channels and the classes are fixed
   (``α = 1``); layers tied by a residual addition belong to one group and so share one α. The
   spec's objective is unweighted (every layer counts once, whatever its size), as here.
3. ``match_budget=True`` (*ours*, not in the spec): the least-squares widths do not in general keep
   ``density · N`` weights, so one common shift ``t`` is added to every ``log α`` (then clipped at
   ``log alpha_max``), the largest whose rounded widths keep at most ``density · N`` prunable
   weights (found by bisection). The layer-to-layer shape of the solve is unchanged; only the
   overall scale is set by the budget, so PreCrop is compared with its baselines at the same
   parameter count. ``match_budget=False`` gives the solve's widths as they are.
4. **Build**: ``c'_g = max(1, round(α_g · c_g))`` and a freshly initialised network of the same
   family with those widths (:func:`~prunekit.models.convnets.with_widths`, ``seed``): PreCrop
   trains the narrow network from a new random init, not from the dense θ₀.

Works on prunekit's small vision networks (:class:`~prunekit.models.convnets.MLP`,
:class:`~prunekit.models.convnets.ConvNet`, :class:`~prunekit.models.convnets.ResNetLite`).

**One-shot step, no callback.** PreCrop acts once, before training, and its result is a *different
network* (new shapes, new parameters). A ``TrainerCallback`` cannot do that: ``on_train_begin``
runs after the ``Trainer`` has built its optimizer and wrapped the model, too late to swap it.
So the function :func:`precrop` *is* the method's step in any training loop: call it, then train
the network it returns with your own loop or with :func:`precrop_and_train`, which scores, builds
and trains with :func:`prunekit.training.train_batches` (the transformers ``Trainer``) in one call.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..models import convnets as C
from ..registry import register
from . import init_scores as S

SCORES = ("snip", "grasp", "synflow")
MODES = ("v1", "v2")


@dataclass
class PreCropReport:
    """What :func:`precrop` decided. ``densities``: ``d_l`` per layer (``"<module>.weight"``);
    ``alphas``: the keep ratio α per channel group after the solve (and the budget shift);
    ``alphas_solved``: the least-squares α before the shift; ``widths_before`` / ``widths_after``
    per group; ``params`` / ``macs``: the whole network's parameters (all of them, BN and biases
    included) and per-sample multiply-accumulates, before and after; ``prunable_*``: the Conv and
    Linear weights the density is a fraction of; ``prunable_target = density · prunable_before``."""

    mode: str
    score: str | None
    density: float
    densities: dict[str, float] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    alphas_solved: dict[str, float] = field(default_factory=dict)
    shift: float = 0.0
    widths_before: dict[str, int] = field(default_factory=dict)
    widths_after: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    prunable_before: int = 0
    prunable_after: int = 0
    prunable_target: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ the bounded least squares
def nnls(A: torch.Tensor, b: torch.Tensor, max_iter: int | None = None) -> torch.Tensor:
    """``argmin ||A x − b||`` subject to ``x >= 0`` (Lawson and Hanson's active-set algorithm, in
    float64). Exact up to round-off; the passive-set solves use ``torch.linalg.lstsq`` (the
    minimum-norm solution where ``A`` is rank-deficient)."""
    A, b = A.to(torch.float64), b.to(torch.float64)
    n = A.shape[1]
    x = torch.zeros(n, dtype=torch.float64)
    passive = torch.zeros(n, dtype=torch.bool)
    tol = 1e-12 * max(1.0, float(A.abs().max()) if A.numel() else 1.0) * max(A.shape)
    max_iter = 3 * n + 10 if max_iter is None else max_iter

    def solve(mask: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(n, dtype=torch.float64)
        if mask.any():
            z[mask] = torch.linalg.lstsq(A[:, mask], b.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        return z

    for _ in range(max_iter):
        w = A.T @ (b - A @ x)  # the negative gradient
        cand = (~passive) & (w > tol)
        if not cand.any():
            break
        j = int(torch.where(cand, w, torch.full_like(w, -math.inf)).argmax())
        passive[j] = True
        while True:
            z = solve(passive)
            bad = passive & (z <= 0)
            if not bad.any():
                x = z
                break
            ratio = torch.where(bad, x / (x - z), torch.full_like(x, math.inf))
            step = float(ratio.min())
            x = x + step * (z - x)
            passive &= x > tol
            x = torch.where(passive, x, torch.zeros_like(x))
    return x


def solve_alphas(
    layers: Mapping[str, tuple[str | None, str | None]],
    densities: Mapping[str, float],
    alpha_max: float = 1.0,
) -> dict[str, float]:
    """The keep ratio α of every channel group from per-layer densities (PreCrop's width step, spec
    §8, a reconstruction): ``min Σ_l (log α_in(l) + log α_out(l) − log d_l)²`` subject to
    ``α <= alpha_max``. ``layers``: ``{layer: (input group, output group)}``, ``None`` for a fixed
    side (image channels, classes: α = 1); a group named by several layers (a residual stream) gets
    one α. ``densities``: ``{layer: d_l}`` in (0, 1]. Returns ``{group: α}`` (``log α`` rounded to
    10 decimals, so symmetric groups are equal, not different by round-off)."""
    if isinstance(alpha_max, bool) or not isinstance(alpha_max, (int, float)) or not alpha_max > 0:
        raise ValueError(f"alpha_max must be a number > 0 (1: never wider); got {alpha_max!r}")
    names = list(layers)
    missing = [n for n in names if n not in densities]
    if missing:
        raise ValueError(f"no density for layer(s) {missing[:4]}")
    for n in names:
        d = densities[n]
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ValueError(f"density of {n!r} must be in (0, 1]; got {d!r}")
    groups = list(dict.fromkeys(g for pair in layers.values() for g in pair if g is not None))
    if not groups:
        raise ValueError("no channel group to solve for: every layer's input and output are fixed")
    col = {g: i for i, g in enumerate(groups)}
    A = torch.zeros(len(names), len(groups), dtype=torch.float64)
    for r, n in enumerate(names):
        for g in layers[n]:
            if g is not None:
                A[r, col[g]] += 1.0  # a layer reading and writing one group counts it twice
    b = torch.tensor([math.log(densities[n]) for n in names], dtype=torch.float64)
    u = math.log(alpha_max)
    # x = u − y with y >= 0: min ||A(u − y) − b|| = min ||(−A) y − (b − A u)||
    y = nnls(-A, b - A.sum(1) * u)
    x = u - y
    # log α rounded to 1e-10: groups the solve treats alike get the same α and so the same rounding
    return {g: math.exp(round(float(x[col[g]]), 10)) for g in groups}


# ------------------------------------------------------------------ helpers
def _split_batch(batch):
    """``(inputs, labels)`` from ``{"pixel_values", "labels"}`` or ``(inputs, labels)``."""
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch or "labels" not in batch:
            raise ValueError(f"batch must hold 'pixel_values' and 'labels'; got keys {sorted(batch)}")
        return batch["pixel_values"], batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"batch must be {{'pixel_values': x, 'labels': y}} or (x, y); got {type(batch).__name__}"
    )


def _layer_table(model: nn.Module) -> tuple[dict[str, tuple[str | None, str | None]], dict[str, int]]:
    """``{"<module>.weight": (input group, output group)}`` and ``{"<module>.weight": N_l}``."""
    lg = C.layer_groups(model)
    weights = S.prunable_weights(model)
    table = {f"{m}.weight": pair for m, pair in lg.items()}
    if set(table) != set(weights):
        raise ValueError(f"layers without channel groups: {sorted(set(weights) ^ set(table))[:4]}")
    return table, {n: weights[n].numel() for n in table}


def _flops_shape(x: torch.Tensor) -> tuple[int, ...]:
    """One sample's shape for :func:`~prunekit.models.convnets.count_flops` (4-D; an MLP's flat
    input ``(B, F)`` is given as ``(1, 1, 1, F)``, which it flattens back)."""
    shape = tuple(x.shape[1:])
    return (1, *shape) if len(shape) == 3 else (1, 1, 1, math.prod(shape))


def _widths(alphas: Mapping[str, float], before: Mapping[str, int]) -> dict[str, int]:
    return {g: max(1, round(alphas[g] * before[g])) for g in alphas}


def _prunable_after(table, counts, before, widths) -> float:
    """Σ_l N_l · (c'_in / c_in)(c'_out / c_out): the built network's Conv and Linear weights (exact:
    every such weight count is proportional to its input and output widths)."""
    tot = 0.0
    for n, (gi, go) in table.items():
        f = counts[n]
        for g in (gi, go):
            if g is not None:
                f = f * widths[g] / before[g]
        tot += f
    return tot


def _budget_shift(table, counts, before, alphas, alpha_max, target) -> float:
    """The largest common shift ``t`` of every ``log α`` (clipped at ``log alpha_max``) whose
    rounded widths keep at most ``target`` prunable weights (bisection; monotone in ``t``)."""
    u = math.log(alpha_max)

    def total(t: float) -> float:
        a = {g: math.exp(min(math.log(v) + t, u)) for g, v in alphas.items()}
        return _prunable_after(table, counts, before, _widths(a, before))

    lo, hi = -60.0, 60.0
    if total(lo) > target:  # even one channel everywhere is over the budget
        return lo
    for _ in range(200):
        mid = (lo + hi) / 2
        if total(mid) <= target + 1e-9:
            lo = mid
        else:
            hi = mid
    return lo


def _check(density, score, mode, seed, alpha_max, synflow_rounds):
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density (the fraction of prunable weights kept) must be in (0, 1]: {density!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}; got {mode!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}; got {score!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}")
    if isinstance(alpha_max, bool) or not isinstance(alpha_max, (int, float)) or not alpha_max > 0:
        raise ValueError(f"alpha_max must be a number > 0 (1: never wider); got {alpha_max!r}")
    if isinstance(synflow_rounds, bool) or not isinstance(synflow_rounds, int) or synflow_rounds < 1:
        raise ValueError(f"synflow_rounds must be an int >= 1 (paper: 100); got {synflow_rounds!r}")


def layer_densities_at_init(
    model: nn.Module, batch, *, density: float, score: str = "snip", synflow_rounds: int = 100
) -> dict[str, float]:
    """PreCropping v1's densities: ``d_l`` per ``"<module>.weight"`` from one global threshold of
    ``score`` at θ₀ (the model is left as it was)."""
    x, y = _split_batch(batch)
    if score == "synflow":
        dbl = copy.deepcopy(model).double()
        masks = S.synflow_mask(dbl, density, synflow_rounds, input_shape=tuple(x.shape[1:]))
        return {n: m.double().mean().item() for n, m in masks.items()}
    scores = S.snip(model, x, y) if score == "snip" else S.grasp(model, x, y)
    return S.layer_densities(scores, density, keep_high=S.LEAST_IMPORTANT[score] == "lowest")


# ------------------------------------------------------------------ the method
def precrop(
    model: nn.Module,
    batch,
    *,
    density: float = 0.1,
    score: str = "snip",
    mode: str = "v1",
    seed: int = 0,
    alpha_max: float = 1.0,
    match_budget: bool = True,
    synflow_rounds: int = 100,
) -> tuple[nn.Module, PreCropReport]:
    """PreCropping (a reconstruction: no official code; see the module docstring for every step
    and what is *ours*): per-layer densities at ``density`` from ``score`` at θ₀ (``mode="v1"``)
    or from the closed form (``"v2"``), channel keep ratios by a bounded least-squares solve in log
    space (``alpha_max``: 1 never widens; above 1, PreConfig-style widening), scaled to the budget
    (``match_budget``), then a **new, narrower network** of the same family initialised at random
    (``seed``). ``batch``: ``{"pixel_values": x, "labels": y}`` or ``(x, y)``; SNIP and GraSP score
    on it, SynFlow and v2 read only its input shape. ``model`` is left unchanged.

    Returns ``(narrow network, PreCropReport)``. Train the network normally (any loop, or
    :func:`precrop_and_train`): PreCrop has no callback, its one step is this call."""
    _check(density, score, mode, seed, alpha_max, synflow_rounds)
    C.groups(model)  # refuses a network prunekit has no channel groups for
    density = float(density)
    x, _ = _split_batch(batch)
    table, counts = _layer_table(model)
    before = C.group_widths(model)
    if mode == "v1":
        dens = layer_densities_at_init(
            model, batch, density=density, score=score, synflow_rounds=synflow_rounds
        )
    else:
        dens = S.precrop_densities(counts, density)
    floored = {n: max(float(dens[n]), 1.0 / counts[n]) for n in table}
    solved = solve_alphas(table, floored, alpha_max)
    total = sum(counts.values())
    target = density * total
    shift = _budget_shift(table, counts, before, solved, alpha_max, target) if match_budget else 0.0
    u = math.log(alpha_max)
    alphas = {g: math.exp(min(math.log(a) + shift, u)) for g, a in solved.items()}
    widths = _widths(alphas, before)
    narrow = C.with_widths(model, widths, seed=seed)
    shape = _flops_shape(x)
    report = PreCropReport(
        mode=mode, score=score if mode == "v1" else None, density=density, densities=dict(dens),
        alphas=alphas, alphas_solved=solved, shift=shift, widths_before=dict(before),
        widths_after=C.group_widths(narrow), params_before=C.count_params(model),
        params_after=C.count_params(narrow), macs_before=C.count_flops(model, shape),
        macs_after=C.count_flops(narrow, shape), prunable_before=total,
        prunable_after=sum(w.numel() for w in S.prunable_weights(narrow).values()), prunable_target=target,
    )  # fmt: skip
    return narrow, report


def train_network(
    model: nn.Module, batches: Sequence[dict], *, steps: int, lr: float = 1e-3, seed: int = 0, **kw
):
    """Train a network built by :func:`precrop` or :func:`~prunekit.training.layer_lottery` on
    ``batches`` (``{"pixel_values", "labels"}`` dicts, e.g.
    :func:`~prunekit.models.convnets.fashion_batches`) for ``steps`` optimiser steps with
    :func:`prunekit.training.train_batches` (the transformers ``Trainer``; ``kw`` go there).
    Returns the ``TrainResult``."""
    from .loop import train_batches

    return train_batches(model, batches, steps=steps, lr=lr, seed=seed, **kw)


def precrop_and_train(
    model: nn.Module, batches: Sequence[dict], *, steps: int, lr: float = 1e-3, train_seed: int = 0,
    progress: bool = False, **precrop_options,
):  # fmt: skip
    """:func:`precrop` on ``batches[0]`` then :func:`train_network` on ``batches``: returns
    ``(narrow network, PreCropReport, TrainResult)``."""
    if not batches:
        raise ValueError("precrop_and_train needs at least one batch; got none")
    narrow, report = precrop(model, batches[0], **precrop_options)
    res = train_network(narrow, batches, steps=steps, lr=lr, seed=train_seed, progress=progress)
    return narrow, report, res


@register(
    "precrop",
    family="training",
    paper="PreCropping: Channel-level Compression at Initialization (PreCrop / PreConfig)",
    stages=("before-training",),
    signals=("snip|grasp|synflow@init", "layer_density"),
    trains=True,
    summary="per-layer densities from a score at init become channel widths; a narrow dense net is trained",
)
@dataclass
class PreCrop:
    """PreCropping's options as a registry method: ``PreCrop(density=0.1)(model, batch)`` is
    :func:`precrop` (a reconstruction: no official code)."""

    docs_from: ClassVar[str] = "prunekit.training.precrop"
    usage: ClassVar[str] = (
        "net, report = prunekit.training.precrop(model, batch, density=0.1{opts})  # before training\n"
        "prunekit.training.train_network(net, batches, steps=500)  # or any training loop"
    )
    taxonomy: ClassVar[dict] = {
        "which": "weights: channels (a narrower dense CNN/MLP, built before training)",
        "speedup": "universal (a smaller dense network: fewer parameters and MACs)",
        "how": "gradient scores at initialisation (SNIP / GraSP / SynFlow layer densities) or a closed form",
    }
    density: float = 0.1
    score: str = "snip"
    mode: str = "v1"
    seed: int = 0
    alpha_max: float = 1.0
    match_budget: bool = True
    synflow_rounds: int = 100

    def __call__(self, model: nn.Module, batch, **kw) -> tuple[nn.Module, PreCropReport]:
        return precrop(model, batch, **asdict(self), **kw)


__all__ = [
    "PreCrop",
    "PreCropReport",
    "layer_densities_at_init",
    "nnls",
    "precrop",
    "precrop_and_train",
    "solve_alphas",
    "train_network",
]
