"""LazyLLM — "LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM Inference" (Fu et al.,
Apple, 2024). No official code was released; this follows the paper's description.

**Prefill** computes the KV of a prompt token only as deep as it matters for the next token: at a
few pruning layers ``l_1 < l_2 < ...`` the prompt tokens still being computed are ranked by the
attention the last token pays them at the layer before (``l_s - 1``, the head mean, recomputed from
that layer's q projection and its cached keys, so SDPA stays on), and only the top ones go on into
layer ``l_s``; fewer at each pruning layer (progressive). The last prompt token always goes on.

**Aux cache**: a token pruned at ``l_s`` leaves its hidden state (the input of layer ``l_s``) in an
auxiliary cache. **Decoding** re-selects at every step, from the new token's attention: a token
selected now that was pruned before is *revived* — its computation resumes at ``l_s`` from the aux
cache (it joins the new token as an extra query of layers ``l_s`` onward, attending causally to
the tokens selected at this step), instead of a recomputation from layer 0. Every token is
computed at most once per layer, and the KV cache only grows (entries once computed are kept; a
step attends, in each layer, to the tokens selected at that step).

Budget: ``keep`` is the mean fraction of the prompt's tokens computed per layer right after the
prefill — the KV-cache entries it holds, and what the prefill FLOPs follow — as for the
progressive token methods (:mod:`prunekit.tokens.schedule`); revivals during decoding add
entries (``stats.revived``).

prunekit's choices where the paper gives no number (*unconfirmed*): pruning layers at 2/8/16/24
of a 32-layer model (scaled to the depth), a geometric schedule of kept fractions fitted to
``keep``, and generated tokens are never pruned. A call with several new tokens at once (a
teacher-forced continuation) selects once for the block, from the mean attention of its new
tokens; ``generate()`` decodes one token per call, which is the paper's setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...registry import register
from ...tokens.schedule import cut_layers, fit_counts, geometric_shape
from ..context import KVMethod


@register(
    "lazyllm",
    family="kv",
    paper="LazyLLM: Dynamic Token Pruning for Efficient Long Context LLM Inference",
    stages=("prefill", "decode"),
    signals=("last_token_attention@layer before each pruning layer",),
    summary="progressive prefill pruning by last-token attention; aux cache revives tokens in decode",
)
@dataclass
class LazyLLM(KVMethod):
    official_layers: ClassVar[tuple[int, ...]] = (2, 8, 16, 24)
    reference_depth: ClassVar[int] = 32
    #: the engine that runs it: pruning inside the prefill, not after it
    engine: ClassVar[str] = "lazy"
    #: pruning layers (0-based; tokens pruned at ``l`` are not computed from layer ``l`` on);
    #: None: 2/8/16/24 of 32 scaled to the model's depth
    layers: tuple[int, ...] | None = None

    def cuts(self, n_layers: int) -> tuple[int, ...]:
        return cut_layers(self.layers, self.official_layers, self.reference_depth, n_layers, self.name)

    def shape(self, n_cuts: int):
        return geometric_shape(n_cuts)

    def counts(self, n: int, keep: int, n_layers: int) -> tuple[int, ...]:
        """Tokens computed after each pruning layer, for ``n`` prompt tokens and a mean of ``keep``."""
        layers = self.cuts(n_layers)
        return fit_counts(layers, n_layers, n, keep, self.shape(len(layers)), self.name)
