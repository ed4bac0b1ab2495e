"""Token pruning *inside* a VLM's vision tower (FlowCut), for LLaVA-style models.

Hooks on the tower's layers ``0 .. L_sel - 1`` (``L_sel``: the layer whose output the VLM takes):
a pre-hook on each layer's attention module computes the method's per-layer statistics from the
layer's normed input (CLS rows only, so SDPA stays on), and a forward hook on the layer shortens
its output to the survivors (the [CLS] token stays first). The tower's outputs are therefore
shorter; :class:`~prunekit.models.vlm.VLMAdapter` scatters the projected features back into their
image slots and hands the survivors to the usual vision-stage selection (signal ``tower_keep``),
so the language model sees exactly the tokens the tower kept.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PrunekitError
from ..tokens.methods.flowcut import flow_score, prune_count
from .base import Session, Timer


class TowerCut:
    """FlowCut's progressive cut over the layers of a vision tower."""

    def __init__(self, adapter, session: Session) -> None:
        cfg = adapter.model.config
        if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
            raise PrunekitError(
                f"{session.method.name}: in-tower pruning needs vision_feature_select_strategy='default' "
                "(the [CLS] token is the relay and is dropped before the projector); got "
                f"{cfg.vision_feature_select_strategy!r}"
            )
        self.adapter, self.session = adapter, session
        self.layers = adapter.vision_layers()
        self.L_sel = adapter.feature_attention_layer()
        if self.L_sel < 1:
            raise PrunekitError(
                f"{session.method.name}: the VLM reads vision layer {self.L_sel}; in-tower pruning needs "
                "at least one layer before it"
            )
        # patches per image and patches kept (plus [CLS]) are set per tower call from the input: a
        # DINOv2 tower runs at any resolution (its config's image_size is only the pretraining one)
        self.n_patches, self.target = 0, 0
        self.kept: list[torch.Tensor] = []  # per tower call: (n_img, K) original patch indices

    def install(self) -> None:
        hooks = self.session.hooks
        for i in range(self.L_sel):
            attn, q, k, heads, scale = self.adapter.attention_parts(self.layers[i])
            hooks.pre(attn, self._stats_hook(i, q, k, attn.v_proj, heads, scale))
            hooks.post(self.layers[i], self._cut_hook(i))

    def reset(self) -> None:
        self.kept = []

    # ------------------------------------------------------------------ hooks
    def _stats_hook(self, i: int, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, heads: int, scale):
        def hook(attn: nn.Module, args: tuple, kw: dict) -> None:
            h = args[0] if args else kw["hidden_states"]
            if i == 0:
                self.n_patches = h.shape[1] - 1
                self.target = self.adapter.tower_target(self.session.keep, self.n_patches)
                self.cum = None
                self.orig = torch.arange(h.shape[1] - 1, device=h.device).expand(h.shape[0], -1)
                self.seconds = 0.0
            if h.shape[1] - 1 <= self.target:
                self.stats = None
                return
            with Timer() as t:
                G, T, D = h.shape
                hd = D // heads
                q = q_proj(h[:, :1]).view(G, 1, heads, hd).transpose(1, 2).float()
                kk = k_proj(h).view(G, T, heads, hd).transpose(1, 2).float()
                v = v_proj(h).view(G, T, heads, hd).transpose(1, 2).float()
                a = ((q @ kk.transpose(-1, -2)) * scale).softmax(dim=-1)[:, :, 0].mean(dim=1)[:, 1:]
                s = (v[:, :, :1] @ v.transpose(-1, -2)).softmax(dim=-1)[:, :, 0].mean(dim=1)[:, 1:]
                vnorm = v.mean(dim=1).abs().sum(dim=-1)[:, 1:]
                score = flow_score(a, s, vnorm)
                self.cum = score if self.cum is None else 0.5 * self.cum + 0.5 * score
                self.stats = a
            self.seconds += t.seconds

        return hook

    def _cut_hook(self, i: int):
        def hook(layer: nn.Module, args: tuple, out):
            x = out[0] if isinstance(out, tuple) else out
            rpl = self.L_sel - i - 1
            result = None
            if self.stats is not None and rpl % 2 == 0:
                with Timer() as t:
                    n = x.shape[1] - 1
                    keep_n = max(n - prune_count(self.stats, self.target, rpl), self.target)
                    order = torch.sort(self.cum, dim=-1, descending=True, stable=True).indices[:, :keep_n]
                    idx = torch.sort(order, dim=-1).values  # (G, keep_n) ascending
                    patches = x[:, 1:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
                    x = torch.cat([x[:, :1], patches], dim=1)
                    self.cum = self.cum.gather(1, idx)
                    self.orig = self.orig.gather(1, idx)
                    result = (x, *out[1:]) if isinstance(out, tuple) else x
                self.seconds += t.seconds
            if rpl == 0:  # the last cut: the survivors are the features
                self.kept.append(self.orig)
                self.session.stats.select_seconds += self.seconds
            return result

        return hook


class QwenTowerCut:
    """FlowCut's Qwen2-VL / Qwen2.5-VL variant inside the vision tower [official code, spec §8].

    No [CLS]: a **pseudo-[CLS]** query, the mean of the image's queries per head, gives
    ``a = softmax(q_mean . K^T / sqrt(d))`` (head mean), and ``score = a * |mean_heads(V)|_1`` (no
    semantic term), smoothed over blocks (``cum = (cum + score) / 2``), cut at the blocks with an
    even number ``rpl = n_blocks - i - 1`` of blocks left by the entropy-adaptive count, straight to
    the target at the last block. Target: ``2K`` merged tokens per image (``K`` = the image's budget;
    the official ``visual.target_num = 2K``), then FlowCut's llm stage cuts to ``K`` at LLM layer 1.

    Departure (the spec's quirk): the official code prunes single pre-merge patches, so the 2x2
    merger then groups patches that are no longer neighbours; here a merged token's 4 patches go or
    stay together (their scores summed, the entropy taken over merged tokens), so every survivor is
    a real merged token with its own slot and M-RoPE position. Each block runs on the survivors:
    its ``cu_seqlens`` (per image; Qwen2.5-VL's windows: per window) and rotary embeddings are cut
    with them. The merger's output goes back to the merged tokens' slots (zeros elsewhere), so HF's
    un-windowing and per-image split stay as they are.
    """

    unit = 4  # patches per merged token (2x2)

    def __init__(self, adapter, session: Session) -> None:
        self.adapter, self.session = adapter, session
        visual = adapter.core.visual
        self.visual, self.blocks = visual, visual.blocks
        self.full = set(getattr(visual, "fullatt_block_indexes", range(len(visual.blocks))))
        self.windowed = hasattr(visual, "fullatt_block_indexes")
        self.kept: list[torch.Tensor] = []  # per image: raster indices of the kept merged tokens
        self.live = False  # inside an image tower call, before the merger

    def install(self) -> None:
        hooks = self.session.hooks
        for i, blk in enumerate(self.blocks):
            hooks.pre(blk, self._block_input(i))
            hooks.pre(blk.attn, self._stats_hook(i))
            hooks.post(blk, self._cut_hook(i))
        hooks.post(self.visual.merger, self._scatter)

    def reset(self) -> None:
        self.kept, self.live = [], False

    # ------------------------------------------------------------------ state per tower call
    def _start(self, kw: dict) -> None:
        a = self.adapter
        thw = a.thw
        self.n_units = [t * h * w // self.unit for t, h, w in thw]  # merged tokens per image
        self.targets = [a.tower_target(self.session.keep, n) for n in self.n_units]
        U = sum(self.n_units)
        dev = kw["position_embeddings"][0].device
        self.image_of = torch.repeat_interleave(torch.arange(len(thw)), torch.tensor(self.n_units)).to(dev)
        self.units = torch.arange(U, device=dev)  # kept merged tokens, block order
        self.cos, self.sin = kw["position_embeddings"]
        self.U, self.cum, self.seconds = U, None, 0.0
        if self.windowed:
            from transformers.vision_utils import get_vision_window_index

            v = self.visual
            grid = torch.tensor(thw)
            self.window_index, cu_win = get_vision_window_index(
                grid, v.spatial_merge_size, v.window_size, v.patch_size
            )
            bounds = (cu_win.to(dev) // self.unit).long()
            self.window_of = torch.searchsorted(bounds[1:], torch.arange(U, device=dev), right=True)
        self.live = True

    def _patches(self) -> torch.Tensor:
        return (self.units[:, None] * self.unit + torch.arange(self.unit, device=self.units.device)).flatten()

    def _seqlens(self, windows: bool, like: torch.Tensor) -> torch.Tensor:
        ids = self.window_of[self.units] if windows else self.image_of[self.units]
        counts = torch.bincount(ids, minlength=int(ids.max()) + 1 if len(ids) else 1) * self.unit
        counts = counts[counts > 0]
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(like.dtype)

    # ------------------------------------------------------------------ hooks
    def _block_input(self, i: int):
        def hook(blk: nn.Module, args: tuple, kw: dict):
            if not self.adapter.in_image_features:
                return None
            if i == 0:
                self._start(kw)
            if len(self.units) == self.U:
                return None  # nothing cut yet: the block runs as it is
            p = self._patches()
            cu = self._seqlens(self.windowed and i not in self.full, kw["cu_seqlens"])
            kw["cu_seqlens"] = cu
            if kw.get("max_seqlen") is not None:
                m = (cu[1:] - cu[:-1]).max()
                kw["max_seqlen"] = m if isinstance(kw["max_seqlen"], torch.Tensor) else int(m)
            kw["position_embeddings"] = (self.cos[p], self.sin[p])
            return args, kw

        return hook

    def _stats_hook(self, i: int):
        def hook(attn: nn.Module, args: tuple, kw: dict) -> None:
            if not (self.adapter.in_image_features and self.live):
                return
            self.stats = None
            counts = torch.bincount(self.image_of[self.units], minlength=len(self.n_units))
            if all(int(c) <= t for c, t in zip(counts, self.targets, strict=True)):
                return
            with Timer() as t:
                from .vlm import qwen_qkv

                h = args[0] if args else kw["hidden_states"]
                P = h.shape[0]
                q, k, v = qwen_qkv(attn, h, *kw["position_embeddings"])  # (H, P, d)
                vnorm = v.mean(dim=0).abs().sum(dim=-1)  # (P,)
                a = torch.empty(P, device=h.device)
                start = 0
                for n in (int(x) * self.unit for x in counts):  # per image (a loop over images)
                    qm = q[:, start : start + n].mean(dim=1, keepdim=True)  # (H, 1, d) pseudo-[CLS]
                    row = ((qm @ k[:, start : start + n].transpose(-1, -2)) * attn.scaling).softmax(dim=-1)
                    a[start : start + n] = row.mean(dim=0)[0]
                    start += n
                unit_a = a.view(-1, self.unit).sum(dim=-1)  # (U',) per merged token
                score = (a * vnorm).view(-1, self.unit).sum(dim=-1)
                self.cum = score if self.cum is None else 0.5 * self.cum + 0.5 * score
                self.stats = unit_a
            self.seconds += t.seconds

        return hook

    def _cut_hook(self, i: int):
        def hook(blk: nn.Module, args: tuple, out):
            if not (self.adapter.in_image_features and self.live):
                return None
            rpl = len(self.blocks) - i - 1
            result = None
            if self.stats is not None and rpl % 2 == 0:
                with Timer() as t:
                    img = self.image_of[self.units]
                    keep = []
                    for g, target in enumerate(self.targets):  # per image
                        own = (img == g).nonzero().flatten()
                        n = len(own)
                        if n <= target:
                            keep.append(own)
                            continue
                        r = prune_count(self.stats[own][None], target, rpl)
                        keep_n = max(n - r, target)
                        order = torch.sort(self.cum[own], descending=True, stable=True).indices[:keep_n]
                        keep.append(own[torch.sort(order).values])
                    sel = torch.cat(keep)
                    self.units, self.cum = self.units[sel], self.cum[sel]
                    rows = (sel[:, None] * self.unit + torch.arange(self.unit, device=sel.device)).flatten()
                    result = out[rows]
                self.seconds += t.seconds
            if rpl == 0:
                self.session.stats.select_seconds += self.seconds
            return result

        return hook

    def _scatter(self, merger: nn.Module, args: tuple, out: torch.Tensor):
        """Merged survivors ``(U', D)`` -> ``(U, D)`` in block order, zeros in the dropped slots; the
        kept merged tokens of each image, as raster indices in it, go to ``self.kept``."""
        if not (self.adapter.in_image_features and self.live):
            return None
        self.live = False
        full = out.new_zeros(self.U, out.shape[-1])
        full[self.units] = out
        raster = self.units if not self.windowed else self.window_index.to(self.units.device)[self.units]
        offsets = torch.tensor([0, *self.n_units]).cumsum(0).to(raster.device)
        img = self.image_of[self.units]
        self.kept = [torch.sort(raster[img == g] - offsets[g]).values for g in range(len(self.n_units))]
        return full
