"""Sparsity schedules, the average parameter count, the Chinchilla fit, the gradual magnitude
scheduler (plain loop, Trainer, and a literal re-statement of the Journey code's loop) and
:func:`prunekit.training.journey`."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from prunekit.training import (
    SparsityScheduler,
    average_param_count,
    cubic_sparsity,
    fit_scaling_law,
    geometric_sparsity,
    global_magnitude_masks,
    journey,
    journey_average_fraction,
    one_shot_sparsity,
    prunable_linears,
    train_causal_lm,
)
from prunekit.training.schedules import geometric_events
from tiny import llama


def _tiny(**kw):
    return llama(**{"num_hidden_layers": 2, **kw})


# --- schedules -----------------------------------------------------------------------------------


def test_cubic_hand_worked():
    kw = dict(start=10, end=20, final=0.8)
    assert cubic_sparsity(5, **kw) == 0.0 and cubic_sparsity(10, **kw) == 0.0
    assert cubic_sparsity(15, **kw) == pytest.approx(0.8 - 0.8 * 0.5**3)  # 0.7
    assert cubic_sparsity(20, **kw) == 0.8 and cubic_sparsity(99, **kw) == 0.8
    assert cubic_sparsity(15, initial=0.2, **kw) == pytest.approx(0.8 - 0.6 * 0.125)  # 0.725
    assert cubic_sparsity(12, initial=0.2, **kw) == pytest.approx(0.8 - 0.6 * 0.8**3)


def test_geometric_as_the_journey_code():
    kw = dict(start=2, end=8, final=0.5, frequency=2)  # K = 4 events: 2, 4, 6, 8
    assert geometric_events(start=2, end=8, frequency=2) == [2, 4, 6, 8]
    dens = [1 - geometric_sparsity(t, **kw) for t in range(12)]
    assert dens[:2] == [1.0, 1.0]
    for t, i in ((2, 1), (3, 1), (4, 2), (5, 2), (6, 3), (7, 3)):
        assert dens[t] == pytest.approx(0.5 ** (i / 4)), t
    assert geometric_sparsity(8, **kw) == 0.5 and geometric_sparsity(11, **kw) == 0.5  # exactly S at end
    # a constant per-event rate s1 = 1 - (1 - S)^(1/K) of what is left
    s1 = 1 - 0.5 ** (1 / 4)
    assert dens[4] / dens[2] == pytest.approx(1 - s1) and dens[2] == pytest.approx(1 - s1)
    assert geometric_sparsity(5, start=5, end=5, final=0.3, frequency=7) == 0.3  # one event
    with pytest.raises(ValueError, match=r"multiple of frequency.*end - start = 7"):
        geometric_sparsity(0, start=2, end=9, final=0.5, frequency=2)


def test_one_shot_and_errors():
    assert [one_shot_sparsity(t, at=3, final=0.6) for t in (0, 2, 3, 9)] == [0.0, 0.0, 0.6, 0.6]
    with pytest.raises(ValueError, match=r"final must be a number in \[0, 1\); got 1.2"):
        geometric_sparsity(0, start=0, end=4, final=1.2, frequency=2)
    with pytest.raises(ValueError, match="step must be an int >= 0; got -1"):
        one_shot_sparsity(-1, at=0, final=0.5)
    with pytest.raises(ValueError, match="frequency must be an int >= 1; got 0"):
        geometric_sparsity(0, start=0, end=4, final=0.5, frequency=0)
    with pytest.raises(ValueError, match="end must be > start"):
        cubic_sparsity(0, start=4, end=4, final=0.5)
    with pytest.raises(ValueError, match=r"initial must be in \[0, final=0.5\]"):
        cubic_sparsity(0, start=0, end=4, final=0.5, initial=0.7)


def test_average_param_count():
    assert average_param_count([1, 1, 0.5, 0.5]) == 0.75
    assert average_param_count([1, 1, 0.5, 0.5], 4, n_params=8) == 6.0
    assert average_param_count(lambda t: 1.0 if t < 3 else 0.25, 4, n_params=100) == pytest.approx(81.25)
    with pytest.raises(ValueError, match=r"densities must be in \[0, 1\]; got 1.5"):
        average_param_count([1.5])
    with pytest.raises(ValueError, match="total_steps=3 but 2 densities"):
        average_param_count([1, 1], 3)
    # the closed form: 0.25 + 0.5 * 0.5 / ln 2 + 0.25 * 0.5
    assert journey_average_fraction(0.5, 0.25, 0.75) == pytest.approx(0.25 + 0.25 / math.log(2) + 0.125)
    assert round(journey_average_fraction(0.5, 0.25, 0.75), 3) == 0.736
    assert journey_average_fraction(0.0, 0.25, 0.75) == 1.0
    assert journey_average_fraction(0.5, 0.4, 0.4) == pytest.approx(0.4 + 0.6 * 0.5)  # one shot at 40%


def test_discrete_geometric_average_approaches_the_closed_form():
    T, S = 4000, 0.5
    errs = []
    for k in (3, 11, 101, 2001):
        f = 2000 // (k - 1)
        kw = dict(start=1000, end=3000, final=S, frequency=f)
        got = average_param_count(lambda t, kw=kw: 1 - geometric_sparsity(t, **kw), T)
        # by hand: 1000 dense steps, f steps at each density (1-S)^((i+1)/k) for i < k-1, 1000 at 1-S
        want = (1000 + f * sum((1 - S) ** ((i + 1) / k) for i in range(k - 1)) + 1000 * (1 - S)) / T
        assert got == pytest.approx(want, rel=1e-12)
        errs.append(abs(got - journey_average_fraction(S, 0.25, 0.75)))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-4 and errs[0] > 1e-3
    # cubic from 0: the density's mean over the ramp is 1 - S * (1 - 1/4)
    kw = dict(start=1000, end=3000, final=S)
    got = average_param_count(lambda t: 1 - cubic_sparsity(t, **kw), T)
    assert journey_average_fraction(S, 0.25, 0.75, "cubic") == 0.25 + 0.5 * (1 - 0.375) + 0.125
    assert got == pytest.approx(0.6875, abs=1e-3)
    with pytest.raises(ValueError, match="schedule must be 'geometric' or 'cubic'"):
        journey_average_fraction(S, 0.25, 0.75, "linear")


# --- the scaling-law fit ---------------------------------------------------------------------------

CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def test_fit_recovers_known_parameters():
    n = np.repeat(np.logspace(6, 9, 6), 5)
    d = np.tile(np.logspace(8, 11, 5), 6)
    c = CHINCHILLA
    loss = c["E"] + c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]
    law = fit_scaling_law(n, d, loss, starts=64)
    for k, v in c.items():
        assert getattr(law, k) == pytest.approx(v, rel=1e-3), k
    assert max(abs(r) for r in law.residuals) < 1e-6
    assert law.predict(n, d) == pytest.approx(loss, rel=1e-6)
    # one token budget: L(N) = E + A / N^alpha
    law = fit_scaling_law(n[::5], None, 2.0 + 50.0 / n[::5] ** 0.3, form="N")
    assert (law.E, law.A, law.alpha) == pytest.approx((2.0, 50.0, 0.3), rel=1e-3)
    assert law.B == 0 and law.beta == 0 and len(law.residuals) == 6


def test_fit_huber_ignores_an_outlier():
    """δ = 1e-3 on log L: one point 20 % off barely moves the fit; a squared loss (δ large) is pulled."""
    n = np.logspace(5, 9, 9)
    loss = 2.0 + 50.0 / n**0.3
    loss[4] *= 1.2
    law = fit_scaling_law(n, None, loss, form="N")
    assert (law.E, law.A, law.alpha) == pytest.approx((2.0, 50.0, 0.3), rel=2e-2)
    assert law.residuals[4] == pytest.approx(math.log(1.2), abs=2e-3)
    squared = fit_scaling_law(n, None, loss, form="N", delta=10.0)
    assert abs(squared.alpha - 0.3) > 0.05


def test_fit_errors():
    with pytest.raises(ValueError, match=r"same token count.*form='N'"):
        fit_scaling_law([1e6, 1e7, 1e8], [1e9] * 3, [3.0, 2.5, 2.2])
    with pytest.raises(ValueError, match="form must be 'ND'"):
        fit_scaling_law([1e6, 1e7, 1e8], None, [3.0, 2.5, 2.2], form="D")
    with pytest.raises(ValueError, match=">= 3 points"):
        fit_scaling_law([1e6, 1e7], None, [3.0, 2.5], form="N")


# --- the global threshold and the scheduler -------------------------------------------------------


def test_global_threshold_hand_worked():
    w1 = torch.tensor([[0.1, -0.5], [0.3, 0.9]])
    w2 = torch.tensor([[-0.2, 0.05, 0.7]])
    m1 = torch.ones(2, 2, dtype=torch.bool)
    m2 = torch.tensor([[True, True, False]])  # 0.7 pruned before: it scores 0 and stays pruned
    # n = 7, keep = floor(0.5 * 7) = 3; sorted |w*m| = 0, .05, .1, .2, .3, .5, .9 -> thr = sorted[4] = .3
    (n1, n2), thr = global_magnitude_masks([w1, w2], [m1, m2], 0.5)
    assert thr == pytest.approx(0.3)
    assert n1.tolist() == [[False, True], [True, True]] and n2.tolist() == [[False, False, False]]
    (n1, n2), _ = global_magnitude_masks([w1, w2], [m1, m2], 0.0)
    assert n1.all() and n2.tolist() == [[True, True, False]]


def test_prunable_linears_lm_head_tied_or_not():
    names = [n for n, _ in prunable_linears(_tiny())]
    assert "lm_head" in names and len(names) == 2 * 7 + 1
    assert "lm_head" not in [n for n, _ in prunable_linears(_tiny(tie_word_embeddings=True))]
    assert [n for n, _ in prunable_linears(_tiny(), exclude=("lm_head", "mlp"))] == [
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"
    ]


def _windows(n=1, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n, t), generator=g)


SCHED = dict(final=0.5, start=2, end=8, frequency=2)
STEPS, LR = 10, 1e-2


def _plain(model, w, sched):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model.train()
    record = [(sched.realised_sparsity(), None)]
    for _ in range(STEPS):
        model(input_ids=w, labels=w).loss.backward()
        grads_ok = all(bool((p.grad[~m] == 0).all()) for p, m in zip(sched.weights, sched.masks, strict=True))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        record.append((sched.realised_sparsity(), grads_ok))
    return record


def test_scheduler_hits_the_schedule_exactly_and_masks_gradients():
    model = _tiny()
    sched = SparsityScheduler.geometric(model, **SCHED)
    n = sched.n_params
    record = _plain(model, _windows(), sched)
    for t, (sparsity, _) in enumerate(record[:-1]):  # the weights trained at step t
        dens = 1.0 if t < 2 else 0.5 ** (min((t - 2) // 2 + 1, 4) / 4)
        assert sparsity * n == n - math.floor(dens * n + 1e-9), t
    assert record[-1][0] == 0.5 and all(ok for _, ok in record[1:])
    assert [e[0] for e in sched.thresholds] == [2, 4, 6, 8]
    # N̄ from the realised counts, against the hand-computed schedule
    want = sum(math.floor((1 - geometric_sparsity(t, **SCHED)) * n + 1e-9) for t in range(STEPS)) / STEPS
    assert sched.average_param_count() == want
    with pytest.raises(ValueError, match="went down"):
        sched.schedule = lambda t: 0.1
        sched.step()


def _journey_reference(model, w):
    """The Journey code's loop restated: masks multiply the kernels in the forward pass, an event
    prunes before the step's forward, threshold = sort(|w*m|)[n - int(keep*n)], keep |w| >= thr."""
    from torch.func import functional_call

    names = [n + ".weight" for n, _ in prunable_linears(model)]
    params = dict(model.named_parameters())
    masks = {k: torch.ones_like(params[k]) for k in names}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model.train()
    k_events = (8 - 2) // 2 + 1
    for step in range(STEPS + 1):
        if 2 <= step <= 8 and (step - 2) % 2 == 0:
            keep = (1 - (1 - 0.5 ** (1 / k_events))) ** ((step - 2) // 2 + 1)
            scores = torch.cat([(params[k] * masks[k]).detach().abs().flatten() for k in names])
            total = scores.numel()
            thr = torch.sort(scores).values[total - math.floor(keep * total + 1e-9)]
            for k in names:
                masks[k] = (params[k].detach().abs() >= thr).float() * masks[k]
        if step == STEPS:
            break
        eff = {k: (params[k] * masks[k] if k in masks else params[k]) for k in params}
        functional_call(model, eff, (), {"input_ids": w, "labels": w}).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return {k: (params[k] * masks[k]).detach() for k in names}, masks


def test_plain_loop_equals_the_journey_code_and_the_trainer():
    base = _tiny()
    w = _windows()
    a, b, ref = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    sa = SparsityScheduler.geometric(a, **SCHED)
    _plain(a, w, sa)
    sb = SparsityScheduler.geometric(b, **SCHED)
    train_causal_lm(b, w, steps=STEPS, lr=LR, batch_size=1, callbacks=[sb], progress=False,
                    lr_scheduler_type="constant")  # fmt: skip
    ref_w, ref_m = _journey_reference(ref, w)
    for name, wa, ma, wb, mb in zip(sa.names, sa.weights, sa.masks, sb.weights, sb.masks, strict=True):
        assert torch.equal(ma, mb), name
        assert torch.equal(ma, ref_m[name + ".weight"].bool()), name
        torch.testing.assert_close(wa, wb, rtol=0, atol=1e-6)
        torch.testing.assert_close(wa.detach(), ref_w[name + ".weight"], rtol=0, atol=1e-6)
    assert sb.realised_sparsity() == 0.5 and sa.average_param_count() == sb.average_param_count(STEPS)
    # the weights not chosen were trained too, and equally
    torch.testing.assert_close(a.model.embed_tokens.weight, b.model.embed_tokens.weight, rtol=0, atol=1e-6)


def test_cubic_and_one_shot_schedulers():
    model = _tiny()
    sched = SparsityScheduler.cubic(model, final=0.6, start=0, end=6, frequency=3, exclude="lm_head")
    assert "lm_head" not in sched.names
    n = sched.n_params
    seen = []
    for t in range(8):
        seen.append(sched.nonzero[t])
        sched.step()
    s3 = 0.6 - 0.6 * 0.5**3  # cubic at step 3 of 0..6
    want = [n] * 3 + [math.floor((1 - s3) * n + 1e-9)] * 3 + [math.floor(0.4 * n + 1e-9)] * 2
    assert seen == want
    m2 = _tiny()
    one = SparsityScheduler.one_shot(m2, final=0.25)  # at step 0: pruned on construction
    assert one.realised_sparsity() == 0.25 and one.nonzero == {0: one.n_params - one.n_params // 4}
    one.remove()
    out = m2(input_ids=_windows()).logits.sum()
    out.backward()
    assert all(p.grad is not None for p in one.weights)
    with pytest.raises(ValueError, match="no Linear weight to prune"):
        SparsityScheduler.one_shot(torch.nn.Sequential(torch.nn.ReLU()), final=0.5)


def test_resume_rebuilds_masks_from_the_checkpoint(tmp_path):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                control.should_training_stop = True

    base, w = _tiny(), _windows(n=2)
    kw = dict(steps=STEPS, lr=LR, batch_size=1, progress=False, seed=3)
    straight = copy.deepcopy(base)
    s0 = SparsityScheduler.geometric(straight, **SCHED)
    train_causal_lm(straight, w, callbacks=[s0], **kw)
    # a run cut after step 5 (events at 2 and 4 done), then a fresh scheduler resuming from its checkpoint
    ck = dict(checkpoint_dir=str(tmp_path), save_steps=5)
    first = copy.deepcopy(base)
    train_causal_lm(first, w, callbacks=[SparsityScheduler.geometric(first, **SCHED), Stop()], **ck, **kw)
    second = copy.deepcopy(base)
    s2 = SparsityScheduler.geometric(second, **SCHED)
    train_causal_lm(second, w, callbacks=[s2], resume=True, **ck, **kw)
    assert [e[0] for e in s2.thresholds] == [6, 8] and s2.realised_sparsity() == 0.5
    for name, m0, m2, w0, w2 in zip(s0.names, s0.masks, s2.masks, s0.weights, s2.weights, strict=True):
        assert torch.equal(m0, m2), name
        torch.testing.assert_close(w0, w2, rtol=0, atol=1e-6)


# --- journey() -----------------------------------------------------------------------------------


def test_journey_end_to_end_and_report():
    model = _tiny()
    w = _windows(n=8, t=16)
    rep = journey(model, w, steps=8, batch_size=2, seq_len=16, progress=False, eval_texts=w[:2])
    # 25% -> 75% of 8 steps: events at 2..6, frequency round(4 / 10) -> 1
    assert (rep.start_step, rep.end_step, rep.frequency) == (2, 6, 1)
    assert [e[0] for e in rep.events] == [2, 3, 4, 5, 6]
    n = rep.n_params
    assert rep.final_sparsity == 0.5 and n == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 256 * 64
    kw = dict(start=2, end=6, final=0.5, frequency=1)
    want = sum(math.floor((1 - geometric_sparsity(t, **kw)) * n + 1e-9) for t in range(8)) / 8
    assert rep.n_bar == want and rep.n_bar_fraction == pytest.approx(want / n)
    assert rep.tokens == 8 * 2 * 16 and len(rep.losses) == 8 and rep.eval_loss > 0
    back = json.loads(rep.to_json())
    assert back["n_bar"] == rep.n_bar and back["events"][0][0] == 2
    assert sum(int((p.weight == 0).sum()) for _, p in prunable_linears(model)) == n // 2
    dense = journey(_tiny(), w, sparsity=0.0, steps=2, batch_size=2, seq_len=16, progress=False)
    assert dense.n_bar == dense.n_params and dense.events == [] and dense.final_sparsity == 0.0


def test_journey_errors_and_registry():
    import prunekit

    with pytest.raises(ValueError, match="schedule must be one of"):
        journey(_tiny(), _windows(n=4), schedule="linear", steps=2, seq_len=16)
    with pytest.raises(ValueError, match=r"end must be >= start"):
        journey(_tiny(), _windows(n=4), start=0.8, end=0.2, steps=2, seq_len=16)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\); got 1.0"):
        journey(_tiny(), _windows(n=4), sparsity=1.0, steps=2, seq_len=16)
    info = prunekit.registry.get("journey", "training")
    assert info.trains and info.stages == ("during-training",)
    assert info.factory.taxonomy["which"] == "weights: unstructured"
