"""Consensus gates with polarization (Zhi et al., "Consensus sub-network with polarization
regularization", arXiv 2302.10798), and the official BN-scale polariser it builds on (Zhuang et
al., "Neuron-level Structured Pruning using Polarization Regularizer", NeurIPS 2020). Spec
``training-aware.md`` §5.

**consensus-gating (reconstruction).** The consensus-gating paper has no official code; what is
here is the spec's reconstruction [ours], labelled so in every report:

- a :class:`~prunekit.training.polarize.ConsensusGate` per prunable unit set of a
  :class:`~prunekit.models.convnets.ConvNet` / :class:`~prunekit.models.convnets.ResNetLite` /
  :class:`~prunekit.models.convnets.MLP`, attached by **forward hooks** (no model code changed;
  the gates live in a temporary submodule ``consensus_gates`` so that any optimiser, the
  ``Trainer``'s included, sees them): ``units="channels"`` gates every channel group that does not
  cross a residual addition (``conv.i``, ``inner.s.b``, ``hidden.i``; the gate reads the producing
  layer's input, pooled, and multiplies the group's BatchNorm output, or the Linear's for an MLP);
  ``units="blocks"`` gates every removable residual block of a ResNetLite (the gate reads the
  block's input and multiplies its ``bn2`` output, so the block computes ``relu(x + g·F(x))``,
  which is ``x`` when ``g = 0`` since ``x ≥ 0``). Residual streams are not gated: a stream channel
  is shared by every addend of the stream;
- the loss ``CE + λ_s·(mean ḡ − (1 − s))² + λ_p·[t‖ḡ‖₁ − ‖ḡ − mean ḡ‖₁]`` with ``ḡ`` each unit's
  batch-mean gate (:func:`~prunekit.training.polarize.gate_budget_penalty`,
  :func:`~prunekit.training.polarize.gate_penalty`); spec starting values λ_s = 1, λ_p = 1e-3,
  t = 1.2;
- after training, ``ḡ`` measured on calibration batches, units with ``ḡ > 0.5`` (or the valley
  threshold) kept, the gates removed and the other units removed physically
  (:func:`~prunekit.models.convnets.remove_channels`, :func:`~prunekit.models.convnets.remove_blocks`).

**variant="bn"**: the official polariser (Zhuang et al.; polarizationpruning/PolarizationPruning):
the BatchNorm scales γ of the same groups start at 0.5 (``--bn-init-value``), the penalty
``λ Σ_l [t‖γ_l‖₁ − ‖γ_l − γ̄‖₁]`` with the global mean γ̄ is added to the loss, γ is clamped to
[0, 1] after every optimiser step, and the channels below the valley threshold (the official
``search_threshold``) are removed. **variant="slimming"**: network slimming (Liu et al., ICCV
2017), ``λ‖γ‖₁`` on the same γ (left at 1), the top ``(1 − sparsity)`` fraction of ``|γ|`` kept
globally. Neither fine-tunes here (the official code fine-tunes 200 epochs after the cut): call
:func:`~prunekit.training.train_batches` on the result.

Ours (not in either paper): a group that would lose every channel keeps its highest-scoring one
(an empty layer would cut the network); ``keep_count`` keeps a global top-K instead of a
threshold, to compare methods at the same kept count.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import TrainerCallback

from ..errors import UnsupportedModelError
from ..models import convnets as C
from ..registry import register
from .loop import train_batches
from .polarize import ConsensusGate, clamp_, gate_budget_penalty, gate_penalty, polarization_penalty
from .polarize import valley_threshold as _valley

VARIANTS = ("gates", "bn", "slimming")
UNITS = ("channels", "blocks")
BUDGETS = ("global", "layer")
LABELS = {
    "gates": "consensus-gating (reconstruction)",
    "bn": "polarization regularizer (Zhuang et al. 2020, official BN polariser)",
    "slimming": "network slimming (L1 on BN scales)",
}
GATES_ATTR = "consensus_gates"


class _Scale(nn.Module):
    """``W = k·W_raw`` (stored as ``W / k``): under Adam, which moves every parameter by about the
    learning rate per step, the gates then move ``k`` times faster than the weights [ours]."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = k

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.k

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w / self.k


def _channel_groups(model: nn.Module) -> dict[str, C.Group]:
    """The channel groups that do not cross a residual addition."""
    return {n: g for n, g in C.groups(model).items() if g.kind != "residual"}


def _bn_of(g: C.Group) -> str | None:
    return next((m.module for m in g.members if m.role == "bn"), None)


class ConsensusGates:
    """Consensus gates attached to a network by forward hooks (see the module docstring);
    **consensus-gating (reconstruction)**. Use as a context manager or call :meth:`remove`; the
    hooks and the ``consensus_gates`` submodule go away also after an exception.

    - :meth:`loss_terms` the budget and polarization terms on the last forward's ``ḡ`` (a plain
      loop: ``loss = out.loss + sum(gates.loss_terms().values())``); :meth:`loss_fn` the same for
      :func:`~prunekit.training.train_batches` (``loss_fn=gates.loss_fn``);
    - :meth:`measure` each unit's mean gate over calibration batches.
    """

    def __init__(
        self,
        model: nn.Module,
        units: str = "channels",
        *,
        sparsity: float = 0.5,
        lam_s: float = 1.0,
        lam_p: float = 1e-3,
        t: float = 1.2,
        init_bias: float = 1.0,
        gate_scale: float = 10.0,
        budget: str = "global",
    ) -> None:
        if units not in UNITS:
            raise ValueError(f"units must be one of {UNITS}; got {units!r}")
        if hasattr(model, GATES_ATTR):
            raise ValueError(f"the model already holds consensus gates ({GATES_ATTR!r}); remove them first")
        self.model, self.units = model, units
        self.sparsity, self.lam_s, self.lam_p, self.t = sparsity, lam_s, lam_p, t
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}; got {budget!r}")
        self.budget = budget
        gate_budget_penalty(torch.ones(1), sparsity, lam_s)  # checks the values early
        gate_penalty(torch.ones(1), t, lam_p)
        device = next(model.parameters()).device
        self.gates: dict[str, ConsensusGate] = {}
        self._handles: list = []
        self._inputs: dict[str, torch.Tensor] = {}
        targets: list[tuple[str, nn.Module, nn.Module, str]] = []  # name, reader, gated module, kind
        if units == "channels":
            groups = _channel_groups(model)
            if not groups:
                raise UnsupportedModelError(f"{type(model).__name__} has no channel group to gate")
            for name, g in groups.items():
                producer = model.get_submodule(g.producers[0])
                gated = model.get_submodule(_bn_of(g) or g.producers[0])
                in_ch = producer.in_channels if isinstance(producer, nn.Conv2d) else producer.in_features
                self.gates[name] = ConsensusGate(in_ch, g.width, "channel", init_bias)
                targets.append((name, producer, gated, "channel"))
        else:
            blocks = {n: b for n, b in C.blocks(model).items() if b.removable}
            if not blocks:
                raise UnsupportedModelError(
                    f"units='blocks' needs a ResNetLite with removable residual blocks; "
                    f"{type(model).__name__} has none"
                )
            for name, b in blocks.items():
                blk = model.get_submodule(b.module)
                self.gates[name] = ConsensusGate(blk.conv1.in_channels, 1, "block", init_bias)
                targets.append((name, blk, blk.bn2, "block"))
        if isinstance(gate_scale, bool) or not isinstance(gate_scale, (int, float)) or not gate_scale > 0:
            raise ValueError(f"gate_scale must be a number > 0; got {gate_scale!r}")
        if gate_scale != 1:
            for gate in self.gates.values():
                for pname in ("weight", "bias"):
                    parametrize.register_parametrization(gate.proj, pname, _Scale(float(gate_scale)))
        model.add_module(GATES_ATTR, nn.ModuleDict({k.replace(".", "_"): v for k, v in self.gates.items()}))
        getattr(model, GATES_ATTR).to(device)
        try:
            for name, reader, gated, kind in targets:
                self._handles.append(reader.register_forward_pre_hook(self._stash(name)))
                self._handles.append(gated.register_forward_hook(self._apply(name, kind)))
        except BaseException:
            self.remove()
            raise

    def _stash(self, name: str):
        def hook(mod, args):
            self._inputs[name] = args[0]

        return hook

    def _apply(self, name: str, kind: str):
        gate = self.gates[name]

        def hook(mod, args, out):
            x = self._inputs.pop(name)
            if kind == "channel":
                return gate(x, out)
            g = gate.gates(x)  # (B, 1)
            return out * g.view(-1, *([1] * (out.dim() - 1)))

        return hook

    @property
    def active(self) -> bool:
        return hasattr(self.model, GATES_ATTR) and bool(self._handles)

    def remove(self) -> None:
        """Remove the hooks and the ``consensus_gates`` submodule (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        if GATES_ATTR in self.model._modules:
            delattr(self.model, GATES_ATTR)
        self._inputs.clear()

    def __enter__(self) -> ConsensusGates:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def gbar(self) -> list[torch.Tensor]:
        """The last forward's batch-mean gates, one ``(units,)`` tensor per gate, with their graph."""
        out = [g.gbar for g in self.gates.values()]
        if any(v is None for v in out):
            raise ValueError("no forward pass has run through the gates yet")
        return out

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """``{"budget": λ_s(mean ḡ − (1 − s))², "polarization": λ_p[t‖ḡ‖₁ − ‖ḡ − mean ḡ‖₁]}``."""
        g = self.gbar()
        if self.budget == "layer":  # ours: the mean of per-gate budgets
            budget = torch.stack([gate_budget_penalty(x, self.sparsity, self.lam_s) for x in g]).mean()
        else:
            budget = gate_budget_penalty(g, self.sparsity, self.lam_s)
        return {
            "budget": budget,
            "polarization": gate_penalty(g, self.t, self.lam_p),
        }

    def loss_fn(self, model, inputs, outputs, step) -> dict[str, torch.Tensor]:
        """:meth:`loss_terms` with :func:`~prunekit.training.train_batches`' ``loss_fn`` signature."""
        return self.loss_terms()

    @torch.no_grad()
    def measure(self, batches: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Each unit's mean gate over every sample of ``batches`` (eval mode; the mode is restored):
        ``{gate name: (units,) float tensor}`` on the CPU."""
        if not batches:
            raise ValueError("measure needs at least one calibration batch")
        sums = {n: 0.0 for n in self.gates}
        count = 0
        device = next(self.model.parameters()).device
        was = self.model.training
        try:
            self.model.eval()
            for b in batches:
                self.model(**{k: v.to(device) for k, v in b.items() if k != "labels"})
                for n, g in self.gates.items():
                    sums[n] = sums[n] + g.last_gates.sum(0).double().cpu()
                count += next(iter(self.gates.values())).last_gates.shape[0]
        finally:
            self.model.train(was)
        return {n: (s / count).float() for n, s in sums.items()}


def _bn_gammas(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    out = {}
    for name, g in _channel_groups(model).items():
        bn = _bn_of(g)
        if bn is None:
            raise UnsupportedModelError(
                f"variant 'bn' / 'slimming' needs a BatchNorm on every channel group; {name!r} of "
                f"{type(model).__name__} has none (use variant='gates')"
            )
        out[name] = model.get_submodule(bn).weight
    return out


class ClampBN(TrainerCallback):
    """The official ``clamp_bn``: clamp the polarised BN scales to [0, 1] after every optimiser
    step (``on_optimizer_step``); in a plain loop call it (``cb()``) after ``optimizer.step()``."""

    def __init__(self, gammas: Sequence[torch.Tensor]) -> None:
        self.gammas = list(gammas)

    def __call__(self) -> None:
        clamp_(self.gammas)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self()


def _select(
    scores: dict[str, torch.Tensor], threshold: float | None, keep_count: int | None, strict: bool
) -> dict[str, torch.Tensor]:
    """Boolean keep vectors: ``score > threshold`` (``>=`` when not strict), or the global top
    ``keep_count``."""
    if keep_count is not None:
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        if not 1 <= keep_count <= flat.numel():
            raise ValueError(f"keep_count must be in [1, {flat.numel()}] (the units); got {keep_count!r}")
        order = torch.argsort(flat, descending=True, stable=True)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[:keep_count]] = True
        out, i = {}, 0
        for n, s in scores.items():
            out[n] = keep[i : i + s.numel()]
            i += s.numel()
        return out
    return {n: (s > threshold) if strict else (s >= threshold) for n, s in scores.items()}


def cut_units(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    *,
    units: str = "channels",
    threshold: float | None = 0.5,
    keep_count: int | None = None,
    strict: bool = True,
) -> dict:
    """Remove, physically and in place, the units whose score fails the cut: keep ``score >
    threshold`` (``>=`` when not ``strict``), or the global top ``keep_count``. ``scores``:
    ``{group name: (width,) scores}`` for ``units="channels"`` (a group left empty keeps its best
    unit: ours), ``{block name: (1,) score}`` for ``"blocks"`` (a failing block is removed).
    Returns ``{"kept": {group: (before, after)}, "blocks_removed": [...], "kept_units": int}``."""
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}; got {units!r}")
    if keep_count is None and threshold is None:
        raise ValueError("cut_units needs a threshold or a keep_count")
    scores = {n: torch.as_tensor(v).float().reshape(-1) for n, v in scores.items()}
    keep = _select(scores, threshold, keep_count, strict)
    if units == "blocks":
        drop = [n for n, k in keep.items() if not bool(k.any())]
        if drop:
            C.remove_blocks(model, drop)
        return {"kept": {}, "blocks_removed": drop, "kept_units": len(keep) - len(drop)}
    kept_idx, kept = {}, {}
    for n, k in keep.items():
        if not bool(k.any()):  # ours: never empty a layer
            k = torch.zeros_like(k)
            k[int(torch.argmax(scores[n]))] = True
        kept_idx[n] = k.nonzero().flatten()
        kept[n] = (k.numel(), int(k.sum()))
    C.remove_channels(model, kept_idx)
    return {"kept": kept, "blocks_removed": [], "kept_units": sum(a for _, a in kept.values())}


@dataclass
class PolarizationReport:
    """What :func:`polarization` did. ``label`` names the method (``consensus-gating
    (reconstruction)`` for the gates); ``scores`` each unit's ḡ (gates) or γ (bn, slimming) before
    the cut; ``kept`` ``{group: (before, after)}``; ``blocks_removed``; ``bimodality`` the fraction
    of scores in (0.1, 0.9); parameters and multiply-accumulates before and after."""

    variant: str
    units: str
    label: str
    threshold: float | None
    keep_count: int | None
    scores: dict = field(default_factory=dict)
    kept: dict = field(default_factory=dict)
    blocks_removed: list = field(default_factory=list)
    kept_units: int = 0
    total_units: int = 0
    bimodality: float = 0.0
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    losses: list = field(default_factory=list)
    terms: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _flops(model: nn.Module, batch: dict) -> int:
    shape = tuple(batch["pixel_values"].shape[1:])
    return C.count_flops(model, (1, *shape)) if len(shape) == 3 else 0


def polarization(
    model: nn.Module,
    batches: Sequence[dict],
    *,
    variant: str = "gates",
    units: str = "channels",
    sparsity: float = 0.5,
    steps: int = 100,
    lr: float = 1e-3,
    lam_s: float = 1.0,
    lam_p: float | None = None,
    t: float | None = None,
    threshold: float | str | None = None,
    keep_count: int | None = None,
    calib_batches: Sequence[dict] | None = None,
    init_bias: float = 1.0,
    bn_init: float = 0.5,
    gate_scale: float = 10.0,
    budget: str = "global",
    seed: int = 0,
    progress: bool = False,
    **train_options,
) -> PolarizationReport:
    """Train ``model`` (a ConvNet, ResNetLite or MLP of :mod:`prunekit.models.convnets`) for
    ``steps`` optimiser steps on ``batches`` with a polarising regulariser, then remove the units it
    switched off, in place. See the module docstring for the three variants.

    - ``variant="gates"``, **consensus-gating (reconstruction)**: gates on ``units`` (``"channels"``
      or ``"blocks"``), target ``sparsity`` (fraction of units removed), ``lam_s`` (1), ``lam_p``
      (default 1e-3) and ``t`` (default 1.2), gates initialised open (``init_bias``); ḡ measured on
      ``calib_batches`` (default the first 4 training batches); ``threshold`` 0.5 by default
      (keep ḡ > 0.5) or ``"valley"``. ``gate_scale`` [ours]: the gates' parameters are stored
      divided by it, so the optimiser (Adam, about ``lr`` per step) moves them ``gate_scale`` times
      faster than the weights; the ``Trainer`` has one learning rate, and at lr 1e-3 an open gate
      (bias 1) would need about a thousand steps to close. ``budget``: ``"global"`` (the spec's
      ``(mean_u ḡ_u − (1 − s))²`` over every unit) or ``"layer"`` [ours]: the mean over gates of
      each gate's own budget term, so that no layer can close entirely while another stays open
      (on the Fashion-MNIST MLP the global budget closed every unit of the first hidden layer).
    - ``variant="bn"``: the official BN polariser, γ initialised to ``bn_init`` (0.5), ``lam_p``
      default 5e-5 and ``t`` default 1.4 (the README's ResNet-56 values), γ clamped to [0, 1]
      after each step; threshold ``"valley"`` by default (keep γ ≥ it), or a number.
    - ``variant="slimming"``: ``lam_p·‖γ‖₁`` (default 1e-4), the top ``1 − sparsity`` of ``|γ|``
      kept globally (or ``threshold``).

    ``keep_count``: keep the global top-K units by score instead (same kept count across methods).
    ``train_options`` go to :func:`~prunekit.training.train_batches`. The model is changed in place
    (trained, then cut); on an exception the gates and hooks are removed before it propagates.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}; got {units!r}")
    if variant != "gates" and units != "channels":
        raise ValueError(
            f"variant {variant!r} prunes channels only (BN scales); units='blocks' needs 'gates'"
        )
    if not isinstance(model, C.NETWORKS):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not one of prunekit's small networks (MLP, ConvNet, ResNetLite)"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    if not batches:
        raise ValueError("polarization needs at least one training batch")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1) (the fraction of units removed); got {sparsity!r}")
    if threshold not in (None, "valley") and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float))
    ):
        raise ValueError(f"threshold must be None, a number or 'valley'; got {threshold!r}")
    if keep_count is not None and (isinstance(keep_count, bool) or not isinstance(keep_count, int)):
        raise ValueError(f"keep_count must be None or an int >= 1; got {keep_count!r}")
    lam_p = {"gates": 1e-3, "bn": 5e-5, "slimming": 1e-4}[variant] if lam_p is None else lam_p
    t = {"gates": 1.2, "bn": 1.4, "slimming": 0.0}[variant] if t is None else t
    calib = list(calib_batches) if calib_batches else list(batches[:4])
    report = PolarizationReport(variant, units, LABELS[variant], None, keep_count)
    report.params_before = C.count_params(model)
    report.flops_before = _flops(model, batches[0])
    t0 = time.perf_counter()
    if variant == "gates":
        with ConsensusGates(
            model,
            units,
            sparsity=sparsity,
            lam_s=lam_s,
            lam_p=lam_p,
            t=t,
            init_bias=init_bias,
            gate_scale=gate_scale,
            budget=budget,
        ) as gates:
            res = train_batches(
                model, batches, steps=steps, lr=lr, seed=seed, loss_fn=gates.loss_fn, progress=progress,
                **train_options,
            )  # fmt: skip
            scores = gates.measure(calib)
        strict = True
        if threshold == "valley":
            threshold = _valley(list(scores.values()))
        elif threshold is None:
            threshold = 0.5
    else:
        gammas = _bn_gammas(model)
        if variant == "bn":
            with torch.no_grad():
                for g in gammas.values():
                    g.fill_(bn_init)
            clamp = ClampBN(list(gammas.values()))

            def loss_fn(m, inputs, outputs, step):
                return {"polarization": polarization_penalty(list(gammas.values()), t=t, lam=lam_p)}

            callbacks = [clamp]
        else:

            def loss_fn(m, inputs, outputs, step):
                return {"l1": lam_p * torch.stack([g.abs().sum() for g in gammas.values()]).sum()}

            callbacks = []
        res = train_batches(
            model, batches, steps=steps, lr=lr, seed=seed, loss_fn=loss_fn, callbacks=callbacks,
            progress=progress, **train_options,
        )  # fmt: skip
        scores = {n: g.detach().abs().float().cpu() for n, g in gammas.items()}
        strict = False
        if threshold == "valley" or (variant == "bn" and threshold is None):
            threshold = _valley(list(scores.values()))
        elif threshold is None and keep_count is None:  # slimming: a global percentile
            report.keep_count = keep_count = max(
                1, round((1 - sparsity) * sum(s.numel() for s in scores.values()))
            )
    report.seconds = time.perf_counter() - t0
    report.losses, report.terms = res.losses, (res.terms[-1] if res.terms else {})
    report.threshold = None if keep_count is not None else float(threshold)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    report.scores = {n: s.tolist() for n, s in scores.items()}
    report.bimodality = float(((flat > 0.1) & (flat < 0.9)).float().mean())
    report.total_units = flat.numel()
    cut = cut_units(
        model, scores, units=units, threshold=report.threshold, keep_count=keep_count, strict=strict
    )
    report.kept, report.blocks_removed, report.kept_units = (
        cut["kept"],
        cut["blocks_removed"],
        cut["kept_units"],
    )
    report.params_after = C.count_params(model)
    report.flops_after = _flops(model, batches[0])
    return report


@register(
    "polarization",
    family="training",
    paper="Consensus sub-network with polarization regularization (gates; a reconstruction) / "
    "Neuron-level Structured Pruning using Polarization Regularizer (BN polariser)",
    stages=("during-training",),
    signals=("consensus_gate (trained, straight-through)", "bn_scale"),
    trains=True,
    summary="per-unit gates (or BN scales) trained with a polarising regulariser, cut at 0.5 and removed",
)
@dataclass
class Polarization:
    """The polarization methods' options as a registry method: ``Polarization(sparsity=0.5)(model,
    batches)`` is :func:`polarization` (the gates are **consensus-gating (reconstruction)**)."""

    docs_from: ClassVar[str] = "prunekit.training.polarization"
    taxonomy: ClassVar[dict] = {
        "which": "weights: structured (channels of CNNs/MLPs, residual blocks)",
        "speedup": "universal (a physically narrower / shallower network)",
        "how": "learned (gates or BN scales polarised during training, then thresholded and removed)",
    }
    variant: str = "gates"  # gates (consensus-gating, a reconstruction), bn (official polariser), slimming
    units: str = "channels"  # channels, or blocks (residual blocks; gates only)
    sparsity: float = 0.5  # target fraction of units removed
    steps: int = 100
    lr: float = 1e-3
    lam_s: float = 1.0  # budget weight (gates)
    lam_p: float | None = None  # polariser weight; None: 1e-3 gates, 5e-5 bn, 1e-4 slimming
    t: float | None = None  # polariser t; None: 1.2 gates, 1.4 bn
    threshold: float | str | None = None  # None: 0.5 (gates), "valley" (bn), top 1 - sparsity (slimming)
    keep_count: int | None = None  # keep the global top-K units instead of a threshold
    budget: str = "global"  # the gates' budget over all units (spec) or per layer (ours)
    seed: int = 0

    def __call__(self, model: nn.Module, batches, **kw) -> PolarizationReport:
        return polarization(model, batches, **asdict(self), **kw)
