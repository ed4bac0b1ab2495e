"""``prune_tokens``: the context manager that installs a token method on a model and removes it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .. import registry
from ..budget import validate_keep
from ..errors import UnsupportedModelError
from .context import STAGES, TokenMethod


def make_method(method: str | TokenMethod, options: dict) -> TokenMethod:
    """A method instance from a registry name plus options (unknown options name the allowed ones)."""
    if isinstance(method, TokenMethod):
        if options:
            raise ValueError("options are given either to the method object or to prune_tokens, not both")
        return method
    if isinstance(method, str) and "+" in method:  # "scorer+selector": see prunekit.tokens.compose
        from .compose import parse

        return parse(method, options)
    return registry.instantiate(method, "tokens", options, "prune_tokens")


def choose_stage(method: TokenMethod, adapter_stages: tuple[str, ...], family: str, stage: str | None) -> str:
    stages = getattr(method, "stages", None) or registry.get(method.name).stages  # Compose: its own
    if stage is not None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; allowed: {list(STAGES)}")
        if stage not in stages:
            raise UnsupportedModelError(
                f"method {method.name!r} runs at stages {list(stages)}, not {stage!r}"
            )
        return stage
    for s in stages:  # the method's preferred stage first
        if s in adapter_stages:
            return s
    raise UnsupportedModelError(
        f"method {method.name!r} runs at stages {list(stages)}, "
        f"but {family} offers only {list(adapter_stages)}"
    )


@contextmanager
def prune_tokens(
    model: nn.Module,
    method: str | TokenMethod,
    keep: int | float | None = None,
    *,
    stage: str | None = None,
    score_dtype: str = "float32",
    **options: object,
) -> Iterator:
    """Prune tokens inside ``model`` for the duration of a ``with`` block.

    Args:
        model: a Hugging Face model of a supported family (see ``prunekit.models``).
        method: a registry name (``prunekit.methods()``) or a method object.
        keep: tokens kept per group (image, prompt, sequence): an ``int >= 1`` or a ratio in (0, 1].
            Required, except where an option of the method sets the budget itself (ToMe's ``r``):
            then it must be left out.
        stage: ``"vision"``, ``"llm"`` or ``"encoder"``; default: the method's first stage that
            the model offers.
        score_dtype: precision of the scores recomputed for the method: ``"float32"`` (default:
            attention rows and maps recomputed from the layer's q/k in float32, DivPrune's distances
            in float32) or ``"model"`` (in the model's dtype, as the official code of FastV,
            FasterVLM and DivPrune scores: reproduces their selections in half precision, where
            float32 scoring swaps tokens within a few ulp of the cut; see
            :mod:`prunekit.models.attention`). ``"model"`` covers the attention rows, maps and
            logits recomputed at LLM layers and at CLIP / ViT-style vision and encoder layers, and
            DivPrune's distances; other signals (Qwen vision maps, value and cumulative signals, a
            method's own arithmetic on them) stay float32.
        **options: the method's options (e.g. ``layer=2`` for FastV).

    Yields a ``Session`` whose ``stats`` count tokens seen and kept and the time spent selecting.
    Hooks are installed on enter and removed on exit, also when the block raises.
    """
    from ..models import get_adapter

    if score_dtype not in ("float32", "model"):
        raise ValueError(f"score_dtype must be 'float32' (the default) or 'model'; got {score_dtype!r}")
    m = make_method(method, dict(options))
    if getattr(m, "own_budget", False):
        if keep is not None:
            raise ValueError(
                f"{m.name}: give either keep or the method's own budget option (e.g. ToMe's r), not both; "
                f"got keep={keep!r}"
            )
    elif keep is None:
        raise ValueError(f"{m.name}: keep is required: an int >= 1 (a count) or a float in (0, 1] (a ratio)")
    else:
        keep = validate_keep(keep)
    adapter = get_adapter(model)
    m = m.for_family(adapter.family, adapter.has_cls)
    stage = choose_stage(m, adapter.stages, adapter.family, stage)
    adapter.check_stage(stage)
    from ..models.base import Session

    session = Session(adapter, stage, m, keep)
    session.score_dtype = score_dtype
    try:
        adapter.attach(session)
        yield session
    finally:
        session.remove()
