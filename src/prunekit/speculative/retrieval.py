"""Retrieval trees from the context (prompt lookup), their pruning by a draft distribution, and
tree fusion by longest-prefix matching: the parts of RASD (Quan et al., "Retrieval-Augmented
Speculative Decoding") that need no model.

RASD has no official code; the paper's body was not readable here. What follows is the labelled
reconstruction of ``specs/data-draft.md`` section 4, **unconfirmed** beyond the abstract:

- retrieval (PLD-style, Saxena 2023): the longest suffix of the context, ``max_ngram`` tokens down
  to ``min_ngram``, that occurs earlier in the context; the ``max_branches`` most recent matches'
  continuations (``max_len`` tokens each) form a trie whose nodes count the matches through them;
- pruning by the draft's distribution at the root: a branch survives if its first token is in the
  draft's top ``prune_top_k`` or has probability ``>= p_min``; then the ``max_nodes`` best nodes by
  count times that first-token probability are kept;
- fusion: every path of the second tree is walked down the first while a child with the same token
  exists, and the unmatched rest is attached there; then the fused tree is cut breadth-first to the
  node budget, so shallow and shared tokens survive (the rule of the third-party fusion the spec
  cites).

Trees here are small (tens of nodes), so tries are built with dict lookups per node.
"""

from __future__ import annotations

import torch

from .tree import TreeDraft

#: ``TreeDraft.source`` codes of fused trees
DRAFT, RETRIEVAL, BOTH = 0, 1, 2


class Trie:
    """A token trie rooted at node 0: parallel lists of token, parent, depth, source and priority."""

    def __init__(self, root: int) -> None:
        self.tok, self.par, self.dep, self.src, self.prio = [root], [0], [0], [BOTH], [float("inf")]
        self.kids: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self.tok)

    def add(self, parent: int, token: int, source: int, priority: float) -> int:
        """The child of ``parent`` with ``token`` (created if new); a node both sources reach becomes BOTH."""
        key = (parent, token)
        node = self.kids.get(key)
        if node is None:
            node = len(self.tok)
            self.kids[key] = node
            self.tok.append(token), self.par.append(parent), self.dep.append(self.dep[parent] + 1)
            self.src.append(source), self.prio.append(priority)
        else:
            if self.src[node] != source:
                self.src[node] = BOTH
            self.prio[node] = max(self.prio[node], priority)
        return node

    def merge(self, tree: TreeDraft, priority: torch.Tensor | None = None, source: int | None = None) -> None:
        """Insert every path of ``tree`` (same root token) by longest-prefix matching."""
        where = [0] * len(tree)
        src = tree.source if source is None else None
        for i in range(1, len(tree)):  # parents come first, so where[parent] is known
            s = source if src is None else int(src[i])
            p = 0.0 if priority is None else float(priority[i])
            where[i] = self.add(where[int(tree.parents[i])], int(tree.ids[i]), s, p)

    def order(self, budget: int | None = None) -> list[int]:
        """Node indices breadth-first, the higher priority first within a depth, cut to ``budget``
        non-root nodes (``None``: no cut); the root first."""
        order = sorted(range(1, len(self)), key=lambda i: (self.dep[i], -self.prio[i], i))
        return [0, *(order if budget is None else order[: max(0, budget)])]

    def to_draft(self, budget: int | None = None) -> TreeDraft:
        """The trie as a TreeDraft in :meth:`order`."""
        order = self.order(budget)
        pos = {node: k for k, node in enumerate(order)}
        return TreeDraft(
            torch.tensor([self.tok[i] for i in order]),
            torch.tensor([pos[self.par[i]] if i else 0 for i in order]),
            torch.tensor([self.src[i] for i in order]),
        )


def paths(tree: TreeDraft) -> set[tuple[int, ...]]:
    """Every root-to-node token path of a tree (the root's token included)."""
    out, memo = set(), {0: (int(tree.ids[0]),)}
    for i in range(1, len(tree)):
        memo[i] = (*memo[int(tree.parents[i])], int(tree.ids[i]))
        out.add(memo[i])
    out.add(memo[0])
    return out


def fuse(
    first: TreeDraft, second: TreeDraft, budget: int | None = None, first_priority=None, second_priority=None
) -> TreeDraft:
    """Fuse two trees with the same root by longest-prefix matching, then cut breadth-first to
    ``budget`` non-root nodes. Sources: nodes only ``first`` proposed keep ``first.source`` (DRAFT by
    default), only ``second``'s keep ``second.source`` (RETRIEVAL by default), shared ones are BOTH."""
    if int(first.ids[0]) != int(second.ids[0]):
        raise ValueError(
            f"fused trees need the same root token; got {int(first.ids[0])} and {int(second.ids[0])}"
        )
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(f"budget must be an int >= 0 (non-root nodes) or None; got {budget!r}")
    trie = Trie(int(first.ids[0]))
    trie.merge(first, first_priority, DRAFT if first.source is None else None)
    trie.merge(second, second_priority, RETRIEVAL if second.source is None else None)
    return trie.to_draft(budget)


def prompt_lookup_tree(
    context: torch.Tensor,
    max_ngram: int = 3,
    min_ngram: int = 1,
    max_len: int = 10,
    max_branches: int = 8,
) -> tuple[TreeDraft, torch.Tensor]:
    """The retrieval tree of PLD-style lookup in ``context (T,)``; its root is ``context[-1]``.

    Returns the tree (breadth-first, more matches first within a depth; source RETRIEVAL) and each
    node's match count (the root's is the number of matches)."""
    for key, val in {
        "max_ngram": max_ngram,
        "min_ngram": min_ngram,
        "max_len": max_len,
        "max_branches": max_branches,
    }.items():
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{key} must be an int >= 1; got {val!r}")
    if min_ngram > max_ngram:
        raise ValueError(f"min_ngram ({min_ngram}) must be <= max_ngram ({max_ngram})")
    context = context.long().cpu()
    T = len(context)
    starts = torch.empty(0, dtype=torch.long)
    for n in range(min(max_ngram, T - 1), min_ngram - 1, -1):  # the longest matching suffix wins
        windows = context[: T - 1].unfold(0, n, 1)  # every n-gram that ends before the last token
        hit = (windows == context[T - n :]).all(1).nonzero().flatten()
        if len(hit):
            starts = (hit + n).flip(0)[:max_branches]  # the most recent matches first
            break
    trie = Trie(int(context[-1]))
    counts = {0: len(starts)}
    for s in starts.tolist():  # <= max_branches continuations of <= max_len tokens
        node = 0
        for tok in context[s : s + max_len].tolist():
            node = trie.add(node, tok, RETRIEVAL, 0.0)
            counts[node] = counts.get(node, 0) + 1
            trie.prio[node] = counts[node]
    tree = trie.to_draft()
    return tree, torch.tensor([float(counts.get(i, 0)) for i in trie.order()])


def prune_by_draft(
    tree: TreeDraft,
    weight: torch.Tensor,
    root_probs: torch.Tensor,
    top_k: int = 8,
    p_min: float = 0.01,
    max_nodes: int = 16,
) -> tuple[TreeDraft, torch.Tensor]:
    """Prune a retrieval tree by the draft model's next-token distribution at the root (unconfirmed
    rule, see the module docstring). ``weight (n,)``: each node's match count. Returns the pruned tree
    and each kept node's priority (count times its branch's first-token probability)."""
    if not 0.0 <= p_min <= 1.0:
        raise ValueError(f"p_min must be in [0, 1]; got {p_min!r}")
    n = len(tree)
    depth = tree.depths()
    anc = tree.ancestors()
    # each node's depth-1 ancestor: its branch's first token
    first = torch.where(anc & (depth == 1)[None, :], torch.arange(n)[None, :], n).min(1).values
    first = torch.where(depth == 0, 0, first)
    p_first = root_probs[tree.ids[first.clamp_max(n - 1)]].float()
    top = set(root_probs.topk(min(top_k, len(root_probs))).indices.tolist())
    ok_first = torch.tensor([int(t) in top for t in tree.ids.tolist()]) | (root_probs[tree.ids] >= p_min)
    keep = ok_first[first.clamp_max(n - 1)] | (depth == 0)
    priority = weight.float() * p_first
    priority[0] = float("inf")
    keep_idx = keep.nonzero().flatten()
    # the best max_nodes by priority; on ties (a child never outranks its parent) shallower first
    ranked = sorted(keep_idx[1:].tolist(), key=lambda i: (-float(priority[i]), int(depth[i]), i))[:max_nodes]
    chosen = sorted([0, *ranked])
    pos = {node: k for k, node in enumerate(chosen)}
    parents = torch.tensor([pos.get(int(tree.parents[i]), -1) if i else 0 for i in chosen])
    if bool((parents < 0).any()):  # cannot happen: priorities fall down each branch
        raise AssertionError("prune_by_draft dropped a parent")
    src = None if tree.source is None else tree.source[chosen]
    return TreeDraft(tree.ids[chosen], parents, src), priority[chosen]
