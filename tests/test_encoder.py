"""Stage (c) on every encoder family: restoration, identity budget, batching, an independent
masked reference for the cut, the recomputed [CLS] row, errors, and ToMe on the real DINOv2-S."""

from __future__ import annotations

import pytest
import torch

import prunekit
from invariants import assert_same, snapshot
from prunekit.errors import SignalUnavailableError, UnsupportedModelError
from tiny_encoders import ENCODERS, build, inputs, output

CASES = [
    (f, m)
    for f in ENCODERS
    for m in ("tome", "fastervlm", "divprune", "random")
    if (f, m) != ("bert", "tome")
]


def options(method: str) -> dict:
    return {} if method == "tome" else {"layer": 2}


@pytest.mark.parametrize(("fam", "method"), CASES)
def test_identity_budget_restoration_and_batch(fam, method):
    model = build(fam)
    inp = inputs(fam, model, batch=2)
    with torch.no_grad():
        dense = output(model(**inp))
        before = snapshot(model)
        with prunekit.prune_tokens(model, method, keep=1.0, stage="encoder", **options(method)) as s:
            same = output(model(**inp))
        assert s.stats.kept_fraction == 1.0
        with prunekit.prune_tokens(model, method, keep=0.5, stage="encoder", **options(method)) as s:
            pruned = output(model(**inp))
        with pytest.raises(RuntimeError, match="inside"):
            with prunekit.prune_tokens(model, method, keep=0.5, **options(method)):
                model(**inp)
                raise RuntimeError("inside the block")
        after = output(model(**inp))
    err = (dense - same).abs().max().item()
    assert err < 1e-5, f"keep=1.0 differs from dense by {err:.2e} (tolerance 1e-5)"
    assert pruned.shape == dense.shape and not torch.allclose(pruned, dense)
    assert 0.4 < s.stats.kept_fraction < 0.6
    assert torch.equal(dense, after)
    assert_same(before, snapshot(model))


def masked_reference_hidden(model, fam, inp, kept: torch.Tensor, K: int) -> torch.Tensor:
    """Eager model, all tokens kept, dropped tokens hidden as keys in blocks >= K."""
    from prunekit.models import get_adapter

    layers = get_adapter(model).layers
    valid = inp.get("attention_mask", torch.ones_like(kept, dtype=torch.long)).bool()
    hide = (valid & ~kept)[:, None, None, :]  # (B, 1, 1, T)

    def hook(layer, args, kw):
        am = args[1] if len(args) > 1 else kw.get("attention_mask")
        T = args[0].shape[1]
        base = torch.zeros(args[0].shape[0], 1, 1, T) if am is None else am.float()
        new = base.masked_fill(hide, torch.finfo(torch.float32).min)
        if len(args) > 1:
            return (args[0], new, *args[2:]), kw
        kw["attention_mask"] = new
        return args, kw

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers[K:]]
    try:
        with torch.no_grad():
            return model(**inp).last_hidden_state
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("fam", ["dinov2", "clip_vision", "bert"])
@pytest.mark.parametrize("method", ["fastervlm", "divprune", "random"])
def test_cut_equals_masked_reference(fam, method):
    model = build(fam, attn="eager")
    inp = inputs(fam, model, batch=2)
    with torch.no_grad(), prunekit.prune_tokens(model, method, keep=0.4, layer=2) as s:
        pruned = model(**inp).last_hidden_state  # (B, T', D): kept tokens first, in order
    kept = s.stats.kept_masks[0]
    ref = masked_reference_hidden(model, fam, inp, kept, K=2)
    for b in range(kept.shape[0]):
        n = int(kept[b].sum())
        err = (pruned[b, :n] - ref[b, kept[b]]).abs().max().item()
        assert err < 1e-5, f"row {b}: kept tokens differ from the masked reference by {err:.2e} (tol 1e-5)"
    assert s.output_mask.sum(1).tolist() == kept.sum(1).tolist()


@pytest.mark.parametrize("fam", ["vit", "bert"])
def test_recomputed_cls_row_and_fastervlm_selection_match_eager(fam):
    model = build(fam, attn="eager")
    inp = inputs(fam, model, batch=2)
    with torch.no_grad():
        att = model(**inp, output_attentions=True).attentions[1]  # block K-1 = 1
    row = att.mean(1)[:, 0]  # (B, T) head mean of the CLS query
    with torch.no_grad(), prunekit.prune_tokens(model, "fastervlm", keep=3, layer=2) as s:
        model(**inp)
    kept = s.stats.kept_masks[0]
    valid = inp.get("attention_mask", torch.ones(row.shape, dtype=torch.long)).bool()
    for b in range(row.shape[0]):
        cand = valid[b].clone()
        cand[0] = False
        pos = cand.nonzero().flatten()
        expected = set(pos[row[b, pos].topk(3).indices].tolist())
        assert set(kept[b].nonzero().flatten().tolist()) - {0} == expected
        assert bool(kept[b, 0])


def test_deit_keeps_both_special_tokens_first():
    model = build("deit")
    inp = inputs("deit", model)
    with torch.no_grad():
        dense = model.deit(**inp).last_hidden_state
        with prunekit.prune_tokens(model, "tome", keep=0.25):
            merged = model.deit(**inp).last_hidden_state
    assert merged.shape[1] < dense.shape[1]
    assert not torch.allclose(merged[:, :2], dense[:, :2])  # later blocks see fewer tokens...
    with torch.no_grad(), prunekit.prune_tokens(model, "random", keep=0.25, layer=3) as s:
        model.deit(**inp)
    assert bool(s.stats.kept_masks[0][:, :2].all())  # ...but CLS and distillation are never dropped


def test_encoder_errors():
    vit, bert = build("vit"), build("bert")
    for bad in (0, 4, -1):
        with pytest.raises(ValueError, match=r"\[1, 3\]"):
            with prunekit.prune_tokens(vit, "random", keep=0.5, layer=bad):
                pass
    with pytest.raises(UnsupportedModelError, match="post-norm"):
        with prunekit.prune_tokens(bert, "tome", keep=0.5):
            pass
    with pytest.raises(UnsupportedModelError, match="stage"):
        with prunekit.prune_tokens(vit, "fastv", keep=0.5):
            pass

    from dataclasses import dataclass

    from prunekit.tokens.context import Signal
    from prunekit.tokens.methods.random import RandomDrop

    @dataclass
    class NeedsLastToken(RandomDrop):
        def needs(self, stage):
            return (Signal("last_token_attention"),)

    NeedsLastToken.name = "random"
    before = snapshot(vit)
    with pytest.raises(SignalUnavailableError, match="last_token_attention"):
        with prunekit.prune_tokens(vit, NeedsLastToken(layer=2), keep=0.5):
            pass
    assert_same(before, snapshot(vit))


# ---------------------------------------------------------------- real model
def test_tome_keeps_dinov2_features_better_than_random():
    """Real DINOv2-S on 16 real Fashion-MNIST images, half the patch tokens gone by the end."""
    from prunekit.assets import fashion_mnist
    from prunekit.models import zoo

    model = zoo.dinov2_small()
    images, _ = fashion_mnist("test")
    x = zoo.image_batch(images[:16])
    with torch.no_grad():
        dense = model(pixel_values=x).pooler_output

        def cosine(method, **opts):
            with prunekit.prune_tokens(model, method, keep=0.5, **opts):
                out = model(pixel_values=x).pooler_output
            return torch.nn.functional.cosine_similarity(out, dense).mean().item()

        tome, rand = cosine("tome"), cosine("random", layer=4)
    print(f"DINOv2-S CLS cosine to dense at keep=0.5: ToMe {tome:.4f}, random (cut at block 4) {rand:.4f}")
    assert tome > rand
