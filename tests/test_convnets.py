"""Small vision networks (MLP, ConvNet, ResNetLite), their channel groups, reversible masks and
physical surgery, FLOP/parameter counts, and the Fashion-MNIST batches.

The central check (DESIGN.md, "masks first, surgery last"): the physically sliced network computes
what the masked one computes, for every kind of group (MLP hidden units, conv -> conv, conv -> FC
through the flatten, a residual stream, a block's inner width) and for block removal. Counts are
checked against hand-worked numbers.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from prunekit.errors import PrunekitError, UnsupportedModelError
from prunekit.models.convnets import (
    FASHION_MEAN,
    FASHION_STD,
    MLP,
    ConvNet,
    ResNetLite,
    blocks,
    count_flops,
    count_params,
    evaluate_classifier,
    fashion_batches,
    group_widths,
    groups,
    layer_groups,
    mask_blocks,
    mask_channels,
    remove_blocks,
    remove_channels,
    with_widths,
)


def _randomise_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """BN statistics and affine parameters away from their (1, 0) init, so a wrong slice shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ networks
@pytest.mark.parametrize("cls", [MLP, ConvNet, ResNetLite])
def test_forward_logits_loss_and_seeded_construction(cls):
    x, y = _x(), torch.tensor([0, 3, 9, 1])
    before = torch.random.get_rng_state()
    a, b, c = cls(seed=3), cls(seed=3), cls(seed=4)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    out = a.eval()(pixel_values=x, labels=y)
    assert out.logits.shape == (4, 10)
    assert out["loss"] is out.loss
    manual = -torch.log_softmax(out.logits, -1)[torch.arange(4), y].mean()
    torch.testing.assert_close(out.loss, manual)
    assert a(pixel_values=x).loss is None and "loss" not in a(pixel_values=x)


def test_default_sizes_by_hand():
    # ConvNet 32-64-128-128, pools after conv 0 and 1: 28 -> 14 -> 7, FC 128*7*7 -> 10
    convs = 1 * 32 * 9 + 32 * 64 * 9 + 64 * 128 * 9 + 128 * 128 * 9
    assert count_params(ConvNet()) == convs + 2 * (32 + 64 + 128 + 128) + 128 * 49 * 10 + 10
    macs = 1 * 32 * 9 * 28 * 28 + 32 * 64 * 9 * 14 * 14 + (64 * 128 + 128 * 128) * 9 * 7 * 7 + 6272 * 10
    assert count_flops(ConvNet()) == macs
    assert count_params(MLP()) == 784 * 128 + 128 + 128 * 256 + 256 + 256 * 10 + 10
    assert count_flops(MLP()) == 784 * 128 + 128 * 256 + 256 * 10


def test_count_flops_and_params_on_tiny_nets_by_hand():
    # ConvNet widths (2, 3), a pool after conv 0, on 4x4: conv0 2*16*9, conv1 3*4*(2*9), FC (3*4)->10
    net = ConvNet(widths=(2, 3), pool_after=(0,), image_size=4)
    assert count_flops(net, (1, 1, 4, 4)) == 288 + 216 + 120
    assert count_flops(net, (5, 1, 4, 4)) == 288 + 216 + 120  # per sample
    assert count_params(net) == 18 + 4 + 54 + 6 + 130
    # ResNetLite 2 stages x 1 block, widths (2, 4), on 4x4: stem 2*16*9; block 0.0 two 2->2 convs at
    # 4x4; block 1.0 (stride 2, 2x2 out): conv1 2->4, conv2 4->4, 1x1 projection 2->4; FC 4 -> 10
    res = ResNetLite(stages=2, blocks=1, widths=(2, 4))
    assert count_flops(res, (1, 1, 4, 4)) == 288 + 2 * 576 + 288 + 576 + 32 + 40
    res.train()
    count_flops(res, (1, 1, 4, 4))
    assert res.training  # the mode is restored
    assert count_flops(MLP((4, 3, 2)), (1, 1, 2, 2)) == 12 + 6
    with pytest.raises(ValueError, match=r"input_shape must be 4 ints"):
        count_flops(net, (1, 4, 4))


# ------------------------------------------------------------------ structure
def test_groups_by_hand():
    res = ResNetLite()  # 3 stages x 2 blocks, 16/32/64
    g = groups(res)
    assert list(g)[:3] == ["stream.0", "stream.1", "stream.2"]
    s1 = g["stream.1"]
    assert s1.kind == "residual" and s1.width == 32
    assert set(s1.producers) == {"stages.1.0.shortcut.0", "stages.1.0.conv2", "stages.1.1.conv2"}
    assert set(s1.consumers) == {"stages.1.1.conv1", "stages.2.0.conv1", "stages.2.0.shortcut.0"}
    assert set(g["stream.0"].producers) == {"stem", "stages.0.0.conv2", "stages.0.1.conv2"}
    assert "fc" in g["stream.2"].consumers
    assert g["inner.1.0"].producers == ("stages.1.0.conv1",) and g["inner.1.0"].consumers == (
        "stages.1.0.conv2",
    )
    b = blocks(res)
    assert sorted(n for n, v in b.items() if v.removable) == [
        "block.0.0",
        "block.0.1",
        "block.1.1",
        "block.2.1",
    ]
    assert not b["block.1.0"].removable and b["block.2.1"].params == 2 * 64 * 64 * 9
    conv = groups(ConvNet())
    assert [x.kind for x in conv.values()] == ["conv", "conv", "conv", "flatten"]
    assert conv["conv.3"].members[-1].module == "fc" and conv["conv.3"].members[-1].span == 49
    assert group_widths(MLP()) == {"hidden.0": 128, "hidden.1": 256}
    assert blocks(MLP()) == {}
    lg = layer_groups(res)
    assert lg["stem"] == (None, "stream.0") and lg["fc"] == ("stream.2", None)
    assert lg["stages.1.0.shortcut.0"] == ("stream.0", "stream.1")


def test_blocks_per_stage_four():
    b = blocks(ResNetLite(blocks=4))
    assert len(b) == 12 and sum(v.removable for v in b.values()) == 10


# ------------------------------------------------------------------ masks == surgery
CASES = {
    "mlp hidden units": (lambda: MLP(), {"hidden.0": [0, 5, 7, 100], "hidden.1": torch.arange(0, 256, 3)}),
    "conv chain": (lambda: ConvNet(), {"conv.0": [1, 2, 30], "conv.1": torch.arange(10, 50), "conv.2": [5]}),
    "conv to fc (flatten)": (lambda: ConvNet(), {"conv.3": [0, 17, 64, 127]}),
    "residual stream 0 (stem)": (lambda: ResNetLite(), {"stream.0": [0, 3, 4, 15]}),
    "residual stream 1 (projections)": (lambda: ResNetLite(), {"stream.1": torch.arange(1, 32, 2)}),
    "residual stream 2 (fc)": (lambda: ResNetLite(blocks=4), {"stream.2": [2, 3, 40, 63]}),
    "block inner width": (lambda: ResNetLite(), {"inner.0.1": [3], "inner.2.0": torch.arange(20)}),
    "everything at once": (
        lambda: ResNetLite(),
        {"stream.0": [1, 2, 3], "stream.1": [0, 31], "stream.2": torch.arange(0, 64, 4), "inner.1.1": [7, 8]},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sliced_network_equals_masked_network(case):
    build, keep = CASES[case]
    model = _randomise_bn(build()).eval()
    x = _x()
    dense = model(x).logits
    sliced = copy.deepcopy(model)
    report = remove_channels(sliced, keep)
    with mask_channels(model, keep):
        masked = model(x).logits
        model.train()
        masked_train = model(x).logits  # batch statistics
        model.eval()
    assert (masked - dense).abs().max() > 1e-3  # the masks do something
    err = (sliced(x).logits - masked).abs().max().item()
    assert err < 1e-5, f"sliced vs masked: {err:.2e}"
    sliced.train()
    err = (sliced(x).logits - masked_train).abs().max().item()
    assert err < 1e-4, f"sliced vs masked, training mode: {err:.2e}"
    for name, kept in keep.items():
        assert group_widths(sliced)[name] == len(kept) == report.channels[name][1]
    assert report.params_after == count_params(sliced) < report.params_before == count_params(model)
    # the sliced shape is exactly a freshly built network of those widths (the PreCrop path)
    fresh = with_widths(model, group_widths(sliced))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in sliced.state_dict().items()
    }
    rebuilt = type(model)(**sliced.arch())
    rebuilt.load_state_dict(sliced.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x).logits, sliced.eval()(x).logits, rtol=0, atol=0)


def test_conv_params_after_slicing_by_hand():
    net = ConvNet()
    remove_channels(net, {"conv.1": torch.arange(16), "conv.3": torch.arange(100)})
    convs = 1 * 32 * 9 + 32 * 16 * 9 + 16 * 128 * 9 + 128 * 100 * 9
    assert count_params(net) == convs + 2 * (32 + 16 + 128 + 100) + 100 * 49 * 10 + 10
    assert net.fc.in_features == 4900 and net.bns[1].running_mean.shape == (16,)


def test_removed_blocks_equal_masked_blocks():
    model = _randomise_bn(ResNetLite(blocks=4)).eval()
    x = _x()
    names = ["block.0.0", "block.1.2", "block.2.1", "block.2.3"]
    dense = model(x).logits
    pruned = copy.deepcopy(model)
    report = remove_blocks(pruned, names)
    assert report.blocks == names
    assert report.params_before - report.params_after == sum(blocks(model)[n].params for n in names) + 2 * (
        16 * 2 + 32 * 2 + 64 * 4
    )  # the convs and both BNs' weight and bias
    with mask_blocks(model, names):
        masked = model(x).logits
    assert (masked - dense).abs().max() > 1e-3
    assert (pruned(x).logits - masked).abs().max().item() < 1e-5
    assert sorted(blocks(pruned)) == sorted(set(blocks(model)) - set(names))
    # an independent identity: the network without those blocks, run by hand
    h = torch.relu(model.stem_bn(model.stem(x)))
    for s, stage in enumerate(model.stages):
        for k, blk in stage.items():
            if f"block.{s}.{k}" not in names:
                h = blk(h)
    torch.testing.assert_close(pruned(x).logits, model.fc(h.mean((2, 3))))
    rebuilt = ResNetLite(**pruned.arch())
    rebuilt.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x).logits, pruned(x).logits, rtol=0, atol=0)
    # blocks and channels together: masks stack, surgery composes
    keep = {"stream.1": torch.arange(0, 32, 2), "inner.0.1": [1, 2]}
    with mask_blocks(model, names), mask_channels(model, keep):
        both = model(x).logits
    remove_channels(pruned, keep)
    assert (pruned(x).logits - both).abs().max().item() < 1e-5


# ------------------------------------------------------------------ reversibility
def _snapshot(model: nn.Module):
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    classes = {n: type(m) for n, m in model.named_modules()}
    return params, classes


def _assert_restored(model: nn.Module, snap) -> None:
    params, classes = snap
    now = dict(model.named_parameters())
    assert now.keys() == params.keys()
    for n, (obj, value) in params.items():
        assert now[n] is obj and torch.equal(obj, value), n
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_masks_restore_exactly_also_after_an_exception():
    model = ResNetLite()
    x = _x()
    dense = model.eval()(x).logits
    snap = _snapshot(model)
    with mask_channels(model, {"stream.1": [0, 1]}), mask_blocks(model, ["block.0.1"]):
        assert model.stages[1]["0"].conv2.weight[2:].abs().sum() == 0
    _assert_restored(model, snap)
    with pytest.raises(RuntimeError, match="boom"):
        with mask_channels(model, {"stream.0": [0], "inner.2.1": [3, 4]}):
            raise RuntimeError("boom")
    _assert_restored(model, snap)
    assert torch.equal(model(x).logits, dense)
    # restored out of order, next to a foreign parametrization that must stay
    parametrize.register_parametrization(model.fc, "weight", _Double())
    a = mask_channels(model, {"stream.2": [0, 1, 2]})
    b = mask_blocks(model, ["block.2.1"])
    a.restore()
    assert len(model.fc.parametrizations["weight"]) == 1
    assert model.stages[2]["1"].bn2.weight.abs().sum() == 0  # b still active
    b.restore()
    b.restore()  # idempotent
    parametrize.remove_parametrizations(model.fc, "weight", leave_parametrized=False)
    _assert_restored(model, snap)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_a_bad_keep_masks_nothing():
    model = ConvNet()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"out of range \[0, 127\]"):
        mask_channels(model, {"conv.0": [0], "conv.3": [0, 128]})
    _assert_restored(model, snap)


# ------------------------------------------------------------------ errors
def test_clear_errors():
    res, net = ResNetLite(), ConvNet()
    with pytest.raises(ValueError, match=r"unknown channel group 'conv.9'.*'conv.0', 'conv.1'"):
        remove_channels(net, {"conv.9": [0]})
    with pytest.raises(ValueError, match=r"'stream.1': channel index 32 is out of range \[0, 31\]"):
        remove_channels(res, {"stream.1": [0, 32]})
    with pytest.raises(ValueError, match=r"channel index -1 is out of range"):
        mask_channels(res, {"stream.1": [-1]})
    with pytest.raises(ValueError, match=r"would remove every channel \(width 16\)"):
        remove_channels(res, {"inner.0.0": []})
    with pytest.raises(ValueError, match=r"repeats a channel"):
        remove_channels(res, {"inner.0.0": [1, 1]})
    with pytest.raises(ValueError, match=r"integer channel indices"):
        remove_channels(res, {"inner.0.0": [0.5]})
    with pytest.raises(ValueError, match=r"'block.1.0' changes shape.*removable blocks are \['block.0.0'"):
        remove_blocks(res, ["block.1.0"])
    with pytest.raises(ValueError, match=r"unknown block 'block.7.0'"):
        mask_blocks(res, ["block.7.0"])
    with pytest.raises(ValueError, match=r"unknown block 'block.0.0'.*removable blocks \[\]"):
        remove_blocks(net, ["block.0.0"])
    with pytest.raises(UnsupportedModelError, match=r"Sequential is not one of.*MLP, ConvNet, ResNetLite"):
        groups(nn.Sequential(nn.Linear(2, 2)))
    with mask_channels(net, {"conv.0": [0]}):
        with pytest.raises(PrunekitError, match=r"restore\(\) them before physical surgery"):
            remove_channels(net, {"conv.1": [0]})
    with pytest.raises(ValueError, match=r"ratios\['conv.0'\] must be a number > 0"):
        with_widths(net, ratios={"conv.0": 0})
    with pytest.raises(ValueError, match=r"stages=3 needs 3 widths"):
        ResNetLite(widths=(16, 32))
    with pytest.raises(ValueError, match=r"dropped names blocks that cannot be removed.*'1.0'"):
        ResNetLite(dropped=["1.0"])


# ------------------------------------------------------------------ with_widths (PreCrop)
def test_with_widths_follows_groups():
    net = with_widths(ConvNet(), ratios={"conv.0": 0.5, "conv.3": 0.1}, seed=1)
    assert net.arch()["widths"] == (16, 64, 128, 13)
    assert net.fc.in_features == 13 * 49
    res = with_widths(ResNetLite(), widths={"stream.1": 8}, ratios={"inner.2.1": 2.0})
    # every conv adding into stream 1 and every conv reading it changed together
    assert res.stages[1]["0"].shortcut[0].out_channels == res.stages[1]["0"].conv2.out_channels == 8
    assert res.stages[1]["1"].conv2.out_channels == res.stages[1]["1"].conv1.in_channels == 8
    assert res.stages[2]["0"].conv1.in_channels == res.stages[2]["0"].shortcut[0].in_channels == 8
    assert res.stages[1]["1"].conv1.out_channels == 32  # its inner group was not named
    assert res.stages[2]["1"].conv1.out_channels == 128  # widened (PreConfig)
    assert res(_x()).logits.shape == (4, 10)
    assert with_widths(MLP(), ratios={"hidden.1": 0.25}).arch()["sizes"] == (784, 128, 64, 10)


# ------------------------------------------------------------------ Fashion-MNIST
def test_fashion_batches_against_the_raw_arrays():
    from prunekit.assets import fashion_mnist

    images, labels = fashion_mnist("test")
    bs = fashion_batches("test", 32, limit=70, seed=None)
    assert [len(b["labels"]) for b in bs] == [32, 32, 6]
    assert bs[0]["pixel_values"].shape == (32, 1, 28, 28) and bs[0]["pixel_values"].dtype == torch.float32
    assert bs[0]["labels"].dtype == torch.int64
    want = (images[33].astype(np.float64) / 255 - FASHION_MEAN) / FASHION_STD
    np.testing.assert_allclose(bs[1]["pixel_values"][1, 0].numpy(), want, atol=1e-5)
    assert bs[2]["labels"].tolist() == labels[64:70].tolist()
    a, b = fashion_batches("train", 100, limit=300, seed=1), fashion_batches("train", 100, limit=300, seed=1)
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b, strict=True))
    c = fashion_batches("train", 100, limit=300, seed=2)
    assert not torch.equal(a[0]["labels"], c[0]["labels"])
    x = torch.cat([b["pixel_values"] for b in fashion_batches("train", 1000, limit=5000)])
    assert abs(x.mean().item()) < 0.03 and abs(x.std().item() - 1) < 0.03  # the training set's statistics
    with pytest.raises(ValueError, match=r"split must be 'train' or 'test'; got 'val'"):
        fashion_batches("val", 8)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1; got 0"):
        fashion_batches("test", 0)


class _Always(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.w = k, nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values, labels=None):
        logits = torch.zeros(len(pixel_values), 10)
        logits[:, self.k] = 1
        return SimpleNamespace(logits=logits)


def test_evaluate_classifier_counts_right():
    from prunekit.assets import fashion_mnist

    labels = fashion_mnist("test")[1][:777]
    for k in (0, 7):
        assert evaluate_classifier(_Always(k), limit=777, batch_size=100) == float((labels == k).mean())


def test_convnet_trains_with_train_batches():
    from prunekit.training import train_batches

    torch.set_num_threads(1)
    model = ConvNet(widths=(8, 16, 16, 16), seed=0)
    batches = fashion_batches("train", 64, limit=640, seed=0)
    before = evaluate_classifier(model, limit=500)
    result = train_batches(model, batches, steps=30, lr=3e-3, progress=False)
    assert result.steps == 30
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.6 * first, (first, last)
    after = evaluate_classifier(model, limit=500)
    assert after > 0.6 and after > before + 0.3, (before, after)


def test_rebuilt_without_blocks_inherits_the_same_initial_weights():
    # Layers-Lottery trains F' from the kept blocks' theta_0: building with `dropped` and the same
    # seed gives exactly the dense network's initial weights minus the dropped blocks
    dense, thin = ResNetLite(blocks=4, seed=5), ResNetLite(blocks=4, dropped=["0.2", "2.3"], seed=5)
    d, t = dense.state_dict(), thin.state_dict()
    assert set(t) == {k for k in d if not k.startswith(("stages.0.2.", "stages.2.3."))}
    assert all(torch.equal(t[k], d[k]) for k in t)
