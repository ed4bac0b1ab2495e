"""Stage (c) on every encoder family: restoration, identity budget, batching, an independent
masked reference for the cut, the recomputed [CLS] row, errors, and ToMe on the real DINOv2-S."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertLMHeadModel, ViTForMaskedImageModeling

import prunekit
from invariants import assert_same, snapshot
from prunekit.errors import SignalUnavailableError, UnsupportedModelError
from prunekit.tokens.methods.tome import ToMe
from tiny_encoders import CLASSES, ENCODERS, build, build_class, build_clip, inputs, output

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
            return model(**inp, output_hidden_states=True).hidden_states[-1]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("fam", ["vit", "deit", "dinov2", "clip_vision", "bert"])
@pytest.mark.parametrize("method", ["fastervlm", "divprune", "random"])
def test_cut_equals_masked_reference(fam, method):
    model = build(fam, attn="eager")
    inp = inputs(fam, model, batch=2)
    with torch.no_grad(), prunekit.prune_tokens(model, method, keep=0.4, layer=2) as s:
        pruned = model(**inp, output_hidden_states=True).hidden_states[-1]  # (B, T', D): kept first
    kept = s.stats.kept_masks[0]
    ref = masked_reference_hidden(model, fam, inp, kept, K=2)
    for b in range(kept.shape[0]):
        n = int(kept[b].sum())
        err = (pruned[b, :n] - ref[b, kept[b]]).abs().max().item()
        assert err < 1e-5, f"row {b}: kept tokens differ from the masked reference by {err:.2e} (tol 1e-5)"
    lengths = [pruned.shape[1]] * kept.shape[0] if s.output_mask is None else s.output_mask.sum(1).tolist()
    assert lengths == kept.sum(1).tolist()
    assert (s.output_mask is not None) == (fam == "bert")  # only BERT's padded batch leaves ragged rows


@pytest.mark.parametrize("method", ["fastervlm", "divprune", "random"])
def test_mean_pooling_with_the_session_mask_equals_the_masked_reference(method):
    """BERT, a padded batch: the output is shorter than the user's mask; ``session.attention_mask``
    pools it, and equals pooling the kept tokens of an independent masked reference."""
    model = build("bert", attn="eager")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (3, 16), generator=g)
    am = (torch.arange(16)[None] < torch.tensor([16, 11, 7])[:, None]).long()  # rows padded differently
    inp = dict(input_ids=ids, attention_mask=am)
    with torch.no_grad(), prunekit.prune_tokens(model, method, keep=0.4, layer=2) as s:
        h = model(**inp).last_hidden_state
    assert h.shape[1] < am.shape[1]  # pooling with the user's own mask cannot work
    m = s.attention_mask
    assert m.shape == h.shape[:2] and m.dtype == torch.long
    pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    kept = s.stats.kept_masks[0]  # (B, 16) input positions kept, padding excluded
    ref = masked_reference_hidden(model, "bert", inp, kept, K=2)
    expected = torch.stack([ref[b, kept[b]].mean(0) for b in range(3)])
    err = (pooled - expected).abs().max().item()
    assert err < 1e-5, f"pooled with session.attention_mask differs from the reference by {err:.2e}"
    # by hand: CLS + 0.4 of the 15, 10, 6 candidates (6.0, 4.0, 2.4: no rounding tie)
    assert m.sum(1).tolist() == [1 + 6, 1 + 4, 1 + 2]


def test_session_mask_after_spatten_and_token_sizes_after_tome():
    bert, vit = build("bert"), build("vit")
    inp = inputs("bert", bert, batch=2)
    with torch.no_grad(), prunekit.prune_tokens(bert, "spatten", keep=0.5) as s:
        h = bert(**inp).last_hidden_state
    assert s.attention_mask.shape == h.shape[:2] and s.token_sizes is None
    assert s.attention_mask.sum(1).tolist() == s.stats.kept_masks[-1].sum(1).tolist()
    x = inputs("vit", vit, batch=2)
    with torch.no_grad(), prunekit.prune_tokens(vit, "tome", keep=0.5) as s:
        h = vit(**x, output_hidden_states=True).hidden_states[-1]
    n_in = 1 + (32 // 8) ** 2  # CLS + a 4x4 patch grid
    assert h.shape[1] < n_in and s.token_sizes.shape == h.shape[:2]
    assert torch.equal(s.attention_mask, torch.ones(h.shape[:2], dtype=torch.long))
    assert s.token_sizes.sum(1).tolist() == [n_in, n_in]  # every input token counted once
    assert s.token_sizes[:, 0].tolist() == [1.0, 1.0]  # CLS is never merged


@pytest.mark.parametrize("fam", ENCODERS)
def test_recomputed_cls_row_and_fastervlm_selection_match_eager(fam):
    model = build(fam, attn="eager")
    inp = inputs(fam, model, batch=2)
    with torch.no_grad():
        att = model(**inp, output_attentions=True).attentions[1]  # block K-1 = 1
    row = att.mean(1)[:, 0]  # (B, T) head mean of the CLS query
    with torch.no_grad(), prunekit.prune_tokens(model, "fastervlm", keep=3, layer=2) as s:
        model(**inp)
    err = (s.adapter.maps["cls_attention"] - row).abs().max().item()
    assert err < 1e-5, f"recomputed CLS row differs from eager output_attentions by {err:.2e} (tol 1e-5)"
    kept, p = s.stats.kept_masks[0], s.adapter.protected
    valid = inp.get("attention_mask", torch.ones(row.shape, dtype=torch.long)).bool()
    for b in range(row.shape[0]):
        cand = valid[b].clone()
        cand[:p] = False
        pos = cand.nonzero().flatten()
        expected = set(pos[row[b, pos].topk(3).indices].tolist())
        assert set(kept[b].nonzero().flatten().tolist()) - set(range(p)) == expected
        assert bool(kept[b, :p].all())


@pytest.mark.parametrize(("fam", "method"), [c for c in CASES if c[1] != "random"])
def test_each_row_of_a_batch_is_pruned_as_if_alone(fam, method):
    """Batch of 2 vs each row alone (deterministic methods); BERT's padded row alone is the row
    without its padding."""
    model = build(fam)
    inp = inputs(fam, model, batch=2)
    with torch.no_grad(), prunekit.prune_tokens(model, method, keep=0.5, **options(method)) as s:
        both = model(**inp, output_hidden_states=True).hidden_states[-1]
        valid = s.output_mask
        for b in range(2):
            row = {k: v[b : b + 1] for k, v in inp.items()}
            if fam == "bert":
                n = int(row["attention_mask"].sum())
                row = {k: v[:, :n] for k, v in row.items()}
            alone = model(**row, output_hidden_states=True).hidden_states[-1][0]
            got = both[b] if valid is None else both[b, valid[b].bool()]
            assert got.shape == alone.shape, f"row {b}: {tuple(got.shape)} vs alone {tuple(alone.shape)}"
            err = (got - alone).abs().max().item()
            assert err < 1e-5, f"row {b} in the batch differs from the row alone by {err:.2e} (tol 1e-5)"


def test_full_clip_model_prunes_only_its_vision_tower():
    """CLIPModel: the text tower is untouched, and the text padding mask (here of the same shape as
    the vision tokens, 17) must not be taken for a vision mask."""
    model = build_clip()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 17), generator=g)
    am = torch.ones_like(ids)
    am[1, 9:] = 0
    inp = dict(input_ids=ids, attention_mask=am, pixel_values=torch.randn(2, 3, 28, 28, generator=g))
    before = snapshot(model)
    with torch.no_grad():
        dense = model(**inp)
        with prunekit.prune_tokens(model, "fastervlm", keep=1.0, layer=2):
            same = model(**inp)
        for method in ("fastervlm", "tome"):
            with prunekit.prune_tokens(model, method, keep=0.5, **options(method)) as s:
                pruned = model(**inp)
            assert s.stats.tokens_in == 2 * 16 and s.stats.tokens_kept == 2 * 8, method
            assert s.output_mask is None
            assert torch.equal(pruned.text_embeds, dense.text_embeds)
            assert not torch.allclose(pruned.image_embeds, dense.image_embeds)
    err = (same.logits_per_image - dense.logits_per_image).abs().max().item()
    assert err < 1e-5, f"keep=1.0 differs from dense by {err:.2e} (tolerance 1e-5)"
    assert_same(before, snapshot(model))


def test_bert_padding_is_read_where_the_base_model_receives_it():
    """Multiple choice reshapes (B, C, L) masks to (B*C, L) before BertModel; a direct call to
    ``model.bert`` skips the task head's forward. Padding is never kept in either case."""
    mc, _ = build_class("BertForMultipleChoice")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 3, 12), generator=g)
    am = torch.ones_like(ids)
    am[0, 1, 7:], am[1, 2, 4:] = 0, 0
    with torch.no_grad():
        dense = mc(input_ids=ids, attention_mask=am).logits
        with prunekit.prune_tokens(mc, "random", keep=1.0, layer=2):
            same = mc(input_ids=ids, attention_mask=am).logits
        with prunekit.prune_tokens(mc, "random", keep=0.5, layer=2) as s:
            mc(input_ids=ids, attention_mask=am)
    err = (same - dense).abs().max().item()
    assert err < 1e-5, f"keep=1.0 differs from dense by {err:.2e} (tolerance 1e-5)"
    assert not bool((s.stats.kept_masks[0] & ~am.view(6, 12).bool()).any())

    seq, _ = build_class("BertForSequenceClassification")
    inp = inputs("bert", seq)
    with torch.no_grad(), prunekit.prune_tokens(seq, "random", keep=0.5, layer=2) as s:
        seq.bert(inp["input_ids"], inp["attention_mask"])
    assert not bool((s.stats.kept_masks[0] & ~inp["attention_mask"].bool()).any())


def test_tome_lengths_follow_the_schedule():
    model = build("vit")
    x = inputs("vit", model)["pixel_values"]
    schedule = ToMe().merge_schedule(16, 4, 0.25)
    with torch.no_grad(), prunekit.prune_tokens(model, "tome", keep=0.25) as s:
        hs = model(pixel_values=x, output_hidden_states=True).hidden_states
    lengths = [17]
    for r in schedule:
        lengths.append(lengths[-1] - r)
    assert [h.shape[1] for h in hs] == lengths and lengths[-1] == 1 + 4
    assert s.stats.tokens_in == 2 * 16 and s.stats.tokens_kept == 2 * 4 and s.stats.select_seconds > 0


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
    with pytest.raises(UnsupportedModelError) as e:
        with prunekit.prune_tokens(bert, "divprune", keep=0.5, stage="vision"):
            pass
    assert str(e.value) == (
        "bert (BertModel) has no token stage 'vision' (visual tokens between the vision tower and the "
        "LLM): an encoder alone has no visual tokens between a tower and an LLM; it offers ['encoder']"
    )
    mim = ViTForMaskedImageModeling(vit.config).eval()
    with pytest.raises(UnsupportedModelError, match="image grid"):
        with prunekit.prune_tokens(mim, "random", keep=0.5, layer=2):
            pass
    causal = BertLMHeadModel(BertConfig.from_dict({**bert.config.to_dict(), "is_decoder": True}))
    with pytest.raises(UnsupportedModelError, match="is_decoder"):
        with prunekit.prune_tokens(causal, "random", keep=0.5, layer=2):
            pass
    for model in (mim, causal):
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())

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


@pytest.mark.parametrize("cls_name", CLASSES)
def test_every_listed_class_gets_its_family_adapter(cls_name):
    from prunekit.models import get_adapter

    model, fam = build_class(cls_name)
    adapter = get_adapter(model)
    assert adapter.family == fam and len(adapter.layers) == 4
    with pytest.raises(UnsupportedModelError, match="stage 'llm'"):
        with prunekit.prune_tokens(model, "random", keep=0.5, stage="llm"):
            pass


def test_bert_attention_mask_given_positionally():
    model = build("bert")
    inp = inputs("bert", model)
    with torch.no_grad(), prunekit.prune_tokens(model, "random", keep=0.5, layer=2) as s:
        by_kw = model(**inp).last_hidden_state
        by_pos = model(inp["input_ids"], inp["attention_mask"]).last_hidden_state
    assert torch.equal(by_kw, by_pos)
    assert not bool((s.stats.kept_masks[1] & ~inp["attention_mask"].bool()).any())  # padding dropped


@dataclass
class ToMeAllInBlock0(ToMe):
    """ToMe merging half the mergeable tokens in block 0 and none after."""

    def merge_schedule(self, n_mergeable, n_blocks, keep):
        return [n_mergeable // 2] + [0] * (n_blocks - 1)


@pytest.mark.parametrize("fam", ["vit", "deit", "dinov2", "clip_vision"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_tome_merging_exact_duplicates_equals_dense_only_with_proportional_attention(fam, prop_attn):
    """Independent check of proportional attention: a size-2 token merged from two identical
    tokens must act in later blocks exactly like the two copies did (log 2 on its logit), so
    the whole output equals the dense one. Without proportional attention it does not (which
    also proves the family's attention really applies the additive mask)."""
    model = build(fam)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "position_embedding" in name:
                param.zero_()  # identical patches -> identical tokens
    S = model.config.image_size
    P = S // 4
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    x[..., P : 2 * P], x[..., 3 * P :] = x[..., :P], x[..., 2 * P : 3 * P]  # 4x4 patches: col 1 = 0, 3 = 2
    # patch pairs (4i, 4i+1) and (4i+2, 4i+3) are copies; A/B alternate by patch index, so every
    # A token's copy is in B, whatever the number of protected tokens p
    p = 2 if fam == "deit" else 1
    T = p + 16
    with torch.no_grad():
        dense = model(pixel_values=x, output_hidden_states=True)
        with prunekit.prune_tokens(model, ToMeAllInBlock0(prop_attn=prop_attn), keep=0.5) as s:
            merged = model(pixel_values=x, output_hidden_states=True)
    assert [h.shape[1] for h in merged.hidden_states] == [T] + [p + 8] * 4
    assert s.stats.tokens_kept == 2 * 8
    survivors = list(range(p)) + list(range(p + 1 - p % 2, T, 2))  # protected, then the B set
    err = max(
        (output(merged) - output(dense)).abs().max().item(),
        (merged.hidden_states[-1] - dense.hidden_states[-1][:, survivors]).abs().max().item(),
    )
    if prop_attn:
        assert err < 1e-5, f"merged duplicates differ from dense by {err:.2e} (tol 1e-5)"
    else:
        assert err > 1e-3, f"without proportional attention the output should move; moved {err:.2e}"


# ---------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def dinov2_small():
    try:
        from prunekit import zoo
    except ImportError:
        zoo = None
    if zoo is not None and hasattr(zoo, "dinov2_small"):
        return zoo.dinov2_small()
    from transformers import Dinov2Model

    path = os.path.expanduser("~/.cache/offline-assets/dinov2-small-imgfocus")
    if not os.path.isdir(path):
        pytest.skip(f"DINOv2-S not found at {path}")
    return Dinov2Model.from_pretrained(path).eval()


def fashion_mnist_test_images(n: int) -> np.ndarray:
    try:
        from prunekit.assets import fashion_mnist
    except ImportError:
        import gzip
        import subprocess

        files = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True).stdout
        path = next((f for f in files.split() if f.endswith("t10k-images-idx3-ubyte.gz")), None)
        if path is None:
            pytest.skip("Fashion-MNIST (Debian package dataset-fashion-mnist) not installed")
        with gzip.open(path, "rb") as f:
            data = f.read()
        return np.frombuffer(data, np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    return fashion_mnist("test")[0][:n]


def imagenet_batch(images: np.ndarray, size: int = 224) -> torch.Tensor:
    """``uint8 (N, 28, 28)`` -> ``(N, 3, size, size)``: bilinear, grey to RGB, ImageNet mean/std."""
    x = torch.from_numpy(images.astype(np.float32))[:, None] / 255.0  # (N, 1, 28, 28)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - mean) / std


def test_tome_keeps_dinov2_features_better_than_random(dinov2_small):
    """Real DINOv2-S on 16 real Fashion-MNIST images; half the 256 patch tokens are gone by the
    end (ToMe: merged gradually over the 12 blocks; random: cut at block 4)."""
    model = dinov2_small
    x = imagenet_batch(fashion_mnist_test_images(16))
    with torch.no_grad():
        dense = model(pixel_values=x).pooler_output

        def cosine(method, **opts):
            with prunekit.prune_tokens(model, method, keep=0.5, **opts) as s:
                out = model(pixel_values=x).pooler_output
            assert abs(s.stats.kept_fraction - 0.5) < 0.01
            return torch.nn.functional.cosine_similarity(out, dense).mean().item()

        tome, rand = cosine("tome"), cosine("random", layer=4)
    print(f"DINOv2-S CLS cosine to dense at keep=0.5: ToMe {tome:.4f}, random (cut at block 4) {rand:.4f}")
    assert tome > rand, f"ToMe {tome:.4f} should beat random {rand:.4f}"
