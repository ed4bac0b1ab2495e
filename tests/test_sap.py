"""SAP (prunekit.training.sap): hand-worked prune counts, rewinding to θ₀, masked training in a
plain loop and in the transformers Trainer, the lt/os baselines, errors."""

from __future__ import annotations

import pytest
import torch

from prunekit.models.convnets import MLP
from prunekit.training.sap import SAPCallback, dense_masks, sap, sap_step

torch.set_num_threads(1)


def _set(model: MLP, w0, w1) -> None:
    with torch.no_grad():
        model.layers[0].weight.copy_(torch.tensor(w0))
        model.layers[1].weight.copy_(torch.tensor(w1))


def _batches(n=4, b=8, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(b, d, generator=g),
            "labels": torch.randint(0, classes, (b,), generator=g),
        }
        for _ in range(n)
    ]


def test_sap_step_hand_worked_count_on_a_tiny_mlp():
    # |w| = {9, 1, 1, .01, .01, .01}: (Σ√|w|)²/Σ|w| = 5.3² / 11.03 = 2.547 -> m = 3 of d = 6,
    # ratio = 1·(1 − 3/6) = 0.5, n = floor(6·0.5) = 3, pivot = sorted|w|[3] = 1: prune |w| < 1
    m = MLP(sizes=(2, 2, 1))
    _set(m, [[9.0, -0.01], [1.0, 0.01]], [[-1.0, 0.01]])
    new = sap_step(m, None, "si-0.5-1-0-1")
    assert new["layers.0.weight"].tolist() == [[True, False], [True, False]]
    assert new["layers.1.weight"].tolist() == [[True, False]]
    assert set(new) == {"layers.0.weight", "layers.1.weight"}  # biases are not prunable
    # the pruned weights are zeroed in place, the others untouched
    assert m.layers[0].weight.tolist() == [[9.0, 0.0], [1.0, 0.0]]
    assert m.layers[1].weight.tolist() == [[-1.0, 0.0]]


def test_sap_step_gamma_and_the_beta_clamp():
    # γ = 2: ratio = clamp(2·0.5, 0, β = 0.9) = 0.9, n = floor(5.4) = 5, pivot = sorted[5] = 9:
    # every |w| < 9 goes (five weights); ties with the pivot survive
    m = MLP(sizes=(2, 2, 1))
    _set(m, [[9.0, -0.01], [1.0, 0.01]], [[-1.0, 0.01]])
    new = sap_step(m, None, "si-0.5-1-0-2")
    assert int(sum(v.sum() for v in new.values())) == 1 and bool(new["layers.0.weight"][0, 0])
    # β = 0.5 caps the ratio: n = floor(6·0.5) = 3, as the γ = 1 case
    m2 = MLP(sizes=(2, 2, 1))
    _set(m2, [[9.0, -0.01], [1.0, 0.01]], [[-1.0, 0.01]])
    assert int(sum(v.sum() for v in sap_step(m2, None, "si-0.5-1-0-2", beta=0.5).values())) == 3


def _ranked_mlp():
    # 12 prunable weights with magnitudes 1..12 (signs mixed)
    m = MLP(sizes=(2, 4, 1))
    vals = torch.arange(1.0, 13.0) * torch.tensor([1, -1] * 6)
    _set(m, vals[:8].view(4, 2).tolist(), vals[8:].view(1, 4).tolist())
    return m


def _kept_magnitudes(m, masks):
    ws = torch.cat([m.layers[0].weight.detach().reshape(-1), m.layers[1].weight.detach().reshape(-1)])
    ms = torch.cat([masks["layers.0.weight"].reshape(-1), masks["layers.1.weight"].reshape(-1)])
    return sorted(int(v) for v in ws[ms].abs().tolist())


def test_lottery_ticket_rate_counts():
    # lt-0.2, global: pivot = the linear-interpolation quantile of the 12 magnitudes at 0.2:
    # position 0.2·11 = 2.2 -> 3.2, so {1, 2, 3} go. Then of {4..12}: 0.2·8 = 1.6 -> 5.6: {4, 5} go.
    m = _ranked_mlp()
    masks = sap_step(m, None, "lt-0.2")
    assert _kept_magnitudes(m, masks) == list(range(4, 13))
    masks = sap_step(m, masks, "lt-0.2")
    assert _kept_magnitudes(m, masks) == list(range(6, 13))


def test_lottery_ticket_layer_scope():
    # layer scope: layers.0 holds 1..8: 0.2·7 = 1.4 -> pivot 2.4, {1, 2} go; layers.1 holds 9..12:
    # 0.2·3 = 0.6 -> pivot 9.6, {9} goes
    m = _ranked_mlp()
    masks = sap_step(m, None, "lt-0.2", scope="layer")
    assert _kept_magnitudes(m, masks) == [3, 4, 5, 6, 7, 8, 10, 11, 12]


def test_one_shot_baseline_ranks_by_the_reference():
    # the reference ranks in reverse (13 − |w|): the three largest current weights go
    m = _ranked_mlp()
    ref = {n: 13.0 - w.detach().abs() for n, w in m.named_parameters() if n.endswith("weight")}
    masks = sap_step(m, None, "os-0.2", reference=ref)
    assert _kept_magnitudes(m, masks) == list(range(1, 10))
    with pytest.raises(ValueError, match="ranks by a reference state"):
        sap_step(_ranked_mlp(), None, "os-0.2")


def test_rewind_restores_theta0_on_survivors_and_pruned_stay_zero_in_the_trainer():
    from prunekit.training import train_batches

    m = MLP(sizes=(6, 8, 3), seed=1)
    theta0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    cb = SAPCallback(m, "lt-0.5")
    train_batches(m, _batches(), steps=5, lr=1e-2, callbacks=[cb], progress=False)
    trained = {n: p.detach().clone() for n, p in m.named_parameters()}
    assert not torch.equal(trained["layers.0.weight"], theta0["layers.0.weight"])
    masks = cb.prune()
    assert 0 < cb.kept() < sum(p.numel() for n, p in theta0.items() if n.endswith("weight"))
    cb.rewind()
    for n, p in m.named_parameters():
        if n in masks:
            assert torch.equal(p[masks[n]], theta0[n][masks[n]])  # survivors: exactly θ₀
            assert bool((p[~masks[n]] == 0).all())
        else:
            assert torch.equal(p, theta0[n])  # biases reset too
    train_batches(m, _batches(seed=1), steps=5, lr=1e-2, callbacks=[cb], progress=False)
    for n, mask in masks.items():
        p = m.get_parameter(n)
        assert bool((p[~mask] == 0).all())  # pruned entries never left 0
        assert not torch.equal(p[mask], theta0[n][mask])  # the survivors trained


def _plain_sap(model, batches, mode, iterations, steps, lr):
    """An independent hand-written loop: AdamW with the Trainer's linear decay and grad clipping 1,
    rewinding with the callback between trainings."""
    cb = SAPCallback(model, mode)
    for it in range(iterations + 1):
        cb.rewind()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
        model.train()
        for s in range(steps):
            b = batches[s % len(batches)]
            loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            cb.zero_masked_grads()
            opt.step()
            sched.step()
            opt.zero_grad()
        if it < iterations:
            cb.prune()
    return cb.masks


@pytest.mark.parametrize("mode", ["si-0.5-1-0-1", "lt-0.3"])
def test_the_driver_on_the_trainer_equals_a_plain_loop(mode):
    a, b = MLP(sizes=(6, 8, 3), seed=2), MLP(sizes=(6, 8, 3), seed=2)
    batches = _batches(seed=3)
    report = sap(a, batches, mode=mode, iterations=2, steps_per_iteration=4, lr=1e-2)
    masks = _plain_sap(b, batches, mode, iterations=2, steps=4, lr=1e-2)
    for n in masks:
        assert torch.equal(report.masks[n], masks[n]), n
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=n)
    kept = [r["kept"] for r in report.rows]
    assert len(report.rows) == 3 and kept[0] == report.dense and kept[0] > kept[1] > kept[2]
    assert [r["kept"] - r.get("pruned_next", 0) for r in report.rows[:2]] == kept[1:]


def test_report_accuracy_pqi_and_the_os_reference():
    m = MLP(sizes=(6, 8, 3), seed=4)
    theta0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    ev = _batches(n=2, seed=9)
    r = sap(m, _batches(), mode="os-0.2", iterations=1, steps_per_iteration=3, lr=1e-2, eval_batches=ev)
    assert all(0 <= row["accuracy"] <= 1 for row in r.rows) and r.selection == "last"
    # os with the official reference (θ₀): the first step prunes the smallest |θ₀|
    expected = sap_step(MLP(sizes=(6, 8, 3), seed=4), None, "os-0.2", reference=theta0)
    for n in expected:
        assert torch.equal(r.masks[n], expected[n])
    assert 0 < r.rows[0]["pqi"] < 1


def test_faithful_selection_on_the_test_batches():
    m = MLP(sizes=(6, 8, 3), seed=5)
    ev = _batches(n=2, seed=9)
    r = sap(m, _batches(), mode="lt-0.2", iterations=1, steps_per_iteration=4, lr=5e-2, eval_batches=ev,
            faithful=True, select_every=1)  # fmt: skip
    assert r.selection == "test (faithful)"
    assert all(1 <= row["selected_step"] <= 4 for row in r.rows)


def test_errors():
    m = MLP(sizes=(6, 8, 3))
    with pytest.raises(ValueError, match="the kind must be one of"):
        sap_step(m, None, "xx-0.2")
    with pytest.raises(ValueError, match=r"one ratio in \(0, 1\)"):
        sap_step(m, None, "lt-1.5")
    with pytest.raises(ValueError, match="scope must be one of"):
        sap_step(m, None, "lt-0.2", scope="row")
    with pytest.raises(ValueError, match=r"beta .* must be in \[0, 1\)"):
        sap_step(m, None, "lt-0.2", beta=1.0)
    with pytest.raises(ValueError, match=r"missing \['layers.1.weight'\]"):
        sap_step(m, {"layers.0.weight": torch.ones(8, 6, dtype=torch.bool)}, "lt-0.2")
    with pytest.raises(ValueError, match="iterations must be an int >= 0"):
        sap(m, _batches(), iterations=-1)
    with pytest.raises(ValueError, match="faithful=True selects the checkpoint on eval_batches"):
        sap(m, _batches(), faithful=True)
    with pytest.raises(ValueError, match="os_reference must be one of"):
        sap(m, _batches(), mode="os-0.2", os_reference="best")
    with pytest.raises(ValueError, match="no parameter named"):
        dense_masks(torch.nn.ReLU())


def test_os_first_trained_ranks_by_the_first_trained_model():
    from prunekit.training import train_batches

    batches = _batches(seed=6)
    r = sap(MLP(sizes=(6, 8, 3), seed=7), batches, mode="os-0.3", os_reference="first-trained",
            iterations=1, steps_per_iteration=4, lr=1e-2)  # fmt: skip
    ref_model = MLP(sizes=(6, 8, 3), seed=7)
    train_batches(ref_model, batches, steps=4, lr=1e-2, progress=False)
    # os by the first trained model = one magnitude step on that model (ranked by its own weights)
    expected = sap_step(ref_model, None, "lt-0.3")
    for n in expected:
        assert torch.equal(r.masks[n], expected[n]), n
    m0 = MLP(sizes=(6, 8, 3), seed=7)  # the default (θ₀) ranking picks other weights here
    by_init = sap_step(
        m0, None, "os-0.3", reference={k: v.detach().clone() for k, v in m0.named_parameters()}
    )
    assert any(not torch.equal(by_init[n], expected[n]) for n in expected)
