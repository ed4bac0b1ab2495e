"""Recoverable Compression — "Recoverable Compression: A Multimodal Vision Token Recovery Mechanism
Guided by Text Information" (Chen et al., AAAI 2025, arXiv 2409.01179).

Per image, after the vision tower [official code, ``clip_encoder.py``,
``token_recycling_with_text_in_vision_and_clustring``; spec §14]:

1. **visual filter** ``V``: the tokens the [CLS] query attends to most;
2. **text recovery** ``T``: of the rest, the tokens most similar to the question;
3. **KNN recovery**: of the remaining tokens ``R``, the highest-attention ones are centres ``C``;
   each centre adds the attention-weighted sum of its ``merge_neighbors`` (32) best neighbours in
   ``R`` (other centres included; neighbourhoods overlap), ranked by ``cos(centre, j) +
   text_weight * text_sim(j)``;
4. one **global token**: the attention-weighted sum of all of ``R`` except the centres.

**Adaptive counts** [code]: ``|V|``, ``|T|`` and ``|C|`` come from the fraction of outliers that
scikit-learn's ``LocalOutlierFactor(n_neighbors, contamination="auto")`` finds among the 1-D score
values (LOF > 1.5): ``|V| = outliers(attention, 20)``; ``|T| = floor((N - |V|) * outliers(sim',
20) / N)`` where ``sim'`` is the text similarity with ``V``'s values set to its minimum;
``|C| = outliers(attention over R, 10)``. :func:`lof_outliers` is that LOF, vectorised over groups
and tokens (neighbour ties to the lower index).

**Budget** (departure): the official code keeps ``|V| + |T| + |C| + 1`` tokens (about 10 % of
them on average), a number the image decides. Here ``k`` is kept exactly: 1 slot is the global
token and ``k - 1`` are split between ``V``, ``T`` and ``C`` in proportion to the counts above
(largest remainder, ties to ``V`` then ``T``; all to ``V`` if no outlier is found). With ``k``
equal to the official count the plan is the official one.

Signals: ``cls_attention`` at ``layer`` (default ``-1``: the last vision layer, as the official
code), ``tokens`` and ``text_embeddings``, ``(G, N)``, ``(G, N, D)``, ``(G, T, D)`` -> ``keep``
``(G, k)`` ascending and ``values`` ``(G, k, D)``: ``V`` and ``T`` unchanged, each merged centre in
its own slot, the global token in the slot of the last (highest-index) token it merges.

Departures from the official code:
(1) the budget, above; (2) [CLS] attention is the adapter's head mean, not a single-head softmax
over the concatenated 1024-d q/k; (3) no CLIP text encoder: the text similarity is the ``text_pool``
cosine of the projected tokens with the prompt's text-token input embeddings (padding ignored);
``"mean"`` (default) ranks exactly as the cosine with one pooled text vector, as the official
CLIP text embedding, but pools the whole prompt (template included), not only the question;
``text_weight`` keeps the official ``50 * 768 ** -0.5`` scale of that cosine next to the
neighbour cosine; (4) neighbours are ranked by the cosine of the projected tokens, not of the
last layer's keys, and projected tokens are merged, not the vision features before the projector;
(5) fixed bugs: the centre count uses ``|R|``, not the hidden size 1024 (quirk 1); centres'
features and keys come from the same indices (quirk 2); the counts use integer arithmetic; text
recovery never re-selects a ``V`` token; the global token is kept even with no centre;
(6) ``faithful=True`` (default) keeps the official **sums** (centre + un-normalised attention-weighted
neighbour sum; global = un-normalised weighted sum); ``faithful=False`` uses attention-weighted
**means** (the README's "merge each cluster into a single token"), the centre weighted by its own
attention. Neighbourhoods overlap in both (quirk 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod
from ._textguided import check_text_pool, keep_from_mask, split_in_proportion, text_relevance, top_mask

LOF_THRESHOLD = 1.5  # scikit-learn's contamination="auto": outlier iff LOF > 1.5


def lof_outliers(values: torch.Tensor, member: torch.Tensor, n_neighbors: int) -> torch.Tensor:
    """Local Outlier Factor outliers among the 1-D ``values`` ``(G, N)`` of each group's ``member``
    tokens ``(G, N)`` bool -> ``(G,)`` counts, as scikit-learn's ``LocalOutlierFactor(n_neighbors,
    contamination="auto").fit_predict`` on each group's members (``n_neighbors`` capped at
    ``members - 1``; no outlier with fewer than 2 members). fp64.

    For each member ``p``: its ``n`` nearest other members ``N(p)`` (ties to the lower index),
    ``kdist(p)`` = distance to the ``n``-th, ``reach(p, o) = max(kdist(o), |p - o|)``,
    ``lrd(p) = 1 / (mean_o reach(p, o) + 1e-10)``, ``LOF(p) = mean_o lrd(o) / lrd(p)``.
    """
    G, N = values.shape
    v = values.double()
    size = member.sum(dim=-1)  # (G,)
    n = size.sub(1).clamp(min=1, max=n_neighbors)  # (G,) neighbours per group
    width = max(1, min(n_neighbors, N - 1))
    dist = (v[:, :, None] - v[:, None, :]).abs()  # (G, N, N)
    eye = torch.eye(N, dtype=torch.bool, device=v.device)
    dist = dist.masked_fill(~member[:, None, :] | eye, float("inf"))  # only other members are neighbours
    dist, nb = torch.sort(dist, dim=-1, stable=True)
    dist, nb = dist[..., :width], nb[..., :width]  # (G, N, width) nearest first
    col = torch.arange(width, device=v.device) < n[:, None, None]  # (G, 1, width) the n neighbours
    kdist = dist.gather(-1, (n - 1)[:, None, None].expand(G, N, 1))[..., 0]  # (G, N)

    def at_nb(t: torch.Tensor) -> torch.Tensor:  # (G, N) -> (G, N, width): the value at each neighbour
        return t.gather(1, nb.flatten(1)).view(G, N, width)

    reach = torch.maximum(dist, at_nb(kdist))  # (G, N, width)
    lrd = 1.0 / (torch.where(col, reach, 0.0).sum(dim=-1) / n[:, None] + 1e-10)  # (G, N)
    lof = torch.where(col, at_nb(lrd), 0.0).sum(dim=-1) / n[:, None] / lrd
    return (member & (lof > LOF_THRESHOLD) & (size >= 2)[:, None]).sum(dim=-1)


@register(
    "recoverable",
    family="tokens",
    paper="Recoverable Compression: A Multimodal Vision Token Recovery Mechanism Guided by Text Information",
    stages=("vision",),
    signals=("cls_attention@last-vision-layer", "tokens", "text_embeddings"),
    summary="[CLS]-attention tokens + text-recovered tokens + KNN-merged centres + one global token",
)
@dataclass
class RecoverableCompression(TokenMethod):
    # 0-based vision layer of the [CLS] row: -1 = the last (official); None = the VLM's feature layer
    layer: int | None = -1
    lof_neighbors: int = 20  # LOF n_neighbors for the visual and text counts (official 20)
    lof_neighbors_rest: int = 10  # LOF n_neighbors for the centre count (official 10)
    merge_neighbors: int = 32  # neighbours merged into each centre (official 32)
    text_weight: float = 50 * 768**-0.5  # weight of the text cosine when ranking neighbours
    text_pool: str = "mean"  # "mean" | "max" cosine to the text tokens
    faithful: bool = True  # official un-normalised sums (True) or weighted means (False)

    def __post_init__(self) -> None:
        for name in ("lof_neighbors", "lof_neighbors_rest", "merge_neighbors"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"recoverable: {name} must be an int >= 1; got {v!r}")
        w = self.text_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 <= w < float("inf"):
            raise ValueError(f"recoverable: text_weight must be a finite float >= 0; got {w!r}")
        check_text_pool("recoverable", self.text_pool)

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("cls_attention", self.layer), Signal("tokens"), Signal("text_embeddings"))

    def adaptive_counts(self, attn: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
        """``(G, 3)``: ``|V|, |T|, |C|`` as the official code picks them, from the [CLS] attention and
        the text similarity ``(G, N)``."""
        G, N = attn.shape
        everyone = torch.ones(G, N, dtype=torch.bool, device=attn.device)
        n_v = lof_outliers(attn, everyone, self.lof_neighbors)
        V = top_mask(attn, everyone, n_v)
        sim_v = torch.where(V, sim.amin(dim=-1, keepdim=True), sim)  # official: V's similarity -> min
        n_t = (N - n_v) * lof_outliers(sim_v, everyone, self.lof_neighbors) // N
        rest = ~(V | top_mask(sim, ~V, n_t))
        n_c = lof_outliers(attn, rest, self.lof_neighbors_rest)
        return torch.stack([n_v, n_t, n_c], dim=-1)

    def select(self, ctx: TokenContext, k: int) -> Selection:
        G, N = ctx.num_groups, ctx.num_tokens
        x = ctx.tokens
        if k >= N:
            return Selection(torch.arange(N, device=x.device).expand(G, -1))
        attn = ctx.signal("cls_attention", self.layer).float()  # (G, N)
        sim = text_relevance(x, ctx.signal("text_embeddings"), self.text_pool)  # (G, N)
        counts = self.adaptive_counts(attn, sim)
        counts[:, 0] += counts.sum(dim=-1) == 0  # no outlier at all: every slot to V
        n_v, n_t, n_c = split_in_proportion(counts, k - 1).unbind(dim=-1)  # (G,) each, sum k - 1
        everyone = torch.ones(G, N, dtype=torch.bool, device=x.device)
        V = top_mask(attn, everyone, n_v)
        T = top_mask(sim, ~V, n_t)
        R = ~(V | T)
        C = top_mask(attn, R, n_c)
        merged, glob, slot = self.merge(x, attn, sim, R, C)  # (G, N, D), (G, D), (G,)
        rows = torch.arange(G, device=x.device)
        out = torch.where(C[..., None], merged, x.float())
        out[rows, slot] = glob
        kept = V | T | C
        kept[rows, slot] = True  # |R \ C| = N - k + 1 >= 2, so the slot is free
        keep = keep_from_mask(kept, k)
        return Selection(keep, values=out.gather(1, keep[..., None].expand(-1, -1, x.shape[-1])).to(x.dtype))

    def merge(
        self, x: torch.Tensor, attn: torch.Tensor, sim: torch.Tensor, R: torch.Tensor, C: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 3-4: every token merged with its neighbours in ``R`` (only the centres' rows are
        used) ``(G, N, D)``, the global token of ``R \\ C`` ``(G, D)`` and its slot ``(G,)``."""
        G, N, _ = x.shape
        xf = x.float()
        f = torch.nn.functional.normalize(xf, dim=-1)
        # (G, N, N): row = a centre, column = a candidate neighbour
        rank = f @ f.transpose(-1, -2) + self.text_weight * sim[:, None, :]
        eye = torch.eye(N, dtype=torch.bool, device=x.device)
        rank = rank.masked_fill(~R[:, None, :] | eye, float("-inf"))  # candidates: R, never itself
        m = min(self.merge_neighbors, N)
        top = torch.sort(rank, dim=-1, descending=True, stable=True)
        nb, ok = top.indices[..., :m], top.values[..., :m] > float("-inf")  # (G, N, m)
        w_nb = attn.gather(1, nb.flatten(1)).view(G, N, m) * ok
        W = torch.zeros(G, N, N, device=x.device).scatter_(-1, nb, w_nb)  # W[c, j] = a_j, j in nb(c)
        rest = R & ~C
        w_glob = attn * rest  # (G, N)
        if self.faithful:  # official: sums, not means
            merged = xf + W @ xf
            glob = (w_glob[..., None] * xf).sum(dim=1)
        else:
            W = W + torch.diag_embed(attn)  # the centre joins its own cluster, weighted by its attention
            merged = (W @ xf) / W.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(xf.dtype).tiny)
            glob = (w_glob[..., None] * xf).sum(dim=1) / w_glob.sum(dim=-1, keepdim=True).clamp(
                min=torch.finfo(xf.dtype).tiny
            )
        pos = torch.arange(N, device=x.device)
        slot = torch.where(rest, pos, -1).argmax(dim=-1)  # the last token the global token merges
        return merged, glob, slot
