"""PQ index and SAP (Diao et al., ICLR 2023): hand-worked values, the effective-support identities
of spec §6, and a hand-worked prune step with ties at the pivot."""

from __future__ import annotations

import math

import pytest
import torch

from prunekit.training.sparsity_index import (
    PruneMode,
    parse_prune_mode,
    pq_index,
    pqi_table,
    sap_keep_count,
    sap_prune_step,
)

W = [3.0, 1.0, 0.5, 0.25, 2.0]


def test_effective_support_identities():
    w = torch.tensor(W)
    # p=1, q=2: (sum|w|)^2 / sum w^2 = 6.75^2 / 14.3125 = 3.18... -> 4
    l1, l2sq = sum(abs(x) for x in W), sum(x * x for x in W)
    assert math.ceil(l1**2 / l2sq) == 4
    assert sap_keep_count(w, p=1.0, q=2.0, eta=0.0) == 4
    # p=1/2, q=1: (sum sqrt|w|)^2 / sum|w| = 5.3534^2 / 6.75 = 4.25... -> 5
    s = sum(math.sqrt(abs(x)) for x in W)
    assert math.ceil(s**2 / l1) == 5
    assert sap_keep_count(w, p=0.5, q=1.0, eta=0.0) == 5
    # eta shrinks the bound by (1+eta)^{-q/(q-p)}: with eta=1, p=1/2, q=1: 4.2457 / 4 -> 2
    assert sap_keep_count(w, p=0.5, q=1.0, eta=1.0) == math.ceil(s**2 / l1 / 4)


def test_constant_and_one_sparse():
    assert pq_index(torch.full((7,), -2.5), 0.5, 1.0).item() == pytest.approx(0.0, abs=1e-12)
    # 1-sparse, d = 4, p = 1/2, q = 1: 1 - 4^{1 - 2} = 0.75
    assert pq_index(torch.tensor([0.0, 0.0, -5.0, 0.0]), 0.5, 1.0).item() == pytest.approx(0.75)
    # p = 1, q = 2: 1 - 4^{1/2 - 1} = 0.5
    assert pq_index(torch.tensor([0.0, 3.0, 0.0, 0.0]), 1.0, 2.0).item() == pytest.approx(0.5)
    # hand value: w = [1, 4], p=1/2, q=1: 1 - ((1 + 2)/2)^2 / (5/2) = 1 - 2.25/2.5 = 0.1
    assert pq_index(torch.tensor([1.0, 4.0]), 0.5, 1.0).item() == pytest.approx(0.1)


def test_mask_count_and_degenerate_cases():
    # masked entries are excluded: the unmasked [1, 1, 1] is constant
    w, m = torch.tensor([1.0, 100.0, 1.0, 1.0]), torch.tensor([True, False, True, True])
    assert pq_index(w, 0.5, 1.0, mask=m).item() == pytest.approx(0.0, abs=1e-12)
    # d = 3 (mask count, zeros included): 1-sparse -> 1 - 3^{-1}
    w, m = torch.tensor([0.0, 7.0, 0.0, 9.0]), torch.tensor([True, True, True, False])
    assert pq_index(w, 0.5, 1.0, mask=m).item() == pytest.approx(2 / 3)
    # d = 0 -> 0; all-zero unmasked (NaN in the official code) -> 0
    assert pq_index(w, 0.5, 1.0, mask=torch.zeros(4, dtype=torch.bool)).item() == 0.0
    assert pq_index(torch.zeros(5), 0.5, 1.0).item() == 0.0
    assert pq_index(w, 1.0, 1.0).item() == 0.0  # p = q


def test_scopes():
    a = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 4.0]])
    b = torch.tensor([2.0, 0.0, 0.0, 0.0])
    neuron = pq_index([a, b], 0.5, 1.0, scope="neuron")
    assert torch.allclose(neuron[0], torch.tensor([0.0, 2 / 3], dtype=torch.float64))
    assert torch.allclose(neuron[1], torch.tensor([0.75], dtype=torch.float64))
    layer = pq_index({"a": a, "b": b}, 0.5, 1.0, scope="layer")
    # a: [1,1,1,0,0,4]: mean sqrt|w| = 5/6, mean|w| = 7/6 -> 1 - (25/36)/(7/6) = 17/42
    x = [1.0, 1.0, 1.0, 0.0, 0.0, 4.0]
    ref = 1 - (sum(math.sqrt(v) for v in x) / 6) ** 2 / (sum(x) / 6)
    assert ref == pytest.approx(17 / 42)
    assert layer["a"].item() == pytest.approx(ref)
    assert layer["b"].item() == pytest.approx(0.75)
    # global: all 10 entries together
    xs = [*x, 2.0, 0.0, 0.0, 0.0]
    ref = 1 - (sum(math.sqrt(v) for v in xs) / 10) ** 2 / (sum(xs) / 10)
    assert pq_index([a, b], 0.5, 1.0).item() == pytest.approx(ref)


def test_bad_values():
    w = torch.ones(3)
    with pytest.raises(ValueError, match="0 < p <= q"):
        pq_index(w, 2.0, 1.0)
    with pytest.raises(ValueError, match="p must be"):
        pq_index(w, 0.0, 1.0)
    with pytest.raises(ValueError, match="scope"):
        pq_index(w, scope="row")
    with pytest.raises(ValueError, match="shape"):
        pq_index(w, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="0 < p < q"):
        sap_keep_count(w, 1.0, 1.0)
    with pytest.raises(ValueError, match="eta"):
        sap_keep_count(w, 0.5, 1.0, eta=-0.1)
    with pytest.raises(ValueError, match="beta"):
        sap_prune_step(w, torch.ones(3, dtype=torch.bool), beta=1.0)


# d = 8; (sum|w|)^2 / sum w^2 = 9.8^2 / 26.8 = 3.58 -> m = 4 (p=1, q=2, eta=0)
V = [0.5, 3.0, 0.1, 0.5, 4.0, 0.2, 1.0, 0.5]


def test_prune_step_hand_worked_ties_survive():
    w = torch.tensor(V)
    assert sap_keep_count(w, 1.0, 2.0) == 4
    m = torch.ones(8, dtype=torch.bool)
    # gamma = 0.8: ratio = 0.8 * (1 - 4/8) = 0.4, n = floor(3.2) = 3; sorted |w| = [.1 .2 .5 .5 .5 1 3 4]
    # pivot = sorted[3] = 0.5; only |w| < 0.5 go: 0.1 and 0.2 (the three 0.5s tie with the pivot)
    new = sap_prune_step(w, m, p=1.0, q=2.0, eta=0.0, gamma=0.8)
    assert new.tolist() == [True, True, False, True, True, False, True, True]
    # gamma = 5: ratio clamped to beta = 0.9, n = floor(7.2) = 7, pivot = 4.0: all but the 4.0 go
    new = sap_prune_step(w, m, p=1.0, q=2.0, gamma=5.0)
    assert new.tolist() == [False, False, False, False, True, False, False, False]
    # gamma = 0: nothing pruned
    assert sap_prune_step(w, m, p=1.0, q=2.0, gamma=0.0).all()


def test_prune_step_masked_entries_and_scopes():
    # two masked entries (pruned earlier, zeroed) are ignored: the unmasked values are V
    w = torch.tensor([*V, 0.0, 0.0])
    m = torch.tensor([True] * 8 + [False, False])
    new = sap_prune_step(w, m, p=1.0, q=2.0, gamma=0.8)
    assert new.tolist() == [True, True, False, True, True, False, True, True, False, False]
    # global over two tensors holding V between them: the same cut
    a, b = torch.tensor(V[:3]), torch.tensor(V[3:])
    ones = [torch.ones(3, dtype=torch.bool), torch.ones(5, dtype=torch.bool)]
    ga, gb = sap_prune_step([a, b], ones, p=1.0, q=2.0, gamma=0.8)
    assert ga.tolist() + gb.tolist() == [True, True, False, True, True, False, True, True]
    # neuron scope: row 0 is V, row 1 constant (I = 0, m = d, nothing pruned)
    rows = torch.stack([torch.tensor(V), torch.ones(8)])
    new = sap_prune_step(rows, torch.ones(2, 8, dtype=torch.bool), p=1.0, q=2.0, gamma=0.8, scope="neuron")
    assert new[0].tolist() == [True, True, False, True, True, False, True, True]
    assert new[1].all()
    # layer scope: each tensor on its own; the constant one keeps everything
    la, lb = sap_prune_step(
        {"a": torch.tensor(V), "b": torch.full((4,), 2.0)},
        {"a": torch.ones(8, dtype=torch.bool), "b": torch.ones(4, dtype=torch.bool)},
        p=1.0,
        q=2.0,
        gamma=0.8,
        scope="layer",
    ).values()
    assert la.tolist() == [True, True, False, True, True, False, True, True] and lb.all()


def test_parse_prune_mode():
    assert parse_prune_mode("si-0.5-1-0-1") == PruneMode("si", p=0.5, q=1.0, eta=0.0, gamma=1.0)
    assert parse_prune_mode("si-0.5-1.0-0.001-1.2").eta == 0.001
    assert parse_prune_mode("lt-0.2") == PruneMode("lt", ratio=0.2)
    for bad in ("si-1-0.5-0-1", "si-0.5-1-0", "xx-0.2", "lt-1.5", "si-a-1-0-1"):
        with pytest.raises(ValueError, match=r"prune_mode|p < q"):
            parse_prune_mode(bad)


def test_pqi_table_on_tiny_llama():
    from tiny import llama

    model = llama()
    rows = pqi_table(model)
    names = [r["name"] for r in rows]
    linear = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    assert {f"{n}.weight" for n in linear} <= set(names)
    assert "model.embed_tokens.weight" in names and names[-1] == "global"
    assert not any("norm" in n for n in names)
    w = dict(model.named_parameters())["model.layers.0.mlp.up_proj.weight"].detach().double().abs()
    ref = 1 - w.sqrt().mean().item() ** 2 / w.mean().item()  # independent: the definition
    row = rows[names.index("model.layers.0.mlp.up_proj.weight")]
    assert row["pqi"] == pytest.approx(ref, rel=1e-6)
    assert all(0 < r["pqi"] < 1 for r in rows)
    assert rows[-1]["numel"] == sum(r["numel"] for r in rows[:-1])


def test_gaussian_matches_its_closed_form():
    """For w ~ N(0, σ²): E|w|^s = σ^s 2^{s/2} Γ((s+1)/2) / √π, so I_{½,1} = 1 − (E√|w|)² / E|w|
    = 1 − √2 Γ(3/4)² / (π √(2/π)) ≈ 0.1528, whatever σ."""
    e_half = 2**0.25 * math.gamma(0.75) / math.sqrt(math.pi)
    ref = 1 - e_half**2 / math.sqrt(2 / math.pi)
    assert ref == pytest.approx(0.1528, abs=1e-4)
    w = 3.0 * torch.randn(400_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert pq_index(w, 0.5, 1.0).item() == pytest.approx(ref, abs=2e-3)
