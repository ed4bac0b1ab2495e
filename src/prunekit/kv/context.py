"""The contract between KV-cache methods and the engine (:mod:`prunekit.kv.engine`).

After the prefill has run each decoder layer's attention on the full prompt, the engine hands the
method that layer's cache as plain tensors (a :class:`KVContext`) plus the signals it asked for,
and keeps, per row and per KV head, the ``k`` entries with the highest :meth:`KVMethod.score`.
Methods never import transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..budget import resolve_keep

#: signals the engine computes, from the layer's own q projection and its cached (rotated) keys
KV_SIGNALS = {
    "window_attention": "softmax rows of the last `window` prompt queries over all keys, per query head "
    "(B, H, w, L), causal, padding keys at 0",
    "attention_sum": "attention probability each key received, summed over every prompt query, per "
    "query head (B, H, L)",
}


@dataclass
class KVContext:
    """One layer's prompt cache: ``keys``/``values`` ``(B, Hkv, L, D)`` (RoPE already applied),
    ``valid`` ``(B, L)`` (False = left padding), and the signals asked for."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    layer: int
    n_layers: int
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    #: ``(B,)`` entries each row keeps at this layer (the engine's resolved budget)
    budget: torch.Tensor | None = None

    def per_kv_head(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Hq, ...)`` -> ``(B, Hkv, ...)``: mean over each KV head's group of query heads."""
        B, Hq = x.shape[:2]
        Hkv = self.keys.shape[1]
        return x.view(B, Hkv, Hq // Hkv, *x.shape[2:]).mean(dim=2)


class KVMethod:
    """Base of KV-cache methods: ``needs()`` signals, ``score()`` entries, ``budget()`` per layer.

    Subclasses are dataclasses whose fields are the method's options. ``score`` returns
    ``(B, Hkv, L)`` (``(B, Hq, L)`` where :attr:`per_query_head`), higher kept first (padding is
    masked by the engine). ``decode = True``
    methods also get :meth:`decode_step` after every decoding step (H2O).
    """

    name: ClassVar[str] = ""
    decode: ClassVar[bool] = False
    #: the observation window of ``window_attention`` (SnapKV, PyramidKV)
    window: int = 0

    @property
    def per_query_head(self) -> bool:
        """True: :meth:`score` returns one row per query head ``(B, Hq, L)``, and the engine expands
        the layer's cache to one KV head per query head before keeping each head's top entries (the
        official SnapKV code's layout on GQA models). False (default): ``(B, Hkv, L)``."""
        return False

    def needs(self) -> tuple[str, ...]:
        return ()

    def score(self, ctx: KVContext) -> torch.Tensor:
        raise NotImplementedError

    def indices(self, ctx: KVContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Optional fast path for rules that need no scores: the kept slots ``(B, Hkv, K)`` in
        ascending order, ``K = max(budget)``, and their validity (row ``b`` keeps ``budget[b]``);
        it must select exactly what :meth:`score` would. None (default): the engine sorts scores."""
        return None

    def budget(self, n: int, keep: int | float, layer: int, n_layers: int) -> int:
        """Entries kept of a row's ``n`` prompt tokens at ``layer`` (default: ``keep`` resolved)."""
        return resolve_keep(keep, n)
