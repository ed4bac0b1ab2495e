"""Qwen2-VL / Qwen2.5-VL vision-stage ``attention_map``: the vision block's own q/k (captured from
its eager attention), softmax over each whole image (Qwen2.5-VL's windows ignored, as HiPrune's
Qwen code), pooled by hand onto the merged tokens and put back in the LLM's raster order; each
image's grid reaches the method; the attention-map methods run on both families."""

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
