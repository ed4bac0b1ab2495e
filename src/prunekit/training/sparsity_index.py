"""PQ Index (PQI) and Sparsity-informed Adaptive Pruning (SAP): Diao et al., "Pruning Deep Neural
Networks from a Sparsity Perspective", ICLR 2023 (arXiv 2302.05601).

Pure tensor functions, read from the official code (diaoenmao/Pruning-Deep-Neural-Networks-from-a-
Sparsity-Perspective, ``src/modules/sparsity_index.py`` and ``src/modules/compression.py``; spec
``training-aware.md`` §6):

- :func:`pq_index` ``I_{p,q}(w) = 1 − (mean|w|^p)^{1/p} / (mean|w|^q)^{1/q}`` over the unmasked
  entries, in the ``global`` / ``layer`` / ``neuron`` scopes of the official code;
- :func:`sap_keep_count` the retained-count bound ``m`` and :func:`sap_prune_step` one SAP step
  (how many weights to remove now, then the magnitude pivot, ties surviving);
- :func:`parse_prune_mode` the official ``prune_mode`` strings (``si-p-q-η-γ``, ``lt-r``, ``os-r``);
- :func:`pqi_table` a per-layer PQI diagnostic for any model.

Weights and masks come as one tensor, a sequence of tensors or a name → tensor mapping; masks are
boolean (True = kept) and the same structure. Nothing here changes a weight: a caller zeroes the
pruned entries itself (``w * mask``), as the official ``compress`` does after computing the masks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

SCOPES = ("global", "layer", "neuron")

Weights = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


def _check_pq(p: float, q: float, strict: bool) -> tuple[float, float]:
    for name, v in (("p", p), ("q", q)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0; got {v!r}")
    if (strict and not p < q) or (not strict and not p <= q):
        allowed = "0 < p < q" if strict else "0 < p <= q"
        raise ValueError(f"the PQ index needs {allowed}; got p={p!r}, q={q!r}")
    return float(p), float(q)


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}")
    return scope


def _as_items(w: Weights, mask, what: str = "w") -> tuple[str, list, list[torch.Tensor], list[torch.Tensor]]:
    """(kind, keys, tensors, masks) with kind 'tensor' | 'list' | 'dict'; masks default to all True."""
    if isinstance(w, torch.Tensor):
        kind, keys, ws = "tensor", [None], [w]
    elif isinstance(w, Mapping):
        kind, keys, ws = "dict", list(w), list(w.values())
    elif isinstance(w, Sequence) and not isinstance(w, (str, bytes)):
        kind, keys, ws = "list", list(range(len(w))), list(w)
    else:
        raise ValueError(f"{what} must be a tensor, a sequence of tensors or a name -> tensor mapping")
    if not ws:
        raise ValueError(f"{what} holds no tensor")
    for k, t in zip(keys, ws, strict=True):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{what}[{k!r}] must be a floating-point tensor; got {type(t).__name__}")
    if mask is None:
        ms = [torch.ones_like(t, dtype=torch.bool) for t in ws]
    else:
        if isinstance(mask, torch.Tensor):
            ms = [mask]
        elif isinstance(mask, Mapping):
            if kind != "dict" or set(mask) != set(keys):
                raise ValueError(f"mask keys {sorted(mask)} do not match the weights' keys {sorted(keys)}")
            ms = [mask[k] for k in keys]
        else:
            ms = list(mask)
        if len(ms) != len(ws):
            raise ValueError(f"{len(ms)} masks for {len(ws)} weight tensors")
        for k, t, m in zip(keys, ws, ms, strict=True):
            if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(t.shape):
                shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"mask[{k!r}] has shape {shape}; its weight has shape {tuple(t.shape)}")
        ms = [m.to(device=t.device, dtype=torch.bool) for t, m in zip(ws, ms, strict=True)]
    return kind, keys, ws, ms


def _pack(kind: str, keys: list, values: list):
    if kind == "tensor":
        return values[0]
    if kind == "dict":
        return dict(zip(keys, values, strict=True))
    return list(values)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The official ``neuron`` view: output units as rows, everything else flattened, (out, -1)."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def _power_sums(x: torch.Tensor, m: torch.Tensor, p: float, q: float, dim=None):
    """Σ|x|^p, Σ|x|^q and d = Σ mask over the unmasked entries (masked entries count as 0), float64."""
    a = (x * m).abs()
    if dim is None:
        f64 = torch.float64
        return a.pow(p).sum(dtype=f64), a.pow(q).sum(dtype=f64), m.sum(dtype=f64)
    return (
        a.pow(p).sum(dim, dtype=torch.float64),
        a.pow(q).sum(dim, dtype=torch.float64),
        m.sum(dim, dtype=torch.float64),
    )


def _index(sp: torch.Tensor, sq: torch.Tensor, d: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """``1 − (S_p/d)^{1/p} / (S_q/d)^{1/q}`` with the official clean-ups."""
    si = 1 - (sp / d).pow(1 / p) / (sq / d).pow(1 / q)
    si = torch.where(d == 0, torch.zeros_like(si), si)
    si = torch.where(si == -math.inf, torch.zeros_like(si), si)
    si = torch.where((si > -1e-5) & (si < 0), torch.zeros_like(si), si)
    # ours: an all-zero unmasked set gives 0/0 = NaN in the official code; it is a constant vector
    return torch.nan_to_num(si, nan=0.0)


def _sums(w: Weights, mask, p: float, q: float, scope: str):
    """Per-scope (S_p, S_q, d) as float64 tensors: one triple for ``global``; one per tensor
    (0-d for ``layer``, (rows,) for ``neuron``)."""
    kind, keys, ws, ms = _as_items(w, mask)
    if scope == "global":
        parts = [_power_sums(t, m, p, q) for t, m in zip(ws, ms, strict=True)]
        total = [torch.stack(s).sum() for s in zip(*parts, strict=True)]
        return kind, keys, [tuple(total)]
    if scope == "layer":
        return kind, keys, [_power_sums(t, m, p, q) for t, m in zip(ws, ms, strict=True)]
    return kind, keys, [_power_sums(_rows(t), _rows(m), p, q, dim=1) for t, m in zip(ws, ms, strict=True)]


def pq_index(w: Weights, p: float = 0.5, q: float = 1.0, mask=None, scope: str = "global"):
    """PQ Index ``I_{p,q}(w) = 1 − d^{1/q − 1/p}·‖w‖_p/‖w‖_q`` (Diao et al., ICLR 2023), as the
    official ``make_si``: over the ``d`` unmasked entries only (masked entries are zeroed, ``d`` is
    the mask count), ``d = 0`` gives 0, ``-inf`` is replaced by 0 and values in (−1e-5, 0) are
    clipped to 0. ``I = 0`` for a constant ``|w|``, ``1 − d^{1/q−1/p}`` for a 1-sparse vector.

    ``scope``: ``"global"`` (every given tensor together: one 0-d tensor), ``"layer"`` (one 0-d
    tensor per given tensor) or ``"neuron"`` (per output row, a tensor viewed as ``(out, -1)``:
    one ``(out,)`` tensor per given tensor). Per-tensor results come back in the input's structure
    (a tensor for a tensor, a list for a sequence, a dict for a mapping). The official code picks
    the weights (``'weight'`` in the name, ``dim > 1``); here the caller passes the tensors it
    means (:func:`pqi_table` does the official pick for a model).

    Ours: an all-zero unmasked set (NaN in the official code) gives 0, as a constant vector. Sums
    accumulate in float64 (the official code stays in the weights' dtype). ``p = q`` is allowed
    (then ``I = 0``: the official analysis grid includes p = q = 1).
    """
    p, q = _check_pq(p, q, strict=False)
    _check_scope(scope)
    kind, keys, sums = _sums(w, mask, p, q, scope)
    out = [_index(*s, p, q) for s in sums]
    return out[0] if scope == "global" else _pack(kind, keys, out)


def _keep_bound(si: torch.Tensor, d: torch.Tensor, p: float, q: float, eta: float) -> torch.Tensor:
    """Official ``make_bound_si``: ``m = ceil(d·(1+η)^{q/(p−q)}·(1−I)^{qp/(q−p)})``."""
    return torch.ceil(d * (1 + eta) ** (q / (p - q)) * (1 - si).pow(q * p / (q - p))).long()


def _check_eta(eta: float) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0; got {eta!r}")
    return float(eta)


def sap_keep_count(
    w: Weights, p: float = 0.5, q: float = 1.0, eta: float = 0.0, mask=None, scope: str = "global"
):
    """SAP's retained-count bound (Diao et al., ICLR 2023; official ``make_bound_si``):
    ``m = ceil(d·(1+η)^{q/(p−q)}·(1 − I_{p,q})^{qp/(q−p)})``, which equals
    ``ceil((1+η)^{−q/(q−p)}·(‖w‖_p/‖w‖_q)^{pq/(q−p)})`` (d cancels; the cancellation is ours). With
    η = 0 it is an effective support size: ``(‖w‖₁/‖w‖₂)²`` for p=1, q=2 and ``(Σ√|w|)²/Σ|w|`` for
    p=½, q=1. Needs ``0 < p < q`` and ``η >= 0``.

    Returns an int for ``scope="global"``; for ``"layer"`` / ``"neuron"`` long tensors (0-d or
    ``(out,)``) in the input's structure. ``I`` goes through :func:`pq_index`'s clean-ups first, as
    in the official code (so an all-zero set gives ``m = d``).
    """
    p, q = _check_pq(p, q, strict=True)
    eta = _check_eta(eta)
    _check_scope(scope)
    kind, keys, sums = _sums(w, mask, p, q, scope)
    out = [_keep_bound(_index(*s, p, q), s[2], p, q, eta) for s in sums]
    return int(out[0]) if scope == "global" else _pack(kind, keys, out)


def _prune_count(sums, p: float, q: float, eta: float, gamma: float, beta: float) -> torch.Tensor:
    """``n = floor(d·clamp(γ(1 − m/d), 0, β))`` (0 where d = 0)."""
    sp, sq, d = sums
    m = _keep_bound(_index(sp, sq, d, p, q), d, p, q, eta)
    ratio = torch.clamp(gamma * (1 - m / d), 0, beta)
    ratio = torch.nan_to_num(ratio, nan=0.0)  # d = 0
    return torch.floor(d * ratio).long()


def sap_prune_step(
    weights: Weights,
    masks,
    p: float = 0.5,
    q: float = 1.0,
    eta: float = 0.0,
    gamma: float = 1.0,
    beta: float = 0.9,
    scope: str = "global",
):
    """One SAP pruning step (Diao et al., ICLR 2023; official ``Compression.compress`` for
    ``prune_mode = si-p-q-η-γ``): with ``m`` from :func:`sap_keep_count` over the unmasked weights,
    ``prune_ratio = clamp(γ(1 − m/d), 0, β)`` (β = ``cfg['beta']`` = 0.9), ``n = floor(d·ratio)``,
    ``pivot`` = the ``n``-th smallest unmasked ``|w|`` (0-based) and every unmasked ``|w| < pivot``
    is pruned: the comparison is strict, so weights tied with the pivot survive and ``n`` is an
    upper bound on the count removed. ``scope``: ``global`` (one pivot over all tensors: the
    paper's main runs), ``layer`` (one per tensor) or ``neuron`` (one per output row).

    Returns the new boolean masks in the structure of ``masks`` (already-pruned entries stay
    pruned); the weights are not touched. Ours: counts computed in float64 (the official code in
    float32), which can move ``n`` by one at an exact boundary.
    """
    p, q = _check_pq(p, q, strict=True)
    eta = _check_eta(eta)
    _check_scope(scope)
    for name, v, lo in (("gamma", gamma, 0.0), ("beta", beta, 0.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
            raise ValueError(f"{name} must be a finite number >= 0; got {v!r}")
    if beta >= 1:
        raise ValueError(f"beta (the largest fraction pruned in one step) must be in [0, 1); got {beta!r}")
    if masks is None:
        raise ValueError("sap_prune_step needs the current masks (all True for the dense network)")
    kind, keys, ws, ms = _as_items(weights, masks, "weights")
    if not isinstance(masks, torch.Tensor) and not isinstance(masks, Mapping):
        kind = "list"
    _, _, sums = _sums(ws, ms, p, q, scope)
    with torch.no_grad():
        if scope == "global":
            n = int(_prune_count(sums[0], p, q, eta, gamma, beta))
            if n == 0:
                return _pack(kind, keys, [m.clone() for m in ms])
            vals = torch.cat([t.detach().abs()[m].reshape(-1) for t, m in zip(ws, ms, strict=True)])
            pivot = torch.kthvalue(vals, n + 1).values  # sort(|w|)[n]
            new = [m & ~(t.detach().abs() < pivot.to(t)) for t, m in zip(ws, ms, strict=True)]
        elif scope == "layer":
            new = []
            for t, m, s in zip(ws, ms, sums, strict=True):
                n = int(_prune_count(s, p, q, eta, gamma, beta))
                if n == 0:
                    new.append(m.clone())
                    continue
                pivot = torch.kthvalue(t.detach().abs()[m], n + 1).values
                new.append(m & ~(t.detach().abs() < pivot.to(t)))
        else:
            new = []
            for t, m, s in zip(ws, ms, sums, strict=True):
                n = _prune_count(s, p, q, eta, gamma, beta)  # (rows,)
                a = _rows(t.detach()).abs()
                keyed = torch.where(_rows(m), a, torch.full_like(a, math.nan))  # masked sort last
                pivot = keyed.sort(dim=1).values.gather(1, n.to(a.device).view(-1, 1))  # (rows, 1)
                # a row with d = 0 has pivot NaN: nothing compares below it
                new.append(m & ~(a < pivot).view_as(m))
    return _pack(kind, keys, new)


@dataclass(frozen=True)
class PruneMode:
    """A parsed official ``prune_mode``: ``kind`` ``"si"`` (SAP, with p, q, eta, gamma), ``"lt"``
    (lottery ticket, ``ratio`` more of the remaining weights per iteration) or ``"os"`` (one-shot
    ranking by the first trained model, ``ratio`` per iteration)."""

    kind: str
    p: float | None = None
    q: float | None = None
    eta: float | None = None
    gamma: float | None = None
    ratio: float | None = None


def parse_prune_mode(mode: str) -> PruneMode:
    """Parse the official ``prune_mode`` string (spec §6): ``si-p-q-η-γ`` (config default
    ``si-0.5-1-0-1``; README ``si-0.5-1.0-0.001-1.2``), ``lt-r`` or ``os-r`` (e.g. ``lt-0.2``).
    Checks ``0 < p < q``, ``η >= 0``, ``γ >= 0`` and ``0 < r < 1``."""
    if not isinstance(mode, str):
        raise ValueError(f"prune_mode must be a string like 'si-0.5-1-0-1' or 'lt-0.2'; got {mode!r}")
    parts = mode.split("-")
    kind, args = parts[0], parts[1:]
    try:
        nums = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"prune_mode {mode!r}: the fields after {kind!r} must be numbers") from None
    if kind == "si":
        if len(nums) != 4:
            raise ValueError(f"prune_mode {mode!r}: 'si' takes 4 numbers, si-p-q-eta-gamma; got {len(nums)}")
        p, q = _check_pq(nums[0], nums[1], strict=True)
        eta = _check_eta(nums[2])
        if nums[3] < 0:
            raise ValueError(f"prune_mode {mode!r}: gamma must be >= 0; got {nums[3]}")
        return PruneMode("si", p=p, q=q, eta=eta, gamma=nums[3])
    if kind in ("lt", "os"):
        if len(nums) != 1 or not 0 < nums[0] < 1:
            raise ValueError(f"prune_mode {mode!r}: {kind!r} takes one ratio in (0, 1), e.g. '{kind}-0.2'")
        return PruneMode(kind, ratio=nums[0])
    raise ValueError(f"prune_mode {mode!r}: the kind must be one of ('si', 'lt', 'os')")


def pqi_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The official pick of prunable tensors: parameters whose last name part contains ``'weight'``
    and with ``dim > 1`` (biases and norms excluded). Tied parameters appear once (ours: the
    official code walks ``state_dict``, which lists a tied tensor under each name)."""
    return {n: p for n, p in model.named_parameters() if "weight" in n.split(".")[-1] and p.dim() > 1}


def pqi_table(model: nn.Module, p: float = 0.5, q: float = 1.0, masks: Mapping | None = None) -> list[dict]:
    """A per-layer PQI table for any model, a diagnostic (spec §6: "ship PQI also as a
    diagnostic"): one row per tensor of :func:`pqi_weights` with ``name``, ``shape``,
    ``numel``, ``kept`` (unmasked count d), ``pqi`` (layer scope), ``pqi_neuron_mean`` (mean of the
    neuron-scope indices over rows) and ``effective`` (the η = 0 keep bound m, when p < q), then a
    last row ``name="global"`` over all of them."""
    weights = pqi_weights(model)
    if not weights:
        raise ValueError("the model has no parameter named '*weight*' with dim > 1 (Linear, Conv, Embedding)")
    if masks is not None:
        masks = {n: masks[n] for n in weights}
    with torch.no_grad():
        layer = pq_index(weights, p, q, masks, scope="layer")
        neuron = pq_index(weights, p, q, masks, scope="neuron")
        eff = sap_keep_count(weights, p, q, 0.0, masks, scope="layer") if p < q else None
        rows = []
        for n, w in weights.items():
            kept = int(masks[n].sum()) if masks is not None else w.numel()
            rows.append(
                dict(
                    name=n,
                    shape=tuple(w.shape),
                    numel=w.numel(),
                    kept=kept,
                    pqi=float(layer[n]),
                    pqi_neuron_mean=float(neuron[n].mean()),
                    effective=int(eff[n]) if eff is not None else None,
                )
            )
        total = sum(r["numel"] for r in rows)
        rows.append(
            dict(
                name="global",
                shape=(total,),
                numel=total,
                kept=sum(r["kept"] for r in rows),
                pqi=float(pq_index(weights, p, q, masks, scope="global")),
                pqi_neuron_mean=None,
                effective=sap_keep_count(weights, p, q, 0.0, masks) if p < q else None,
            )
        )
    return rows
