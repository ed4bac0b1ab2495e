"""Draft trees and their verification in one forward (transformers 5, batch 1).

A :class:`TreeDraft` is ``ids (n,)`` and ``parents (n,)``: node 0 is the root, the last committed
token (not yet in the KV cache), and every other node's parent comes before it. :func:`verify`
runs the whole tree through the target model in one forward:

- an **additive** float 4-D mask ``(1, 1, n, past + n)``: a node attends to the whole past and to
  its own ancestors (0 where allowed, the dtype's minimum elsewhere). A boolean 4-D mask is
  silently wrong under eager attention, which adds the mask to the scores;
- explicit ``position_ids = past + depth``: the default ``past + arange(n)`` is wrong for a tree;
- greedy acceptance: from the root, follow the child whose token is the target's argmax at the
  current node, as long as there is one; the target's argmax at the last accepted node is the
  bonus token;
- compaction: the cache keeps the past and the accepted path only
  (``cache.layers[i].keys/.values``, index-selected on the sequence axis). The accepted nodes have
  depths ``0..a``, so their cached keys carry contiguous RoPE positions.

The verified recipe is ``specs/data-draft.md`` section 5.2. Flash attention takes no custom mask
and is refused, as are batches of more than one sequence. Models with sliding-window layers
(Gemma-3) work while the whole context, tree included, stays below the window: there the sliding
layers still hold every position, so one mask and index compaction are exact. Beyond it the forward
fails inside transformers and the cache drops positions, so :func:`check_window` refuses first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PrunekitError, UnsupportedModelError

ATTENTION = ("eager", "sdpa")


@dataclass(frozen=True)
class TreeDraft:
    """A draft tree: ``ids (n,)`` tokens, ``parents (n,)`` with ``parents[0] == 0`` (the root) and
    ``parents[i] < i`` for every other node; ``source (n,)`` optionally says where each node came
    from (e.g. 0 = draft model, 1 = retrieval), for acceptance statistics."""

    ids: torch.Tensor
    parents: torch.Tensor
    source: torch.Tensor | None = None

    def __post_init__(self) -> None:
        ids, parents = self.ids, self.parents
        if ids.dim() != 1 or parents.shape != ids.shape or ids.numel() == 0:
            raise ValueError(
                f"a TreeDraft needs 1-D ids and parents of one length >= 1; got {tuple(ids.shape)} and "
                f"{tuple(parents.shape)}"
            )
        if ids.dtype.is_floating_point or parents.dtype.is_floating_point:
            raise ValueError("TreeDraft ids and parents must be integer tensors")
        idx = torch.arange(len(parents))
        if int(parents[0]) != 0 or bool((parents[1:] >= idx[1:]).any()) or bool((parents < 0).any()):
            bad = [i for i, p in enumerate(parents.tolist()) if (i == 0 and p != 0) or (i and not 0 <= p < i)]
            raise ValueError(
                "TreeDraft parents must satisfy parents[0] == 0 and 0 <= parents[i] < i; "
                f"node(s) {bad[:5]} do not"
            )

    def __len__(self) -> int:
        return int(self.ids.numel())

    def ancestors(self) -> torch.Tensor:
        """``(n, n)`` bool: ``[i, j]`` is True when node ``j`` is on the root-to-``i`` path (``i`` itself
        included). Pointer jumping: one step per tree level, not per node."""
        n = len(self)
        anc = torch.zeros(n, n, dtype=torch.bool)
        rows, cur = torch.arange(n), torch.arange(n)
        parents = self.parents.long().cpu()
        for _ in range(n):
            anc[rows, cur] = True
            nxt = parents[cur]
            if torch.equal(nxt, cur):
                break
            cur = nxt
        return anc

    def prefix(self, n: int) -> TreeDraft:
        """The first ``n`` nodes (always a tree, since parents come before children)."""
        n = max(1, min(n, len(self)))
        src = None if self.source is None else self.source[:n]
        return TreeDraft(self.ids[:n], self.parents[:n], src)

    def depths(self) -> torch.Tensor:
        """``(n,)`` depth of each node (the root is 0)."""
        return self.ancestors().sum(1) - 1


def check_model(model: nn.Module, input_ids: torch.Tensor) -> None:
    """Refuse what tree verification cannot run: batch > 1, an attention without custom masks."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            "tree decoding runs one sequence at a time (batch 1); got input_ids of shape "
            f"{tuple(input_ids.shape)}"
        )
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ATTENTION:
        raise UnsupportedModelError(
            f"tree verification needs a custom 4-D attention mask; attn_implementation={impl!r} takes none. "
            f"Load the model with attn_implementation in {list(ATTENTION)}"
        )


def sliding_window(model: nn.Module) -> int | None:
    """The smallest sliding window among the model's attention layers, or ``None`` if it has none."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    if window is None or not any("sliding" in str(t) for t in types):
        return None
    return int(window)


def check_window(model: nn.Module, length: int) -> None:
    """Refuse a context (prompt, new tokens and one tree) that would reach the sliding window."""
    window = sliding_window(model)
    if window is not None and length > window - 1:
        raise UnsupportedModelError(
            f"tree decoding on a model with sliding-window layers needs the whole context below the window: "
            f"prompt + max_new_tokens + tree nodes = {length} must be <= sliding_window - 1 = {window - 1}. "
            "Shorten the prompt or max_new_tokens, or use a smaller tree"
        )


def tree_mask(draft: TreeDraft, past: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The additive ``(1, 1, n, past + n)`` mask: 0 where a node may attend, the dtype's minimum elsewhere."""
    n = len(draft)
    allowed = torch.cat([torch.ones(n, past, dtype=torch.bool), draft.ancestors()], dim=1).to(device)
    mask = torch.zeros(n, past + n, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


@dataclass
class Verified:
    """The result of one verify forward: the tokens to commit (accepted drafts, then the bonus
    token), the accepted node indices (the root first), and the tree's logits ``(n, vocab)``."""

    tokens: list[int]
    path: list[int]
    logits: torch.Tensor


def accept(draft: TreeDraft, pred: torch.Tensor) -> list[int]:
    """Greedy acceptance: the node path from the root, following at each node the (first) child
    whose token equals the target's argmax ``pred`` at that node."""
    ids, parents = draft.ids.cpu(), draft.parents.cpu()
    pred = pred.cpu()
    path, cur = [0], 0
    while True:
        kids = ((parents == cur) & (ids == pred[cur])).nonzero().flatten()
        kids = kids[kids != 0]
        if kids.numel() == 0:
            return path
        cur = int(kids[0])
        path.append(cur)


def compact(cache, past: int, path=()) -> None:
    """Keep the first ``past`` positions of every cache layer, then the tree positions ``path``
    (relative to ``past``): the accepted path is gathered in place into ``past .. past + len(path)``
    and the rest is cut off as a view, so the committed past is not copied.

    A sliding-window layer is compacted only while it still holds every position (below its window);
    its ``cumulative_length`` (what ``get_seq_length`` reads) is set to the kept length."""
    path = torch.as_tensor(list(path), dtype=torch.long)
    length = past + len(path)
    for layer in cache.layers:
        kind = type(layer).__name__
        if kind not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            raise UnsupportedModelError(
                f"cache compaction handles DynamicLayer and DynamicSlidingWindowLayer caches; got {kind}"
            )
        if kind == "DynamicSlidingWindowLayer":
            if layer.cumulative_length != layer.keys.shape[2]:
                raise UnsupportedModelError(
                    f"a sliding-window layer (window {layer.sliding_window}) already dropped positions "
                    f"({layer.cumulative_length} seen, {layer.keys.shape[2]} kept): tree decoding needs the "
                    "context below the window"
                )
            layer.cumulative_length = length
        if len(path) and not torch.equal(path, torch.arange(len(path))):
            src = (past + path).to(layer.keys.device)
            layer.keys[:, :, past:length] = layer.keys.index_select(2, src)
            layer.values[:, :, past:length] = layer.values.index_select(2, src)
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


@torch.no_grad()
def verify(model: nn.Module, cache, draft: TreeDraft) -> Verified:
    """Run ``draft`` through ``model`` in one forward on top of ``cache`` (the committed tokens before
    the root), accept greedily and compact the cache to the past plus the accepted path."""
    check_model(model, draft.ids[None])
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    past = cache.get_seq_length()
    check_window(model, past + len(draft))
    depth = draft.depths()
    out = model(
        input_ids=draft.ids[None].to(dev),
        attention_mask=tree_mask(draft, past, dtype, dev),
        position_ids=(past + depth)[None].to(dev),
        past_key_values=cache,
        use_cache=True,
    )
    logits = out.logits[0]
    pred = logits.argmax(-1)
    path = accept(draft, pred)
    compact(cache, past, path)
    if cache.get_seq_length() != past + len(path):
        raise PrunekitError("cache compaction left the wrong length")  # a cache layout we do not know
    tokens = [int(draft.ids[i]) for i in path[1:]] + [int(pred[path[-1]])]
    return Verified(tokens, path, logits)
