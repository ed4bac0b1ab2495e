"""Layers-Lottery (Jordao et al., Alg. 2; no official code, spec training-aware.md §9): which blocks a
hand-made score removes, the direction per criterion, the rebuilt network's θ₀, per-stage
normalisation, errors."""

from __future__ import annotations

import importlib

import pytest
import torch

from prunekit.errors import UnsupportedModelError
from prunekit.models import convnets as C
from prunekit.training import LayerLottery, layer_lottery, layer_lottery_and_train
from prunekit.training import init_scores as S

# the module (prunekit.training.layer_lottery is the function), for monkeypatching its SCORES table
LL = importlib.import_module("prunekit.training.layer_lottery")


def _net(**kw):
    return C.ResNetLite(**{"stages": 3, "blocks": 2, "widths": (4, 8, 8), **kw})


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(n, 1, 28, 28, generator=g),
        "labels": torch.randint(0, 10, (n,), generator=g),
    }


def _hand_scores(values):
    """A score function giving every weight of block ``stages.s.k`` the value ``values["s.k"]`` (others 0)."""

    def fn(model, x, y):
        out = {}
        for name, w in S.prunable_weights(model).items():
            parts = name.split(".")
            key = f"{parts[1]}.{parts[2]}" if parts[0] == "stages" else None
            out[name] = torch.full_like(w, float(values.get(key, 0.0)))
        return out

    return fn


# removable in stages=3, blocks=2: block.0.0, block.0.1, block.1.1, block.2.1 (x.0 of stages 1, 2 project)
VALUES = {"0.0": 5.0, "0.1": 1.0, "1.0": -9.0, "1.1": 3.0, "2.0": 99.0, "2.1": 2.0}


@pytest.mark.parametrize(
    ("score", "expected"),
    [("snip", ["block.0.1", "block.2.1"]), ("grasp", ["block.0.0", "block.1.1"])],
)
def test_hand_made_scores_pick_the_blocks(monkeypatch, score, expected):
    """SNIP removes the lowest block means (1, 2), GraSP the highest (5, 3); block.1.0 (-9) and block.2.0
    (99) have projection shortcuts and are never candidates."""
    monkeypatch.setitem(LL.SCORES, score, _hand_scores(VALUES))
    m = _net()
    net, rep = layer_lottery(m, _batch(), remove=2, score=score)
    assert rep.removed == expected and rep.direction == ("lowest" if score == "snip" else "highest")
    assert set(rep.scores) == {"block.0.0", "block.0.1", "block.1.1", "block.2.1"}
    assert rep.scores["block.0.0"] == pytest.approx(5.0)
    assert sorted(C.blocks(net)) == sorted(set(C.blocks(m)) - set(expected))


def test_kept_blocks_inherit_theta0_exactly():
    m = _net()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    net, rep = layer_lottery(m, _batch(), remove=3, score="grasp")
    assert len(rep.removed) == 3
    dense = m.state_dict()
    for k, v in dense.items():
        assert torch.equal(v, before[k]), k  # the dense model is left as it was
    kept = net.state_dict()
    gone = {f"stages.{b.split('.')[1]}.{b.split('.')[2]}." for b in rep.removed}
    assert set(kept) == {k for k in dense if not any(k.startswith(g) for g in gone)}
    for k, v in kept.items():
        assert torch.equal(v, dense[k]) and v.data_ptr() != dense[k].data_ptr(), k  # equal, not shared
    # the same network as built from the seed without those blocks (ResNetLite draws dropped blocks too)
    rebuilt = _net(dropped=[b.split(".", 1)[1] for b in rep.removed])
    for k, v in rebuilt.state_dict().items():
        assert torch.equal(v, kept[k]), k
    x = _batch(2)["pixel_values"]
    m.eval(), net.eval(), rebuilt.eval()
    torch.testing.assert_close(net(x).logits, rebuilt(x).logits)
    assert rep.params_after == C.count_params(net) < rep.params_before and rep.macs_after < rep.macs_before


@pytest.mark.parametrize("score", ["snip", "grasp"])
def test_real_scores_direction(score):
    """Block means recomputed here from the per-weight scores (conv1 and conv2 of each removable block);
    SNIP removes the lowest mean, GraSP the highest."""
    m = _net()
    b = _batch()
    fn = S.snip if score == "snip" else S.grasp
    per = fn(m, b["pixel_values"], b["labels"])
    means = {}
    for name in ("0.0", "0.1", "1.1", "2.1"):
        s, k = name.split(".")
        flat = torch.cat([per[f"stages.{s}.{k}.conv{i}.weight"].flatten().double() for i in (1, 2)])
        means[f"block.{name}"] = flat.mean().item()
    _, rep = layer_lottery(m, b, remove=1, score=score)
    pick = min(means, key=means.get) if score == "snip" else max(means, key=means.get)
    assert rep.removed == [pick]
    assert rep.raw_scores == pytest.approx(means, rel=1e-9)


def test_per_stage_norm_changes_the_ranking(monkeypatch):
    """Stage 0: 10 and 30 (mean |.| 20 -> 0.5, 1.5); stage 1: 2 -> 1; stage 2: 1 -> 1. SNIP removes the
    lowest: raw block.2.1 (1), normalised block.0.0 (0.5)."""
    monkeypatch.setitem(LL.SCORES, "snip", _hand_scores({"0.0": 10, "0.1": 30, "1.1": 2, "2.1": 1}))
    m = _net()
    _, raw = layer_lottery(m, _batch(), remove=1, score="snip")
    _, norm = layer_lottery(m, _batch(), remove=1, score="snip", per_stage_norm=True)
    assert raw.removed == ["block.2.1"] and norm.removed == ["block.0.0"]
    assert norm.scores == pytest.approx(
        {"block.0.0": 0.5, "block.0.1": 1.5, "block.1.1": 1.0, "block.2.1": 1.0}
    )


def test_reduce_sum(monkeypatch):
    """Mean vs sum: block.0.0 has 2·(4·4·9) = 288 weights, block.2.1 2·(8·8·9) = 1152; with values 2 and
    1 the means rank block.2.1 lowest, the sums (576 vs 1152) block.0.0."""
    monkeypatch.setitem(LL.SCORES, "snip", _hand_scores({"0.0": 2, "0.1": 5, "1.1": 5, "2.1": 1}))
    m = _net()
    assert layer_lottery(m, _batch(), remove=1, score="snip")[1].removed == ["block.2.1"]
    assert layer_lottery(m, _batch(), remove=1, score="snip", reduce="sum")[1].removed == ["block.0.0"]


def test_registry_and_training_helper():
    m = _net()
    a, ra = LayerLottery(remove=1, score="snip")(m, _batch())
    b, rb = layer_lottery(m, _batch(), remove=1, score="snip")
    assert ra.removed == rb.removed and list(a.state_dict()) == list(b.state_dict())
    batches = [_batch(4, s) for s in range(2)]
    net, _, res = layer_lottery_and_train(m, batches, steps=2, remove=1)
    assert res.steps == 2 and len(C.blocks(net)) == len(C.blocks(m)) - 1


def test_errors():
    b = _batch(2)
    with pytest.raises(UnsupportedModelError, match=r"needs a residual network .*got ConvNet"):
        layer_lottery(C.ConvNet(widths=(4, 4, 4, 4)), b)
    with pytest.raises(UnsupportedModelError, match=r"needs a residual network .*got MLP"):
        layer_lottery(C.MLP(), b)
    only_projection = C.ResNetLite(stages=2, blocks=1, widths=(4, 8), dropped=["0.0"])
    with pytest.raises(UnsupportedModelError, match="no removable residual block"):
        layer_lottery(only_projection, b)
    with pytest.raises(ValueError, match=r"remove \(blocks to remove\) must be an int in \[0, 4\].*got 5"):
        layer_lottery(_net(), b, remove=5)
    with pytest.raises(ValueError, match=r"score must be one of \['grasp', 'snip'\].*got 'synflow'"):
        layer_lottery(_net(), b, score="synflow")
    with pytest.raises(ValueError, match="reduce must be 'mean' or 'sum'; got 'max'"):
        layer_lottery(_net(), b, reduce="max")
