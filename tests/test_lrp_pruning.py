"""Pruning by explaining as a method (``prunekit.training.lrp_pruning``): PXP's one-shot step, Yeom's
iterative variant, the plain-loop / ``Trainer`` callback and the registry entry.

Checks against hand-set scores (which units go), against an independent head mask (a pre-hook
zeroing the head's slice of the output projection's input, PXP's equivalent), against the original
weights (Yeom's kept indices), against a hand-written AdamW loop (the ``Trainer`` reaches the same
masks), masked == sliced after surgery, restoration after exceptions, and the errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import prunekit
from prunekit.errors import PrunekitError, UnsupportedModelError
from prunekit.models.convnets import MLP, ConvNet, groups
from prunekit.training import IterativeLRP, lrp, lrp_prune, train_batches
from prunekit.training import lrp_pruning as LP
from prunekit.training import lrp_rules as rules


def _batches(n=4, b=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(b, 1, 28, 28, generator=g)
        out.append({"pixel_values": x, "labels": torch.randint(0, classes, (b,), generator=g)})
    return out


def _masked(model) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


class Probe(nn.Module):
    """A tiny DINOv2 under a linear classifier (the shape of the benchmark's probe model)."""

    def __init__(self, impl: str = "eager") -> None:
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        cfg = Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=28,
            patch_size=14, num_channels=1, attn_implementation=impl,
        )  # fmt: skip
        torch.manual_seed(0)
        self.enc, self.head = Dinov2Model(cfg).eval(), nn.Linear(32, 3)

    def forward(self, pixel_values):
        return self.head(self.enc(pixel_values=pixel_values).pooler_output)


ATT = ["enc.encoder.layer.0.attention", "enc.encoder.layer.1.attention"]


# ------------------------------------------------------------------ PXP's one-shot step
def test_one_shot_removes_exactly_the_least_relevant_units_of_hand_scores():
    model = MLP((784, 4, 3, 2), seed=1)
    before = _state(model)
    scores = {"hidden.0": torch.tensor([0.5, 0.1, 0.9, 0.3]), "hidden.1": torch.tensor([0.2, 0.05, 0.7])}
    rep = lrp_prune(
        model, scores=scores, rate=0.43
    )  # int(0.43 * 7) = 3: hidden.1[1], hidden.0[1], hidden.1[0]
    assert rep.keep == {"hidden.0": [0, 2, 3], "hidden.1": [2]} and rep.units_removed == 3
    w0, w1, w2 = (model.layers[i].weight for i in range(3))
    assert bool((w0[1] == 0).all()) and bool((w0[[0, 2, 3]] != 0).all())
    assert (
        bool((w1[:, 1] == 0).all()) and bool((w1[[0, 1]] == 0).all()) and bool((w1[2, [0, 2, 3]] != 0).all())
    )
    assert bool((w2[:, [0, 1]] == 0).all()) and bool((w2[:, 2] != 0).all())
    rep.restore()
    assert not _masked(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pxp_scores_with_pxp_options_and_masked_equals_sliced(monkeypatch):
    calls = []
    real = rules.lrp_scores

    def spy(model, batches, composite, start, abs, normalize):
        calls.append((composite, start, abs, normalize))
        return real(model, batches, composite, start, abs, normalize)

    monkeypatch.setattr(rules, "lrp_scores", spy)
    model = ConvNet(widths=(6, 8, 8), seed=2)
    ref = _batches(2, 3)
    x = _batches(1, 5, seed=9)[0]["pixel_values"]
    want = real(copy.deepcopy(model), ref, rules.PXP_EPSILON, "onehot", "after_sum", None)
    rep = lrp_prune(model, ref, rate=0.4)
    assert calls == [
        (rules.PXP_EPSILON, "onehot", "after_sum", None)
    ]  # PXP: ε, one-hot, abs after Σ, no norm
    assert rep.scores == {k: v.tolist() for k, v in want.items()}
    with torch.no_grad():
        masked = model(x).logits
    rep.finalize()
    assert not _masked(model) and {k: g.width for k, g in groups(model).items()} == {
        k: len(v) for k, v in rep.keep.items()
    }
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, masked, rtol=1e-5, atol=1e-5)
    assert sum(len(v) for v in rep.keep.values()) == 22 - int(0.4 * 22)


def test_heads_masked_like_pxp_and_sliced_at_the_end():
    model = Probe()
    x = torch.randn(3, 1, 28, 28)
    scores = {ATT[0]: torch.tensor([0.3, 0.1, 0.8, 0.2]), ATT[1]: torch.tensor([0.05, 0.9, 0.7, 0.6])}
    rep = lrp_prune(model, scores=scores, rate=0.5)  # 4 of 8: L1h0, L0h1, L0h3, L0h0 -> layer 0 keeps h2
    assert rep.kind == "heads" and rep.keep == {ATT[0]: [2], ATT[1]: [1, 2, 3]}
    with torch.no_grad():
        masked = model(x)
    rep.restore()
    assert not _masked(model)
    # PXP's mask, independently: the dropped heads' slices of the output projection's input are zero
    d = 8
    hooks = []
    for i, drop in ((0, [0, 1, 3]), (1, [0])):

        def pre(mod, args, drop=drop):
            h = args[0].clone()
            for j in drop:
                h[..., j * d : (j + 1) * d] = 0
            return (h,)

        hooks.append(model.enc.encoder.layer[i].attention.o_proj.register_forward_pre_hook(pre))
    with torch.no_grad():
        want = model(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-6)
    rep = lrp_prune(model, scores=scores, rate=0.5, physical=True)
    assert rep.physical and model.enc.encoder.layer[0].attention.q_proj.weight.shape == (8, 32)
    assert model.enc.config.prunekit_encoder_structure[1]["num_attention_heads"] == 3
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_head_relevance_is_computed_and_ranked_on_a_vit_classifier():
    model = Probe("sdpa")
    ref = {"pixel_values": torch.randn(2, 1, 28, 28), "labels": torch.tensor([0, 2])}
    want = rules.attention_head_scores(model, ref)
    with lrp_prune(model, ref, rate=0.25) as rep:
        assert rep.scores == {k: v.tolist() for k, v in want.items()}
        order = rules.prune_order(want)[:2]
        assert sorted((k, i) for k in rep.keep for i in range(4) if i not in rep.keep[k]) == sorted(order)
    assert not _masked(model)


# ------------------------------------------------------------------ Yeom's iterative variant
def test_yeom_variant_keeps_original_indices_after_physical_steps():
    model = MLP((784, 20, 20, 10), seed=3)
    orig = copy.deepcopy(model)
    ref = _batches(1, 6, classes=10)[0]
    steps = []
    rep = lrp_prune(model, ref, rate=0.15, variant="yeom", fine_tune=lambda m, s: steps.append(s))
    assert steps == [0, 1, 2] and rep.physical and rep.units_removed == 6  # 3 x int(0.05 * 40)
    k0, k1 = torch.tensor(rep.keep["hidden.0"]), torch.tensor(rep.keep["hidden.1"])
    assert len(k0) + len(k1) == 34
    torch.testing.assert_close(model.layers[0].weight, orig.layers[0].weight[k0], rtol=0, atol=0)
    torch.testing.assert_close(model.layers[1].weight, orig.layers[1].weight[k1][:, k0], rtol=0, atol=0)
    torch.testing.assert_close(model.layers[2].weight, orig.layers[2].weight[:, k1], rtol=0, atol=0)


# ------------------------------------------------------------------ callbacks: plain loop and Trainer
STEPS, LR = 7, 1e-2


def _plain(model, batches, sched):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model.train()
    for t in range(STEPS):
        model(**batches[t % len(batches)]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()


def test_callback_in_a_plain_loop_and_in_the_trainer_reach_the_same_masks():
    base = MLP((784, 12, 10, 3), seed=4)
    data, ref = _batches(4, 8), _batches(1, 6, seed=5)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    sa = IterativeLRP(a, ref, every=2, steps=3, step_fraction=0.1)  # int(0.1 * 22) = 2 per event
    _plain(a, data, sa)
    sb = IterativeLRP(b, ref, every=2, steps=3, step_fraction=0.1)
    train_batches(
        b, data, steps=STEPS, lr=LR, seed=0, callbacks=[sb], progress=False, lr_scheduler_type="constant"
    )
    assert sa.events == sb.events == [(2, 2), (4, 2), (6, 2)]
    assert {k: v.tolist() for k, v in sa.keep.items()} == {k: v.tolist() for k, v in sb.keep.items()}
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    x = data[0]["pixel_values"]
    with torch.no_grad():
        masked = a(x).logits
    rep = sa.finalize()  # masked == sliced
    assert rep.channels == {
        "hidden.0": (12, len(sa.keep["hidden.0"])),
        "hidden.1": (10, len(sa.keep["hidden.1"])),
    }
    assert not _masked(a) and sum(g.width for g in groups(a).values()) == 16
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, masked, rtol=1e-6, atol=1e-6)
    with pytest.raises(PrunekitError, match="finalized"):
        sa.step()


def test_masked_units_score_zero_and_are_not_chosen_twice():
    model = MLP((784, 12, 10, 3), seed=6)
    sched = IterativeLRP(model, _batches(1, 6), every=1, steps=4, step_fraction=0.2)  # 4 per event
    for _ in range(5):
        sched.step()
    assert [r for _, r in sched.events] == [4, 4, 4, 4]
    assert sum(len(v) for v in sched.keep.values()) == 22 - 16
    scores = rules.lrp_scores(model, _batches(1, 6))
    for k, kept in sched.keep.items():
        gone = torch.ones(len(scores[k]), dtype=torch.bool)
        gone[kept] = False
        assert bool((scores[k][gone] == 0).all())
    sched.restore()
    assert not _masked(model)


# ------------------------------------------------------------------ restoration
def test_models_restored_after_exceptions():
    model = ConvNet(widths=(6, 8, 8), seed=2)
    before = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with lrp_prune(model, _batches(1, 3), rate=0.5):
            assert _masked(model)
            raise RuntimeError("boom")
    assert not _masked(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    sched = IterativeLRP(model, _batches(1, 3), every=1, steps=1)
    with pytest.raises(RuntimeError, match="boom"):
        with sched:
            sched.step()
            assert _masked(model)
            raise RuntimeError("boom")
    assert not _masked(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    probe = Probe()
    with pytest.raises(
        ValueError, match="kept heads must be"
    ):  # layer 1's keep is bad: layer 0 unmasked again
        LP.mask_heads(probe, {ATT[0]: [0, 1], ATT[1]: [7]})
    assert not _masked(probe)


def test_registry_entry_and_the_call_named_like_it():
    info = prunekit.registry.get("lrp", "training")
    assert info.stages == ("after-training",) and info.factory.taxonomy["how"] == "relevance (LRP)"
    model = MLP((784, 4, 3, 2), seed=1)
    rep = info.factory(rate=0.5)(model, scores={"hidden.0": torch.arange(4.0), "hidden.1": torch.arange(3.0)})
    assert rep.keep == {"hidden.0": [2, 3], "hidden.1": [1, 2]}
    rep.restore()
    rep2 = lrp(model, scores={"hidden.0": torch.arange(4.0), "hidden.1": torch.arange(3.0)}, rate=0.5)
    assert rep2.keep == rep.keep
    rep2.restore()


# ------------------------------------------------------------------ errors
def test_clear_errors():
    model = MLP((784, 4, 3, 2), seed=1)
    s = {"hidden.0": torch.ones(4), "hidden.1": torch.ones(3)}
    b = _batches(1, 3)
    with pytest.raises(ValueError, match=r"variant must be one of \('pxp', 'yeom'\); got 'xp'"):
        lrp_prune(model, scores=s, variant="xp")
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\); got 1.0"):
        lrp_prune(model, scores=s, rate=1.0)
    with pytest.raises(ValueError, match="one score per unit"):
        lrp_prune(model, scores={"hidden.0": torch.ones(4)})
    with pytest.raises(ValueError, match="reference batches"):
        lrp_prune(model)
    with pytest.raises(ValueError, match="fine_tune belongs to variant='yeom'"):
        lrp_prune(model, b, fine_tune=lambda m, s: None)
    with pytest.raises(ValueError, match=r"rate=0\.12 is not a positive multiple of it"):
        lrp_prune(model, b, rate=0.12, variant="yeom")
    with pytest.raises(ValueError, match="removes physically after each step"):
        lrp_prune(model, b, rate=0.1, variant="yeom", physical=False)
    with pytest.raises(UnsupportedModelError, match="variant='yeom' prunes the channels"):
        lrp_prune(Probe(), scores=None, rate=0.1, variant="yeom")
    with pytest.raises(UnsupportedModelError, match="neither one of prunekit's small vision networks"):
        lrp_prune(nn.Sequential(nn.Linear(2, 2)), scores=s)
    with pytest.raises(ValueError, match="every must be an int >= 1; got 0"):
        IterativeLRP(model, b, every=0)
    with pytest.raises(ValueError, match="removes no unit"):
        IterativeLRP(model, b, every=1, step_fraction=0.05)
    assert not _masked(model)
