"""Signals on demand: a method asking for a full attention map or the prompt's text embeddings
gets exactly what HF's own eager attention / embedding layer computes, with SDPA left on."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import prunekit
from prunekit.errors import SignalUnavailableError
from prunekit.tokens.context import Signal, TokenContext
from prunekit.tokens.methods.random import RandomDrop
from tiny import llama, llava, text_inputs, vlm_inputs
from tiny_encoders import build as build_encoder
from tiny_encoders import inputs as encoder_inputs


@dataclass
class Recorder(RandomDrop):
    """Keeps random tokens, and records the signals it was handed."""

    kinds: tuple[str, ...] = ()
    seen: list = field(default_factory=list)

    def needs(self, stage):
        return tuple(Signal(k) for k in self.kinds)

    def select(self, ctx: TokenContext, k: int):
        self.seen.append({kind: ctx.signal(kind).clone() for kind in self.kinds})
        return super().select(ctx, k)


Recorder.name = "random"


def test_attention_map_at_encoder_stage_equals_eager():
    model = build_encoder("vit", attn="eager")
    inp = encoder_inputs("vit", model, batch=2)
    with torch.no_grad():
        eager = model(**inp, output_attentions=True).attentions[1]  # block K-1 = 1, (B, H, T, T)
    rec = Recorder(layer=2, kinds=("attention_map",))
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), prunekit.prune_tokens(model, rec, keep=0.5):
        model(**inp)
    got = rec.seen[0]["attention_map"]  # (B, H, N, N) over the patch tokens
    err = (got - eager[:, :, 1:, 1:]).abs().max().item()
    assert got.shape == (2, 4, 16, 16) and err < 1e-5, f"max error {err:.2e} (tol 1e-5)"


def test_attention_map_at_llm_stage_equals_eager_causal_map():
    model = llama("eager")
    inp = text_inputs(batch=1, length=12)
    with torch.no_grad():
        eager = model(**inp, output_attentions=True).attentions[1][0]  # (H, L, L)
    rec = Recorder(layer=2, kinds=("attention_map", "last_token_attention"))
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), prunekit.prune_tokens(model, rec, keep=0.5, protect=None):  # BOS a candidate too
        model(**inp)
    got = rec.seen[0]["attention_map"][0]  # candidates = all but the last token
    err = (got - eager[:, :-1, :-1]).abs().max().item()
    assert err < 1e-5, f"max error {err:.2e} (tol 1e-5)"
    row = rec.seen[0]["last_token_attention"][0]
    assert (row - eager.mean(0)[-1, :-1]).abs().max().item() < 1e-5


def test_text_embeddings_and_attention_map_at_vision_stage():
    model = llava("sdpa")
    inp = vlm_inputs("llava", model, batch=2)
    rec = Recorder(kinds=("text_embeddings", "attention_map"))
    with torch.no_grad(), prunekit.prune_tokens(model, rec, keep=0.5):
        model(**inp)
    sig = rec.seen[0]
    ids, am = inp["input_ids"], inp["attention_mask"].bool()
    text = am & (ids != model.config.image_token_id)
    emb = model.get_input_embeddings()(ids)
    for b in range(2):
        n = int(text[b].sum())
        assert torch.equal(sig["text_embeddings"][b, :n], emb[b][text[b]])
        assert not sig["text_embeddings"][b, n:].any()  # padded rows are zero
    # the CLIP feature layer (-2 of 3 -> layer 1), patch rows and columns, equals eager attention
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        eager = tower(inp["pixel_values"], output_attentions=True).attentions[1][:, :, 1:, 1:]
    assert (sig["attention_map"] - eager).abs().max().item() < 1e-5


def test_signal_a_family_cannot_give_is_refused_with_the_reason():
    from tiny import qwen2_vl

    with pytest.raises(SignalUnavailableError, match=r"no \[CLS\]|attention_map"):
        with prunekit.prune_tokens(qwen2_vl(), Recorder(kinds=("cls_attention",)), keep=0.5):
            pass
