"""ToMe's bipartite soft matching and size-weighted merging on hand-worked cases."""

from __future__ import annotations

import torch

from prunekit.tokens.merge import bipartite_soft_matching, merge_source, merge_wavg
from prunekit.tokens.methods.tome import ToMe


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
