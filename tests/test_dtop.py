"""DToP (early exit of easy tokens for segmentation): the exit rule by hand, no exit == the dense
segmenter, every patch's logits against a full-length masked reference, batching, the
segmentation data and metrics by hand, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from prunekit.tokens.dtop import DToP, easy_tokens
from prunekit.zoo.segmentation import (
    BACKGROUND,
    INK,
    SegHeads,
    confusion,
    mean_iou,
    paint,
    patch_labels,
    scenes,
)


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2, image_size=28, patch_size=7
    )
    model = Dinov2Model(cfg).eval()
    heads = SegHeads(32, (1, 2), classes=3)
    for p in heads.parameters():  # sharper heads: some tokens become confident
        p.data.mul_(8)
    return model, heads


def test_exit_rule_by_hand():
    conf = torch.tensor([[0.99, 0.97, 0.96, 0.50, 0.98, 0.99]])
    cls = torch.tensor([[0, 0, 0, 0, 1, 2]])
    alive = torch.tensor([[True, True, True, True, True, False]])
    # easy (>= 0.95, alive): tokens 0, 1, 2 (class 0) and 4 (class 1); token 5 is not alive
    assert easy_tokens(conf, cls, alive, 0.95, 0).tolist() == [[True, True, True, False, True, False]]
    # top_k = 1 keeps the most confident easy token of each class: 0 (class 0) and 4 (class 1)
    assert easy_tokens(conf, cls, alive, 0.95, 1).tolist() == [[False, True, True, False, False, False]]
    # top_k = 2: 0 and 1 of class 0 stay
    assert easy_tokens(conf, cls, alive, 0.95, 2).tolist() == [[False, False, True, False, False, False]]
    # ties in confidence: the lower index stays
    tie = easy_tokens(
        torch.tensor([[0.97, 0.97]]), torch.tensor([[1, 1]]), torch.ones(1, 2, dtype=torch.bool), 0.95, 1
    )
    assert tie.tolist() == [[False, True]]


def test_no_exit_is_the_dense_segmenter():
    model, heads = tiny()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = heads.head(model(pixel_values=x).last_hidden_state[:, 1:])
    out = DToP(model, heads, p0=float("inf"))(x)
    assert torch.allclose(out.logits, ref, atol=1e-5)
    assert bool((out.exit_block == 4).all()) and all(c.tolist() == [17, 17] for c in out.tokens_per_block)


def test_collected_features_are_what_each_head_reads():
    model, heads = tiny()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        o = model(pixel_values=x, output_hidden_states=True)
    out = DToP(model, heads, p0=float("inf"))(x, collect=True)
    f, where = out.features["final"]
    assert where.tolist() == [[b, n] for b in range(2) for n in range(16)]
    assert torch.allclose(f, o.last_hidden_state[:, 1:].reshape(-1, 32), atol=1e-5)
    f1, _ = out.features[1]
    assert torch.allclose(f1, o.hidden_states[1][:, 1:].reshape(-1, 32), atol=1e-5)
    out = DToP(model, heads, p0=0.99, top_k=0)(x, collect=True)  # later heads read fewer patches
    alive_after = (out.exit_block > 1).sum().item()
    assert out.features[2][0].shape[0] == alive_after and out.features["final"][1].shape[0] <= alive_after


def masked_reference(model, heads, x, p0, top_k):
    """Every token kept to the end, its exit decided here: at each exit block the head grades the
    patches not exited yet (the exit rule, hand-checked above); a patch that exited after block b
    is hidden as a key from block b on. Returns each patch's logits from the head where it exited
    (else the final head) and its exit block."""
    layers = model.encoder.layer
    h = model.embeddings(x)
    B, T, _ = h.shape
    exit_block = torch.full((B, T - 1), len(layers))
    logits = torch.zeros(B, T - 1, 3)
    for i, layer in enumerate(layers):
        if i in heads.exits:
            aux = heads.auxiliary(i, h[:, 1:])
            conf, cls = aux.softmax(-1).max(-1)
            leave = easy_tokens(conf, cls, exit_block == len(layers), p0, top_k)
            exit_block[leave] = i
            logits = torch.where(leave[..., None], aux, logits)
        hide = torch.cat([torch.zeros(B, 1, dtype=torch.bool), exit_block <= i], dim=1)  # [CLS] stays
        mask = torch.zeros(B, 1, 1, T).masked_fill(hide[:, None, None, :], torch.finfo(torch.float32).min)
        h = layer(h, attention_mask=mask)
    final = heads.head(model.layernorm(h)[:, 1:])
    return torch.where((exit_block == len(layers))[..., None], final, logits), exit_block


@pytest.mark.parametrize("top_k", [0, 1])
def test_every_patch_matches_the_masked_reference(top_k):
    model, heads = tiny()
    x = torch.randn(3, 3, 28, 28)
    out = DToP(model, heads, p0=0.99, top_k=top_k)(x)
    exited = out.exit_block < 4
    assert bool(exited.any()) and not bool(exited.all()), "the case exits no token or every token"
    assert len({tuple(c.tolist()) for c in out.tokens_per_block}) > 1
    with torch.no_grad():
        ref, ref_exit = masked_reference(model, heads, x, 0.99, top_k)
    assert torch.equal(out.exit_block, ref_exit), "patches exit at other blocks than in the reference"
    err = (out.logits - ref).abs().max().item()
    assert err < 1e-4, f"differs from the masked reference by {err:.2e}"
    # tokens per block: [CLS] + the patches that exit later (a patch exiting at b skips block b on)
    for i, c in enumerate(out.tokens_per_block):
        assert c.tolist() == (1 + (out.exit_block > i).sum(1)).tolist(), f"block {i}"
    # batching: each image alone gives the same result
    for b in range(3):
        one = DToP(model, heads, p0=0.99, top_k=top_k)(x[b : b + 1])
        assert torch.equal(one.exit_block[0], out.exit_block[b])
        assert torch.allclose(one.logits[0], out.logits[b], atol=1e-5)


def test_segmentation_data_and_metrics_by_hand():
    a_img, a_mask = scenes("test", 3, seed=5)
    b_img, b_mask = scenes("test", 3, seed=5)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)  # deterministic
    assert a_img.shape == (3, 224, 224) and a_mask.dtype == np.uint8
    assert bool(((a_mask != BACKGROUND) == (a_img > INK)).all())  # an item's class exactly on its ink
    masks = np.full((1, 224, 224), BACKGROUND, dtype=np.uint8)
    masks[0, :14, :8] = 3  # 112 of patch 0's 196 pixels: majority 3
    masks[0, :14, 14:20] = 4  # 84 of patch 1's pixels: background wins
    lab = patch_labels(masks)
    assert lab.shape == (1, 256) and lab[0, 0] == 3 and lab[0, 1] == BACKGROUND and lab[0, 2] == BACKGROUND
    pix = paint(lab)
    assert pix.shape == (1, 224, 224) and bool((pix[0, :14, :14] == 3).all()) and pix[0, 0, 14] == BACKGROUND
    pred = torch.tensor([0, 0, 1, 1, 2])
    truth = torch.tensor([0, 1, 1, 1, 1])
    conf = confusion(pred, truth, 3)
    # class 0: TP 1, FP 1, FN 0 -> 1/2; class 1: TP 2, FP 0, FN 2 -> 1/2; class 2: TP 0, FP 1 -> 0
    assert mean_iou(conf) == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_bad_settings_are_refused():
    model, heads = tiny()
    with pytest.raises(ValueError, match="p0 must be in"):
        DToP(model, heads, p0=1.5)
    with pytest.raises(ValueError, match="top_k must be an int"):
        DToP(model, heads, top_k=-1)
    with pytest.raises(ValueError, match=r"exit blocks must be in \[1, 3\]"):
        DToP(model, SegHeads(32, (0, 2), classes=3))
