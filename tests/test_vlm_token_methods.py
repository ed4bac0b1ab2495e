"""HiPrune, FoPru, HoloV, VisionZip and ToDRE on small hand-worked cases (pure tensors, no model).

Expected indices are worked out by hand from the spec's pseudo-code (specs/vlm-tokens.md §5-§9, B4),
never from the methods' own output.
"""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.errors import SignalUnavailableError
from prunekit.tokens.context import Signal, TokenContext
from prunekit.tokens.methods.divprune import greedy_diverse
from prunekit.tokens.methods.fopru import FoPru
from prunekit.tokens.methods.hiprune import HiPrune, received_attention
from prunekit.tokens.methods.holov import HoloV, allocate, crop_ids, crop_scores, even_split
from prunekit.tokens.methods.todre import ToDRE
from prunekit.tokens.methods.visionzip import VisionZip

W = 24  # LLaVA-1.5 grid width
N = W * W


def same_rows(p: torch.Tensor, heads: int = 2) -> torch.Tensor:
    """An attention map ``(G, H, N, N)`` whose every query row is ``p`` ``(G, N)``: received = ``p``."""
    G, n = p.shape
    return p[:, None, None, :].expand(G, heads, n, n).clone()


def check_plan(keep: torch.Tensor, groups: int, k: int, n: int) -> None:
    assert keep.shape == (groups, k) and keep.dtype == torch.long
    assert bool((keep[:, 1:] > keep[:, :-1]).all()), "ascending, no duplicates"
    assert int(keep.min()) >= 0 and int(keep.max()) < n


# ---------------------------------------------------------------------------- registry
def test_the_five_methods_are_registered_for_the_vision_stage():
    for name in ("hiprune", "fopru", "holov", "visionzip", "todre"):
        info = prunekit.registry.get(name)
        assert info.family == "tokens" and info.stages[0] == "vision" and info.paper
    assert prunekit.registry.get("todre").stages == ("vision", "llm")  # stage 2 inside the LLM
    assert HiPrune().needs("vision") == (Signal("attention_map", 8), Signal("attention_map", None))
    assert HiPrune(object_layer=16, deep_layer=31).needs("vision") == (
        Signal("attention_map", 15),
        Signal("attention_map", 31),
    )
    assert FoPru().needs("vision") == (Signal("attention_map", None),)
    assert HoloV().needs("vision") == (Signal("cls_attention", None), Signal("tokens"))
    assert VisionZip().needs("vision") == (Signal("cls_attention", None), Signal("tokens"))
    assert ToDRE().needs("vision") == (Signal("tokens"),)


def test_options_are_validated():
    with pytest.raises(ValueError, match="strategy"):
        FoPru(strategy="column")
    with pytest.raises(ValueError, match="square num_crops"):
        HoloV(num_crops=8)
    with pytest.raises(ValueError, match="crops"):
        HoloV(crops="3d")
    with pytest.raises(ValueError, match="objective"):
        ToDRE(objective="minsum")
    with pytest.raises(ValueError, match="1-based"):
        HiPrune(object_layer=0)
    with pytest.raises(ValueError, match="alpha"):
        HiPrune(alpha=1.5)


# ---------------------------------------------------------------------------- HiPrune
def hiprune_ctx(s_obj: torch.Tensor, s_deep: torch.Tensor, grid=None) -> TokenContext:
    G, n = s_obj.shape
    return TokenContext(
        "vision",
        torch.zeros(G, n, 4),
        signals={"attention_map@8": same_rows(s_obj), "attention_map": same_rows(s_deep)},
        grid=grid,
    )


def peak(at: int, n: int = N) -> torch.Tensor:
    p = torch.full((1, n), 0.1 / n)
    p[0, at] = 0.5
    return p


DECREASING = (torch.arange(N, 0, -1, dtype=torch.float32) / N**2)[None]  # registers = lowest indices
INCREASING = (torch.arange(1, N + 1, dtype=torch.float32) / N**2)[None]  # registers = highest indices


def test_received_attention_is_head_mean_then_query_mean():
    A = torch.tensor([[[[0.2, 0.8], [0.6, 0.4]], [[1.0, 0.0], [0.0, 1.0]]]])  # (1, 2 heads, 2, 2)
    # head mean [[0.6, 0.4], [0.3, 0.7]] -> column means [0.45, 0.55]
    assert torch.allclose(received_attention(A), torch.tensor([[0.45, 0.55]]))


def test_hiprune_peak_in_the_grid_keeps_its_four_buffers():
    p = 5 * W + 5  # 125; k = 64 -> round(64 * 0.1 / 5) = 1 anchor
    sel = HiPrune().select(hiprune_ctx(peak(p), DECREASING), 64)
    buffers = [p - W, p - 1, p, p + 1, p + W]  # 101, 124, 125, 126, 149
    assert sel.keep.tolist() == [list(range(59)) + buffers]  # 64 - 5 = 59 registers: tokens 0..58


def test_hiprune_peak_at_0_gives_three_candidates():
    sel = HiPrune().select(hiprune_ctx(peak(0), INCREASING), 64)
    # {0, -1 -> 0, 1, -24 -> 0, 24} = {0, 1, 24}: 61 registers, the highest-index tokens
    assert sel.keep.tolist() == [[0, 1, 24, *range(N - 61, N)]]


def test_hiprune_faithful_wraps_and_clamps_the_fixed_mode_does_not():
    first_col = 5 * W  # 120: official left neighbour is 119, the end of the row above
    faithful = HiPrune().select(hiprune_ctx(peak(first_col), DECREASING), 64).keep
    fixed = HiPrune(faithful=False).select(hiprune_ctx(peak(first_col), DECREASING), 64).keep
    assert faithful.tolist() == [[*range(59), 96, 119, 120, 121, 144]]
    assert fixed.tolist() == [[*range(60), 96, 120, 121, 144]]  # one more register instead of 119

    top_row = 5  # official: 5 - 24 clamps to token 0
    faithful = HiPrune().select(hiprune_ctx(peak(top_row), INCREASING), 64).keep
    fixed = HiPrune(faithful=False).select(hiprune_ctx(peak(top_row), INCREASING), 64).keep
    assert faithful.tolist() == [[0, 4, 5, 6, 29, *range(N - 59, N)]]
    assert fixed.tolist() == [[4, 5, 6, 29, *range(N - 60, N)]]


def test_hiprune_anchor_count_rounds_like_python_and_uses_the_grid():
    # k = 128 -> round(2.56) = 3 anchors: the three peaks, each with its 4 neighbours on a 6x8 grid
    rows, cols = 6, 8
    s_obj = torch.full((1, 48), 0.001)
    s_obj[0, [9, 30, 37]] = torch.tensor([0.5, 0.4, 0.3])
    s_obj[0, 20] = 0.2  # 4th best: not an anchor
    ctx = hiprune_ctx(s_obj, torch.zeros(1, 48) + torch.arange(48) * 1e-4, grid=(rows, cols))
    keep = HiPrune(alpha=0.1).select(ctx, 16).keep  # k=16: round(16 * 0.1 / 5) = 0 anchors
    assert keep.tolist() == [list(range(32, 48))]  # registers only
    keep = HiPrune(alpha=1.0).select(ctx, 16).keep  # round(3.2) = 3 anchors -> 15 candidates + 1 register
    # anchor +0, -1, +1, -8, +8 on the 8-wide grid; 29 and 38 are neighbours of both 30 and 37
    cands = {9, 8, 10, 1, 17} | {30, 29, 31, 22, 38} | {37, 36, 38, 29, 45}
    assert len(cands) == 13
    assert keep.tolist() == [sorted(cands | {47, 46, 44})]  # 3 registers: the highest-index others


def test_hiprune_groups_exact_k_and_keep_all():
    g = torch.Generator().manual_seed(0)
    s_obj, s_deep = torch.rand(3, N, generator=g), torch.rand(3, N, generator=g)
    for k in (12, 64, 128, 192, 575):
        check_plan(HiPrune().select(hiprune_ctx(s_obj, s_deep), k).keep, 3, k, N)
    assert HiPrune().select(hiprune_ctx(s_obj, s_deep), N).keep.tolist() == [list(range(N))] * 3


def test_hiprune_refuses_a_single_map_and_a_non_square_group():
    one_map = TokenContext("vision", torch.zeros(1, N, 4), signals={"attention_map": same_rows(DECREASING)})
    with pytest.raises(SignalUnavailableError, match="two vision layers"):
        HiPrune().select(one_map, 64)
    with pytest.raises(SignalUnavailableError, match="attention_map@22"):
        HiPrune(deep_layer=22).select(hiprune_ctx(DECREASING, DECREASING), 64)
    odd = hiprune_ctx(torch.rand(1, 50), torch.rand(1, 50))
    with pytest.raises(ValueError, match="not a square"):
        HiPrune().select(odd, 10)


# ---------------------------------------------------------------------------- FoPru
def fopru_ctx(attn: torch.Tensor, grid=None) -> TokenContext:
    return TokenContext(
        "vision", torch.zeros(attn.shape[0], attn.shape[-1], 4), {"attention_map": attn}, grid
    )


def test_fopru_row_strategy_spec_example():
    # every query row is p: rows of M sum to 1, s_row is constant, so s_recv = p is the significance
    row_sums = torch.tensor([1.0, 4.0, 2.0, 3.0])
    p = (row_sums / 40).repeat_interleave(4)[None]  # (1, 16), sums to 1
    keep = FoPru(strategy="row").select(fopru_ctx(same_rows(p)), 8).keep  # ratio 0.5 -> 2 rows
    assert keep.tolist() == [[4, 5, 6, 7, 12, 13, 14, 15]]


def test_fopru_row_strategy_fills_the_leftover_slots_by_significance():
    p = torch.tensor([[1, 2, 3, 9, 5, 5, 5, 5, 0, 0, 8, 0, 4, 4, 4, 6]], dtype=torch.float32)
    # row sums 15, 20, 8, 18: k=6 -> row 1 whole (4..7) + the 2 best outside it: 9 (3), 8 (10)
    assert FoPru(strategy="row").select(fopru_ctx(same_rows(p)), 6).keep.tolist() == [[3, 4, 5, 6, 7, 10]]
    # rank: 9, 8, 6, 5, 5, 5 (ties to the lower index)
    assert FoPru(strategy="rank").select(fopru_ctx(same_rows(p)), 6).keep.tolist() == [[3, 4, 5, 6, 10, 15]]


def test_fopru_uses_the_row_mean_when_it_varies_more():
    # M[q, :] = r[q] / 4 (rows do not sum to 1 once CLS is dropped): s_recv is constant, s_row = r / 4
    r = torch.tensor([0.2, 0.9, 0.5, 0.1])
    attn = (r[:, None] / 4).expand(4, 4)[None, None].expand(1, 2, 4, 4)
    assert FoPru().select(fopru_ctx(attn), 2).keep.tolist() == [[1, 2]]  # s_recv would tie -> [0, 1]


def test_fopru_grid_exact_k_and_keep_all():
    g = torch.Generator().manual_seed(1)
    attn = torch.rand(2, 2, 16, 16, generator=g).softmax(-1)
    keep = FoPru(strategy="row").select(fopru_ctx(attn, grid=(2, 8)), 9).keep  # 1 row of 8 + 1
    check_plan(keep, 2, 9, 16)
    for strategy in ("rank", "row"):
        for k in (1, 5, 8, 15):
            check_plan(FoPru(strategy=strategy).select(fopru_ctx(attn), k).keep, 2, k, 16)
        assert FoPru(strategy=strategy).select(fopru_ctx(attn), 20).keep.tolist() == [list(range(16))] * 2
    with pytest.raises(ValueError, match="not a square"):
        FoPru(strategy="row").select(fopru_ctx(torch.rand(1, 1, 12, 12)), 4)


# ---------------------------------------------------------------------------- HoloV
def holov_ctx(a: torch.Tensor, x: torch.Tensor, grid=None) -> TokenContext:
    return TokenContext("vision", x, {"cls_attention": a}, grid)


def two_chunk_tokens() -> torch.Tensor:
    """8 tokens: the first 4 all e1, the last 4 all e2 (same similarity structure in both chunks)."""
    return torch.eye(2).repeat_interleave(4, dim=0)[None]  # (1, 8, 2)


def test_holov_crop_ids_1d_chunks_and_2d_rectangles():
    assert even_split(10, 4).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]  # sizes 3, 3, 2, 2
    assert crop_ids(4, 4, 4, "1d").tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert crop_ids(4, 4, 4, "2d").tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    # 5x5 in 2x2 crops: bands of 3 then 2 rows / columns
    assert crop_ids(5, 5, 4, "2d").view(5, 5)[:, 0].tolist() == [0, 0, 0, 2, 2]
    assert crop_ids(5, 5, 4, "2d").view(5, 5)[0].tolist() == [0, 0, 0, 1, 1]


def test_holov_spec_allocation_example():
    # N=8, C=2, K=4; chunk 0's mean attention (0.2) is twice chunk 1's (0.1)
    a = torch.tensor([[0.10, 0.25, 0.15, 0.30, 0.01, 0.21, 0.17, 0.01]])
    x = two_chunk_tokens()
    crop = crop_ids(1, 8, 2, "1d")
    # identical tokens: S_ij = 1 off the diagonal, mean_i = 1, var_i = (0 - 1)^2 / 3 = 1/3 (zeroed diagonal)
    # crop score = mean(1000 a) * (1 + 0.09 * (1/3) / (1/3 + 1e-6)) = 200 * 1.09, 100 * 1.09
    score = crop_scores(a, x, crop, 2, 0.09)
    assert torch.allclose(score, torch.tensor([[218.0, 109.0]]), rtol=1e-5)
    w = score / (score.sum(-1, keepdim=True) + 1e-6)  # [2/3, 1/3]
    assert allocate(w, 4).tolist() == [[3, 1]]  # floor [2.67, 1.33] = [2, 1], leftover 1 to chunk 0
    # chunk 0: its top 3 by attention (3, 1, 2); chunk 1: its top 1 (5)
    assert HoloV(crops="1d", num_crops=2).select(holov_ctx(a, x), 4).keep.tolist() == [[1, 2, 3, 5]]
    # (a plain top-4 by attention would keep [1, 3, 5, 6])


def test_holov_2d_crops_differ_from_the_official_1d_chunks():
    a = torch.tensor(
        [[0.9, 0.7, 0.31, 0.3, 0.5, 0.3, 0.35, 0.25, 0.2, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0]]
    )  # 4x4 grid, row-major
    x = torch.ones(1, 16, 3)  # identical tokens: equal similarity terms, allocation follows attention
    # 2-D crops {0,1,4,5} {2,3,6,7} {8,9,12,13} {10,11,14,15}: sums 2.4, 1.21, 0.2, 0.2
    #   4 w = [2.39, 1.21, 0.20, 0.20] -> [2, 1, 0, 0] + leftover -> [3, 1, 0, 0] -> {0, 1, 4} + {6}
    assert HoloV(crops="2d", num_crops=4).select(holov_ctx(a, x), 4).keep.tolist() == [[0, 1, 4, 6]]
    # 1-D chunks = rows: sums 2.21, 1.4, 0.4, 0 -> 4 w = [2.20, 1.40, 0.40, 0] -> [3, 1, 0, 0]
    #   -> {0, 1, 2} + {4}
    assert HoloV(crops="1d", num_crops=4).select(holov_ctx(a, x), 4).keep.tolist() == [[0, 1, 2, 4]]


def test_holov_surplus_goes_to_real_tokens_not_zero_padding():
    # K=6, chunk 0 gets alloc 6 > its 4 tokens (6 w = [5.81, 0.19] -> [5, 0] + 1); official pads 2 zeros
    a = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.05, 0.02, 0.01, 0.02]])
    sel = HoloV(crops="1d", num_crops=2).select(holov_ctx(a, two_chunk_tokens()), 6)
    assert sel.values is None
    assert sel.keep.tolist() == [[0, 1, 2, 3, 4, 5]]  # the 2 freed slots: 0.05 (4), 0.02 (5 before 7)


def test_holov_exact_k_and_keep_all():
    g = torch.Generator().manual_seed(2)
    a, x = torch.rand(3, 36, generator=g), torch.randn(3, 36, 8, generator=g)
    for crops, C, k in (("2d", 4, 1), ("2d", 9, 10), ("1d", 16, 4), ("1d", 5, 35)):
        check_plan(HoloV(crops=crops, num_crops=C).select(holov_ctx(a, x), k).keep, 3, k, 36)
    assert HoloV().select(holov_ctx(a, x), 36).keep.tolist() == [list(range(36))] * 3
    keep = HoloV(num_crops=4).select(holov_ctx(a[:, :24], x[:, :24], grid=(4, 6)), 7).keep
    check_plan(keep, 3, 7, 24)


# ---------------------------------------------------------------------------- VisionZip
def visionzip_tokens(t5: tuple[float, float]) -> torch.Tensor:
    t = [(1.0, 0.0), (5.0, 5.0), (2.0, 0.5), (-1.0, 2.0), (0.0, 1.0), t5]
    return torch.tensor([t])  # (1, 6, 2)


A6 = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.02, 0.03]])


def test_visionzip_dominant_then_target_plus_member_mean():
    # k=4, ratio 0.5: dominant = top-2 attention {1, 3}; rest R = [0, 2, 4, 5], step 4 // 2 = 2,
    # targets R[0]=0 (1, 0) and R[2]=4 (0, 1); token 2 (2, .5) joins target 0, token 5 (.2, 3) target 4
    ctx = TokenContext("vision", visionzip_tokens((0.2, 3.0)), {"cls_attention": A6})
    sel = VisionZip(dominant_ratio=0.5).select(ctx, 4)
    # kept slots: dominant 1, 3 and the targets 0, 4, which hold the merged tokens
    assert sel.keep.tolist() == [[0, 1, 3, 4]]
    want = torch.tensor([[[3.0, 0.5], [5.0, 5.0], [-1.0, 2.0], [0.2, 4.0]]])
    assert torch.allclose(sel.values, want)
    assert sel.num_kept == 4


def test_visionzip_target_without_members_stays_itself():
    # token 5 (3, .1) now also joins target 0: merged 0 = (1, 0) + mean((2, .5), (3, .1)); target 4 alone
    ctx = TokenContext("vision", visionzip_tokens((3.0, 0.1)), {"cls_attention": A6})
    sel = VisionZip(dominant_ratio=0.5).select(ctx, 4)
    assert sel.keep.tolist() == [[0, 1, 3, 4]]
    assert torch.allclose(sel.values[:, [0, 3]], torch.tensor([[[3.5, 0.3], [0.0, 1.0]]]))


def test_visionzip_default_split_and_keep_all():
    g = torch.Generator().manual_seed(3)
    ctx = TokenContext(
        "vision", torch.randn(2, N, 16, generator=g), {"cls_attention": torch.rand(2, N, generator=g)}
    )
    for k, (dom, con) in {64: (54, 10), 128: (108, 20), 192: (162, 30)}.items():
        sel = VisionZip().select(ctx, k)
        check_plan(sel.keep, 2, k, N)
        assert sel.values.shape == (2, k, 16) and sel.num_kept == k
        # dom slots hold their own tokens, con slots merged ones
        same = (sel.values == ctx.tokens.gather(1, sel.keep[..., None].expand(-1, -1, 16))).all(-1)
        assert same.sum(-1).tolist() == [dom, dom] and (~same).sum(-1).tolist() == [con, con]
    sel = VisionZip().select(ctx, N)
    assert sel.values is None and sel.keep.tolist() == [list(range(N))] * 2


# ---------------------------------------------------------------------------- ToDRE
def test_todre_maxsum_differs_from_kcenter_at_the_third_pick():
    d = torch.tensor(
        [
            [0.0, 10.0, 8.0, 5.0],
            [10.0, 0.0, 3.0, 5.5],
            [8.0, 3.0, 0.0, 3.0],
            [5.0, 5.5, 3.0, 0.0],
        ]
    )[None]
    # nearest-other distances [5, 3, 3, 3] -> seed 0; farthest from {0}: 1 (10) for both objectives
    # third: k-center min(8, 3)=3 vs min(5, 5.5)=5 -> 3;  max-sum 8+3=11 vs 5+5.5=10.5 -> 2
    assert greedy_diverse(d, 2, "kcenter").tolist() == greedy_diverse(d, 2, "maxsum").tolist() == [[0, 1]]
    assert greedy_diverse(d, 3, "kcenter").tolist() == [[0, 1, 3]]
    assert greedy_diverse(d, 3, "maxsum").tolist() == [[0, 1, 2]]


def test_todre_kcenter_picks_one_token_per_blob():
    g = torch.Generator().manual_seed(4)
    blob = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])  # interleaved blob labels
    x = torch.eye(3)[blob] * 5 + 0.05 * torch.randn(12, 3, generator=g)  # 3 tight, orthogonal blobs
    for objective in ("kcenter", "maxsum"):
        keep = ToDRE(objective=objective).select(TokenContext("vision", x[None]), 3).keep[0]
        assert sorted(blob[keep].tolist()) == [0, 1, 2]


def test_todre_exact_k_and_keep_all():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 40, 8, generator=g)
    for objective in ("kcenter", "maxsum"):
        for k in (1, 7, 39):
            check_plan(ToDRE(objective=objective).select(TokenContext("vision", x), k).keep, 2, k, 40)
        assert (
            ToDRE(objective=objective).select(TokenContext("vision", x), 40).keep.tolist()
            == [list(range(40))] * 2
        )
