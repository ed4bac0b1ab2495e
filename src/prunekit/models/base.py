"""What every model adapter provides, and the hook bookkeeping that guarantees restoration."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import SignalUnavailableError, UnsupportedModelError
from ..tokens.context import STAGE_HELP, TokenMethod

_MISSING = object()


def required_signals(
    method: TokenMethod, stage: str, family: str, offered: Mapping[str, str], several_layers: bool = False
) -> dict:
    """The signals ``method`` needs at ``stage``, keyed by kind; refuses any this adapter cannot give.

    ``offered`` maps each kind the adapter computes to how it gets it (for the error message).
    ``tokens`` and ``hidden`` (the candidates themselves) are always available. One kind at
    several layers is refused unless the stage computes ``several_layers``.
    """
    asked = method.needs(stage)
    needs = {s.kind: s for s in asked}
    if not several_layers:
        for kind in needs:
            layers = {s.layer for s in asked if s.kind == kind}
            if len(layers) > 1:
                raise SignalUnavailableError(
                    f"{method.name!r} needs {kind!r} at layers {sorted(layers, key=str)}; the {stage} "
                    f"stage of {family} computes one layer per signal"
                )
    missing = sorted(set(needs) - set(offered) - {"tokens", "hidden"})
    if missing:
        gives = "; ".join(f"{k} ({how})" for k, how in offered.items()) or "none"
        raise SignalUnavailableError(
            f"signal(s) {missing} needed by {method.name!r} are not available at the {stage} stage of "
            f"{family}; it gives: tokens, {gives}"
        )
    return needs


def check_cut_layer(K: object, n_layers: int, what: str) -> int:
    """A cut before layer ``K`` needs ``1 <= K <= n_layers - 1`` (a layer before it gives signals)."""
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= n_layers - 1:
        raise ValueError(
            f"{what} cut layer K must be an int in [1, {n_layers - 1}] for this {n_layers}-layer model; "
            f"got {K!r}"
        )
    return K


def block_cuts(method: TokenMethod, depth: int, what: str = "encoder") -> tuple[bool, tuple[int, ...]]:
    """``(progressive, cut blocks)`` of a block stack: a progressive method's own cuts, else its one
    ``layer`` (default: block 4, or the middle of a stack of at most 4 blocks), each checked."""
    cuts = method.cuts(depth)
    if cuts is not None:
        return True, tuple(check_cut_layer(K, depth, what) for K in cuts)
    K = method.layer
    K = (4 if depth > 4 else max(1, depth // 2)) if K is None else K
    return False, (check_cut_layer(K, depth, what),)


class HookSet:
    """Hooks and temporary attribute changes, all undone by :meth:`remove` (idempotent).

    Adapters register every hook and every temporary attribute through one HookSet so that the
    context manager can restore the model exactly, also after an exception.
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attrs: list[tuple[object, str, object]] = []

    def pre(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = True) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def post(self, module: nn.Module, fn: Callable, *, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def setattr(self, obj: object, name: str, value: object) -> None:
        """Set ``obj.name = value`` until removal; the previous state (incl. absence) is restored."""
        self._attrs.append(
            (obj, name, obj.__dict__.get(name, _MISSING) if hasattr(obj, "__dict__") else _MISSING)
        )
        setattr(obj, name, value)

    def remove(self) -> None:
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        for obj, name, old in reversed(self._attrs):
            if old is _MISSING:
                if name in getattr(obj, "__dict__", {}):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)
        self._attrs.clear()


def fmt_count(x: float) -> str:
    """``1,024`` for whole numbers, ``12.5`` otherwise (progressive methods count a mean)."""
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


@dataclass
class PruneStats:
    """What one pruning session did, accumulated over the forward calls that pruned.

    ``print(stats)`` (and ``repr``) is a few-line summary: method and stage, candidates kept of
    seen, positions kept at each cut layer, selection time. The full record stays in the
    attributes (``kept_masks``, ``cut_layers``, ``head_masks``)."""

    calls: int = 0
    tokens_in: int = 0  # candidate tokens seen (summed over groups and calls)
    tokens_kept: int = 0
    select_seconds: float = 0.0
    #: per pruning call, ``(B, L)`` bool over the sequence the cut applied to: which positions
    #: survived (non-candidates included, padding excluded) — what a masked reference needs
    kept_masks: list[torch.Tensor] = field(default_factory=list)
    #: llm and encoder stages: the layer (block) cut before, for each entry of ``kept_masks``
    #: (progressive methods cut several)
    cut_layers: list[int] = field(default_factory=list)
    #: cascade head pruning (SpAtten): per cut, ``(first layer, (B, H) bool heads alive)``
    head_masks: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    @property
    def kept_fraction(self) -> float:
        return self.tokens_kept / self.tokens_in if self.tokens_in else 1.0

    #: the method's registry name and the stage it ran at (for the summary)
    method: str = ""
    stage: str = ""

    def record(self, n_in: int, n_kept: int, seconds: float) -> None:
        self.calls += 1
        self.tokens_in += n_in
        self.tokens_kept += n_kept
        self.select_seconds += seconds

    def __repr__(self) -> str:
        what = f"{self.method or 'token pruning'}" + (f" at stage {self.stage}" if self.stage else "")
        calls = f"{self.calls} selection{'s' * (self.calls != 1)}"
        lines = [
            f"PruneStats: {what}, {calls}",
            f"  candidate tokens kept: {fmt_count(self.tokens_kept)} of {fmt_count(self.tokens_in)} "
            f"({self.kept_fraction:.1%})",
        ]
        if self.cut_layers and len(self.cut_layers) == len(self.kept_masks):
            per: dict[int, list[int]] = {}
            for K, m in zip(self.cut_layers, self.kept_masks, strict=True):
                c = per.setdefault(K, [0, 0])
                c[0] += int(m.sum())
                c[1] += m.numel()
            cuts = "; ".join(f"from layer {K}: {fmt_count(k)} of {fmt_count(n)}" for K, (k, n) in per.items())
            lines.append(f"  sequence positions kept, {cuts}")
        if self.head_masks:
            heads = ", ".join(f"layer {i}: {int(m.sum())} of {m.numel()}" for i, m in self.head_masks[-4:])
            lines.append(f"  heads alive (last cuts, summed over rows): {heads}")
        lines.append(f"  selection time: {fmt_seconds(self.select_seconds)}")
        lines.append(f"  full record: .kept_masks ({len(self.kept_masks)} masks), .cut_layers, .head_masks")
        return "\n".join(lines)

    __str__ = __repr__


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


class Session:
    """The live state of one ``prune_tokens`` block: its hooks and its statistics.

    After a forward that pruned, ``attention_mask`` is the ``(B, L_out)`` long mask of the
    **output's** sequence (1: a real token that was kept, 0: a padding slot), e.g. to mean-pool
    an encoder's ``last_hidden_state``, which is shorter than the mask the user passed in::

        with prunekit.prune_tokens(bert, "divprune", keep=0.5) as s:
            h = bert(**batch).last_hidden_state              # (B, L_out, D)
        m = s.attention_mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)

    Rows are packed: an encoder's kept tokens first (CLS at 0), a decoder's last (left padding).
    It describes the last forward that pruned (under ``generate()``, the prefill), and is
    ``None`` before one. ``token_sizes`` (``(B, L_out)`` float, merging methods that track it:
    ToMe) counts the input tokens each output token stands for (summing to the input length);
    weighting by it, ``(h * sizes[..., None]).sum(1) / sizes.sum(1, keepdim=True)``, pools as
    ToMe's proportional attention weighs tokens; a plain mean counts a merged token once.
    ``None`` for cut methods, whose tokens each stand for themselves.
    """

    def __init__(self, adapter: Adapter, stage: str, method: TokenMethod, keep: int | float) -> None:
        self.adapter, self.stage, self.method, self.keep = adapter, stage, method, keep
        #: precision of recomputed scores: "float32" (default) or "model" (see prunekit.models.attention)
        self.score_dtype = "float32"
        self.hooks = HookSet()
        self.stats = PruneStats(method=getattr(method, "name", ""), stage=stage)
        #: 1-D token ids never dropped (``prune_tokens(protect=)``), or ``None``
        self.protect: torch.Tensor | None = None
        #: ``(B, T')`` validity of the output tokens when pruning left ragged rows (BERT with
        #: padding); ``None`` when every output position is a real token
        self.output_mask: torch.Tensor | None = None
        #: ``(B, L_out)`` long: the output's real kept tokens (1) and padding slots (0), last forward
        self.attention_mask: torch.Tensor | None = None
        #: ``(B, L_out)``: input tokens per output token (ToMe merging), else ``None``
        self.token_sizes: torch.Tensor | None = None

    def remove(self) -> None:
        self.hooks.remove()


class Adapter:
    """Knows one model family's internals; hands plain tensors to methods.

    Subclasses set ``family`` and ``stages`` and implement :meth:`matches` and :meth:`attach`.
    """

    family: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ()
    #: why a stage is missing, shown in the error when a user asks for it
    missing_stage_reason: ClassVar[Mapping[str, str]] = {}
    #: per stage, the signals it computes beyond the candidate tokens (kind -> how)
    stage_signals: ClassVar[Mapping[str, Mapping[str, str]]] = {}
    #: whether the vision tower has a [CLS] token (``cls_attention`` at the vision stage)
    has_cls: ClassVar[bool] = True
    #: whether its llm stage can protect token ids from a text prompt (``prune_tokens(protect=)``)
    protects: ClassVar[bool] = False

    @classmethod
    def offered(cls, stage: str) -> Mapping[str, str]:
        """The signals ``stage`` computes beyond the candidate tokens (kind -> how)."""
        return cls.stage_signals.get(stage, {})

    @classmethod
    def support(cls, method: TokenMethod, stages: tuple[str, ...]) -> tuple[str | None, str]:
        """``(stage, "")`` where ``method`` runs on this family by default (its first stage this
        family offers, as :func:`~prunekit.tokens.engine.prune_tokens` picks it, if that stage can
        give the signals), else ``(None, why)``; from the declared stages and signals, no model."""
        why = ""
        method = method.for_family(cls.family, cls.has_cls)
        for stage in stages:
            if stage not in cls.stages:
                why = why or f"no {stage!r} stage" + (
                    f" ({cls.missing_stage_reason[stage]})" if stage in cls.missing_stage_reason else ""
                )
                continue
            kinds = {s.kind for s in method.needs(stage)} - {"tokens", "hidden"}
            missing = sorted(kinds - set(cls.offered(stage)))
            if stage == "vision" and "cls_attention" in kinds and not cls.has_cls:
                missing = sorted({*missing, "cls_attention"})
            if "vision_importance" in kinds and cls.support(method, ("vision",))[0] != "vision":
                missing = sorted({*missing, "vision_importance"})  # comes from the method's vision stage
            if missing:  # the engine attaches at the first offered stage: no fallback
                return None, f"the {stage} stage cannot give {missing}"
            return stage, ""
        return None, why

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def attach(self, session: Session) -> None:
        """Install ``session``'s hooks (through ``session.hooks``) for ``session.stage``."""
        raise NotImplementedError

    def check_stage(self, stage: str) -> None:
        if stage not in self.stages:
            what = STAGE_HELP.get(stage)
            why = self.missing_stage_reason.get(stage)
            raise UnsupportedModelError(
                f"{self.family} ({type(self.model).__name__}) has no token stage {stage!r}"
                f"{f' ({what})' if what else ''}{f': {why}' if why else ''}; it offers {list(self.stages)}"
            )

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "stages": list(self.stages)}
