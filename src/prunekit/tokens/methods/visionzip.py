"""VisionZip — "VisionZip: Longer is Better but Not Necessary in Vision Language Models" (CVPR 2025).

Two kinds of visual tokens survive, per image [official code, spec B4]:

- **dominant**: the tokens the [CLS] query of the feature layer attends to most (the official code
  sums the CLS row over heads; the adapter's head mean ranks the same), kept in original order;
- **contextual**: the other tokens are merged. ``C`` targets are taken at a uniform stride
  ``max(1, R // C)`` through the ``R`` remaining tokens (original order), every other remaining
  token joins its most cosine-similar target, and each contextual token is **the target plus the
  mean of its members** (not the mean of all; a target without members stays as it is).

Budget: of ``k`` slots, ``round(k * dominant_ratio)`` are dominant and the rest contextual; the
default ``54 / 64`` gives the README's 54 + 10 for 64 tokens and the paper's 108 + 20, 162 + 30
for 128, 192. Shapes: ``cls_attention`` ``(G, N)``, ``tokens`` ``(G, N, D)`` -> ``keep`` ``(G, k)``
ascending (dominant tokens and the contextual targets) and ``values`` ``(G, k, D)``: the dominant
tokens unchanged, each contextual token in its target's slot.

Departures from the official code: (1) similarity is the cosine of the **projected visual tokens**
(``tokens``), not of the feature layer's keys (head mean), and the merge averages projected tokens
instead of the feature layer's hidden states before the projector (the projector is non-linear,
so merge-then-project differs); (2) the [CLS] token is not a candidate (the adapter hands patch
tokens only), so its dominant slot goes to one more patch token (official: 53 patches + CLS + 10);
(3) ties go to the lower index (dominant and target assignment); (4) a contextual token sits at
its target's place in the sequence (and takes its position id) instead of being appended after the
dominant tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...registry import register
from ..context import Selection, Signal, TokenContext, TokenMethod, topk_sorted


def merge_contextual(x: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's contextual tokens from ``x (G, R, D)``: ``(targets (num,), merged (G, num, D))``,
    targets at a uniform stride through the ``R`` tokens; each merged token is its target plus the
    mean of the tokens most cosine-similar to it (hard assignment, counts clamped to >= 1)."""
    R = x.shape[1]
    step = max(1, R // num)
    is_target = torch.zeros(R, dtype=torch.bool, device=x.device)
    is_target[torch.arange(0, R, step, device=x.device)[:num]] = True
    targets, others = x[:, is_target].float(), x[:, ~is_target].float()  # (G, num, D), (G, R - num, D)
    f_t = torch.nn.functional.normalize(targets, dim=-1)
    f_o = torch.nn.functional.normalize(others, dim=-1)
    assign = (f_o @ f_t.transpose(-1, -2)).argmax(dim=-1)  # (G, R - num) target of each other token
    onehot = torch.nn.functional.one_hot(assign, num).float()  # (G, R - num, num)
    counts = onehot.sum(dim=1).clamp(min=1)[..., None]  # (G, num, 1)
    merged = (targets + onehot.transpose(-1, -2) @ others / counts).to(x.dtype)
    return is_target.nonzero().flatten(), merged


@register(
    "visionzip",
    family="tokens",
    paper="VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    stages=("vision",),
    signals=("cls_attention@vision-layer", "tokens"),
    summary="keep the top [CLS]-attention tokens, merge the rest into a few contextual tokens",
)
@dataclass
class VisionZip(TokenMethod):
    dominant_ratio: float = 54 / 64  # share of the budget kept as dominant tokens; the rest merged
    layer: int | None = None  # 0-based vision layer of the [CLS] row; None = the VLM's feature layer

    def __post_init__(self) -> None:
        if not 0.0 < self.dominant_ratio <= 1.0:
            raise ValueError(f"visionzip: dominant_ratio must be in (0, 1]; got {self.dominant_ratio!r}")

    def needs(self, stage: str) -> tuple[Signal, ...]:
        return (Signal("cls_attention", self.layer), Signal("tokens"))

    def score(self, ctx: TokenContext) -> torch.Tensor:
        return ctx.signal("cls_attention", self.layer)  # (G, N)

    def select(self, ctx: TokenContext, k: int) -> Selection:
        G, N = ctx.num_groups, ctx.num_tokens
        if k >= N:
            return Selection(torch.arange(N, device=ctx.tokens.device).expand(G, -1))
        n_dom = min(k, max(1, round(k * self.dominant_ratio)))
        keep = topk_sorted(self.score(ctx), n_dom)  # (G, n_dom)
        if n_dom == k:
            return Selection(keep)
        is_dom = torch.zeros(G, N, dtype=torch.bool, device=keep.device).scatter_(1, keep, True)
        rest = torch.sort(is_dom.int(), dim=-1, stable=True).indices[:, : N - n_dom]  # (G, R) ascending
        D = ctx.tokens.shape[-1]
        x = ctx.tokens.gather(1, rest[..., None].expand(-1, -1, D))  # (G, R, D)
        targets, merged = merge_contextual(x, k - n_dom)
        # each contextual token takes its target's slot (and position id)
        target_idx = rest[:, targets]  # (G, k - n_dom)
        all_idx = torch.cat([keep, target_idx], dim=1)
        vals = torch.cat([ctx.tokens.gather(1, keep[..., None].expand(-1, -1, D)), merged], dim=1)
        order = torch.sort(all_idx, dim=-1).indices
        return Selection(all_idx.gather(1, order), values=vals.gather(1, order[..., None].expand(-1, -1, D)))
