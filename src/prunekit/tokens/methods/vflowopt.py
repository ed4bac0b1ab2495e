"""VFlowOpt — "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided
Optimization" (ICCV 2025). Vision stage: importance map and recycling of pruned tokens.

Per image, from the full attention map ``A`` of the vision layer the VLM takes its features from
(head mean ``M``, ``N x N`` over the patch tokens) [official code, spec §11]:

1. ``recv = M.mean(queries)``; the **global tokens** are those with ``recv > t * mean(recv)``;
2. importance ``imp = M[global, :].mean(0)``, the attention *from* the global tokens to each token
   ("context relevance"); the paper adds ``alpha_v * softmax(patch entropy)``, but
   ``alpha_v = 0`` in every released configuration, and so here (see below);
3. the lowest-importance tokens are dropped, and **recycled**: grouped by grid cell
   ``(floor(row / m), floor(col / m))``, each non-empty cell becomes one token, the
   importance-weighted mean of its dropped tokens, placed in the slot (and position id) of the
   cell's most important dropped token.

Budget: exactly ``k`` survive: the ``k - C`` most important tokens as they are (``C`` = number of
cells), then one recycled token per non-empty cell; if fewer than ``C`` cells are non-empty, the
free slots go to the most important dropped tokens as they are (they still count in their cell's
mean). Official: it drops ``round(N (1 - r)) + int(N / m^2)`` tokens, so the count varies.
``k <= C`` keeps the top-``k`` without recycling. Defaults from the released 10 % configuration:
``t = 39.26``, ``m = 17.39`` on the 27 x 27 base grid of SigLIP (``m27=17.39``, scaled to the
grid: ``m27 * rows / 27``; ``m`` sets the side in tokens directly).

Families: LLaVA-1.5; LLaVA-NeXT per crop (each crop's map, grid and cells; the image's budget
split over its crops in proportion to their tokens; the official LLaVA-OneVision code ranks all
crops' tokens together: a departure, since the map is per crop); and Qwen2-VL / Qwen2.5-VL (the
map between merged tokens of the last vision block, each image on its own merged grid:
:class:`~prunekit.models.vlm.Qwen2VLAdapter`).

Shapes: ``attention_map`` ``(G, H, N, N)``, ``tokens`` ``(G, N, D)`` -> ``keep`` ``(G, k)``,
``values`` ``(G, k, D)`` (merging: recycled tokens are written into their slots).

Departures and omissions: (1) if no token passes ``t * mean`` (official: ``imp`` becomes NaN) the
single most-attended token is the global one; (2) the **patch-entropy term** is not offered
(``alpha_v`` must be 0, as released): the adapters do not hand methods raw pixel patches, and the
official entropy reads normalised pixels cast to uint8 (spec quirk 1); (3) the **flow-guided
hyper-parameter search** (:func:`flow_search`, the official objective — the cosine of the last
prompt token's final hidden state, dense against pruned, on calibration images) is a seeded
random search over ``t`` and ``m`` at the caller's budget, not the official Gaussian-process
optimisation over ``r, t, m, alpha_v``. Ties go to the lower index.

**LLM stage** (``stage="llm"``, a session nested inside the vision-stage one, as the official
``illava_llm_k = [9, 18]`` of Qwen2-7B's 28 layers, scaled to the depth): at those decoder layers
the surviving visual tokens are ranked by **the same vision-stage importance** (published by the
enclosing session; a recycled token carries the importance of the slot it took) and the top ones
go on. Budget: ``keep`` is the mean number of candidates per decoder layer, the schedule's shape
the released ratios ``(1.0, 0.6011)`` bent by a power (``t = 1/2`` is the released schedule).
The released search solved the last ratio from a target mean; here the mean is the budget::

    with prune_tokens(vlm, "vflowopt", keep=0.25), prune_tokens(vlm, "vflowopt", keep=0.8, stage="llm"):
        vlm.generate(...)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod, topk_sorted
from ..schedule import cut_layers, fit_counts, power_shape
from .hiprune import patch_grid


def importance(attn: torch.Tensor, t: float) -> torch.Tensor:
    """``(G, H, N, N)`` attention -> ``(G, N)``: mean attention from the global tokens to each token."""
    M = attn.float().mean(dim=1)  # (G, N, N) rows = queries
    recv = M.mean(dim=1)  # (G, N) received
    glob = recv > t * recv.mean(dim=-1, keepdim=True)
    top = torch.nn.functional.one_hot(recv.argmax(dim=-1), recv.shape[-1]).bool()
    glob = torch.where(glob.any(dim=-1, keepdim=True), glob, top)  # none passes: the most attended
    return (glob[..., None] * M).sum(dim=1) / glob.sum(dim=-1, keepdim=True)


def cell_ids(rows: int, cols: int, m: float, device: torch.device | None = None) -> tuple[torch.Tensor, int]:
    """Grid cell ``(floor(row / m), floor(col / m))`` of each raster token -> ``(ids (N,), n_cells)``."""
    r = (torch.arange(rows, device=device) / m).floor().long()
    c = (torch.arange(cols, device=device) / m).floor().long()
    n_c = int(c.max()) + 1
    return (r[:, None] * n_c + c[None, :]).flatten(), (int(r.max()) + 1) * n_c


def recycle(
    x: torch.Tensor, imp: torch.Tensor, cell: torch.Tensor, n_cells: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k - C`` most important tokens, recycle the rest into one token per non-empty cell.

    ``x`` ``(G, N, D)``, ``imp`` ``(G, N)``, ``cell`` ``(N,)`` -> ``(keep (G, k) ascending, values
    (G, k, D))``.
    """
    G, N, _ = x.shape
    direct = topk_sorted(imp, k - n_cells)  # (G, k - C)
    low = torch.ones(G, N, dtype=torch.bool, device=x.device)
    low.scatter_(1, direct, False)
    member = torch.nn.functional.one_hot(cell, n_cells).T.bool()[None] & low[:, None, :]  # (G, C, N)
    w = imp.float().clamp_min(0)[:, None, :] * member  # importance weights of each cell's dropped tokens
    empty_w = w.sum(dim=-1, keepdim=True) <= 0
    w = torch.where(empty_w, member.float(), w)  # all-zero importance: a plain mean
    merged = (w @ x.float()) / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # (G, C, D)
    nonempty = member.any(dim=-1)  # (G, C)
    best = imp.float()[:, None, :].masked_fill(~member, float("-inf")).argmax(dim=-1)  # (G, C) slot
    # slots: the direct tokens, each non-empty cell's best slot, then the best remaining low tokens
    score = torch.full((G, N), float("-inf"), device=x.device)
    score.scatter_(1, direct, float("inf"))
    rows = torch.arange(G, device=x.device)[:, None].expand(G, n_cells)
    score[rows[nonempty], best[nonempty]] = float("inf")
    score = torch.where(score == float("-inf"), imp.float(), score)
    keep = topk_sorted(score, k)
    out = x.clone()
    out[rows[nonempty], best[nonempty]] = merged[nonempty].to(x.dtype)
    values = out.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
    return keep, values


@register(
    "vflowopt",
    family="tokens",
    paper="VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization",
    stages=("vision", "llm"),
    signals=("attention_map@vision-layer", "tokens", "vision_importance (llm stage)"),
    summary="importance = attention from global tokens; dropped tokens recycled per grid cell; "
    "LLM stage: drops at layers 9/18 of 28 by the same importance",
)
@dataclass
class VFlowOpt(TokenMethod):
    t: float = 39.26  # global tokens: received attention above t x the mean
    m: float | None = None  # grid cell side in tokens; None: m27 scaled to the grid
    m27: float = 17.39  # grid cell side on a 27-wide grid (released config), scaled: m27 * rows / 27
    alpha_v: float = 0.0  # patch-entropy weight; only 0 (the released value) is supported
    recycle: bool = True  # merge the dropped tokens per grid cell (False: plain top-k)
    layer: int | None = None  # 0-based vision layer of the map; None = the VLM's feature layer
    #: llm stage: decoder layers of the drops; None = 9/18 of 28 scaled to the depth
    llm_layers: tuple[int, ...] | None = None

    group_by: ClassVar[str] = "crop"  # LLaVA-NeXT: one selection per crop (its own map and grid)
    official_llm_layers: ClassVar[tuple[int, ...]] = (9, 18)
    official_llm_ratios: ClassVar[tuple[float, ...]] = (1.0, 0.6011)
    llm_reference_depth: ClassVar[int] = 28

    def __post_init__(self) -> None:
        if self.alpha_v != 0:
            raise ValueError(
                f"vflowopt: alpha_v={self.alpha_v!r}: the patch-entropy term needs raw pixel patches, "
                "which the adapters do not hand to methods; only alpha_v=0 (every released "
                "configuration) is supported"
            )
        if self.t < 0:
            raise ValueError(f"vflowopt: t must be >= 0; got {self.t!r}")
        if self.m is not None and not self.m > 0:
            raise ValueError(f"vflowopt: m must be > 0 (tokens per cell side); got {self.m!r}")
        if not self.m27 > 0:
            raise ValueError(f"vflowopt: m27 must be > 0 (cell side on a 27-wide grid); got {self.m27!r}")

    def needs(self, stage: str) -> tuple[Signal, ...]:
        if stage == "llm":
            return (Signal("vision_importance"),)
        return (Signal("attention_map", self.layer), Signal("tokens"))

    # ---- llm stage: a progressive schedule (ignored at the vision stage)
    def cuts(self, n_layers: int) -> tuple[int, ...]:
        return cut_layers(
            self.llm_layers, self.official_llm_layers, self.llm_reference_depth, n_layers, self.name
        )

    def counts(self, n: int, keep: int, n_layers: int) -> tuple[int, ...]:
        layers = self.cuts(n_layers)
        ratios = list(self.official_llm_ratios[-len(layers) :])
        ratios += [ratios[-1]] * (len(layers) - len(ratios))
        return fit_counts(layers, n_layers, n, keep, power_shape(ratios), self.name)

    def score(self, ctx: TokenContext) -> torch.Tensor:
        if ctx.stage == "llm":
            return ctx.signal("vision_importance")
        return importance(ctx.signal("attention_map", self.layer), self.t)

    def select(self, ctx: TokenContext, k: int) -> Selection:
        G, N = ctx.num_groups, ctx.num_tokens
        if k >= N:
            keep = torch.arange(N, device=ctx.tokens.device).expand(G, -1)
            return Selection(keep, scores=None if ctx.stage == "llm" else self.score(ctx))
        imp = self.score(ctx)
        if ctx.stage == "llm" or not self.recycle:
            keep = topk_sorted(imp, k)
            return Selection(keep, scores=imp.gather(1, keep))
        rows, cols = patch_grid(ctx, "vflowopt")
        m = self.m27 * rows / 27 if self.m is None else self.m
        cell, n_cells = cell_ids(rows, cols, m, ctx.tokens.device)
        if k <= n_cells:
            keep = topk_sorted(imp, k)
            return Selection(keep, scores=imp.gather(1, keep))
        keep, values = recycle(ctx.tokens, imp, cell, n_cells, k)
        return Selection(keep, values, scores=imp.gather(1, keep))


@dataclass
class FlowSearch:
    """The result of :func:`flow_search`: the best options, their objective, and every trial."""

    best: dict
    objective: float
    history: list[dict]


def flow_objective(model, samples: list[dict], method: VFlowOpt, keep: int | float) -> float:
    """VFlowOpt's "visual information flow" objective: the mean over ``samples`` (model inputs) of
    the cosine between the dense and the pruned final-layer hidden state of the last prompt token
    at prefill (the official code sums over 30 training samples)."""
    from ..engine import prune_tokens

    total = 0.0
    with torch.no_grad():
        for inputs in samples:
            _reset_rope_state(model)
            dense = model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1].float()
            _reset_rope_state(model)
            with prune_tokens(model, method, keep):
                pruned = model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1].float()
            total += torch.nn.functional.cosine_similarity(dense, pruned, dim=-1).mean().item()
    return total / len(samples)


def _reset_rope_state(model) -> None:
    core = getattr(model, "model", None)
    if hasattr(core, "rope_deltas"):  # Qwen2-VL caches M-RoPE deltas between calls
        core.rope_deltas = None


def flow_search(
    model,
    samples: list[dict],
    keep: int | float,
    trials: int = 30,
    seed: int = 0,
    t_range: tuple[float, float] = (0.0, 50.0),
    m_range: tuple[float, float] = (3.0, 24.0),
    progress: bool = True,
) -> FlowSearch:
    """VFlowOpt's flow-guided hyper-parameter search, on calibration ``samples`` (model inputs with
    their images): the global-token threshold ``t`` and the recycling cell side ``m`` that keep the
    last prompt token's final hidden state closest (mean cosine, :func:`flow_objective`) to the
    dense model's at budget ``keep``.

    The official code runs Gaussian-process Bayesian optimisation (``skopt``, 27 initial points,
    300 calls) over ``r_vit, r_llm1, t, m, alpha_v`` with a fixed average budget. Here: **seeded
    random search** (no extra dependency), the released configuration as the first trial, over
    ``t`` and ``m`` (ranges as released; ``m`` in tokens of a 27-wide grid, scaled to the model's
    grid as the method does); the budget is the caller's ``keep`` and ``alpha_v`` stays 0 (the
    patch-entropy term is not offered). Use the result as ``VFlowOpt(**search.best)``.
    """
    from tqdm import tqdm

    if not samples:
        raise ValueError("flow_search: no calibration samples; give a list of model inputs with images")
    if trials < 1:
        raise ValueError(f"flow_search: trials must be >= 1; got {trials!r}")
    g = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    for i in tqdm(range(trials), desc="vflowopt flow search", unit="trial", disable=not progress):
        u = torch.rand(2, generator=g).tolist()  # drawn every trial: trial i is the same for any count
        if i == 0:
            opts = {"t": 39.26, "m27": 17.39}  # the released 10 % configuration
        else:
            opts = {
                "t": round(t_range[0] + u[0] * (t_range[1] - t_range[0]), 4),
                "m27": round(m_range[0] + u[1] * (m_range[1] - m_range[0]), 4),
            }
        history.append({**opts, "objective": flow_objective(model, samples, VFlowOpt(**opts), keep)})
    best = max(history, key=lambda h: h["objective"])
    return FlowSearch({"t": best["t"], "m27": best["m27"]}, best["objective"], history)
