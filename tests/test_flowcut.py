"""FlowCut inside the vision tower: the schedule by hand, and the survivors and their features
against an independent layer-by-layer re-run of the official algorithm; LLaVA-NeXT's anyres variant
(K/2 per crop, then HF's own unpadding and packing) against the same re-run; the LLM layer-1
score against eager attention and values recomputed from the hidden states."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

import prunekit
from prunekit.tokens.methods.flowcut import flow_score, prune_count
from tiny import CLIP_V, IMG, TXT, VLMS, reset, vlm_inputs


def test_prune_count_follows_the_entropy_of_the_cls_row():
    n, K = 40, 8
    flat = torch.ones(2, n)  # h = 1: nothing pruned before the last cut
    assert prune_count(flat, K, rpl=4) == 0
    onehot = torch.zeros(1, n)
    onehot[0, 3] = 1.0  # h = 0 (0 log 0 = 0, no NaN): (n - K) / sqrt(rpl)
    assert prune_count(onehot, K, rpl=4) == round(32 / 2)
    assert prune_count(torch.cat([flat[:1], onehot]), K, rpl=4) == 16  # the largest over the images
    assert prune_count(flat, K, rpl=0) == n - K  # the last chance: straight to the budget
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0]])  # H = 1.5 ln 2, h = 0.75 -> r = round(3 / 1 * 0.4375)
    assert prune_count(p, 1, rpl=1) == round(3 * (1 - 0.75**2))


def test_score_adds_the_normalised_rows_and_weights_by_value_norm():
    a = torch.tensor([[1.0, 3.0]])
    s = torch.tensor([[2.0, 2.0]])
    v = torch.tensor([[10.0, 1.0]])
    torch.testing.assert_close(flow_score(a, s, v), torch.tensor([[(0.25 + 0.5) * 10, (0.75 + 0.5) * 1]]))


def _llava(layers: int):
    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(**{**CLIP_V, "num_hidden_layers": layers}),
        text_config=LlamaConfig(**TXT),
        image_token_id=IMG,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        attn_implementation="sdpa",
    )
    return LlavaForConditionalGeneration(cfg).eval()


def _reference(model, pixel_values: torch.Tensor, K: int) -> tuple[list[list[int]], torch.Tensor]:
    """The official loop, written out: run the tower layer by layer, score from each layer's own
    q/k/v on its input, EMA, cut after layers with an even number of layers left before L_sel."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    layers = tower.encoder.layers
    L_sel = len(layers) - 2  # vision_feature_layer=-2: the output of layer n - 2 is the feature
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    G = x.shape[0]
    orig = [list(range(x.shape[1] - 1)) for _ in range(G)]
    cum = None
    for i in range(L_sel):
        layer = layers[i]
        attn = layer.self_attn
        scored = x.shape[1] > K + 1
        if scored:
            h = layer.layer_norm1(x)
            H, hd = attn.num_heads, attn.head_dim
            q = attn.q_proj(h).view(G, -1, H, hd).transpose(1, 2)
            k = attn.k_proj(h).view(G, -1, H, hd).transpose(1, 2)
            v = attn.v_proj(h).view(G, -1, H, hd).transpose(1, 2)
            a = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * attn.scale, -1)[:, :, 0].mean(1)[:, 1:]
            s = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), -1)[:, :, 0].mean(1)[:, 1:]
            vn = v.mean(1).abs().sum(-1)[:, 1:]
            score = (a / a.sum(-1, keepdim=True) + s / s.sum(-1, keepdim=True)) * vn
            cum = score if cum is None else 0.5 * cum + 0.5 * score
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
        rpl = L_sel - i - 1
        if scored and rpl % 2 == 0:
            n = x.shape[1] - 1
            if rpl > 0:
                rs = []
                for g in range(G):
                    p = (a[g] / a[g].sum()).tolist()
                    ent = -sum(pj * math.log(pj) for pj in p if pj > 0)
                    rs.append(round((n - K) / math.sqrt(rpl) * (1 - (ent / math.log(n)) ** 2)))
                r = max(rs)
            else:
                r = n
            keep_n = max(n - r, K)
            best = [sorted(range(n), key=lambda j, g=g: (-float(cum[g, j]), j)) for g in range(G)]
            idx = [sorted(b[:keep_n]) for b in best]
            it = torch.tensor(idx)
            x = torch.cat([x[:, :1], x[:, 1:].gather(1, it[..., None].expand(-1, -1, x.shape[-1]))], 1)
            cum = cum.gather(1, it)
            orig = [[orig[g][j] for j in idx[g]] for g in range(G)]
    x = layers[L_sel](x, None)
    x = x[0] if isinstance(x, tuple) else x
    return orig, model.model.multi_modal_projector(x[:, 1:])


@pytest.mark.parametrize("keep", [4, 9])
def test_survivors_and_features_equal_an_independent_rerun(keep):
    """8 vision layers, features from layer 6: cuts after layers 1, 3 and 5 (entropy-adaptive, then
    straight to the budget); the LLM receives exactly the re-run's survivors and features."""
    model = _llava(8)
    inp = vlm_inputs("llava", model, 2)
    seen = {}

    def grab(module, args, kw):
        seen.setdefault("embeds", kw["inputs_embeds"].clone())

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), prunekit.prune_tokens(model, "flowcut", keep=keep) as session:
            out = model.generate(**inp, max_new_tokens=3, do_sample=False)
    finally:
        handle.remove()
    with torch.no_grad():
        want_idx, want_feats = _reference(model, inp["pixel_values"], keep)
    ids = inp["input_ids"]
    for g in range(2):
        slots = (ids[g] == IMG).nonzero().flatten()
        kept = session.stats.kept_masks[0][g, slots].nonzero().flatten().tolist()
        assert kept == want_idx[g]
        torch.testing.assert_close(seen["embeds"][g, slots[want_idx[g]]], want_feats[g], atol=1e-5, rtol=1e-4)
    assert session.stats.tokens_kept == 2 * keep and out.shape[1] == ids.shape[1] + 3


@pytest.mark.parametrize("fam", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_keep_everything_is_dense_and_other_families_are_refused(fam):
    from invariants import assert_same, snapshot

    model = VLMS[fam]("sdpa")
    inp = vlm_inputs(fam, model, 2)
    with torch.no_grad():
        dense = model.generate(**inp, max_new_tokens=3, do_sample=False)
        before = snapshot(model)
        reset(model)
        with prunekit.prune_tokens(model, "flowcut", keep=1.0):
            same = model.generate(**inp, max_new_tokens=3, do_sample=False)
        reset(model)
        with pytest.raises(RuntimeError, match="boom"):  # restored after an exception too
            with prunekit.prune_tokens(model, "flowcut", keep=0.5):
                model(**inp)
                raise RuntimeError("boom")
    assert torch.equal(same, dense)
    assert_same(before, snapshot(model))
    from tiny import DECODERS

    with pytest.raises(prunekit.errors.UnsupportedModelError, match="vision"):  # a decoder has no tower
        with prunekit.prune_tokens(DECODERS["llama"]("sdpa"), "flowcut", keep=0.5, stage="vision"):
            pass


def test_a_dinov2_tower_at_another_resolution_than_its_config():
    """DINOv2 runs at any input size (its config's image_size is the pretraining one, 518 for the
    real DINOv2-S, which the real-parts VLM feeds 224 px): the cut counts the patches it is given."""
    from transformers import Dinov2Config

    torch.manual_seed(0)
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=5, num_attention_heads=4, mlp_ratio=2,
                          patch_size=14, image_size=112)  # fmt: skip
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=LlamaConfig(**TXT), image_token_id=IMG,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      attn_implementation="sdpa")  # fmt: skip
    model = LlavaForConditionalGeneration(cfg).eval()
    n = (56 // 14) ** 2  # 16 patches at 56 px; the config's 112 px would give 64
    ids = torch.tensor([[1, 5, *[IMG] * n, 7, 9]] * 2)
    pv = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), prunekit.prune_tokens(model, "flowcut", keep=5) as session:
        out = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=2, do_sample=False)
    kept = session.stats.kept_masks[0]
    assert out.shape == (2, ids.shape[1] + 2)
    assert kept[:, 2 : 2 + n].sum(1).tolist() == [5, 5] and session.stats.tokens_kept == 10


def _llava_next(layers: int):
    torch.manual_seed(0)
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**{**CLIP_V, "num_hidden_layers": layers}),
        text_config=LlamaConfig(**TXT),
        image_token_id=IMG,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]],
        attn_implementation="sdpa",
    )
    return LlavaNextForConditionalGeneration(cfg).eval()


def test_llava_next_keeps_half_the_budget_per_crop_and_packs_with_hf():
    """Image 0 (84 x 112 on 2 x 2 tiles) loses a row of every tile to unpadding, image 1 (56 x 112)
    none. Each crop keeps K // 2 = 3 patches in the tower (the re-run); the LLM receives HF's own
    packing of the re-run's features scattered into their slots: the kept patches that unpadding
    left, and every newline token."""
    model = _llava_next(8)
    sizes = torch.tensor([[84, 112], [56, 112]])
    n_crops = [5, 3]
    pv = torch.randn(2, 5, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    crops = torch.cat([pv[0, :5], pv[1, :3]])
    with torch.no_grad():
        want_idx, want_feats = _reference(model, crops, 3)  # per crop: 3 patches and their features
        full = torch.zeros(8, 16, want_feats.shape[-1])
        flag = torch.zeros(8, 16, 1)
        for c in range(8):
            full[c, want_idx[c]] = want_feats[c]
            flag[c, want_idx[c]] = 1.0
        packed, _ = model.model.pack_image_features(
            list(torch.split(full, n_crops)), sizes, "default", image_newline=model.model.image_newline
        )
        kept_flag, _ = model.model.pack_image_features(
            list(torch.split(flag, n_crops)), sizes, "default", image_newline=torch.ones(1)
        )
    rows = [[1, 5, *[IMG] * p.shape[0], 7, 8] for p in packed]
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    am = (torch.arange(L) >= torch.tensor([L - len(r) for r in rows])[:, None]).long()
    seen = {}

    def grab(module, args, kw):
        seen.setdefault("embeds", kw["inputs_embeds"].clone())

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), prunekit.prune_tokens(model, "flowcut", keep=6) as session:
            model(input_ids=ids, attention_mask=am, pixel_values=pv, image_sizes=sizes)
    finally:
        handle.remove()
    for g in range(2):
        slots = (ids[g] == IMG).nonzero().flatten()
        kept = session.stats.kept_masks[0][g, slots]
        assert kept.tolist() == kept_flag[g][:, 0].bool().tolist()
        got = seen["embeds"][g, slots[kept]]  # the hook sees the full-length input, before the cut
        torch.testing.assert_close(got, packed[g][kept], atol=1e-5, rtol=1e-4)
    assert int(kept_flag[0][:, 0].sum()) < 5 * 3 + 8  # unpadding removed some kept patches of image 0


def test_llm_layer_one_score_from_eager_attention_and_recomputed_values(monkeypatch):
    """At the default cut (before layer 2) FlowCut scores the visual tokens from layer 1: the last
    token's eager attention row, and softmax(v_t . v_j / sqrt(d)) and |mean_heads v_j|_1 from
    layer 1's value projection of its normed input (the dense run's hidden state)."""
    from prunekit.tokens.methods.flowcut import FlowCut

    model = VLMS["llava"]("eager")
    inp = vlm_inputs("llava", model, 1)
    with torch.no_grad():
        out = model(**inp, output_hidden_states=True, output_attentions=True)
    img = (inp["input_ids"][0] == IMG).nonzero().flatten()
    layer = model.model.language_model.layers[1]
    attn = layer.self_attn
    h = layer.input_layernorm(out.hidden_states[1][0])  # (L, D) the normed input of layer 1
    v = attn.v_proj(h).view(h.shape[0], -1, attn.head_dim).transpose(0, 1)  # (H_kv, L, hd)
    sem = torch.softmax((v[:, img] @ v[:, -1, :, None])[..., 0] / math.sqrt(attn.head_dim), -1).mean(0)
    vnorm = v[:, img].mean(0).abs().sum(-1)
    rel = out.attentions[1][0].mean(0)[-1, img]
    seen = {}
    original = FlowCut.score

    def spy(self, ctx):
        seen.update({k: ctx.signal(k)[0] for k in ("last_token_attention", "value_attention", "value_norm")})
        return original(self, ctx)

    monkeypatch.setattr(FlowCut, "score", spy)
    with torch.no_grad(), prunekit.prune_tokens(model, "flowcut", keep=5, stage="llm") as s:
        model(**inp)
    torch.testing.assert_close(seen["last_token_attention"], rel, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(seen["value_attention"], sem, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(seen["value_norm"], vnorm, atol=1e-5, rtol=1e-4)
    score = (rel / rel.sum() + sem / sem.sum()) * vnorm
    want = sorted(score.topk(5).indices.tolist())
    assert s.stats.kept_masks[0][0, img].nonzero().flatten().tolist() == want


def _qwen_reference(model, fam: str, inp: dict, targets: list[int]) -> list[tuple[list[int], torch.Tensor]]:
    """FlowCut's Qwen tower loop written out per image and per merged token: pseudo-[CLS] = mean
    query, score = a * |v|, summed over a merged token's 4 patches, EMA, entropy-adaptive cuts at
    even blocks-left; each block run by HF on the survivors with per-image (or per-window) seqlens.
    Returns, per image, the kept merged tokens' raster indices and their merged features."""
    import importlib

    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    mod = importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")
    v = model.model.visual
    thw = inp["image_grid_thw"]
    n_units = [int(t * h * w) // 4 for t, h, w in thw.tolist()]
    h = v.patch_embed(inp["pixel_values"])
    cos, sin = v.rotary_pos_emb(h, get_vision_position_ids(thw, v.spatial_merge_size))
    U = sum(n_units)
    image_of = [g for g, n in enumerate(n_units) for _ in range(n)]
    raster = list(range(U))
    window_of = image_of
    windowed = fam == "qwen2_5_vl"
    if windowed:  # HF's window order: units permuted, windows contiguous
        widx, cu_win = get_vision_window_index(thw, v.spatial_merge_size, v.window_size, v.patch_size)
        perm = lambda x: x.reshape(U, 4, -1)[widx].reshape(4 * U, -1)  # noqa: E731
        h, cos, sin = perm(h), perm(cos), perm(sin)
        raster = widx.tolist()
        bounds = (cu_win // 4).tolist()
        window_of = [sum(1 for b in bounds[1:] if b <= u) for u in range(U)]
    offsets = [sum(n_units[:g]) for g in range(len(n_units))]
    units = list(range(U))  # kept block positions
    cum = None
    blocks = v.blocks
    for i, blk in enumerate(blocks):
        patches = [4 * u + j for u in units for j in range(4)]
        full = not windowed or i in v.fullatt_block_indexes
        ids = [image_of[u] if full else window_of[u] for u in units]
        lengths = [4 * ids.count(x) for x in sorted(set(ids))]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        pe = (cos[patches], sin[patches])
        counts = [sum(1 for u in units if image_of[u] == g) for g in range(len(n_units))]
        scored = any(c > t for c, t in zip(counts, targets, strict=True))
        if scored:
            attn = blk.attn
            x = blk.norm1(h)
            q, k, val = attn.qkv(x).reshape(len(patches), 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = mod.apply_rotary_pos_emb_vision(q, k, pe[0], pe[1])  # (P, H, d)
            a, start = [], 0
            for c in counts:
                qi, ki = q[start : start + 4 * c], k[start : start + 4 * c]
                qm = qi.mean(0)  # (H, d)
                a += torch.softmax(torch.einsum("hd,phd->hp", qm, ki) * attn.scaling, -1).mean(0).tolist()
                start += 4 * c
            vn = val.mean(1).abs().sum(-1).tolist()
            ua = [sum(a[4 * j : 4 * j + 4]) for j in range(len(units))]
            sc = [sum(a[4 * j + m] * vn[4 * j + m] for m in range(4)) for j in range(len(units))]
            cum = sc if cum is None else [0.5 * c0 + 0.5 * s0 for c0, s0 in zip(cum, sc, strict=True)]
        h = blk(h, cu_seqlens=cu, position_embeddings=pe)
        rpl = len(blocks) - i - 1
        if scored and rpl % 2 == 0:
            new_units, new_cum = [], []
            for g, target in enumerate(targets):
                js = [j for j, u in enumerate(units) if image_of[u] == g]
                n = len(js)
                if n > target:
                    if rpl > 0:
                        p = [ua[j] / sum(ua[j2] for j2 in js) for j in js]
                        ent = -sum(pj * math.log(pj) for pj in p if pj > 0)
                        r = round((n - target) / math.sqrt(rpl) * (1 - (ent / math.log(n)) ** 2))
                        r = min(max(r, 0), n - target)
                    else:
                        r = n - target
                    best = sorted(js, key=lambda j: (-cum[j], j))[: max(n - r, target)]
                    js = sorted(best)
                new_units += [units[j] for j in js]
                new_cum += [cum[j] for j in js]
            rows = [4 * j + m for j in range(len(units)) if units[j] in set(new_units) for m in range(4)]
            h, units, cum = h[rows], new_units, new_cum
    merged = v.merger(h)  # (U', D) block order
    out = []
    for g in range(len(n_units)):
        rows = [(raster[u] - offsets[g], j) for j, u in enumerate(units) if image_of[u] == g]
        rows.sort()
        out.append(([r for r, _ in rows], merged[[j for _, j in rows]]))
    return out


@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_tower_cut_equals_an_independent_rerun(fam):
    """Two images (8 and 16 merged tokens; Qwen2.5-VL: 2 and 4 windows), 6 vision blocks, budget
    K = 2 per image: 2K = 4 merged tokens each leave the tower, after entropy-adaptive cuts at
    blocks 1 and 3 (16 -> 14 -> 12) and the last cut at block 5; the LLM gets exactly those, with
    the re-run's merged features in their own slots."""
    from tiny import qwen2_5_vl, qwen2_vl, qwen_image_inputs

    model = (qwen2_vl if fam == "qwen2_vl" else qwen2_5_vl)("sdpa")
    for blk in list(model.model.visual.blocks):  # 6 blocks: copies of the 2 (cuts at blocks 1, 3, 5)
        model.model.visual.blocks.append(copy.deepcopy(blk))
        model.model.visual.blocks.append(copy.deepcopy(blk))
    if fam == "qwen2_5_vl":
        model.model.visual.fullatt_block_indexes = [1, 4]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a peaked pseudo-[CLS] row (a random tiny tower's is nearly flat): early cuts
        for blk in model.model.visual.blocks:
            d = blk.attn.qkv.out_features // 3
            blk.attn.qkv.weight[: 2 * d] *= 4.0
            blk.attn.qkv.bias[:d] = 12.0 * torch.randn(d, generator=g)
    model.eval()
    inp = qwen_image_inputs(model, [[(4, 8)], [(8, 8)]])
    seen = {}

    def grab(module, args, kw):
        seen.setdefault("embeds", kw["inputs_embeds"].clone())

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), prunekit.prune_tokens(model, "flowcut", keep=2) as session:
            model(**inp)
    finally:
        handle.remove()
    with torch.no_grad():
        want = _qwen_reference(model, fam, inp, targets=[4, 4])
    ids = inp["input_ids"]
    for g in range(2):
        slots = (ids[g] == model.config.image_token_id).nonzero().flatten()
        kept = session.stats.kept_masks[0][g, slots].nonzero().flatten().tolist()
        assert kept == want[g][0]
        torch.testing.assert_close(seen["embeds"][g, slots[kept]], want[g][1], atol=1e-5, rtol=1e-4)
    assert session.stats.tokens_kept == 8
