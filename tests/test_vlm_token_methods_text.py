"""Recoverable Compression, SafeWatch, CATP and LVLM_CSP on small hand-worked cases (pure tensors).

Visual tokens and text tokens are 2-D vectors, mostly unit vectors from 3-4-5 and 7-24-25
triangles, so every cosine is worked out by hand in a comment; expected indices and merged vectors
come from the spec (specs/vlm-tokens.md §13, §14, §16, §17) and the method docstrings, never from
the methods' own output.
"""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.tokens.context import Signal, TokenContext
from prunekit.tokens.methods._textguided import split_in_proportion, text_relevance
from prunekit.tokens.methods.catp import CATP, greedy_diverse_aligned
from prunekit.tokens.methods.divprune import cosine_distance, max_min_diverse
from prunekit.tokens.methods.lvlm_csp import LVLMCSP, spherical_kmeans, uniform_seeds
from prunekit.tokens.methods.recoverable import RecoverableCompression, lof_outliers
from prunekit.tokens.methods.safewatch import SafeWatch, chunk_membership

NAMES = ("recoverable", "safewatch", "catp", "lvlm_csp")


def vecs(*rows: tuple[float, float]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.float32)  # (1, n, 2)


def padded(*rows: tuple[float, float], pad: int = 2) -> torch.Tensor:
    """Text embeddings (1, T + pad, 2): the real rows, then zero padding rows."""
    return torch.cat([vecs(*rows), torch.zeros(1, pad, 2)], dim=1)


def check_plan(keep: torch.Tensor, groups: int, k: int, n: int) -> None:
    assert keep.shape == (groups, k) and keep.dtype == torch.long
    assert bool((keep[:, 1:] > keep[:, :-1]).all()), "ascending, no duplicates"
    assert int(keep.min()) >= 0 and int(keep.max()) < n


def random_ctx(G: int = 2, N: int = 40, D: int = 8, T: int = 6, seed: int = 0) -> TokenContext:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(G, T, D, generator=g)
    text[0, T - 2 :] = 0  # group 0 has two padding rows
    a = torch.softmax(torch.randn(G, N, generator=g) * 2, dim=-1)
    return TokenContext(
        "vision",
        torch.randn(G, N, D, generator=g),
        {"cls_attention@-1": a, "cls_attention": a, "text_embeddings": text},
    )


# ---------------------------------------------------------------------------- registry, options
def test_the_four_methods_are_registered_for_the_vision_stage():
    for name in NAMES:
        info = prunekit.registry.get(name)
        assert info.family == "tokens" and info.stages[0] == "vision" and info.paper
        assert info.stages == (("vision", "llm") if name == "catp" else ("vision",))  # CATP stage 2
        assert "text_embeddings" in info.signals
    text = Signal("text_embeddings")
    assert RecoverableCompression().needs("vision") == (Signal("cls_attention", -1), Signal("tokens"), text)
    assert SafeWatch().needs("vision") == (Signal("tokens"), text)
    assert CATP().needs("vision") == (Signal("tokens"), text)
    assert LVLMCSP().needs("vision") == (Signal("tokens"), text)
    assert LVLMCSP(seeds="cls", layer=3).needs("vision")[-1] == Signal("cls_attention", 3)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RecoverableCompression(lof_neighbors=0), "lof_neighbors"),
        (lambda: RecoverableCompression(merge_neighbors=2.5), "merge_neighbors"),
        (lambda: RecoverableCompression(text_weight=-1.0), "text_weight"),
        (lambda: RecoverableCompression(text_pool="sum"), "text_pool"),
        (lambda: SafeWatch(num_chunks=0), "num_chunks"),
        (lambda: SafeWatch(chunks=(3, 3)), "chunks"),
        (lambda: SafeWatch(chunks=(0, 2)), "chunks"),
        (lambda: SafeWatch(text_pool="min"), "text_pool"),
        (lambda: CATP(lam=1.5), "lam"),
        (lambda: CATP(lam=float("nan")), "lam"),
        (lambda: LVLMCSP(n_clusters=0), "n_clusters"),
        (lambda: LVLMCSP(iters=-1), "iters"),
        (lambda: LVLMCSP(seeds="kmeans++"), "seeds"),
    ],
)
def test_bad_options_raise_value_error_naming_the_option(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name", NAMES)
def test_exact_k_ascending_and_keep_all(name):
    ctx = random_ctx()
    method = prunekit.registry.get(name).factory()
    for k in (1, 2, 7, 20, 39):
        sel = method.select(ctx, k)
        check_plan(sel.keep, 2, k, 40)
        if sel.values is not None:
            assert sel.values.shape == (2, k, 8) and sel.values.dtype == ctx.tokens.dtype
    for k in (40, 50):
        sel = method.select(ctx, k)
        assert sel.values is None and sel.keep.tolist() == [list(range(40))] * 2


# ---------------------------------------------------------------------------- shared helpers
def test_text_relevance_ignores_padding_rows():
    x = vecs((0.6, -0.8), (0.0, 1.0))
    text = padded((3.0, 4.0), (-1.0, 0.0))  # unit (.6, .8) and (-1, 0), then 2 zero rows
    # cosines: token 0 -> [.36 - .64, -.6] = [-.28, -.6]; token 1 -> [.8, 0]
    assert torch.allclose(text_relevance(x, text, "max"), torch.tensor([[-0.28, 0.8]]), atol=1e-6)
    assert torch.allclose(text_relevance(x, text, "mean"), torch.tensor([[-0.44, 0.4]]), atol=1e-6)
    assert text_relevance(x, torch.zeros(1, 3, 2), "max").tolist() == [[0.0, 0.0]]  # no text at all


def test_split_in_proportion_largest_remainder():
    # 5 * [5, 2, 1] / 8 = [3.125, 1.25, .625] -> floors [3, 1, 0], the one left to the largest remainder
    assert split_in_proportion(torch.tensor([[5, 2, 1]]), 5).tolist() == [[3, 1, 1]]
    # 3 * [1, 1, 1] / 3 = [1, 1, 1]; 1 * [1, 1, 1] / 3: all remainders equal -> the first part
    assert split_in_proportion(torch.tensor([[1, 1, 1], [1, 1, 1]]), torch.tensor([3, 1])).tolist() == [
        [1, 1, 1],
        [1, 0, 0],
    ]
    # a zero weight never gets a slot: 3 * [0, 1, 1] / 2 = [0, 1.5, 1.5] -> [0, 2, 1]
    assert split_in_proportion(torch.tensor([[0, 1, 1]]), 3).tolist() == [[0, 2, 1]]


# ---------------------------------------------------------------------------- Recoverable: LOF
def test_lof_outliers_hand_worked_with_two_neighbours():
    # values 0, 1, 2, 3, 10, n_neighbors 2 (ties to the lower index):
    # N(0)={1,2}, N(1)={0,2}, N(2)={1,3}, N(3)={2,1}, N(10)={3,2};  kdist = [2, 1, 1, 2, 8]
    # reach(p, o) = max(kdist(o), |p-o|): p=0: [1, 2]; p=1: [2, 1]; p=2: [1, 2]; p=3: [1, 2]; p=10: [7, 8]
    # lrd = 1 / mean reach = [2/3, 2/3, 2/3, 2/3, 2/15];  LOF = [1, 1, 1, 1, (2/3) / (2/15) = 5]: one > 1.5
    v = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]])
    everyone = torch.ones(1, 5, dtype=torch.bool)
    assert lof_outliers(v, everyone, 2).tolist() == [1]
    assert lof_outliers(v * 0.01, everyone, 2).tolist() == [1]  # scale-free
    # without the far value (not a member) the evenly spaced rest has no outlier
    assert lof_outliers(v, torch.tensor([[True, True, True, True, False]]), 2).tolist() == [0]
    # one neighbour: LOF(p) = reach(p, nn) / reach(nn, nn(nn)); 10: 7 / 1 -> outlier, others 1 / 1
    assert lof_outliers(v, everyone, 1).tolist() == [1]
    # fewer than two members: no outlier (scikit-learn cannot fit one point)
    assert lof_outliers(v, torch.tensor([[False, False, False, False, True]]), 2).tolist() == [0]


def test_lof_outliers_per_group_and_members():
    # group 1: the same shape of values, shifted and reversed, with a non-member far away
    v = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0, 50.0], [100.0, 12.0, 5.0, 4.0, 3.0, 2.0]])
    member = torch.tensor([[True] * 5 + [False], [False] + [True] * 5])
    assert lof_outliers(v, member, 2).tolist() == [1, 1]


# ---------------------------------------------------------------------------- Recoverable: plan
# token: attention, vector (text = (2, 0), so text similarity = the vector's first coordinate)
#   0: .03, (.6, .8)       sim .6
#   1: .30, (-1, 0)        sim -1     <- V: the one attention outlier
#   2: .01, (0, 1)         sim 0
#   3: .09, (.28, .96)     sim .28    <- C: the attention outlier of R
#   4: .05, (.96, .28)     sim .96
#   5: .08, (1, 0)         sim 1      <- T: the best text similarity outside V
#   6: .02, (-.28, .96)    sim -.28
#   7: .04, (.8, .6)       sim .8
REC_X = vecs(
    (0.6, 0.8), (-1.0, 0.0), (0.0, 1.0), (0.28, 0.96), (0.96, 0.28), (1.0, 0.0), (-0.28, 0.96), (0.8, 0.6)
)
REC_A = torch.tensor([[0.03, 0.30, 0.01, 0.09, 0.05, 0.08, 0.02, 0.04]])


def rec_ctx() -> TokenContext:
    return TokenContext("vision", REC_X, {"cls_attention@-1": REC_A, "text_embeddings": padded((2.0, 0.0))})


def rec(**kw) -> RecoverableCompression:
    # one LOF neighbour keeps the counts hand-workable; text_weight 100 makes the neighbours of a
    # centre simply the tokens of R with the best text similarity
    return RecoverableCompression(
        lof_neighbors=1, lof_neighbors_rest=1, merge_neighbors=2, text_weight=100.0, **kw
    )


def test_recoverable_adaptive_counts_hand_worked():
    # LOF, one neighbour: LOF(p) = reach(p, nn(p)) / reach(nn(p), nn(nn(p))).
    # attention (x100) 1, 2, 3, 4, 5, 8, 9, 30: every nn is 1 away except 30 (nn 9, 21 away) ->
    #   LOF(30) = 21 / 1, all others 1 -> |V| = 1: token 1.
    # text similarity (V's -1 is already the minimum, so unchanged): -1, -.28, 0, .28, .6, .8, .96, 1:
    #   reach to nn = [.72, .28, .28, .28, .2, .16, .04, .04] (.6 -> .8, .8 -> .96, .96 <-> 1);
    #   LOF(-1) = .72 / .28 = 2.6, LOF(.8) = .16 / .04 = 4, LOF(.6) = .2 / .16 = 1.25, others 1:
    #   2 outliers -> |T| = floor((8 - 1) * 2 / 8) = 1: token 5 (sim 1).
    # R = {0, 2, 3, 4, 6, 7}, attention 3, 1, 9, 5, 2, 4: only 9 (nn 5, 4 away; LOF 4 / 1) -> |C| = 1.
    sim = text_relevance(REC_X, padded((2.0, 0.0)), "mean")
    assert rec().adaptive_counts(REC_A, sim).tolist() == [[1, 1, 1]]


def test_recoverable_official_count_gives_the_official_plan():
    # k = |V| + |T| + |C| + 1 = 4: V = {1}, T = {5}, R = {0, 2, 3, 4, 6, 7}, centre C = {3}.
    # centre 3's two neighbours in R \ {3}, by cos + 100 * sim: 4 (.96) and 7 (.8).
    # merged 3 = x3 + .05 x4 + .04 x7 = (.28 + .048 + .032, .96 + .014 + .024) = (.36, .998)
    # global = sum over R \ C = {0, 2, 4, 6, 7} of a x:
    #   .03 (.6, .8) + .01 (0, 1) + .05 (.96, .28) + .02 (-.28, .96) + .04 (.8, .6) = (.0924, .0912),
    #   in the slot of the last token it merges, 7.
    for pool in ("mean", "max"):  # one real text row: both pools agree (padding rows ignored)
        sel = rec(text_pool=pool).select(rec_ctx(), 4)
        assert sel.keep.tolist() == [[1, 3, 5, 7]]
        want = torch.tensor([[[-1.0, 0.0], [0.36, 0.998], [1.0, 0.0], [0.0924, 0.0912]]])
        assert torch.allclose(sel.values, want, atol=1e-6)


def test_recoverable_weighted_means_when_not_faithful():
    # merged 3 = (.09 x3 + .05 x4 + .04 x7) / .18 = (.1052, .1244) / .18
    # global = (.0924, .0912) / (.03 + .01 + .05 + .02 + .04 = .15) = (.616, .608)
    sel = rec(faithful=False).select(rec_ctx(), 4)
    assert sel.keep.tolist() == [[1, 3, 5, 7]]
    want = torch.tensor([[[-1.0, 0.0], [0.1052 / 0.18, 0.1244 / 0.18], [1.0, 0.0], [0.616, 0.608]]])
    assert torch.allclose(sel.values, want, atol=1e-6)


def test_recoverable_budget_is_split_in_proportion_to_the_counts():
    # k = 7: 6 slots over counts (1, 1, 1) -> 2 V, 2 T, 2 C + the global token.
    # V = top-2 attention {1 (.30), 3 (.09)}; T = top-2 sim of the rest {5 (1), 4 (.96)};
    # R = {0, 2, 6, 7}: C = top-2 attention {7 (.04), 0 (.03)}; R \ C = {2, 6}: global in slot 6.
    # centre 7: neighbours among {0, 2, 6} by sim (.6, 0, -.28) -> 0, 2:
    #   (.8, .6) + .03 (.6, .8) + .01 (0, 1) = (.818, .634)
    # centre 0: neighbours among {2, 6, 7} by sim (0, -.28, .8) -> 7, 2:
    #   (.6, .8) + .04 (.8, .6) + .01 (0, 1) = (.632, .834)
    # global = .01 (0, 1) + .02 (-.28, .96) = (-.0056, .0292)
    sel = rec().select(rec_ctx(), 7)
    assert sel.keep.tolist() == [[0, 1, 3, 4, 5, 6, 7]]
    want = [
        (0.632, 0.834),
        (-1.0, 0.0),
        (0.28, 0.96),
        (0.96, 0.28),
        (1.0, 0.0),
        (-0.0056, 0.0292),
        (0.818, 0.634),
    ]
    assert torch.allclose(sel.values, torch.tensor([want]), atol=1e-6)
    # k = 2: 1 slot over (1, 1, 1) goes to V (ties to V first); everything else is the global token:
    # .03 (.6, .8) + .01 (0, 1) + .09 (.28, .96) + .05 (.96, .28) + .08 (1, 0) + .02 (-.28, .96)
    #   + .04 (.8, .6) = (.1976, .1776), in slot 7
    sel = rec().select(rec_ctx(), 2)
    assert sel.keep.tolist() == [[1, 7]]
    assert torch.allclose(sel.values, torch.tensor([[[-1.0, 0.0], [0.1976, 0.1776]]]), atol=1e-6)


def test_recoverable_without_outliers_gives_every_slot_to_the_visual_filter():
    # attention .01, ..., .06 and text similarity -1, -.6, -.28, .28, .6, 1 (token j, text (1, 0)):
    # one-neighbour LOF of the attention is 1 everywhere; of the similarity at most .4 / .32 = 1.25
    # (the ends): no outlier, counts (0, 0, 0) -> k = 3: 2 slots to V = {4, 5}, the global token of
    # {0, 1, 2, 3} in slot 3: .01 (-1, 0) + .02 (-.6, .8) + .03 (-.28, .96) + .04 (.28, .96) = (-.0192, .0832)
    x = vecs((-1.0, 0.0), (-0.6, 0.8), (-0.28, 0.96), (0.28, 0.96), (0.6, 0.8), (1.0, 0.0))
    a = torch.tensor([[0.01, 0.02, 0.03, 0.04, 0.05, 0.06]])
    ctx = TokenContext("vision", x, {"cls_attention@-1": a, "text_embeddings": vecs((1.0, 0.0))})
    assert rec().adaptive_counts(a, text_relevance(x, vecs((1.0, 0.0)), "mean")).tolist() == [[0, 0, 0]]
    sel = rec().select(ctx, 3)
    assert sel.keep.tolist() == [[3, 4, 5]]
    want = torch.tensor([[[-0.0192, 0.0832], [0.6, 0.8], [1.0, 0.0]]])
    assert torch.allclose(sel.values, want, atol=1e-6)


def test_recoverable_padding_rows_do_not_count_as_text():
    # were the zero rows cosines of 0, "max" would lift sims -1 and -.28 to 0 and change the counts
    ctx = rec_ctx()
    no_pad = TokenContext("vision", REC_X, {"cls_attention@-1": REC_A, "text_embeddings": vecs((2.0, 0.0))})
    for c in (ctx, no_pad):
        assert rec(text_pool="max").select(c, 4).keep.tolist() == [[1, 3, 5, 7]]


# ---------------------------------------------------------------------------- SafeWatch
# visual tokens (unit): 0 (.96, .28), 1 (1, 0), 2 (.8, .6), 3 (.6, -.8), 4 (.28, .96), 5 (-.6, .8)
SW_X = vecs((0.96, 0.28), (1.0, 0.0), (0.8, 0.6), (0.6, -0.8), (0.28, 0.96), (-0.6, 0.8))


def sw_ctx(text: torch.Tensor) -> TokenContext:
    return TokenContext("vision", SW_X, {"text_embeddings": text})


def test_chunk_membership_even_and_explicit():
    valid = torch.tensor([[True] * 5 + [False] * 2])  # 5 real text tokens, 2 padding rows
    # floor(p * 2 / 5): p = 0, 1, 2 -> chunk 0; p = 3, 4 -> chunk 1; padding in none
    assert chunk_membership(valid, 2, None).int().tolist() == [[[1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0]]]
    # offsets (1, 3): [0, 1), [1, 3), [3, 5)
    assert chunk_membership(valid, 2, (1, 3)).int().tolist() == [
        [[1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0]]
    ]
    # more chunks than text tokens: floor(p * 4 / 2) = 0, 2 -> chunks 1 and 3 are empty
    assert chunk_membership(torch.tensor([[True, True, False]]), 4, None).any(-1).tolist() == [
        [True, False, True, False]
    ]


def test_safewatch_each_policy_keeps_its_own_tokens():
    # text (2, 0), (0, 3) + 2 padding rows, 2 chunks -> policy 0 = x axis, policy 1 = y axis
    # cos: policy 0 = first coords [.96, 1, .8, .6, .28, -.6]; policy 1 = second [.28, 0, .6, -.8, .96, .8]
    # best over policies: [.96, 1, .8, .6, .96, .8] -> a plain top-4 would be {1, 0, 4, 2}
    text = padded((2.0, 0.0), (0.0, 3.0))
    # k = 4: 2 per policy: policy 0 -> {1, 0}, policy 1 -> {4, 5}; union has 4: nothing to fill
    assert SafeWatch(num_chunks=2).select(sw_ctx(text), 4).keep.tolist() == [[0, 1, 4, 5]]
    # k = 5: same union, 1 fill by the best remaining: 2 (.8) over 3 (.6)
    assert SafeWatch(num_chunks=2).select(sw_ctx(text), 5).keep.tolist() == [[0, 1, 2, 4, 5]]
    # k = 3: 1 per policy {1}, {4}; fill: 0 (.96)
    assert SafeWatch(num_chunks=2).select(sw_ctx(text), 3).keep.tolist() == [[0, 1, 4]]
    # explicit offsets give the same two policies; had the padding rows counted, the even split of
    # 4 rows would have put both text rows into policy 0 (keep {1, 0} + fill {4, 2} instead)
    assert SafeWatch(chunks=(1,)).select(sw_ctx(text), 4).keep.tolist() == [[0, 1, 4, 5]]


def test_safewatch_max_or_mean_over_a_policys_tokens():
    # text (1, 0), (0, -1) | (0, 1): floor(p * 2 / 3) -> policy 0 = rows 0, 1; policy 1 = row 2
    # policy 0, max(u, -w): [.96, 1, .8, .8, .28, -.6] -> best 1
    #           mean (u - w) / 2: [.34, .5, .1, .7, -.34, -.7] -> best 3
    # policy 1, w: [.28, 0, .6, -.8, .96, .8] -> best 4
    text = padded((1.0, 0.0), (0.0, -1.0), (0.0, 1.0))
    assert SafeWatch(num_chunks=2).select(sw_ctx(text), 2).keep.tolist() == [[1, 4]]
    assert SafeWatch(num_chunks=2, text_pool="mean").select(sw_ctx(text), 2).keep.tolist() == [[3, 4]]


def test_safewatch_empty_policies_leave_their_share_to_the_fill():
    # 2 text rows, 4 chunks: policies 0 = (2, 0) and 2 = (0, 3); 1 and 3 are empty.
    # k = 4: 1 per policy: 1 (policy 0), 4 (policy 2);
    # fill 2 by the best of [.96, _, .8, .6, _, .8]: 0, then 2 (ties with 5, lower index)
    text = padded((2.0, 0.0), (0.0, 3.0))
    assert SafeWatch(num_chunks=4).select(sw_ctx(text), 4).keep.tolist() == [[0, 1, 2, 4]]
    # tokens reversed: 0 (-.6, .8), 1 (.28, .96), 2 (.6, -.8), 3 (.8, .6), 4 (1, 0), 5 (.96, .28);
    # 3 chunks of 2 rows: floor(p * 3 / 2) = 0, 1 -> policy 2 is empty. k = 3, 1 per policy:
    # policy 0 -> 4 (1), policy 1 -> 1 (.96); fill 1 by the best of [.8, _, .6, .8, _, .96]: 5.
    # (an empty policy must not pick its "top" token: all its scores are 0, so that would be token 0)
    ctx = TokenContext("vision", SW_X.flip(1), {"text_embeddings": text})
    assert SafeWatch(num_chunks=3).select(ctx, 3).keep.tolist() == [[1, 4, 5]]


# ---------------------------------------------------------------------------- CATP
# tokens (unit): 0 (1, 0), 1 (.8, .6), 2 (0, 1), 3 (-.6, -.8); text (-3, 4) -> unit (-.6, .8)
# alignment (cos to text): [-.6, 0, .8, -.28]
# token cosines: 01 .8, 02 0, 03 -.6, 12 .6, 13 -.96, 23 -.8
# distances 1 - cos: 01 .2, 02 1, 03 1.6, 12 .4, 13 1.96, 23 1.8; nearest other: [.2, .2, .4, 1.6]
CATP_X = vecs((1.0, 0.0), (0.8, 0.6), (0.0, 1.0), (-0.6, -0.8))


def catp_ctx(text: torch.Tensor) -> TokenContext:
    return TokenContext("vision", CATP_X, {"text_embeddings": text})


def test_catp_trades_alignment_against_diversity():
    ctx = catp_ctx(padded((-3.0, 4.0)))
    # lam = .5, seed: .5 * align + .5 * nearest = [-.2, .1, .6, .66] -> 3;
    # then .5 * align + .5 * d(., 3) = [-.3 + .8, 0 + .98, .4 + .9] = [.5, .98, 1.3] -> 2
    assert CATP().select(ctx, 2).keep.tolist() == [[2, 3]]
    # lam = 0 is DivPrune: seed 3 (nearest 1.6), then the farthest from it: 1 (1.96)
    assert CATP(lam=0.0).select(ctx, 2).keep.tolist() == [[1, 3]]
    # lam = 1 is the top alignment: 2 (.8), 1 (0), 3 (-.28)
    assert CATP(lam=1.0).select(ctx, 3).keep.tolist() == [[1, 2, 3]]


def test_catp_padding_rows_are_not_text():
    # unmasked zero rows would lift alignments [-.6, 0, .8, -.28] to [0, 0, .8, 0]: top-3 = {2, 0, 1}
    for pad in (0, 3):
        ctx = catp_ctx(padded((-3.0, 4.0), pad=pad))
        assert CATP(lam=1.0).select(ctx, 3).keep.tolist() == [[1, 2, 3]]


def test_catp_without_alignment_is_divprune():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 30, 6, generator=g)
    d = cosine_distance(x)
    align = torch.randn(2, 30, generator=g)
    assert torch.equal(greedy_diverse_aligned(d, align, 9, 0.0), max_min_diverse(d, 9))
    assert not torch.equal(greedy_diverse_aligned(d, align * 10, 9, 0.5), max_min_diverse(d, 9))


# ---------------------------------------------------------------------------- LVLM_CSP
# tokens (unit): A = {0 (1, 0), 1 (.96, .28), 2 (.8, -.6), 5 (.96, -.28)}, B = {3 (0, 1), 4 (.28, .96)}
CSP_X = vecs((1.0, 0.0), (0.96, 0.28), (0.8, -0.6), (0.0, 1.0), (0.28, 0.96), (0.96, -0.28))


def csp_ctx(text: torch.Tensor) -> TokenContext:
    return TokenContext("vision", CSP_X, {"text_embeddings": text})


def test_uniform_seeds_match_the_spec():
    assert uniform_seeds(576, 64).tolist() == list(range(0, 568, 9))  # 0, 9, ..., 567
    assert uniform_seeds(6, 2).tolist() == [0, 3]


def test_spherical_kmeans_hand_worked():
    # seeds 0 (1, 0) and 3 (0, 1): each token joins the axis of its larger coordinate:
    #   A = {0, 1, 2, 5}, B = {3, 4};
    # new centroids ~ (3.72, -.6) and (.28, 1.96): x1 -> .90 vs .41, x4 -> .12 vs .99: stable
    seeds = torch.tensor([[0, 3]])
    assert spherical_kmeans(CSP_X, seeds, 10).tolist() == [[0, 0, 0, 1, 1, 0]]
    # seeds 0 and 1 (both in A), no refinement: cos to (1, 0) vs (.96, .28):
    #   0: 1 vs .96, 1: .96 vs 1, 2: .8 vs .6, 3: 0 vs .28, 4: .28 vs .54, 5: .96 vs .84
    assert spherical_kmeans(CSP_X, torch.tensor([[0, 1]]), 0).tolist() == [[0, 1, 0, 1, 1, 0]]
    # one refinement: centroids ~ (2.76, -.88) / 2.90 = (.953, -.304) and (1.24, 2.24) / 2.56 = (.484, .875);
    #   1: .830 vs .710 -> moves to 0; 3: -.30 vs .87, 4: -.02 vs .98 stay: A and B again, then stable
    for iters in (1, 10):
        assert spherical_kmeans(CSP_X, torch.tensor([[0, 1]]), iters).tolist() == [[0, 0, 0, 1, 1, 0]]


def test_lvlm_csp_scatters_the_budget_over_clusters():
    # clusters A (4 tokens), B (2); text (0, -1) -> relevance = -second coord:
    #   A: 0 -> 0, 1 -> -.28, 2 -> .6, 5 -> .28;  B: 3 -> -1, 4 -> -.96
    text = padded((0.0, -1.0))
    # k = 3: quotas 3 * [4, 2] / 6 = [2, 1]: A keeps 2, 5; B keeps 4 (a global top-3 would be {2, 5, 0})
    assert LVLMCSP(n_clusters=2).select(csp_ctx(text), 3).keep.tolist() == [[2, 4, 5]]
    # k = 2: 2 * [4, 2] / 6 = [1.33, .67] -> floors [1, 0], the one left to B (remainder 4/6 > 2/6)
    assert LVLMCSP(n_clusters=2).select(csp_ctx(text), 2).keep.tolist() == [[2, 4]]
    # padding rows as cosine-0 text would tie B at 0 and keep 3 instead of 4
    assert LVLMCSP(n_clusters=2).select(csp_ctx(padded((0.0, -1.0), pad=0)), 3).keep.tolist() == [[2, 4, 5]]


def test_lvlm_csp_cls_and_random_representatives():
    text = padded((0.0, -1.0))
    # cls seeds: the top-2 [CLS] attention, 0 and 4 -> the same two clusters as the uniform seeds
    a = torch.tensor([[0.5, 0.1, 0.05, 0.02, 0.3, 0.03]])
    ctx = TokenContext("vision", CSP_X, {"text_embeddings": text, "cls_attention": a})
    assert LVLMCSP(n_clusters=2, seeds="cls").representatives(ctx).tolist() == [[0, 4]]
    assert LVLMCSP(n_clusters=2, seeds="cls").select(ctx, 3).keep.tolist() == [[2, 4, 5]]
    # random seeds: repeatable with the same generator seed, exact k
    ctx = random_ctx()
    runs = [
        LVLMCSP(seeds="random").select(
            TokenContext("vision", ctx.tokens, ctx.signals, generator=torch.Generator().manual_seed(1)), 11
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].keep, runs[1].keep)
    check_plan(runs[0].keep, 2, 11, 40)
