"""Polarization (Zhuang et al., NeurIPS 2020) and the consensus gates (reconstruction): values and
gradients by hand, the valley threshold on hand-made histograms, the gate's straight-through
gradient."""

from __future__ import annotations

import warnings

import pytest
import torch

from prunekit.training.polarize import (
    ConsensusGate,
    clamp_,
    gate_budget_penalty,
    gate_penalty,
    polarization_penalty,
    valley_threshold,
)


def test_penalty_value_by_hand():
    g1, g2 = torch.tensor([0.2, 0.8]), torch.tensor([0.5])
    # global mean 0.5; l1: layer 1: 1.2*1.0 - (0.3 + 0.3) = 0.6; layer 2: 1.2*0.5 - 0 = 0.6
    assert polarization_penalty([g1, g2], t=1.2, lam=1.0).item() == pytest.approx(1.2)
    assert polarization_penalty([g1, g2], t=1.2, lam=[1.0, 2.0]).item() == pytest.approx(1.8)
    assert polarization_penalty([g1, g2], t=1.2, lam=0.1).item() == pytest.approx(0.12)
    # l2: layer 1: 1.2 - (0.09 + 0.09) = 1.02; layer 2: 0.6
    assert polarization_penalty([g1, g2], t=1.2, lam=1.0, variant="l2").item() == pytest.approx(1.62)
    # alpha scales the mean: alpha = 0 -> t*sum|g| - sum|g| = 0.2 * 1.5
    assert polarization_penalty([g1, g2], t=1.2, lam=1.0, alpha=0.0).item() == pytest.approx(0.3)


def test_penalty_gradient_includes_the_global_mean():
    g1 = torch.tensor([0.1, 0.2], requires_grad=True)
    g2 = torch.tensor([0.9], requires_grad=True)
    r = polarization_penalty([g1, g2], t=1.2, lam=1.0)
    # mean 0.4; value 1.2*1.2 - (0.3 + 0.2 + 0.5) = 0.44
    assert r.item() == pytest.approx(0.44)
    r.backward()
    # dR/dg_j = t*sign(g_j) - sign(g_j - m) + (1/n) sum_i sign(g_i - m); sum of signs = -1, n = 3
    assert torch.allclose(g1.grad, torch.tensor([1.2 + 1 - 1 / 3] * 2))
    assert torch.allclose(g2.grad, torch.tensor([1.2 - 1 - 1 / 3]))
    # POLARIZATION_GRAD: the mean detached, no -1/3 term
    g1.grad = g2.grad = None
    polarization_penalty([g1, g2], t=1.2, lam=1.0, detach_mean=True).backward()
    assert torch.allclose(g1.grad, torch.tensor([2.2, 2.2])) and torch.allclose(g2.grad, torch.tensor([0.2]))


def test_penalty_bad_values_and_clamp():
    g = [torch.tensor([0.5, 1.5, -0.2])]
    with pytest.raises(ValueError, match="variant"):
        polarization_penalty(g, variant="l3")
    with pytest.raises(ValueError, match="2 values of lam for 1 layers"):
        polarization_penalty(g, lam=[1.0, 2.0])
    with pytest.raises(ValueError, match="t must be a finite number"):
        polarization_penalty(g, t=float("nan"))
    with pytest.raises(ValueError, match="gammas"):
        polarization_penalty([])
    clamp_(g)
    assert g[0].tolist() == [0.5, 1.0, 0.0]


def _values(counts: dict[int, int]) -> torch.Tensor:
    """Values placed at the centres of 100 bins on [0, 1], ``counts[bin]`` of each."""
    return torch.cat([torch.full((n,), (b + 0.5) / 100) for b, n in counts.items()])


def test_valley_threshold_hand_made_histograms():
    # counts 30, 5, 1, 0, 0, ... 40 at bin 95: diff = -25, -4, -1, 0, ...: the first i with
    # diff[i] <= 0 <= diff[i+1] is 2, so the threshold is the left edge of bin 3: 0.03
    v = _values({0: 30, 1: 5, 2: 1, 95: 40})
    assert valley_threshold(v) == pytest.approx(0.03)
    # 10, 2, 4, ...: the valley is bin 1 -> 0.01; split over two tensors, plus values outside [0, 1]
    v = _values({0: 10, 1: 2, 2: 4, 3: 1, 90: 20})
    assert valley_threshold([v[:7], torch.cat([v[7:], torch.tensor([-0.3, 1.7])])]) == pytest.approx(0.01)
    # no local minimum (strictly decreasing over all 100 bins): 0, as the official code
    assert valley_threshold(_values({b: 101 - b for b in range(100)})) == 0.0


def test_valley_threshold_warns_above_0_2():
    v = _values({b: 30 - b for b in range(25)} | {80: 50})  # falls to bin 24, empty from 25
    with pytest.warns(UserWarning, match="valley"):
        assert valley_threshold(v) == pytest.approx(0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        valley_threshold(_values({0: 30, 1: 5, 2: 1, 95: 40}))
    with pytest.raises(ValueError, match="bins"):
        valley_threshold(v, bins=1)


def test_gate_penalties_by_hand():
    gbar = torch.tensor([1.0, 0.0, 0.5, 1.0], requires_grad=True)
    # mean 0.625: 1.2*2.5 - (0.375 + 0.625 + 0.125 + 0.375) = 1.5
    assert gate_penalty(gbar, t=1.2).item() == pytest.approx(1.5)
    assert gate_penalty([gbar[:2], gbar[2:]], t=1.2, lam=1e-3).item() == pytest.approx(1.5e-3)
    assert gate_budget_penalty(gbar, sparsity=0.5).item() == pytest.approx(0.125**2)
    with pytest.raises(ValueError, match="sparsity"):
        gate_budget_penalty(gbar, sparsity=1.0)


def test_channel_gate_forward_and_straight_through_gradient():
    gate = ConsensusGate(3, kind="channel")
    assert gate.units == 3
    with torch.no_grad():
        gate.proj.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 2.0, 1.0], [-1.0, 0.0, 0.5]]))
        gate.proj.bias.copy_(torch.tensor([0.1, -3.0, 0.2]))
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2) / 10  # (B, C, H, W)
    c = torch.linspace(-1, 1, x.numel()).view_as(x)
    out = gate(x)
    # by hand: pooled = per-channel mean, z = W pooled + b, g = 1[z >= 0]
    pooled = x.mean(dim=(2, 3))
    z = pooled @ gate.proj.weight.detach().T + gate.proj.bias.detach()
    g = (z >= 0).float()
    assert 0 < g.sum() < g.numel()  # some gates open, some closed
    assert torch.equal(out, x * g[:, :, None, None])
    assert torch.equal(gate.gbar.detach(), g.mean(0))
    # straight through: dL/db_u = sum_b (sum_hw c*x)_{b,u} * s(1-s),  dL/dW_uc = ... * pooled_bc
    (out * c).sum().backward()
    s = torch.sigmoid(z)
    up = (c * x).sum(dim=(2, 3)) * s * (1 - s)  # (B, units)
    assert torch.allclose(gate.proj.bias.grad, up.sum(0), atol=1e-6)
    assert torch.allclose(gate.proj.weight.grad, up.T @ pooled, atol=1e-6)


def test_block_gate_and_gbar_gradient():
    gate = ConsensusGate(2, kind="block", init_bias=0.0)
    with torch.no_grad():
        gate.proj.weight.copy_(torch.tensor([[1.0, 0.0]]))
    x = torch.tensor([[1.0, 5.0], [-1.0, 5.0], [2.0, 0.0]])  # z = x[:, 0]: gates 1, 0, 1
    fx = torch.full_like(x, 10.0)
    y = gate(x, fx)
    assert torch.equal(y, torch.stack([x[0] + 10, x[1], x[2] + 10]))
    assert gate.gbar.shape == (1,) and gate.gbar.item() == pytest.approx(2 / 3)
    # d gbar / d b = mean_b s(1-s)(z_b)
    gate.gbar.sum().backward()
    s = torch.sigmoid(x[:, 0])
    assert gate.proj.bias.grad.item() == pytest.approx((s * (1 - s)).mean().item())
    # a fresh gate is open everywhere (the dense network)
    fresh = ConsensusGate(4, units=4)
    xx = torch.randn(5, 4, 3, 3)
    assert torch.equal(fresh(xx), xx)


def test_gate_bad_values():
    with pytest.raises(ValueError, match="kind"):
        ConsensusGate(3, kind="head")
    with pytest.raises(ValueError, match="one unit"):
        ConsensusGate(3, units=2, kind="block")
    with pytest.raises(ValueError, match=r"channel-first input \(B, 3"):
        ConsensusGate(3)(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="needs y"):
        ConsensusGate(3, kind="block")(torch.randn(2, 3))
