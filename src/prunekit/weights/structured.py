"""Structured pruning, the tensor part: channel scores, unit scores over dependency groups, and how
a budget of prunable parameters is shared among units (pure tensor code; the adapter in
``prunekit.models.structure`` owns the groups' tensors and the surgery).

Units of a decoder layer (see ``models/structure.py``): a **KV group** (one KV head with its
``g`` query heads; the attention unit of every method here, so GQA stays balanced and an MHA
model, ``g = 1``, prunes plain heads) and an **MLP channel**. Their parameter costs are exact:
a KV group ``(2g + 2) * H * d`` (q rows, o columns, k and v rows), an MLP channel ``3H``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..models.structure import LayerGeometry, LayerKeep


def check_sparsity(sparsity) -> float:
    """A structured sparsity: a float in [0, 1), the fraction of prunable parameters removed."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or math.isnan(sparsity):
        raise ValueError(f"sparsity must be a float in [0, 1); got {sparsity!r}")
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(
            f"sparsity must be a float in [0, 1) (the fraction of prunable parameters removed); got {s}"
        )
    return s


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
    influence: float | None = None  # ShortGPT's Block Influence of the layer

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
    """``||W[:, j]||_2^2`` per input channel, fp64."""
    W = W.detach().double()
    return (W * W).sum(0)


def wifv(var: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """FLAP's weighted input feature variance ``S_j = Var(X_j) * ||W[:, j]||^2``."""
    return var.double() * column_norm_sq(W)


def wanda_sp(x_sq: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Wanda-SP (FLAP's baseline): ``S_j = mean_o |W[o, j]| * ||X_j||_2``."""
    return W.detach().double().abs().mean(0) * x_sq.double().sqrt()


def magnitude_sp(W: torch.Tensor) -> torch.Tensor:
    """Mag-SP: ``S_j = ||W[:, j]||_2``."""
    return column_norm_sq(W).sqrt()


def group_scores(channel: torch.Tensor, geo: LayerGeometry, reduce: str = "sum") -> torch.Tensor:
    """``(n_kv,)`` score of each KV group from its ``g * d`` attention channels (the o_proj input
    channels of its query heads, which are contiguous in kv-major order)."""
    per = channel.reshape(geo.n_kv, geo.group * geo.head_dim)
    return per.sum(-1) if reduce == "sum" else per.mean(-1)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` with the unbiased std (``torch.std``), as FLAP's AL-AM."""
    return (x - x.mean()) / x.std()


# ------------------------------------------------------------------ keeps
def keep_from_units(
    geo: LayerGeometry, groups: torch.Tensor | None, channels: torch.Tensor | None
) -> LayerKeep:
    """A :class:`LayerKeep` from kept KV groups and kept channels (sorted; ``None`` = all)."""
    if groups is None:
        return LayerKeep(channels=None if channels is None else channels.sort().values)
    groups = groups.sort().values
    q = (groups[:, None] * geo.group + torch.arange(geo.group)).flatten()
    chans = None if channels is None else channels.sort().values
    return LayerKeep(q_heads=q, kv_heads=groups, channels=chans)


def lowest(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` lowest scores (ties by position)."""
    return scores.argsort(stable=True)[:n]


def uniform_keep(
    geo: LayerGeometry, group_score: torch.Tensor, channel_score: torch.Tensor, sparsity: float
) -> LayerKeep:
    """Uniform per-layer pruning (the baselines'): the layer loses ``round(sparsity * n_kv)``
    KV groups and then as many MLP channels as bring its removed parameters nearest to
    ``sparsity`` of its prunable parameters (ours: FLAP's baselines take ``int(p * n)`` heads and
    channels per module; with few KV groups, as in GQA models, that rounds attention to nothing).
    At least one KV group and one channel stay."""
    H, d, g = geo.hidden, geo.head_dim, geo.group
    n_groups = min(round(sparsity * geo.n_kv), geo.n_kv - 1)
    target = sparsity * geo.params - n_groups * (2 * g + 2) * H * d
    n_ch = min(max(round(target / (3 * H)), 0), geo.inter - 1)
    drop_g = set(lowest(group_score, n_groups).tolist())
    drop_c = set(lowest(channel_score, n_ch).tolist())
    groups = torch.tensor([k for k in range(geo.n_kv) if k not in drop_g], dtype=torch.long)
    chans = torch.tensor([j for j in range(geo.inter) if j not in drop_c], dtype=torch.long)
    return keep_from_units(geo, groups if n_groups else None, chans if n_ch else None)


def global_keep(
    geos: list[LayerGeometry],
    group_score: list[torch.Tensor],
    channel_score: list[torch.Tensor],
    sparsity: float,
) -> list[LayerKeep]:
    """FLAP's adaptive structure (AL-AM) with exact parameter costs: all KV groups and MLP channels
    of every layer in one ranking (scores descending); keep the best prefix whose cumulative cost
    is nearest ``(1 - sparsity)`` of the total. Costs: ``(2g+2) H d`` per KV group, ``3H`` per
    channel (FLAP hard-codes ``512/3`` channels per head: MHA with ``d = 128``). Each layer's best
    KV group and best channel are always kept (FLAP has no such guard); a sparsity that would
    need more raises ``ValueError``. Selection is by rank, not FLAP's ``score > threshold``, so
    ties at the threshold cannot change the count."""
    scores, costs, owner = [], [], []  # owner: (layer, kind 0 = group / 1 = channel, index)
    reserved = 0
    for li, (geo, gs, cs) in enumerate(zip(geos, group_score, channel_score, strict=True)):
        gs, cs = gs.double().clone(), cs.double().clone()
        gs[gs.argmax()] = math.inf
        cs[cs.argmax()] = math.inf
        reserved += (2 * geo.group + 2) * geo.hidden * geo.head_dim + 3 * geo.hidden
        scores += [gs, cs]
        costs += [
            torch.full_like(gs, float((2 * geo.group + 2) * geo.hidden * geo.head_dim)),
            torch.full_like(cs, float(3 * geo.hidden)),
        ]
        owner += [
            torch.stack([torch.full_like(gs, li), torch.zeros_like(gs), torch.arange(len(gs)).double()], 1),
            torch.stack([torch.full_like(cs, li), torch.ones_like(cs), torch.arange(len(cs)).double()], 1),
        ]
    total = sum(g.params for g in geos)
    if sparsity * total > total - reserved:
        raise ValueError(
            f"sparsity {sparsity} would empty a layer: keeping one KV group and one MLP channel per layer, "
            f"at most {(total - reserved) / total:.4f} of the prunable parameters can go"
        )
    s, c, o = torch.cat(scores), torch.cat(costs), torch.cat(owner).long()
    order = s.argsort(descending=True, stable=True)
    kept_cost = c[order].cumsum(0)
    n_keep = int((kept_cost - total * (1.0 - sparsity)).abs().argmin()) + 1
    n_forced = int(torch.isinf(s).sum())
    n_keep = max(n_keep, n_forced)
    kept = o[order[:n_keep]]
    out = []
    for li, geo in enumerate(geos):
        mine = kept[kept[:, 0] == li]
        groups = mine[mine[:, 1] == 0, 2]
        chans = mine[mine[:, 1] == 1, 2]
        out.append(
            keep_from_units(
                geo,
                None if len(groups) == geo.n_kv else groups,
                None if len(chans) == geo.inter else chans,
            )
        )
    return out


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


# ------------------------------------------------------------------ the method interface
GQA_MODES = ("kv_groups",)


@dataclass
class StructuredMethod:
    """A structured weight method: scores units and decides what each decoder layer keeps.

    ``needs``: calibration it uses: ``"activations"`` (sums of x and x^2 of the o_proj and
    down_proj inputs), ``"influence"`` (Block Influence of each layer); empty = no calibration.
    ``sequential``: plan each layer as soon as its statistics are in, then run it pruned to feed
    the next (Wanda-SP); otherwise every layer is scored on the dense model and :meth:`plan`
    decides them together (FLAP, ShortGPT)."""

    gqa: str = "kv_groups"  # attention unit under GQA: a whole KV group (its KV head and query heads)

    name: ClassVar[str] = "?"
    needs: ClassVar[frozenset[str]] = frozenset()
    sequential: ClassVar[bool] = False
    structured: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.gqa not in GQA_MODES:
            raise ValueError(f"gqa must be one of {list(GQA_MODES)}; got {self.gqa!r}")

    def plan_layer(self, i: int, data: LayerData, sparsity: float) -> LayerKeep:
        raise NotImplementedError

    def plan(self, data: list[LayerData], sparsity: float) -> list[LayerKeep]:
        return [self.plan_layer(i, d, sparsity) for i, d in enumerate(data)]
