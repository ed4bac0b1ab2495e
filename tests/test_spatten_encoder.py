"""SpAtten at the encoder stage (cascade token and head pruning in ViT / DeiT / DINOv2 / CLIP /
BERT blocks): the importance and the head ranking against eager attentions and a dense run, the
cascades against a masked reference with the same heads zeroed, identity and restoration."""

from __future__ import annotations

import itertools

import pytest
import torch

import prunekit
from invariants import assert_same, snapshot
from prunekit.models import get_adapter
from prunekit.tokens.context import TokenContext
from prunekit.tokens.methods.spatten import SpAtten
from test_zero_tprune import hidden_dropped, real_tokens
from tiny_encoders import ENCODERS, build, inputs, output


class Spy(SpAtten):
    seen: list

    def select(self, ctx: TokenContext, k: int):
        self.seen.append((ctx.layer, ctx.signals["cumulative_attention"].clone(), k))
        return super().select(ctx, k)


def out_proj(model, layer):
    return get_adapter(model).output_projection(layer)


@pytest.mark.parametrize("fam", ENCODERS)
def test_importance_is_attention_received_over_blocks_heads_and_real_queries(fam):
    """First cut before block 2: blocks 0 and 1's eager attentions (dense, nothing cut yet) summed
    over heads, real queries and both blocks, at the candidates."""
    model = build(fam, attn="eager")
    inp = inputs(fam, model, batch=2)
    valid = real_tokens(model, inp)
    with torch.no_grad():
        att = model(**inp, output_attentions=True).attentions  # per block (B, H, T, T)
        spy = Spy(layers=(2, 3))
        spy.seen = []
        with prunekit.prune_tokens(model, spy, keep=0.7, stage="encoder"):
            model(**inp)
    first = [got for layer, got, _ in spy.seen if layer == 2]  # one call per group size
    assert first and all(layer in (2, 3) for layer, _, _ in spy.seen)
    by_size = {g.shape[1]: g for g in first}
    p = get_adapter(model).protected
    received = sum((a * valid[:, None, :, None]).sum(dim=(1, 2)) for a in att[:2])  # (B, T)
    rows = {}
    for b in range(2):
        cand = valid[b].nonzero().flatten()
        cand = cand[cand >= p]
        rows.setdefault(len(cand), []).append(received[b, cand])
    assert sorted(by_size) == sorted(rows)
    for n, want in rows.items():
        torch.testing.assert_close(by_size[n], torch.stack(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fam", ["dinov2", "bert"])
def test_heads_kept_at_the_first_cut_have_the_largest_output_norms(fam):
    """Per sample, the heads alive after the first cut (before block 2) are the top ones by the
    L2 norm of their output (the output projection's input), summed over real tokens and blocks
    0-1 of the dense model."""
    model = build(fam, attn="eager")
    inp = inputs(fam, model, batch=2)
    valid = real_tokens(model, inp).float()
    layers = get_adapter(model).layers
    H = model.config.num_attention_heads
    seen = {}
    hs = [
        out_proj(model, layer).register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        model(**inp)
    for h in hs:
        h.remove()
    mag = sum(
        (seen[i].view(2, -1, H, seen[i].shape[-1] // H).norm(dim=-1) * valid[..., None]).sum(1)
        for i in (0, 1)
    )
    with (
        torch.no_grad(),
        prunekit.prune_tokens(model, "spatten", keep=0.7, layers=(2, 3), head_keep=0.5) as s,
    ):
        model(**inp)
    first, alive = s.stats.head_masks[0]
    k = SpAtten(head_keep=0.5).head_counts(H, 2)[0]
    assert first == 2 and alive.sum(1).tolist() == [k, k]
    want = torch.zeros(2, H, dtype=torch.bool).scatter_(1, mag.topk(k, dim=1).indices, True)
    assert torch.equal(alive, want)


@pytest.mark.parametrize("fam", ENCODERS)
def test_cascades_equal_a_masked_reference_with_the_same_heads_zeroed(fam):
    model = build(fam, attn="eager")
    inp = inputs(fam, model, batch=2)
    valid = real_tokens(model, inp)
    with torch.no_grad(), prunekit.prune_tokens(model, "spatten", keep=0.5, head_keep=0.5) as s:
        pruned = model(**inp, output_hidden_states=True).hidden_states[-1]
    heads = s.stats.head_masks
    assert heads, "no head was pruned"
    for (_, a), (_, b) in itertools.pairwise(heads):
        assert not bool((b & ~a).any()), "a head switched off came back"
    H = model.config.num_attention_heads

    def zero_heads(i):
        def hook(m, args):
            alive = next((mask for K, mask in reversed(heads) if i >= K), None)
            if alive is None:
                return None
            x = args[0]
            return ((x.view(*x.shape[:2], H, -1) * alive[:, None, :, None]).view_as(x),)

        return hook

    hs = [
        out_proj(model, layer).register_forward_pre_hook(zero_heads(i))
        for i, layer in enumerate(get_adapter(model).layers)
    ]
    cuts = list(zip(s.stats.cut_layers, s.stats.kept_masks, strict=True))
    try:
        with torch.no_grad(), hidden_dropped(model, cuts, valid):
            ref = model(**inp, output_hidden_states=True).hidden_states[-1]
    finally:
        for h in hs:
            h.remove()
    final = cuts[-1][1]
    for b in range(2):
        n = int(final[b].sum())
        err = (pruned[b, :n] - ref[b, final[b]]).abs().max().item()
        assert err < 1e-5, f"row {b}: kept tokens differ from the masked reference by {err:.2e}"


@pytest.mark.parametrize("fam", ["vit", "bert"])
def test_keep_all_equals_dense_and_the_model_is_restored(fam):
    model = build(fam)
    inp = inputs(fam, model, batch=2)
    with torch.no_grad():
        dense = output(model(**inp))
        before = snapshot(model)
        with prunekit.prune_tokens(model, "spatten", keep=1.0, stage="encoder"):
            same = output(model(**inp))
        with pytest.raises(RuntimeError, match="inside"):
            with prunekit.prune_tokens(model, "spatten", keep=0.5, head_keep=0.5, stage="encoder"):
                pruned = output(model(**inp))
                raise RuntimeError("inside the block")
        after = output(model(**inp))
    assert (dense - same).abs().max().item() < 1e-5
    assert not torch.allclose(pruned, dense)
    assert torch.equal(dense, after)
    assert_same(before, snapshot(model))
