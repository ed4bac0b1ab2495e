"""A tree budget fitted to the device: how many draft nodes to verify per forward.

Verifying ``n`` tokens in one forward costs ``c(n)``; a step that verifies the root and ``n`` draft
nodes, and spends ``d`` seconds drafting, yields ``1 + sum(p_i)`` tokens on average, where ``p_i`` is
the chance that the ``i``-th best node is accepted. :func:`fit_budget` picks the ``n`` (0 = plain
decoding, no drafting) that maximises expected tokens per second::

    n* = argmax_n (1 + p_1 + ... + p_n) / (c(n + 1) + d * [n > 0])

The papers size their trees for GPUs, where ``c(81) ~ c(1)``. On a CPU ``c(n)`` grows almost
linearly, and the best tree is much smaller (often none). Sizing the tree this way is ours: neither
Token Recycling nor RASD does it. ``c`` comes from :func:`measure_costs` (timed forwards on the
user's model and device); the ``p_i`` from :class:`AcceptanceStats`, counted while decoding.
"""

from __future__ import annotations

import time
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 81)


@dataclass(frozen=True)
class ForwardCosts:
    """Seconds for one forward of ``n`` tokens on a cached context, measured at ``sizes``;
    linear interpolation in between, the last slope beyond."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]
    past: int = 0

    def __call__(self, n) -> np.ndarray:
        x, y = np.asarray(self.sizes, float), np.asarray(self.seconds, float)
        n = np.asarray(n, float)
        out = np.interp(n, x, y)
        if len(x) > 1:
            slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
            out = np.where(n > x[-1], y[-1] + slope * (n - x[-1]), out)
        return out

    def ratio(self, n: int) -> float:
        """``c(n) / c(1)``: how many decode steps one ``n``-token verify costs."""
        return float(self(n) / self(1))

    def as_dict(self) -> dict:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds), "past": self.past}


_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def measure_costs(
    model: nn.Module, past: int = 256, sizes: tuple[int, ...] = SIZES, repeats: int = 3, cache: bool = True
) -> ForwardCosts:
    """Time one forward of ``n`` tokens (a chain, on ``past`` cached tokens) for each ``n`` in
    ``sizes``; the minimum of ``repeats`` runs. Cached per model unless ``cache=False``."""
    from transformers import DynamicCache

    from .tree import TreeDraft, compact, tree_mask

    if past < 1 or repeats < 1 or not sizes or min(sizes) < 1:
        raise ValueError(
            f"measure_costs needs past >= 1, repeats >= 1 and sizes >= 1; got {past}, {repeats}, {sizes}"
        )
    hit = _COSTS.get(model) if cache else None
    if hit is not None and hit.sizes == tuple(sizes) and hit.past == past:
        return hit
    p = next(model.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(past + max(sizes)) * 7919 % vocab).to(p.device)[None]
    kv = DynamicCache(config=model.config)
    model(input_ids=ids[:, :past], past_key_values=kv, use_cache=True, logits_to_keep=1)
    seconds = []
    for n in sizes:
        chain = TreeDraft(ids[0, past : past + n].cpu(), torch.arange(n).clamp_min(1) - 1)
        mask = tree_mask(chain, past, p.dtype, p.device)
        pos = torch.arange(past, past + n, device=p.device)[None]
        best = float("inf")
        for _ in range(repeats + 1):  # the first run warms up
            t0 = time.perf_counter()
            x = ids[:, past : past + n]
            model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=kv, use_cache=True)
            if p.device.type == "cuda":
                torch.cuda.synchronize(p.device)
            best = min(best, time.perf_counter() - t0)
            compact(kv, past)
        seconds.append(best)
    # a forward of more tokens never costs less: a size slowed by a busy machine takes the cost of
    # the next larger size instead (a running minimum from the right)
    order = np.argsort(sizes)
    seconds = np.asarray(seconds)[order]
    seconds = np.minimum.accumulate(seconds[::-1])[::-1]
    out = ForwardCosts(
        tuple(int(s) for s in np.asarray(sizes)[order]), tuple(float(s) for s in seconds), past
    )
    if cache:
        _COSTS[model] = out
    return out


class AcceptanceStats:
    """What a drafter's full trees did over the last ``window`` steps that verified one: how often
    each node slot was on the accepted path, and how many nodes each tree had. Slots are what the
    drafter says they are (a template node for Token Recycling, a rank in the tree for RASD).

    ``rates()`` are unconditional, ``hits / steps``: a slot that a step's tree lacked (a retrieval
    tree with no match, a row of the matrix not yet written) counts as not accepted, and the cost
    side sees the smaller tree through ``sizes``. Only full trees are counted (the engine's
    calibration and exploration steps), so a pruned tree never biases the counts of the slots it
    left out; the window lets early steps (a cold matrix) age out."""

    def __init__(self, slots: int, window: int = 256) -> None:
        self.hits = np.zeros(slots)
        self.steps = 0  # full-tree steps seen in all
        self.sizes: deque[int] = deque(maxlen=window)
        self._accepted: deque[np.ndarray] = deque(maxlen=window)

    def observe(self, size: int, accepted: np.ndarray) -> None:
        """One full-tree step: its number of draft nodes and the slots on the accepted path."""
        accepted = np.asarray(accepted, int)
        if len(self._accepted) == self._accepted.maxlen:
            np.subtract.at(self.hits, self._accepted[0], 1)  # the oldest step leaves the window
        self.steps += 1
        self.sizes.append(int(size))
        self._accepted.append(accepted)
        np.add.at(self.hits, accepted, 1)

    def rates(self) -> np.ndarray:
        return self.hits / max(len(self._accepted), 1)


def fit_budget(gains, costs: ForwardCosts, draft_seconds: float = 0.0, sizes=None) -> int:
    """The number of draft nodes ``n`` (0 .. len(gains)) that maximises expected tokens per second,
    given each node's acceptance rate ``gains`` in the order nodes are added (best first).

    ``sizes``: the draft nodes the drafter's trees had (recent steps); a step then verifies
    ``min(n, size)`` nodes, so the cost of ``n`` is the mean of ``c(min(n, size) + 1)`` over them.
    Without it every step verifies ``n``."""
    gains = np.asarray(gains, float)
    n = np.arange(len(gains) + 1)
    tokens = 1.0 + np.concatenate([[0.0], np.cumsum(gains)])
    if sizes is None or len(sizes) == 0:
        seconds = costs(n + 1)
    else:
        verified = np.minimum(n[:, None], np.asarray(sizes)[None, :])
        seconds = costs(verified + 1).mean(1)
    seconds = seconds + np.where(n > 0, draft_seconds, 0.0)
    return int(np.argmax(tokens / seconds))
