"""The engine of LazyLLM (:mod:`prunekit.kv.methods.lazyllm`): token pruning *inside* the prefill,
per-step re-selection while decoding, and the auxiliary cache that revives pruned tokens.

The decoder is split at the method's pruning layers ``c_1 < ... < c_S`` into segments
``[0, c_1), [c_1, c_2), ..., [c_S, n)``. Every token computed in a segment is computed in all of
its layers, so one slot layout per segment describes the KV cache of each of its layers. Per
forward call (the prefill, or a decoding step) the engine keeps

- the **query set**: the tokens being computed in the current segment, right-packed ``(B, q)``
  with their sequence indices (``-1`` for an empty slot); the call's new tokens are always last;
- at each pruning layer ``c_s``: the head-mean attention of the call's last token(s) at layer
  ``c_s - 1`` (recomputed from that layer's q projection and its cached keys, so SDPA stays on)
  over the tokens *active* there; the top ``k_s`` prompt tokens are active in segment ``s``
  (generated tokens always are). Query tokens not active go to the aux cache ``aux[s]`` (their
  hidden state at the input of ``c_s``); active tokens without KV in segment ``s`` yet join the
  query set — from the current hidden states, or *revived* from ``aux[s]``;
- for every layer of segment ``s >= 1`` the model's mask, RoPE tables and position ids are
  replaced by ones over this segment's slots: a query at sequence index ``p`` attends to the
  active keys at indices ``<= p`` (and to itself).

Segment 0 is untouched (the whole sequence, the model's own mask and positions). Before the
final norm only the call's last rows are kept: the last prompt token after a prefill, the new
tokens after a decoding step. Position ids come from layer 0's full-length cache (``generate``'s
own tracking), hence right. Hooks only; everything is undone on exit, also after an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PrunekitError, UnsupportedModelError
from ..models.base import HookSet, Timer, fmt_seconds
from ..models.compat import cache_of
from ..models.sequence import decoder_call, real_tokens
from ..tokens.schedule import group_counts
from .engine import KVStats, _text_model, sliding_layers
from .signals import rotated_queries


@dataclass(repr=False)  # the summary of KVStats, with the revivals
class LazyStats(KVStats):
    """What one LazyLLM session did: ``entries_kept`` counts the prompt KV entries computed (by the
    prefills, plus revivals while decoding); ``compress_seconds`` the scoring, selection, gathers
    and masks of the prefills and decoding steps."""

    entries_kept_prefill: int = 0  # of ``entries_kept``, by the prefills
    revived: int = 0  # (token, segment) revivals from the aux cache while decoding

    @property
    def prefill_kept_fraction(self) -> float:
        """The budget's own measure: prompt KV entries the prefills computed, of a dense prefill's."""
        return self.entries_kept_prefill / self.entries_in if self.entries_in else 1.0

    def __repr__(self) -> str:
        lines = [
            *self._lines(),
            f"  by the prefills: {self.entries_kept_prefill:,} ({self.prefill_kept_fraction:.1%}); "
            f"revived while decoding: {self.revived:,}",
            f"  selection time: {fmt_seconds(self.compress_seconds)}",
        ]
        return "\n".join(lines)

    __str__ = __repr__


def _arg(args: tuple, kw: dict, name: str):
    return args[0] if args else kw[name]


class LazySession:
    """The live state of one LazyLLM ``compress_kv`` block."""

    #: the bench feeds teacher-forced continuations one token per call, as generate() decodes
    stepwise = True

    def __init__(self, model: nn.Module, method, keep: int | float) -> None:
        self.method, self.keep = method, keep
        self.text_model = tm = _text_model(model)
        if any(sliding_layers(tm)):
            raise UnsupportedModelError(
                f"lazyllm: {type(model).__name__} mixes sliding-window and full-attention layers; its "
                "segments would need per-layer-type windows and RoPE tables, which are not handled"
            )
        self.layers = tm.layers
        n = self.n_layers = len(self.layers)
        self.cuts = method.cuts(n)
        if isinstance(keep, float) and keep < self.cuts[0] / n:
            raise ValueError(
                f"lazyllm: keep={keep} is below what pruning layers {list(self.cuts)} allow: layers "
                f"0..{self.cuts[0] - 1} compute every prompt token, so at least {self.cuts[0] / n:.3f} "
                "of the cache is kept; give earlier pruning layers (option 'layers') or a larger keep"
            )
        self.S = len(self.cuts)
        bounds = [0, *self.cuts, n]
        self.seg_of = [next(s for s in range(self.S + 1) if bounds[s] <= j < bounds[s + 1]) for j in range(n)]
        self.seg_len = [bounds[s + 1] - bounds[s] for s in range(self.S + 1)]
        cfg = tm.config
        self.hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        sliding = getattr(cfg, "use_sliding_window", True)
        self.window = getattr(cfg, "sliding_window", None) if sliding else None
        self.hooks = HookSet()
        self.stats = LazyStats(method=method.name)
        self.on = False

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        h = self.hooks
        h.pre(self.text_model, self._on_model)
        for j in range(self.cuts[0], self.n_layers):
            h.pre(self.layers[j], self._on_layer)
        for s, c in enumerate(self.cuts, start=1):
            h.post(self.layers[c - 1].self_attn, self._scorer(s), with_kwargs=True)
        h.pre(self.text_model.norm, self._on_norm, with_kwargs=False)

    def remove(self) -> None:
        self.hooks.remove()

    # ------------------------------------------------------------------ per call
    def _on_model(self, module: nn.Module, args: tuple, kw: dict):
        x, past, am2d = decoder_call(args, kw)
        B, q = x.shape[:2]
        dev = x.device
        pid = kw.get("position_ids")
        if past == 0:
            self.on = kw.get("use_cache") is not False  # no cache: nothing to revive from; dense
            if not self.on:
                return None
            if self.window is not None and self.window < q:
                raise PrunekitError(f"lazyllm: a {q}-token prompt exceeds the sliding window {self.window}")
            self.prefill, self.L, self.P, self.start, self.q_new = True, q, q, 0, q
            self.valid = real_tokens(am2d, x, "lazyllm")
            self.pid = (torch.arange(q, device=dev)[None] if pid is None else pid.reshape(-1, q)).expand(B, q)
            n_real = self.valid.sum(dim=1).tolist()
            per_n = {m: group_counts(self.method, int(m), self.keep, self.n_layers) for m in set(n_real)}
            self.k = torch.tensor([per_n[m] for m in n_real], device=dev).T  # (S, B)
            self.computed = [None] + [torch.zeros(B, q, dtype=torch.bool, device=dev) for _ in self.cuts]
            self.aux: list[torch.Tensor | None] = [None] * (self.S + 1)
            self.seg_pos = [None] + [torch.empty(B, 0, dtype=torch.long, device=dev) for _ in self.cuts]
            self.seg_valid = [None] + [torch.empty(B, 0, dtype=torch.bool, device=dev) for _ in self.cuts]
            prompt_entries = int(self.valid.sum()) * self.hkv
            self.stats.calls += 1
            self.stats.entries_in += prompt_entries * self.n_layers
            self.stats.entries_kept += prompt_entries * self.seg_len[0]
            self.stats.entries_kept_prefill += prompt_entries * self.seg_len[0]
        else:
            if not self.on:
                return None
            if past != self.P:
                raise PrunekitError(
                    f"lazyllm: the cache holds {past} tokens in layer 0 but this session has seen {self.P}; "
                    "continue the sequence it prefilled (beam search and cache reuse are not supported)"
                )
            self.prefill, self.start, self.q_new = False, self.P, q
            new_valid = (
                am2d[:, -q:].bool() if am2d is not None else torch.ones(B, q, dtype=torch.bool, device=dev)
            )
            new_pid = (torch.arange(q, device=dev) + past)[None] if pid is None else pid.reshape(-1, q)
            self.valid = torch.cat([self.valid, new_valid], dim=1)
            self.pid = torch.cat([self.pid, new_pid.expand(B, q)], dim=1)
            grown = [torch.cat([c, new_valid.new_zeros(B, q)], dim=1) for c in self.computed[1:]]
            self.computed = [None, *grown]
            self.P += q
        self.active: list[torch.Tensor | None] = [self.valid] + [None] * self.S
        self.qpos = (self.start + torch.arange(q, device=dev))[None].expand(B, q)
        self.qfill = torch.ones(B, q, dtype=torch.bool, device=dev)
        self.score: list[torch.Tensor | None] = [None] * (self.S + 1)
        self.mask: list = [None] * (self.S + 1)
        self.pe: list = [None] * (self.S + 1)
        self.pids: list = [None] * (self.S + 1)
        return None

    def _slots(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence index and validity of each cache slot of segment ``s``'s layers."""
        if s == 0:
            B, P = self.valid.shape
            return torch.arange(P, device=self.valid.device)[None].expand(B, P), self.valid
        return self.seg_pos[s], self.seg_valid[s]

    def _scorer(self, s: int):
        """Post-hook on the attention of layer ``c_s - 1``: the last token's attention there."""

        def hook(attn: nn.Module, args: tuple, kw: dict, out) -> None:
            if not self.on:
                return
            with Timer() as t:
                self.score[s] = self._last_token_attention(attn, kw, s - 1)
            self.stats.compress_seconds += t.seconds

        return hook

    def _last_token_attention(self, attn: nn.Module, kw: dict, seg: int) -> torch.Tensor:
        h, (cos, sin) = kw["hidden_states"], kw["position_embeddings"]
        keys = cache_of(kw).layers[attn.layer_idx].keys  # (B, Hkv, K, hd)
        spos, svalid = self._slots(seg)
        B, K = spos.shape
        if keys.shape[2] != K:
            raise PrunekitError(
                f"lazyllm: layer {attn.layer_idx} caches {keys.shape[2]} entries, the engine expected {K}"
            )
        if self.prefill:  # the last prompt token (the last query slot)
            h, cos, sin, qpos = h[:, -1:], cos[:, -1:], sin[:, -1:], self.qpos[:, -1:]
            w = torch.ones(B, 1, device=h.device)
        else:  # the call's real new tokens
            qpos = self.qpos
            w = (self.qfill & (qpos >= self.start) & self.valid.gather(1, qpos.clamp_min(0))).float()
        q = rotated_queries(attn, h, cos, sin)  # (B, Hq, r, hd)
        Hq, r, hd = q.shape[1], q.shape[2], q.shape[3]
        Hkv = keys.shape[1]
        logits = (q.float().reshape(B, Hkv, (Hq // Hkv) * r, hd) @ keys.float().transpose(-1, -2)).view(
            B, Hq, r, K
        ) * attn.scaling
        key_ok = svalid & self.active[seg].gather(1, spos.clamp_min(0))  # (B, K)
        allowed = key_ok[:, None, :] & (spos[:, None, :] <= qpos[:, :, None])  # (B, r, K)
        probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        rows = probs.mean(dim=1)  # (B, r, K) head mean
        per_slot = (rows * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1.0)
        out = torch.zeros(B, self.P, device=h.device)
        return out.scatter_add_(1, spos.clamp_min(0), per_slot * svalid)

    # ------------------------------------------------------------------ the cut
    def _cut(self, s: int, h: torch.Tensor, eager: bool) -> torch.Tensor:
        B, q, D = h.shape
        P, L = self.P, self.L
        dev = h.device
        pos = torch.arange(P, device=dev)[None]  # (1, P)
        cand = self.active[s - 1] & (pos < L) & self.valid
        score = self.score[s].masked_fill(~cand, float("-inf"))
        if self.prefill:  # the last prompt token makes the next token: it always goes on
            score[:, L - 1] = float("inf")
        order = score.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, pos.expand(B, P))
        active = (cand & (rank < self.k[s - 1][:, None])) | ((pos >= L) & self.valid)
        need = active & ~self.computed[s]  # (B, P) tokens to compute in segment s
        if not self.prefill:  # the call's new tokens always go on (real or padding: they are output)
            need = need | (pos >= self.start)

        # query tokens that stop here leave their hidden state in the aux cache
        qpos, qfill = self.qpos, self.qfill
        qp = qpos.clamp_min(0)
        store = qfill & (qpos >= 0) & (qpos < L) & ~active.gather(1, qp) & self.valid.gather(1, qp)
        if bool(store.any()):
            if self.aux[s] is None:
                self.aux[s] = h.new_zeros(B, L, D)
            b = torch.arange(B, device=dev)[:, None].expand(B, q)[store]
            self.aux[s][b, qpos[store]] = h[store]

        # the new query set: right-packed, ascending sequence index
        qn = int(need.sum(dim=1).max())
        idx = need.to(torch.int8).argsort(dim=1, stable=True)[:, P - qn :]  # (B, qn)
        fill = need.gather(1, idx)
        new_pos = torch.where(fill, idx, -1)
        in_q = torch.full((B, P + 1), -1, dtype=torch.long, device=dev)
        rows = torch.arange(q, device=dev)[None].expand(B, q)
        in_q.scatter_(1, torch.where(qfill & (qpos >= 0), qpos, P), rows)
        src = in_q[:, :P].gather(1, idx)  # (B, qn): row of the current query set, or -1
        from_q = src >= 0
        h_new = h.gather(1, src.clamp_min(0)[..., None].expand(B, qn, D))
        revive = fill & ~from_q
        if bool(revive.any()):
            aux = self.aux[s]
            if aux is None:  # by construction every revived token was stored at this cut before
                raise PrunekitError(f"lazyllm: tokens to revive at layer {self.cuts[s - 1]}, no aux cache")
            stored = aux.gather(1, idx.clamp(max=L - 1)[..., None].expand(B, qn, D))
            h_new = torch.where(revive[..., None], stored, h_new)
            self.stats.revived += int(revive.sum())
        key_real = fill & self.valid.gather(1, idx)
        self.computed[s] = self.computed[s] | (need & self.valid)
        self.active[s] = active
        self.qpos, self.qfill = new_pos, fill
        entries = int((key_real & (idx < L)).sum()) * self.seg_len[s] * self.hkv
        self.stats.entries_kept += entries
        if self.prefill:
            self.stats.entries_kept_prefill += entries

        # this segment's slots, mask, RoPE tables and position ids
        spos = self.seg_pos[s] = torch.cat([self.seg_pos[s], new_pos], dim=1)
        sval = self.seg_valid[s] = torch.cat([self.seg_valid[s], key_real], dim=1)
        K = spos.shape[1]
        key_ok = sval & active.gather(1, spos.clamp_min(0))
        allowed = key_ok[:, None, :] & (spos[:, None, :] <= new_pos[:, :, None])  # (B, qn, K)
        own = torch.arange(K, device=dev)[None, :] == (K - qn + torch.arange(qn, device=dev))[:, None]
        allowed = (allowed | own[None])[:, None]  # (B, 1, qn, K)
        if eager:
            allowed = torch.zeros(allowed.shape, dtype=h.dtype, device=dev).masked_fill(
                ~allowed, torch.finfo(h.dtype).min
            )
        self.mask[s] = allowed
        pid = self.pid.gather(1, new_pos.clamp_min(0))
        self.pids[s] = pid
        self.pe[s] = self.text_model.rotary_emb(h_new, position_ids=pid)
        return h_new

    def _on_layer(self, layer: nn.Module, args: tuple, kw: dict):
        if not self.on:
            return None
        attn = layer.self_attn
        j = attn.layer_idx
        s = self.seg_of[j]
        h = _arg(args, kw, "hidden_states")
        if j == self.cuts[s - 1]:
            with Timer() as t:
                h = self._cut(s, h, attn.config._attn_implementation == "eager")
            self.stats.compress_seconds += t.seconds
        kw["attention_mask"] = self.mask[s]
        kw["position_embeddings"] = self.pe[s]
        if "position_ids" in kw:
            kw["position_ids"] = self.pids[s]
        if args:
            return (h, *args[1:]), kw
        kw["hidden_states"] = h
        return args, kw

    def _on_norm(self, norm: nn.Module, args: tuple):
        if not self.on:
            return None
        h = args[0]
        return (h[:, -1:] if self.prefill else h[:, -self.q_new :], *args[1:])
