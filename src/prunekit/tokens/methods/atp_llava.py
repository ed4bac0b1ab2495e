"""ATP-LLaVA — "ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models" (Ye et al.,
CVPR 2025, arXiv 2412.00447). LLM stage, progressive, **trained**.

An ATP module sits before decoder layers 4, 14 and 24 of LLaVA's 32 (scaled to the model's depth;
option ``layers``). At each one, for the visual tokens still present (spec §12):

- ``S_self``: the layer's **pre-softmax** vision->vision attention logits, head mean, mean over the
  visual queries that can see the token (causal);
- ``S_cross``: the **post-softmax** attention from the instruction (the real tokens after the
  image) to the token, head mean, mean over the instruction's queries;
- redundancy score ``S_red = (norm(S_self) + norm(S_cross)) / 2``;
- spatial score (SAP) ``S_spat = 1 - R_s * lambda`` on a uniform 2-D sub-grid of the image's patch
  grid (stride ``round(sqrt(1 / R_s))``, from row and column 0), 0 elsewhere;
- learned, per instance: ``z = Linear(2, D)([mean S_self, N * mean S_cross])``,
  ``theta_r = sigmoid(Linear(D, 1)(z))``, ``theta_s = sigmoid(Linear(D, 1)(z))``;
- kept: ``(S_red > theta_r) or (S_spat > theta_s)``; so the count varies per image and per layer.

Training (:func:`prunekit.training.atp.train_atp`) relaxes the keep rule to the soft mask
``max(sigmoid((S_red - theta_r) T), sigmoid((S_spat - theta_s) T))``, ``T = 10``, applied as
``log(mask)`` on the token's attention key from the module's layer on, and minimises the
next-token loss plus ``lambda_atp * sum_i i * kept_i / N + lambda_target * |mean kept - target|``
(``lambda_atp = 0.05``, ``lambda_target = 0.2``, ``R_s = 0.25``, ``lambda = 3``). Only the module
is trained; the VLM stays frozen. **Departure (measured):** by default the trainer runs the hard
rule in the forward pass and takes its gradients from the soft mask (straight-through), so it
trains what inference runs. With the soft mask in the forward pass too (``straight_through=False``,
the re-implementation's way), the modules trained on the real-parts VLM met their targets in soft
counts (28 / 56 / 85 tokens per layer) but kept 23 / 56 / 59 hard ones at inference, and the
bench's accuracy fell to 0.28-0.32 against 0.50 dense: at ``T = 10`` a half-open mask barely
changes the model, so the loss never saw what dropping does.

**Unconfirmed**: no official code was found. The formulas, the layers and the defaults above are
those of a third-party re-implementation that cites the paper's equations (spec §12); the exact
loss, the data and whether the LLM is tuned are not known. Choices of this implementation, each
a departure from nothing confirmed: ``norm`` is a min-max to [0, 1] over the group's tokens still
present (the raw logits and probabilities differ in scale by orders of magnitude, and the
thresholds are sigmoids); the scores are detached (the LLM is frozen); the cross statistic fed to
the module is scaled by ``N`` (uniform attention = 1); ``mean kept`` is the mean number of visual
tokens per decoder layer, prunekit's budget for progressive methods; at least one token (the top
``S_red``) survives each module; on a non-square group (Qwen2-VL's dynamic grid, whose shape the
LLM stage does not see) the SAP sub-grid is every ``stride**2``-th token of the raster.

Budget: ``keep`` must be a target a module was trained for (mean tokens per decoder layer, over
instances); the count each image gets is the module's decision. ``weights``: a module, a list of
modules (one per target), or the safetensors file :func:`save_atp` wrote.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ...registry import register
from ..context import ProgressiveMethod, Selection, Signal, TokenContext
from ._textguided import instruction_mean

OFFICIAL_LAYERS = (4, 14, 24)  # of LLaVA-1.5's 32 (re-implementation; unconfirmed)


class ATPModule(nn.Module):
    """The learned thresholds of ATP-LLaVA for one budget: one small head pair per cut layer.

    ``cuts``: the decoder layers it sits before; ``target``: the budget it was trained for, as a
    fraction of the group's visual tokens (mean per decoder layer); ``hidden``: ``D``.
    """

    def __init__(self, cuts: tuple[int, ...], target: float, hidden: int = 64, n_layers: int = 0) -> None:
        super().__init__()
        self.cuts, self.target, self.hidden, self.n_layers = tuple(cuts), float(target), hidden, n_layers
        self.proj = nn.ModuleList(nn.Linear(2, hidden) for _ in cuts)
        self.head_r = nn.ModuleList(nn.Linear(hidden, 1) for _ in cuts)
        self.head_s = nn.ModuleList(nn.Linear(hidden, 1) for _ in cuts)
        for lin in (*self.proj, *self.head_r, *self.head_s):
            nn.init.normal_(lin.weight, std=0.01)
            nn.init.zeros_(lin.bias)  # thresholds start at 0.5: S_red above the middle, no SAP grid

    def thresholds(self, cut: int, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``feats (G, 2)`` at the ``cut``-th module -> ``(theta_r, theta_s)``, each ``(G,)``."""
        z = self.proj[cut](feats.to(self.proj[cut].weight.dtype))
        return torch.sigmoid(self.head_r[cut](z))[:, 0], torch.sigmoid(self.head_s[cut](z))[:, 0]

    def meta(self) -> dict:
        return {
            "cuts": list(self.cuts),
            "target": self.target,
            "hidden": self.hidden,
            "n_layers": self.n_layers,
        }


def save_atp(modules: list[ATPModule], path: str | Path) -> Path:
    """Write trained modules (one per budget) to one safetensors file; returns the path."""
    from safetensors.torch import save_file

    tensors = {
        f"{i}.{k}": v.detach().float().contiguous()
        for i, m in enumerate(modules)
        for k, v in m.state_dict().items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"atp": json.dumps([m.meta() for m in modules])})
    return path


def load_atp(path: str | Path) -> list[ATPModule]:
    """The modules :func:`save_atp` wrote (safetensors: no code runs on load)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"atp_llava: no trained module file at {str(path)!r}")
    with safe_open(str(path), framework="pt") as f:
        metas = json.loads((f.metadata() or {}).get("atp", "null") or "null")
        if not isinstance(metas, list):
            raise ValueError(f"atp_llava: {str(path)!r} is not a file written by save_atp")
        modules = []
        for i, meta in enumerate(metas):
            m = ATPModule(tuple(meta["cuts"]), meta["target"], meta["hidden"], meta.get("n_layers", 0))
            m.load_state_dict({k: f.get_tensor(f"{i}.{k}") for k in m.state_dict()})
            modules.append(m.eval())
    return modules


# ----------------------------------------------------------------------------- scores (shared with training)
def self_importance(logits: torch.Tensor) -> torch.Tensor:
    """``(G, N, N)`` head-mean pre-softmax logits (rows = queries; -inf where hidden) -> ``(G, N)``:
    each key's mean logit over the queries that see it."""
    seen = torch.isfinite(logits)
    return logits.masked_fill(~seen, 0).sum(dim=1) / seen.sum(dim=1).clamp_min(1)


def minmax(x: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``x`` scaled to [0, 1] over each row's ``alive`` entries (a constant row gives 0)."""
    lo = x.masked_fill(~alive, float("inf")).amin(dim=-1, keepdim=True)
    hi = x.masked_fill(~alive, float("-inf")).amax(dim=-1, keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).masked_fill(~alive, 0)


def redundancy_and_features(
    s_self: torch.Tensor, s_cross: torch.Tensor, alive: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``S_red (G, N)`` and the module's input ``(G, 2)`` from raw ``S_self``, ``S_cross`` over the
    ``alive`` tokens."""
    s_self, s_cross = s_self.float(), s_cross.float()
    red = (minmax(s_self, alive) + minmax(s_cross, alive)) / 2
    count = alive.sum(dim=-1).clamp_min(1)
    mean_self = (s_self * alive).sum(dim=-1) / count
    mean_cross = (s_cross * alive).sum(dim=-1)  # = N * mean
    return red, torch.stack([mean_self, mean_cross], dim=-1)


def spatial_score(index: torch.Tensor, count: torch.Tensor, r_s: float, lam: float) -> torch.Tensor:
    """SAP: ``1 - r_s * lam`` at the tokens on the stride-``round(sqrt(1/r_s))`` sub-grid of each
    group's square patch grid (``index (G, N)`` raster indices, ``count (G,)`` grid sizes), else 0.
    A group that is not a square takes every ``stride**2``-th token of its raster instead."""
    side = torch.sqrt(count.double()).round().long()
    stride = max(1, round(math.sqrt(1 / r_s)))
    row, col = index // side[:, None], index % side[:, None]
    on = (row % stride == 0) & (col % stride == 0)
    # a non-square group (Qwen2-VL's dynamic grid, whose shape the llm stage does not see): every
    # stride**2-th token of the raster, the same share
    square = (side * side == count)[:, None]
    on = torch.where(square, on, index % (stride * stride) == 0) & (index >= 0)
    return on.float() * (1 - r_s * lam)


def soft_keep(red, spat, theta_r, theta_s, temperature: float) -> torch.Tensor:
    """The training relaxation ``max(sigmoid((S_red - theta_r) T), sigmoid((S_spat - theta_s) T))``."""
    return torch.maximum(
        torch.sigmoid((red - theta_r[:, None]) * temperature),
        torch.sigmoid((spat - theta_s[:, None]) * temperature),
    )


def hard_keep(red, spat, theta_r, theta_s) -> torch.Tensor:
    """``(S_red > theta_r) or (S_spat > theta_s)``, and at least the top ``S_red`` token."""
    keep = (red > theta_r[:, None]) | (spat > theta_s[:, None])
    top = torch.nn.functional.one_hot(red.argmax(dim=-1), red.shape[-1]).bool()
    return keep | top


@register(
    "atp_llava",
    family="tokens",
    paper="ATP-LLaVA: Adaptive Token Pruning for Large Vision Language Models",
    stages=("llm",),
    signals=("attention_logits@each cut", "instruction_attention@each cut", "patch_index"),
    trains=True,
    summary="trained per-instance, per-layer thresholds (redundancy + spatial grid) at layers 4/14/24 of 32",
)
@dataclass
class ATPLLaVA(ProgressiveMethod):
    official_layers: ClassVar[tuple[int, ...]] = OFFICIAL_LAYERS
    #: cut layers (0-based decoder layer whose input is cut); None: 4/14/24 of 32 scaled to the depth
    layers: tuple[int, ...] | None = None
    #: the trained module(s): an ATPModule, a list of them, or a safetensors path from save_atp
    weights: object = None
    #: SAP's sampling ratio R_s and its score factor lambda
    r_s: float = 0.25
    lam: float = 3.0
    modules: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.r_s <= 1:
            raise ValueError(f"atp_llava: r_s must be in (0, 1]; got {self.r_s}")
        w = self.weights
        if w is None:
            self.modules = []
        elif isinstance(w, ATPModule):
            self.modules = [w]
        elif isinstance(w, (list, tuple)) and all(isinstance(m, ATPModule) for m in w):
            self.modules = list(w)
        elif isinstance(w, (str, Path)):
            self.modules = load_atp(w)
        else:
            raise TypeError(
                f"atp_llava: weights must be an ATPModule, a list of them or a safetensors path; "
                f"got {type(w).__name__}"
            )

    def module_for(self, k: int, n: int) -> ATPModule:
        """The module trained for a mean of ``k`` of ``n`` tokens per layer."""
        for m in self.modules:
            if round(m.target * n) == k:
                return m
        if not self.modules:
            raise ValueError(
                "atp_llava needs its trained module: train one with "
                "prunekit.training.atp.train_atp(model, batches, keep) and pass it (or the file "
                "save_atp wrote) as weights="
            )
        have = ", ".join(f"{round(m.target * n)} ({m.target:.3f})" for m in self.modules)
        raise ValueError(
            f"atp_llava: no trained module for keep={k} of {n} visual tokens; the modules given were "
            f"trained for keep = {have}. Train one for this budget with train_atp"
        )

    def counts(self, n: int, keep: int, n_layers: int) -> tuple[int, ...]:
        """The budget names the module; the counts are its per-instance decision (capped at ``keep``
        only by the module's training)."""
        cuts = self.cuts(n_layers)
        if keep >= n:
            return tuple(n for _ in cuts)
        m = self.module_for(keep, n)
        if m.cuts != cuts:
            raise ValueError(
                f"atp_llava: the module for keep={keep} was trained for cuts at layers {list(m.cuts)}, "
                f"but this session cuts at {list(cuts)}; pass layers={list(m.cuts)}"
            )
        return tuple(keep for _ in cuts)

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return tuple(
            Signal(k)
            for k in (
                "attention_logits",
                "instruction_attention",
                "instruction_mask",
                "patch_index",
                "patch_count",
            )
        )

    def select(self, ctx: TokenContext, k: int) -> Selection:
        n0 = ctx.signal("patch_count")
        n = int(n0.max())
        if k >= n:
            return Selection(
                torch.arange(ctx.num_tokens, device=ctx.tokens.device).expand(ctx.num_groups, -1)
            )
        module = self.module_for(k, n)
        if ctx.layer not in module.cuts:
            raise ValueError(
                f"atp_llava: no module at decoder layer {ctx.layer}; trained for {list(module.cuts)}"
            )
        s_self = self_importance(ctx.signal("attention_logits"))
        s_cross = instruction_mean(ctx.signal("instruction_attention"), ctx.signal("instruction_mask"))
        alive = torch.ones_like(s_self, dtype=torch.bool)
        red, feats = redundancy_and_features(s_self, s_cross, alive)
        spat = spatial_score(ctx.signal("patch_index"), n0, self.r_s, self.lam).to(red.device)
        with torch.no_grad():
            theta_r, theta_s = module.thresholds(module.cuts.index(ctx.layer), feats)
        return Selection.from_mask(hard_keep(red, spat, theta_r.float(), theta_s.float()))
