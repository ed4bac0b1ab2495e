"""Helpers shared by the text-guided vision-stage methods (Recoverable Compression, SafeWatch,
CATP, LVLM_CSP). Not a method: nothing here registers.

``text_embeddings`` ``(G, T, D)`` are the prompt's text-token input embeddings of each group's
sample, in the same space as the projected visual ``tokens`` ``(G, N, D)``, right-packed and
zero-padded: an all-zero row is padding and never counts.
"""

from __future__ import annotations

import torch

from ..context import Selection, Signal, TokenContext, topk_sorted

TEXT_POOLS = ("max", "mean")


def text_valid(text: torch.Tensor) -> torch.Tensor:
    """``(G, T, D) -> (G, T)``: True for real text tokens, False for the zero padding rows."""
    return (text != 0).any(dim=-1)


def text_cosine(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(G, N, D), (G, T, D) -> (G, N, T)`` cosine of every visual token with every text token, fp32
    (a padding row gives 0; callers mask it out with :func:`text_valid`)."""
    x = torch.nn.functional.normalize(tokens.float(), dim=-1)
    t = torch.nn.functional.normalize(text.float(), dim=-1)
    return x @ t.transpose(-1, -2)


def pool_cosine(cos: torch.Tensor, member: torch.Tensor, pool: str) -> torch.Tensor:
    """Pool ``cos`` ``(G, N, T)`` over the text tokens of each of ``P`` sets, ``member`` ``(G, P, T)``
    bool -> ``(G, P, N)``: the ``max`` or the ``mean`` cosine to the set's tokens. An empty set
    scores 0."""
    if pool == "max":
        hit = member[:, :, None, :]  # (G, P, 1, T)
        best = cos[:, None].masked_fill(~hit, float("-inf")).amax(dim=-1)  # (G, P, N)
        return torch.where(member.any(dim=-1, keepdim=True), best, torch.zeros_like(best))
    m = member.float()  # (G, P, T)
    total = cos @ m.transpose(-1, -2)  # (G, N, P)
    return (total / m.sum(dim=-1)[:, None, :].clamp(min=1)).transpose(-1, -2)


def text_relevance(tokens: torch.Tensor, text: torch.Tensor, pool: str) -> torch.Tensor:
    """``(G, N)``: each visual token's ``max`` (or ``mean``) cosine to the real text tokens of its
    group's prompt; 0 where a prompt has no text token."""
    return pool_cosine(text_cosine(tokens, text), text_valid(text)[:, None], pool)[:, 0]


def check_text_pool(method: str, pool: str) -> None:
    if pool not in TEXT_POOLS:
        raise ValueError(f"{method}: text_pool must be one of {list(TEXT_POOLS)}; got {pool!r}")


def top_mask(scores: torch.Tensor, allowed: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``(G, N)`` mask of the ``n[g]`` highest ``scores`` among the ``allowed`` tokens of each group
    (a per-group count; ties to the lower index). Never marks a token outside ``allowed``."""
    order = torch.sort(scores.masked_fill(~allowed, float("-inf")), dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order.indices).scatter_(
        -1, order.indices, torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    )  # (G, N): 0 = best
    return (rank < n[:, None]) & allowed


def split_in_proportion(weights: torch.Tensor, total: int | torch.Tensor) -> torch.Tensor:
    """Split ``total`` (an int, or ``(G,)``) into ``M`` integer parts in proportion to the integer
    ``weights`` ``(G, M)`` (largest remainder: floor shares, then one more to the parts with the
    largest remainders, ties to the lower part). Exact integer arithmetic; each row of ``weights``
    must have a positive sum. A part gets at most ``ceil(total * w / sum(w))``, so never more than
    its weight when ``total <= sum(w)``, and a zero weight gets nothing."""
    G, M = weights.shape
    total = torch.as_tensor(total, dtype=torch.long, device=weights.device).expand(G)  # (G,)
    share = total[:, None] * weights  # (G, M)
    S = weights.sum(dim=-1, keepdim=True)
    base, rem = share // S, share % S
    left = total - base.sum(dim=-1)  # (G,) in [0, M)
    order = torch.sort(rem, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(M, device=weights.device).expand(G, M))
    return base + (rank < left[:, None]).long()


def keep_from_mask(mask: torch.Tensor, k: int) -> torch.Tensor:
    """``(G, N)`` bool with exactly ``k`` True per row -> ``(G, k)`` their indices, ascending."""
    return torch.sort((~mask).int(), dim=-1, stable=True).indices[:, :k]


def instruction_mean(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``instruction_attention`` ``(G, T, N)`` and ``instruction_mask`` ``(G, T)`` (llm stage) ->
    ``(G, N)``: the attention each candidate receives, averaged over the real instruction rows."""
    return (attn * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1)


class InstructionStage:
    """The llm-stage part shared by two-stage methods (ToDRE and CATP stage 2): rank the candidates
    still present by the instruction's mean attention (layer ``K-1``) and keep the top ``k``.

    A method mixes this in, asks :meth:`stage_needs` for ``stage == "llm"`` and starts its
    ``select`` with ``if (sel := self.stage_select(ctx, k)) is not None: return sel``.
    """

    LLM_NEEDS = (Signal("instruction_attention"), Signal("instruction_mask"))

    def score(self, ctx: TokenContext) -> torch.Tensor:
        """The llm stage: the instruction's mean attention to each candidate."""
        return instruction_mean(ctx.signal("instruction_attention"), ctx.signal("instruction_mask"))

    def stage_select(self, ctx: TokenContext, k: int) -> Selection | None:
        """Keep-everything at any stage, the top-``k`` scores at the llm stage, else None."""
        G, N = ctx.num_groups, ctx.num_tokens
        if k >= N:
            return Selection(torch.arange(N, device=ctx.tokens.device).expand(G, -1))
        if ctx.stage == "llm":
            return Selection(topk_sorted(self.score(ctx), k))
        return None
