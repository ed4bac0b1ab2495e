"""Fidelity to the official code where prunekit's default departs from it (issue 21, items 5, 6, 8):
FasterVLM's feature/attention layer pairing, scores in the model's dtype, FastV's official budget.
Each checked against HF's own eager attention or the official formula written out here."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import prunekit
from prunekit.budget import resolve_keep
from prunekit.errors import SignalUnavailableError
from prunekit.tokens.methods.divprune import DivPrune
from prunekit.tokens.methods.fastervlm import FasterVLM
from prunekit.tokens.methods.fastv import FastV
from tiny import llama, llava, text_inputs, vlm_inputs


def spy(monkeypatch, cls, name: str = "select"):
    """Record the ``TokenContext`` each call of ``cls.<name>`` gets."""
    seen, original = [], getattr(cls, name)

    def wrapper(self, ctx, *args):
        seen.append(ctx)
        return original(self, ctx, *args)

    monkeypatch.setattr(cls, name, wrapper)
    return seen


def top_lower_index_first(scores: torch.Tensor, k: int) -> set[int]:
    """The ``k`` highest, ties to the lower index (prunekit's documented rule)."""
    return set(torch.sort(scores.float(), descending=True, stable=True).indices[:k].tolist())


# ---------------------------------------------------------------- item 8: FastV's official budget
def test_fastv_drop_ratio_is_the_official_round_of_n_times_1_minus_r_by_hand():
    # N = 15, R = 0.7: 1 - 0.7 = 0.30000000000000004 in floats, 15 * that = 4.500000000000001 -> 5;
    # keep=0.3 gives 15 * 0.3 = 4.5 exactly, and Python's round(4.5) = 4 (banker's)
    assert FastV(drop_ratio=0.7).keep_count(None, 15) == 5
    assert resolve_keep(0.3, 15) == FastV().keep_count(0.3, 15) == 4
    # an exact .5 with no float error: both are banker's rounding, round(2.5) = 2
    assert FastV(drop_ratio=0.5).keep_count(None, 5) == 2 == resolve_keep(0.5, 5)
    assert FastV(drop_ratio=0.0).keep_count(None, 7) == 7
    assert FastV(drop_ratio=0.9).keep_count(None, 4) == 1  # official round(0.4) = 0: at least one here
    for bad in (1.0, -0.1, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match=r"drop_ratio R must be a float in \[0, 1\)"):
            FastV(drop_ratio=bad)


def test_fastv_drop_ratio_end_to_end_keeps_the_official_count_of_the_top_tokens():
    model = llama("eager")
    inp = text_inputs(batch=1, length=16)  # 15 candidates: every prompt token but the last
    with torch.no_grad():
        row = model(**inp, output_attentions=True).attentions[1].mean(1)[0, -1]  # layer K-1 = 1
    for options, n_kept in (({"drop_ratio": 0.7}, 5), ({"keep": 0.3}, 4)):
        with torch.no_grad(), prunekit.prune_tokens(model, "fastv", layer=2, protect=None, **options) as s:
            model(**inp)
        kept = s.stats.kept_masks[0][0]
        assert set(kept[:15].nonzero().flatten().tolist()) == top_lower_index_first(row[:15], n_kept)
        assert bool(kept[15])
    with pytest.raises(ValueError, match="not both"):
        with prunekit.prune_tokens(model, "fastv", keep=0.3, drop_ratio=0.7):
            pass


# ---------------------------------------------------------------- item 5: FasterVLM's layer pairing
def llava_with_feature_layer(p: int):
    model = llava("eager")
    model.config.vision_feature_layer = p
    return model


def test_fastervlm_positive_feature_layer_pairings_match_eager_attentions(monkeypatch):
    """vision_feature_layer = 1 on a 3-layer CLIP: the features are hidden_states[1], layer 0's output.
    "output" pairs them with layer 0's attention; "official" with attentions[1] (layer 1), as the
    official code indexes it. Both equal HF's eager attention of that layer ([CLS] row, head mean)."""
    model = llava_with_feature_layer(1)
    inp = vlm_inputs("llava", model, batch=1)
    with torch.no_grad():
        att = model.model.vision_tower(inp["pixel_values"], output_attentions=True).attentions
    img = (inp["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    k, expected = 5, {}
    for pairing, layer in (("output", 0), ("official", 1)):
        ref = att[layer].mean(1)[0, 0, 1:]  # (N,) CLS row, patch columns, head mean
        expected[pairing] = top_lower_index_first(ref, k)
        seen = spy(monkeypatch, FasterVLM, "score")
        with torch.no_grad(), prunekit.prune_tokens(model, "fastervlm", keep=k, pairing=pairing) as s:
            model(**inp)
        got = seen[-1].signal("cls_attention")[0]
        err = (got - ref).abs().max().item()
        assert err < 1e-6, f"{pairing}: CLS row differs from eager layer {layer} by {err:.2e}"
        assert set(s.stats.kept_masks[0][0][img].nonzero().flatten().tolist()) == expected[pairing]
    assert expected["output"] != expected["official"]  # the two pairings really differ here


def test_fastervlm_pairing_errors_and_negative_layers_agree():
    from prunekit.models import get_adapter

    model = llava_with_feature_layer(0)  # the embeddings: no attention layer outputs them
    inp = vlm_inputs("llava", model, batch=1)
    with pytest.raises(SignalUnavailableError, match="embeddings"):
        with prunekit.prune_tokens(model, "fastervlm", keep=4):
            pass
    adapter = get_adapter(model)
    assert adapter.feature_attention_layer("official") == 0  # attentions[0], as the official code
    model.config.vision_feature_layer = 2  # hidden_states[2] is layer 1's output
    assert (adapter.feature_attention_layer("output"), adapter.feature_attention_layer("official")) == (1, 2)
    model.config.vision_feature_layer = 3  # hidden_states[3] exists, attentions[3] does not
    with pytest.raises(SignalUnavailableError, match=r"attentions\[vision_feature_layer=3\]"):
        with prunekit.prune_tokens(model, "fastervlm", keep=4, pairing="official"):
            pass
    with pytest.raises(ValueError, match="pairing must be 'output' or 'official'"):
        FasterVLM(pairing="next")
    model.config.vision_feature_layer = -2  # LLaVA's default: both pairings take the same layer
    kept = {}
    for pairing in ("output", "official"):
        with torch.no_grad(), prunekit.prune_tokens(model, "fastervlm", keep=4, pairing=pairing) as s:
            model(**inp)
        kept[pairing] = s.stats.kept_masks[0]
    assert torch.equal(kept["output"], kept["official"])


# ---------------------------------------------------------------- item 6: scores in the model's dtype
def fp32_last_row(attn, h, pe, valid):
    """The last query's head-mean attention of a Llama layer in float32 from its q/k, written out."""
    B, L, _ = h.shape
    hd = attn.head_dim
    q = attn.q_proj(h).view(B, L, -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(B, L, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *pe)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q[:, :, -1:].float() @ k.float().transpose(-1, -2)) * hd**-0.5  # (B, H, 1, L)
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def test_fastv_score_dtype_model_equals_bf16_eager_and_default_equals_fp32(monkeypatch):
    model = llama("eager").to(torch.bfloat16)
    inp = text_inputs(batch=1, length=24)
    captured = {}

    def grab(attn, args, kw):
        captured["h"], captured["pe"] = kw["hidden_states"], kw["position_embeddings"]

    hook = model.model.layers[1].self_attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        bf16 = model(**inp, output_attentions=True).attentions[1]  # (B, H, L, L) bf16 probabilities
    hook.remove()
    assert bf16.dtype == torch.bfloat16
    official = bf16.mean(1)[0, -1, :23]  # FastV's official: head mean in the model dtype, last row
    with torch.no_grad():
        fp32 = fp32_last_row(model.model.layers[1].self_attn, captured["h"], captured["pe"],
                             inp["attention_mask"].bool())[0, :23]  # fmt: skip
    got = {}
    for choice in ("model", "float32"):
        seen = spy(monkeypatch, FastV, "score")
        with (
            torch.no_grad(),
            prunekit.prune_tokens(model, "fastv", keep=8, layer=2, score_dtype=choice, protect=None) as s,
        ):
            model(**inp)
        got[choice] = seen[-1].signal("last_token_attention")[0]
        if choice == "model":
            kept = s.stats.kept_masks[0][0, :23].nonzero().flatten().tolist()
            assert set(kept) == top_lower_index_first(official, 8)
    assert torch.equal(got["model"], official.float()), "score_dtype='model' must equal bf16 eager exactly"
    err = (got["float32"] - fp32).abs().max().item()
    assert err < 1e-6, f"default scores differ from the float32 computation by {err:.2e}"
    assert not torch.equal(got["model"], got["float32"])  # the choice matters in bf16
    with pytest.raises(ValueError, match=r"score_dtype must be 'float32' .* or 'model'; got 'bf16'"):
        with prunekit.prune_tokens(model, "fastv", keep=8, score_dtype="bf16"):
            pass


def test_fastervlm_score_dtype_model_equals_the_official_bf16_cls_row(monkeypatch):
    model = llava("eager").to(torch.bfloat16)
    inp = vlm_inputs("llava", model, batch=2)
    inp["pixel_values"] = inp["pixel_values"].to(torch.bfloat16)
    tower = model.model.vision_tower
    with torch.no_grad():
        att = tower(inp["pixel_values"], output_attentions=True).attentions[1]  # feature layer -2 = 1
    official = att[:, :, 0, 1:].mean(dim=1)  # (B, N): FasterVLM's official formula, in bf16
    layer = getattr(tower, "vision_model", tower).encoder.layers[1].self_attn
    captured = {}
    hook = layer.register_forward_pre_hook(
        lambda m, a, kw: captured.update(h=kw["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        tower(inp["pixel_values"])
    hook.remove()
    h, H = captured["h"], layer.num_heads
    q = layer.q_proj(h[:, :1]).view(2, 1, H, -1).transpose(1, 2).float()
    k = layer.k_proj(h).view(2, h.shape[1], H, -1).transpose(1, 2).float()
    fp32 = ((q @ k.transpose(-1, -2)) * layer.scale).softmax(-1).mean(1)[:, 0, 1:]  # (B, N)
    got = {}
    for choice in ("model", "float32"):
        seen = spy(monkeypatch, FasterVLM, "score")
        with torch.no_grad(), prunekit.prune_tokens(model, "fastervlm", keep=6, score_dtype=choice) as s:
            model(**inp)
        got[choice] = seen[-1].signal("cls_attention")
        if choice == "model":
            img = inp["input_ids"] == model.config.image_token_id
            for b in range(2):
                kept = s.stats.kept_masks[0][b][img[b]].nonzero().flatten().tolist()
                assert set(kept) == top_lower_index_first(official[b], 6)
    assert torch.equal(got["model"], official.float())
    err = (got["float32"] - fp32).abs().max().item()
    assert err < 1e-6, f"default CLS rows differ from the float32 computation by {err:.2e}"
    assert not torch.equal(got["model"], got["float32"])


def official_divprune(x: torch.Tensor, k: int) -> list[int]:
    """DivPrune's official greedy on one image's ``(N, D)`` tokens, in their dtype, written out."""
    xn = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - torch.mm(xn, xn.t())
    picks: list[int] = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = dist[torch.tensor(picks)].min(dim=0).values
        picks.append(int(torch.argmax(scores)))
    return sorted(picks)


def fp32_divprune(x: torch.Tensor, k: int) -> list[int]:
    """The same greedy in float32, nearest *other* token first, chosen tokens excluded."""
    xn = x.float() / x.float().norm(dim=1, keepdim=True)
    dist = 1.0 - xn @ xn.t()
    nearest = dist.masked_fill(torch.eye(len(x), dtype=torch.bool), float("inf")).min(dim=1).values
    picks = [int(nearest.argmax())]
    to_set = dist[picks[0]].clone()
    for _ in range(1, k):
        to_set[picks] = float("-inf")
        picks.append(int(to_set.argmax()))
        to_set = torch.minimum(to_set, dist[picks[-1]])
    return sorted(picks)


def test_divprune_score_dtype_model_follows_the_official_bf16_greedy(monkeypatch):
    model = llava("eager").to(torch.bfloat16)
    inp = vlm_inputs("llava", model, batch=2)
    inp["pixel_values"] = inp["pixel_values"].to(torch.bfloat16)
    k, kept = 7, {}
    for choice in ("model", "float32"):
        seen = spy(monkeypatch, DivPrune)
        with torch.no_grad(), prunekit.prune_tokens(model, "divprune", keep=k, score_dtype=choice) as s:
            model(**inp)
        tokens = seen[-1].tokens  # (2, 16, D) the projected visual tokens, bf16
        assert tokens.dtype == torch.bfloat16
        img = inp["input_ids"] == model.config.image_token_id
        kept[choice] = [s.stats.kept_masks[0][b][img[b]].nonzero().flatten().tolist() for b in range(2)]
        reference = official_divprune if choice == "model" else fp32_divprune
        assert kept[choice] == [reference(tokens[b], k) for b in range(2)], choice
    with pytest.raises(ValueError, match="score_dtype"):
        with prunekit.prune_tokens(model, "divprune", keep=k, score_dtype="float16"):
            pass


def test_divprune_score_dtype_on_near_ties_official_bf16_vs_fp32():
    """Tokens sharing a large common direction (cosines near 1: many near-ties in bf16). The official
    bf16 greedy and the float32 one part ways on most such sets; each prunekit mode follows its own."""
    from prunekit.tokens.context import TokenContext

    differ = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 24, 16, generator=g) + 3 * torch.randn(1, 1, 16, generator=g)
        x = x.to(torch.bfloat16)
        model = DivPrune().select(TokenContext("vision", x, score_dtype="model"), 8).keep.tolist()
        default = DivPrune().select(TokenContext("vision", x), 8).keep.tolist()
        official = [official_divprune(x[b], 8) for b in range(2)]
        assert model == official, seed
        assert default == [fp32_divprune(x[b], 8) for b in range(2)], seed
        differ += model != default
    assert differ >= 10, f"only {differ} of 20 sets differ between bf16 and float32 scoring"


def test_encoder_stage_cls_row_in_the_model_dtype_equals_bf16_eager():
    from tiny_encoders import build, inputs

    model = build("vit", attn="eager").to(torch.bfloat16)
    x = inputs("vit", model)["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        official = model(pixel_values=x, output_attentions=True).attentions[1].mean(1)[:, 0]  # bf16
        rows = {}
        for choice in ("model", "float32"):
            with prunekit.prune_tokens(model, "fastervlm", keep=3, layer=2, score_dtype=choice) as s:
                model(pixel_values=x)
            rows[choice] = s.adapter.maps["cls_attention"]
    assert torch.equal(rows["model"], official.float())
    assert (rows["float32"] - official.float()).abs().max().item() < 1e-2  # same row, float32 rounding
    assert not torch.equal(rows["model"], rows["float32"])
