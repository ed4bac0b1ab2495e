"""ToMe's bipartite soft matching and size-weighted merging on hand-worked cases."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.tokens.merge import bipartite_soft_matching, merge_source, merge_wavg
from prunekit.tokens.methods.tome import ToMe
from reference import tome_official_forward
from tiny_encoders import build, inputs


def test_r_zero_is_identity():
    x = torch.randn(2, 7, 4)
    plan = bipartite_soft_matching(x, 0, protected=1)
    out, size = merge_wavg(plan, x, torch.ones(2, 7, 1))
    assert torch.equal(out, x) and torch.equal(size, torch.ones(2, 7, 1))


def test_hand_worked_merge():
    # CLS + 4 tokens; with one protected token, A = original indices {2, 4}, B = {1, 3}.
    # cos(2 -> 1) = 0.994 (best partner 1), cos(4 -> 3) = 0.8 > cos(4 -> 1) = 0.6 (best partner 3).
    # r = 1: the strongest edge 2 -> 1 merges; output = [CLS, 4 (kept A), (1+2)/2, 3].
    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.8]]])
    plan = bipartite_soft_matching(x, 1, protected=1)
    out, size = merge_wavg(plan, x, torch.ones(1, 5, 1))
    expected = torch.tensor([[[5.0, 5.0], [0.6, 0.8], [0.95, 0.05], [0.0, 1.0]]])
    assert torch.allclose(out, expected)
    assert size.flatten().tolist() == [1.0, 1.0, 2.0, 1.0]


def test_identical_tokens_merge_into_one_of_size_two():
    t, u = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    x = torch.stack([torch.tensor([9.0, 9.0, 9.0]), t, t, u])[None]  # CLS, t (B), t (A), u (B)
    out, size = merge_wavg(bipartite_soft_matching(x, 1, protected=1), x, torch.ones(1, 4, 1))
    assert torch.allclose(out[0], torch.stack([x[0, 0], t, u]))
    assert size.flatten().tolist() == [1.0, 2.0, 1.0]


def test_mass_conserved_cls_first_and_length():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 8, generator=g)
    size = torch.rand(3, 17, 1, generator=g) + 0.5
    for protected in (1, 2):
        plan = bipartite_soft_matching(torch.randn(3, 17, 5, generator=g), 5, protected=protected)
        out, new_size = merge_wavg(plan, x, size)
        assert out.shape == (3, 17 - 5, 8)
        assert torch.allclose((out * new_size).sum(1), (x * size).sum(1), atol=1e-5)
        assert torch.allclose(new_size.sum(1), size.sum(1))
        assert torch.allclose(out[:, :protected], x[:, :protected], atol=1e-6)  # (x*size)/size rounds


def test_r_capped_at_half_of_the_mergeable_tokens():
    plan = bipartite_soft_matching(torch.randn(1, 9, 4), 100, protected=1)  # 8 mergeable -> A has 4
    assert plan.r == 4


def test_merge_source_tracks_original_patches():
    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.8]]])
    src = merge_source(bipartite_soft_matching(x, 1, protected=1), torch.eye(5)[None])
    assert src[0].tolist() == [[1, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 1, 1, 0, 0], [0, 0, 0, 1, 0]]


def test_schedule_spreads_removals_and_respects_budget():
    sched = ToMe().merge_schedule(256, 12, 0.5)
    assert sum(sched) == 128 and max(sched) - min(sched) <= 1
    assert ToMe().merge_schedule(256, 12, 1.0) == [0] * 12
    assert ToMe().merge_schedule(10, 1, 1) == [5]  # wants 9, capped at half
    assert sum(ToMe().merge_schedule(196, 12, 16)) == 180


def test_schedule_front_loads_where_the_half_cap_would_bind_late():
    # 256 -> 16 in 4 blocks is only possible by halving every time; an even 60 per block is not
    assert ToMe().merge_schedule(256, 4, 16) == [128, 64, 32, 16]
    for n, blocks, keep in [(256, 12, 16), (256, 12, 1), (197, 12, 3), (50, 6, 2)]:
        sched, left = ToMe().merge_schedule(n, blocks, keep), n
        for r in sched:
            assert r <= left // 2, (n, blocks, keep, sched)
            left -= r
        assert left == keep, (n, blocks, keep, sched)


def test_plan_unpacks_into_merge_and_unmerge():
    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.8]]])
    merge, unmerge = bipartite_soft_matching(x, 1, protected=1)
    summed = merge(x)  # default reduction: sum
    assert torch.allclose(summed, torch.tensor([[[5.0, 5.0], [0.6, 0.8], [1.9, 0.1], [0.0, 1.0]]]))
    assert unmerge(summed).shape == x.shape


def test_unmerge_maps_every_original_token_to_the_token_holding_it():
    # the hand-worked plan above: 2 merged into 1, so unmerge gives 1 and 2 the merged value
    x = torch.tensor([[[5.0, 5.0], [1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.8]]])
    plan = bipartite_soft_matching(x, 1, protected=1)
    back = plan.unmerge(merge_wavg(plan, x, torch.ones(1, 5, 1))[0])
    expected = torch.tensor([[[5.0, 5.0], [0.95, 0.05], [0.95, 0.05], [0.0, 1.0], [0.6, 0.8]]])
    assert torch.allclose(back, expected)
    g = torch.Generator().manual_seed(1)
    for protected in (1, 2):
        plan = bipartite_soft_matching(torch.randn(2, 12, 4, generator=g), 4, protected=protected)
        covers = plan.unmerge(merge_source(plan, torch.eye(12).expand(2, -1, -1)))  # (B, T, T0)
        assert covers.shape == (2, 12, 12)
        assert bool(covers.diagonal(dim1=1, dim2=2).eq(1).all())  # every token's row covers itself
        assert bool(covers[:, :protected].sum(-1).eq(1).all())  # protected tokens cover only themselves
        assert covers.sum(-1).max().item() > 1  # ...while merged ones cover several


def test_constant_r_schedule_is_the_official_capped_one_by_hand():
    # 196 mergeable (ViT-B/16 at 224), r = 16 over 12 blocks: 196 - 16*11 = 20 left before the last
    # block, which may merge only 20 // 2 = 10: the official schedule [16]*11 + [10] (8 tokens left)
    assert ToMe(r=16).merge_schedule(196, 12, None) == [16] * 11 + [10]
    # ViT-L/16 at 224, r = 8 over 24 blocks: 196 - 8*22 = 20, then min(8, 10) = 8, then min(8, 6) = 6
    assert ToMe(r=8).merge_schedule(196, 24, None) == [8] * 23 + [6]
    assert ToMe(r=5).merge_schedule(16, 4, None) == [5, 5, 3, 1]  # 16 -> 11 -> 6 -> 3 -> 2
    assert ToMe(r=[3, 0, 9]).merge_schedule(16, 4, None) == [3, 0, 6, 0]  # list form: per block, then 0
    for bad in (-1, 1.5, True, [], [2, -1], "8"):
        with pytest.raises(ValueError, match="ToMe r must be an int >= 0"):
            ToMe(r=bad)


@pytest.mark.parametrize("fam", ["vit", "deit"])
def test_constant_r_equals_an_independent_official_tome_forward(fam):
    """prunekit with ``r`` vs the official algorithm re-written in ``tests/reference.py`` (its own
    matching, merge order, eager attention with log-size bias) on the same tiny model: per-block
    token counts follow the hand-computed capped schedule, and the outputs agree."""
    model = build(fam)  # 16 patches + CLS (+ distillation token), 4 blocks
    x = inputs(fam, model)["pixel_values"]
    base = getattr(model, fam)
    p = 2 if fam == "deit" else 1
    with torch.no_grad():
        ref, counts = tome_official_forward(base, base.embeddings(x), r=5, dist=fam == "deit")
        with prunekit.prune_tokens(model, "tome", r=5) as s:
            hs = base(pixel_values=x, output_hidden_states=True).hidden_states
    assert counts == [p + n for n in (16, 11, 6, 3, 2)]  # r_l = min(5, left // 2) = 5, 5, 3, 1
    assert [h.shape[1] for h in hs] == counts
    err = (hs[-1] - ref).abs().max().item()
    assert err < 1e-5, f"{fam}: ToMe r=5 differs from the official algorithm by {err:.2e} (tol 1e-5)"
    assert s.stats.tokens_in == 2 * 16 and s.stats.tokens_kept == 2 * 2


def test_keep_and_r_are_exclusive_and_one_is_required():
    model = build("vit")
    with pytest.raises(ValueError, match="not both"):
        with prunekit.prune_tokens(model, "tome", keep=0.5, r=4):
            pass
    with pytest.raises(ValueError, match="keep is required"):
        with prunekit.prune_tokens(model, "tome"):
            pass
    with pytest.raises(ValueError, match="keep is required"):
        with prunekit.prune_tokens(model, "random", layer=2):
            pass
