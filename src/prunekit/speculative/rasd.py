"""RASD-style fusion (Quan et al., "Retrieval-Augmented Speculative Decoding"): a draft tree from a
draft model, a retrieval tree from the context pruned by the draft's probabilities, fused by
longest-prefix matching under one node budget.

RASD has no official code; this is the labelled reconstruction of ``specs/data-draft.md`` section 4
(details beyond the abstract are **unconfirmed**), presented as "RASD-style fusion", not as a
reproduction. The paper hosts it on EAGLE-2's trained draft head; offline there is none, so the
draft tree comes from EAGLE-2's expansion rule on a draft model (:mod:`prunekit.speculative.draft`),
by default the target truncated to its first ``draft_layers`` layers (training-free). Retrieval is
prompt lookup over the context (PLD); REST's datastore is not built.

The same class gives the two ablations: ``retrieval=False`` (draft-only trees, drafter
``"draft_tree"``) and ``draft_model=False`` (retrieval-only trees, drafter ``"prompt_lookup"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..registry import register
from .budget import AcceptanceStats
from .draft import DraftModelTree, truncated
from .retrieval import DRAFT, RETRIEVAL, fuse, prompt_lookup_tree, prune_by_draft
from .tree import TreeDraft, Verified


@register(
    "rasd",
    family="decode",
    paper="RASD: Retrieval-Augmented Speculative Decoding",
    stages=("decode",),
    signals=("draft_probs", "context_ngrams"),
    summary="lossless: a draft model's tree fused with a retrieval tree pruned by the draft's probabilities",
)
@dataclass(eq=False)
class RASD:
    """RASD-style drafter.

    Args:
        draft_model: a causal LM sharing the target's tokenizer; ``None`` = the target truncated to
            ``draft_layers`` layers; ``False`` = no draft model (retrieval-only trees).
        draft_layers: layers of the truncated target; default ``None``: 4/15 of them, at least 1 (8 of
            SmolLM2's 30, the spec's demonstration).
        depth, top_k, expand, draft_nodes: the EAGLE-2 rule (depth 4, 4 children, 4 expanded per
            depth, 16 nodes kept: the spec's CPU-sized defaults; EAGLE-2's GPU defaults are 5, 10, -, 59).
        retrieval: add a prompt-lookup retrieval tree (``max_ngram``, ``min_ngram``, ``max_len``,
            ``max_branches`` as in :func:`~prunekit.speculative.retrieval.prompt_lookup_tree`).
        prune: prune the retrieval tree by the draft's root distribution (``prune_top_k``, ``p_min``),
            keeping at most ``retrieval_nodes`` nodes. Unconfirmed rule, see the spec.
        nodes: the node budget of the fused tree (non-root nodes; the spec's 24).
    """

    name = "rasd"
    sources = ("draft", "retrieval", "both")

    draft_model: object = None  # an nn.Module, None (the truncated target) or False (no draft model)
    draft_layers: int | None = None
    depth: int = 4
    top_k: int = 4
    expand: int = 4
    draft_nodes: int = 16
    retrieval: bool = True
    max_ngram: int = 3
    min_ngram: int = 1
    max_len: int = 10
    max_branches: int = 8
    prune: bool = True
    prune_top_k: int = 8
    p_min: float = 0.01
    retrieval_nodes: int = 16
    nodes: int = 24

    def __post_init__(self) -> None:
        draft_model, retrieval, nodes = self.draft_model, self.retrieval, self.nodes
        if draft_model is False and not retrieval:
            raise ValueError(
                "RASD needs a draft model, retrieval, or both; got draft_model=False and retrieval=False"
            )
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ValueError(f"nodes must be an int >= 1 (the fused tree's node budget); got {nodes!r}")
        self.tree_options = {"depth": self.depth, "top_k": self.top_k, "expand": self.expand,
                             "nodes": self.draft_nodes}  # fmt: skip
        DraftModelTree(nn.Linear(1, 1), **self.tree_options)  # validates the options now
        self.lookup = {"max_ngram": self.max_ngram, "min_ngram": self.min_ngram, "max_len": self.max_len,
                       "max_branches": self.max_branches}  # fmt: skip
        prompt_lookup_tree(torch.tensor([0, 0]), **self.lookup)  # validates the options now
        if not 0.0 <= self.p_min <= 1.0:
            raise ValueError(f"p_min must be in [0, 1]; got {self.p_min!r}")
        self.budget = nodes
        self.stats = AcceptanceStats(nodes)
        self.fitted: int | None = None  # the node budget fitted to the device (decode.generate)
        self.draft_time = (0.0, 0)  # seconds drafting and steps that drafted, for the fit
        self.tree: DraftModelTree | None = None
        self._target = None
        self._draft: nn.Module | None = None
        if draft_model is False:
            self.name = "prompt_lookup"
        elif not retrieval:
            self.name = "draft_tree"

    @property
    def max_nodes(self) -> int:
        return self.nodes

    @property
    def wants_prompt_logits(self) -> bool:
        return False

    def reset(self) -> None:
        """Clear the acceptance statistics and the fitted budget."""
        self.stats = AcceptanceStats(self.nodes)
        self.fitted, self.draft_time = None, (0.0, 0)
        self.budget = self.nodes

    def start(self, model: nn.Module, prompt: torch.Tensor, prefill_logits=None) -> None:
        if self.draft_model is False:
            self.tree = None
            return
        if self._draft is None or self._target is not model:
            if self.draft_model is not None:
                self._draft = self.draft_model
            else:
                layers = self.draft_layers
                if layers is None:  # 4/15 of the target's layers: 8 of SmolLM2's 30, the spec's choice
                    from ..models.decoder import decoder_layers

                    layers = max(1, len(decoder_layers(model)[1]) * 4 // 15)
                self._draft = truncated(model, layers)
            self._target = model
        self.tree = DraftModelTree(self._draft, **self.tree_options)
        self.tree.start(prompt)

    # ------------------------------------------------------------------ budget
    def gains(self) -> np.ndarray:
        """Acceptance rate of each node slot of the fused tree, in the order the budget adds them."""
        return self.stats.rates()

    def set_budget(self, n: int) -> None:
        self.budget = min(n, self.nodes)

    # ------------------------------------------------------------------ drafting
    def draft(self, context: list[int], budget: int | None = None) -> TreeDraft:
        root = context[-1]
        budget = self.budget if budget is None else budget
        draft_tree = TreeDraft(torch.tensor([root]), torch.tensor([0]), torch.tensor([DRAFT]))
        draft_prio = torch.tensor([float("inf")])
        if self.tree is not None:
            ids, parents, scores = self.tree.grow()
            zero = torch.tensor([0])
            draft_tree = TreeDraft(
                torch.cat([zero + root, ids]), torch.cat([zero, parents]), zero.repeat(len(ids) + 1)
            )
            draft_prio = torch.cat([torch.tensor([float("inf")]), scores.exp()])
        if not self.retrieval:
            return fuse(draft_tree, draft_tree.prefix(1), budget, draft_prio)
        found, count = prompt_lookup_tree(torch.tensor(context), **self.lookup)
        if self.tree is not None and self.prune:
            probs = self.tree.root_probs
            found, prio = prune_by_draft(
                found, count, probs, self.prune_top_k, self.p_min, self.retrieval_nodes
            )
        else:
            ones = torch.ones(int(found.ids.max()) + 1)
            found, prio = prune_by_draft(found, count, ones, 1, 0.0, self.retrieval_nodes)
        prio = prio / max(float(count[0]), 1.0)  # the share of the matches through the node
        found = TreeDraft(found.ids, found.parents, torch.full((len(found),), RETRIEVAL))
        return fuse(draft_tree, found, budget, draft_prio, prio)

    def update(self, draft: TreeDraft, verified: Verified) -> None:
        if self.tree is not None:
            self.tree.commit(verified.tokens)

    def observe(self, draft: TreeDraft, verified: Verified) -> None:
        """Count which slots of a full-budget step were accepted."""
        self.stats.observe(len(draft) - 1, np.asarray(verified.path[1:], int) - 1)
