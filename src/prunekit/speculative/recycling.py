"""Token Recycling (Luo et al., "Turning Trash into Treasure: Accelerating Inference of Large
Language Models with Token Recycling"), read from the official code
(Luowaterbi/TokenRecycling ``evaluation/inference_recycling.py``, ``model/recycling/tree_template_.py``).

Every verify forward computes a full distribution at every tree node; the method keeps the top-``k``
next tokens of each token it has seen in an adjacency matrix ``M (vocab, k)`` and drafts the next
tree from it with a fixed template: node ``[r0, r1, r2]`` is the root's ``r0``-th candidate, then
that token's ``r1``-th candidate, then that token's ``r2``-th. The fill is one gather per depth
(``M.view(-1)[ids[parent] * k + rank]``), and after each verify ``M[ids] = topk(logits, k)`` for
every tree position, accepted or not.

As in the official code: ``k = 8``; the 80-node template "2.2.2" (nodes per depth 8, 21, 25, 15, 8,
3) as ``tree="official"``; a hot start (the matrix is kept across calls; :meth:`TokenRecycling.reset`
clears it); the prompt's prefill logits are not used. Departures:

- rows not yet written draft nothing, and their nodes are left out of the tree; the official code
  starts from a zero matrix and drafts token 0 there (kept under ``faithful=True``). That is not
  harmless on a CPU: an 81-token SmolLM2 forward on token 0 runs on denormal floats, 27x slower;
- the update is deterministic: where a token occurs at several nodes its row is written once, from
  its last node in tree order (the official ``index_put_`` leaves the winner undefined on CUDA);
- the matrix is int32 (the official one is int64): half the memory, the same ids;
- ``seed_from_prompt=True`` (off by default; from the unofficial port smpanaro/token-recycling, not
  the paper) fills the matrix from the prompt's prefill logits;
- the template may be pruned to the nodes most often accepted on this model and device
  (:mod:`prunekit.speculative.budget`); this is ours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..registry import register
from .budget import AcceptanceStats
from .tree import TreeDraft, Verified

#: the official template "2.2.2" (``model/recycling/tree_template_.py``), one line per depth, each node
#: the digits of its path of child ranks, in the official breadth-first order
_OFFICIAL = """
0 1 2 3 4 5 6 7
00 01 02 03 04 05 06 07 10 11 12 13 20 21 22 30 31 40 50 60 70
000 001 002 003 004 005 006 007 010 011 012 020 021 030 040 050 060 070 100 101 110 200 300 400 500
0000 0001 0002 0003 0004 0010 0011 0020 0030 0040 0100 0200 1000 2000 3000
00000 00001 00002 00010 00020 00100 01000 10000
000000 000001 000100
"""


def official_paths() -> list[tuple[int, ...]]:
    """The 80 paths of the official template "2.2.2", in its breadth-first order."""
    return [tuple(int(c) for c in node) for node in _OFFICIAL.split()]


class TreeTemplate:
    """A static draft tree: each non-root node a path of child ranks. Node 0 is the root; the others
    follow in breadth-first order, so every parent comes before its children."""

    def __init__(self, paths, k: int = 8) -> None:
        paths = [tuple(int(r) for r in p) for p in paths]
        bad = [p for p in paths if not p or min(p) < 0 or max(p) >= k]
        if bad:
            raise ValueError(f"template paths must be non-empty with ranks in [0, {k - 1}]; got {bad[:3]}")
        if len(set(paths)) != len(paths):
            raise ValueError("template paths must be distinct")
        known = set(paths)
        orphans = [p for p in paths if len(p) > 1 and p[:-1] not in known]
        if orphans:
            raise ValueError(f"every template path's prefix must be a path too; missing for {orphans[:3]}")
        paths = [
            paths[i] for i in sorted(range(len(paths)), key=lambda i: (len(paths[i]), i))
        ]  # breadth-first
        index = {p: i + 1 for i, p in enumerate(paths)}
        self.k = k
        self.paths = paths
        self.parents = torch.tensor([0] + [index.get(p[:-1], 0) for p in paths])
        self.ranks = torch.tensor([0] + [p[-1] for p in paths])
        self.depth = torch.tensor([0] + [len(p) for p in paths])
        #: node index boundaries of each depth: the fill gathers one depth at a time
        self.levels = [torch.nonzero(self.depth == d).flatten() for d in range(1, int(self.depth.max()) + 1)]

    @classmethod
    def official(cls) -> TreeTemplate:
        return cls(official_paths(), k=8)

    def __len__(self) -> int:
        """Nodes including the root."""
        return len(self.paths) + 1

    def subtree(self, nodes) -> TreeTemplate:
        """The template restricted to ``nodes`` (non-root node indices, ancestor-closed)."""
        return TreeTemplate([self.paths[int(i) - 1] for i in sorted(set(int(i) for i in nodes))], self.k)

    def fill(self, matrix: torch.Tensor, root: int) -> torch.Tensor:
        """The draft ids: the root, then one gather per depth from the flattened matrix."""
        ids = torch.empty(len(self), dtype=torch.long)
        ids[0] = root
        flat = matrix.view(-1)
        for level in self.levels:  # one gather per depth (6 for the official template)
            parent = ids[self.parents[level]]
            got = flat[parent.clamp_min(0) * self.k + self.ranks[level]].long()
            ids[level] = torch.where(parent < 0, -1, got)  # below an empty row, nothing (-1)
        return ids


def closed_rates(rates: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """Acceptance rates made monotone down the tree (a node is accepted only with its parent), so
    the best ``n`` nodes by rate always form a tree. ``parents`` in breadth-first order."""
    out = rates.copy()
    depth = np.zeros(len(parents), int)
    for i in range(1, len(parents)):  # template bookkeeping (<= 81 nodes), once per refit
        depth[i] = depth[parents[i]] + 1
    for d in range(1, depth.max() + 1):
        level = np.nonzero(depth == d)[0]
        out[level] = np.minimum(out[level], out[parents[level]])
    return out


@register(
    "token_recycling",
    family="decode",
    paper="Turning Trash into Treasure: Accelerating Inference of Large Language Models with Token Recycling",
    stages=("decode",),
    signals=("logits_topk",),
    summary="lossless draft trees from the top-k of every verified position, kept in an adjacency matrix",
)
@dataclass(eq=False)
class TokenRecycling:
    """The Token Recycling drafter: an adjacency matrix of each token's top-``k`` successors and a
    static tree template.

    Args:
        k: candidates kept per token (official 8).
        template: ``"official"`` (the 80-node "2.2.2" tree), a :class:`TreeTemplate`, or a list of paths.
        hot_start: keep the matrix across calls (official); ``False`` clears it at every call.
        seed_from_prompt: fill the matrix from the prompt's prefill logits (unofficial port, not the paper).
        faithful: start from a zero matrix as the official code does (drafting token 0 from unwritten
            rows). Default ``False``: unwritten rows draft nothing and those nodes are left out of the
            tree. Token 0 is not harmless everywhere: on this CPU an 81-token forward of SmolLM2 on
            token 0 drives activations denormal and takes 6.7 s instead of 0.25 s.
    """

    name = "token_recycling"
    sources = ("recycling",)

    k: int = 8
    template: object = "official"  # "official", a TreeTemplate or a list of paths
    hot_start: bool = True
    seed_from_prompt: bool = False
    faithful: bool = False

    def __post_init__(self) -> None:
        k, template = self.k, self.template
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (candidates per token); got {k!r}")
        if isinstance(template, str):
            if template != "official":
                raise ValueError(
                    f"template must be 'official', a TreeTemplate or a list of paths; got {template!r}"
                )
            template = TreeTemplate.official() if k == 8 else TreeTemplate([(r,) for r in range(k)], k)
        elif not isinstance(template, TreeTemplate):
            template = TreeTemplate(template, k)
        if template.k != k:
            raise ValueError(f"the template's ranks assume k={template.k}; got k={k}")
        self.template = template
        self.active = template
        self.matrix: torch.Tensor | None = None
        self.fitted: int | None = None  # the node budget fitted to the device (decode.generate)
        self.draft_time = (0.0, 0)  # seconds drafting and steps that drafted, for the fit
        self.stats = AcceptanceStats(len(template) - 1)
        self._nodes = torch.arange(1, len(template))  # template node of each active node (root excluded)
        self._step = self._nodes

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Clear the adjacency matrix (a cold start) and the acceptance statistics."""
        self.matrix = None
        self.stats = AcceptanceStats(len(self.template) - 1)
        self.fitted, self.draft_time = None, (0.0, 0)
        self.set_budget(len(self.template) - 1)

    @property
    def max_nodes(self) -> int:
        return len(self.template) - 1

    def start(self, model, prompt: torch.Tensor, prefill_logits: torch.Tensor | None) -> None:
        vocab = model.get_output_embeddings().weight.shape[0]
        if self.matrix is None or not self.hot_start or self.matrix.shape[0] != vocab:
            self.matrix = torch.full((vocab, self.k), 0 if self.faithful else -1, dtype=torch.int32)
        if self.seed_from_prompt and prefill_logits is not None:
            self._write(prompt[: prefill_logits.shape[0]], prefill_logits)

    @property
    def wants_prompt_logits(self) -> bool:
        return self.seed_from_prompt

    # ------------------------------------------------------------------ budget
    def gains(self) -> np.ndarray:
        """Acceptance rates of the template's nodes, best first (the order nodes are added)."""
        rates = closed_rates(np.concatenate([[1.0], self.stats.rates()]), self.template.parents.numpy())[1:]
        return np.sort(rates)[::-1]

    def set_budget(self, n: int) -> None:
        """Draft the ``n`` template nodes most often accepted so far (all of them for ``n >= max``)."""
        if n >= self.max_nodes:
            self.active, self._nodes = self.template, torch.arange(1, len(self.template))
            return
        rates = closed_rates(np.concatenate([[1.0], self.stats.rates()]), self.template.parents.numpy())[1:]
        depth = self.template.depth.numpy()[1:]
        order = np.lexsort((np.arange(len(rates)), depth, -rates))[:n] + 1  # rate, then shallow, then BFS
        self._nodes = torch.tensor(sorted(order.tolist()))
        self.active = self.template.subtree(self._nodes.tolist())

    # ------------------------------------------------------------------ drafting
    def draft(self, context: list[int], budget: int | None = None) -> TreeDraft:
        assert self.matrix is not None, "call start() first"
        ids = self.active.fill(self.matrix, context[-1])
        keep = torch.nonzero(ids >= 0).flatten()  # rows not yet written hold -1: no candidate
        where = torch.full((len(ids),), -1)
        where[keep] = torch.arange(len(keep))
        self._step = self._nodes[keep[1:] - 1]  # template node of each drafted node
        src = torch.zeros(len(keep), dtype=torch.long)
        return TreeDraft(ids[keep], where[self.active.parents[keep]], src)

    def update(self, draft: TreeDraft, verified: Verified) -> None:
        """Write every tree position's top-``k`` into the matrix (accepted or not)."""
        self._write(draft.ids, verified.logits)

    def observe(self, draft: TreeDraft, verified: Verified) -> None:
        """Count which template nodes of a full-template step were accepted."""
        path = np.asarray(verified.path[1:], int)
        nodes = self._step.numpy()[: len(draft) - 1]
        self.stats.observe(len(draft) - 1, nodes[path - 1] - 1)

    def _write(self, ids: torch.Tensor, logits: torch.Tensor) -> None:
        top = logits.topk(self.k, dim=-1).indices.to(torch.int32).cpu()
        ids = ids.long().cpu()
        uniq, inv = ids.unique(return_inverse=True)
        last = torch.zeros(len(uniq), dtype=torch.long).scatter_reduce(
            0, inv, torch.arange(len(ids)), "amax", include_self=False
        )  # each token's last occurrence: one deterministic write per row
        self.matrix[ids[last]] = top[last]
