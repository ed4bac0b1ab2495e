"""Polarization: the regulariser of Zhuang et al., "Neuron-level Structured Pruning using
Polarization Regularizer" (NeurIPS 2020), and the consensus gates of Zhi et al., "Consensus
sub-network with polarization regularization" (arXiv 2302.10798), which build on it.

Spec ``training-aware.md`` §5.

- :func:`polarization_penalty` is the official BN-scale polariser (polarizationpruning/
  PolarizationPruning, ``bn_sparsity`` / ``_compute_polarization_sparsity``): with the **global**
  mean γ̄ over every sparse layer, not detached, ``R = λ Σ_l [t‖γ_l‖₁ − ‖γ_l − αγ̄‖₁]`` (L2 variant:
  ``− Σ(γ_l − αγ̄)²``). The official loop also clamps γ to [0, 1] after each optimiser step
  (:func:`clamp_`).
- :func:`valley_threshold` is the official ``search_threshold`` (``alg="grad"``): the left edge of
  the first local-minimum bin of a 100-bin histogram on [0, 1].
- :class:`ConsensusGate`, :func:`gate_penalty` and :func:`gate_budget_penalty` are
  **consensus-gating (reconstruction)**: the paper has no official code; the gate form, the
  polariser on the batch-mean gates and the budget term are our reconstruction (spec §5).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .hooks import ste_heaviside

VARIANTS = ("l1", "l2")


def _finite(name: str, v, lo: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number; got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}; got {v!r}")
    return float(v)


def _tensors(x, what: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        x = [x]
    if not isinstance(x, Sequence) or not x or not all(isinstance(t, torch.Tensor) for t in x):
        raise ValueError(f"{what} must be a tensor or a non-empty list of tensors")
    if any(t.numel() == 0 for t in x):
        raise ValueError(f"{what}: an empty tensor has no scaling factor to polarise")
    return list(x)


def polarization_penalty(
    gammas: Sequence[torch.Tensor] | torch.Tensor,
    t: float = 1.4,
    lam: float | Sequence[float] = 5e-5,
    variant: str = "l1",
    alpha: float = 1.0,
    detach_mean: bool = False,
) -> torch.Tensor:
    """The polarization regulariser (Zhuang et al., NeurIPS 2020), as the official code:
    ``γ̄ = Σ_l Σ_i γ_{l,i} / n`` over **all** given layers (the global mean, gradient flowing
    through it), then ``R = Σ_l λ_l·[t·Σ|γ_l| − Σ|γ_l − α·γ̄|]`` (``variant="l1"``, the paper's and
    the default) or ``R = Σ_l λ_l·[t·Σ|γ_l| − Σ(γ_l − α·γ̄)²]`` (``"l2"``, ``L2_POLARIZATION``).

    ``gammas``: the sparse layers' scaling factors (BN weights, or the gates of a ``SparseGate``),
    one tensor per layer. ``lam``: one λ, or one per layer (the official FLOPs-weighted mode scales
    λ per layer, rescaled to ``[w_min, w_max]`` by the caller). ``alpha`` is the official
    ``--alpha`` (1 by default). ``detach_mean=True`` is the official ``POLARIZATION_GRAD`` (the
    mean without gradient). README defaults: ResNet-56 λ=5e-5, t=1.4; VGG-16 λ=3e-5, t=1.5. The
    official loop clamps γ to [0, 1] after every step: :func:`clamp_`.
    """
    gs = _tensors(gammas, "gammas")
    t = _finite("t", t)
    alpha = _finite("alpha", alpha)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if isinstance(lam, Sequence) and not isinstance(lam, str):
        lams = [_finite("lam", v) for v in lam]
        if len(lams) != len(gs):
            raise ValueError(f"{len(lams)} values of lam for {len(gs)} layers of gammas")
    else:
        lams = [_finite("lam", lam)] * len(gs)
    n = sum(g.numel() for g in gs)
    mean = torch.stack([g.sum() for g in gs]).sum() / n
    if detach_mean:
        mean = mean.detach()
    total = 0
    for g, lam_l in zip(gs, lams, strict=True):  # a loop over layers, not units
        dev = g - alpha * mean
        spread = dev.abs().sum() if variant == "l1" else dev.pow(2).sum()
        total = total + lam_l * (t * g.abs().sum() - spread)
    return total


@torch.no_grad()
def clamp_(gammas: Sequence[torch.Tensor] | torch.Tensor, low: float = 0.0, high: float = 1.0) -> None:
    """Clamp scaling factors in place to ``[low, high]``, as the official ``clamp_bn`` does after
    every optimiser step (γ initialised at 0.5 there: ``--bn-init-value``)."""
    for g in _tensors(gammas, "gammas"):
        g.clamp_(low, high)


def valley_threshold(values, bins: int = 100, warn_above: float = 0.2) -> float:
    """The pruning threshold of the official ``search_threshold(alg="grad")`` (PolarizationPruning):
    the histogram of the values with ``bins`` bins on [0, 1] (values outside are not counted, as
    ``np.histogram(range=(0, 1))``), its first local minimum ``i`` (the first ``i`` with
    ``diff[i] <= 0 <= diff[i+1]``), and the left edge of bin ``i + 1``. With no such bin the
    official code returns 0 (nothing pruned), and so does this. Warns when the threshold is above
    ``warn_above`` (0.2, as the spec; the official "fixed" alternative is the edge 0.01).

    ``values``: a tensor or a list of tensors (concatenated), e.g. every layer's γ or ḡ.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 3:
        raise ValueError(f"bins must be an int >= 3; got {bins!r}")
    v = torch.cat([t.detach().reshape(-1) for t in _tensors(values, "values")])
    counts, edges = np.histogram(v.float().cpu().numpy(), bins=bins, range=(0, 1))
    diff = np.diff(counts)
    is_min = (diff[:-1] <= 0) & (diff[1:] >= 0)
    if not is_min.any():
        return 0.0
    threshold = float(edges[int(np.argmax(is_min)) + 1])
    if threshold > warn_above:
        warnings.warn(
            f"valley_threshold: the first histogram valley is at {threshold:.3g} > {warn_above}; "
            "the scaling factors may not be polarised yet",
            stacklevel=2,
        )
    return threshold


def gate_penalty(
    gbar: Sequence[torch.Tensor] | torch.Tensor, t: float = 1.2, lam: float = 1.0
) -> torch.Tensor:
    """The polariser on consensus gates, **consensus-gating (reconstruction)** (Zhi et al., arXiv
    2302.10798; no official code): ``λ·[t·‖ḡ‖₁ − ‖ḡ − mean(ḡ)‖₁]`` over all units, ``ḡ`` each
    unit's batch-mean gate (:attr:`ConsensusGate.gbar`), the mean over units not detached: the
    official polariser (:func:`polarization_penalty`, one layer, α = 1) applied to the gates. It
    pushes each ḡ to 0 or 1, i.e. to one input-independent sub-network. Spec starting values:
    t = 1.2, λ_p = 1e-3."""
    g = torch.cat([x.reshape(-1) for x in _tensors(gbar, "gbar")])
    return polarization_penalty([g], t=t, lam=_finite("lam", lam))


def gate_budget_penalty(gbar: Sequence[torch.Tensor] | torch.Tensor, sparsity: float, lam: float = 1.0):
    """The budget term of the consensus gates, **consensus-gating (reconstruction)**:
    ``λ·(mean_u ḡ_u − (1 − sparsity))²`` with ``sparsity`` the target fraction of units removed,
    in [0, 1). Spec starting value λ_s = 1."""
    if not 0 <= _finite("sparsity", sparsity) < 1:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of units removed); got {sparsity!r}")
    g = torch.cat([x.reshape(-1) for x in _tensors(gbar, "gbar")])
    return _finite("lam", lam) * (g.mean() - (1 - sparsity)) ** 2


class ConsensusGate(nn.Module):
    """A binary gate per unit, **consensus-gating (reconstruction)** (Zhi et al., arXiv 2302.10798;
    no official code, spec §5 [ours]): ``g_u(x) = H(σ(a_u·GAP(x) + b_u) − 0.5)``, ``H`` the
    straight-through Heaviside (:func:`~prunekit.training.hooks.ste_heaviside`: 1[· ≥ 0] forward,
    identity backward, so ∂g/∂z = σ'(z)), ``GAP`` the mean over every dim after the channel dim 1.

    - ``kind="channel"``: ``units`` gates over the channels of ``y`` (``(B, units, ...)``): returns
      ``y·g``; ``y`` defaults to ``x`` (the gate reads the map it gates).
    - ``kind="block"``: one gate per sample for a residual branch: returns ``x + g·F(x)`` with
      ``y = F(x)``.

    ``x`` is channel-first, ``(B, in_channels)`` or ``(B, in_channels, *spatial)``. After each
    forward :attr:`gbar` holds the batch-mean gate per unit, shape ``(units,)``, with its graph (for
    :func:`gate_penalty` and :func:`gate_budget_penalty`); :attr:`last_gates` the per-sample gates.
    Initialisation [ours]: ``a = 0`` and ``b = init_bias`` (1.0, σ = 0.73), so every gate starts
    open and the network starts as the dense one.
    """

    def __init__(
        self, in_channels: int, units: int | None = None, kind: str = "channel", init_bias: float = 1.0
    ):
        super().__init__()
        if kind not in ("channel", "block"):
            raise ValueError(f"kind must be 'channel' or 'block'; got {kind!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an int >= 1; got {in_channels!r}")
        units = (in_channels if kind == "channel" else 1) if units is None else units
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"units must be an int >= 1; got {units!r}")
        if kind == "block" and units != 1:
            raise ValueError(f"a block gate has one unit (the whole residual branch); got units={units}")
        self.kind, self.in_channels, self.units = kind, in_channels, units
        self.proj = nn.Linear(in_channels, units)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.fill_(_finite("init_bias", init_bias))
        self.gbar: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """The hard gates ``(B, units)`` (straight-through), and :attr:`gbar` updated."""
        if x.dim() < 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ConsensusGate expects a channel-first input (B, {self.in_channels}, ...); "
                f"got shape {tuple(x.shape)}"
            )
        pooled = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x  # (B, C_in)
        z = self.proj(pooled)  # (B, units)
        g = ste_heaviside(torch.sigmoid(z) - 0.5)
        self.last_gates = g
        self.gbar = g.mean(0)  # (units,)
        return g

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        g = self.gates(x)
        if self.kind == "block":
            if y is None:
                raise ValueError("a block gate needs y = F(x), the residual branch's output")
            if y.shape != x.shape:
                raise ValueError(
                    f"the residual branch's output {tuple(y.shape)} differs from x {tuple(x.shape)}"
                )
            return x + g.view(-1, *([1] * (x.dim() - 1))) * y
        y = x if y is None else y
        if y.dim() < 2 or y.shape[0] != x.shape[0] or y.shape[1] != self.units:
            raise ValueError(
                f"a channel gate over {self.units} units needs y of shape (B, {self.units}, ...)"
            )
        return y * g.view(*g.shape, *([1] * (y.dim() - 2)))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, units={self.units}, kind={self.kind!r} [consensus-gating (reconstruction)]"
        )
