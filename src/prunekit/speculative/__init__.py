"""Speculative decoding with draft trees (issue 24, in progress): the shared :class:`TreeDraft` type
and its one-forward verifier (:mod:`prunekit.speculative.tree`). The drafters (Token Recycling,
RASD) and ``generate`` come next."""

from __future__ import annotations

from .tree import TreeDraft, Verified, accept, compact, tree_mask, verify

__all__ = ["TreeDraft", "Verified", "accept", "compact", "tree_mask", "verify"]
