"""Greedy decoding with draft trees: the same tokens as ``model.generate(do_sample=False)``, in fewer
target forwards.

Each step drafts a tree rooted at the last committed token, verifies it in one target forward
(:func:`~prunekit.speculative.tree.verify`), commits the accepted path and the bonus token, and lets
the drafter learn from the step. The number of draft nodes per step is fitted to the device
(``tree="auto"``, :mod:`prunekit.speculative.budget`): the first ``calibrate`` steps verify the
drafter's full tree and count which nodes are accepted; then the tree is cut to the size that
maximises expected tokens per second under the measured forward costs, refitted every ``refit``
steps. The cut may be zero nodes, i.e. plain decoding, where no tree pays on the device.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .budget import ForwardCosts, fit_budget, measure_costs
from .rasd import RASD
from .recycling import TokenRecycling
from .tree import TreeDraft, check_model, check_window, verify

DRAFTERS = {
    "token_recycling": lambda **o: TokenRecycling(**o),
    "rasd": lambda **o: RASD(**o),
    "draft_tree": lambda **o: RASD(retrieval=False, **o),
    "prompt_lookup": lambda **o: RASD(draft_model=False, **o),
}

_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(name, options): drafter}


def make_drafter(name, model: nn.Module | None = None, **options):
    """A drafter by name (one of :data:`DRAFTERS`), or the instance itself. Named drafters are kept
    per model and options, so Token Recycling's matrix and the fitted budgets carry over between
    calls (the official hot start); ``drafter.reset()`` clears them."""
    if not isinstance(name, str):
        if options:
            raise ValueError(f"options {sorted(options)} apply to drafters given by name, not to an instance")
        return name
    if name not in DRAFTERS:
        raise ValueError(
            f"unknown drafter {name!r}; known: {sorted(DRAFTERS)} (or None for plain greedy decoding)"
        )
    if model is None:
        return DRAFTERS[name](**options)
    key = (name, tuple(sorted((k, id(v) if isinstance(v, nn.Module) else v) for k, v in options.items())))
    kept = _KEPT.setdefault(model, {})
    if key not in kept:
        kept[key] = DRAFTERS[name](**options)
    return kept[key]


@dataclass
class SpecStats:
    """What one :func:`generate` call did. ``mat``: mean tokens committed per target forward (Spec-Bench's
    mean accepted tokens, 1.0 for plain decoding); ``accepted``: accepted draft tokens by source."""

    drafter: str = "greedy"
    new_tokens: int = 0
    forwards: int = 0
    nodes: int = 0  # draft nodes verified, summed over steps
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    wall_s: float = 0.0
    budget: int = 0  # draft nodes per step at the end (after fitting)
    accepted: dict[str, int] = field(default_factory=dict)

    @property
    def mat(self) -> float:
        return self.new_tokens / max(self.forwards, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.wall_s, 1e-9)

    def as_dict(self) -> dict:
        return {**asdict(self), "mat": self.mat, "tokens_per_s": self.tokens_per_s}


@dataclass
class SpecOutput:
    sequences: torch.Tensor  # (1, prompt + new)
    stats: SpecStats


def _eos(model: nn.Module, eos_token_id) -> set[int]:
    if eos_token_id is None:
        cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(cfg, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    drafter="token_recycling",
    max_new_tokens: int = 64,
    tree="auto",
    eos_token_id: int | list[int] | None = None,
    streamer=None,
    costs: ForwardCosts | None = None,
    calibrate: int = 16,
    refit: int = 32,
    **options,
) -> SpecOutput:
    """Greedy decoding with draft trees; the output equals ``model.generate(input_ids, do_sample=False,
    max_new_tokens=...)`` token for token.

    Args:
        drafter: ``"token_recycling"``, ``"rasd"``, ``"draft_tree"`` (RASD without retrieval),
            ``"prompt_lookup"`` (RASD's retrieval tree alone), a drafter instance, or ``None`` (plain
            greedy decoding in the same loop). ``**options`` go to a named drafter.
        tree: ``"auto"`` (fit the node budget to the device), ``"official"`` (the drafter's full
            tree: Token Recycling's 80-node template, RASD's whole budget) or an int (that many draft
            nodes per step).
        eos_token_id: stop after this token (default: the model's generation config).
        streamer: a transformers streamer (``put``/``end``), e.g. ``TextStreamer``.
        costs: forward costs for ``tree="auto"`` (default: measured once per model, see
            :func:`~prunekit.speculative.budget.measure_costs`).
        calibrate, refit: steps at the full tree before the first fit; afterwards one step in
            ``refit`` verifies the full tree again (also when the fit says no tree pays), and the
            budget is refitted on the counts of the last 256 full-tree steps.
    """
    t_start = time.perf_counter()
    check_model(model, input_ids)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1; got {max_new_tokens!r}")
    if not (
        tree in ("auto", "official") or (isinstance(tree, int) and not isinstance(tree, bool) and tree >= 0)
    ):
        raise ValueError(
            f"tree must be 'auto', 'official' or an int >= 0 (draft nodes per step); got {tree!r}"
        )
    for key, val in {"calibrate": calibrate, "refit": refit}.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{key} must be an int >= 1 (steps); got {val!r}")
    if drafter is None and options:
        raise ValueError(f"options {sorted(options)} need a drafter; drafter is None")
    d = None if drafter is None else make_drafter(drafter, model, **options)
    prompt = input_ids[0].cpu()
    check_window(model, len(prompt) + max_new_tokens + (d.max_nodes if d else 0) + 1)
    eos = _eos(model, eos_token_id)
    stats = SpecStats(drafter="greedy" if d is None else d.name)
    if d is not None:
        stats.accepted = {s: 0 for s in d.sources}
    dev = next(model.parameters()).device
    if tree == "auto" and d is not None and costs is None:
        costs = measure_costs(model)

    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    logits = None
    if len(prompt) > 1:
        want = d is not None and d.wants_prompt_logits
        out = model(input_ids=prompt[None, :-1].to(dev), past_key_values=cache, use_cache=True,
                    logits_to_keep=0 if want else 1)  # fmt: skip
        logits = out.logits[0] if want else None
    if d is not None:
        d.start(model, prompt, logits)
    stats.prefill_s = time.perf_counter() - t0
    if streamer is not None:
        streamer.put(input_ids.cpu())

    budget, since = _budget(d, tree, costs, calibrate), 0
    context = prompt.tolist()
    new: list[int] = []
    fitting = tree == "auto" and d is not None
    while len(new) < max_new_tokens:
        t0 = time.perf_counter()
        # the counts come from full trees only: while calibrating, and one step in `refit` afterwards
        full = fitting and (d.stats.steps < calibrate or (budget < d.max_nodes and since >= refit))
        size = d.max_nodes if full else budget
        if full:
            d.set_budget(size)
        if d is None or size == 0:
            draft = TreeDraft(torch.tensor([context[-1]]), torch.tensor([0]))
        else:
            draft = d.draft(context, size).prefix(size + 1)
        t1 = time.perf_counter()
        v = verify(model, cache, draft)
        t2 = time.perf_counter()
        if d is not None:
            d.update(draft, v)
            if full:
                d.observe(draft, v)
            if draft.source is not None:
                src = draft.source[v.path[1:]].tolist()
                for s in src:
                    stats.accepted[d.sources[s]] = stats.accepted.get(d.sources[s], 0) + 1
        t3 = time.perf_counter()
        drafting = (t1 - t0) + (t3 - t2)
        stats.draft_s += drafting
        stats.verify_s += t2 - t1
        stats.forwards += 1
        stats.nodes += len(draft) - 1
        tokens = v.tokens[: max_new_tokens - len(new)]
        hit = next((i for i, t in enumerate(tokens) if t in eos), None)
        if hit is not None:
            tokens = tokens[: hit + 1]
        new.extend(tokens)
        context.extend(tokens)
        if streamer is not None:
            streamer.put(torch.tensor(tokens))
        if hit is not None:
            break
        if fitting:
            since += 1
            if len(draft) > 1:
                d.draft_time = (d.draft_time[0] + drafting, d.draft_time[1] + 1)
            if full and d.stats.steps >= calibrate:
                budget, since = _budget(d, tree, costs, calibrate), 0
    if streamer is not None:
        streamer.end()
    stats.new_tokens = len(new)
    stats.budget = budget
    stats.wall_s = time.perf_counter() - t_start
    return SpecOutput(
        torch.cat([input_ids.cpu(), torch.tensor([new], dtype=input_ids.dtype)], 1).to(input_ids.device),
        stats,
    )


def _budget(d, tree, costs: ForwardCosts | None, calibrate: int) -> int:
    """Draft nodes per step: a fixed ``tree``, the drafter's full tree (``"official"``, or while
    calibrating), or the size fitted to the acceptance counts and forward costs so far."""
    if d is None:
        return 0
    if isinstance(tree, int):
        n = tree
    elif tree == "official" or d.stats.steps < calibrate:
        n = d.max_nodes
    else:
        total, count = d.draft_time
        n = d.fitted = fit_budget(d.gains(), costs, total / max(count, 1), d.stats.sizes)
    d.set_budget(n)
    return n
