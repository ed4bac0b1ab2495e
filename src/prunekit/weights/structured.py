"""Structured pruning, the tensor part: channel scores, unit scores over dependency groups, and how
a budget of prunable parameters is shared among units (pure tensor code; the adapter in
``prunekit.models.structure`` owns the groups' tensors and the surgery).

Units of a decoder layer (see ``models/structure.py``): a **KV group** (one KV head with its
``g`` query heads; the attention unit of every method here, so GQA stays balanced and an MHA
model, ``g = 1``, prunes plain heads) and an **MLP channel**. Their parameter costs are exact:
a KV group ``(2g + 2) * H * d`` (q rows, o columns, k and v rows), an MLP channel ``3H`` (``2H``
in an encoder: its fc1 row and fc2 column; ``LayerGeometry.channel_cost``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..models.structure import LayerGeometry, LayerKeep
from .structures import check_sparsity as check_fraction

GQA_MODES = ("kv_groups", "query_slots")


def check_sparsity(sparsity) -> float:
    """A structured sparsity: a float in [0, 1), the fraction of prunable parameters removed."""
    return check_fraction(sparsity, "the fraction of prunable parameters removed")


@dataclass
class LayerData:
    """What a structured method sees of one decoder layer: its widths, the weights whose input
    channels are the units (``o_proj (H, n_q*d)``, ``down_proj (H, I)``), and the calibration
    statistics of those inputs (sums over every calibration token; ``None`` without calibration)."""

    geo: LayerGeometry
    o_weight: torch.Tensor
    down_weight: torch.Tensor
    n_tokens: int = 0
    attn_sum: torch.Tensor | None = None  # (n_q*d,) float64: sum of x
    attn_sq: torch.Tensor | None = None  # (n_q*d,) float64: sum of x^2
    mlp_sum: torch.Tensor | None = None  # (I,)
    mlp_sq: torch.Tensor | None = None  # (I,)
    up_weight: torch.Tensor | None = None  # (I, H)
    gate_weight: torch.Tensor | None = None  # (I, H)
    influence: float | None = None  # ShortGPT's Block Influence of the layer
    taylor: dict | None = None  # LLM-Pruner: Taylor saliences per unit ("heads", "kv", "channels")
    angular: float | None = None  # CFSP: mean over tokens of arccos(cos(h_in, h_out)) / pi

    def mean(self, which: str) -> torch.Tensor:
        return getattr(self, f"{which}_sum") / max(self.n_tokens, 1)

    def variance(self, which: str) -> torch.Tensor:
        """Unbiased sample variance of each input channel over all calibration tokens."""
        s, sq, n = getattr(self, f"{which}_sum"), getattr(self, f"{which}_sq"), self.n_tokens
        if n < 2:
            raise ValueError("the fluctuation metric needs at least 2 calibration tokens")
        return ((sq - s * s / n) / (n - 1)).clamp_min(0.0)


# ------------------------------------------------------------------ channel scores (per input channel)
def column_norm_sq(W: torch.Tensor) -> torch.Tensor:
    """``||W[:, j]||_2^2`` per input channel, fp64, on the CPU (scores are CPU tensors)."""
    W = W.detach().double()
    return (W * W).sum(0).cpu()


def wifv(var: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """FLAP's weighted input feature variance ``S_j = Var(X_j) * ||W[:, j]||^2``."""
    return var.double().cpu() * column_norm_sq(W)


def wanda_sp(x_sq: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Wanda-SP (FLAP's baseline): ``S_j = mean_o |W[o, j]| * ||X_j||_2``."""
    return W.detach().double().abs().mean(0).cpu() * x_sq.double().cpu().sqrt()


def magnitude_sp(W: torch.Tensor) -> torch.Tensor:
    """Mag-SP: ``S_j = ||W[:, j]||_2``."""
    return column_norm_sq(W).sqrt()


def head_scores(channel: torch.Tensor, geo: LayerGeometry, reduce: str = "sum") -> torch.Tensor:
    """``(n_q,)`` score of each query head from its ``d`` o_proj input channels (sum or mean)."""
    per = channel.reshape(geo.n_q, geo.head_dim)
    return per.sum(-1) if reduce == "sum" else per.mean(-1)


def attention_units(head: torch.Tensor, geo: LayerGeometry, mode: str) -> tuple[torch.Tensor, float]:
    """``(unit scores, parameter cost of one unit)`` of a layer's attention under a GQA mode.

    - ``kv_groups``: a unit is a KV group (its KV head and its ``g`` query heads), scored by the
      mean of its heads' scores (= the mean, or ``1/g`` of the sum, over its channels); cost
      ``(2g + 2) H d``.
    - ``query_slots``: a unit is a *slot*: one query head in **every** KV group (KV heads all
      stay), so each group keeps the same number of query heads. Slot ``j`` is scored by the mean
      over groups of each group's ``j``-th lowest head score (slots are removed lowest first, each
      group losing its own weakest remaining head); cost ``2 n_kv H d``. Ours, generalising the
      nyunAI FLAP fork's slot pruning (which scores slot ``r`` as the same position in every group).
    """
    H, d, g = geo.hidden, geo.head_dim, geo.group
    per = head.double().reshape(geo.n_kv, g)
    if mode == "kv_groups":
        return per.mean(-1), float((2 * g + 2) * H * d)
    if mode == "query_slots":
        return per.sort(-1).values.mean(0), float(2 * geo.n_kv * H * d)
    raise ValueError(f"gqa must be one of {list(GQA_MODES)}; got {mode!r}")


def standardize(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` with the unbiased std (``torch.std``), as FLAP's AL-AM."""
    return (x - x.mean()) / x.std()


# ------------------------------------------------------------------ keeps
def layer_keep(
    geo: LayerGeometry,
    head: torch.Tensor,
    mode: str,
    n_units: int,
    channel: torch.Tensor,
    n_channels: int,
) -> LayerKeep:
    """The :class:`LayerKeep` that keeps a layer's ``n_units`` best attention units (under the GQA
    ``mode``, scored from the per-head scores ``head``) and its ``n_channels`` best channels."""
    units, _ = attention_units(head, geo, mode)
    q = kv = None
    if mode == "kv_groups" and n_units < geo.n_kv:
        kv = units.argsort(descending=True, stable=True)[:n_units].sort().values
        q = (kv[:, None] * geo.group + torch.arange(geo.group)).flatten()
    elif mode == "query_slots" and n_units < geo.group:
        per = head.double().reshape(geo.n_kv, geo.group)
        best = per.argsort(dim=-1, descending=True, stable=True)[:, :n_units].sort(-1).values
        q = (best + torch.arange(geo.n_kv)[:, None] * geo.group).flatten()
        kv = torch.arange(geo.n_kv)
    ch = None
    if n_channels < geo.inter:
        ch = channel.double().argsort(descending=True, stable=True)[:n_channels].sort().values
    return LayerKeep(q_heads=q, kv_heads=kv, channels=ch)


def uniform_counts(geo: LayerGeometry, n_units: int, unit_cost: float, sparsity: float) -> tuple[int, int]:
    """Uniform per-layer pruning (the baselines'): ``(attention units kept, channels kept)``. The
    layer loses ``round(sparsity * n_units)`` attention units, then as many MLP channels as bring
    its removed parameters nearest ``sparsity`` of its prunable parameters (ours: FLAP's baselines
    take ``int(p * n)`` heads and channels per module; with few KV groups, as in GQA models, that
    rounds attention to nothing). At least one unit and one channel stay."""
    gone = min(round(sparsity * n_units), n_units - 1)
    target = sparsity * geo.params - gone * unit_cost
    n_ch = min(max(round(target / geo.channel_cost), 0), geo.inter - 1)
    return n_units - gone, geo.inter - n_ch


def uniform_keep(
    geo: LayerGeometry, head: torch.Tensor, channel: torch.Tensor, sparsity: float, mode: str = "kv_groups"
) -> LayerKeep:
    """:func:`uniform_counts` of the best units by ``head`` (per query head) and ``channel`` scores."""
    units, cost = attention_units(head, geo, mode)
    n_units, n_ch = uniform_counts(geo, len(units), cost, sparsity)
    return layer_keep(geo, head, mode, n_units, channel, n_ch)


def global_counts(
    geos: list[LayerGeometry],
    unit_score: list[torch.Tensor],
    unit_cost: list[float],
    channel_score: list[torch.Tensor],
    sparsity: float,
) -> list[tuple[int, int]]:
    """FLAP's adaptive structure (AL-AM) with exact parameter costs: every layer's attention units
    and MLP channels in one ranking (scores descending); keep the best prefix such that the
    weights of the units left out are nearest ``sparsity`` of the prunable weights; returns
    ``(units kept, channels kept)`` per layer. Costs: as :func:`attention_units`, ``3H`` per
    channel, ``2H`` in encoders (FLAP hard-codes ``512/3`` channels per head: MHA, ``d = 128``).
    Each layer's best unit and best channel always stay (FLAP has no such guard); a sparsity that would need
    more raises ``ValueError``. Selection is by rank, not FLAP's ``score > threshold``, so ties
    at the threshold cannot change the count."""
    scores, costs, owner = [], [], []  # owner: (layer, kind 0 = attention unit / 1 = channel)
    reserved = 0.0
    for li, (geo, us, uc, cs) in enumerate(zip(geos, unit_score, unit_cost, channel_score, strict=True)):
        us, cs = us.double().clone(), cs.double().clone()
        us[us.argmax()] = math.inf
        cs[cs.argmax()] = math.inf
        reserved += uc + geo.channel_cost
        scores += [us, cs]
        costs += [torch.full_like(us, uc), torch.full_like(cs, float(geo.channel_cost))]
        owner += [
            torch.tensor([[li, 0]] * len(us), dtype=torch.long).reshape(-1, 2),
            torch.tensor([[li, 1]], dtype=torch.long).expand(len(cs), 2),
        ]
    total = float(sum(g.params for g in geos))
    s, c, o = torch.cat(scores), torch.cat(costs), torch.cat(owner)
    units = float(c.sum())  # = total, less the k/v weights that query slots never remove
    if sparsity * total > units - reserved:
        raise ValueError(
            f"sparsity {sparsity} would empty a layer: keeping one attention unit and one MLP channel per "
            f"layer, at most {(units - reserved) / total:.4f} of the prunable parameters can go"
        )
    order = s.argsort(descending=True, stable=True)
    kept_cost = c[order].cumsum(0)  # the removed weights are `units - kept_cost`: nearest sparsity * total
    n_keep = int((kept_cost - (units - sparsity * total)).abs().argmin()) + 1
    n_keep = max(n_keep, int(torch.isinf(s).sum()))
    kept = o[order[:n_keep]]
    return [
        (
            int(((kept[:, 0] == li) & (kept[:, 1] == 0)).sum()),
            int(((kept[:, 0] == li) & (kept[:, 1] == 1)).sum()),
        )
        for li in range(len(geos))
    ]


def flap_bias(W: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor | None:
    """FLAP's bias compensation ``b = W[:, pruned] @ mean(X)[pruned]`` in fp32 (FLAP stores the
    mean in fp16): the mean contribution of the removed input channels. ``None`` if none went."""
    if kept is None:
        return None
    pruned = torch.ones(W.shape[1], dtype=torch.bool)
    pruned[kept.cpu()] = False
    if not bool(pruned.any()):
        return None
    m = mean.double().cpu() * pruned.double()
    return (W.detach().double().cpu() @ m).float()


def attn_channels(keep: LayerKeep, geo: LayerGeometry) -> torch.Tensor | None:
    """The kept o_proj input channels of a keep (``None`` = all)."""
    if keep.q_heads is None:
        return None
    d = geo.head_dim
    return (keep.q_heads[:, None] * d + torch.arange(d)).flatten()


def layers_to_remove(influence: list[float], params: list[int], sparsity: float) -> list[int]:
    """ShortGPT: the layers of lowest Block Influence, as many as bring the removed prunable
    parameters nearest ``sparsity`` of the total (``round(sparsity * L)`` for equal layers).
    Removing every layer raises ``ValueError``."""
    order = torch.tensor(influence, dtype=torch.float64).argsort(stable=True)
    cum = torch.tensor(params, dtype=torch.float64)[order].cumsum(0)
    total = float(sum(params))
    gaps = torch.cat([torch.tensor([sparsity * total]), (cum - sparsity * total).abs()])
    n = int(gaps.argmin())
    if n >= len(params):
        raise ValueError(
            f"sparsity {sparsity} would remove every one of the {len(params)} decoder layers; "
            f"at most {1 - min(params) / total:.4f} can go"
        )
    return sorted(order[:n].tolist())


def cfsp_budgets(importance: list[float], keep: float, temperature: float) -> list[float]:
    """CFSP's coarse budgets: the fraction of MLP channels each layer keeps, ``k_l = s_l / mean(s) *
    keep`` with ``s_l = sigmoid((I_l - mean(I)) / temperature)`` (more change = more kept). When
    the largest would reach 1, deviations shrink: ``s <- m + (s - m) * gamma`` with ``gamma =
    m (1/keep - 1) / (max(s) - m) / 1.05`` (official lib/prune.py:353-380)."""
    imp = torch.tensor(importance, dtype=torch.float64)
    s = torch.sigmoid((imp - imp.mean()) / temperature)
    m = s.mean()
    if float(s.max() / m * keep) >= 1.0:
        gamma = m * (1.0 / keep - 1.0) / (s.max() - m) / 1.05
        s = m + (s - m) * gamma
    return (s / s.mean() * keep).tolist()


def cfsp_scores(
    a: torch.Tensor, down: torch.Tensor, up: torch.Tensor, gate: torch.Tensor, faithful: bool, c: float
) -> torch.Tensor:
    """CFSP's fine channel scores (``three_w_one_wa``), ``a (I,)`` the activation norm ``||X_j||``
    of the down_proj input. ``faithful``: the official normalisation over ``dim=0``, which the
    mean then averages away, so the score reduces to ``(3/H) a_j^c`` (activation-norm ranking).
    Otherwise (ours, RIA-style, unconfirmed as the paper's intent): each of the three weights'
    ``|W|`` normalised over its output axis **and** its channel axis, summed, times ``a_j^c``, averaged
    over outputs. ``down (H, I)``, ``up``/``gate`` given as ``(H, I)`` (transposed)."""
    a = a.double().cpu()
    if faithful:
        return (3.0 / down.shape[0]) * a.pow(c)
    total = torch.zeros(down.shape[1], dtype=torch.float64)
    for W in (down, up, gate):
        A = W.detach().double().abs().cpu()
        total += (
            A / A.sum(0, keepdim=True).clamp_min(1e-30) + A / A.sum(1, keepdim=True).clamp_min(1e-30)
        ).mean(0)
    return total * a.pow(c)


# ------------------------------------------------------------------ the method interface


@dataclass
class StructuredMethod:
    """A structured weight method: scores units and decides what each decoder layer keeps.

    ``needs``: calibration it uses: ``"activations"`` (sums of x and x^2 of the o_proj and
    down_proj inputs), ``"influence"`` (Block Influence of each layer), ``"angular"`` (mean angular
    distance between each layer's input and output), ``"taylor"`` (LLM-Pruner's gradient saliences
    of the dense model), ``"forward"`` (the calibration ids, for a method with its own pipeline);
    empty = no calibration.
    ``sequential``: plan each layer as soon as its statistics are in, then run it pruned to feed
    the next (Wanda-SP); otherwise every layer is scored on the dense model and :meth:`plan`
    decides them together (FLAP, ShortGPT).

    A method that runs the model itself (Týr: supernet and search) defines
    ``run(model, layers, ids, sparsity, *, batch_size, seed, progress) -> list[LayerKeep]``;
    ``prune_structured`` then calls it (under ``torch.no_grad``, the model unmasked and in eval
    mode; it must leave the weights as it found them) instead of gathering statistics and calling
    :meth:`plan`."""

    #: attention unit under GQA: ``kv_groups`` (a KV head with its query heads) or ``query_slots``
    #: (one query head in every KV group); see :func:`attention_units`
    gqa: str = "kv_groups"

    name: ClassVar[str] = "?"
    needs: ClassVar[frozenset[str]] = frozenset()
    sequential: ClassVar[bool] = False
    structured: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa must be one of {list(GQA_MODES)}; got {self.gqa!r}")

    def check(self, geos: list[LayerGeometry]) -> None:
        """Refuse, before any work, a structure the model lacks."""
        if self.gqa == "query_slots":
            for i, geo in enumerate(geos):
                if geo.group < 2:
                    raise ValueError(
                        f"gqa='query_slots' needs grouped-query attention (2 or more query heads per KV "
                        f"head); layer {i} has {geo.group} (use gqa='kv_groups')"
                    )

    def plan_layer(self, i: int, data: LayerData, sparsity: float) -> LayerKeep:
        raise NotImplementedError

    def plan(self, data: list[LayerData], sparsity: float) -> list[LayerKeep]:
        return [self.plan_layer(i, d, sparsity) for i, d in enumerate(data)]
