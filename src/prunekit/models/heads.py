"""SpAtten's cascade head pruning, shared by the decoder (llm stage) and the encoder stage.

A head's importance is the magnitude of its output (L2 norm per token over its ``head_dim``
values, summed over real tokens), accumulated over the layers before the last cut. At each cut
the least important heads still alive are switched off, by head index, for every later layer:
their output is zeroed before the attention's output projection. In software the masked heads
are still computed: this measures the quality, not the saving, of head pruning.
"""

from __future__ import annotations

import torch

from .base import Session


class HeadCascade:
    """Per-call state of cascade head pruning over the layers of one stack.

    ``counts[c]`` heads stay alive after the ``c``-th cut (before layer ``cuts[c]``). Call
    :meth:`reset` at each new forward, :meth:`apply` on the input of every layer's output
    projection, :meth:`cut` at each cut.
    """

    def __init__(self, heads: int, counts: tuple[int, ...], cuts: tuple[int, ...], session: Session) -> None:
        self.heads, self.counts, self.cuts, self.session = heads, counts, cuts, session
        self.reset()

    def reset(self) -> None:
        self.magnitude: torch.Tensor | None = None  # (B, H) cumulative output norm
        self.masks: list[tuple[int, torch.Tensor]] = []  # (first layer, (B, H) alive)

    def apply(self, layer: int, x: torch.Tensor, valid: torch.Tensor | None, accumulate: bool):
        """``x (B, T, H * hd)``, the input of layer ``layer``'s output projection; ``valid (B, T)``
        the real tokens. Accumulates the magnitudes when ``accumulate`` and the layer is before the
        last cut; returns ``x`` with the pruned heads zeroed, or ``None`` when none is pruned."""
        B, T, _ = x.shape
        xh = x.view(B, T, self.heads, -1)
        if accumulate and layer < self.cuts[-1]:
            norm = xh.float().norm(dim=-1)  # (B, T, H)
            if valid is not None:
                norm = norm * valid[..., None]
            mag = norm.sum(dim=1)
            self.magnitude = mag if self.magnitude is None else self.magnitude + mag
        alive = next((m for first, m in reversed(self.masks) if layer >= first), None)
        if alive is None:
            return None
        return (xh * alive[:, None, :, None].to(x.dtype)).view_as(x)

    def cut(self, c: int) -> None:
        """At the ``c``-th cut keep the ``counts[c]`` heads with the largest cumulative magnitude
        among those still alive (ties: lower index first)."""
        k, mag = self.counts[c], self.magnitude
        if mag is None:
            return
        alive = self.masks[-1][1] if self.masks else torch.ones_like(mag, dtype=torch.bool)
        if k >= int(alive.sum(dim=1).min()):
            return
        order = torch.sort(
            mag.masked_fill(~alive, float("-inf")), dim=1, descending=True, stable=True
        ).indices
        keep = torch.zeros_like(alive).scatter_(1, order[:, :k], True)
        self.masks.append((self.cuts[c], keep))
        self.session.stats.head_masks.append((self.cuts[c], keep.cpu()))
