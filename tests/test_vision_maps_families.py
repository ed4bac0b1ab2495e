"""The vision-stage ``attention_map`` beyond LLaVA-1.5.

Qwen2-VL / Qwen2.5-VL: the vision block's own q/k (captured from its eager attention), softmax over
each whole image (Qwen2.5-VL's windows ignored, as HiPrune's Qwen code), pooled by hand onto the
merged tokens and put back in the LLM's raster order; each image's grid reaches the method.

LLaVA-NeXT: one group per crop, after unpadding: the crop's eager CLIP map restricted by hand to
the patches unpadding left, its grid, its tokens, and its share of the image's budget."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.tokens.methods.hiprune import HiPrune
from tiny import VLMS, qwen_image_inputs, reset

GRIDS = [[(4, 8)], [(8, 4)]]  # one image per sample, 8 merged tokens each, grids (2, 4) and (4, 2)


def captured_qk(model, fam: str, monkeypatch) -> list[dict]:
    """Per vision-block call, the (q, k) chunks its eager attention received."""
    import importlib

    mod = importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")
    calls: list[dict] = []
    original = mod.eager_attention_forward

    def spy(module, q, k, v, *args, **kw):
        if module in blocks:
            calls.append({"block": blocks[module], "q": q[0].detach(), "k": k[0].detach()})
        return original(module, q, k, v, *args, **kw)

    blocks = {blk.attn: i for i, blk in enumerate(model.model.visual.blocks)}
    monkeypatch.setattr(mod, "eager_attention_forward", spy)
    return calls


def reference_maps(model, fam: str, calls: list[dict], block: int, grids) -> list[torch.Tensor]:
    """Hand pooling: merged query row = mean of its 4 patch rows, merged key column = sum of its 4
    patch columns, in raster order of the merged grid."""
    chunks = [c for c in calls if c["block"] == block]
    q = torch.cat([c["q"] for c in chunks], dim=1)  # (H, P, d) all images, block order
    k = torch.cat([c["k"] for c in chunks], dim=1)
    scale = model.model.visual.blocks[block].attn.scaling
    order = None
    if fam == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_window_index

        v = model.model.visual
        thw = torch.tensor([[1, h, w] for imgs in grids for h, w in imgs])
        order, _ = get_vision_window_index(thw, v.spatial_merge_size, v.window_size, v.patch_size)
    out, start, unit_start = [], 0, 0
    for h, w in (hw for imgs in grids for hw in imgs):
        n, N = h * w, h * w // 4
        A = ((q[:, start : start + n] @ k[:, start : start + n].transpose(-1, -2)) * scale).softmax(-1)
        M = torch.zeros(A.shape[0], N, N)
        for i in range(N):  # block position i, j of merged tokens
            for j in range(N):
                M[:, i, j] = A[:, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].sum(-1).mean(-1)
        if order is not None:  # block position p holds merged token order[p] (image-local)
            local = order[unit_start : unit_start + N] - unit_start
            R = torch.zeros_like(M)
            for p in range(N):
                for r in range(N):
                    R[:, local[p], local[r]] = M[:, p, r]
            M = R
        out.append(M)
        start, unit_start = start + n, unit_start + N
    return out


@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen2_5_vl"])
def test_attention_maps_are_each_images_full_softmax_on_merged_tokens(fam, monkeypatch):
    from prunekit.models.vlm import Qwen2VLAdapter

    monkeypatch.setattr(Qwen2VLAdapter, "query_chunk", 8)  # 4 softmax chunks of each image's 32 patches
    model = VLMS[fam]("eager")
    inp = qwen_image_inputs(model, GRIDS)
    calls = captured_qk(model, fam, monkeypatch)
    seen = []
    original = HiPrune.select

    def spy(self, ctx, k):
        seen.append((ctx.grid, ctx.signal("attention_map", 0), ctx.signal("attention_map")))
        return original(self, ctx, k)

    monkeypatch.setattr(HiPrune, "select", spy)
    with torch.no_grad(), prunekit.prune_tokens(model, "hiprune", keep=3, object_layer=1, alpha=1.0):
        model(**inp)
    assert [s[0] for s in seen] == [(2, 4), (4, 2)]  # equal sizes, different grids: two calls
    for block, which in ((0, 1), (1, 2)):  # object layer 0; deep = the last block
        ref = reference_maps(model, fam, calls, block, GRIDS)
        got = [s[which][0] for s in seen]
        for r, g in zip(ref, got, strict=True):
            assert g.shape == r.shape
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[:2]))  # rows stay distributions
    if fam == "qwen2_5_vl":  # block 0 attends within windows; the map is the whole image's
        windows = [c for c in calls if c["block"] == 0]
        assert len(windows) > len(GRIDS)


def test_hiprune_reads_the_image_grid_on_qwen(monkeypatch):
    """HiPrune on a non-square Qwen grid: an anchor's buffers are its grid neighbours (width 4)."""
    model = VLMS["qwen2_vl"]("sdpa")
    inp = qwen_image_inputs(model, [[(4, 8)]])
    seen = {}
    original = HiPrune.select

    def spy(self, ctx, k):
        sel = original(self, ctx, k)
        seen["s_obj"] = ctx.signal("attention_map", 0).mean(1).mean(1)[0]
        seen["keep"] = sel.keep[0].tolist()
        return sel

    monkeypatch.setattr(HiPrune, "select", spy)
    with (
        torch.no_grad(),
        prunekit.prune_tokens(model, "hiprune", keep=5, object_layer=1, alpha=1.0, faithful=False),
    ):
        model(**inp)
    anchor = int(seen["s_obj"].argmax())
    r, c = divmod(anchor, 4)
    buffers = {anchor} | {rr * 4 + cc for rr, cc in ((r, c - 1), (r, c + 1), (r - 1, c), (r + 1, c))
                          if 0 <= rr < 2 and 0 <= cc < 4}  # fmt: skip
    assert buffers <= set(seen["keep"])


@pytest.mark.parametrize("fam", ["qwen2_vl", "qwen2_5_vl"])
def test_holitom_merges_a_qwen_samples_images_as_frames(fam):
    model = VLMS[fam]("sdpa")
    inp = qwen_image_inputs(model, [[(4, 8)] * 3, [(4, 8)] * 3], frames_like=True)
    n_vis = int((inp["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        model(**inp)
        reset(model)
        dense = model(**inp).logits
        reset(model)
        with prunekit.prune_tokens(model, "holitom", keep=0.25) as s:
            out = model(**inp).logits
        reset(model)
        with prunekit.prune_tokens(model, "holitom", keep=1.0):
            same = model(**inp).logits
    assert s.stats.tokens_in == n_vis and s.stats.tokens_kept == 2 * round(0.25 * n_vis / 2)
    assert out.shape[1] == dense.shape[1] - (n_vis - s.stats.tokens_kept) // 2 and torch.isfinite(out).all()
    torch.testing.assert_close(same, dense)


# ---------------------------------------------------------------- LLaVA-NeXT: per-crop groups
def test_llava_next_groups_are_crops_after_unpadding_with_their_maps_tokens_and_budget(monkeypatch):
    """A 84 x 112 (h x w) image on 112 x 112: 2 x 2 crops of 4 x 4 patches plus the base crop; the
    unpadding drops the combined grid's first and last row, so the top crops keep patches 4..15 and
    the bottom crops 0..11 (3 x 4 each)."""
    model = VLMS["llava_next"]("eager")
    cfg = model.config
    sizes = torch.tensor([[84, 112]])
    pv = torch.randn(1, 5, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        n_img = model.model.get_image_features(pixel_values=pv, image_sizes=sizes).pooler_output[0].shape[0]
    ids = torch.tensor([[1, 5, 6, *[cfg.image_token_id] * n_img, 7, 8]])
    inp = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_sizes=sizes)
    seen = []
    original = HiPrune.select

    def spy(self, ctx, k):
        seen.append((ctx.grid, k, ctx.tokens, ctx.signal("attention_map", 0)))
        return original(self, ctx, k)

    monkeypatch.setattr(HiPrune, "select", spy)
    with torch.no_grad():
        tower = model.model.vision_tower(pv[0], output_attentions=True, output_hidden_states=True)
        feats = model.model.multi_modal_projector(tower.hidden_states[-2][:, 1:])  # (5 crops, 16, D)
        with prunekit.prune_tokens(model, "hiprune", keep=16, object_layer=1, alpha=1.0) as s:
            model(**inp)
    patches = [torch.arange(16)] + [torch.arange(4, 16)] * 2 + [torch.arange(12)] * 2  # by hand
    expected = {(4, 4): (4, [0]), (3, 4): (3, [1, 2, 3, 4])}  # grid -> (k: 16 x 16/64, 12 x 16/64), crops
    assert sorted((g, k, t.shape[0]) for g, k, t, _ in seen) == [((3, 4), 3, 4), ((4, 4), 4, 1)]
    for grid, k, tokens, maps in seen:
        assert k == expected[grid][0]
        for row, crop in enumerate(expected[grid][1]):
            p = patches[crop]
            torch.testing.assert_close(tokens[row], feats[crop, p])
            ref = tower.attentions[0][crop, :, 1:, 1:][:, p][:, :, p]  # object layer 1 = layer 0
            torch.testing.assert_close(maps[row], ref, atol=1e-5, rtol=1e-4)
    newlines = n_img - 16 - 4 * 12
    assert s.stats.tokens_in == 64 and s.stats.tokens_kept == 16
    assert int(s.stats.kept_masks[0][0, 3 : 3 + n_img].sum()) == 16 + newlines


def test_llava_next_per_crop_map_is_refused_to_a_method_that_selects_per_image():
    from prunekit.errors import SignalUnavailableError
    from prunekit.models import support_matrix

    model = VLMS["llava_next"]("sdpa")
    with pytest.raises(SignalUnavailableError, match=r"per crop.*'holitom' selects per sample"):
        with prunekit.prune_tokens(model, "holitom", keep=0.5):
            pass
    stage, why = support_matrix(["holitom"])["holitom"]["llava_next"]
    assert stage is None and "per crop" in why
    assert support_matrix(["hiprune"])["hiprune"]["llava_next"][0] == "vision"


@pytest.mark.parametrize(
    ("k", "sizes", "shares"),
    [(16, [16, 12, 12, 12, 12], [4, 3, 3, 3, 3]), (10, [16, 16, 16], [4, 3, 3]), (5, [3, 1], [3, 1])],
)
def test_split_budget_is_proportional_with_largest_remainders(k, sizes, shares):
    from prunekit.models.vlm import split_budget

    assert split_budget(k, torch.tensor(sizes)).tolist() == shares


# ---------------------------------------------------------------- HoloV's Qwen variant
def test_holov_uses_received_attention_where_the_tower_has_no_cls():
    from prunekit.errors import SignalUnavailableError
    from prunekit.tokens.context import TokenContext
    from prunekit.tokens.methods.holov import HoloV

    assert HoloV().for_family("qwen2_vl", has_cls=False).attention == "received"
    assert HoloV().for_family("llava", has_cls=True).attention == "cls"
    assert HoloV(attention="cls").for_family("qwen2_vl", has_cls=False).attention == "cls"
    # "received" ranks by the map's mean over heads and queries, exactly as "cls" on that vector
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 3, 16, 16, generator=g).softmax(-1)
    tokens = torch.randn(2, 16, 8, generator=g)
    received = maps.mean(1).mean(1)
    ctx_map = TokenContext(stage="vision", tokens=tokens, signals={"attention_map": maps})
    ctx_cls = TokenContext(stage="vision", tokens=tokens, signals={"cls_attention": received})
    a = HoloV(attention="received", num_crops=4).select(ctx_map, 5).keep
    b = HoloV(attention="cls", num_crops=4).select(ctx_cls, 5).keep
    assert torch.equal(a, b)
    model = VLMS["qwen2_vl"]("sdpa")
    with pytest.raises(SignalUnavailableError, match="cls_attention"):
        with prunekit.prune_tokens(model, "holov", keep=4, attention="cls"):
            pass
    with pytest.raises(ValueError, match="attention must be one of"):
        HoloV(attention="row")
