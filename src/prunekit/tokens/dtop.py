"""DToP — "Dynamic Token Pruning in Plain Vision Transformers for Semantic Segmentation" (Tang et
al., ICCV 2023): early exit of easy tokens in a plain-ViT segmenter.

The backbone is split into stages by auxiliary heads (``heads.exits``: the blocks after which a
head reads the tokens). At each boundary the head predicts every token still in play; a token
whose top class probability is at least ``p0`` is *easy*: its prediction is final and it leaves
the computation (no later block sees it). To keep context for the hard tokens, the ``top_k`` most
confident easy tokens of each predicted class stay anyway. The tokens left at the end are
classified by the final head. The [CLS] token (and any register token) always stays.

Defaults: ``p0 = 0.95`` and ``top_k = 5`` (the spec's values); the exits at blocks 4 and 8 of 12
(three stages) are the library's choice for DINOv2-S, **unconfirmed** (the paper places its
heads per backbone). Heads: :class:`prunekit.zoo.segmentation.SegHeads`.

The paper trains the segmenter with DToP in the loop. With a frozen backbone, heads fit on dense
features see shifted features once easy tokens have left (fewer tokens to attend to);
:func:`prunekit.zoo.segmentation.fit_heads_in_loop` refits the later heads on the features DToP
itself produces, the closest this setting gets to that training.

This is an architecture with trained heads, not a score-and-select method, so it is not in the
token registry: :class:`DToP` runs the model's own embeddings, blocks and final norm, unchanged
(nothing is patched), on a batch with a different number of tokens per image (kept tokens
packed first, the unused slots masked as keys). Vectorised over the batch and the tokens; the
loop is over blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.sequence import gather_tokens, key_mask, right_pack


@dataclass
class DToPOutput:
    logits: torch.Tensor  # (B, N, C) per patch: from the head where the patch exited, else the final head
    exit_block: torch.Tensor  # (B, N) the block after which each patch exited; depth = the final head
    tokens_per_block: list[torch.Tensor] = field(default_factory=list)  # per block, (B,) tokens it processed
    #: with ``collect=True``: per head (exit block, or ``"final"``), the features it read of the
    #: patches still in play, ``(n, D)``, and their ``(image, patch)`` indices ``(n, 2)``
    features: dict = field(default_factory=dict)


def block_flops(n: torch.Tensor | int, dim: int, mlp_ratio: float) -> torch.Tensor | float:
    """Multiply-adds x 2 of one ViT block on ``n`` tokens: q/k/v/o and MLP projections, ``QK^T``, ``AV``."""
    return 2 * n * dim * dim * (4 + 2 * mlp_ratio) + 4 * n * n * dim


def easy_tokens(
    conf: torch.Tensor, cls: torch.Tensor, alive: torch.Tensor, p0: float, top_k: int
) -> torch.Tensor:
    """``(B, N)`` tokens that exit: alive, confidence ``>= p0``, and not among the ``top_k`` most
    confident easy tokens of their predicted class in their image (ties: lower index stays)."""
    easy = alive & (conf >= p0)
    if top_k <= 0:
        return easy
    B, N = conf.shape
    C = int(cls.max()) + 1 if cls.numel() else 1
    # rank each easy token within (image, class) by confidence, descending: sort by class, then conf
    key = torch.where(
        easy, cls.double() * 2 + (1 - conf.double()), torch.full_like(conf, 2.0 * C, dtype=torch.float64)
    )
    order = torch.sort(key, dim=1, stable=True).indices  # (B, N): grouped by class, most confident first
    cls_sorted = torch.where(easy.gather(1, order), cls.gather(1, order), -1)
    start = torch.ones_like(cls_sorted, dtype=torch.bool)
    start[:, 1:] = cls_sorted[:, 1:] != cls_sorted[:, :-1]
    idx = torch.arange(N, device=conf.device).expand(B, N)
    first = torch.cummax(torch.where(start, idx, 0), dim=1).values  # index where each run starts
    rank = torch.empty_like(idx).scatter_(1, order, idx - first)
    return easy & (rank >= top_k)


class DToP:
    """``DToP(model, heads, p0=0.95, top_k=5)(pixel_values) -> DToPOutput`` for a ``Dinov2Model``
    (or a ViT whose model has ``embeddings``, ``encoder.layer`` and ``layernorm``). ``exits``: the
    boundaries used, a subset of ``heads.exits`` (default: all)."""

    def __init__(
        self,
        model: nn.Module,
        heads: nn.Module,
        p0: float = 0.95,
        top_k: int = 5,
        exits: tuple[int, ...] | None = None,
    ) -> None:
        if not 0.0 < p0 <= 1.0 and p0 != float("inf"):
            raise ValueError(f"dtop: p0 must be in (0, 1] (or inf: no early exit); got {p0!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"dtop: top_k must be an int >= 0; got {top_k!r}")
        self.layers = getattr(getattr(model, "encoder", None), "layer", None)
        if self.layers is None or not hasattr(model, "embeddings") or not hasattr(model, "layernorm"):
            raise ValueError(f"dtop: expected a Dinov2Model-like backbone; got {type(model).__name__}")
        self.exits = tuple(heads.exits if exits is None else exits)
        bad = [b for b in self.exits if not 1 <= b < len(self.layers) or b not in heads.exits]
        if bad:
            raise ValueError(
                f"dtop: exit blocks must be in [1, {len(self.layers) - 1}] and have a head "
                f"({list(heads.exits)}); got {bad}"
            )
        self.model, self.heads, self.p0, self.top_k = model, heads, p0, top_k
        self.protected = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, collect: bool = False) -> DToPOutput:
        x = self.model.embeddings(pixel_values)  # (B, P + N, D)
        B, T, _ = x.shape
        P, dev = self.protected, x.device
        depth = len(self.layers)
        pos = torch.arange(T, device=dev).expand(B, T)  # slot -> input position
        valid = torch.ones(B, T, dtype=torch.bool, device=dev)
        logits: torch.Tensor | None = None
        exit_block = torch.full((B, T + 1), depth, dtype=torch.long, device=dev)  # slot T: the sink
        mask, counts, feats = None, [], {}

        def keep_features(key, h: torch.Tensor) -> None:  # the features a head reads, patches in play
            alive = valid[:, P:]
            b, s = alive.nonzero(as_tuple=True)
            feats[key] = (h[b, s], torch.stack([b, pos[:, P:][b, s] - P], dim=1))

        for i, layer in enumerate(self.layers):
            if i in self.exits:
                if collect:
                    keep_features(i, x[:, P:])
                out = self.heads.auxiliary(i, x[:, P:])  # (B, T'-P, C)
                conf, cls = out.softmax(-1).max(-1)
                leave = easy_tokens(conf, cls, valid[:, P:], self.p0, self.top_k)
                if logits is None:
                    logits = out.new_zeros(B, T + 1, out.shape[-1])  # slot T: a sink for padding
                where = torch.where(leave, pos[:, P:], T)
                logits.scatter_(1, where[..., None].expand_as(out), out)
                exit_block.scatter_(1, where, torch.full_like(where, i))
                keep = valid.clone()
                keep[:, P:] &= ~leave
                local, valid = right_pack(keep)
                x, pos = gather_tokens(x, local, 1), pos.gather(1, local)
                mask = key_mask(valid, x.dtype)
            counts.append(valid.sum(dim=1))
            x = layer(x, attention_mask=mask)
        final = self.model.layernorm(x)[:, P:]
        if collect:
            keep_features("final", final)
        out = self.heads.head(final)
        if logits is None:
            logits = out.new_zeros(B, T + 1, out.shape[-1])
        where = torch.where(valid[:, P:], pos[:, P:], T)
        logits.scatter_(1, where[..., None].expand_as(out), out)
        return DToPOutput(logits[:, P:T], exit_block[:, P:T], counts, feats)
