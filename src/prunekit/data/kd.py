"""Knowledge distillation on a pruned training set: Ben-Baruch, Botach, Kviatkovsky, Aggarwal and
Medioni, "Distilling the Knowledge in Data Pruning" (ICML 2025, arXiv 2403.07854; Amazon). There
is **no official code** ("our code will be made available"); this follows the spec's reading of the
abstract and the ICLR-2025 reviews (``specs/data-draft.md`` §1).

Prune the training set with any score (:func:`prunekit.prune_data`), then train the student on the
kept subset with the ground-truth cross-entropy **plus** KD from a teacher trained on the *full*
data (Hinton et al.'s objective)::

    L = (1 − α) · CE(y, softmax(z_s)) + α · τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ))

- :func:`kd_loss` is ``L``; the KL term is ``F.kl_div(F.log_softmax(z_s/τ), F.softmax(z_t/τ),
  reduction="batchmean") · τ²`` (summed over classes, averaged over samples). α = 0 is plain
  training on the pruned set, α = 1 pure distillation. Token-level (LM) logits ``(B, T, V)`` are
  flattened and the positions whose label is ``ignore_index`` (-100) are dropped from *both* terms;
  the KL is then averaged over the remaining positions (the per-token analogue of ``batchmean``:
  ``Σ_positions Σ_vocab p·log(p/q) / n_labelled``). This token-level form is ours (the paper is
  about classification). The τ² keeps gradient sizes comparable across τ: at α = 1,
  ``∂L/∂z_s = τ·(q − p)/B`` (``q, p`` the tempered student and teacher softmaxes), which tends to
  the τ-independent centred logit gap ``((z_s − z̄_s) − (z_t − z̄_t))/(C·B)`` as τ grows.
- The paper's finding: the best α grows as the kept fraction f shrinks (small α near f = 1, α
  towards 1 near f = 0.1; α = 0.5 vs 1.0 differ by > 8 points at some f [review of §4.2]). The
  ICML version's "adaptive" α has a closed form that is **unconfirmed**, so ``alpha="auto"``
  (:func:`alpha_for_fraction`) is a *prunekit heuristic*: piecewise-linear in f through the anchors
  ``{1.0: 0.5, 0.5: 0.7, 0.1: 0.9}``, clamped outside them (ours; pass other anchors or a float).
- The temperature is **unconfirmed**. ``tau="auto"`` (:func:`default_tau`, ours) is τ = 4 for more
  than two classes (the Hinton/CRD convention for CIFAR-like 10/100-class tasks) and τ = 2 for two
  classes (binary soft targets flatten fast). For LM vocabularies set τ yourself (τ = 1–2 is usual
  in LM distillation; "auto" would give 4).

Training: :class:`KDTrainer` is a transformers ``Trainer`` (everything else unchanged:
accumulation, mixed precision, accelerate/DDP) whose ``compute_loss`` is :func:`kd_loss`, with the
teacher frozen in eval mode on the student's device, or teacher logits cached by sample index
(:func:`cache_teacher_logits`, :class:`IndexedSubset`): **the cache is valid only without data
augmentation** (with augmentation the teacher must see the same augmented input, so it runs on the
fly). :func:`train_kd` is the same loss in a plain PyTorch loop. ``KDData`` (registry ``kd_data``)
prunes the data and returns a :class:`KDPlan` holding all of it.
"""

from __future__ import annotations

import itertools
import math
import numbers
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..registry import register

#: the ``alpha="auto"`` anchors (kept fraction -> α): a prunekit heuristic, not the paper's formula
AUTO_ALPHA: dict[float, float] = {1.0: 0.5, 0.5: 0.7, 0.1: 0.9}

#: batch keys the KD trainer reads and removes before the student's forward
TEACHER_LOGITS_KEY = "teacher_logits"
INDEX_KEY = "sample_index"


# ------------------------------------------------------------------ α and τ
def _fraction(name: str, f) -> float:
    if isinstance(f, bool) or not isinstance(f, numbers.Real) or math.isnan(f) or not 0 < f <= 1:
        raise ValueError(f"{name} must be a kept fraction in (0, 1]; got {f!r}")
    return float(f)


def alpha_for_fraction(fraction: float, anchors: Mapping[float, float] | None = None) -> float:
    """The KD weight α for a kept fraction ``fraction`` in (0, 1]: piecewise-linear interpolation
    through ``anchors`` (``{kept fraction: α}``, default :data:`AUTO_ALPHA` =
    ``{1.0: 0.5, 0.5: 0.7, 0.1: 0.9}``), clamped to the nearest anchor outside their range.

    A *prunekit heuristic* honouring the paper's finding (the best α grows as the kept fraction
    shrinks); the paper's own adaptive rule is unconfirmed."""
    f = _fraction("fraction", fraction)
    anchors = AUTO_ALPHA if anchors is None else anchors
    if not isinstance(anchors, Mapping) or not anchors:
        raise ValueError(f"anchors must be a non-empty {{kept fraction: alpha}} mapping; got {anchors!r}")
    pts = []
    for k, a in anchors.items():
        _fraction("an anchor's kept fraction", k)
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0 <= a <= 1:
            raise ValueError(f"an anchor's alpha must be in [0, 1]; got {a!r} at fraction {k!r}")
        pts.append((float(k), float(a)))
    pts.sort()
    if f <= pts[0][0]:
        return pts[0][1]
    if f >= pts[-1][0]:
        return pts[-1][1]
    for (f0, a0), (f1, a1) in itertools.pairwise(pts):
        if f0 <= f <= f1:
            return a0 + (a1 - a0) * (f - f0) / (f1 - f0)
    raise AssertionError("unreachable: f lies between the first and last anchors")


def resolve_alpha(alpha: float | str, fraction: float | None = None) -> float:
    """α as a float: a float in [0, 1] is returned as is; ``"auto"`` is
    :func:`alpha_for_fraction` of the kept ``fraction`` (required then)."""
    if isinstance(alpha, str):
        if alpha != "auto":
            raise ValueError(f"alpha must be a float in [0, 1] or 'auto'; got {alpha!r}")
        if fraction is None:
            raise ValueError("alpha='auto' needs the kept fraction (kept_fraction=...) to interpolate from")
        return alpha_for_fraction(fraction)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a float in [0, 1] or 'auto'; got {alpha!r}")
    return float(alpha)


def default_tau(num_classes: int) -> float:
    """τ for ``num_classes`` classes: 2 for two classes (or one), 4 above (ours; unconfirmed)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1; got {num_classes!r}")
    return 2.0 if num_classes <= 2 else 4.0


def resolve_tau(tau: float | str, num_classes: int) -> float:
    """τ as a float: a number > 0 as is; ``"auto"`` is :func:`default_tau` of ``num_classes``."""
    if isinstance(tau, str):
        if tau != "auto":
            raise ValueError(f"tau must be a number > 0 or 'auto'; got {tau!r}")
        return default_tau(num_classes)
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or math.isnan(tau) or not tau > 0:
        raise ValueError(f"tau must be a number > 0 or 'auto'; got {tau!r}")
    return float(tau)


# ------------------------------------------------------------------ the loss
def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor | None,
    teacher_logits: torch.Tensor,
    alpha: float = 0.5,
    tau: float | str = "auto",
    *,
    ignore_index: int = -100,
    shift: bool = False,
) -> torch.Tensor:
    """``(1 − α)·CE(labels, z_s) + α·τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ))``, a scalar.

    ``student_logits`` and ``teacher_logits``: ``(B, C)`` (classification) or ``(B, T, V)``
    (token-level); same shape. ``labels``: ``(B,)`` / ``(B, T)`` int64 class ids, ``ignore_index``
    where there is no target (those positions are left out of both terms); ``None`` only with
    ``alpha=1`` (pure distillation over every position). ``shift=True`` (causal LMs whose labels
    are the input ids, as transformers passes them): logits at ``t`` are matched with labels at
    ``t + 1``. The CE is the mean over labelled positions; the KL is summed over classes and
    averaged over the same positions (``batchmean`` for ``(B, C)``). Both are computed in float32.
    A batch with no labelled position gives a zero loss (still attached to the graph), not NaN.

    ``alpha``: a float in [0, 1] (resolve ``"auto"`` first with :func:`alpha_for_fraction`).
    ``tau``: a number > 0 or ``"auto"`` (:func:`default_tau` of the class count ``C``).
    """
    if not isinstance(student_logits, torch.Tensor) or not isinstance(teacher_logits, torch.Tensor):
        raise ValueError("student_logits and teacher_logits must be tensors")
    if student_logits.dim() < 2:
        raise ValueError(f"logits must be (B, C) or (B, T, V); got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} must have the student's shape "
            f"{tuple(student_logits.shape)}"
        )
    if isinstance(alpha, str):
        raise ValueError(
            f"kd_loss takes alpha as a float in [0, 1]; got {alpha!r}: resolve 'auto' with "
            "alpha_for_fraction(kept_fraction) (KDTrainer and train_kd do it for you)"
        )
    a = resolve_alpha(alpha)
    t = resolve_tau(tau, student_logits.shape[-1])
    if labels is None and a < 1:
        raise ValueError(f"labels=None is only allowed with alpha=1 (pure distillation); got alpha={a}")
    if labels is not None and tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the logits' leading dims "
            f"{tuple(student_logits.shape[:-1])}"
        )
    zs, zt = student_logits, teacher_logits
    if shift:
        if zs.dim() < 3:
            raise ValueError("shift=True is for token-level (B, T, V) logits")
        zs, zt = zs[..., :-1, :], zt[..., :-1, :]  # position t predicts label t + 1
        labels = labels[..., 1:] if labels is not None else None
    C = zs.shape[-1]
    zs, zt = zs.reshape(-1, C), zt.reshape(-1, C)  # (N, C): every sample or position
    if labels is not None:
        y = labels.reshape(-1).to(zs.device)
        keep = y != ignore_index
        if not bool(keep.all()):  # drop unlabelled positions from both terms
            zs, zt, y = zs[keep], zt[keep], y[keep]
    n = zs.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0
    zs, zt = zs.float(), zt.detach().float()
    loss = zs.new_zeros(())
    if a < 1:
        loss = loss + (1 - a) * F.cross_entropy(zs, y)
    if a > 0:
        kl = F.kl_div(F.log_softmax(zs / t, -1), F.softmax(zt / t, -1), reduction="sum") / n
        loss = loss + a * t * t * kl
    return loss


@dataclass
class KDLoss:
    """:func:`kd_loss` with its options bound: ``KDLoss(alpha=0.9, tau=4)(z_s, y, z_t)``. ``alpha``
    may be ``"auto"`` with ``kept_fraction`` (resolved once, here)."""

    alpha: float | str = 0.5
    tau: float | str = "auto"
    kept_fraction: float | None = None
    ignore_index: int = -100
    shift: bool = False

    def __post_init__(self) -> None:
        self.alpha = resolve_alpha(self.alpha, self.kept_fraction)
        if self.tau != "auto":
            self.tau = resolve_tau(self.tau, 2)

    def __call__(self, student_logits, labels, teacher_logits) -> torch.Tensor:
        return kd_loss(
            student_logits, labels, teacher_logits, self.alpha, self.tau,
            ignore_index=self.ignore_index, shift=self.shift,
        )  # fmt: skip


# ------------------------------------------------------------------ data: the kept subset, cached logits
class IndexedSubset(torch.utils.data.Dataset):
    """The kept samples of a map-style ``dataset`` of dicts, each item
    ``{**dataset[i], "sample_index": i}`` (``i`` the index in the *full* dataset), so a
    :class:`KDTrainer` can look up cached teacher logits. ``len(subset) / len(dataset)`` is the kept
    fraction (``kept_fraction``)."""

    def __init__(self, dataset, indices: Sequence[int] | torch.Tensor, key: str = INDEX_KEY) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n = len(dataset)
        if idx.numel() == 0:
            raise ValueError("the kept subset is empty: indices select no sample")
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ValueError(f"indices must lie in [0, {n - 1}] (the dataset has {n} samples)")
        self.dataset, self.indices, self.key = dataset, idx.tolist(), key
        self.kept_fraction = len(self.indices) / n

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        i = self.indices[j]
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise ValueError(
                f"IndexedSubset needs a dataset of dicts (model inputs + labels); item {i} is {type(item)}"
            )
        return {**item, self.key: i}


def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        return out["logits"]
    return out[0]


def _model_inputs(batch: Mapping, drop: Iterable[str]) -> dict:
    return {k: v for k, v in batch.items() if k not in drop}


@torch.no_grad()
def cache_teacher_logits(
    teacher: nn.Module,
    dataset,
    *,
    batch_size: int = 256,
    collate_fn=None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The teacher's logits ``(N, C)`` on every sample of a map-style ``dataset`` of dicts, in
    order (row ``i`` = sample ``i``), in eval mode without gradients (the teacher's mode is restored).
    ``labels`` and ``sample_index`` are not passed to the teacher. Valid as a KD target **only
    without data augmentation** (the cached logits are those of the un-augmented input).
    ``collate_fn``: transformers' ``default_data_collator`` unless given."""
    from transformers import default_data_collator

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    collate = collate_fn or default_data_collator
    dev = torch.device(device) if device is not None else next(teacher.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    was = teacher.training
    teacher.eval()
    out = []
    try:
        for batch in loader:
            inputs = {
                k: v.to(dev) if isinstance(v, torch.Tensor) else v
                for k, v in _model_inputs(batch, ("labels", INDEX_KEY, TEACHER_LOGITS_KEY)).items()
            }
            out.append(_logits(teacher(**inputs)).to("cpu", dtype))
    finally:
        teacher.train(was)
    if not out:
        raise ValueError("the dataset is empty: no teacher logits to cache")
    return torch.cat(out)


def _frozen(teacher: nn.Module, device: torch.device | None) -> nn.Module:
    teacher.eval()
    teacher.requires_grad_(False)
    if device is not None and getattr(teacher, "hf_device_map", None) is None:
        teacher.to(device)
    return teacher


class _KDTargets:
    """Where a batch's teacher logits come from: the batch (``teacher_logits``), a cache indexed by
    ``sample_index``, or the frozen teacher run on the batch's model inputs."""

    def __init__(self, teacher, teacher_logits, index_key: str, alpha: float) -> None:
        if teacher is None and teacher_logits is None and alpha > 0:
            raise ValueError(
                f"KD with alpha={alpha} needs a teacher model or cached teacher_logits (N, C); got neither"
            )
        self.alpha = alpha
        if teacher_logits is not None and not isinstance(teacher_logits, torch.Tensor):
            raise ValueError(
                f"teacher_logits must be a tensor (N, C) indexed by sample; got {type(teacher_logits)}"
            )
        self.teacher, self.cache, self.index_key = teacher, teacher_logits, index_key

    def split(
        self, batch: Mapping
    ) -> tuple[dict, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(model inputs, labels, batch teacher logits or None, sample indices or None)``."""
        inputs = dict(batch)
        given = inputs.pop(TEACHER_LOGITS_KEY, None)
        index = inputs.pop(self.index_key, None)
        labels = inputs.pop("labels", None)
        return inputs, labels, given, index

    def logits(self, inputs: dict, given, index, like: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0:  # plain cross-entropy: the teacher is not consulted
            return like.detach()
        if given is not None:
            return given.to(like.device)
        if self.cache is not None:
            if index is None:
                raise ValueError(
                    f"cached teacher_logits need each batch's sample indices under {self.index_key!r} "
                    "(wrap the kept subset in IndexedSubset)"
                )
            return self.cache[torch.as_tensor(index).to(self.cache.device)].to(like.device)
        if self.teacher is None:
            raise ValueError("no teacher: the batch has no teacher_logits and no cache or teacher was given")
        self.teacher.eval()  # frozen: BN statistics and dropout in inference mode, whatever happened
        with torch.no_grad():
            return _logits(self.teacher(**inputs))


# ------------------------------------------------------------------ the transformers Trainer
class KDTrainer(Trainer):
    """A transformers ``Trainer`` whose loss is :func:`kd_loss`: everything else (optimiser,
    schedule, accumulation, mixed precision, accelerate/DDP, checkpoints) is the ``Trainer``'s.

    ``KDTrainer(model=student, args=args, train_dataset=subset, teacher=teacher, alpha=0.9, tau=4)``.
    Extra options (keyword-only):

    - ``teacher``: the teacher (trained on the full data); frozen (``requires_grad_(False)``), put
      in eval mode at every step and moved to the student's device (unless it has an
      ``hf_device_map``). Called on the batch's model inputs (``labels``, ``sample_index`` and
      ``teacher_logits`` removed).
    - ``teacher_logits``: a cache ``(N, C)`` over the full dataset (:func:`cache_teacher_logits`),
      looked up by each batch's ``sample_index`` (an :class:`IndexedSubset` supplies it); a batch may
      also carry its own ``teacher_logits``. **Only valid without data augmentation.**
    - ``alpha``: a float in [0, 1] or ``"auto"`` (:func:`alpha_for_fraction` of ``kept_fraction``,
      which an :class:`IndexedSubset` train dataset supplies when not given); ``tau``: a number > 0
      or ``"auto"`` (:func:`default_tau`, per the logits' class count).
    - ``shift_labels``: match logits at ``t`` with labels at ``t + 1``; ``None`` follows the
      ``Trainer``'s own rule (causal-LM losses shift).

    The loss is a per-micro-batch mean (the ``Trainer`` divides it by the accumulation steps), so
    with token-level logits and gradient accumulation each micro-batch weighs the same, not each
    token. ``kd_terms`` holds ``alpha`` and ``tau`` as resolved.
    """

    def __init__(
        self,
        *args,
        teacher: nn.Module | None = None,
        teacher_logits: torch.Tensor | None = None,
        alpha: float | str = 0.5,
        tau: float | str = "auto",
        kept_fraction: float | None = None,
        index_key: str = INDEX_KEY,
        shift_labels: bool | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if kept_fraction is None and isinstance(self.train_dataset, IndexedSubset):
            kept_fraction = self.train_dataset.kept_fraction
        self.kd_alpha = resolve_alpha(alpha, kept_fraction)
        self.kd_tau = tau if tau == "auto" else resolve_tau(tau, 2)
        self.kd_kept_fraction = kept_fraction
        self.kd_shift = shift_labels
        device = next(self.model.parameters()).device
        self.kd = _KDTargets(
            _frozen(teacher, device) if teacher is not None else None,
            teacher_logits,
            index_key,
            self.kd_alpha,
        )
        # our loss is a per-micro-batch mean: the Trainer must divide it by the accumulation steps
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False

    @property
    def kd_terms(self) -> dict:
        return {"alpha": self.kd_alpha, "tau": self.kd_tau, "kept_fraction": self.kd_kept_fraction}

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # keep our keys when unused columns are removed
        for k in (TEACHER_LOGITS_KEY, self.kd.index_key):
            if k not in self._signature_columns:
                self._signature_columns.append(k)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs, labels, given, index = self.kd.split(inputs)
        outputs = model(**inputs)
        z_s = _logits(outputs)
        z_t = self.kd.logits(inputs, given, index, z_s)
        shift = (
            self.kd_shift if self.kd_shift is not None else bool(getattr(self, "_loss_shifts_labels", False))
        )
        loss = kd_loss(z_s, labels, z_t, self.kd_alpha, self.kd_tau, shift=shift)
        return (loss, outputs) if return_outputs else loss


# ------------------------------------------------------------------ a plain loop
@dataclass
class KDTrainResult:
    """What :func:`train_kd` did: ``losses`` per step, the resolved ``alpha`` and ``tau``."""

    steps: int
    alpha: float
    tau: float | str
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def train_kd(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: Iterable[Mapping],
    *,
    epochs: int = 1,
    alpha: float | str = 0.5,
    tau: float | str = "auto",
    kept_fraction: float | None = None,
    teacher_logits: torch.Tensor | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    schedule: str = "linear",
    max_grad_norm: float | None = None,
    index_key: str = INDEX_KEY,
    shift: bool = False,
    progress: bool = False,
) -> KDTrainResult:
    """Train ``student`` with :func:`kd_loss` in a plain PyTorch loop: AdamW (``lr``,
    ``weight_decay``), ``schedule`` ``"linear"`` (decay to 0 over all steps, as the ``Trainer``'s
    default) or ``"constant"``, optional gradient-norm clipping; ``epochs`` passes over ``batches``
    (a re-iterable of dicts: model inputs, ``labels``, and ``sample_index`` when ``teacher_logits``
    is a cache; a ``DataLoader`` with ``shuffle=True`` and a seeded generator reshuffles each pass).

    The teacher logits come as in :class:`KDTrainer` (a batch's own ``teacher_logits``, the cache by
    ``sample_index``, or ``teacher`` frozen in eval mode); ``alpha="auto"`` needs ``kept_fraction``;
    ``alpha=0`` is plain cross-entropy training and needs no teacher.
    The student is left in train mode."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1; got {epochs!r}")
    if schedule not in ("linear", "constant"):
        raise ValueError(f"schedule must be 'linear' or 'constant'; got {schedule!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr!r}")
    a = resolve_alpha(alpha, kept_fraction)
    t = tau if tau == "auto" else resolve_tau(tau, 2)
    device = next(student.parameters()).device
    kd = _KDTargets(_frozen(teacher, device) if teacher is not None else None, teacher_logits, index_key, a)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameter (requires_grad=True)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        per_epoch = len(batches)  # type: ignore[arg-type]
    except TypeError:
        per_epoch = None
    total = per_epoch * epochs if per_epoch else None
    if schedule == "linear" and not total:
        raise ValueError("schedule='linear' needs batches with a len(); use schedule='constant'")
    lam = (lambda s: max(0.0, (total - s) / total)) if schedule == "linear" else (lambda s: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"KD training (alpha={a:.2f})", unit="step", leave=False)
    losses: list[float] = []
    student.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in batches:
            batch = {
                k: v.to(device) if isinstance(v, torch.Tensor) and k != index_key else v
                for k, v in batch.items()
            }
            inputs, labels, given, index = kd.split(batch)
            z_s = _logits(student(**inputs))
            z_t = kd.logits(inputs, given, index, z_s)
            loss = kd_loss(z_s, labels, z_t, a, t, shift=shift)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return KDTrainResult(steps=len(losses), alpha=a, tau=t, losses=losses, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------ the registry method
@dataclass
class KDPlan:
    """What ``KDData`` returns: the pruning ``report`` (a :class:`~prunekit.data.DataPruneReport`),
    the kept ``subset`` (an :class:`IndexedSubset`: each item carries its ``sample_index``), the
    resolved ``alpha`` (``"auto"`` → :func:`alpha_for_fraction` of ``kept_fraction``) and ``tau``,
    and the teacher or its cached logits. Train with :meth:`trainer` (a transformers
    :class:`KDTrainer`), :meth:`train` (a plain loop) or :meth:`loss` in your own loop."""

    report: object
    subset: IndexedSubset
    alpha: float
    tau: float | str
    kept_fraction: float
    teacher: nn.Module | None = None
    teacher_logits: torch.Tensor | None = None

    def loss(self) -> KDLoss:
        """:func:`kd_loss` with this plan's α and τ bound."""
        return KDLoss(alpha=self.alpha, tau=self.tau)

    def trainer(self, student: nn.Module, args, **kwargs) -> KDTrainer:
        """A :class:`KDTrainer` on the kept subset (``args``: ``TrainingArguments``; ``kwargs`` go to
        the ``Trainer``, e.g. ``data_collator``)."""
        return KDTrainer(
            model=student, args=args, train_dataset=self.subset, teacher=self.teacher,
            teacher_logits=self.teacher_logits, alpha=self.alpha, tau=self.tau,
            kept_fraction=self.kept_fraction, **kwargs,
        )  # fmt: skip

    def train(
        self,
        student: nn.Module,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        collate_fn=None,
        **kw,
    ) -> KDTrainResult:
        """:func:`train_kd` over the kept subset in a shuffled order seeded by ``seed`` (``collate_fn``:
        transformers' ``default_data_collator`` unless given; ``kw``: ``lr``, ``schedule``, ...)."""
        from transformers import default_data_collator

        loader = torch.utils.data.DataLoader(
            self.subset, batch_size=batch_size, shuffle=True, collate_fn=collate_fn or default_data_collator,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        return train_kd(
            student, self.teacher, loader, epochs=epochs, alpha=self.alpha, tau=self.tau,
            teacher_logits=self.teacher_logits, **kw,
        )  # fmt: skip


@register(
    "kd_data",
    family="data",
    paper="Distilling the Knowledge in Data Pruning",
    stages=("before-training",),
    signals=("teacher_logits", "labels"),
    trains=True,
    summary="prune with any score, then train on the kept subset with KD from a full-data teacher",
)
@dataclass
class KDData:
    """Data pruning followed by KD (Ben-Baruch et al., ICML 2025), as a registry method:
    ``KDData(score="random_data", alpha="auto")(dataset, keep=0.3, teacher=teacher)`` prunes
    ``dataset`` with the data method ``score`` (:func:`prunekit.prune_data`) and returns a
    :class:`KDPlan` to train the student on the kept subset with :func:`kd_loss`. The budget ``keep`` is
    an argument of the call (a fraction in (0, 1] or a count), not an option. Through
    ``prunekit.prune_data(dataset, "kd_data", keep, score=..., ...)`` it selects exactly as its
    ``score`` method does (the KD part happens in training)."""

    docs_from: ClassVar[str] = "prunekit.data.kd"
    usage: ClassVar[str] = (
        'kd = prunekit.data.KDData(score="random_data", alpha="auto"{opts})\n'
        "plan = kd(dataset, keep=0.3, teacher=teacher)  # teacher: trained on 100 %; alpha 'auto' -> 0.8\n"
        "trainer = plan.trainer(student, TrainingArguments(...))  # a transformers Trainer with the KD loss\n"
        "trainer.train()  # or plan.train(student, epochs=...), or plan.loss() in your own loop"
    )
    taxonomy: ClassVar[dict] = {
        "how": "any score (random by default), then knowledge distillation from a full-data teacher"
    }
    score: str = "random_data"  # the data method that selects (random_data, el2n, grand, forgetting, entropy)
    alpha: float | str = "auto"  # KD weight in [0, 1], or 'auto' (a prunekit heuristic of the kept fraction)
    tau: float | str = "auto"  # temperature > 0, or 'auto': 2 for two classes, 4 above (unconfirmed)
    balance: bool = False  # per-class selection by the score (DeepCore's balance=True)

    def __post_init__(self) -> None:
        from ..registry import get

        info = get(self.score, "data")
        if info.family != "data" or info.factory is type(self):
            names = ", ".join(m.name for m in _data_methods() if m.factory is not type(self))
            raise ValueError(
                f"score must be a data method that selects samples ({names}); got {self.score!r}"
            )
        self.score = info.name
        if isinstance(self.alpha, str):
            resolve_alpha(self.alpha, 1.0)  # checks the spelling; the fraction comes with the call
        else:
            self.alpha = resolve_alpha(self.alpha)
        if self.tau != "auto":
            self.tau = resolve_tau(self.tau, 2)

    def _selector(self):
        from ..registry import instantiate

        return instantiate(self.score, "data", {"balance": self.balance}, "kd_data")

    @property
    def uses(self) -> tuple[str, ...]:  # what prune_data may hand the selecting method
        return self._selector().uses

    def select(self, inp, keep, seed: int):
        """``prune_data``'s hook: select as the ``score`` method does."""
        return self._selector().select(inp, keep, seed)

    def __call__(
        self,
        dataset,
        keep: int | float,
        *,
        teacher: nn.Module | None = None,
        teacher_logits: torch.Tensor | None = None,
        cache: bool = False,
        model=None,
        seed: int = 0,
        **prune_kw,
    ) -> KDPlan:
        """Prune ``dataset`` (a map-style dataset of dicts: model inputs and ``labels``) to ``keep``
        with ``score`` (``model`` and ``prune_kw``: :func:`prunekit.prune_data`'s arguments, e.g.
        ``logits=``, ``correct=``), then plan KD from ``teacher`` (trained on the full data), or from
        ``teacher_logits`` ``(N, C)`` cached over the full dataset. ``cache=True`` computes that cache
        now for the kept samples (:func:`cache_teacher_logits`; **only valid without data
        augmentation**). ``alpha=0`` needs no teacher."""
        from .prune import prune_data

        report = prune_data(dataset, self.score, keep, model, seed, balance=self.balance, **prune_kw)
        subset = IndexedSubset(dataset, report.indices)
        alpha = resolve_alpha(self.alpha, subset.kept_fraction)
        if alpha > 0 and teacher is None and teacher_logits is None:
            raise ValueError(
                f"KD with alpha={alpha:g} needs teacher= (trained on the full data) or teacher_logits="
            )
        if cache and teacher is not None and teacher_logits is None and alpha > 0:
            kept = cache_teacher_logits(teacher, _Unindexed(subset))  # (k, C), in the subset's order
            teacher_logits = kept.new_zeros(len(dataset), *kept.shape[1:])
            teacher_logits[report.indices] = kept  # rows of pruned samples stay 0: never looked up
        return KDPlan(
            report=report, subset=subset, alpha=alpha, tau=self.tau, kept_fraction=subset.kept_fraction,
            teacher=teacher, teacher_logits=teacher_logits,
        )  # fmt: skip


class _Unindexed(torch.utils.data.Dataset):
    """The subset's items without ``sample_index`` (what the teacher sees)."""

    def __init__(self, subset: IndexedSubset) -> None:
        self.subset = subset

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, j: int) -> dict:
        item = dict(self.subset[j])
        item.pop(self.subset.key, None)
        return item


def _data_methods():
    from ..registry import methods

    return methods("data")


__all__ = [
    "AUTO_ALPHA",
    "IndexedSubset",
    "KDData",
    "KDLoss",
    "KDPlan",
    "KDTrainResult",
    "KDTrainer",
    "alpha_for_fraction",
    "cache_teacher_logits",
    "default_tau",
    "kd_loss",
    "resolve_alpha",
    "resolve_tau",
    "train_kd",
]
