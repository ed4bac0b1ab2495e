"""ATP-LLaVA (spec §12): hand-worked scores and keep rule, the engine's instance-adaptive counts
against the masked reference, and the trainer's soft relaxation against the engine's hard path."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import prunekit
from invariants import assert_same, snapshot
from prunekit.tokens.context import Selection
from prunekit.tokens.methods.atp_llava import (
    ATPLLaVA,
    ATPModule,
    hard_keep,
    load_atp,
    redundancy_and_features,
    save_atp,
    self_importance,
    soft_keep,
    spatial_score,
)
from prunekit.training.atp import SoftATP, train_atp
from reference import greedy, masked_reference_cuts
from tiny import DECODERS, VLMS, reset, text_inputs, vlm_inputs

TOL = 1e-4
CUTS = (1, 2, 3)  # 4/14/24 of 32 scaled to the tiny decoders' 4 layers


def module(theta_r: float, theta_s: float, target: float = 0.5) -> ATPModule:
    """A module whose thresholds are ``theta_r`` / ``theta_s`` whatever the input (through the biases)."""
    m = ATPModule(CUTS, target, hidden=4, n_layers=4)
    with torch.no_grad():
        for lin in (*m.proj, *m.head_r, *m.head_s):
            lin.weight.zero_()
        for h in m.head_r:
            h.bias.fill_(torch.logit(torch.tensor(theta_r)).item())
        for h in m.head_s:
            h.bias.fill_(torch.logit(torch.tensor(theta_s)).item())
    return m


# ---------------------------------------------------------------------------- hand-worked scores
def test_self_importance_is_the_mean_logit_over_the_queries_that_see_each_key():
    inf = float("-inf")
    logits = torch.tensor([[[1.0, inf, inf], [2.0, 3.0, inf], [4.0, 5.0, 6.0]]])
    assert torch.allclose(self_importance(logits), torch.tensor([[7 / 3, 4.0, 6.0]]))


def test_redundancy_is_the_mean_of_the_two_minmax_scores_and_features_are_raw_means():
    s_self = torch.tensor([[0.0, 2.0, 4.0, 8.0]])
    s_cross = torch.tensor([[0.4, 0.2, 0.1, 0.3]])
    red, feats = redundancy_and_features(s_self, s_cross, torch.ones(1, 4, dtype=torch.bool))
    # self: 0, .25, .5, 1; cross: 1, 1/3, 0, 2/3
    assert torch.allclose(red, torch.tensor([[0.5, (0.25 + 1 / 3) / 2, 0.25, (1 + 2 / 3) / 2]]))
    assert torch.allclose(feats, torch.tensor([[3.5, 1.0]]))  # mean self; N * mean cross = sum


def test_sap_marks_the_stride_2_subgrid_of_a_4x4_grid_and_every_4th_token_otherwise():
    spat = spatial_score(torch.arange(16)[None], torch.tensor([16]), r_s=0.25, lam=3.0)
    assert spat.nonzero()[:, 1].tolist() == [0, 2, 8, 10]
    assert torch.allclose(spat[0, [0, 2, 8, 10]], torch.tensor(0.25))  # 1 - R_s * lambda
    # survivors of a later cut keep their original raster index
    later = spatial_score(torch.tensor([[1, 2, 9, 10]]), torch.tensor([16]), 0.25, 3.0)
    assert later.nonzero()[:, 1].tolist() == [1, 3]
    rect = spatial_score(torch.arange(8)[None], torch.tensor([8]), 0.25, 3.0)  # 2 x 4: not square
    assert rect.nonzero()[:, 1].tolist() == [0, 4]


def test_spec_keep_rule_grid_only_then_everything():
    """Spec §12(f): theta_r above every S_red and theta_s just below the SAP value keep exactly the
    grid (here the top S_red token lies on it); theta_r below min(S_red) keeps every token."""
    N = 16
    s_self = torch.zeros(1, N)
    s_self[0, 0] = 1.0  # top of both: S_red = 1 at index 0, on the grid
    s_cross = torch.full((1, N), 0.1)
    s_cross[0, 0] = 0.5
    s_self[0, 5] = 0.5  # nobody is 0 in both ...
    s_cross[0, 6] = 0.0  # ... except the tokens that tie at the minimum of each
    red, _ = redundancy_and_features(s_self, s_cross, torch.ones(1, N, dtype=torch.bool))
    spat = spatial_score(torch.arange(N)[None], torch.tensor([N]), 0.25, 3.0)
    keep = hard_keep(red, spat, torch.tensor([1.0]), torch.tensor([0.24]))
    assert keep.nonzero()[:, 1].tolist() == [0, 2, 8, 10]
    low = float(red[red > 0].min()) / 2
    keep = hard_keep(red, spat, torch.tensor([low]), torch.tensor([0.99]))
    assert keep[0].tolist() == (red[0] > low).tolist() and int(keep.sum()) == int((red > 0).sum())


def test_soft_mask_tends_to_the_hard_rule():
    g = torch.Generator().manual_seed(0)
    red = torch.rand(3, 50, generator=g)
    spat = spatial_score(torch.arange(49)[None].expand(3, -1), torch.full((3,), 49), 0.25, 3.0)
    spat = torch.cat([spat, torch.zeros(3, 1)], dim=1)
    th_r, th_s = torch.tensor([0.2, 0.5, 0.8]), torch.tensor([0.1, 0.5, 0.3])
    hard = (red > th_r[:, None]) | (spat > th_s[:, None])
    soft = soft_keep(red, spat, th_r, th_s, temperature=1e5)
    assert torch.equal(soft > 0.5, hard)
    assert float((soft - hard.float()).abs().max()) < 1e-3


def test_from_mask_packs_kept_indices_first_with_unused_slots():
    sel = Selection.from_mask(torch.tensor([[True, False, True, False], [False, False, False, True]]))
    assert sel.keep[0, :2].tolist() == [0, 2] and sel.keep[1, 0].tolist() == 3
    assert sel.valid.tolist() == [[True, True], [True, False]]
    assert Selection.from_mask(torch.ones(2, 3, dtype=torch.bool)).valid is None


# ---------------------------------------------------------------------------- engine
def test_options_and_missing_modules_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="r_s"):
        ATPLLaVA(r_s=0)
    with pytest.raises(TypeError, match="weights"):
        ATPLLaVA(weights=3)
    with pytest.raises(FileNotFoundError, match="no trained module"):
        ATPLLaVA(weights=str(tmp_path / "none.safetensors"))
    model = VLMS["llava"]("sdpa")
    inp = vlm_inputs("llava", model, batch=1)
    reset(model)
    with pytest.raises(ValueError, match="needs its trained module"):
        with torch.no_grad(), prunekit.prune_tokens(model, "atp_llava", keep=8):
            model(**inp)
    with pytest.raises(ValueError, match=r"no trained module for keep=4 of 16.*keep = 8"):
        with torch.no_grad(), prunekit.prune_tokens(model, "atp_llava", keep=4, weights=module(0.4, 0.9)):
            model(**inp)
    with pytest.raises(ValueError, match=r"cuts at layers \[1, 2, 3\].*layers=\[1, 2, 3\]"):
        with (
            torch.no_grad(),
            prunekit.prune_tokens(model, "atp_llava", keep=8, layers=(1, 2), weights=module(0.4, 0.9)),
        ):
            model(**inp)


def test_save_and_load_round_trip(tmp_path):
    a, b = module(0.3, 0.9, target=0.25), module(0.6, 0.2, target=0.5)
    path = save_atp([a, b], tmp_path / "atp.safetensors")
    back = load_atp(path)
    feats = torch.randn(5, 2)
    for m, r in zip([a, b], back, strict=True):
        assert r.cuts == m.cuts and r.target == m.target
        for c in range(len(CUTS)):
            assert all(
                torch.equal(x, y) for x, y in zip(m.thresholds(c, feats), r.thresholds(c, feats), strict=True)
            )


@pytest.mark.parametrize("fam", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_adaptive_counts_generate_equals_masked_reference(fam, attn):
    """Two rows keep different numbers of visual tokens (ragged slots); generate() == the full-length
    reference hiding, from each cut on, the keys dropped so far; the model is restored."""
    model = VLMS[fam](attn)
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    inp = vlm_inputs(fam, model, batch=2)
    with torch.no_grad():
        model(**inp)  # transformers installs its own output-recording hooks on the first call
    reset(model)
    before = snapshot(model)
    with torch.no_grad(), prunekit.prune_tokens(model, "atp_llava", keep=0.5, weights=module(0.45, 0.9)) as s:
        tokens, logits = greedy(model, inp)
    assert_same(before, snapshot(model))
    masks = s.stats.kept_masks
    assert s.stats.cut_layers == list(CUTS)
    for a, b in itertools.pairwise(masks):
        assert not bool((b & ~a).any()), "a later cut keeps a token an earlier one dropped"
    vis = inp["input_ids"] == model.config.image_token_id
    per_row = [(m & vis).sum(dim=1).tolist() for m in masks]  # visual tokens kept, per row and cut
    assert any(a != b for a, b in per_row), f"both rows kept the same counts at every cut: {per_row}"
    reset(ref_model)
    cuts = list(zip(s.stats.cut_layers, masks, strict=True))
    with torch.no_grad(), masked_reference_cuts(ref_model, cuts, inp["attention_mask"]):
        ref_tokens, ref_logits = greedy(ref_model, inp)
    finite = torch.isfinite(ref_logits)
    assert torch.equal(finite, torch.isfinite(logits))
    assert (logits - ref_logits)[finite].abs().max().item() < TOL
    assert torch.equal(tokens, ref_tokens)


def test_counts_vary_with_the_input():
    model = VLMS["llava"]("sdpa")
    kept = []
    for seed in (0, 1, 2):
        inp = vlm_inputs("llava", model, batch=1, seed=seed)
        reset(model)
        with (
            torch.no_grad(),
            prunekit.prune_tokens(model, "atp_llava", keep=8, weights=module(0.45, 0.9)) as s,
        ):
            model(**inp)
        kept.append(tuple(int(m.sum()) for m in s.stats.kept_masks))
    assert len(set(kept)) > 1, f"the same counts on three inputs: {kept}"


def test_later_cuts_see_the_original_grid_index_of_the_survivors():
    """theta_r = 1 passes no redundancy score, theta_s = 0.24 passes the SAP grid: every cut keeps
    the 4 x 4 grid's stride-2 tokens {0, 2, 8, 10} (plus each cut's top S_red token). With the
    survivors' own (shifted) indices a later cut would lose 8 and 10."""
    model = VLMS["llava"]("sdpa")
    inp = vlm_inputs("llava", model, batch=2)
    reset(model)
    with torch.no_grad(), prunekit.prune_tokens(model, "atp_llava", keep=8, weights=module(1.0, 0.24)) as s:
        model(**inp)
    vis = inp["input_ids"] == model.config.image_token_id
    for kept in s.stats.kept_masks:
        rows = kept[vis].view(2, 16)
        assert bool(rows[:, [0, 2, 8, 10]].all()), rows.int().tolist()
        assert int(rows.sum(dim=1).max()) <= 5


# ---------------------------------------------------------------------------- training
def _labelled(fam: str, model, seed: int) -> dict:
    inp = vlm_inputs(fam, model, batch=2, seed=seed)
    labels = torch.full_like(inp["input_ids"], -100)
    labels[:, -2:] = inp["input_ids"][:, -2:]  # the last two tokens are "the answer"
    return {**inp, "labels": labels}


def test_soft_training_path_at_high_temperature_equals_the_engine():
    """The trainer's relaxation (log-mask on keys) with T -> inf gives the engine's hard pruning: the
    last prompt token's logits agree (the answer rows are left out of the instruction: none here)."""
    model = VLMS["llava"]("eager")
    inp = vlm_inputs("llava", model, batch=2)
    m = module(0.45, 0.9)
    reset(model)
    with torch.no_grad(), prunekit.prune_tokens(model, "atp_llava", keep=8, weights=m) as s:
        hard = model(**inp).logits[:, -1]
    reset(model)
    soft = SoftATP(model, m, temperature=1e6, r_s=0.25, lam=3.0)
    with torch.no_grad(), soft:
        soft.prepare(inp["input_ids"], inp["attention_mask"], None)
        relaxed = model(**inp).logits[:, -1]
    vis = inp["input_ids"] == model.config.image_token_id
    for mask, kept in zip(soft.masks, s.stats.kept_masks, strict=True):
        assert torch.equal(mask > 0.5, kept[vis].view(2, -1)), "same tokens dropped at each cut"
    assert (hard - relaxed).abs().max().item() < 1e-3


def test_straight_through_forward_is_the_engine_at_the_training_temperature():
    """Straight-through training (the default) runs the hard rule forward at T = 10 already: same
    drops and last-token logits as the engine (the kept key's bias is 0, a dropped one's -13.8)."""
    model = VLMS["qwen2_vl"]("eager")
    inp = vlm_inputs("qwen2_vl", model, batch=2)
    m = module(0.45, 0.9)  # target 0.5: keep=4 of the tiny Qwen2-VL's 8 visual tokens
    reset(model)
    with torch.no_grad(), prunekit.prune_tokens(model, "atp_llava", keep=4, weights=m) as s:
        hard = model(**inp).logits[:, -1]
    reset(model)
    soft = SoftATP(model, m, temperature=10.0, r_s=0.25, lam=3.0, straight_through=True)
    with torch.no_grad(), soft:
        soft.prepare(inp["input_ids"], inp["attention_mask"], None)
        relaxed = model(**inp).logits[:, -1]
    vis = inp["input_ids"] == model.config.image_token_id
    for mask, kept in zip(soft.masks, s.stats.kept_masks, strict=True):
        assert torch.equal(mask.bool(), kept[vis].view(2, -1))
    assert (hard - relaxed).abs().max().item() < 1e-3


def test_training_moves_the_mean_toward_the_target_and_restores_the_model():
    model = VLMS["llava"]("sdpa")
    batches = [_labelled("llava", model, seed) for seed in range(3)]
    with torch.no_grad():
        model(**batches[0])
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    (m,) = train_atp(model, batches, keep=6, steps=40, lr=0.1, hidden=8, progress=False)
    assert_same(before, snapshot(model))
    assert [p.requires_grad for p in model.parameters()] == flags
    start, end = m.log[0]["mean_kept"], sum(r["mean_kept"] for r in m.log[-5:]) / 5
    assert abs(end - 6) < abs(start - 6) / 2, (start, end)
    assert m.target == 6 / 16 and m.cuts == CUTS


def test_training_refuses_bad_input_and_restores_after_an_error():
    model = VLMS["llava"]("sdpa")
    batches = [_labelled("llava", model, 0)]
    with pytest.raises(ValueError, match="at least one batch"):
        train_atp(model, [], keep=6)
    with pytest.raises(ValueError, match=r"keep must be in \[1, 15\]"):
        train_atp(model, batches, keep=16, progress=False)
    decoder = DECODERS["llama"]("sdpa")
    with pytest.raises(prunekit.errors.UnsupportedModelError, match="VLM"):
        train_atp(
            decoder, [{**text_inputs(1), "labels": text_inputs(1)["input_ids"]}], keep=2, progress=False
        )
    with torch.no_grad():
        model(**batches[0])
    before = snapshot(model)
    bad = {**batches[0], "pixel_values": batches[0]["pixel_values"][:, :1]}  # 1 channel: fails in the tower
    with pytest.raises(RuntimeError):
        train_atp(model, [bad], keep=6, steps=1, progress=False)
    assert_same(before, snapshot(model))
