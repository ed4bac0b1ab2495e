"""Speculative decoding with draft trees: greedy-identical output in fewer target forwards.

- :func:`generate`: the decode loop (draft, verify in one forward, commit, learn), with stats;
- drafters: :class:`TokenRecycling` (``"token_recycling"``), :class:`RASD` (``"rasd"``, and its
  ablations ``"draft_tree"`` and ``"prompt_lookup"``);
- :class:`TreeDraft` and :func:`verify`: the shared tree type and one-forward verifier;
- :mod:`~prunekit.speculative.budget`: the tree size fitted to the device's forward costs.
"""

from __future__ import annotations

from .budget import AcceptanceStats, ForwardCosts, fit_budget, measure_costs
from .decode import DRAFTERS, SpecOutput, SpecStats, generate, make_drafter
from .draft import DraftModelTree, truncated
from .rasd import RASD
from .recycling import TokenRecycling, TreeTemplate, official_paths
from .retrieval import fuse, paths, prompt_lookup_tree, prune_by_draft
from .tree import TreeDraft, Verified, accept, compact, tree_mask, verify

__all__ = [
    "DRAFTERS", "RASD", "AcceptanceStats", "DraftModelTree", "ForwardCosts", "SpecOutput", "SpecStats",
    "TokenRecycling", "TreeDraft", "TreeTemplate", "Verified", "accept", "compact", "fit_budget", "fuse",
    "generate", "make_drafter", "measure_costs", "official_paths", "paths", "prompt_lookup_tree",
    "prune_by_draft", "tree_mask", "truncated", "verify",
]  # fmt: skip
