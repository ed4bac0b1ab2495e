"""Pruning by explaining as a method: the one-shot step, the iterative schedule and its callbacks.

Two papers (spec ``training-aware.md`` §4; the LRP itself is :mod:`prunekit.training.lrp_rules`):

- **PXP** (Hatefi et al. 2024, "Pruning By Explaining Revisited", ECCV-W; code
  ``erfanhatefi/Pruning-by-eXplaining-in-PyTorch``), ``variant="pxp"`` (default): relevance is
  computed **once** on the unpruned model from a few reference samples (ε everywhere, the softmax
  included; start = the one-hot of the true class; a conv channel's score ``Σ_n |Σ_{h,w} R|``, a
  head's ``Σ_{n,tokens} |Σ_keys R|`` at the softmax output), every unit is ranked **globally** with
  no per-layer normalisation, ``int(rate · units)`` least relevant go, by **masking**, with **no
  fine-tuning**. On prunekit's CNNs/MLPs (:class:`~prunekit.models.convnets.MLP`, ``ConvNet``,
  ``ResNetLite``) the units are channels/neurons and the masks are
  :func:`~prunekit.models.convnets.mask_channels` (``physical=True``: sliced out at once with
  :func:`~prunekit.models.convnets.remove_channels`). On a classifier around a ViT encoder
  (DINOv2, ViT, DeiT: any model whose single encoder tower
  :func:`~prunekit.models.encoder_structure.encoder_stack` finds, returning class logits) the units
  are the attention **heads**; they are masked with the encoder masks of ``prune_weights``
  (:class:`~prunekit.weights.structured_encoder.EncoderPruning`: the head's q/k/v rows and
  output-projection columns zeroed, reversible; ``finalize()`` slices them out). PXP masks a head by
  zeroing its softmax output instead; both make the head's contribution exactly zero, so the
  network computes the same function (the output-projection bias stays in both).
- **Yeom et al. 2021** ("Pruning by Explaining", Pattern Recognition; code
  ``seulkiyeom/LRP_pruning``), ``variant="yeom"``: the iterative schedule of
  :func:`prunekit.training.lrp_rules.prune_iteratively`: LRP-α1β0 on convs, ε on Linears, BN passed
  through, ``Σ_{n,h,w}|R|`` per channel, per-layer ``v/Σv``, and at each step the ``5 %`` of the
  **original** unit count that is least relevant globally is removed **physically**, then
  ``fine_tune(model, step)`` runs (Yeom: 10 epochs of SGD); ``rate`` must be a multiple of
  ``step_fraction`` (0.9 = 18 steps, as ``prune_resnet.py``'s ``int(20 · 0.9001)``). CNNs/MLPs only
  (the paper's setting).

**During training** (:class:`IterativeLRP`): Yeom's schedule for any training loop. Every ``every``
optimiser steps it scores the network under its current masks with Yeom's LRP on the reference
batches, and masks the next ``step_fraction`` of the original units (least relevant among the
kept ones, globally) until ``steps`` events have passed; training continues in between (that *is*
the fine-tuning). In a plain loop call ``sched.step()`` after each ``optimizer.step()``; with the
transformers ``Trainer`` pass it in ``callbacks`` (it is a ``TrainerCallback``: ``on_step_end``).
**Masking, not surgery, during training** (*ours*; Yeom rebuilds the network and its optimiser
after each step): removing Parameters under a running ``Trainer`` would leave its optimiser and
scheduler holding tensors of the old shapes, so units are masked (parametrizations ``W · keep``:
the same Parameter objects stay, so the optimiser keeps training the kept weights; a masked unit
outputs exactly zero and gets zero gradient through the mask) and :meth:`IterativeLRP.finalize`
slices them out at the end. A masked unit's relevance is exactly zero, and the kept units'
relevances are those of the sliced network, so masked scoring selects what physical scoring would.

*Ours*, throughout: every group (layer, or attention layer) keeps at least ``min_keep`` units (our
surgery cannot empty a layer), so at very high rates slightly fewer units than ``int(rate · units)``
may go; relevance is computed with the model in eval mode (BN running statistics, no dropout).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from torch import nn
from transformers import TrainerCallback

from ..errors import PrunekitError, UnsupportedModelError
from ..registry import register
from . import lrp_rules as L

VARIANTS = ("pxp", "yeom")


# ------------------------------------------------------------------ what the model is
def _kind(model: nn.Module) -> str:
    """``"channels"`` for prunekit's CNNs/MLPs, ``"heads"`` for a classifier around a ViT encoder."""
    from ..models import convnets as C
    from ..models.encoder_structure import encoder_stack

    if isinstance(model, C.NETWORKS):
        return "channels"
    try:
        encoder_stack(model)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(
            f"lrp: {type(model).__name__} is neither one of prunekit's small vision networks "
            f"({', '.join(c.__name__ for c in C.NETWORKS)}) nor a classifier around one ViT/DINOv2 "
            f"encoder ({e})"
        ) from None
    return "heads"


def _layer_of_heads(model: nn.Module, keys) -> dict[str, int]:
    """Map each attention-score key (the module that ran the softmax) to its encoder layer index."""
    from ..models.encoder_structure import encoder_stack

    stack = encoder_stack(model)
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = [names[id(layer)] for layer in stack.layers]
    out = {}
    for k in keys:
        hit = [i for i, p in enumerate(prefixes) if k == p or k.startswith(p + ".")]
        if len(hit) != 1:
            raise UnsupportedModelError(
                f"lrp: attention {k!r} is not inside exactly one encoder layer ({prefixes[:2]}, ...)"
            )
        out[k] = hit[0]
    if sorted(out.values()) != list(range(len(prefixes))):
        raise UnsupportedModelError(
            f"lrp: expected one attention softmax per encoder layer ({len(prefixes)}); got {sorted(keys)}"
        )
    return out


# ------------------------------------------------------------------ head masks on an encoder
def mask_heads(model: nn.Module, keep: Mapping[str, object]):
    """Mask the attention heads not in ``keep`` (``{attention module name: kept head indices}``, the
    keys of :func:`~prunekit.training.lrp_rules.attention_head_scores`) with the encoder masks of
    ``prune_weights``; returns the :class:`~prunekit.weights.structured_encoder.EncoderPruning`
    (``restore()`` gives the model back exactly; ``finalize()`` slices the heads out). Also after an
    exception while masking, nothing stays masked."""
    from ..models.encoder_structure import encoder_stack
    from ..models.structure import LayerKeep
    from ..weights.structured_encoder import EncoderPruning
    from ..weights.structured_engine import StructuredReport

    stack = encoder_stack(model)
    where = _layer_of_heads(model, keep)
    report = StructuredReport(
        model=type(model).__name__, method="lrp", config=stack.family, sparsity=float("nan"),
        calibration_tokens=0,
    )  # fmt: skip
    pruning = EncoderPruning(stack.owner, report, stack)
    try:
        for k, kept in sorted(keep.items(), key=lambda kv: where[kv[0]]):
            idx = torch.as_tensor(kept).long().sort().values
            i = where[k]
            pruning.apply(i, stack.layers[i], LayerKeep(q_heads=idx, kv_heads=idx))
    except BaseException:
        pruning.restore()
        raise
    return pruning


# ------------------------------------------------------------------ the report
@dataclass
class LRPReport:
    """What :func:`lrp_prune` did. ``kind``: ``"channels"`` or ``"heads"``; ``keep``: the kept
    unit indices per group (channel group, or attention module); ``scores``: the scores ranked (PXP;
    empty for Yeom, who rescores at every step); ``units_before`` / ``units_removed``; ``physical``: sliced
    (``True``) or masked; ``surgery``: the surgery reports (one per Yeom step). A masked result is
    reversible: :meth:`restore` (or leaving a ``with`` block, also by an exception) gives the model
    back exactly; :meth:`finalize` slices the masked units out."""

    variant: str
    kind: str
    rate: float
    units_before: int
    units_removed: int
    physical: bool
    keep: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    surgery: list[dict] = field(default_factory=list)
    masks: object = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "masks"}

    @property
    def active(self) -> bool:
        """Whether masks are on the model."""
        m = self.masks
        return m is not None and (m.active if hasattr(m, "active") else m.state == "pruned")

    def restore(self) -> None:
        """Remove the masks (idempotent); a physical result cannot be restored."""
        if self.physical:
            raise PrunekitError("lrp: the units were removed physically; there are no masks to restore")
        if self.active:
            self.masks.restore()

    def finalize(self) -> None:
        """Slice the masked units out of the model (permanent)."""
        if self.physical:
            return
        if not self.active:
            raise PrunekitError("lrp: the masks were restored; nothing to finalize")
        if self.kind == "heads":
            self.masks.finalize()
        else:
            from ..models.convnets import remove_channels

            self.masks.restore()
            self.surgery.append(remove_channels(self.masks.model, self.keep).to_dict())
        self.physical = True

    def __enter__(self) -> LRPReport:
        return self

    def __exit__(self, *exc) -> None:
        if not self.physical:
            self.restore()


# ------------------------------------------------------------------ the one-shot step
def _check_variant(variant, physical, step_fraction, min_keep) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if physical not in (None, True, False):
        raise ValueError(f"physical must be None, True or False; got {physical!r}")
    if (
        isinstance(step_fraction, bool)
        or not isinstance(step_fraction, (int, float))
        or not 0 < step_fraction < 1
    ):
        raise ValueError(f"step_fraction must be a number in (0, 1); got {step_fraction!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ValueError(f"min_keep must be an int >= 1; got {min_keep!r}")


def pxp_scores(model: nn.Module, batches, composite: L.Composite | None = None) -> dict[str, torch.Tensor]:
    """PXP's scores: channels/neurons of a CNN/MLP (``Σ_n|Σ_{h,w} R|``, no normalisation) or the
    heads of a ViT classifier (Σ keys -> abs -> Σ batch and tokens), ε everywhere by default, the
    one-hot of each reference sample's label as the start."""
    composite = L.PXP_EPSILON if composite is None else composite
    if _kind(model) == "channels":
        return L.lrp_scores(model, batches, composite, "onehot", "after_sum", None)
    return L.attention_head_scores(model, batches, composite, "onehot", "after_sum", None)


def lrp_prune(
    model: nn.Module,
    batches=None,
    *,
    rate: float = 0.3,
    variant: str = "pxp",
    physical: bool | None = None,
    scores: Mapping[str, torch.Tensor] | None = None,
    composite: L.Composite | None = None,
    step_fraction: float = 0.05,
    fine_tune: Callable[[nn.Module, int], None] | None = None,
    min_keep: int = 1,
) -> LRPReport:
    """Prune ``rate`` of ``model``'s units by LRP relevance on ``batches`` (reference samples:
    dicts with ``pixel_values`` and ``labels``, the labels being the explained classes).

    ``variant="pxp"`` (default): one-shot, masked (``physical=True``: sliced at once), no
    fine-tuning; ``scores`` (``{group: (width,)}``) replaces the LRP scoring (e.g. scores computed
    once and reused for every rate, as PXP does; then ``batches`` may be ``None``); ``composite``
    replaces PXP's ε-everywhere composite. ``variant="yeom"``: Yeom's iterative schedule with
    ``fine_tune(model, step)`` after each physical step of ``step_fraction`` of the original units;
    ``rate`` a multiple of ``step_fraction``; CNNs/MLPs only; its steps are permanent surgery, so
    if ``fine_tune`` raises, the model stays pruned up to that step. Returns an :class:`LRPReport`
    (a context manager that restores PXP's masks on exit). See the module docstring."""
    _check_variant(variant, physical, step_fraction, min_keep)
    rate = L._check_rate(rate)
    kind = _kind(model)
    if variant == "yeom":
        return _yeom(
            model, batches, rate, kind, physical, scores, composite, step_fraction, fine_tune, min_keep
        )
    if fine_tune is not None:
        raise ValueError("fine_tune belongs to variant='yeom'; PXP prunes once, without fine-tuning")
    if scores is None:
        if batches is None:
            raise ValueError("lrp: pass reference batches (pixel_values and labels) or precomputed scores")
        scores = pxp_scores(model, batches, composite)
    s = L._check_scores(scores)
    _check_groups(model, kind, s)
    total = sum(len(v) for v in s.values())
    keep = L._drop_least(s, int(rate * total), min_keep)
    report = LRPReport(
        variant="pxp", kind=kind, rate=rate, units_before=total,
        units_removed=total - sum(len(k) for k in keep.values()), physical=bool(physical),
        keep={k: v.tolist() for k, v in keep.items()}, scores={k: v.tolist() for k, v in s.items()},
    )  # fmt: skip
    if kind == "heads":
        report.masks = mask_heads(model, keep)
        if physical:
            report.physical = False
            report.finalize()
    elif physical:
        from ..models.convnets import remove_channels

        report.surgery.append(remove_channels(model, keep).to_dict())
    else:
        from ..models.convnets import mask_channels

        report.masks = mask_channels(model, keep)
    return report


def _check_groups(model: nn.Module, kind: str, s: dict[str, torch.Tensor]) -> None:
    if kind == "channels":
        from ..models.convnets import groups

        want = {k: g.width for k, g in groups(model).items()}
    else:
        from ..models.encoder_structure import encoder_geometry, encoder_stack

        stack = encoder_stack(model)
        where = _layer_of_heads(model, s)
        want = {k: encoder_geometry(stack.layers[i], stack.names).n_q for k, i in where.items()}
    have = {k: len(v) for k, v in s.items()}
    if have != want:
        raise ValueError(f"lrp: scores must give one score per unit of every group {want}; got {have}")


def _yeom(model, batches, rate, kind, physical, scores, composite, step_fraction, fine_tune, min_keep):
    from ..models.convnets import groups

    if kind != "channels":
        raise UnsupportedModelError(
            "lrp: variant='yeom' prunes the channels of prunekit's CNNs/MLPs (the paper's setting); for "
            "attention heads use variant='pxp'"
        )
    if physical is False:
        raise ValueError(
            "lrp: variant='yeom' removes physically after each step; to mask during training use "
            "IterativeLRP as a callback"
        )
    if scores is not None:
        raise ValueError("lrp: variant='yeom' rescores after every step; it takes no precomputed scores")
    if min_keep != 1:
        raise ValueError("lrp: variant='yeom' keeps at least one unit per group (min_keep=1)")
    if batches is None:
        raise ValueError("lrp: variant='yeom' needs reference batches (pixel_values and labels)")
    steps = round(rate / step_fraction)
    if abs(steps * step_fraction - rate) > 1e-9 or steps < 1:
        lo = math.floor(rate / step_fraction) * step_fraction
        raise ValueError(
            f"lrp: variant='yeom' removes step_fraction={step_fraction} of the original units per step; "
            f"rate={rate} is not a positive multiple of it (e.g. {lo:g} or {lo + step_fraction:g})"
        )
    total = sum(g.width for g in groups(model).values())
    reps = L.prune_iteratively(
        model, batches, steps, step_fraction, fine_tune, composite or L.YEOM, "normalized", "before_sum",
        "layer_l1",
    )  # fmt: skip
    kept = _original_keeps(reps)
    return LRPReport(
        variant="yeom", kind=kind, rate=rate, units_before=total,
        units_removed=total - sum(g.width for g in groups(model).values()), physical=True,
        keep=kept, surgery=[r.to_dict() for r in reps],
    )  # fmt: skip


def _original_keeps(reports) -> dict[str, list[int]]:
    """Kept indices in the **original** numbering, from the per-step removed indices (each step's
    indices are into the network as it was then)."""
    alive: dict[str, list[int]] = {}
    for r in reports:
        for g, (before, _) in r.channels.items():
            cur = alive.setdefault(g, list(range(before)))
            gone = set(r.removed[g])
            alive[g] = [u for j, u in enumerate(cur) if j not in gone]
    return alive


# ------------------------------------------------------------------ during training
class IterativeLRP(TrainerCallback):
    """Yeom's iterative LRP pruning inside a training run, by masks (see the module docstring).

    ``IterativeLRP(model, reference_batches, every=100, steps=18, step_fraction=0.05)``: after
    optimiser steps ``every, 2·every, ...`` (``steps`` events), score the masked network with
    Yeom's LRP (``composite``, ``start``, ``abs``, ``normalize``: the options of
    :func:`~prunekit.training.lrp_rules.lrp_scores`) on ``batches`` and mask the
    ``int(step_fraction · original units)`` least relevant kept units, globally (each group keeps
    ``min_keep``). Plain loop: ``sched.step()`` after each
    ``optimizer.step()``; transformers ``Trainer``: ``callbacks=[sched]``. ``finalize()`` slices
    the masked units out (a smaller dense network computing what the masked one computes; build a
    new optimiser after it); ``restore()`` removes the masks; as a context manager it restores on
    exit unless finalized (also after an exception). ``keep``: the kept indices per group;
    ``events``: ``(step, units removed)``."""

    def __init__(
        self,
        model: nn.Module,
        batches,
        *,
        every: int,
        steps: int = 18,
        step_fraction: float = 0.05,
        composite: L.Composite = L.YEOM,
        start: str = "normalized",
        abs: str = "before_sum",
        normalize: str | None = "layer_l1",
        min_keep: int = 1,
    ) -> None:
        from ..models.convnets import groups

        for name, v in (("every", every), ("steps", steps), ("min_keep", min_keep)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1; got {v!r}")
        _check_variant("yeom", None, step_fraction, min_keep)
        if _kind(model) != "channels":
            raise UnsupportedModelError(
                "IterativeLRP prunes the channels of prunekit's CNNs/MLPs; for ViT heads use lrp_prune"
            )
        self.model, self.batches = model, L._batches(batches)
        self.every, self.steps, self.step_fraction, self.min_keep = every, steps, step_fraction, min_keep
        self.options = (composite, start, abs, normalize)
        widths = {k: g.width for k, g in groups(model).items()}
        self.per_step = int(step_fraction * sum(widths.values()))
        if self.per_step < 1:
            raise ValueError(f"step_fraction={step_fraction} removes no unit of this network per step")
        self.keep = {k: torch.arange(w) for k, w in widths.items()}
        self.events: list[tuple[int, int]] = []
        self.state = "training"
        self._count = 0
        self._masks = None

    def step(self, step: int | None = None) -> bool:
        """Call after each optimiser step (``step``: the number of steps done; default an internal
        count). Returns whether units were masked at this step."""
        if self.state != "training":
            raise PrunekitError(f"IterativeLRP was {self.state}; it prunes no more")
        self._count = self._count + 1 if step is None else int(step)
        if self._count % self.every or len(self.events) >= self.steps:
            return False
        with torch.enable_grad():
            scores = L.lrp_scores(self.model, self.batches, *self.options)
        sub = L._check_scores({k: scores[k][self.keep[k]] for k in self.keep})
        kept = L._drop_least(sub, self.per_step, self.min_keep)
        new = {k: self.keep[k][kept[k]] for k in self.keep}
        removed = sum(len(self.keep[k]) - len(new[k]) for k in new)
        self._remask(new)
        self.events.append((self._count, removed))
        return True

    def _remask(self, keep: dict[str, torch.Tensor]) -> None:
        from ..models.convnets import mask_channels

        if self._masks is not None:
            self._masks.restore()
            self._masks = None
        self.keep = keep
        self._masks = mask_channels(self.model, {k: v for k, v in keep.items()})

    def restore(self) -> None:
        """Remove the masks (the weights stay as trained)."""
        if self._masks is not None:
            self._masks.restore()
            self._masks = None
        if self.state == "training":
            self.state = "restored"

    def finalize(self):
        """Slice the masked units out (returns the :class:`~prunekit.models.convnets.SurgeryReport`)."""
        from ..models.convnets import remove_channels

        if self.state != "training":
            raise PrunekitError(f"IterativeLRP was {self.state}; nothing to finalize")
        if self._masks is not None:
            self._masks.restore()
            self._masks = None
        self.state = "finalized"
        return remove_channels(self.model, self.keep)

    def __enter__(self) -> IterativeLRP:
        return self

    def __exit__(self, *exc) -> None:
        if self.state == "training":
            self.restore()

    # transformers TrainerCallback
    def on_step_end(self, args, state, control, **kwargs):
        if self.state == "training":
            self.step(state.global_step)
        return control


# ------------------------------------------------------------------ the registry entry
@register(
    "lrp",
    family="training",
    paper=(
        "Pruning by Explaining (Yeom et al. 2021); Pruning By Explaining Revisited (PXP, Hatefi et al. 2024)"
    ),
    stages=("after-training",),
    signals=("lrp_relevance@reference_samples",),
    trains=True,
    summary="channels/neurons/heads ranked globally by LRP relevance; PXP one-shot masks, Yeom iterative",
)
@dataclass
class LRP:
    """Pruning by explaining as a registry method: ``LRP(rate=0.3)(model, batches)`` is
    :func:`lrp_prune`. The entry's stage is ``after-training`` (PXP's one-shot step on a trained
    model, the default); Yeom's iterative variant with fine-tuning is ``variant="yeom"`` or, during
    training, :class:`IterativeLRP`. ``trains=True`` as for every method of the family (Yeom's
    fine-tuning, the callback), although PXP's one-shot step itself trains nothing."""

    docs_from: ClassVar[str] = "prunekit.training.lrp_pruning"
    usage: ClassVar[str] = (
        "ref = fashion_batches('train', 1, limit=30)  # a few reference samples with labels\n"
        "rep = prunekit.training.lrp_prune(model, ref, rate=0.3{opts})  # PXP: masked, no fine-tuning\n"
        "rep.finalize()  # slice the masked units out (or rep.restore())\n"
        "# during training (Yeom): sched = IterativeLRP(model, ref, every=100); "
        "train_batches(model, batches, steps=2000, callbacks=[sched]); sched.finalize()"
    )
    taxonomy: ClassVar[dict] = {
        "which": "weights: structured (channels, neurons, heads)",
        "speedup": "universal (smaller dense tensors)",
        "how": "relevance (LRP)",
    }
    rate: float = 0.3
    variant: str = "pxp"
    physical: bool | None = None
    composite: L.Composite | None = None
    step_fraction: float = 0.05
    fine_tune: Callable | None = None
    min_keep: int = 1

    def __call__(self, model: nn.Module, batches=None, **kw) -> LRPReport:
        return lrp_prune(model, batches, **{f.name: getattr(self, f.name) for f in fields(self)}, **kw)


def lrp(model: nn.Module, batches=None, **options) -> LRPReport:
    """``prunekit.training.lrp(model, batches, rate=...)``: the registry's name for :func:`lrp_prune`
    (every option documented there)."""
    return lrp_prune(model, batches, **options)


lrp.__signature__ = inspect.signature(lrp_prune)

__all__ = ["LRP", "VARIANTS", "IterativeLRP", "LRPReport", "lrp", "lrp_prune", "mask_heads", "pxp_scores"]
