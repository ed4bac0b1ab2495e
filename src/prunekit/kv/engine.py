"""``compress_kv``: KV-cache compression inside an unchanged ``model.generate()``.

How it works (transformers 5, see the notes on v5):

- **Prefill** runs on the full prompt. A forward hook on each decoder layer's attention then
  scores that layer's cache entries (the method's :meth:`~prunekit.kv.context.KVMethod.score`,
  signals recomputed from the layer's own q projection and the cached keys, so SDPA stays on)
  and keeps, per row and per KV head, the ``k`` best (ascending original order); the cache layer's
  ``keys``/``values`` are replaced by the kept entries.
- **Per query head** (a method whose ``per_query_head`` is True, e.g. ``snapkv`` with
  ``heads="query"``, as the official SnapKV code does on GQA models): the layer's cache is first
  expanded to one KV head per query head (``repeat_kv``), and each query head keeps its own ``k``
  entries. The compressed layer then holds ``Hq`` heads, not the model's ``Hkv``: for the rest of
  that generation its attention runs with ``num_key_value_groups = 1``, and a forward hook on its
  ``k_proj``/``v_proj`` repeats each new token's key and value to ``Hq`` heads before they enter the
  cache (so the cache holds ``Hq / Hkv`` times the entries of a grouped selection at the same
  ``keep``). Both are undone at the next prefill and on exit.
- **Positions**: cached keys keep the RoPE of their original positions. ``generate()`` tracks
  position ids itself; a direct ``model(...)`` call without ``position_ids`` gets them from the
  engine (original prompt length + tokens decoded), never from the shorter cache.
- **Masks**: rows of a left-padded batch may keep different counts, and layers may keep different
  counts (PyramidKV): each layer's kept slots carry a validity flag, and during decoding every
  layer gets its own ``(B, H, q, kv)`` mask (bool for SDPA, additive for eager); the model's
  full-length 2-D mask is replaced.
- Methods with ``decode = True`` (H2O) see every decoding step and may evict more.

Everything is undone on exit from the ``with`` block, also after an exception.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import registry
from ..budget import validate_keep
from ..errors import PrunekitError, UnsupportedModelError
from ..models.base import HookSet, Timer, fmt_count, fmt_seconds
from ..models.compat import cache_of
from ..models.sequence import decoder_call, real_tokens
from .context import KV_SIGNALS, KVContext, KVMethod
from .signals import attention_sum, window_attention

if TYPE_CHECKING:
    from .lazy import LazySession


@dataclass
class KVStats:
    """What one ``compress_kv`` session did.

    ``print(stats)`` (and ``repr``) is a few-line summary: method, cache entries kept of seen,
    per-layer spread, evictions while decoding, time. The kept positions of every prefill and
    layer stay in ``kept``."""

    calls: int = 0  # prefills compressed
    entries_in: int = 0  # prompt cache entries seen (rows x layers x KV heads x real tokens)
    entries_kept: int = 0
    evicted_in_decode: int = 0
    compress_seconds: float = 0.0
    #: per prefill, per layer: original positions ``(B, H, K)`` and validity of the kept slots, H =
    #: the KV heads (the query heads for a per-query-head method); None for a sliding-window layer
    kept: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = field(default_factory=list)
    #: the method's registry name (for the summary)
    method: str = ""

    @property
    def kept_fraction(self) -> float:
        return self.entries_kept / self.entries_in if self.entries_in else 1.0

    def _lines(self) -> list[str]:
        calls = f"{self.calls} prefill{'s' * (self.calls != 1)} compressed"
        lines = [
            f"{type(self).__name__}: {self.method or 'KV compression'}, {calls}",
            f"  cache entries kept: {fmt_count(self.entries_kept)} of {fmt_count(self.entries_in)} "
            f"({self.kept_fraction:.1%}; rows x layers x KV heads x prompt tokens)",
        ]
        last = [x for x in self.kept[-1] if x is not None] if self.kept else []
        if last:
            per = [int(ok.sum()) for _, ok in last]  # entries kept per compressed layer
            spread = f"{per[0]:,}" if min(per) == max(per) else f"{min(per):,} to {max(per):,}"
            left = len(self.kept[-1]) - len(last)
            lines.append(
                f"  last prefill: {spread} entries kept per layer (rows x KV heads), "
                f"{len(last)} layers compressed"
                + (f", {left} sliding-window layers left alone" if left else "")
            )
        return lines

    def __repr__(self) -> str:
        lines = self._lines()
        if self.evicted_in_decode:
            lines.append(f"  evicted while decoding: {self.evicted_in_decode:,}")
        lines.append(f"  compression time: {fmt_seconds(self.compress_seconds)}")
        if self.kept:
            lines.append("  full record: .kept (per prefill, per layer: kept positions and their validity)")
        return "\n".join(lines)

    __str__ = __repr__

    @property
    def select_seconds(self) -> float:
        """The bench's name for the method's own time (scoring, selection, eviction)."""
        return self.compress_seconds


def gather_slots(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (B, H, L, D)`` at ``idx (B, H, K)`` along L -> ``(B, H, K, D)`` (one index_select)."""
    B, H, L, D = x.shape
    base = (torch.arange(B * H, device=x.device) * L).view(B, H, 1)
    return x.reshape(B * H * L, D).index_select(0, (idx + base).reshape(-1)).view(B, H, -1, D)


def repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, Hkv, L, D)`` -> ``(B, Hkv * groups, L, D)``: each KV head repeated for the query heads
    of its group, in ``repeat_kv`` order (query head ``h`` reads KV head ``h // groups``)."""
    if groups == 1:
        return x
    B, H, L, D = x.shape
    return x[:, :, None].expand(B, H, groups, L, D).reshape(B, H * groups, L, D)


def make_kv_method(method: str | KVMethod, options: dict) -> KVMethod:
    if isinstance(method, KVMethod):
        if options:
            raise ValueError("options are given either to the method object or to compress_kv, not both")
        return method
    return registry.instantiate(method, "kv", options, "compress_kv")


def _text_model(model: nn.Module) -> nn.Module:
    from ..models.compat import check_transformers
    from ..models.decoder import DECODER_TYPES, _text_model

    check_transformers()
    kv_types = (*DECODER_TYPES, "gemma3_text")
    mt = getattr(getattr(model, "config", None), "model_type", None)
    tm = _text_model(model)
    if mt not in kv_types or tm is None:
        raise UnsupportedModelError(
            f"compress_kv supports decoder LLMs ({', '.join(kv_types)}); got {type(model).__name__} "
            f"(model_type {mt!r}). VLMs: not yet"
        )
    return tm


def sliding_layers(text_model: nn.Module) -> list[bool]:
    """Which decoder layers attend in a sliding window (``config.layer_types``, e.g. Gemma-3's five
    local layers of six): their cache already holds only the window, and they are left alone."""
    n = len(text_model.layers)
    types = getattr(text_model.config, "layer_types", None)
    return [t == "sliding_attention" for t in types[:n]] if types else [False] * n


def _arg(args: tuple, kw: dict, name: str):
    return args[0] if args else kw[name]


class KVSession:
    """The live state of one ``compress_kv`` block."""

    def __init__(self, model: nn.Module, method: KVMethod, keep: int | float) -> None:
        self.model, self.method, self.keep = model, method, keep
        self.text_model = _text_model(model)
        self.layers = self.text_model.layers
        self.n_layers = len(self.layers)
        #: sliding-window layers are not compressed; the model keeps building their masks
        self.sliding = sliding_layers(self.text_model)
        self.keep_model_mask = any(self.sliding)
        self.hooks = HookSet()
        self.stats = KVStats(method=method.name)
        #: per layer: the model's ``num_key_value_groups`` (restored after a per-query-head cache)
        self.groups = [layer.self_attn.num_key_value_groups for layer in self.layers]
        self.per_query_head = bool(getattr(method, "per_query_head", False))
        unknown = sorted(set(method.needs()) - set(KV_SIGNALS))
        if unknown:
            raise PrunekitError(
                f"{method.name}: unknown signal(s) {unknown}; the engine gives {list(KV_SIGNALS)}"
            )
        self._reset()

    # ------------------------------------------------------------------ install / state
    def install(self) -> None:
        h = self.hooks
        h.pre(self.text_model, self._on_model)
        for layer in self.layers:
            h.pre(layer, self._on_layer)
            h.post(layer.self_attn, self._after_attention, with_kwargs=True)
            if self.per_query_head:
                i = layer.self_attn.layer_idx
                for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    h.post(proj, lambda m, a, out, i=i: self._repeat_new(i, out))

    def remove(self) -> None:
        self.hooks.remove()
        self._restore_groups()

    def _restore_groups(self) -> None:
        for layer, g in zip(self.layers, self.groups, strict=True):
            layer.self_attn.num_key_value_groups = g

    def _reset(self) -> None:
        self.compressed = False
        #: every compressed layer so far kept the whole prompt (then decoding evicts nothing either)
        self.full = True
        self.prefill = False
        #: per layer ``(B, Hkv, K)``: the sequence index of each cached entry (0..L-1 for the prompt)
        self.slot_pos: list[torch.Tensor | None] = [None] * self.n_layers
        self.slot_valid: list[torch.Tensor | None] = [None] * self.n_layers  # (B, Hkv, K)
        self.extra: list[dict] = [{} for _ in range(self.n_layers)]  # per-layer method state (H2O scores)
        #: per layer: True once its cache holds one KV head per query head (per-query-head methods)
        self.expanded = [False] * self.n_layers
        if self.per_query_head:
            self._restore_groups()

    # ------------------------------------------------------------------ hooks
    def _repeat_new(self, i: int, out: torch.Tensor) -> torch.Tensor | None:
        """k_proj / v_proj output ``(B, q, Hkv * D)`` of a layer whose cache was expanded to one KV
        head per query head -> ``(B, q, Hq * D)``, each KV head repeated for its group (``repeat_kv``
        order), so the new tokens enter the expanded cache with matching heads."""
        if not self.expanded[i] or self.prefill:
            return None
        B, q, F = out.shape
        g = self.groups[i]
        D = self.layers[i].self_attn.head_dim
        return out.view(B, q, F // D, 1, D).expand(-1, -1, -1, g, -1).reshape(B, q, F * g)

    def _on_model(self, module: nn.Module, args: tuple, kw: dict):
        x, past, am2d = decoder_call(args, kw)
        B, q = x.shape[:2]
        if past == 0:
            self._reset()
            if kw.get("use_cache") is False:  # None: the config's default (a cache, if it has one)
                return None
            self.prefill = True
            self.L = q
            self.valid = real_tokens(am2d, x, "compress_kv")
            pid = kw.get("position_ids")
            last = torch.full((B,), q - 1, dtype=torch.long, device=x.device) if pid is None else pid[..., -1]
            self.next_pos = (last.view(-1)[-B:] if last.dim() else last) + 1  # (B,) next position id
            self.decoded = 0
            self.stats.kept.append([])
            self.compress_timer = 0.0
            return None
        self.prefill = False
        if not self.compressed:
            return None
        # decode (or a multi-token continuation) on a compressed cache
        if kw.get("position_ids") is None:
            kw["position_ids"] = (self.next_pos + self.decoded)[:, None] + torch.arange(q, device=x.device)
        if am2d is not None and am2d.shape[1] >= q:
            self.new_valid = am2d[:, -q:].bool()
        else:
            self.new_valid = torch.ones(B, q, dtype=torch.bool, device=x.device)
        self.q = q
        self.decoded += q
        if not self.keep_model_mask:
            kw["attention_mask"] = None  # each layer gets its own mask (_on_layer)
        return args, kw

    def _on_layer(self, layer: nn.Module, args: tuple, kw: dict):
        i = layer.self_attn.layer_idx
        if self.prefill or not self.compressed or self.sliding[i]:
            return None
        h = _arg(args, kw, "hidden_states")
        B, Hkv = self.slot_valid[i].shape[:2]
        q = self.q
        new = self.new_valid[:, None, :].expand(B, Hkv, q)
        # slot positions are sequence indices: the prompt's 0..L-1, then L, L+1, ... for new tokens
        pos = (self.L + self.decoded - q + torch.arange(q, device=h.device))[None].expand(B, q)
        self.slot_valid[i] = torch.cat([self.slot_valid[i], new], dim=2)
        self.slot_pos[i] = torch.cat([self.slot_pos[i], pos[:, None, :].expand(B, Hkv, q)], dim=2)
        kw["attention_mask"] = self._mask(layer.self_attn, self.slot_valid[i], q, h.dtype)
        return args, kw

    def _mask(
        self, attn: nn.Module, key_valid: torch.Tensor, q: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """``(B, Hq, q, K)`` mask over this layer's cache slots; the last ``q`` keys are the new tokens."""
        eager = attn.config._attn_implementation == "eager"
        if not eager and q == 1 and bool(key_valid.all()):
            return None  # every slot valid: SDPA needs no mask
        Hq = attn.config.num_attention_heads
        kv = key_valid.repeat_interleave(Hq // key_valid.shape[1], dim=1)  # (B, Hq, K)
        K = kv.shape[2]
        q_idx = torch.arange(K - q, K, device=kv.device)[:, None]
        k_idx = torch.arange(K, device=kv.device)[None, :]
        allowed = (kv[:, :, None, :] & (k_idx <= q_idx)) | (k_idx == q_idx)  # (B, Hq, q, K)
        if not eager:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=kv.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def _after_attention(self, attn: nn.Module, args: tuple, kw: dict, out):
        cache = cache_of(kw)
        if cache is None:
            return None
        i = attn.layer_idx
        if self.prefill:
            if self.sliding[i]:
                self.stats.kept[-1].append(None)  # a sliding-window layer is left alone
            else:
                with Timer() as t:
                    self._compress(attn, kw, cache.layers[i], i)
                self.stats.compress_seconds += t.seconds
            if i == self.n_layers - 1:
                self.compressed = True
                self.stats.calls += 1
        elif self.compressed and self.method.decode and not self.sliding[i]:
            with Timer() as t:
                self._decode_step(attn, kw, cache.layers[i], i)
            self.stats.compress_seconds += t.seconds
        return None

    # ------------------------------------------------------------------ compression
    def _signals(self, attn: nn.Module, kw: dict, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        h, pe = kw["hidden_states"], kw["position_embeddings"]
        out = {}
        needs = self.method.needs()
        if "window_attention" in needs:
            out["window_attention"] = window_attention(attn, h, pe, keys, self.valid, self.method.window)
        if "attention_sum" in needs:
            chunk = getattr(self.method, "chunk", 256)
            out["attention_sum"] = attention_sum(attn, h, pe, keys, self.valid, chunk=chunk)
        return out

    def _compress(self, attn: nn.Module, kw: dict, cache_layer, i: int) -> None:
        keys, values = cache_layer.keys, cache_layer.values  # (B, Hkv, L, D)
        Hkv, L = keys.shape[1:3]
        expand = self.per_query_head and self.groups[i] > 1
        if L != self.L:
            raise PrunekitError(f"compress_kv: layer {i} caches {L} entries for a {self.L}-token prompt")
        n = self.valid.sum(dim=1).tolist()
        budgets = [self.method.budget(int(nb), self.keep, i, self.n_layers) for nb in n]
        self.full = self.full and budgets == [int(nb) for nb in n]
        k = torch.tensor(budgets, device=keys.device)
        signals = self._signals(attn, kw, keys)
        ctx = KVContext(keys, values, self.valid, i, self.n_layers, signals, budget=k)
        direct = self.method.indices(ctx)  # a position-only rule needs no scores and no sort
        if direct is not None:
            idx, ok = direct
        else:
            scores = self.method.score(ctx).float().masked_fill(~self.valid[:, None, :], float("-inf"))
            K = int(k.max())
            order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :K]  # best first
            ok = torch.arange(K, device=keys.device)[None, None, :] < k[:, None, None]
            idx, perm = torch.sort(order, dim=-1)  # ascending original order
            ok = ok.expand(*order.shape).gather(2, perm)
        H = idx.shape[1]  # Hkv, or Hq for a per-query-head selection
        want = Hkv * self.groups[i] if expand else Hkv
        if want != H:
            raise PrunekitError(
                f"{self.method.name}: scores have {H} heads; layer {i} has {want} "
                f"{'query' if expand else 'KV'} heads"
            )
        if expand:
            keys, values = repeat_heads(keys, self.groups[i]), repeat_heads(values, self.groups[i])
            attn.num_key_value_groups = 1  # one KV head per query head from now on (undone at reset)
            self.expanded[i] = True
        cache_layer.keys = gather_slots(keys, idx)
        cache_layer.values = gather_slots(values, idx)
        self.slot_pos[i], self.slot_valid[i] = idx, ok
        self.extra[i] = self.method.after_compress(ctx, idx) if hasattr(self.method, "after_compress") else {}
        self.stats.kept[-1].append((idx.cpu(), ok.cpu()))
        self.stats.entries_in += int(self.valid.sum()) * H
        self.stats.entries_kept += int(ok.sum())

    def _decode_step(self, attn: nn.Module, kw: dict, cache_layer, i: int) -> None:
        """Let a decode-time method (H2O) update its scores and evict; keeps the slot bookkeeping."""
        drop = self.method.decode_step(self, attn, kw, cache_layer, i)  # (B, Hkv, K) bool or None
        if drop is None or not bool(drop.any()):
            return
        keep = ~drop
        counts = keep.sum(dim=2)
        if not bool((counts == counts.flatten()[0]).all()):
            raise PrunekitError(
                f"{self.method.name}: decode eviction must drop the same number in every head"
            )
        idx = keep.float().argsort(dim=2, descending=True, stable=True)[..., : int(counts.flatten()[0])]
        idx = torch.sort(idx, dim=2).values
        cache_layer.keys = gather_slots(cache_layer.keys, idx)
        cache_layer.values = gather_slots(cache_layer.values, idx)
        self.slot_pos[i] = self.slot_pos[i].gather(2, idx)
        self.slot_valid[i] = self.slot_valid[i].gather(2, idx)
        for key, v in self.extra[i].items():
            self.extra[i][key] = v.gather(2, idx)
        self.stats.evicted_in_decode += int(drop.sum())


@contextmanager
def compress_kv(
    model: nn.Module,
    method: str | KVMethod,
    keep: int | float | None = None,
    *,
    ratio: float | None = None,
    **options: object,
) -> Iterator[KVSession | LazySession]:
    """Compress the prompt's KV cache after prefill, for the duration of a ``with`` block.

    Args:
        model: a decoder LLM (Llama, Qwen2, Mistral, Mixtral, Qwen3 families; ``*ForCausalLM``).
        method: a registry name of the ``kv`` family (``prunekit methods``) or a method object.
        keep: cache entries kept per row, layer and KV head (query head for a per-query-head
            method, e.g. ``snapkv`` with ``heads="query"``): an ``int >= 1`` or a fraction in
            (0, 1] of the row's real prompt tokens. ``ratio=`` is the same as a fraction ``keep``.
            For LazyLLM, which prunes inside the prefill, the mean per layer (see its docstring).
        **options: the method's options (e.g. ``window=32`` for SnapKV).

    Yields a :class:`KVSession` whose ``stats`` count entries seen and kept and the time spent.
    Greedy decoding and sampling are supported; beam search reorders the cache's rows between
    steps, which the per-row slot bookkeeping here does not follow, so it is not supported yet.
    """
    if (keep is None) == (ratio is None):
        raise ValueError("give the budget once: keep=<int count or fraction> or ratio=<fraction kept>")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < float(ratio) <= 1:
            raise ValueError(f"ratio (the fraction of the KV cache kept) must be in (0, 1]; got {ratio!r}")
        keep = float(ratio)
    keep = validate_keep(keep)
    m = make_kv_method(method, dict(options))
    if getattr(m, "engine", None) == "lazy":  # LazyLLM prunes inside the prefill: its own engine
        from .lazy import LazySession

        session: KVSession | LazySession = LazySession(model, m, keep)
    else:
        session = KVSession(model, m, keep)
    try:
        session.install()
        yield session
    finally:
        session.remove()
