"""``prune_tokens``: the context manager that installs a token method on a model and removes it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
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


def special_ids(model: nn.Module) -> list[int]:
    """The special token ids a model's config (and generation config) names: BOS, EOS, padding.
    On chat models these are often the chat-template markers (SmolLM2: ``<|im_start|>`` is BOS,
    ``<|im_end|>`` EOS); a tokenizer's ``all_special_ids`` is the fuller list."""
    ids: set[int] = set()
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        cfgs = [cfg, getattr(cfg, "text_config", None)] if cfg is not None else []
        for c in cfgs:
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                v = getattr(c, name, None)
                for t in v if isinstance(v, list | tuple) else [v]:
                    if isinstance(t, int) and not isinstance(t, bool) and t >= 0:
                        ids.add(t)
    return sorted(ids)


def _depth(model: nn.Module) -> int:
    """The decoder depth (a progressive method's cuts depend on it)."""
    from ..models.decoder import _text_model

    tm = _text_model(model)
    return len(tm.layers) if tm is not None else 0


def protected_ids(model: nn.Module, protect: object) -> torch.Tensor | None:
    """``prune_tokens(protect=...)`` as a 1-D tensor of token ids, or ``None``."""
    if protect is None or protect is False:
        return None
    if isinstance(protect, str):
        if protect != "special":
            raise ValueError(
                f"protect={protect!r}: allowed are 'auto', None, 'special', a tokenizer, or token ids (ints)"
            )
        ids = special_ids(model)
        if not ids:
            raise ValueError(
                f"protect='special': the config of {type(model).__name__} names no special token ids; "
                "pass the tokenizer (protect=tokenizer) or the ids"
            )
    elif hasattr(protect, "all_special_ids"):  # a Hugging Face tokenizer
        ids = list(protect.all_special_ids)
    else:
        try:
            ids = list(protect)  # type: ignore[call-overload]
        except TypeError:
            ids = None
        if ids is None or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(
                "protect must be 'auto', None, 'special' (the config's BOS/EOS/padding ids), a tokenizer "
                f"(its all_special_ids) or a non-empty list of token ids; got {protect!r}"
            )
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


@contextmanager
def prune_tokens(
    model: nn.Module,
    method: str | TokenMethod,
    keep: int | float | None = None,
    *,
    stage: str | None = None,
    score_dtype: str = "float32",
    protect: object = "auto",
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
        protect: prompt tokens a text-only decoder's llm stage never drops (chat-template
            markers, BOS): ``"special"`` (the BOS/EOS/padding ids the model's config names; on
            SmolLM2 ``<|im_start|>`` and ``<|im_end|>``), a tokenizer (its ``all_special_ids``),
            a list of token ids, or ``None`` (nothing protected: every prompt token but the last
            is a candidate). Default ``"auto"``: ``"special"`` where it applies (a text-only
            decoder at the llm stage, a single-cut method such as FastV), nothing elsewhere; an
            explicit value where it does not apply is an error. Protected tokens **count against
            the budget**: ``keep=0.5`` still keeps half the prompt, the protected ones first, the
            rest chosen by the method among the other candidates (protected tokens beyond the
            budget are all kept, and nothing else). Why on by default (ours, not in any paper):
            on 50 chat prompts of SmolLM2-135M-Instruct, FastV at keep 0.5 without protection
            drops 2.8 of the 5 template markers per prompt; protecting them halves the KL to the
            dense next-token distribution (0.50 -> 0.21 nats, lower on 47 of 50 prompts) and
            raises top-1 agreement from 0.50 to 0.72; at keep 0.25 it is neutral (KL 0.95 ->
            0.72 mean, median 0.52 -> 0.53, top-1 0.42 both) (``benchmarks/protect_special.py``,
            ``benchmarks/results/protect_special.md``). Plain-text prompts without special tokens
            are unaffected; VLM candidates (visual tokens) never are special tokens.
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
    if isinstance(protect, str) and protect == "auto":  # "special" where it applies, else nothing
        applies = adapter.protects and stage == "llm" and m.cuts(_depth(model)) is None
        protect = "special" if applies and special_ids(model) else None
    ids = protected_ids(model, protect)
    if ids is not None and not (adapter.protects and stage == "llm"):
        raise UnsupportedModelError(
            f"protect= applies to the prompt tokens of a text-only decoder at the llm stage; "
            f"{adapter.family} at stage {stage!r} has no such candidates"
        )
    from ..models.base import Session

    session = Session(adapter, stage, m, keep)
    session.score_dtype = score_dtype
    session.protect = ids
    try:
        adapter.attach(session)
        yield session
    finally:
        session.remove()
