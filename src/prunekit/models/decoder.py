"""Stage (b): a token cut at decoder layer K, for Llama / Qwen2 / Mistral decoders and the
language model inside a VLM.

How it stays consistent through ``generate()`` (transformers 5, see the notes on v5):
- the model passes the same full-length ``position_embeddings``, ``position_ids`` and mask to
  every layer, so a pre-hook on **every** layer >= K gathers them to the kept positions (original
  position ids are kept, as FastV does);
- layers < K keep the full KV cache, layers >= K cache only the kept tokens; decode positions come
  from layer 0's cache length or ``generate``'s own tracking, both full length, hence right;
- when samples keep different counts (ratio budgets on ragged prompts, left padding), kept
  positions are left-packed and the unused slots masked like padding, with a 4-D mask built here
  (bool for SDPA, additive for eager) in prefill and in every decode step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import nn

from ..errors import PrunekitError, SignalUnavailableError, UnsupportedModelError
from .attention import decoder_attention, last_query_attention
from .base import Adapter, Session, check_cut_layer, required_signals
from .sequence import (
    Groups,
    attention_mask_4d,
    gather_tokens,
    left_pack,
    select_in_groups,
    signal_gatherers,
)

DECODER_TYPES = ("llama", "qwen2", "mistral", "mixtral", "qwen3")

#: candidates(valid (B, L) bool, L) -> groups of candidate positions
CandidateFn = Callable[[torch.Tensor], Groups]


def _arg(args: tuple, kw: dict, name: str) -> torch.Tensor:
    return args[0] if args else kw[name]


#: signals of the llm stage (a cut at decoder layer K), and how they are had
LLM_SIGNALS: dict[str, str] = {
    "last_token_attention": "head mean, recomputed from q/k of a layer before K",
    "attention_map": "per-head causal map of a layer before K, recomputed from q/k",
}


class LLMCut:
    """Hooks that drop candidate tokens from the input of decoder layer ``K`` onward."""

    def __init__(
        self,
        session: Session,
        text_model: nn.Module,
        layer: int,
        candidates: CandidateFn,
        family: str,
    ) -> None:
        self.session, self.text_model, self.K = session, text_model, layer
        self.layers = text_model.layers
        self.candidates, self.family = candidates, family
        check_cut_layer(layer, len(self.layers), "LLM")
        self.signal_layers: dict[str, int] = {}
        offered = LLM_SIGNALS
        for sig in required_signals(session.method, "llm", family, offered).values():
            if sig.kind not in offered:
                continue
            l = self.K - 1 if sig.layer is None else sig.layer
            if not 0 <= l < self.K:
                raise SignalUnavailableError(
                    f"signal {sig}: the layer must be in [0, K-1={self.K - 1}]; got {l}"
                )
            self.signal_layers[sig.kind] = l
        self.index = {id(m): i for i, m in enumerate(self.layers)}
        self.window = getattr(getattr(text_model, "config", None), "sliding_window", None)
        self._reset(0)

    def install(self) -> None:
        hooks = self.session.hooks
        hooks.pre(self.text_model, self._on_model)
        for l in set(self.signal_layers.values()):
            kinds = [k for k, layer in self.signal_layers.items() if layer == l]
            hooks.pre(self.layers[l].self_attn, self._signal_hook(kinds))
        for layer in self.layers[self.K :]:
            hooks.pre(layer, self._on_layer)

    # --------------------------------------------------------------- per call state
    def _reset(self, L: int) -> None:
        self.L, self.kidx, self.slot_valid, self.rows = L, None, None, {}
        self.custom_mask = False
        self.pe = self.pid = self.mask = None

    def _on_model(self, module: nn.Module, args: tuple, kw: dict) -> None:
        x = kw.get("inputs_embeds")
        if x is None:
            x = kw.get("input_ids", args[0] if args else None)
        pkv = kw.get("past_key_values")
        past = pkv.get_seq_length() if pkv is not None else 0
        am = kw.get("attention_mask")
        self.am2d = am if isinstance(am, torch.Tensor) and am.dim() == 2 else None
        self.prefill = past == 0
        if self.prefill:
            B, L = x.shape[:2]
            self._reset(L)
            valid = (
                torch.ones(B, L, dtype=torch.bool, device=x.device) if self.am2d is None else self.am2d.bool()
            )
            if not bool(valid[:, -1].all()):
                raise PrunekitError(
                    "token pruning in a decoder needs left padding (the last position must be a real token "
                    "in every row); set tokenizer.padding_side = 'left'"
                )
            if self.window is not None and self.window < L:
                raise PrunekitError(
                    f"prompt of {L} tokens exceeds the sliding window {self.window}: not supported"
                )
            self.valid = valid

    def _signal_hook(self, kinds: list[str]):
        def hook(attn: nn.Module, args: tuple, kw: dict) -> None:
            if not self.prefill:
                return
            h, pe = _arg(args, kw, "hidden_states"), kw["position_embeddings"]
            if "attention_map" in kinds:
                self.rows["attention_map"] = decoder_attention(attn, h, pe, self.valid)  # (B, H, L, L)
            if "last_token_attention" in kinds:
                self.rows["last_token_attention"] = last_query_attention(attn, h, pe, self.valid)  # (B, L)

        return hook

    # --------------------------------------------------------------- the cut
    def _select(self, h: torch.Tensor) -> None:
        keep_mask = self.valid.clone()  # padding is dropped too: it becomes masked slots
        groups = self.candidates(self.valid)
        signals = signal_gatherers(self.rows)
        select_in_groups(
            self.session,
            keep_mask,
            groups,
            tokens=lambda b, pos: h[b[:, None], pos],
            signals=signals,
            family=self.family,
        )
        self.kidx, self.slot_valid = left_pack(keep_mask)  # (B, L'), (B, L')
        self.session.stats.kept_masks.append(keep_mask.cpu())

    def _on_layer(self, layer: nn.Module, args: tuple, kw: dict):
        h = _arg(args, kw, "hidden_states")
        i = self.index[id(layer)]
        am = kw.get("attention_mask")
        additive = layer.self_attn.config._attn_implementation == "eager"
        if self.prefill:
            if i == self.K:
                self._select(h)
                cos, sin = kw["position_embeddings"]
                self.pe = (gather_tokens(cos, self.kidx, 1), gather_tokens(sin, self.kidx, 1))
                pid = kw.get("position_ids")
                self.pid = None if pid is None else gather_tokens(pid, self.kidx, pid.dim() - 1)
                self.custom_mask = am is not None or not bool(self.slot_valid.all())
                self.mask = (
                    attention_mask_4d(self.slot_valid, self.kidx.shape[1], h.dtype, additive)
                    if self.custom_mask
                    else None
                )
                h = gather_tokens(h, self.kidx, 1)
            kw["position_embeddings"] = self.pe
            if "position_ids" in kw:
                kw["position_ids"] = self.pid
            kw["attention_mask"] = self.mask
        elif self.kidx is not None and (self.custom_mask or am is not None):
            # decode (or a multi-token continuation, for which the model builds a full-length causal
            # mask): columns = kept slots + new tokens
            B = h.shape[0]
            new = (
                self.am2d[:, self.L :].bool()
                if self.am2d is not None
                else torch.ones(B, 0, dtype=torch.bool, device=h.device)
            )
            key_valid = torch.cat([self.slot_valid, new], dim=1)
            n_keys = kw["past_key_values"].get_seq_length(i) + h.shape[1]  # this layer's cache + new tokens
            if key_valid.shape[1] != n_keys:  # no 2-D mask given: new tokens are all real
                pad = torch.ones(B, n_keys - key_valid.shape[1], dtype=torch.bool, device=h.device)
                key_valid = torch.cat([key_valid, pad], dim=1)
            kw["attention_mask"] = attention_mask_4d(key_valid, h.shape[1], h.dtype, additive)
        if args:
            return (h, *args[1:]), kw
        kw["hidden_states"] = h
        return args, kw


def text_candidates(valid: torch.Tensor) -> Groups:
    """A plain LLM's candidates: every real prompt token but the last (it makes the next token)."""
    cand = valid.clone()
    cand[:, -1] = False
    B = valid.shape[0]
    return Groups(
        sample=list(range(B)), positions=[cand[b].nonzero().flatten() for b in range(B)], ids=list(range(B))
    )


def _text_model(model: nn.Module) -> nn.Module | None:
    if hasattr(model, "layers") and hasattr(model, "embed_tokens"):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers") and hasattr(inner, "embed_tokens"):
        return inner
    return None


class DecoderAdapter(Adapter):
    """Llama / Qwen2 / Mistral (and Mixtral, Qwen3) decoders: stage ``llm``.

    On a text-only model the candidates are the prompt tokens before the last one.
    """

    family = "decoder (Llama/Qwen2/Mistral)"
    stages = ("llm",)
    stage_signals: ClassVar[Mapping[str, Mapping[str, str]]] = {"llm": LLM_SIGNALS}
    missing_stage_reason: ClassVar[Mapping[str, str]] = {
        "vision": "a text-only decoder has no visual tokens",
        "encoder": "a decoder has no ViT/encoder blocks",
    }

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        return mt in DECODER_TYPES and _text_model(model) is not None

    def attach(self, session: Session) -> None:
        self.check_stage(session.stage)
        tm = _text_model(self.model)
        if tm is None:
            raise UnsupportedModelError(f"{type(self.model).__name__}: no decoder layers found")
        K = 2 if session.method.layer is None else session.method.layer
        LLMCut(session, tm, K, text_candidates, self.family).install()
