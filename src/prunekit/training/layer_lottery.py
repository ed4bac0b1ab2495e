"""Layers-Lottery: residual blocks scored at initialisation and removed before training.

Jordao et al., "When Layers Play the Lottery, all Tickets Win at Initialization" (ICCV 2023
workshops, arXiv 2301.10835), Algorithm 2; **no official code** (spec ``training-aware.md`` §9):

1. ``S ← c(F, θ₀)``: per-weight SNIP (``|g⊙w|``) or GraSP (``−w⊙Hg``) scores on one labelled batch
   (:mod:`prunekit.training.init_scores`), reduced to **one score per residual block**;
2. ``I ←`` the ``p`` least important blocks (a "layer" is one residual block, two convs);
3. ``F' ← F \\ I`` **rebuilt physically**: a network with ``L − p`` blocks that inherits the kept
   blocks' θ₀ (here: a deep copy of ``model`` with the blocks deleted,
   :func:`~prunekit.models.convnets.remove_blocks`; every kept tensor is the dense one, bit for bit);
4. train ``F'`` normally (any loop, or :func:`~prunekit.training.precrop.train_network`).

Only residual networks qualify, and blocks whose shortcut changes the shape (the first block of a
down-sampling stage) cannot be removed [paper A.1]: prunekit's
:class:`~prunekit.models.convnets.ResNetLite`; anything else is refused.

Unconfirmed, *ours* (the paper does not say): the block score is the **mean** of its scored
weights' per-weight scores (``reduce="mean"``, following the author's other layer criteria, which
average per-unit scores; ``"sum"`` offered); for SNIP the least important block has the
**lowest** mean, for GraSP the **highest** (GraSP removes the weights with the highest
``−θ⊙Hg``). ``per_stage_norm=True`` (not in the paper, *ours*) divides each block's score by the
mean absolute score of its stage's blocks before ranking, so blocks are compared within the scale
of their stage (the paper notes ℓ1 layer scores are biased by stage [A.2]). The scored weights of
a block are its two convolutions (a removable block has no shortcut conv).

**One-shot step, no callback**: the result is a different network (fewer modules), which a
``TrainerCallback`` cannot swap in once the ``Trainer`` has built its optimizer; the function is
the method's step in any training loop (see :func:`layer_lottery_and_train`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from torch import nn

from ..errors import UnsupportedModelError
from ..models import convnets as C
from ..registry import register
from . import init_scores as S
from .precrop import _flops_shape, _split_batch, train_network

#: the criteria Layers-Lottery uses (Alg. 2: "c = SNIP or GraSP"); looked up at call time
SCORES = {"snip": S.snip, "grasp": S.grasp}


@dataclass
class LotteryReport:
    """What :func:`layer_lottery` did: ``scores`` per block (``block.s.b``; removable ones only
    unless ``all_scores``), the ``removed`` blocks in order of least importance, the ``direction``
    (``"lowest"`` or ``"highest"`` scores are least important), parameters and per-sample
    multiply-accumulates before and after."""

    score: str
    reduce: str
    per_stage_norm: bool
    direction: str
    scores: dict[str, float] = field(default_factory=dict)
    raw_scores: dict[str, float] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _stage_normalised(raw: dict[str, float], stage_of: dict[str, int]) -> dict[str, float]:
    out = {}
    for b, v in raw.items():
        peers = [abs(raw[o]) for o in raw if stage_of[o] == stage_of[b]]
        scale = sum(peers) / len(peers)
        out[b] = v / scale if scale > 0 else 0.0
    return out


def layer_lottery(
    model: nn.Module,
    batch,
    *,
    remove: int = 1,
    score: str = "grasp",
    reduce: str = "mean",
    per_stage_norm: bool = False,
) -> tuple[nn.Module, LotteryReport]:
    """Layers-Lottery (Jordao et al., Alg. 2; no official code, see the module docstring for what
    is *ours*): score ``model``'s residual blocks at θ₀ with ``score`` (``"grasp"`` or ``"snip"``)
    on ``batch`` (``{"pixel_values": x, "labels": y}`` or ``(x, y)``), and return a new network
    without the ``remove`` least important **removable** blocks, every kept tensor equal to the
    dense model's, and a :class:`LotteryReport`. ``model`` is left unchanged.

    Raises ``UnsupportedModelError`` for a network without removable residual blocks (an MLP, a
    plain CNN, anything that is not a :class:`~prunekit.models.convnets.ResNetLite`), and
    ``ValueError`` when ``remove`` is not in ``[0, number of removable blocks]``."""
    if not isinstance(model, C.ResNetLite):
        raise UnsupportedModelError(
            f"Layers-Lottery removes residual blocks: it needs a residual network (prunekit's ResNetLite); "
            f"got {type(model).__name__}"
        )
    if score not in SCORES:
        raise ValueError(f"score must be one of {sorted(SCORES)} (the paper's criteria); got {score!r}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum'; got {reduce!r}")
    if not isinstance(per_stage_norm, bool):
        raise ValueError(f"per_stage_norm must be True or False; got {per_stage_norm!r}")
    known = C.blocks(model)
    removable = {n: b for n, b in known.items() if b.removable}
    if not removable:
        raise UnsupportedModelError(
            "the network has no removable residual block (every block changes shape: projection shortcuts)"
        )
    if isinstance(remove, bool) or not isinstance(remove, int) or not 0 <= remove <= len(removable):
        raise ValueError(
            f"remove (blocks to remove) must be an int in [0, {len(removable)}] (the removable blocks: "
            f"{sorted(removable)}); got {remove!r}"
        )
    x, y = _split_batch(batch)
    per_weight = SCORES[score](model, x, y)
    prefixes = {n: b.module for n, b in removable.items()}
    by_module = S.block_scores(per_weight, list(prefixes.values()), reduce=reduce)
    raw = {n: by_module[m] for n, m in prefixes.items()}
    ranked = _stage_normalised(raw, {n: b.stage for n, b in removable.items()}) if per_stage_norm else raw
    removed = S.least_important(ranked, remove, score)
    pruned = copy.deepcopy(model)
    C.remove_blocks(pruned, removed)
    shape = _flops_shape(x)
    report = LotteryReport(
        score=score, reduce=reduce, per_stage_norm=per_stage_norm, direction=S.LEAST_IMPORTANT[score],
        scores=ranked, raw_scores=raw, removed=removed, kept=list(C.blocks(pruned)),
        params_before=C.count_params(model), params_after=C.count_params(pruned),
        macs_before=C.count_flops(model, shape), macs_after=C.count_flops(pruned, shape),
    )  # fmt: skip
    return pruned, report


def layer_lottery_and_train(
    model: nn.Module, batches: Sequence[dict], *, steps: int, lr: float = 1e-3, train_seed: int = 0,
    progress: bool = False, **options,
):  # fmt: skip
    """:func:`layer_lottery` on ``batches[0]``, then the rebuilt network trained on ``batches`` for
    ``steps`` steps (:func:`~prunekit.training.precrop.train_network`): returns ``(network,
    LotteryReport, TrainResult)``."""
    if not batches:
        raise ValueError("layer_lottery_and_train needs at least one batch; got none")
    net, report = layer_lottery(model, batches[0], **options)
    res = train_network(net, batches, steps=steps, lr=lr, seed=train_seed, progress=progress)
    return net, report, res


@register(
    "layer_lottery",
    family="training",
    paper="When Layers Play the Lottery, all Tickets Win at Initialization",
    stages=("before-training",),
    signals=("grasp|snip@init", "block_score"),
    trains=True,
    summary="residual blocks scored at init (GraSP/SNIP) and the least important removed before training",
)
@dataclass
class LayerLottery:
    """Layers-Lottery's options as a registry method: ``LayerLottery(remove=2)(model, batch)`` is
    :func:`layer_lottery` (no official code; the block reduction is ours)."""

    docs_from: ClassVar[str] = "prunekit.training.layer_lottery"
    usage: ClassVar[str] = (
        'net, report = prunekit.training.layer_lottery(resnet, batch, remove=2, score="grasp"{opts})\n'
        "prunekit.training.train_network(net, batches, steps=500)  # or any training loop"
    )
    taxonomy: ClassVar[dict] = {
        "which": "weights: whole residual blocks (depth), removed before training",
        "speedup": "universal (a shallower dense network: fewer parameters and MACs)",
        "how": "gradient scores at initialisation (GraSP / SNIP, averaged per residual block)",
    }
    remove: int = 1
    score: str = "grasp"
    reduce: str = "mean"
    per_stage_norm: bool = False

    def __call__(self, model: nn.Module, batch, **kw) -> tuple[nn.Module, LotteryReport]:
        return layer_lottery(model, batch, **asdict(self), **kw)


__all__ = ["LayerLottery", "LotteryReport", "layer_lottery", "layer_lottery_and_train"]
