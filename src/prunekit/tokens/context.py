"""The contract between token methods and model adapters.

An adapter hands a method a :class:`TokenContext` (plain tensors: the candidate tokens and the
signals the method asked for, for ``G`` groups of ``N`` candidates each, e.g. ``G`` images of
``N`` visual tokens), and the method returns a :class:`Selection` (kept indices, ascending). The
adapter then applies that one plan to every tensor that must stay consistent (hidden states,
position ids, masks, KV cache). Methods never import transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import SignalUnavailableError

STAGES = ("vision", "llm", "encoder")
#: what each stage prunes, for error messages
STAGE_HELP = {
    "vision": "visual tokens between the vision tower and the LLM",
    "llm": "a cut at LLM decoder layer K",
    "encoder": "a cut or merge inside ViT / encoder blocks",
}


@dataclass(frozen=True)
class Signal:
    """A signal a method needs, computed on demand by the adapter.

    kinds:
      - ``tokens``: the candidate token vectors themselves, ``(G, N, D)`` (always available);
      - ``cls_attention``: head-mean softmax attention of the [CLS] query over the candidates,
        ``(G, N)``, at encoder layer ``layer``;
      - ``last_token_attention``: head-mean softmax attention of the last prompt token over the
        candidates, ``(G, N)``, at decoder layer ``layer``;
      - ``attention_map``: the full per-head softmax map of one layer, ``(G, H, N, N)``;
      - ``hidden``: hidden states of the candidates at layer ``layer``, ``(G, N, D)``;
      - ``text_embeddings``: the prompt's text-token embeddings, ``(G, T, D)``.
    ``layer`` is ``None`` where the adapter's default for the stage applies.
    """

    kind: str
    layer: int | None = None

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}@{self.layer}"


@dataclass
class TokenContext:
    """Tensors handed to a method for ``G`` groups of ``N`` candidate tokens."""

    stage: str
    tokens: torch.Tensor  # (G, N, D)
    signals: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> tensor
    grid: tuple[int, int] | None = None  # (rows, cols) of the candidates when they form a patch grid
    generator: torch.Generator | None = None
    model: str = ""  # adapter family, for error messages
    #: the decoder layer whose input is being cut (llm stage), else None
    layer: int | None = None
    #: ``prune_tokens(..., score_dtype=...)``: "float32" (default) or "model" — a method that computes
    #: scores from the tokens itself (DivPrune's distances) does so in ``tokens.dtype`` with "model"
    score_dtype: str = "float32"

    @property
    def num_groups(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[1]

    def signal(self, kind: str, layer: int | None = None) -> torch.Tensor:
        """The signal ``kind`` (``str(Signal(kind, layer))`` when a method asked for several layers
        of one kind, e.g. ``ctx.signal("attention_map", 8)`` -> key ``"attention_map@8"``)."""
        if kind == "tokens":
            return self.tokens
        key = kind if layer is None else str(Signal(kind, layer))
        if key in self.signals:
            return self.signals[key]
        if kind not in self.signals:
            raise SignalUnavailableError(
                f"signal {kind!r} was not computed for stage {self.stage!r} on {self.model or 'this model'}; "
                f"available: {['tokens', *self.signals]}"
            )
        return self.signals[kind]


@dataclass
class Selection:
    """A method's plan: which candidates survive, in ascending (original) order.

    ``keep``: ``(G, K)`` long indices into the ``N`` candidates, ascending along the last dim (with
    ``valid``: the slots in use are ascending and come first).
    ``values``: optional ``(G, K, D)`` new vectors for the kept tokens, in ``keep`` order (merging
    methods: a merged token takes the slot, and so the position id, of one of the tokens it merges).
    """

    keep: torch.Tensor
    values: torch.Tensor | None = None
    #: optional ``(G, K)`` scores of the kept tokens, published for a later stage (VFlowOpt's
    #: LLM-stage drops rank the survivors by the vision-stage importance)
    scores: torch.Tensor | None = None
    #: optional ``(G, K)`` bool: which slots are in use, for methods whose count varies per group
    #: (ATP-LLaVA's instance-adaptive thresholds); the token of an unused slot is dropped
    valid: torch.Tensor | None = None

    @property
    def num_kept(self) -> int:
        return self.keep.shape[-1]

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Selection:
        """A selection keeping the ``True`` entries of ``mask (G, N)``: kept indices ascending first,
        then unused slots (``valid`` False), ``K`` = the largest count in the batch."""
        width = int(mask.sum(dim=-1).max()) if mask.numel() else 0
        order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        valid = mask.gather(-1, order)
        return cls(order, valid=None if bool(valid.all()) else valid)


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores along the last dim, returned in ascending index order.

    Ties go to the lower index (``torch.topk`` leaves this unspecified, so a stable descending
    sort is used): deterministic on every device.
    """
    k = min(k, scores.shape[-1])
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.sort(order, dim=-1).values


class TokenMethod:
    """Base of token methods: ``needs()`` the signals, ``score()`` the candidates, ``select()`` ``k``.

    Subclasses are dataclasses whose fields are the method's options (never the budget: the budget
    is an argument of :meth:`select`). The default :meth:`select` keeps the top-``k`` scores.
    """

    name: ClassVar[str] = ""
    #: the attention layer option, interpreted by the adapter per stage (see each method's docstring)
    layer: int | None = None
    #: True where an option of the method sets the budget itself (ToMe's ``r``): ``prune_tokens``
    #: then takes no ``keep``
    own_budget: ClassVar[bool] = False

    def needs(self, stage: str) -> tuple[Signal, ...]:
        raise NotImplementedError

    def keep_count(self, keep: int | float | None, n: int) -> int:
        """Candidates kept of a group's ``n`` for the session's ``keep`` (``None`` where the method
        sets its own budget, :attr:`own_budget`). Default: :func:`~prunekit.budget.resolve_keep`."""
        from ..budget import resolve_keep

        return resolve_keep(keep, n)

    def score(self, ctx: TokenContext) -> torch.Tensor:
        """``(G, N)`` importance, higher is kept first."""
        raise NotImplementedError

    def for_family(self, family: str, has_cls: bool) -> TokenMethod:
        """This method as it runs on model ``family`` (``has_cls``: its vision tower has a [CLS]
        token). Default: unchanged. A method whose official code has a per-family variant returns a
        copy set for it (HoloV: received attention where the tower has no [CLS], as its Qwen code)."""
        return self

    def default_cut(self, n_layers: int) -> int:
        """The llm-stage cut layer ``K`` when ``layer`` is None (FastV's 2)."""
        return 2

    def cuts(self, n_layers: int) -> tuple[int, ...] | None:
        """Progressive methods: the decoder layers (encoder blocks) whose input is cut, ascending;
        ``None`` (the default) means one cut, at ``layer``."""
        return None

    def counts(self, n: int, keep: int, n_layers: int) -> tuple[int, ...]:
        """Progressive methods: candidates kept at each of :meth:`cuts` out of a group's ``n``,
        for ``keep`` = the mean number of candidates per decoder layer (encoder block)."""
        raise NotImplementedError

    def select(self, ctx: TokenContext, k: int) -> Selection:
        return self.select_scored(ctx, k, None if k >= ctx.num_tokens else self.score(ctx))

    def select_scored(
        self, ctx: TokenContext, k: int, scores: torch.Tensor | None, weight: float = 0.5
    ) -> Selection:
        """This method's selection rule applied to given ``(G, N)`` scores (composition: another
        method's scores, see :mod:`prunekit.tokens.compose`). Default: the top-``k``. ``weight``
        is the scores' share where the rule mixes them with its own criterion (diversity)."""
        if k >= ctx.num_tokens:
            idx = torch.arange(ctx.num_tokens, device=ctx.tokens.device)
            return Selection(idx.expand(ctx.num_groups, -1))
        return Selection(topk_sorted(scores, k))


class ProgressiveMethod(TokenMethod):
    """A method that cuts at several decoder layers (llm stage) or encoder blocks (encoder stage),
    fewer candidates at each.

    Subclasses are dataclasses with a ``layers`` option (``None``: the paper's layers, given for a
    ``reference_depth``-layer model, scaled to the model's depth) and define :meth:`shape`. The
    budget ``keep`` is the mean number of candidates per layer (see
    :mod:`prunekit.tokens.schedule`). Signals asked with ``layer=None`` are computed at each cut
    on the cut's input: at the llm stage from the cut layer's own attention, at the encoder stage
    from the block before the cut (as a single encoder cut does; see
    :mod:`prunekit.models.encoder`).
    """

    official_layers: ClassVar[tuple[int, ...]] = ()
    reference_depth: ClassVar[int] = 32
    layers: tuple[int, ...] | None = None

    def shape(self, n_cuts: int):
        raise NotImplementedError

    def cuts(self, n_layers: int) -> tuple[int, ...]:
        from .schedule import cut_layers

        return cut_layers(self.layers, self.official_layers, self.reference_depth, n_layers, self.name)

    def counts(self, n: int, keep: int, n_layers: int) -> tuple[int, ...]:
        from .schedule import fit_counts

        layers = self.cuts(n_layers)
        return fit_counts(layers, n_layers, n, keep, self.shape(len(layers)), self.name)
