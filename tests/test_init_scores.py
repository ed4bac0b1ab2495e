"""Scores at initialisation (SNIP, GraSP, SynFlow), densities (PreCropping) and block scores
(Layers-Lottery): hand-worked gradients, an independent Hessian, SynFlow's conservation, exact
restoration of the model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.training.init_scores import (
    block_scores,
    global_masks,
    grasp,
    layer_densities,
    least_important,
    precrop_densities,
    prunable_weights,
    snip,
    synflow,
    synflow_mask,
)

W1 = [[1.0, 0.0], [0.5, -1.0]]
W2 = [[2.0, 1.0]]
X = torch.tensor([[1.0, 2.0]])
T = torch.tensor([[2.0]])


def half_mse(out, lab):
    return 0.5 * ((out - lab) ** 2).sum()


def two_layer(dtype=torch.float32) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)).to(dtype)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(W1))
        net[1].weight.copy_(torch.tensor(W2))
    return net


def test_snip_hand_worked():
    # h = W1 x = [1, -1.5]; y = W2 h = 0.5; r = y - t = -1.5
    # dL/dW2 = r h^T = [-1.5, 2.25]; dL/dW1 = (W2^T r) x^T = [[-3, -6], [-1.5, -3]]
    s = snip(two_layer(), X, T, loss_fn=half_mse)
    assert list(s) == ["0.weight", "1.weight"]
    assert torch.allclose(s["1.weight"], torch.tensor([[3.0, 2.25]]))
    assert torch.allclose(s["0.weight"], torch.tensor([[3.0, 0.0], [0.75, 3.0]]))
    # the same through a closure
    s2 = snip(two_layer(), closure=lambda m: half_mse(m(X), T))
    assert all(torch.equal(s[k], s2[k]) for k in s)


def _loss_of(theta: torch.Tensor) -> torch.Tensor:
    """The two-layer loss as a function of the flat parameter vector [W1 (4), W2 (2)]."""
    w1, w2 = theta[:4].view(2, 2), theta[4:].view(1, 2)
    return half_mse(X.double() @ w1.T @ w2.T, T.double())


def test_grasp_against_an_independent_hessian():
    theta = torch.tensor([*W1[0], *W1[1], *W2[0]], dtype=torch.float64)
    g = torch.autograd.functional.jacobian(_loss_of, theta)
    h = torch.autograd.functional.hessian(_loss_of, theta)  # (6, 6)
    ref = -theta * (h @ g)
    s = grasp(two_layer(torch.float64), X.double(), T.double(), loss_fn=half_mse, temperature=1.0)
    got = torch.cat([s["0.weight"].reshape(-1), s["1.weight"].reshape(-1)])
    assert torch.allclose(got, ref, atol=1e-12), (got, ref)
    assert ref.abs().sum() > 0


def test_grasp_temperature_divides_the_logits():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    a = grasp(net, x, y, temperature=200.0)
    b = grasp(net, closure=lambda m: nn.functional.cross_entropy(m(x) / 200.0, y))
    assert all(torch.allclose(a[k], b[k], rtol=1e-10, atol=1e-30) for k in a)
    with pytest.raises(ValueError, match="temperature"):
        grasp(net, x, y, temperature=0)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fn", [snip, grasp])
def test_data_scores_restore_the_model(fn):
    torch.manual_seed(0)
    net = BNNet().train()
    net.conv.weight.requires_grad_(False)  # a frozen weight is still scored, and stays frozen
    net.fc.bias.grad = torch.ones(4)
    before = _state(net)
    x, y = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 2, 3])
    s = fn(net, x, y)
    assert set(s) == {"conv.weight", "fc.weight"} and s["conv.weight"].abs().sum() > 0
    assert _same(net, before)  # BN running stats too
    assert net.training and net.bn.training
    assert not net.conv.weight.requires_grad and net.fc.weight.grad is None
    assert torch.equal(net.fc.bias.grad, torch.ones(4))


def test_synflow_conservation_and_closed_form():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False), nn.Linear(3, 2, bias=False)
    ).double()
    before = _state(net)
    s = synflow(net, (4,))
    ws = [net[0].weight, net[2].weight, net[3].weight]
    r = (
        torch.ones(1, 2, dtype=torch.float64)
        @ ws[2].abs()
        @ ws[1].abs()
        @ ws[0].abs()
        @ torch.ones(4, 1).double()
    )
    sums = torch.stack([v.sum() for v in s.values()])
    assert torch.allclose(sums, r.reshape(1).expand(3), rtol=1e-12), (sums, r)
    # a single layer's scores by hand: |w| * (1^T |W3||W2|)_i * (|W1| 1)... for the middle layer
    left = torch.ones(1, 2, dtype=torch.float64) @ ws[2].abs()  # (1, 3)
    right = ws[0].abs() @ torch.ones(4, 1, dtype=torch.float64)  # (5, 1)
    assert torch.allclose(s["2.weight"], ws[1].abs() * (left.T @ right.T), rtol=1e-12)
    assert _same(net, before) and any((v < 0).any() for v in before.values())


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        out = self.bn(self.fc(x))
        raise RuntimeError("boom")
        return out


def test_synflow_restores_after_an_exception():
    torch.manual_seed(0)
    net = Exploding().train()
    with torch.no_grad():
        net.bn.running_mean.fill_(-0.5)
    before = _state(net)
    with pytest.raises(RuntimeError, match="boom"):
        synflow(net, (3,))
    assert _same(net, before) and net.training and net.bn.training


def test_synflow_mask_one_round_and_many():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    before = _state(net)
    n = sum(w.numel() for w in prunable_weights(net).values())  # 48 + 32 + 12 = 92
    # one round = one global cut at the density: k = int(0.75 * 92) = 69 pruned, score <= 69th
    one = synflow_mask(net, 0.25, rounds=1, input_shape=(6,))
    s = synflow(net, (6,))
    thr = torch.cat([v.reshape(-1) for v in s.values()]).kthvalue(69).values
    assert all(torch.equal(one[k], s[k] > thr) for k in s)
    many = synflow_mask(net, 0.25, rounds=10, input_shape=(6,))
    assert sum(int(m.sum()) for m in many.values()) == n - 69
    assert all(m.any() for m in many.values())  # no layer collapses
    assert _same(net, before)
    # scored with the final masks applied, pruned weights score 0
    last = synflow(net, (6,), masks=many)
    assert all((last[k][~m] == 0).all() for k, m in many.items())
    with pytest.raises(ValueError, match="density"):
        synflow_mask(net, 0.0, input_shape=(6,))
    with pytest.raises(ValueError, match="rounds"):
        synflow_mask(net, 0.5, rounds=0, input_shape=(6,))


def test_global_masks_and_layer_densities():
    scores = {"a": torch.tensor([1.0, 5.0, 3.0]), "b": torch.tensor([4.0, 2.0, 6.0])}
    # keep the 3 highest of 6: 5 | 4, 6
    assert layer_densities(scores, 0.5) == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    m = global_masks(scores, 0.5, keep_high=False)  # GraSP: keep the 3 lowest: 1, 3 | 2
    assert m["a"].tolist() == [True, False, True] and m["b"].tolist() == [False, True, False]
    # ties broken by position: exactly k kept
    tied = {"a": torch.ones(4), "b": torch.ones(4)}
    assert layer_densities(tied, 0.25) == {"a": 0.5, "b": 0.0}
    with pytest.raises(ValueError, match=r"density .* \(0, 1\]"):
        layer_densities(scores, 1.5)


def _bisect(counts, budget):
    lo, hi = 0.0, float(max(counts))
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(n, mid) for n in counts) > budget * sum(counts):
            hi = mid
        else:
            lo = mid
    return [min(1.0, lo / n) for n in counts]


def test_precrop_densities_closed_form():
    # B = 0.1 * 11100 = 1110; λ = 370 would exceed 100, so layer 0 is kept whole: 100 + 2λ = 1110
    d = precrop_densities({"a": 100, "b": 1000, "c": 10000}, 0.1)
    assert d == pytest.approx({"a": 1.0, "b": 0.505, "c": 0.0505})
    assert precrop_densities([100, 1000, 10000], 0.001) == pytest.approx([0.037, 0.0037, 0.00037])
    assert precrop_densities([5, 7], 1.0) == [1.0, 1.0]
    assert precrop_densities([10, 10, 10], 0.5) == pytest.approx([0.5, 0.5, 0.5])
    assert precrop_densities([100, 200], 200 / 300) == pytest.approx([1.0, 0.5])  # λ = 100 exactly
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 5000, (12,), generator=g).tolist()
    for budget in (0.02, 0.3, 0.9):
        got = precrop_densities(counts, budget)
        assert got == pytest.approx(_bisect(counts, budget), rel=1e-9)
        assert sum(x * n for x, n in zip(got, counts, strict=True)) == pytest.approx(budget * sum(counts))
    # tensors count their elements
    net = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    assert precrop_densities(prunable_weights(net), 0.5) == pytest.approx({"0.weight": 0.4, "1.weight": 1.0})
    with pytest.raises(ValueError, match="budget"):
        precrop_densities([10], 0.0)
    with pytest.raises(ValueError, match="ints >= 1"):
        precrop_densities([10, 0], 0.5)


def test_block_scores_and_least_important():
    scores = {
        "b0.conv1.weight": torch.tensor([1.0, 2.0, 3.0]),
        "b0.conv2.weight": torch.tensor([[5.0]]),
        "b1.conv1.weight": torch.tensor([0.0, 0.0]),
        "b10.conv1.weight": torch.tensor([9.0]),  # not in block b1 ("b1." prefix)
        "fc.weight": torch.tensor([7.0]),
    }
    bs = block_scores(scores, ["b0", "b1", "b10"])
    assert bs == pytest.approx({"b0": 2.75, "b1": 0.0, "b10": 9.0})
    assert block_scores(scores, {"x": ["b0.conv2.weight", "fc.weight"]}, reduce="sum") == {"x": 12.0}
    assert least_important(bs, 1, "snip") == ["b1"]
    assert least_important(bs, 2, "grasp") == ["b10", "b0"]  # GraSP: the highest means go first
    assert least_important(bs, 0, "synflow") == []
    with pytest.raises(ValueError, match="criterion"):
        least_important(bs, 1, "hrank")
    with pytest.raises(ValueError, match=r"p \(blocks to remove\)"):
        least_important(bs, 4, "snip")
    with pytest.raises(ValueError, match="holds no scored parameter"):
        block_scores(scores, ["b2"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="no layer to score"):
        snip(nn.Sequential(nn.ReLU()), torch.ones(1, 2), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="inputs, labels"):
        snip(two_layer())
    with pytest.raises(ValueError, match="either closure"):
        snip(two_layer(), X, T, closure=lambda m: m(X).sum())
    with pytest.raises(ValueError, match="input_shape"):
        synflow(two_layer(), (0, 2))


def test_hf_llama_through_a_closure():
    """A Hugging Face decoder (SDPA attention) scored through a closure: SNIP equals |grad * w| from
    an ordinary backward pass on a copy; GraSP's double backward runs; the model is untouched."""
    import copy

    from tiny import llama, text_inputs

    model = llama().train()
    inp = text_inputs(batch=2, length=12)
    closure = lambda m: m(**inp, labels=inp["input_ids"]).loss  # noqa: E731
    before = _state(model)
    s = snip(model, closure=closure)
    ref = copy.deepcopy(model)
    closure(ref).backward()
    mods = dict(ref.named_modules())
    for name, v in s.items():
        w = mods[name.removesuffix(".weight")].weight
        assert torch.allclose(v, (w.grad * w).abs(), atol=1e-7), name
    g = grasp(model, closure=closure)
    assert set(g) == set(s) and all(torch.isfinite(v).all() for v in g.values())
    assert any(v.abs().sum() > 0 for v in g.values())
    assert _same(model, before) and all(p.grad is None for p in model.parameters())
