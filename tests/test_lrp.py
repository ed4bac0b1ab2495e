"""LRP (Yeom et al. 2021; Hatefi et al. 2024 "PXP") in ``prunekit.training.lrp_rules``.

Every check is against a hand-worked case or an independent computation: conservation of relevance
on bias-free layers and networks, the z⁺ / αβ / ε rules on a 2x2 Linear worked by hand (and the
same numbers through a 1x1 convolution), ε-LRP = gradient x input on bias-free ReLU networks (plain
autograd as the reference), the residual sum's proportional split, CP-LRP's attention relevance
against an einsum, head scores on a hand-made tensor, the baselines against hand formulas, the
global selection on hand scores, restoration of the model, and the errors.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import UnsupportedModelError
from prunekit.models.convnets import MLP, ConvNet, ResNetLite, groups, mask_channels
from prunekit.training import lrp_rules as lrp
from prunekit.training.lrp_rules import Composite, Rule

TINY = 1e-12


def eps_only(eps: float = TINY, **kw) -> Composite:
    return Composite(default=Rule("epsilon", eps=eps), eps=eps, **kw)


def bias_free_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8, bias=False),
        nn.ReLU(),
        nn.Linear(8, 7, bias=False),
        nn.ReLU(),
        nn.Linear(7, 3, bias=False),
    ).double()


def bias_free_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, bias=False), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(5, 6, 1, bias=False),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3, bias=False),
    ).double()  # fmt: skip


# ------------------------------------------------------------------ conservation
@pytest.mark.parametrize("shape", [(5, 9), "conv"])
def test_single_bias_free_layer_conserves_under_epsilon(shape):
    torch.manual_seed(1)
    if shape == "conv":
        layer = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.Flatten()).double()
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    else:
        layer = nn.Linear(9, 5, bias=False).double()
        x = torch.randn(4, 9, dtype=torch.float64)
    out = layer(x)
    rel = lrp.relevance(layer, x, [0, 3, 1, 2], eps_only(), start="logit")
    expected = (
        out.detach().gather(1, torch.tensor([[0], [3], [1], [2]])).flatten()
    )  # R_out = the target logit
    torch.testing.assert_close(rel.input.flatten(1).sum(1), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("rule", ["epsilon", "alpha1beta0"])
@pytest.mark.parametrize("net", [bias_free_mlp, bias_free_cnn])
def test_bias_free_relu_network_conserves(net, rule):
    model = net()
    torch.manual_seed(2)
    x = torch.randn(5, 6, dtype=torch.float64) if net is bias_free_mlp else torch.randn(5, 2, 8, 8).double()
    r = Rule("epsilon", eps=TINY) if rule == "epsilon" else Rule("alphabeta", TINY, 1.0, 0.0)
    # the classifier under ε (as Yeom): under α1β0 a target whose contributions are all negative
    # would pass nothing on, which is the rule's behaviour, not a leak
    # the same for the CNN's 1x1 conv, whose outputs are not rectified
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    comp = Composite(layers={n: tiny("epsilon") for n in (last, "6")}, default=r, eps=TINY)
    rel = lrp.relevance(model, x, [0, 1, 2, 0, 1], comp)  # one-hot start: each sample's R sums to 1
    torch.testing.assert_close(
        rel.input.flatten(1).sum(1), torch.ones(5, dtype=torch.float64), rtol=1e-7, atol=0
    )


@pytest.mark.parametrize("bn", ["pass", "epsilon"])
@pytest.mark.parametrize("cls", [ConvNet, ResNetLite])
def test_prunekit_networks_at_init_conserve(cls, bn):
    """At initialisation a BN is bias-free (beta 0, running mean 0): with a zero FC bias the whole
    network is, so ε-LRP conserves through BN, pooling and the residual additions. Under ``"pass"``
    the BN scale cancels only when it is the same for all channels, which it is at init (gamma 1)."""
    model = cls(seed=3).double()
    nn.init.zeros_(model.fc.bias)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    rel = lrp.relevance(model, x, [1, 4, 7], eps_only(batchnorm=bn))
    torch.testing.assert_close(
        rel.input.flatten(1).sum(1), torch.ones(3, dtype=torch.float64), rtol=1e-6, atol=0
    )


# ------------------------------------------------------------------ hand-worked rules
X = [[1.0, -2.0], [1.0, -2.0]]  # the same input twice; targets 0 and 1 give each output unit R = 1
W = [[1.0, -1.0], [2.0, 3.0]]  # (out, in)
# contributions x_i w_ji: unit 0 -> [1, 2] (z = 3); unit 1 -> [2, -6] (z = -4)
HAND = {
    # ε: R_i = x_i w_ji / z_j
    "epsilon": [[1 / 3, 2 / 3], [2 / -4, -6 / -4]],
    # z⁺ (Montavon, x·w⁺): unit 0: [1·1, -2·0] / 1; unit 1: [1·2, -2·3] / (2 - 6)
    "zplus": [[1.0, 0.0], [-0.5, 1.5]],
    # α1β0: positive contributions only: unit 0: [1, 2] / 3; unit 1: [2, 0] / 2
    "alpha1beta0": [[1 / 3, 2 / 3], [1.0, 0.0]],
    # α2β1: unit 0: 2·[1, 2]/3 - 1·0 (no negative part); unit 1: 2·[1, 0] - 1·[0, 1]
    "alpha2beta1": [[2 / 3, 4 / 3], [2.0, -1.0]],
}


def tiny(rule: str) -> Rule:
    """The named rule with a 1e-12 stabiliser (the default 1e-6 would move the hand values)."""
    r = Rule.of(rule)
    return Rule(r.kind, TINY, r.alpha, r.beta)


@pytest.mark.parametrize("rule", sorted(HAND))
@pytest.mark.parametrize("kind", ["linear", "conv1x1"])
def test_rules_on_a_hand_worked_2x2_layer(rule, kind):
    x = torch.tensor(X, dtype=torch.float64)
    if kind == "linear":
        model = nn.Linear(2, 2, bias=False).double()
        model.weight.data = torch.tensor(W, dtype=torch.float64)
    else:  # the same numbers through F.conv2d on a 1x1 image
        conv = nn.Conv2d(2, 2, 1, bias=False).double()
        conv.weight.data = torch.tensor(W, dtype=torch.float64).view(2, 2, 1, 1)
        model, x = nn.Sequential(conv, nn.Flatten()), x.view(2, 2, 1, 1)
    rel = lrp.relevance(model, x, [0, 1], Composite(default=tiny(rule), eps=TINY))
    torch.testing.assert_close(rel.input.reshape(2, 2), torch.tensor(HAND[rule], dtype=torch.float64))


def test_start_relevances_by_hand():
    lin = nn.Linear(2, 2, bias=False).double()
    lin.weight.data = torch.tensor(W, dtype=torch.float64)
    x = torch.tensor(X, dtype=torch.float64)  # target logits: sample 0 -> 3, sample 1 -> -4
    start = {s: lrp.relevance(lin, x, [0, 1], start=s).start for s in ("onehot", "logit", "normalized")}
    torch.testing.assert_close(start["onehot"], torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(start["logit"], torch.tensor([[3.0, 0.0], [0.0, -4.0]], dtype=torch.float64))
    # Yeom's output·T / sum(output·T), summed over the batch: 3 / -1 and -4 / -1
    torch.testing.assert_close(
        start["normalized"], torch.tensor([[-3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    )


def test_epsilon_bias_absorbs_and_eps_stabilises_by_hand():
    lin = nn.Linear(2, 2).double()
    lin.weight.data = torch.tensor(W, dtype=torch.float64)
    lin.bias.data = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x = torch.tensor(X, dtype=torch.float64)
    rel = lrp.relevance(lin, x, [0, 0], Composite(default=Rule("epsilon", eps=1.0)))
    # unit 0: z = 3 + 1 = 4, stabilised 4 + 1 = 5: R_in = [1, 2] / 5
    torch.testing.assert_close(rel.input[0], torch.tensor([0.2, 0.4], dtype=torch.float64))


def test_zplus_equals_alpha1beta0_on_non_negative_inputs():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, bias=False), nn.Flatten(), nn.Linear(5 * 16, 4, bias=False)
    ).double()
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64)  # >= 0
    comp = {r: Composite(layers={nn.Conv2d: tiny(r)}, default=tiny("epsilon"), eps=TINY) for r in HAND}
    a = lrp.relevance(model, x, [0, 1, 2], comp["zplus"]).input
    b = lrp.relevance(model, x, [0, 1, 2], comp["alpha1beta0"]).input
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("net", [bias_free_mlp, bias_free_cnn])
def test_epsilon_lrp_equals_gradient_times_input_on_bias_free_relu_networks(net):
    model = net()
    torch.manual_seed(5)
    x = torch.randn(4, 6, dtype=torch.float64) if net is bias_free_mlp else torch.randn(4, 2, 8, 8).double()
    t = torch.tensor([2, 0, 1, 1])
    rel = lrp.relevance(model, x, t, eps_only(), start="logit")
    xg = x.clone().requires_grad_(True)  # the independent reference: plain autograd, no rules
    (g,) = torch.autograd.grad(model(xg).gather(1, t[:, None]).sum(), xg)
    torch.testing.assert_close(rel.input, x * g, rtol=1e-7, atol=1e-12)


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 1, bias=False), nn.Linear(3, 1, bias=False)
        self.l1.weight.data = torch.tensor([[1.0, 0.0, 0.0]])
        self.l2.weight.data = torch.tensor([[0.0, 1.0, 1.0]])

    def forward(self, x):
        return self.l1(x) + self.l2(x)


def test_residual_sum_splits_relevance_in_proportion_to_the_addends():
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 1.0, 4.0]])
    rel = lrp.relevance(TwoBranches(), x, 0, eps_only(), at=["l1", "l2"])
    # sample 0: addends 1 and 5 -> 1/6, 5/6; sample 1: -1 and 5 -> -1/4, 5/4
    torch.testing.assert_close(rel.outputs["l1"].flatten(), torch.tensor([1 / 6, -1 / 4]))
    torch.testing.assert_close(rel.outputs["l2"].flatten(), torch.tensor([5 / 6, 5 / 4]))


class Product(TwoBranches):
    def forward(self, x):
        return self.l1(x) * self.l2(x) * 3.0  # a product of two relevance carriers, then a constant


def test_product_of_two_carriers_splits_uniformly_and_a_constant_factor_passes():
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 1.0, 4.0]])
    rel = lrp.relevance(Product(), x, 0, eps_only(), at=["l1", "l2"])
    # AttnLRP / PXP uniform rule: each factor gets half; the constant 3 passes the relevance on
    torch.testing.assert_close(rel.outputs["l1"].flatten(), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(rel.outputs["l2"].flatten(), torch.tensor([0.5, 0.5]))


# ------------------------------------------------------------------ attention
class TinyAttention(nn.Module):
    def __init__(self, sdpa: bool = False, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.h, self.sdpa = heads, sdpa
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.out = nn.Identity()  # its output is A·V itself: the test reads the relevance there
        self.fc = nn.Linear(d, 3, bias=False)

    def forward(self, x):  # (B, N, d)
        B, N, d = x.shape
        q, k, v = (f(x).view(B, N, self.h, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.sdpa:
            z = F.scaled_dot_product_attention(q, k, v)
        else:
            a = F.softmax(q @ k.transpose(-2, -1) * (d // self.h) ** -0.5, dim=-1)
            z = torch.matmul(a, v)
        z = self.out(z)  # (B, H, N, dh)
        return self.fc(z.transpose(1, 2).reshape(B, N, d).mean(1))


def test_cp_lrp_attention_relevance_against_einsum_and_conservation():
    model = TinyAttention().double()
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    rel = lrp.relevance(model, x, [0, 2], eps_only(), at=["out", "q", "k", "v"])
    (A,) = rel.attention.values()
    B, N, _ = x.shape
    with torch.no_grad():  # the reference: A, V, Z from a plain forward
        q, k, v = (f(x).view(B, N, 2, -1).transpose(1, 2) for f in (model.q, model.k, model.v))
        a = torch.softmax(q @ k.transpose(-2, -1) * 4**-0.5, -1)
        z = a @ v
    Rz = rel.outputs["out"]
    expected = torch.einsum("bhik,bhkj,bhij->bhik", a, v, Rz / z)  # R_A[i,k] = Σ_j A_ik V_kj R_ij / Z_ij
    torch.testing.assert_close(A, expected, rtol=1e-7, atol=1e-12)
    # CP: nothing enters Q or K; V carries all of A·V's relevance, and the input all of it (bias-free)
    assert rel.outputs["q"].abs().max() == 0 and rel.outputs["k"].abs().max() == 0
    torch.testing.assert_close(rel.outputs["v"].sum((1, 2)), Rz.sum((1, 2, 3)))
    torch.testing.assert_close(rel.input.sum((1, 2)), torch.ones(2, dtype=torch.float64), rtol=1e-7, atol=0)


@pytest.mark.parametrize("softmax", ["cp", "epsilon"])
def test_sdpa_is_decomposed_like_the_explicit_attention(softmax):
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    comp = eps_only(softmax=softmax)
    r1 = lrp.relevance(TinyAttention(sdpa=False).double(), x, [0, 1], comp)
    r2 = lrp.relevance(TinyAttention(sdpa=True).double(), x, [0, 1], comp)
    torch.testing.assert_close(r1.input, r2.input)
    torch.testing.assert_close(next(iter(r1.attention.values())), next(iter(r2.attention.values())))


@pytest.mark.parametrize("mask", ["is_causal", "float"])
@pytest.mark.parametrize("softmax", ["cp", "epsilon"])
def test_causal_sdpa_masked_entries_carry_no_relevance(softmax, mask):
    class Causal(TinyAttention):
        def forward(self, x):
            B, N, d = x.shape
            q, k, v = (f(x).view(B, N, self.h, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
            if mask == "is_causal":
                z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # an additive -inf mask
                m = torch.zeros(N, N, dtype=x.dtype).masked_fill(
                    torch.ones(N, N, dtype=torch.bool).triu(1), -torch.inf
                )
                z = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            return self.fc(z.transpose(1, 2).reshape(B, N, d).mean(1))

    rel = lrp.relevance(
        Causal().double(), torch.randn(2, 4, 8, dtype=torch.float64), [0, 1], eps_only(softmax=softmax)
    )
    (A,) = rel.attention.values()
    assert bool(torch.isfinite(rel.input).all()) and bool(torch.isfinite(A).all())
    upper = torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert A[..., upper].abs().max() == 0 and A[..., ~upper].abs().max() > 0


def test_epsilon_softmax_is_attnlrp_rule():
    """PXP's ε softmax: ``R_x = x ⊙ (R − s Σ R)`` (AttnLRP), checked on softmax -> bias-free Linear."""

    class SoftmaxNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2, bias=False)
            self.fc.weight.data = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 1.0]], dtype=torch.float64)
            self.pre = nn.Identity()

        def forward(self, x):
            return self.fc(self.pre(F.softmax(x, -1)))

    x = torch.tensor([[0.2, -1.0, 0.7]], dtype=torch.float64)
    rel = lrp.relevance(SoftmaxNet(), x, 0, eps_only(softmax="epsilon"), at=["pre"])
    s, Rs = torch.softmax(x, -1), rel.outputs["pre"]
    w0 = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(Rs, s * w0 / (s @ w0))
    torch.testing.assert_close(rel.input, x * (Rs - s * Rs.sum(-1, keepdim=True)))


def test_head_scores_on_a_hand_made_tensor():
    r = torch.tensor([[[[1.0, -3.0], [2.0, 2.0]], [[0.5, 0.5], [-1.0, 0.0]]]])  # (1, 2 heads, 2, 2)
    r = torch.cat([r, r])  # two samples: everything doubles
    # head 0: Σ keys [-2, 4] -> abs -> 6; head 1: [1, -1] -> 2 (PXP, after_sum)
    torch.testing.assert_close(lrp.head_scores(r), torch.tensor([12.0, 4.0]))
    # abs first: head 0: 1 + 3 + 2 + 2 = 8; head 1: 0.5 + 0.5 + 1 = 2
    torch.testing.assert_close(lrp.head_scores(r, abs="before_sum"), torch.tensor([16.0, 4.0]))


def test_dinov2_heads_eager_and_sdpa_agree():
    from transformers import Dinov2Config, Dinov2Model

    class Probe(nn.Module):
        def __init__(self, impl: str) -> None:
            super().__init__()
            cfg = Dinov2Config(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=28, patch_size=14, num_channels=1, attn_implementation=impl,
            )  # fmt: skip
            torch.manual_seed(0)
            self.enc, self.head = Dinov2Model(cfg), nn.Linear(32, 3)

        def forward(self, pixel_values):
            return self.enc(pixel_values=pixel_values).pooler_output @ self.head.weight.T

    batch = {"pixel_values": torch.randn(2, 1, 28, 28), "labels": torch.tensor([0, 2])}
    s1 = lrp.attention_head_scores(Probe("eager"), batch)
    s2 = lrp.attention_head_scores(Probe("sdpa"), batch)
    assert list(s1) == ["enc.encoder.layer.0.attention", "enc.encoder.layer.1.attention"]
    for k in s1:
        assert s1[k].shape == (4,) and bool((s1[k] > 0).all())
        torch.testing.assert_close(s1[k], s2[k], rtol=1e-4, atol=1e-7)
    keep = lrp.least_relevant(s1, 0.5)
    assert sum(len(v) for v in keep.values()) == 4


# ------------------------------------------------------------------ scores and selection
def test_channel_scores_abs_order_by_hand():
    r = torch.tensor([[[[1.0, -1.0]]], [[[2.0, 3.0]]]])  # (2, 1, 1, 2)
    assert lrp.channel_scores(r, "before_sum").item() == 7.0  # Yeom: 1 + 1 + 2 + 3
    assert lrp.channel_scores(r, "after_sum").item() == 5.0  # PXP: |1 - 1| + |2 + 3|
    torch.testing.assert_close(
        lrp.neuron_scores(torch.tensor([[1.0, -2.0], [-3.0, 0.5]])), torch.tensor([4.0, 2.5])
    )


def test_least_relevant_and_prune_order_by_hand():
    s = {"a": torch.tensor([0.5, 0.1, 0.9]), "b": torch.tensor([0.2, 0.05])}
    assert lrp.prune_order(s) == [("b", 1), ("a", 1), ("b", 0), ("a", 0), ("a", 2)]
    keep = lrp.least_relevant(s, 0.4)  # int(0.4 * 5) = 2: drops b1 and a1
    assert keep["a"].tolist() == [0, 2] and keep["b"].tolist() == [0]
    keep = lrp.least_relevant(s, 0.8)  # 4 would empty b: its best unit stays
    assert keep["a"].tolist() == [2] and keep["b"].tolist() == [0]
    assert {k: v.tolist() for k, v in lrp.least_relevant(s, 0.0).items()} == {"a": [0, 1, 2], "b": [0, 1]}


@pytest.mark.parametrize("rate", [1.0, -0.1, True, "0.5", float("nan")])
def test_bad_rates_raise(rate):
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\)"):
        lrp.least_relevant({"a": torch.ones(3)}, rate)


@pytest.mark.parametrize("cls", [MLP, ConvNet, ResNetLite])
def test_lrp_scores_map_onto_groups_and_keeps_feed_the_masks(cls):
    model = cls(seed=1)
    batch = {"pixel_values": torch.randn(3, 1, 28, 28), "labels": torch.tensor([0, 1, 2])}
    scores = lrp.lrp_scores(model, batch)
    gs = groups(model)
    assert list(scores) == list(gs) and all(scores[g].shape == (gs[g].width,) for g in gs)
    for v in scores.values():  # Yeom's per-layer v / Σv
        torch.testing.assert_close(v.sum(), torch.tensor(1.0))
    raw = lrp.lrp_scores(model, batch, lrp.PXP_EPSILON, "onehot", "after_sum", None)
    prod = {g: gs[g].producers for g in gs}
    rel = lrp.relevance(model, batch["pixel_values"], batch["labels"], lrp.PXP_EPSILON, at=sorted(
        {p for ps in prod.values() for p in ps}))  # fmt: skip
    for g, ps in prod.items():  # a residual stream sums its producers
        torch.testing.assert_close(raw[g], sum(lrp.channel_scores(rel.outputs[p], "after_sum") for p in ps))
    keep = lrp.least_relevant(scores, 0.5)
    total = sum(g.width for g in gs.values())
    assert total - sum(len(k) for k in keep.values()) == int(0.5 * total)
    with mask_channels(model, keep):
        model(batch["pixel_values"])


def test_prune_iteratively_removes_a_fixed_share_of_the_original_count_per_step():
    model = MLP((784, 20, 20, 10), seed=3)
    batch = {"pixel_values": torch.randn(6, 1, 28, 28), "labels": torch.arange(6)}
    first = lrp.prune_order(lrp.lrp_scores(copy.deepcopy(model), batch))[:4]
    calls = []
    reports = lrp.prune_iteratively(
        model, batch, steps=3, step_fraction=0.1, fine_tune=lambda m, s: calls.append(s)
    )
    assert calls == [0, 1, 2]
    assert [sum(b - a for b, a in r.channels.values()) for r in reports] == [4, 4, 4]  # 10 % of 40, each step
    assert sum(g.width for g in groups(model).values()) == 28
    assert sorted((g, i) for g, ids in reports[0].removed.items() for i in ids) == sorted(first)
    with pytest.raises(ValueError, match=r"step_fraction must be a number in \(0, 1\)"):
        lrp.prune_iteratively(model, batch, step_fraction=1.5)


# ------------------------------------------------------------------ baselines
def hand_mlp() -> MLP:
    m = MLP((2, 2, 2))
    m.layers[0].weight.data = torch.tensor([[1.0, -2.0], [0.5, 0.5]])
    m.layers[0].bias.data = torch.tensor([0.0, 0.1])
    m.layers[1].weight.data = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    m.layers[1].bias.data = torch.tensor([0.0, 0.0])
    return m


def test_weight_l1_by_hand():
    assert lrp.weight_l1_scores(hand_mlp())["hidden.0"].tolist() == [3.0, 1.0]


def test_taylor_and_gradient_against_hand_formulas():
    m = hand_mlp()
    x = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    y = torch.tensor([0, 1])
    batch = {"pixel_values": x.view(2, 1, 1, 2), "labels": y}
    W1, b1, W2 = m.layers[0].weight.data, m.layers[0].bias.data, m.layers[1].weight.data
    z = x @ W1.T + b1  # the producer output (pre-ReLU)
    p = torch.softmax(torch.relu(z) @ W2.T, -1)
    g = ((p - F.one_hot(y, 2)) @ W2) * (z > 0)  # dL/dz for the summed cross-entropy
    torch.testing.assert_close(lrp.taylor_scores(m, batch)["hidden.0"], (z * g).abs().sum(0))
    torch.testing.assert_close(lrp.gradient_scores(m, batch)["hidden.0"], g.abs().sum(0))


def test_random_scores_are_seeded_and_leave_the_global_rng():
    m = ConvNet()
    state = torch.get_rng_state()
    a, b, c = lrp.random_scores(m, 0), lrp.random_scores(m, 0), lrp.random_scores(m, 1)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["conv.0"], c["conv.0"])


def test_by_depth_composite_by_hand():
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(9)))
    c = Composite.by_depth(model, first="zplus", middle="alpha2beta1", last="alpha1beta0", fc="epsilon")
    # 8 hidden layers: 2 first, 4 middle, 2 last; the 9th is the classifier
    assert [c.layers[str(i)] for i in range(9)] == ["zplus"] * 2 + ["alpha2beta1"] * 4 + [
        "alpha1beta0"
    ] * 2 + ["epsilon"]
    assert c.rule_for("3", model[3]) == Rule("alphabeta", alpha=2.0, beta=1.0)


# ------------------------------------------------------------------ restoration and errors
def _state(model: nn.Module):
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )
    return (
        model.training, [p.requires_grad for p in model.parameters()], hooks,
        {k: v.clone() for k, v in model.state_dict().items()},
    )  # fmt: skip


def _same(a, b) -> None:
    assert a[:3] == b[:3]
    assert all(torch.equal(a[3][k], b[3][k]) for k in a[3])


def test_model_and_hooks_are_restored_after_relevance_and_after_an_exception():
    model = ConvNet(seed=2)
    model.train()
    model.convs[0].weight.requires_grad_(False)
    before = _state(model)
    x = torch.randn(2, 1, 28, 28)
    lrp.relevance(model, x, [0, 1], lrp.YEOM, at=["convs.1"])
    _same(_state(model), before)
    with pytest.raises(ValueError, match="target"):  # fails after the forward ran under the mode
        lrp.relevance(model, x, [0, 99], lrp.YEOM, at=["convs.1"])
    _same(_state(model), before)
    assert torch._C._len_torch_function_stack() == 0


def test_unsupported_module_raises_naming_it_and_the_supported_ones_and_restores():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    before = _state(model)
    with pytest.raises(UnsupportedModelError, match=r"tanh.*Tanh.*supported: Linear, Conv2d"):
        lrp.relevance(model, torch.randn(2, 4), 0)
    _same(_state(model), before)
    assert torch._C._len_torch_function_stack() == 0
    with pytest.raises(UnsupportedModelError, match="Conv1d"):
        lrp.relevance(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten()), torch.randn(2, 1, 5), 0)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="unknown LRP rule 'zminus'"):
        Composite(default="zminus")
    with pytest.raises(ValueError, match="softmax must be one of"):
        Composite(softmax="attn")
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        Rule("alphabeta", alpha=2.0, beta=0.0)
    lin = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="start must be one of"):
        lrp.relevance(lin, torch.randn(1, 3), 0, start="logits")
    with pytest.raises(ValueError, match="unknown modules"):
        lrp.relevance(lin, torch.randn(1, 3), 0, at=["nope"])
    with pytest.raises(ValueError, match="abs must be one of"):
        lrp.channel_scores(torch.ones(1, 2, 3, 3), abs="never")
    with pytest.raises(ValueError, match="normalize must be"):
        lrp.lrp_scores(
            MLP((4, 3, 2)), {"pixel_values": torch.randn(1, 4), "labels": torch.tensor([0])}, normalize="l2"
        )
