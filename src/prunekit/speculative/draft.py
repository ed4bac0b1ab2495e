"""A draft tree grown by a draft model with EAGLE-2's dynamic expansion rule, and the training-free
draft model RASD's demonstration uses: the target truncated to its first layers.

EAGLE-2 (Li et al., EMNLP 2024) grows its tree depth by depth: it expands the ``expand`` frontier
nodes with the highest *cumulative* draft probability (the product of draft confidences along the
path, its proxy for the chance of acceptance), gives each its ``top_k`` children, and at the end
keeps the ``nodes`` best of all candidates. EAGLE-2 drafts with a trained one-layer head on the
target's features; here the rule runs on any draft model that shares the target's tokenizer
(section 4 of ``specs/data-draft.md``): by default the target's first layers with its final norm and
tied head (self-speculative and training-free), or any other model, e.g. one pruned by prunekit's
structured methods.

The draft model keeps its own KV cache of the committed tokens. Each step feeds the tokens committed
since the last step, then each depth's expanded nodes in one forward with a tree mask (a node sees
the committed context, its ancestors and itself), then drops the tree from the cache again.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .tree import compact


def truncated(model: nn.Module, layers: int) -> nn.Module:
    """A view of ``model`` with only its first ``layers`` decoder layers, sharing every weight (no
    copy; the model itself is untouched): embeddings, the first layers, the final norm and the head.
    Its config and generation config are copies."""
    from ..models.decoder import decoder_layers

    name, stack_layers = decoder_layers(model)
    total = len(stack_layers)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= total:
        raise ValueError(
            f"draft_layers must be an int in [1, {total}] (the target has {total} layers); got {layers!r}"
        )
    cfg = copy.deepcopy(model.config)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    text_cfg.num_hidden_layers = layers
    if getattr(text_cfg, "layer_types", None):
        text_cfg.layer_types = list(text_cfg.layer_types)[:layers]

    def shallow(module: nn.Module) -> nn.Module:
        new = copy.copy(module)
        new._modules = dict(module._modules)
        return new

    top = shallow(model)
    owner, parts = top, name.split(".")[:-1]
    for part in parts:  # copy the path down to the stack, so only the copies see the new layer list
        child = shallow(owner._modules[part])
        owner._modules[part] = child
        owner = child
    owner._modules["layers"] = nn.ModuleList(list(stack_layers)[:layers])
    if hasattr(owner, "config"):
        owner.config = text_cfg
    top.config = cfg
    if getattr(model, "generation_config", None) is not None:
        top.generation_config = copy.deepcopy(model.generation_config)
    return top


class DraftModelTree:
    """EAGLE-2-style dynamic draft trees from a draft model.

    Args:
        draft: the draft model (any causal LM with the target's vocabulary).
        depth: tree depth (levels below the root).
        top_k: children per expanded node.
        expand: nodes expanded per depth (by cumulative draft probability).
        nodes: draft nodes kept after the final rerank.
    """

    def __init__(self, draft: nn.Module, depth: int = 4, top_k: int = 4, expand: int = 4, nodes: int = 16):
        for key, val in {"depth": depth, "top_k": top_k, "expand": expand, "nodes": nodes}.items():
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{key} must be an int >= 1; got {val!r}")
        self.model, self.depth, self.top_k, self.expand, self.nodes = draft, depth, top_k, expand, nodes
        self.cache = None
        self.pending: list[int] = []
        self.root_probs: torch.Tensor | None = None  # the draft's next-token distribution at the root

    def start(self, prompt: torch.Tensor) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.pending = prompt.tolist()

    def commit(self, tokens: list[int]) -> None:
        """Tokens committed by a verify step (accepted drafts and the bonus token)."""
        self.pending.extend(tokens)

    @torch.no_grad()
    def grow(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grow one tree from the last committed token. Returns ``(ids, parents, scores)`` of the
        non-root nodes in priority order (cumulative log-probability, then shallower first), parent
        indices counting the root as 0, so any prefix is a tree."""
        dev = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        out = self.model(input_ids=torch.tensor([self.pending], device=dev), past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        self.pending = []
        past = self.cache.get_seq_length()  # the committed tokens, the root included
        logp = out.logits[0, -1].float().log_softmax(-1)
        self.root_probs = logp.exp().cpu()
        # candidate nodes, as flat arrays: token, parent (-1 = the root), depth, cumulative log-prob
        top = logp.topk(self.top_k)
        tok, par = top.indices.cpu(), torch.full((self.top_k,), -1)
        dep, score = torch.ones(self.top_k, dtype=torch.long), top.values.cpu()
        fed = torch.empty(0, dtype=torch.long)  # candidate index of each tree node in the draft cache
        frontier = torch.arange(self.top_k)
        for d in range(2, self.depth + 1):
            pick = frontier[score[frontier].topk(min(self.expand, len(frontier))).indices]
            # mask: the committed context, then the fed tree nodes that are ancestors, then itself
            allowed = torch.zeros(len(pick), len(fed) + len(pick), dtype=torch.bool)
            anc = self._ancestors(pick, par)
            allowed[:, : len(fed)] = (anc[:, :, None] == fed[None, None, :]).any(1)
            allowed[:, len(fed) :] = torch.eye(len(pick), dtype=torch.bool)
            mask = torch.zeros(len(pick), past + allowed.shape[1], dtype=dtype)
            mask[:, past:] = mask[:, past:].masked_fill(~allowed, torch.finfo(dtype).min)
            o = self.model(input_ids=tok[pick][None].to(dev), attention_mask=mask[None, None].to(dev),
                           position_ids=(past - 1 + dep[pick])[None].to(dev), past_key_values=self.cache,
                           use_cache=True)  # fmt: skip
            fed = torch.cat([fed, pick])
            lp = o.logits[0].float().log_softmax(-1).topk(self.top_k)  # (m, top_k)
            new = len(tok) + torch.arange(len(pick) * self.top_k)
            tok = torch.cat([tok, lp.indices.cpu().flatten()])
            par = torch.cat([par, pick.repeat_interleave(self.top_k)])
            dep = torch.cat([dep, torch.full((len(new),), d)])
            score = torch.cat([score, (score[pick][:, None] + lp.values.cpu()).flatten()])
            frontier = new
        compact(self.cache, past)  # drop the tree; keep the committed tokens
        # final rerank: the best `nodes` by cumulative log-prob; a child never outscores its parent
        order = torch.from_numpy(np.lexsort((dep.numpy(), -score.numpy())))[: self.nodes]
        order = order[
            torch.argsort(dep[order], stable=True)
        ]  # parents before children, priority within depth
        where = torch.full((len(tok),), -1)
        where[order] = torch.arange(len(order))
        parents = torch.where(par[order] < 0, 0, where[par[order].clamp_min(0)] + 1)
        if bool((parents < 0).any()):  # a parent fell out of the rerank: only on exact score ties
            keep = parents >= 0
            order, parents = order[keep], parents[keep]
        return tok[order], parents, score[order]

    @staticmethod
    def _ancestors(pick: torch.Tensor, par: torch.Tensor) -> torch.Tensor:
        """``(m, depth)`` candidate indices on the path above each picked node (-2 padding)."""
        rows, cur = [], pick.clone()
        while bool((cur >= 0).any()):  # one step per tree level
            cur = torch.where(cur >= 0, par[cur.clamp_min(0)], torch.full_like(cur, -1))
            rows.append(torch.where(cur >= 0, cur, torch.full_like(cur, -2)))
        return torch.stack(rows, 1) if rows else torch.full((len(pick), 1), -2)
