"""Progressive (several-layer) LLM cuts: schedules, and PyramidDrop / TransPrune / SparseVLM
signals and scores against independent computations (eager attentions, hand-made tensors)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

import prunekit
from prunekit.tokens.context import TokenContext
from prunekit.tokens.methods.pyramiddrop import PyramidDrop
from prunekit.tokens.methods.sparsevlm import V1_SCHEDULE, SparseVLM, raters
from prunekit.tokens.methods.transprune import TransPrune
from prunekit.tokens.schedule import fit_counts, geometric_shape, mean_tokens, power_shape, scale_layers
from reference import decoder_layers
from tiny import DECODERS, VLMS, reset, text_inputs, vlm_inputs


# ------------------------------------------------------------------ schedules
def test_official_layers_scale_to_the_model_depth():
    assert scale_layers((8, 16, 24), 32, 32) == (8, 16, 24)
    assert scale_layers((7, 9, 12), 32, 30) == (7, 8, 11)  # SmolLM2-135M: round(l * 30 / 32)
    assert scale_layers((2, 6, 15), 32, 4) == (1, 2)  # clamped to [1, 3], duplicates merged


def test_pyramid_official_lambda_is_recovered_from_its_mean():
    # lambda = 1/2 at cuts 8/16/24 of 32 layers: mean = (8 + 4 + 2 + 1) / 32 * 576 = 270
    counts = fit_counts((8, 16, 24), 32, 576, 270, geometric_shape(3), "pyramiddrop")
    assert counts == (288, 144, 72)


def test_transprune_official_ratios_are_the_half_point_of_the_power_family():
    assert power_shape((0.875, 0.625, 0.125))(0.5) == pytest.approx([0.875, 0.625, 0.125])
    # the official 576 -> 504 -> 360 -> 72 has mean (7*576 + 2*504 + 3*360 + 20*72) / 32 = 236.25
    assert mean_tokens((7, 9, 12), (504, 360, 72), 576, 32) == pytest.approx(236.25)
    counts = fit_counts((7, 9, 12), 32, 576, 236, power_shape((0.875, 0.625, 0.125)), "transprune")
    assert [abs(c - o) <= 2 for c, o in zip(counts, (504, 360, 72), strict=True)] == [True] * 3
    assert abs(mean_tokens((7, 9, 12), counts, 576, 32) - 236) <= 0.5


@pytest.mark.parametrize("keep", [100, 150, 300, 500])
def test_fitted_counts_meet_the_mean_and_shrink(keep):
    counts = fit_counts((2, 6, 15), 32, 576, keep, power_shape((66 / 576, 30 / 576, 17 / 576)), "m")
    assert list(counts) == sorted(counts, reverse=True) and counts[-1] >= 1
    assert abs(mean_tokens((2, 6, 15), counts, 576, 32) - keep) <= 1.0


def test_unreachable_budget_names_the_reachable_range():
    with pytest.raises(ValueError, match=r"unreachable.*at least 126\.\d.*allowed keep: 126\.\d to 576"):
        fit_counts((7, 9, 12), 32, 576, 64, power_shape((0.875, 0.625, 0.125)), "transprune")
    assert fit_counts((7, 9, 12), 32, 576, 576, power_shape((0.5,) * 3), "x") == (576, 576, 576)


def test_sparsevlm_uses_the_official_v1_table_at_its_budgets():
    m = SparseVLM()
    for budget, official in V1_SCHEDULE.items():
        mean = mean_tokens((2, 6, 15), official, 576, 32)
        counts = m.counts(576, round(mean), 32)
        assert all(abs(c - o) <= 2 for c, o in zip(counts, official, strict=True)), (budget, counts)


def test_bad_cut_layers_are_refused():
    model = DECODERS["llama"]("sdpa")
    with pytest.raises(ValueError, match=r"ascending distinct ints in \[1, 3\].*\[3, 2\]"):
        with prunekit.prune_tokens(model, "pyramiddrop", keep=0.5, layers=(3, 2)):
            pass


# ------------------------------------------------------------------ signals vs eager attentions
class _Spy:
    """Records the context of every select call."""

    def __init__(self, method):
        seen = self.seen = []
        base = type(method)

        class Spy(base):
            def select(self, ctx: TokenContext, k: int):
                seen.append(
                    (ctx.layer, {key: v.clone() for key, v in ctx.signals.items()}, k, ctx.num_tokens)
                )
                return super().select(ctx, k)

        Spy.__name__ = base.__name__
        self.method = Spy(**{f.name: getattr(method, f.name) for f in dataclasses.fields(method)})


def test_pyramiddrop_ranks_by_the_cut_layers_own_last_token_attention():
    """First cut (layer 1 of 4): the signal equals eager attention of layer 1, last row, head mean."""
    model = DECODERS["llama"]("eager")
    inp = text_inputs(1)
    with torch.no_grad():
        att = model(**inp, output_attentions=True).attentions  # dense: input of layer 1 is unpruned
        spy = _Spy(PyramidDrop())
        with prunekit.prune_tokens(model, spy.method, keep=0.5):
            model(**inp)
    layer, signals, _, n = spy.seen[0]
    assert layer == 1 and n == inp["input_ids"].shape[1] - 1
    expected = att[1].mean(dim=1)[0, -1, :-1]  # candidates: every token but the last
    torch.testing.assert_close(signals["last_token_attention"][0], expected, atol=1e-5, rtol=1e-4)
    assert [s[0] for s in spy.seen] == [1, 2, 3] and spy.seen[1][3] == spy.seen[0][2]  # cut 2 sees cut 1's k


def test_instruction_attention_is_the_rows_after_the_image():
    model = VLMS["llava"]("eager")
    inp = vlm_inputs("llava", model, 1)
    ids = inp["input_ids"][0]
    img = (ids == model.config.image_token_id).nonzero().flatten()
    after = torch.arange(int(img[-1]) + 1, len(ids))
    with torch.no_grad():
        att = model(**inp, output_attentions=True).attentions
        reset(model)
        spy = _Spy(TransPrune())
        with prunekit.prune_tokens(model, spy.method, keep=0.5):
            model(**inp)
    layer, signals, _, _ = spy.seen[0]
    expected = att[layer].mean(dim=1)[0][after][:, img]  # (T, N)
    assert bool(signals["instruction_mask"].all()) and signals["instruction_mask"].shape == (1, len(after))
    torch.testing.assert_close(signals["instruction_attention"][0], expected, atol=1e-5, rtol=1e-4)


def test_transition_equals_an_independent_sublayer_computation():
    """TTV at the first cut = sum over the layer before it of |y|/|x| * softmax_seq(1 - cos(x, y))."""
    model = DECODERS["qwen2"]("sdpa")
    inp = text_inputs(1)
    layer = decoder_layers(model)[0]  # TransPrune on 4 layers: cuts (1, 2) -> accumulate layer 0
    got: dict = {}
    hs = [
        layer.input_layernorm.register_forward_hook(lambda m, a, o: got.__setitem__("xa", o)),
        layer.self_attn.register_forward_hook(lambda m, a, o: got.__setitem__("ya", o[0])),
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: got.__setitem__("xf", o)),
        layer.mlp.register_forward_hook(lambda m, a, o: got.__setitem__("yf", o)),
    ]
    with torch.no_grad():
        model(**inp)
    for h in hs:
        h.remove()
    ttv = torch.zeros(inp["input_ids"].shape[1])
    for x, y in ((got["xa"][0], got["ya"][0]), (got["xf"][0], got["yf"][0])):
        ratio = y.norm(dim=-1) / x.norm(dim=-1)
        d = 1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        ttv += ratio * torch.exp(d) / torch.exp(d).sum()
    spy = _Spy(TransPrune(iga=False))
    with torch.no_grad(), prunekit.prune_tokens(model, spy.method, keep=0.5):
        model(**inp)
    assert spy.seen[0][0] == 1
    torch.testing.assert_close(spy.seen[0][1]["transition"][0], ttv[:-1], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ scores on hand-made tensors
def test_transprune_score_adds_normalised_ttv_and_mean_instruction_attention():
    ctx = TokenContext(
        stage="llm",
        tokens=torch.zeros(1, 4, 2),
        signals={
            "transition": torch.tensor([[1.0, 3.0, 0.0, 4.0]]),  # / 8
            "instruction_attention": torch.tensor(
                [[[0.2, 0.0, 0.2, 0.0], [0.0, 0.0, 0.4, 0.0], [9.0, 9, 9, 9]]]
            ),
            "instruction_mask": torch.tensor([[True, True, False]]),  # mean of rows 0, 1: [.1, 0, .3, 0]
        },
    )
    want = torch.tensor([[1 / 8 + 0.25, 3 / 8, 0.75, 4 / 8]])
    torch.testing.assert_close(TransPrune().score(ctx), want)
    torch.testing.assert_close(TransPrune(iga=False).score(ctx), torch.tensor([[1 / 8, 3 / 8, 0, 4 / 8]]))


def test_sparsevlm_raters_are_the_text_tokens_aligned_with_the_image():
    e = torch.eye(4)
    visual = torch.stack([e[0] * 5, e[0] * 5 + e[1], e[0] * 4])[None]  # every visual token ~ axis 0
    text = torch.stack([e[0], e[2], e[3], e[0]])[None]  # tokens 0 and 3 align with the image
    mask = torch.tensor([[True, True, True, False]])  # token 3 is padding
    assert raters(visual, text, mask).tolist() == [[True, False, False, False]]
    ctx = TokenContext(
        stage="llm",
        tokens=visual,
        signals={
            "input_embeddings": visual,
            "instruction_embeddings": text,
            "instruction_mask": mask,
            "instruction_attention": torch.tensor(
                [[[0.1, 0.5, 0.2], [0.9, 0.0, 0.0], [0.9, 0.0, 0.0], [1.0, 0, 0]]]
            ),
        },
    )
    # only the rater's row counts: token 1 first, then 2
    assert SparseVLM(recycle=False).select(ctx, 2).keep.tolist() == [[1, 2]]


# ------------------------------------------------------------------ SpAtten
@pytest.mark.parametrize("fam", ["llama", "qwen2", "llava"])
def test_spatten_cascades_equal_a_masked_reference_with_heads_switched_off(fam):
    """Tokens dropped at each cut + heads zeroed from their cut on == the full model hiding the
    dropped keys and zeroing the same heads before o_proj (prefill and decode)."""
    import copy

    from reference import greedy, masked_reference_cuts

    model = (DECODERS.get(fam) or VLMS[fam])("sdpa")
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    inp = text_inputs(2) if fam in DECODERS else vlm_inputs(fam, model, 2)
    with torch.no_grad(), prunekit.prune_tokens(model, "spatten", keep=0.5, head_keep=0.5) as s:
        tokens, logits = greedy(model, inp)
    heads = s.stats.head_masks
    assert len(heads) >= 1 and all(bool((m.sum(1) < 4).all()) for _, m in heads)
    for (_, a), (_, b) in itertools.pairwise(heads):
        assert not bool((b & ~a).any()), "a head switched off came back"
    layers = decoder_layers(ref)

    def head_hook(i):
        def hook(o_proj, args):
            alive = next((m for K, m in reversed(heads) if i >= K), None)
            if alive is None:
                return None
            x = args[0]
            xh = x.view(*x.shape[:2], alive.shape[1], -1) * alive[:, None, :, None]
            return (xh.view_as(x),)

        return hook

    hs = [layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i)) for i, layer in enumerate(layers)]
    reset(ref)
    try:
        cuts = list(zip(s.stats.cut_layers, s.stats.kept_masks, strict=True))
        with torch.no_grad(), masked_reference_cuts(ref, cuts, inp["attention_mask"]):
            ref_tokens, ref_logits = greedy(ref, inp)
    finally:
        for h in hs:
            h.remove()
    fin = torch.isfinite(ref_logits)
    assert (logits - ref_logits)[fin].abs().max().item() < 1e-4
    assert torch.equal(tokens, ref_tokens)


def test_spatten_importance_is_attention_received_summed_over_layers_heads_and_queries():
    from prunekit.tokens.methods.spatten import SpAtten

    model = DECODERS["llama"]("eager")
    inp = text_inputs(1)
    with torch.no_grad():
        att = model(**inp, output_attentions=True).attentions
        spy = _Spy(SpAtten())
        with prunekit.prune_tokens(model, spy.method, keep=0.5):
            model(**inp)
    layer, signals, _, _ = spy.seen[0]  # first cut at layer 1: layer 0's attention only
    assert layer == 1
    expected = att[0][0].sum(dim=(0, 1))[:-1]  # heads, queries; candidates = all but the last
    torch.testing.assert_close(signals["cumulative_attention"][0], expected, atol=1e-4, rtol=1e-4)


def test_spatten_head_counts_fall_linearly():
    from prunekit.tokens.methods.spatten import SpAtten

    assert SpAtten(head_keep=0.25).head_counts(32, 4) == (26, 20, 14, 8)
    assert SpAtten().head_counts(32, 4) is None
    with pytest.raises(ValueError, match=r"head_keep must be in \(0, 1\]"):
        SpAtten(head_keep=0.0)


# ------------------------------------------------------------------ SparseVLM's recycling (DPC-kNN)
def _dpc_reference(x: np.ndarray, c: int) -> tuple[np.ndarray, list[int]]:
    """TCFormer / SparseVLM DPC-kNN written out with loops, on one ``(n, D)`` set."""
    n, D = x.shape
    dist = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)]) / np.sqrt(D)
    density = np.array([np.exp(-np.mean(np.sort(dist[i])[:c] ** 2)) for i in range(n)])
    delta = np.empty(n)
    for i in range(n):
        denser = [dist[i, j] for j in range(n) if density[j] > density[i]]
        delta[i] = min(denser) if denser else dist.max()
    score = delta * density
    centers = sorted(range(n), key=lambda i: (-score[i], i))[:c]
    assign = [
        centers.index(i) if i in centers else int(np.argmin([dist[i, j] for j in centers])) for i in range(n)
    ]
    merged = np.stack([x[[i for i in range(n) if assign[i] == j]].mean(axis=0) for j in range(c)])
    return merged, centers


def test_dpc_knn_merge_equals_a_loop_reference():
    from prunekit.tokens.merge import dpc_knn_merge

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 14, 5, generator=g, dtype=torch.float64)
    merged, centers = dpc_knn_merge(x, 3)
    for s in range(3):
        want_m, want_c = _dpc_reference(x[s].numpy(), 3)
        assert centers[s].tolist() == want_c
        np.testing.assert_allclose(merged[s].numpy(), want_m, atol=1e-12)


def test_dpc_knn_finds_two_separated_groups():
    from prunekit.tokens.merge import dpc_knn_merge

    x = torch.tensor([[[0.0, 0], [0.1, 0], [0.3, 0], [5, 5], [5.15, 5], [5.4, 5]]])
    merged, centers = dpc_knn_merge(x, 2, k=3)  # each token's 3 nearest are in its own group
    assert sorted(centers[0].tolist()) == [1, 4]  # the densest of each group
    groups = {frozenset({0, 1, 2}): [0.4 / 3, 0.0], frozenset({3, 4, 5}): [15.55 / 3, 5.0]}
    got = {}
    for j, c in enumerate(centers[0].tolist()):
        got[next(g for g in groups if c in g)] = merged[0, j]
    assert set(got) == set(groups)
    for g, m in got.items():
        torch.testing.assert_close(m, torch.tensor(groups[g]))


def test_sparsevlm_recycles_the_best_pruned_tokens_into_their_centre_slot():
    """n=10, k=3: 7 pruned, the best int(0.3*7)+1 = 3 of them form int(3/10)+1 = 1 cluster whose
    centre: with one cluster the k-NN density (k = 1: the token itself) ties, so the first recycled
    token is the centre; the mean of the three takes its slot."""
    tokens = torch.zeros(1, 10, 2)
    tokens[0, [4, 7, 8], 0] = torch.tensor([1.0, 1.2, 2.0])
    scores = torch.tensor([[9.0, 0.1, 8, 0.2, 5, 0.3, 7, 4, 3, 0.4]])  # kept: 0, 2, 6; best pruned: 4, 7, 8
    ctx = TokenContext(stage="llm", tokens=tokens)
    sel = SparseVLM().select_scored(ctx, 3, scores)
    assert sel.keep.tolist() == [[0, 2, 4, 6]]
    torch.testing.assert_close(sel.values[0, 2], torch.tensor([4.2 / 3, 0.0]))
    torch.testing.assert_close(sel.values[0, [0, 1, 3]], tokens[0, [0, 2, 6]])
    plain = SparseVLM(recycle=False).select_scored(ctx, 3, scores)
    assert plain.keep.tolist() == [[0, 2, 6]] and plain.values is None


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl", "llama"])
def test_sparsevlm_recycling_runs_in_generate_adds_the_clusters_and_restores(fam):
    model = (VLMS.get(fam) or DECODERS[fam])("sdpa")
    inp = vlm_inputs(fam, model, 2) if fam in VLMS else text_inputs(2)
    with torch.no_grad():
        dense = model.generate(**inp, max_new_tokens=3, do_sample=False)
        reset(model)
        with prunekit.prune_tokens(model, "sparsevlm", keep=1.0):
            everything = model.generate(**inp, max_new_tokens=3, do_sample=False)
        reset(model)
        with prunekit.prune_tokens(model, "sparsevlm", keep=0.5, recycle=False) as s0:
            model.generate(**inp, max_new_tokens=3, do_sample=False)
        reset(model)
        with prunekit.prune_tokens(model, "sparsevlm", keep=0.5) as s1:
            out = model.generate(**inp, max_new_tokens=3, do_sample=False)
        reset(model)
        after = model.generate(**inp, max_new_tokens=3, do_sample=False)
    assert torch.equal(everything, dense) and torch.equal(after, dense)
    assert out.shape == dense.shape
    assert s1.stats.tokens_kept > s0.stats.tokens_kept  # the recycled cluster tokens on top
