"""PreCropping (a reconstruction, spec training-aware.md §8): the bounded log least-squares width solve
on hand-worked chains, residual-tied groups, the budget, v2 densities, the model left unchanged,
errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunekit.errors import UnsupportedModelError
from prunekit.models import convnets as C
from prunekit.training import PreCrop, precrop, precrop_and_train
from prunekit.training.precrop import nnls, solve_alphas

CHAIN = {"l1": (None, "a"), "l2": ("a", "b"), "l3": ("b", None)}


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(n, 1, 28, 28, generator=g),
        "labels": torch.randint(0, 10, (n,), generator=g),
    }


def test_chain_exactly_recoverable():
    """α_a = 1/2, α_b = 1/4 give d = (1/2, 1/8, 1/4): every residual can be 0, so the solve returns them."""
    a = solve_alphas(CHAIN, {"l1": 0.5, "l2": 0.125, "l3": 0.25})
    assert a["a"] == pytest.approx(0.5, abs=1e-9) and a["b"] == pytest.approx(0.25, abs=1e-9)


def test_chain_with_the_bound_active():
    """d = (1, 1, 1/4), c = log 4. Unbounded: x_a + (x_a + x_b) = 0 and (x_a + x_b) + (x_b + c) = 0 give
    x_a = c/3 > 0, so under log α <= 0: x_a = 0 and x_b minimises x_b² + (x_b + c)², x_b = −c/2: α_b = 1/2.
    With alpha_max = 2 (log 2 > c/3) the unbounded optimum α_a = 4^(1/3), α_b = 4^(−2/3) is allowed."""
    d = {"l1": 1.0, "l2": 1.0, "l3": 0.25}
    a = solve_alphas(CHAIN, d)
    assert a["a"] == pytest.approx(1.0, abs=1e-9) and a["b"] == pytest.approx(0.5, abs=1e-9)
    w = solve_alphas(CHAIN, d, alpha_max=2.0)
    assert w["a"] == pytest.approx(4 ** (1 / 3), abs=1e-9) and w["b"] == pytest.approx(
        4 ** (-2 / 3), abs=1e-9
    )
    # alpha_max = 1.2 < 4^(1/3): the bound binds at 1.2, x_b = −(log 1.2 + c)/2
    v = solve_alphas(CHAIN, d, alpha_max=1.2)
    assert v["a"] == pytest.approx(1.2, abs=1e-9)
    assert v["b"] == pytest.approx(math.exp(-(math.log(1.2) + math.log(4)) / 2), abs=1e-9)


def test_residual_tied_layers_share_one_alpha():
    """A stem and a block's conv2 both write stream s, the block's conv1 and the FC read it: one α_s.
    d = (1/2, 1/4, 1/4, 1/2) is met exactly by α_s = α_i = 1/2."""
    layers = {"stem": (None, "s"), "conv1": ("s", "i"), "conv2": ("i", "s"), "fc": ("s", None)}
    a = solve_alphas(layers, {"stem": 0.5, "conv1": 0.25, "conv2": 0.25, "fc": 0.5})
    assert set(a) == {"s", "i"}
    assert a["s"] == pytest.approx(0.5, abs=1e-9) and a["i"] == pytest.approx(0.5, abs=1e-9)


def test_resnet_streams_have_one_width_everywhere():
    m = C.ResNetLite(stages=2, blocks=2, widths=(8, 16))
    narrow, rep = precrop(m, _batch(), density=0.3, score="snip")
    assert set(rep.alphas) == set(C.groups(m))  # one α per group, not per layer
    for s in range(2):
        w = rep.widths_after[f"stream.{s}"]
        for k, blk in narrow.stages[s].items():
            assert blk.conv2.out_channels == w and blk.bn2.num_features == w, (s, k)
    assert narrow.stem.out_channels == rep.widths_after["stream.0"]
    assert narrow(**_batch(2)).logits.shape == (2, 10)


def test_v2_mlp_hand_worked():
    """MLP 8-8-8-8: three layers of 64 weights, so v2 gives d = 1/4 each. The symmetric solve minimises
    2(x − b)² + (2x − b)², x = 2b/3: α = (1/4)^(2/3) ≈ 0.397, width round(8·0.397) = 3 without the
    budget shift."""
    m = C.MLP(sizes=(8, 8, 8, 8))
    x = {"pixel_values": torch.randn(2, 8), "labels": torch.tensor([0, 1])}
    narrow, rep = precrop(m, x, density=0.25, mode="v2", match_budget=False)
    assert rep.densities == pytest.approx(
        {"layers.0.weight": 0.25, "layers.1.weight": 0.25, "layers.2.weight": 0.25}
    )
    for g in ("hidden.0", "hidden.1"):
        assert rep.alphas_solved[g] == pytest.approx(0.25 ** (2 / 3), abs=1e-9)
    assert narrow.arch()["sizes"] == (8, 3, 3, 8) and rep.score is None
    # with the shift: at most 48 weights. Both groups have the same α and width, so they move together:
    # widths (3, 3) keep 8·3 + 3·3 + 3·8 = 57 > 48, (2, 2) keep 16 + 4 + 16 = 36
    narrow, rep = precrop(m, x, density=0.25, mode="v2")
    assert rep.prunable_target == 48 and rep.prunable_after == 36 and narrow.arch()["sizes"] == (8, 2, 2, 8)


def test_v2_densities_meet_the_budget():
    m = C.ConvNet(widths=(8, 16, 16, 16))
    _, rep = precrop(m, _batch(), density=0.1, mode="v2")
    counts = {
        f"{n}.weight": mod.weight.numel()
        for n, mod in m.named_modules()
        if isinstance(mod, (nn.Conv2d, nn.Linear))
    }
    assert sum(rep.densities[n] * counts[n] for n in counts) == pytest.approx(
        0.1 * sum(counts.values()), rel=1e-9
    )
    assert max(rep.densities.values()) <= 1.0


@pytest.mark.parametrize("score", ["snip", "grasp", "synflow"])
def test_built_model_meets_the_budget_within_rounding(score):
    """Counted on the built network: at most density·N prunable weights, and less than one channel short
    (the next step of the common shift widens one group by one channel, which would exceed it)."""
    m = C.ConvNet(widths=(8, 16, 16, 16))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    narrow, rep = precrop(m, _batch(), density=0.2, score=score, synflow_rounds=5)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # the dense model is left as it was
    convs = [mod for mod in narrow.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    n_after = sum(mod.weight.numel() for mod in convs)
    n_dense = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear)))
    assert rep.prunable_after == n_after and rep.prunable_before == n_dense
    target = 0.2 * n_dense
    assert n_after <= target
    w = [1, *narrow.arch()["widths"]]
    side2 = narrow.side**2
    one_channel = [9 * w[i] + (9 * w[i + 2] if i + 2 < len(w) else 10 * side2) for i in range(len(w) - 1)]
    assert target - n_after < max(one_channel)
    # v1: the global threshold keeps exactly round(density·N) weights
    counts = {
        f"{n}.weight": mod.weight.numel()
        for n, mod in m.named_modules()
        if isinstance(mod, (nn.Conv2d, nn.Linear))
    }
    kept = sum(rep.densities[n] * counts[n] for n in counts)
    if score != "synflow":
        assert kept == pytest.approx(round(0.2 * n_dense), abs=0.01)  # float32 means
    assert rep.params_after == C.count_params(narrow) and rep.macs_after < rep.macs_before


def test_layer_collapse_is_floored_and_built():
    """At a tiny density SynFlow may empty no layer but SNIP can: every group still keeps >= 1 channel."""
    m = C.ConvNet(widths=(4, 4, 4, 4))
    narrow, rep = precrop(m, _batch(), density=0.005, score="snip")
    assert min(rep.widths_after.values()) >= 1
    assert narrow(**_batch(2)).logits.shape == (2, 10)


def test_nnls_against_scipy():
    scipy_opt = pytest.importorskip("scipy.optimize")
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        A, b = (
            torch.randn(9, 5, generator=g, dtype=torch.float64),
            torch.randn(9, generator=g, dtype=torch.float64),
        )
        ref, _ = scipy_opt.nnls(A.numpy(), b.numpy())
        torch.testing.assert_close(nnls(A, b), torch.from_numpy(ref), atol=1e-9, rtol=0)


def test_registry_call_equals_function():
    m = C.ConvNet(widths=(4, 8, 8, 8))
    a, ra = PreCrop(density=0.3, score="grasp")(m, _batch())
    b, rb = precrop(m, _batch(), density=0.3, score="grasp")
    assert ra.widths_after == rb.widths_after
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_precrop_and_train_runs_the_trainer():
    m = C.ConvNet(widths=(4, 4, 4, 4))
    batches = [_batch(4, s) for s in range(2)]
    narrow, rep, res = precrop_and_train(m, batches, steps=2, density=0.5)
    assert (
        res.steps == 2
        and len(res.losses) == 2
        and narrow.arch()["widths"] == tuple(rep.widths_after[f"conv.{i}"] for i in range(4))
    )


def test_errors():
    m = C.ConvNet(widths=(4, 4, 4, 4))
    b = _batch(2)
    with pytest.raises(ValueError, match=r"density .* must be in \(0, 1\]: 0"):
        precrop(m, b, density=0)
    with pytest.raises(ValueError, match=r"density .* must be in \(0, 1\]: 1.5"):
        precrop(m, b, density=1.5)
    with pytest.raises(ValueError, match=r"mode must be one of \['v1', 'v2'\]; got 'v3'"):
        precrop(m, b, mode="v3")
    with pytest.raises(
        ValueError, match=r"score must be one of \['snip', 'grasp', 'synflow'\]; got 'magnitude'"
    ):
        precrop(m, b, score="magnitude")
    with pytest.raises(ValueError, match="alpha_max must be a number > 0"):
        precrop(m, b, alpha_max=0)
    with pytest.raises(ValueError, match="batch must hold 'pixel_values' and 'labels'"):
        precrop(m, {"x": 1})
    with pytest.raises(
        UnsupportedModelError, match="Sequential is not one of prunekit's small vision networks"
    ):
        precrop(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), b)
    with pytest.raises(ValueError, match="density of 'l2' must be in"):
        solve_alphas(CHAIN, {"l1": 0.5, "l2": 0.0, "l3": 0.5})
