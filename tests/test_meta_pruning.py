"""Meta Pruning via Graph Metanetworks (prunekit.training.meta_pruning): the graph bijection, the
metanetwork's aggregation and near-identity init, the group-norm regulariser's gradient, the
progressive pruner and the pipeline, on tiny MLPs."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from prunekit.errors import UnsupportedModelError
from prunekit.models import convnets as C

M = importlib.import_module("prunekit.training.meta_pruning")


def _batches(n=3, b=16, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "pixel_values": torch.randn(b, 1, 1, d, generator=g),
            "labels": torch.randint(0, classes, (b,), generator=g),
        }
        for _ in range(n)
    ]


def test_graph_sizes_are_hand_counted_and_the_round_trip_is_exact():
    m = C.MLP((3, 4, 2), seed=1)
    g = M.state_dict_to_graph(m)
    # nodes: 3 inputs + 4 hidden + 2 outputs; edges: 3*4 + 4*2 weights
    assert g.num_nodes == 9 and g.num_edges == 20
    assert g.x.shape == (9, 1) and g.edge_attr.shape == (20, 1) and g.edge_index.shape == (2, 20)
    assert torch.equal(g.x[:3, 0], torch.zeros(3))  # input nodes carry 0
    assert torch.equal(g.x[3:7, 0], m.layers[0].bias) and torch.equal(g.x[7:, 0], m.layers[1].bias)
    # edge 5 of Linear 0 (row-major, 3 inputs per row): W0[1, 2], from input node 2 to hidden node 3+1
    assert g.edge_index[:, 5].tolist() == [4, 2] and g.edge_attr[5, 0] == m.layers[0].weight[1, 2]
    # edge 12 + 7 = the last of Linear 1: W1[1, 3], output node 7+1 <- hidden node 3+3
    assert g.edge_index[:, 19].tolist() == [8, 6] and g.edge_attr[19, 0] == m.layers[1].weight[1, 3]
    back = M.graph_to_state_dict(g, m)
    sd = m.state_dict()
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # the spec's demonstration MLP 784-128-128-10: 1050 nodes, 118 016 edges
    big = M.state_dict_to_graph(C.MLP((784, 128, 128, 10)))
    assert (big.num_nodes, big.num_edges) == (1050, 784 * 128 + 128 * 128 + 128 * 10)


def test_graph_errors():
    with pytest.raises(UnsupportedModelError, match="MLP"):
        M.state_dict_to_graph(C.ConvNet(widths=(2,), pool_after=(0,)))
    g = M.state_dict_to_graph(C.MLP((3, 4, 2)))
    with pytest.raises(ValueError, match=r"sizes \(3, 4, 2\); the model has sizes \(3, 5, 2\)"):
        M.graph_to_state_dict(g, C.MLP((3, 5, 2)))


def test_aggregation_on_a_hand_worked_case():
    # node 0 gets messages 1, 3 (feature 0) and 2, 2 (feature 1); node 1 gets -4, 5; node 2 none
    msg = torch.tensor([[1.0, 2.0], [3.0, 2.0], [-4.0, 5.0]])
    idx = torch.tensor([0, 0, 1])
    out = M.aggregate(msg, idx, 3)
    mean = [[2.0, 2.0], [-4.0, 5.0], [0.0, 0.0]]
    std = [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]  # var(1,3) = 1; constant -> clamp -> 0
    mx = [[3.0, 2.0], [-4.0, 5.0], [0.0, 0.0]]
    mn = [[1.0, 2.0], [-4.0, 5.0], [0.0, 0.0]]
    expect = torch.tensor([a + b + c + d for a, b, c, d in zip(mean, std, mx, mn, strict=True)])
    assert torch.allclose(out, expect, atol=1e-6)


def test_metanet_with_zero_decoders_is_the_identity_and_near_it_by_the_scale():
    m = C.MLP((5, 4, 3), seed=2)
    net = M.MetaGNN(hidden=8, layers=2, seed=0)
    with torch.no_grad():
        g = M.state_dict_to_graph(m)
        x, e = net(g.x, g.edge_index, g.edge_attr)
    # an independent bound: |LN(h)_k| <= sqrt(H-1); |silu(u)| <= |u|;
    # so |dec| <= |W2|·(|W1|·sqrt(H-1) + |b1|) + |b2|
    for dec, got, ref in ((net.edge_dec, e, g.edge_attr), (net.node_dec, x, g.x)):
        w1, b1, w2, b2 = dec[1].weight, dec[1].bias, dec[3].weight, dec[3].bias
        inner = w1.abs().sum(1) * math.sqrt(8 - 1) + b1.abs()
        bound = (w2.abs() @ inner + b2.abs()).max().detach()
        assert float((got - ref).abs().max()) <= 0.01 * float(bound) + 1e-7
        assert not torch.equal(got, ref)
    with torch.no_grad():
        net.edge_dec[3].weight.zero_(), net.edge_dec[3].bias.zero_()
        net.node_dec[3].weight.zero_(), net.node_dec[3].bias.zero_()
        x, e = net(g.x, g.edge_index, g.edge_attr)
    assert torch.equal(x, g.x) and torch.equal(e, g.edge_attr)


def test_metanet_is_equivariant_to_permuting_hidden_neurons():
    # permuting hidden neurons is a symmetry of the MLP; the metanetwork must commute with it
    m = C.MLP((4, 5, 3), seed=3)
    perm = torch.tensor([2, 0, 4, 1, 3])
    p = C.MLP((4, 5, 3), seed=3)
    with torch.no_grad():
        p.layers[0].weight.copy_(m.layers[0].weight[perm])
        p.layers[0].bias.copy_(m.layers[0].bias[perm])
        p.layers[1].weight.copy_(m.layers[1].weight[:, perm])
    net = M.MetaGNN(hidden=8, layers=2, seed=1)
    with torch.no_grad():
        a = M.graph_to_state_dict(net.rewrite(M.state_dict_to_graph(m)), m)
        b = M.graph_to_state_dict(net.rewrite(M.state_dict_to_graph(p)), p)
    assert torch.allclose(b["layers.0.weight"], a["layers.0.weight"][perm], atol=1e-6)
    assert torch.allclose(b["layers.0.bias"], a["layers.0.bias"][perm], atol=1e-6)
    assert torch.allclose(b["layers.1.weight"], a["layers.1.weight"][:, perm], atol=1e-6)
    assert torch.allclose(b["layers.1.bias"], a["layers.1.bias"], atol=1e-6)


def test_group_norm_gradient_on_a_hand_made_case():
    # MLP 2-2-1: hidden neuron 0 has row (3, 4) and column (0,), neuron 1 has row (0, 1), column (1,)
    m = C.MLP((2, 2, 1))
    with torch.no_grad():
        m.layers[0].weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        m.layers[1].weight.copy_(torch.tensor([[0.0, 1.0]]))
    # m_0 = (25 + 0)/2 = 12.5, m_1 = (1 + 1)/2 = 1; imp = sqrt(m / 12.5) = 1, sqrt(0.08)
    imp = M.group_importance(m)[0]
    assert torch.allclose(imp, torch.tensor([1.0, math.sqrt(0.08)]))
    # gamma: neuron 0 (max) -> 16^0 = 1; neuron 1 (min) -> 16^1 = 16
    assert torch.allclose(M.group_gammas(m, 16.0)[0], torch.tensor([1.0, 16.0]))
    r = M.group_norm_penalty(m, alpha=16.0, reg=10.0)
    r.backward()
    assert torch.allclose(m.layers[0].weight.grad, 10 * torch.tensor([[3.0, 4.0], [0.0, 16.0]]))
    assert torch.allclose(m.layers[1].weight.grad, 10 * torch.tensor([[0.0, 16.0]]))
    assert m.layers[0].bias.grad is None  # biases are not regularised
    assert torch.isclose(r, torch.tensor(5.0 * (25 + 16 * 2)))


def test_meta_training_reduces_the_penalty_and_leaves_the_data_models():
    models = [C.MLP((6, 8, 3), seed=s) for s in range(2)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    bs = _batches()
    _, hist = M.meta_train(models, bs, epochs=6, lr=1e-2, hidden=8, layers=1, batches_per_model=2)
    assert len(hist) == 12 and {"ce", "reg", "epoch", "model"} <= set(hist[0])
    first = hist[0]["reg"] + hist[1]["reg"]
    last = hist[-1]["reg"] + hist[-2]["reg"]
    assert last < first
    for m, sd in zip(models, before, strict=True):
        assert all(torch.equal(m.state_dict()[k], sd[k]) for k in sd)


def test_progressive_pruning_reaches_the_target_and_drops_the_weakest():
    m = C.MLP((10, 20, 20, 4), seed=0)
    with torch.no_grad():
        m.layers[0].weight[:5] *= 1e-3  # hidden.0 neurons 0-4 nearly dead
        m.layers[1].weight[:, :5] *= 1e-3
    base = M.mlp_flops(m)
    assert base == 10 * 20 + 20 * 20 + 20 * 4
    # one neuron per step; a hidden.0 neuron costs 10 + 20 MACs: 1.25x needs 136 MACs gone, 5 of them
    res = M.progressive_prune(m, 1.25, steps=40)
    assert res["steps"] == 5 and res["speedup"] == 680 / (680 - 150) == base / M.mlp_flops(m)
    assert res["widths"] == {"hidden.0": 15, "hidden.1": 20}
    assert bool((m.layers[0].weight.norm(dim=1) > 1e-2).all())  # the five weak neurons went
    # an unreachable target: every layer ends at one neuron (the cap), then it stops
    m2 = C.MLP((4, 3, 9, 2), seed=0)
    res = M.progressive_prune(m2, 100.0, steps=3)  # ceil(12 / 3) = 4 neurons a step
    assert res["widths"] == {"hidden.0": 1, "hidden.1": 1} and res["steps"] == 3
    assert res["speedup"] == (12 + 27 + 18) / (4 + 1 + 2)
    with pytest.raises(ValueError, match="speedup must be a number >= 1"):
        M.progressive_prune(m, 0.5)


def test_pipeline_report_and_baseline():
    m = C.MLP((6, 8, 3), seed=0)
    bs = _batches()
    net = M.MetaGNN(hidden=8, layers=1)
    _, rep = M.meta_pruning(m, net, bs, speedup=1.5, finetune_steps=2, final_steps=2, eval_batches=bs)
    assert list(rep.stages) == ["input", "metanet", "finetuned", "pruned", "final"]
    assert rep.speedup >= 1.5 and rep.stages["final"]["macs"] < rep.stages["input"]["macs"]
    assert C.count_params(m) == rep.stages["input"]["params"]  # the input network is untouched
    _, base = M.meta_pruning(m, None, bs, speedup=1.5, finetune_steps=2, final_steps=0)
    assert list(base.stages) == ["input", "pruned", "final"] and not base.used_metanet
    with pytest.raises(ValueError, match="finetune_steps must be an int >= 0"):
        M.meta_pruning(m, net, bs, finetune_steps=-1)


def _resnet():
    m = C.ResNetLite(stages=2, blocks=1, widths=(2, 3), classes=4, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                for t in (mod.weight, mod.bias, mod.running_mean):
                    t.copy_(torch.randn(t.shape, generator=g))
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
    return m


def test_resnet_graph_is_hand_counted_and_round_trips_exactly():
    m = _resnet()
    g = M.state_dict_to_graph(m)
    # nodes: image 1 + stem 2 + block 0.0 (mid 2, out 2) + block 1.0 (mid 3, out 3) + classes 4
    # edges: stem 2 + (4 + 4 + identity 2) + (6 + 9 + 1x1 shortcut 6) + fc 12
    assert g.x.shape == (17, 8) and g.edge_attr.shape == (45, 9) and g.edge_index.shape == (2, 45)
    assert g.x[0].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]  # the image channel: defaults
    bn2, sc = m.stages[1]["0"].bn2, m.stages[1]["0"].shortcut[1]
    node = 1 + 2 + 4 + 3  # block 1.0's first output channel
    assert torch.equal(g.x[node], torch.stack([bn2.weight[0], bn2.bias[0], bn2.running_mean[0],
                                               bn2.running_var[0], sc.weight[0], sc.bias[0],
                                               sc.running_mean[0], sc.running_var[0]]))  # fmt: skip
    assert torch.equal(g.x[13:, 1], m.fc.bias) and torch.equal(g.x[13:, 0], torch.ones(4))
    # identity shortcut of block 0.0: edges 10, 11 map stem channel c (node 1+c) to block output (5+c)
    assert g.edge_index[:, 10:12].tolist() == [[5, 6], [1, 2]]
    assert torch.equal(g.edge_attr[10], torch.tensor([0.0, 0, 0, 0, 1, 0, 0, 0, 0]))
    # the 1x1 shortcut's first edge (after stem 2, block 0.0's 10, conv1 6, conv2 9): value at index 4
    w = m.stages[1]["0"].shortcut[0].weight
    assert g.edge_attr[27, 4] == w[0, 0, 0, 0] and int((g.edge_attr[27] != 0).sum()) == 1
    back = M.graph_to_state_dict(g, m)
    sd = m.state_dict()
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_metanet_on_the_resnet_graph_with_zero_decoders_gives_the_same_network():
    from torch.func import functional_call

    m = _resnet().eval()
    net = M.MetaGNN(hidden=8, layers=1, node_dim=8, edge_dim=9)
    with torch.no_grad():
        for dec in (net.node_dec, net.edge_dec):
            dec[3].weight.zero_(), dec[3].bias.zero_()
        g = M.state_dict_to_graph(m)
        state = M.graph_to_state_dict(net.rewrite(g), m)
        sd = m.state_dict()
        assert all(torch.equal(state[k], sd[k]) for k in sd)
        x = torch.randn(2, 1, 8, 8)  # the same function (strided views may change the float rounding)
        assert torch.allclose(functional_call(m, state, (x,)).logits, m(x).logits, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be read back into an MLP"):
        M.graph_to_state_dict(g, C.MLP((3, 4, 2)))


def test_group_norm_loss_fn_gives_the_same_training_in_a_plain_loop_and_the_trainer():
    import copy

    from prunekit.training import train_batches

    base = C.MLP((6, 8, 3), seed=4)
    bs = _batches(n=2)
    fn = M.group_norm_loss_fn(alpha=4.0, reg=0.1)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.0)
    a.train()
    for step in range(4):
        batch = bs[step % 2]
        out = a(**batch)
        (out.loss + sum(fn(a, batch, out, step).values())).backward()
        torch.nn.utils.clip_grad_norm_(a.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    res = train_batches(b, bs, steps=4, lr=1e-2, loss_fn=fn, progress=False, lr_scheduler_type="constant")
    assert res.steps == 4 and "group_norm" in res.terms[0]
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="reg must be a finite number > 0"):
        M.group_norm_loss_fn(reg=0)
