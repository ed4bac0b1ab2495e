"""Each method's selection on small hand-worked cases (pure tensors, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from prunekit.models.attention import cls_query_attention
from prunekit.models.sequence import attention_mask_4d, left_pack
from prunekit.tokens.context import TokenContext, topk_sorted
from prunekit.tokens.methods.divprune import DivPrune, cosine_distance, max_min_diverse
from prunekit.tokens.methods.fastervlm import FasterVLM
from prunekit.tokens.methods.fastv import FastV
from prunekit.tokens.methods.random import RandomDrop


def ctx(n=5, d=3, groups=1, **signals):
    return TokenContext(stage="test", tokens=torch.zeros(groups, n, d), signals=signals)


def test_topk_sorted_ascending_and_lower_index_wins_ties():
    s = torch.tensor([[0.1, 0.7, 0.3, 0.7, 0.2]])
    assert topk_sorted(s, 2).tolist() == [[1, 3]]
    assert topk_sorted(torch.tensor([[0.5, 0.9, 0.5, 0.5]]), 2).tolist() == [[0, 1]]  # tie 0/2/3 -> 0


def test_fastv_keeps_the_highest_last_token_attention():
    row = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15], [0.5, 0.1, 0.1, 0.2, 0.1]])
    sel = FastV(layer=2).select(ctx(groups=2, last_token_attention=row), 2)
    assert sel.keep.tolist() == [[1, 3], [0, 3]]


def test_fastervlm_keeps_highest_head_mean_cls_attention():
    # Hand-made attention: 2 heads, CLS row per head is a known permutation of the patch columns.
    head0 = torch.tensor([0.10, 0.40, 0.20, 0.30])
    head1 = torch.tensor([0.60, 0.05, 0.30, 0.05])
    # head means [0.35, 0.225, 0.25, 0.175] -> patches 0 and 2 (head 0 alone would pick 1 and 3)
    mean = torch.stack([head0, head1]).mean(0)
    sel = FasterVLM().select(ctx(n=4, cls_attention=mean[None]), 2)
    assert sel.keep.tolist() == [[0, 2]]


def test_cls_query_attention_hand_computed():
    # identity projections, 1 head, d=2: CLS q = (1, 0); keys = tokens; logits = x_j[0] * scale
    proj = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(2))
    x = torch.tensor([[[1.0, 0.0], [2.0, 5.0], [0.0, 1.0]]])
    got = cls_query_attention(proj, proj, x, num_heads=1, scale=1.0)
    e = torch.tensor([math.e**1, math.e**2, math.e**0])
    assert torch.allclose(got[0], e / e.sum(), atol=1e-6)


def test_divprune_spec_example_angles():
    """Spec: unit vectors at 0, 10, 90, 180 degrees, keep 3 -> [0, 2, 3] (first pick 180 deg)."""
    a = torch.tensor([0.0, 10.0, 90.0, 180.0]) * math.pi / 180
    x = torch.stack([a.cos(), a.sin()], -1)[None]
    d = cosine_distance(x)[0]
    assert abs(d[0, 1].item() - (1 - math.cos(math.radians(10)))) < 1e-6
    assert DivPrune().select(TokenContext("t", x), 3).keep.tolist() == [[0, 2, 3]]


def test_divprune_first_pick_and_scale_invariance_and_no_duplicates():
    a = torch.tensor([0.0, 10.0, 90.0, 180.0]) * math.pi / 180
    x = torch.stack([a.cos(), a.sin()], -1)[None]
    assert max_min_diverse(cosine_distance(x), 1).tolist() == [[3]]
    scaled = x * torch.tensor([[[3.0], [0.5], [7.0], [2.0]]])
    assert max_min_diverse(cosine_distance(scaled), 3).tolist() == [[0, 2, 3]]
    dup = torch.ones(1, 6, 4)  # all identical: the official code could repeat an index
    keep = max_min_diverse(cosine_distance(dup), 4)[0]
    assert len(set(keep.tolist())) == 4


def test_divprune_beats_random_subsets_on_min_pairwise_distance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 40, 8, generator=g)
    d = cosine_distance(x)[0]
    keep = max_min_diverse(d[None], 6)[0]

    def min_pair(idx):
        sub = d[idx][:, idx] + torch.eye(len(idx)) * 10
        return sub.min().item()

    rand = [min_pair(torch.randperm(40, generator=g)[:6]) for _ in range(50)]
    assert min_pair(keep) > sorted(rand)[len(rand) // 2], (min_pair(keep), sorted(rand))


def test_random_is_seeded_and_sorted():
    c = ctx(n=20, groups=2)
    a = RandomDrop(seed=3).select(c, 5).keep
    b = RandomDrop(seed=3).select(c, 5).keep
    assert torch.equal(a, b) and bool((a.diff(dim=-1) > 0).all())
    assert not torch.equal(a, RandomDrop(seed=4).select(c, 5).keep)


def test_left_pack_hand_worked():
    keep = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    idx, valid = left_pack(keep)
    assert idx[0].tolist() == [0, 2, 3]
    assert idx[1, -1].item() == 1 and valid.tolist() == [[True, True, True], [False, False, True]]


def test_attention_mask_4d_hand_worked():
    valid = torch.tensor([[False, True, True]])
    m = attention_mask_4d(valid, q_len=3, dtype=torch.float32, additive=False)[0, 0]
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    dec = attention_mask_4d(
        torch.tensor([[False, True, True, True]]), q_len=1, dtype=torch.float32, additive=True
    )
    assert dec[0, 0, 0, 0].item() == torch.finfo(torch.float32).min and dec[0, 0, 0, 1:].eq(0).all()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_keep_all_and_counts(k):
    sel = FastV().select(ctx(last_token_attention=torch.rand(1, 5)), k)
    assert sel.keep.shape == (1, k)
