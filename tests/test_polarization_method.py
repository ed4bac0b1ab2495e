"""The polarization method (prunekit.training.polarization): consensus gates (a reconstruction) on
hooks, the measured ḡ and the cut on hand-set gates, pruned == gated with hard gates, the BN
polariser's clamp and cut, restoration after an exception, errors."""

from __future__ import annotations

import importlib

import pytest
import torch

from prunekit.errors import UnsupportedModelError
from prunekit.models.convnets import MLP, ConvNet, ResNetLite, count_params, group_widths
from prunekit.training.polarize import polarization_penalty

# the module (prunekit.training.polarization may also name the function once exported)
P = importlib.import_module("prunekit.training.polarization")

torch.set_num_threads(1)


def _images(values, seed=0):
    """One batch of constant 1x8x8 images (GAP = the value), labels 0."""
    x = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 8, 8).contiguous()
    return {"pixel_values": x, "labels": torch.zeros(len(values), dtype=torch.long)}


def _random_batches(n=3, b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(b, 1, 8, 8, generator=g),
            "labels": torch.randint(0, 10, (b,), generator=g),
        }
        for _ in range(n)
    ]


def _hand_set(gate, a, b):
    with torch.no_grad():
        gate.proj.weight.copy_(torch.as_tensor(a, dtype=torch.float32).view_as(gate.proj.weight))
        gate.proj.bias.copy_(torch.as_tensor(b, dtype=torch.float32))


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_measured_gates_and_the_cut_on_hand_set_gates():
    # conv.0's gate reads the image (1 channel): g_u = 1[a_u·GAP + b_u >= 0]. With GAP values
    # {2, 1, -1, -2}: unit 0 (a=1, b=0) is on for 2 of 4 -> ḡ = 0.5 (removed: ḡ must be > 0.5);
    # unit 1 (a=1, b=1.5) on for 3 of 4 -> 0.75 (kept); unit 2 (b=5) 1; unit 3 (b=-5) 0.
    m = ConvNet(widths=(4, 4, 4), pool_after=(0,), image_size=8, seed=0)
    with P.ConsensusGates(m, gate_scale=1.0) as gates:
        _hand_set(gates.gates["conv.0"], [1.0, 1.0, 0.0, 0.0], [0.0, 1.5, 5.0, -5.0])
        _hand_set(gates.gates["conv.1"], torch.zeros(4, 4), [5.0, -5.0, 5.0, 5.0])
        _hand_set(gates.gates["conv.2"], torch.zeros(4, 4), [5.0, 5.0, 5.0, 5.0])
        g = gates.measure([_images([2.0, 1.0]), _images([-1.0, -2.0])])
    assert g["conv.0"].tolist() == [0.5, 0.75, 1.0, 0.0]
    assert g["conv.1"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert _no_hooks(m) and not hasattr(m, P.GATES_ATTR)
    cut = P.cut_units(m, g, threshold=0.5)
    assert cut["kept"] == {"conv.0": (4, 2), "conv.1": (4, 3), "conv.2": (4, 4)}
    assert group_widths(m) == {"conv.0": 2, "conv.1": 3, "conv.2": 4}
    assert cut["kept_units"] == 9


def _hard_gates(gates, seed=0):
    """Constant gates (a = 0, b = ±5) with a random 0/1 pattern, at least one 1 per gate."""
    gen = torch.Generator().manual_seed(seed)
    pattern = {}
    for name, gate in gates.gates.items():
        on = torch.randint(0, 2, (gate.units,), generator=gen).bool()
        on[0] = True if gate.kind == "channel" else on[0]
        _hand_set(gate, torch.zeros_like(gate.proj.weight), torch.where(on, 5.0, -5.0))
        pattern[name] = on.float()
    return pattern


@pytest.mark.parametrize(
    "make, units",
    [
        (lambda: ConvNet(widths=(4, 6, 5), pool_after=(0,), image_size=8, seed=1), "channels"),
        (lambda: ResNetLite(widths=(4, 6, 8), seed=1), "channels"),
        (lambda: ResNetLite(blocks=3, widths=(4, 6, 8), seed=1), "blocks"),
        (lambda: MLP(sizes=(64, 7, 5, 10), seed=1), "channels"),
    ],
)
def test_pruned_network_equals_the_gated_one_with_hard_gates(make, units):
    m = make()
    calib = _random_batches(n=1, seed=2)
    m.eval()
    with P.ConsensusGates(m, units, gate_scale=1.0) as gates:
        pattern = _hard_gates(gates, seed=3)
        with torch.no_grad():
            gated = m(**calib[0]).logits
        measured = gates.measure(calib)
    for name, on in pattern.items():
        assert torch.equal(measured[name], on)
    before = count_params(m)
    cut = P.cut_units(m, measured, units=units, threshold=0.5)
    with torch.no_grad():
        pruned = m(**calib[0]).logits
    torch.testing.assert_close(pruned, gated, atol=1e-5, rtol=1e-5)
    assert count_params(m) < before
    if units == "blocks":
        assert cut["blocks_removed"] == [n for n, on in pattern.items() if not bool(on.any())]


def test_restored_after_an_exception(monkeypatch):
    mod = P
    m = ConvNet(widths=(4, 4), pool_after=(0,), image_size=8, seed=0)
    x = _random_batches(n=1)[0]
    m.eval()
    with torch.no_grad():
        ref = m(**x).logits
    state = {k: v.clone() for k, v in m.state_dict().items()}

    def boom(*a, **kw):
        m(**x)  # a forward through the gates, then a failure
        raise RuntimeError("boom")

    monkeypatch.setattr(mod, "train_batches", boom)
    with pytest.raises(RuntimeError, match="boom"):
        P.polarization(m, [x], steps=1)
    assert _no_hooks(m) and not hasattr(m, P.GATES_ATTR)
    assert set(m.state_dict()) == set(state)
    with torch.no_grad():
        assert torch.equal(m(**x).logits, ref)
    with pytest.raises(RuntimeError, match="inside"), P.ConsensusGates(m):
        raise RuntimeError("inside")
    assert _no_hooks(m) and not hasattr(m, P.GATES_ATTR)


def test_gate_loss_terms_hand_worked():
    # two units with ḡ = (1, 0): budget λ_s(0.5 − (1 − 0.25))² = 0.0625·2 = 0.125;
    # polariser λ_p[t·1 − (0.5 + 0.5)] = 1e-1·(1.2 − 1) = 0.02
    m = MLP(sizes=(4, 2, 3))
    with P.ConsensusGates(m, sparsity=0.25, lam_s=2.0, lam_p=0.1, t=1.2, gate_scale=1.0) as gates:
        _hand_set(gates.gates["hidden.0"], torch.zeros(2, 4), [5.0, -5.0])
        m(pixel_values=torch.randn(3, 4))
        terms = gates.loss_terms()
    assert terms["budget"].item() == pytest.approx(0.125)
    assert terms["polarization"].item() == pytest.approx(0.02)


def test_gates_train_through_the_trainer_and_report():
    m = ConvNet(widths=(4, 6, 5), pool_after=(0,), image_size=8, seed=0)
    r = P.polarization(m, _random_batches(n=4), steps=30, lr=1e-2, sparsity=0.5)
    assert r.label == "consensus-gating (reconstruction)" and r.threshold == 0.5
    assert _no_hooks(m) and not hasattr(m, P.GATES_ATTR)
    widths = group_widths(m)
    assert {n: a for n, (_, a) in r.kept.items()} == widths
    assert r.params_after == count_params(m) and r.flops_after < r.flops_before
    assert r.kept_units == sum(widths.values()) < r.total_units
    assert {"budget", "polarization"} == set(r.terms) and len(r.losses) == 30


def test_bn_polariser_clamps_and_cuts_below_the_threshold():
    m = ConvNet(widths=(4, 6, 5), pool_after=(0,), image_size=8, seed=0)
    r = P.polarization(m, _random_batches(n=4), variant="bn", steps=10, lr=5e-2, lam_p=1e-2, threshold=0.45)
    scores = torch.cat([torch.tensor(v) for v in r.scores.values()])
    assert bool(((scores >= 0) & (scores <= 1)).all())  # clamped after every step
    for name, vals in r.scores.items():
        v = torch.tensor(vals)
        assert r.kept[name][1] == max(1, int((v >= 0.45).sum()))
    assert r.label.startswith("polarization regularizer")


def test_keep_count_is_a_global_top_k():
    m = ConvNet(widths=(4, 4), pool_after=(0,), image_size=8, seed=0)
    scores = {"conv.0": torch.tensor([0.9, 0.1, 0.8, 0.2]), "conv.1": torch.tensor([0.3, 0.7, 0.05, 0.6])}
    cut = P.cut_units(m, scores, keep_count=4, strict=False)
    assert cut["kept"] == {"conv.0": (4, 2), "conv.1": (4, 2)}  # 0.9, 0.8 | 0.7, 0.6


def test_errors():
    m = ConvNet(widths=(4, 4), pool_after=(0,), image_size=8)
    b = _random_batches(n=1)
    with pytest.raises(ValueError, match="variant must be one of"):
        P.polarization(m, b, variant="magnitude")
    with pytest.raises(UnsupportedModelError, match="units='blocks' needs a ResNetLite"):
        P.ConsensusGates(m, "blocks")
    with pytest.raises(ValueError, match="units='blocks' needs 'gates'"):
        P.polarization(m, b, variant="bn", units="blocks")
    with pytest.raises(UnsupportedModelError, match="has none \\(use variant='gates'\\)"):
        P.polarization(MLP(sizes=(64, 4, 10)), b, variant="bn")
    with pytest.raises(ValueError, match="sparsity must be in \\[0, 1\\)"):
        P.polarization(m, b, sparsity=1.0)
    with pytest.raises(ValueError, match="keep_count must be in \\[1, 8\\]"):
        P.cut_units(m, {"conv.0": torch.ones(4), "conv.1": torch.ones(4)}, keep_count=9)
    with pytest.raises(UnsupportedModelError, match="not one of prunekit's small networks"):
        P.polarization(torch.nn.Linear(2, 2), b)
    with P.ConsensusGates(m), pytest.raises(ValueError, match="already holds consensus gates"):
        P.ConsensusGates(m)
    assert _no_hooks(m)


def _plain_train(model, batches, steps, lr, extra, after_step=None):
    """A hand-written loop with the Trainer's AdamW, linear decay and grad clipping 1."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    model.train()
    for s in range(steps):
        out = model(**batches[s % len(batches)])
        loss = out.loss + sum(extra().values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if after_step is not None:
            after_step()
        sched.step()
        opt.zero_grad()


def test_gate_loss_and_bn_clamp_give_the_same_result_in_a_plain_loop_and_the_trainer():
    from prunekit.training import train_batches

    batches = _random_batches(n=3, seed=4)
    a = ConvNet(widths=(4, 6), pool_after=(0,), image_size=8, seed=3)
    b = ConvNet(widths=(4, 6), pool_after=(0,), image_size=8, seed=3)
    with P.ConsensusGates(a, sparsity=0.5) as ga, P.ConsensusGates(b, sparsity=0.5) as gb:
        train_batches(a, batches, steps=4, lr=5e-2, loss_fn=ga.loss_fn, progress=False)
        _plain_train(b, batches, 4, 5e-2, gb.loss_terms)
        for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=n)
        assert any("consensus_gates" in n for n, _ in a.named_parameters())  # the gates trained too
    # the BN polariser: penalty + clamp after every step
    a = ConvNet(widths=(4, 6), pool_after=(0,), image_size=8, seed=3)
    b = ConvNet(widths=(4, 6), pool_after=(0,), image_size=8, seed=3)
    gammas = {}
    for m in (a, b):
        gs = [m.bns[0].weight, m.bns[1].weight]
        with torch.no_grad():
            for g in gs:
                g.fill_(0.5)
        gammas[id(m)] = gs

    def pen(m):
        return lambda *args: {"p": polarization_penalty(gammas[id(m)], t=1.4, lam=0.5)}

    train_batches(
        a, batches, steps=4, lr=0.2, loss_fn=pen(a), callbacks=[P.ClampBN(gammas[id(a)])], progress=False
    )
    _plain_train(b, batches, 4, 0.2, pen(b), after_step=P.ClampBN(gammas[id(b)]))
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5, msg=n)
    g = torch.cat([x.detach() for x in gammas[id(a)]])
    assert bool(((g >= 0) & (g <= 1)).all()) and bool(((g == 0) | (g == 1)).any())  # the clamp acted


def test_layer_budget_hand_worked():
    # two gates, ḡ = (1, 1) and (0, 0), target sparsity 0.5: the global budget (mean 0.5 − 0.5)² = 0;
    # per layer: ((1 − 0.5)² + (0 − 0.5)²) / 2 = 0.25
    m = MLP(sizes=(4, 2, 2, 3))
    for budget, want in (("global", 0.0), ("layer", 0.25)):
        with P.ConsensusGates(m, sparsity=0.5, gate_scale=1.0, budget=budget) as gates:
            _hand_set(gates.gates["hidden.0"], torch.zeros(2, 4), [5.0, 5.0])
            _hand_set(gates.gates["hidden.1"], torch.zeros(2, 2), [-5.0, -5.0])
            m(pixel_values=torch.randn(3, 4))
            assert gates.loss_terms()["budget"].item() == pytest.approx(want)
    with pytest.raises(ValueError, match="budget must be one of"):
        P.ConsensusGates(m, budget="block")
    assert not hasattr(m, P.GATES_ATTR)
