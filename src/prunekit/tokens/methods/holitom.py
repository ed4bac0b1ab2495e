"""HoliTom — "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (Shao et al.,
NeurIPS 2025). Official code: github.com/cokeshao/HoliTom (spec §15).

A sample's images are the frames of one video (a frame sequence in one prompt, e.g. the bench's
``vqa-fashion-video``). **Vision stage** (outside the LLM), per video of ``T`` frames of ``n``
tokens, from the projected frame tokens ``F`` and each frame's received attention ``a`` (the
feature layer's map, mean over heads and queries):

1. **Temporal segmentation**: ``sim[t, i] = cos(F[t, i], F[t+1, i])``; a position is stable over
   frames ``s..e`` if every consecutive similarity there exceeds ``tau``; dynamic programming over
   frames maximises ``sum over segments (stable positions x (e - s))``, the tokens saved by keeping
   one copy of each stable position per segment (windows up to 1024 frames);
2. the retain ratio ``rho`` (the budget) is rescaled to ``rho' = min(rho / (1 - saved / (T n)), 1)``;
3. in each segment, **static** positions (stable over it) are averaged over its frames and
   clustered by DPC-kNN into ``round(n_static rho')`` tokens (``k = min(7, clusters)``; a cluster
   becomes ``beta * centre + (1 - beta) * mean(members)``, ``beta = 0.6``, the official default),
   placed in the centre's slot in the segment's first frame; **dynamic** positions keep, per frame,
   the ``ceil(n_dyn rho')`` most attended (the official ``D = 0``: no contextual merging).

**LLM stage** (``stage="llm"``, nested inside the vision stage, as ``todre``): at decoder layer
``K`` (the official 18 of Qwen2-7B's 28, scaled) the visual tokens are ranked by the last token's
attention at layer ``K-1`` (head mean), the top ``keep`` stay, and every other one is merged into
its most cosine-similar kept token by the official *sequential* pairwise average
``h_c <- (h_c + h_j) / 2`` in index order — computed in closed form (``h_c / 2^m + sum_t h_{j_t} /
2^{m-t+1}``), without a loop over tokens. Original position ids are kept (as the official code).

Departures: no 2-D pooling of the frame tokens (LLaVA-OneVision's ``get_2dPool``; prunekit's
VLMs hand the projector's tokens as they are); the vision stage's count is matched to the budget
exactly (the official count is about ``rho T n``: surplus dynamic tokens with the least attention
are dropped, a shortfall is filled with the most attended dropped ones); DPC-kNN ties go to the
lower index (the official code adds random noise); the frames of a video must have equal token
counts. Families: LLaVA-1.5 (the feature layer's map without [CLS]), and Qwen2-VL / Qwen2.5-VL,
whose images in one prompt are the frames (the adapter's merged-token map of the last vision block,
see :class:`~prunekit.models.vlm.Qwen2VLAdapter`; Qwen's own video input, ``pixel_values_videos``,
is not a candidate yet). LLaVA-NeXT is refused with the reason: its maps are per crop, and HoliTom
groups a sample's frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod, topk_sorted
from ..merge import dpc_knn_merge


def segments(sim: torch.Tensor, tau: float, max_window: int = 1024) -> tuple[list[tuple[int, int]], int]:
    """Temporal segmentation of ``T`` frames from ``sim (T-1, n)``: ``([(start, end), ...], saved)``
    maximising ``sum (stable positions x (end - start))`` by dynamic programming."""
    T = sim.shape[0] + 1
    above = sim > tau  # (T-1, n)
    # stable[s][e]: positions stable over frames s..e = all of above[s..e-1]
    gain = torch.zeros(T, T, dtype=torch.long)
    for s in range(T - 1):
        run = torch.cumprod(above[s:].long(), dim=0).sum(dim=1)  # (T-1-s,) stable count for e = s+1..T-1
        gain[s, s + 1 :] = run * torch.arange(1, T - s)
    dp = [0] * T
    back = [(i, i) for i in range(T)]
    for i in range(T):
        best, seg = (dp[i - 1] if i else 0), (i, i)
        for w in range(2, min(i + 1, max_window) + 1):
            s = i - w + 1
            v = (dp[s - 1] if s else 0) + int(gain[s, i])
            if v > best:
                best, seg = v, (s, i)
        dp[i], back[i] = best, seg
    out, i = [], T - 1
    while i >= 0:
        s, e = back[i]
        out.append((s, e))
        i = s - 1
    return out[::-1], dp[T - 1]


def sequential_merge(h: torch.Tensor, keep: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """The official ``h_c <- (h_c + h_j) / 2`` for pruned tokens ``j`` in index order, in closed
    form. ``h (..., N, D)``, ``keep (..., N)`` bool, ``dest (..., N)`` the kept index each pruned
    token joins; returns the kept tokens' new vectors (pruned rows unchanged, unused). Batched
    over leading dims."""
    N = h.shape[-2]
    pruned = (~keep).to(h.dtype)
    onehot = torch.nn.functional.one_hot(dest, N).to(h.dtype) * pruned[..., None]  # (..., N, N) [j, c]
    after = onehot.flip(-2).cumsum(-2).flip(-2) - onehot  # tokens joining the same c later than j
    m = onehot.sum(-2)  # (..., N) merges into each c
    w = (onehot * torch.pow(0.5, after + 1)).sum(-1)  # (..., N) weight of pruned j in its centre
    out = h * torch.pow(0.5, m)[..., None] + onehot.transpose(-1, -2) @ (h * w[..., None])
    return torch.where(keep[..., None], out, h)


@register(
    "holitom",
    family="tokens",
    paper="HoliTom: Holistic Token Merging for Fast Video Large Language Models",
    stages=("vision", "llm"),
    signals=("attention_map@feature layer, per frame", "tokens", "last_token_attention@K-1 (llm)"),
    summary="video: DP temporal segments, static tokens merged (DPC-kNN), dynamic top-attention; "
    "LLM: merge into kept",
)
@dataclass
class HoliTom(TokenMethod):
    #: the adapter groups a sample's images as the frames of one video
    group_by: ClassVar[str] = "sample"
    tau: float = 0.8  # similarity threshold for a stable position (official 0.8; 0.65 at 10 %)
    beta: float = 0.6  # weight of a cluster's centre in its merged token (official default)
    knn: int = 7  # DPC-kNN neighbours (capped by the cluster count)
    layer: int | None = None  # llm stage: cut layer K; None: 18 of 28 scaled to the depth

    def __post_init__(self) -> None:
        if not -1.0 <= self.tau <= 1.0:
            raise ValueError(f"holitom: tau is a cosine threshold in [-1, 1]; got {self.tau!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"holitom: beta must be in [0, 1]; got {self.beta!r}")

    def default_cut(self, n_layers: int) -> int:
        return min(max(round(18 * n_layers / 28), 1), n_layers - 1)

    def needs(self, stage: str) -> tuple[Signal, ...]:
        if stage == "llm":
            return (Signal("last_token_attention", None if self.layer is None else self.layer - 1),)
        return (Signal("attention_map"), Signal("tokens"))

    def score(self, ctx: TokenContext) -> torch.Tensor:
        if ctx.stage == "llm":
            return ctx.signal("last_token_attention")
        return self._received(ctx).flatten(1)

    def _received(self, ctx: TokenContext) -> torch.Tensor:
        A = ctx.signal("attention_map")  # (G, T, H, n, n) per frame
        return A.float().mean(dim=2).mean(dim=2)  # (G, T, n) received attention

    def select(self, ctx: TokenContext, k: int) -> Selection:
        G, N = ctx.num_groups, ctx.num_tokens
        if k >= N:
            return Selection(torch.arange(N, device=ctx.tokens.device).expand(G, -1))
        if ctx.stage == "llm":
            return self._inner_merge(ctx, k)
        a = self._received(ctx)
        rows = [self._video(ctx.tokens[g], a[g], k) for g in range(G)]
        return Selection(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))

    # ------------------------------------------------------------------ vision stage, one video
    def _video(self, x: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        T, n = a.shape
        D = x.shape[-1]
        F = x.view(T, n, D)
        sim = torch.nn.functional.cosine_similarity(F[:-1].float(), F[1:].float(), dim=-1)  # (T-1, n)
        segs, saved = segments(sim, self.tau) if T > 1 else ([(0, 0)], 0)
        rho = k / (T * n)
        rho2 = min(rho / max((T * n - saved) / (T * n), 1e-12), 1.0)
        values = x.clone()
        # priority of each slot: static cluster centres first, then dynamic tokens by attention
        prio = torch.full((T * n,), float("-inf"), device=x.device)
        static_rank = float("inf")
        for s, e in segs:
            stable = (
                (sim[s:e] > self.tau).all(dim=0)
                if e > s
                else torch.zeros(n, dtype=torch.bool, device=x.device)
            )
            if bool(stable.any()):
                pos = stable.nonzero().flatten()
                mean = F[s : e + 1, pos].float().mean(dim=0)  # (n_static, D) averaged over frames
                c = max(1, round(len(pos) * rho2))
                merged, centres = self._clusters(mean, c)
                slots = s * n + pos[centres]
                values[slots] = merged.to(x.dtype)
                prio[slots] = static_rank
            dyn = (~stable).nonzero().flatten()
            if len(dyn):
                n_keep = min(math.ceil(len(dyn) * rho2), len(dyn))
                for u in range(s, e + 1):  # frames of the segment (not tokens)
                    att = a[u, dyn].float()
                    slots = u * n + dyn
                    prio[slots] = att
                    top = topk_sorted(att[None], n_keep)[0]
                    prio[slots[top]] = att[top] + 1e6  # kept dynamic tokens before the others
        keep = topk_sorted(prio[None], k)[0]  # exactly k: official ~rho T n (see the docstring)
        return keep, values[keep]

    def _clusters(self, x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """DPC-kNN clusters of ``x (m, D)``: ``beta * centre + (1 - beta) * mean(members)``."""
        mean, centres = dpc_knn_merge(x[None], c, k=min(self.knn, c))
        merged = self.beta * x[centres[0]] + (1 - self.beta) * mean[0]
        return merged, centres[0]

    # ------------------------------------------------------------------ llm stage
    def _inner_merge(self, ctx: TokenContext, k: int) -> Selection:
        score = ctx.signal("last_token_attention")  # (G, N)
        keep = topk_sorted(score, k)
        h = ctx.tokens.float()
        G, N, _ = h.shape
        kept = torch.zeros(G, N, dtype=torch.bool, device=h.device).scatter_(1, keep, True)
        hn = torch.nn.functional.normalize(h, dim=-1)
        sim = (hn @ hn.transpose(1, 2)).masked_fill(~kept[:, None, :], float("-inf"))  # to kept only
        dest = sim.argmax(dim=-1)  # (G, N) most similar kept token (first on ties)
        merged = sequential_merge(h, kept, dest)  # all groups at once
        values = merged.gather(1, keep[..., None].expand(-1, -1, h.shape[-1]))
        return Selection(keep, values.to(ctx.tokens.dtype))
