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
