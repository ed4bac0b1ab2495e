"""SAP: Sparsity-informed Adaptive Pruning driven by the PQ Index, with lottery-ticket rewinding
(Diao et al., "Pruning Deep Neural Networks from a Sparsity Perspective", ICLR 2023, arXiv
2302.05601). Spec ``training-aware.md`` §6; official code diaoenmao/Pruning-Deep-Neural-Networks-
from-a-Sparsity-Perspective (``src/train_classifier.py``, ``src/modules/compression.py``).

The loop (official ``runExperiment``), for ``iteration = 0 … T``:

1. **rewind** (official ``Compression.init``): every prunable weight (name ending in ``weight``,
   ``dim > 1``: :func:`~prunekit.training.sparsity_index.pqi_weights`) becomes ``mask ⊙ θ₀``;
   every other parameter (biases, norms) is reset to θ₀ too. Buffers (BN running statistics) are
   not reset, as in the official code, which resets ``named_parameters`` only;
2. **train** with the masked gradients zeroed after clipping and before the optimiser step
   (official ``mask.freeze_grad`` after ``clip_grad_norm_``; :class:`SAPCallback`, a
   ``transformers.TrainerCallback`` that a plain loop calls as :meth:`SAPCallback.zero_masked_grads`);
3. pick a checkpoint (see below);
4. if ``iteration < T``: **PQI and prune** (:func:`sap_step`): ``si-p-q-η-γ`` is SAP's adaptive
   count (:func:`~prunekit.training.sparsity_index.sap_prune_step`); ``lt-r`` is the lottery
   ticket (prune the fraction ``r`` of the surviving weights by magnitude every iteration);
   ``os-r`` is the same rate ranked by a fixed reference state (see :func:`sap_step`).

So ``T`` prune steps and ``T + 1`` trainings; the report has one row per training.

Departures and choices (each documented where it happens):

- **Checkpoint selection.** The official code keeps the epoch with the best **test** accuracy and
  prunes that checkpoint (a quirk: model selection on the test set). Default here: the last
  checkpoint, or, given ``val_batches``, the best on that validation split (checked every
  ``select_every`` steps). ``faithful=True`` keeps the official choice (selection on
  ``eval_batches``, the test batches).
- **Optimiser.** The driver trains with :func:`~prunekit.training.train_batches` (the transformers
  ``Trainer``: AdamW, a linear or ``lr_scheduler_type`` schedule, grad-norm clipping 1 as the
  official code), not the official SGD (lr 0.1, momentum 0.9, Nesterov, wd 5e-4, cosine, 200
  epochs). A fresh optimiser every iteration, as the official code. AdamW's moments start at 0
  and the masked gradients are 0, so pruned weights stay exactly 0 (decoupled weight decay keeps a
  zero at zero).
- **os-r**: the spec says "ranked by the first trained model's weights"; the official code loads
  ``model_state_dict[0]``, which is the state saved **before** any training (θ₀), and ranks by it.
  ``os_reference="init"`` (default) follows the code; ``"first-trained"`` follows the spec's words.
- **lt-r / os-r pivot**: the official ``np.quantile`` / ``torch.quantile`` (linear interpolation) of
  the surviving magnitudes at ``r``, pruning every ``|w| < pivot`` (strict).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers import TrainerCallback

from ..registry import register
from .loop import train_batches
from .sparsity_index import SCOPES, parse_prune_mode, pq_index, pqi_weights, sap_prune_step

OS_REFERENCES = ("init", "first-trained")


def _check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}")
    return scope


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
        raise ValueError(f"beta (the largest fraction pruned in one step) must be in [0, 1); got {beta!r}")
    return float(beta)


def dense_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """All-True boolean masks for every prunable weight of ``model`` (the official pick:
    :func:`~prunekit.training.sparsity_index.pqi_weights`)."""
    weights = pqi_weights(model)
    if not weights:
        raise ValueError("the model has no parameter named '*weight*' with dim > 1 (Linear, Conv, Embedding)")
    return {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}


def _check_masks(model: nn.Module, masks) -> dict[str, torch.Tensor]:
    weights = pqi_weights(model)
    if masks is None:
        return dense_masks(model)
    if not isinstance(masks, Mapping):
        raise ValueError(f"masks must be a dict parameter name -> bool tensor; got {type(masks).__name__}")
    if set(masks) != set(weights):
        missing, extra = sorted(set(weights) - set(masks)), sorted(set(masks) - set(weights))
        raise ValueError(f"masks must cover exactly the prunable weights; missing {missing}, unknown {extra}")
    out = {}
    for n, w in weights.items():
        m = masks[n]
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(w.shape):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"masks[{n!r}] has shape {shape}; the weight has shape {tuple(w.shape)}")
        out[n] = m.to(device=w.device, dtype=torch.bool)
    return out


def _quantile_pivot(sorted_vals: torch.Tensor, d: torch.Tensor, ratio: float) -> torch.Tensor:
    """Linear-interpolation quantile (numpy's default) of the first ``d`` values of each row of
    ``sorted_vals`` (ascending; rows with ``d = 0`` give NaN)."""
    pos = ratio * (d.to(torch.float64) - 1)  # (rows,)
    lo = pos.floor().clamp(min=0).long()
    hi = (lo + 1).clamp(max=(d - 1).clamp(min=0).long())
    frac = (pos - lo).to(sorted_vals.dtype)
    v_lo = sorted_vals.gather(1, lo.view(-1, 1)).squeeze(1)
    v_hi = sorted_vals.gather(1, hi.view(-1, 1)).squeeze(1)
    pivot = v_lo + frac * (v_hi - v_lo)
    return torch.where(d > 0, pivot, torch.full_like(pivot, math.nan))


def _rate_prune(values: dict, masks: dict, ratio: float, scope: str) -> dict[str, torch.Tensor]:
    """Official ``lt`` / ``os``: per scope, pivot = quantile(surviving |values|, ratio), prune every
    surviving ``|value| < pivot``."""
    new = {}
    if scope == "global":
        vals = torch.cat([values[n].abs()[masks[n]].reshape(-1).double() for n in masks])
        d = torch.tensor([vals.numel()])
        if vals.numel() == 0:
            return {n: m.clone() for n, m in masks.items()}
        pivot = _quantile_pivot(vals.sort().values.view(1, -1), d, ratio)[0]
        return {n: m & ~(values[n].abs().double() < pivot) for n, m in masks.items()}
    for n, m in masks.items():
        a = values[n].abs().double()
        if scope == "layer":
            rows, rm = a.reshape(1, -1), m.reshape(1, -1)
        else:
            rows, rm = a.reshape(a.shape[0], -1), m.reshape(m.shape[0], -1)
        keyed = torch.where(rm, rows, torch.full_like(rows, math.nan)).sort(dim=1).values  # NaN last
        pivot = _quantile_pivot(keyed, rm.sum(1), ratio).view(-1, 1)
        new[n] = m & ~(rows < pivot).view_as(m)  # NaN pivot (an empty row): nothing below it
    return new


def sap_step(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None = None,
    mode: str = "si-0.5-1-0-1",
    *,
    scope: str = "global",
    beta: float = 0.9,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One pruning step of SAP or a baseline on ``model``'s prunable weights (official
    ``Compression.compress``): returns the new boolean masks ``{name: mask}`` (True = kept) and
    zeroes the newly pruned weights in place, as the official code does.

    ``masks``: the current masks (``None``: dense). ``mode`` (official ``prune_mode``):
    ``si-p-q-η-γ`` (SAP, :func:`~prunekit.training.sparsity_index.sap_prune_step` with
    ``beta``), ``lt-r`` (prune the fraction ``r`` of the surviving weights by magnitude) or
    ``os-r`` (the same rate, ranked by ``reference``'s magnitudes: a state ``{name: tensor}``
    covering the prunable weights; required for ``os``). ``scope``: ``global`` (the paper's main
    runs), ``layer`` or ``neuron``.
    """
    pm = parse_prune_mode(mode)
    _check_scope(scope)
    beta = _check_beta(beta)
    weights = pqi_weights(model)
    masks = _check_masks(model, masks)
    with torch.no_grad():
        if pm.kind == "si":
            new = sap_prune_step(
                weights, masks, p=pm.p, q=pm.q, eta=pm.eta, gamma=pm.gamma, beta=beta, scope=scope
            )
        else:
            if pm.kind == "os":
                if reference is None:
                    raise ValueError(f"mode {mode!r} ranks by a reference state: pass reference={{name: w}}")
                missing = sorted(set(weights) - set(reference))
                if missing:
                    raise ValueError(f"reference lacks the prunable weights {missing}")
                values = {n: reference[n].detach().to(weights[n].device) for n in weights}
            else:
                values = {n: w.detach() for n, w in weights.items()}
            new = _rate_prune(values, masks, pm.ratio, scope)
        for n, w in weights.items():
            w.mul_(new[n].to(w.dtype))
    return new


class SAPCallback(TrainerCallback):
    """The training side of SAP on one model: it holds θ₀ (a copy of the parameters when it is
    built, or ``init_state``) and the current masks (all True at first), and

    - :meth:`rewind` sets every prunable weight to ``mask ⊙ θ₀`` and every other parameter to θ₀;
    - as a ``transformers.TrainerCallback`` it zeroes the masked gradients at
      ``on_pre_optimizer_step`` (after the ``Trainer``'s gradient clipping, as the official code);
      in a plain loop call :meth:`zero_masked_grads` between ``backward()`` (and any clipping) and
      ``optimizer.step()``;
    - :meth:`prune` runs :func:`sap_step` and keeps the new masks.

    Usable with any optimiser whose update of a zero-gradient, zero-state entry is 0 (SGD with
    momentum, Adam, AdamW with decoupled weight decay), so pruned weights stay exactly 0."""

    def __init__(
        self,
        model: nn.Module,
        mode: str = "si-0.5-1-0-1",
        *,
        masks: Mapping[str, torch.Tensor] | None = None,
        init_state: Mapping[str, torch.Tensor] | None = None,
        scope: str = "global",
        beta: float = 0.9,
    ) -> None:
        parse_prune_mode(mode)
        self.model, self.mode = model, mode
        self.scope, self.beta = _check_scope(scope), _check_beta(beta)
        self.masks = _check_masks(model, masks)
        params = dict(model.named_parameters())
        if init_state is None:
            init_state = {n: p.detach().clone() for n, p in params.items()}
        missing = sorted(set(params) - set(init_state))
        if missing:
            raise ValueError(f"init_state lacks the parameters {missing}")
        self.init_state = {n: init_state[n].detach().clone() for n in params}

    @torch.no_grad()
    def rewind(self) -> None:
        """Official ``Compression.init``: prunable weights ``mask ⊙ θ₀``, other parameters θ₀."""
        for n, p in self.model.named_parameters():
            init = self.init_state[n].to(p)
            p.copy_(torch.where(self.masks[n], init, torch.zeros_like(init)) if n in self.masks else init)

    @torch.no_grad()
    def zero_masked_grads(self) -> None:
        """Official ``mask.freeze_grad``: multiply each prunable weight's gradient by its mask."""
        for n, p in self.model.named_parameters():
            if n in self.masks and p.grad is not None:
                p.grad.mul_(self.masks[n].to(p.grad.dtype))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.zero_masked_grads()

    def prune(self, reference: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """:func:`sap_step` on the model with the current masks; the new masks are kept and returned
        (the newly pruned weights are zeroed)."""
        self.masks = sap_step(
            self.model, self.masks, self.mode, scope=self.scope, beta=self.beta, reference=reference
        )
        return self.masks

    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))


def batch_accuracy(model: nn.Module, batches: Sequence[dict]) -> float:
    """Top-1 accuracy of a classifier returning ``.logits`` on labelled batches, in eval mode
    without gradients (the model's mode is restored)."""
    was, correct, total = model.training, 0, 0
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            for b in batches:
                inputs = {k: v.to(device) for k, v in b.items() if k != "labels"}
                logits = model(**inputs).logits
                correct += int((logits.argmax(-1).cpu() == b["labels"].cpu()).sum())
                total += len(b["labels"])
    finally:
        model.train(was)
    if total == 0:
        raise ValueError("no labelled example in the evaluation batches")
    return correct / total


class _Select(TrainerCallback):
    """Keeps the parameters of the best-scoring step (every ``every`` steps and at the end)."""

    def __init__(self, model: nn.Module, batches: Sequence[dict], every: int) -> None:
        self.model, self.batches, self.every = model, batches, every
        self.best, self.state, self.step = -1.0, None, -1

    def _check(self, step: int) -> None:
        acc = batch_accuracy(self.model, self.batches)
        if acc > self.best:  # the official Metric.compare: strictly better
            self.best, self.step = acc, step
            self.state = copy.deepcopy(self.model.state_dict())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._check(state.global_step)


@dataclass
class SAPReport:
    """What :func:`sap` did: ``rows`` one dict per training iteration (``iteration``, ``kept``
    prunable weights, ``fraction`` of the dense count, ``pqi`` (global ``I_{p,q}`` of the selected
    checkpoint's surviving weights, p and q of the mode, or ``pqi_pq`` for lt/os), ``accuracy`` on
    ``eval_batches`` (None without), ``selected_step``, ``train_loss`` (mean of the last 10 steps),
    ``seconds``); ``masks`` the final masks; ``dense`` the dense prunable-weight count."""

    mode: str
    scope: str
    selection: str
    dense: int
    rows: list[dict] = field(default_factory=list)
    masks: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("masks")
        return d


def sap(
    model: nn.Module,
    batches: Sequence[dict],
    *,
    mode: str = "si-0.5-1-0-1",
    iterations: int = 10,
    steps_per_iteration: int = 100,
    lr: float = 1e-3,
    scope: str = "global",
    beta: float = 0.9,
    eval_batches: Sequence[dict] | None = None,
    val_batches: Sequence[dict] | None = None,
    select_every: int | None = None,
    faithful: bool = False,
    os_reference: str = "init",
    pqi_pq: tuple[float, float] = (0.5, 1.0),
    seed: int = 0,
    progress: bool = False,
    **train_options,
) -> SAPReport:
    """SAP (Diao et al., ICLR 2023) or its baselines on ``model`` (any classifier whose
    ``forward(**batch)`` returns ``.loss`` and ``.logits``, e.g. :class:`prunekit.models.convnets.MLP`):
    ``iterations`` (T) prune steps between ``T + 1`` trainings of ``steps_per_iteration`` optimiser
    steps each on ``batches`` (in order, cycled) with :func:`~prunekit.training.train_batches`,
    every training starting from the rewound θ₀ (the model's state on entry). See the module
    docstring for the loop and the departures.

    ``mode``: ``si-p-q-η-γ`` (default ``si-0.5-1-0-1``, the official config), ``lt-r`` or ``os-r``.
    Checkpoint selection: the last step by default; with ``val_batches`` the best validation
    accuracy (every ``select_every`` steps, default ``len(batches)``: once per pass, and at the
    end); ``faithful=True`` selects on ``eval_batches`` as the official code does (test accuracy:
    a quirk). ``os_reference``: ``"init"`` (θ₀, the official code) or ``"first-trained"`` (the
    selected checkpoint of iteration 0, the spec's wording). ``train_options`` go to
    ``train_batches`` (``weight_decay``, ``lr_scheduler_type``, ``max_grad_norm``, ...).

    On return the model holds the last selected checkpoint, its pruned weights zero; the masks are
    ``report.masks``.
    """
    pm = parse_prune_mode(mode)
    for name, v, lo in (("iterations", iterations, 0), ("steps_per_iteration", steps_per_iteration, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
    if os_reference not in OS_REFERENCES:
        raise ValueError(f"os_reference must be one of {OS_REFERENCES}; got {os_reference!r}")
    if not batches:
        raise ValueError("sap needs at least one training batch")
    if faithful and not eval_batches:
        raise ValueError("faithful=True selects the checkpoint on eval_batches (the official test-set quirk)")
    if faithful and val_batches:
        raise ValueError("faithful=True selects on eval_batches; do not pass val_batches too")
    if select_every is not None and (
        isinstance(select_every, bool) or not isinstance(select_every, int) or select_every < 1
    ):
        raise ValueError(f"select_every must be None or an int >= 1; got {select_every!r}")
    p_q = (pm.p, pm.q) if pm.kind == "si" else tuple(pqi_pq)
    select_on = eval_batches if faithful else val_batches
    selection = "test (faithful)" if faithful else ("validation" if val_batches else "last")
    cb = SAPCallback(model, mode, scope=scope, beta=beta)
    report = SAPReport(mode=mode, scope=scope, selection=selection, dense=cb.kept())
    reference = cb.init_state if pm.kind == "os" and os_reference == "init" else None
    for it in range(iterations + 1):
        t0 = time.perf_counter()
        cb.rewind()
        callbacks = [cb]
        sel = None
        if select_on:
            sel = _Select(model, select_on, select_every or len(batches))
            callbacks.append(sel)
        res = train_batches(
            model, batches, steps=steps_per_iteration, lr=lr, seed=seed, callbacks=callbacks,
            progress=progress, **train_options,
        )  # fmt: skip
        if sel is not None:
            model.load_state_dict(sel.state)
        weights = pqi_weights(model)
        with torch.no_grad():
            pqi = float(pq_index(weights, p_q[0], p_q[1], cb.masks, scope="global"))
        row = {
            "iteration": it,
            "kept": cb.kept(),
            "fraction": cb.kept() / report.dense,
            "pqi": pqi,
            "accuracy": batch_accuracy(model, eval_batches) if eval_batches else None,
            "selected_step": sel.step if sel is not None else res.steps,
            "train_loss": sum(res.losses[-10:]) / max(1, len(res.losses[-10:])),
        }
        if pm.kind == "os" and os_reference == "first-trained" and reference is None:
            reference = {n: w.detach().clone() for n, w in weights.items()}
        if it < iterations:
            cb.prune(reference=reference)
            row["pruned_next"] = row["kept"] - cb.kept()
        row["seconds"] = time.perf_counter() - t0
        report.rows.append(row)
    report.masks = {n: m.clone() for n, m in cb.masks.items()}
    # the last iteration trains at the final masks and does not prune (official: iter == T)
    return report


@register(
    "sap",
    family="training",
    paper="Pruning Deep Neural Networks from a Sparsity Perspective (PQ Index, SAP)",
    stages=("during-training",),
    signals=("pq_index (global)", "weight_magnitude"),
    trains=True,
    summary="iterative magnitude pruning with rewinding, the step size set by the PQ index",
)
@dataclass
class SAP:
    """SAP's options as a registry method: ``SAP(iterations=10)(model, batches)`` is :func:`sap`
    (the loop, the baselines ``lt-r`` / ``os-r`` and the departures are documented there)."""

    docs_from: ClassVar[str] = "prunekit.training.sap"
    taxonomy: ClassVar[dict] = {
        "which": "weights: unstructured (masks)",
        "speedup": "none without a sparse kernel (masks; fewer non-zero weights)",
        "how": "iterative train-prune-rewind; the prune count from the PQ index of the trained weights",
    }
    mode: str = "si-0.5-1-0-1"  # si-p-q-eta-gamma (SAP), lt-r (lottery ticket) or os-r (one-shot ranking)
    iterations: int = 10  # T prune steps between T + 1 trainings
    steps_per_iteration: int = 100  # optimiser steps per training
    lr: float = 1e-3  # AdamW (the Trainer's), not the official SGD 0.1
    scope: str = "global"  # global, layer or neuron
    beta: float = 0.9  # the largest fraction pruned in one SAP step
    faithful: bool = False  # True: select the checkpoint on the test batches, as the official code
    os_reference: str = "init"  # os-r ranks by θ₀ (the official code) or "first-trained"
    seed: int = 0

    def __call__(self, model: nn.Module, batches, **kw) -> SAPReport:
        return sap(model, batches, **asdict(self), **kw)
