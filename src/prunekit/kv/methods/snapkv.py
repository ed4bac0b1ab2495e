"""SnapKV — "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al., 2024).
Baseline.

Per layer and KV head, after prefill: the last ``window`` prompt tokens are the observation window;
each earlier key is scored by the attention the window's queries pay it (softmax over all keys,
causal, averaged over the window), smoothed along the sequence by 1-D pooling (``kernel``), and
averaged over the query heads of its GQA group; the window itself is always kept (kvpress
``SnapKVPress``: score = max + 1). The top ``keep`` entries survive. Defaults follow kvpress:
``window=64``, ``kernel=5``, average pooling (``pooling="max"`` gives the original repository's
max pooling). The window's rows are recomputed from the layer's q projection and the cached keys,
so SDPA stays on.

A prompt shorter than ``window + 1`` real tokens uses a window of its length minus one (kvpress
asserts instead). Rows of a padded batch are scored on their own real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import KVContext, KVMethod

POOLINGS = ("avg", "max")


def pooled(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D pooling along the last dim with odd ``kernel``, stride 1, same length (zero padding for
    ``avg`` counted in the mean, as ``F.avg_pool1d``; ``-inf`` padding for ``max``)."""
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    if pooling == "avg":
        x = torch.nn.functional.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        x = torch.nn.functional.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    return x.reshape(shape)


def snap_scores(ctx: KVContext, window: int, kernel: int, pooling: str) -> torch.Tensor:
    """``(B, Hkv, L)``: pooled window attention per KV head; the window gets ``max + 1``."""
    A = ctx.signals["window_attention"]  # (B, Hq, w, L)
    w = A.shape[2]
    L = A.shape[-1]
    s = A.mean(dim=2)  # (B, Hq, L)
    body = pooled(s[..., : L - w], kernel, pooling)
    body = ctx.per_kv_head(body)  # (B, Hkv, L - w)
    top = body.amax(dim=-1, keepdim=True) + 1 if body.shape[-1] else torch.ones_like(body[..., :1])
    return torch.cat([body, top.expand(-1, -1, w)], dim=-1)


@register(
    "snapkv",
    family="kv",
    paper="SnapKV: LLM Knows What You are Looking for Before Generation",
    stages=("after-prefill",),
    signals=("window_attention",),
    summary="keep keys the last `window` prompt queries attend to (pooled), plus the window",
)
@dataclass
class SnapKV(KVMethod):
    window: int = 64
    kernel: int = 5
    pooling: str = "avg"

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"{self.name}: window must be an int >= 1; got {self.window!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel must be an odd int >= 1; got {self.kernel!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{self.name}: pooling must be one of {list(POOLINGS)}; got {self.pooling!r}")

    def needs(self) -> tuple[str, ...]:
        return ("window_attention",)

    def score(self, ctx: KVContext) -> torch.Tensor:
        return snap_scores(ctx, self.window, self.kernel, self.pooling)
