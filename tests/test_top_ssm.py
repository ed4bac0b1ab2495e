"""Token pruning on transformers' Mamba classes (ToP-ViM's technique): the importance by hand, the
kept set against a dense run's scan outputs, each alignment against a block-by-block reference,
identity, restoration, generation, batching with left padding, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

import prunekit
from invariants import assert_same, snapshot
from prunekit.errors import SignalUnavailableError, UnsupportedModelError
from prunekit.tokens.methods.top_ssm import TopSSM


def tiny_mamba(seed: int = 0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=100, hidden_size=32, state_size=8, num_hidden_layers=6, expand=2, conv_kernel=4
    )
    return MambaForCausalLM(cfg).eval()


def batch(padded: bool = True) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, 16), generator=g)
    am = torch.ones_like(ids)
    if padded:
        am[1, :4] = 0  # left padding, as transformers pads Mamba
    return dict(input_ids=ids, attention_mask=am)


def test_importance_by_hand():
    scan = torch.tensor([[[1.0, -2.0, 3.0], [-1.0, -1.0, 0.0], [0.5, 0.5, -4.0]]])  # (1, 3 tokens, 3 ch)
    assert TopSSM().importance(scan).tolist() == [[4.0, 0.0, 1.0]]  # clipped at 0, then summed
    assert TopSSM(clip=False).importance(scan).tolist() == [[2.0, -2.0, -3.0]]
    with pytest.raises(ValueError, match="alignment must be one of"):
        TopSSM(alignment="gather")


def scan_outputs(model, inp) -> dict[int, torch.Tensor]:
    """Every block's out_proj input on the dense model."""
    seen = {}
    hs = [
        layer.mixer.out_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
        for i, layer in enumerate(model.backbone.layers)
    ]
    with torch.no_grad():
        model(**inp)
    for h in hs:
        h.remove()
    return seen


def reference(model, inp, cut: int, kept: torch.Tensor, alignment: str, importance=None) -> torch.Tensor:
    """Block by block by hand: at block ``cut`` the pruned tokens become zero-input positions
    (align), or the kept ones are gathered in order (contract) or by importance (naive); returns
    the last token's logits (B, V)."""
    bb = model.backbone
    am = inp["attention_mask"]
    h = bb.embeddings(inp["input_ids"])
    rows = []
    for b in range(h.shape[0]):
        x, m = h[b : b + 1], am[b : b + 1]
        for i, layer in enumerate(bb.layers):
            if i == cut:
                if alignment == "align":
                    m = kept[b : b + 1].long()
                else:
                    pos = kept[b].nonzero().flatten()
                    if alignment == "naive":
                        cand = pos[:-1]
                        cand = cand[torch.sort(importance[b, cand], descending=True, stable=True).indices]
                        pos = torch.cat([cand, pos[-1:]])
                    x, m = x[:, pos], torch.ones(1, len(pos), dtype=torch.long)
            x = layer(x, attention_mask=m)
        rows.append(model.lm_head(bb.norm_f(x))[:, -1])
    return torch.cat(rows)


@pytest.mark.parametrize("alignment", ["align", "contract", "naive"])
def test_one_cut_equals_the_block_by_block_reference(alignment):
    model = tiny_mamba()
    inp = batch()
    cut = 3
    scan = scan_outputs(model, inp)[cut - 1]  # (B, L, d_inner), block K-1's scan output
    imp = scan.clamp_min(0).sum(-1)
    with (
        torch.no_grad(),
        prunekit.prune_tokens(model, "top_ssm", keep=0.5, layers=(cut,), alignment=alignment) as s,
    ):
        got = model(**inp).logits[:, -1]
    (kept,) = s.stats.kept_masks
    am = inp["attention_mask"].bool()
    for b in range(2):  # the kept candidates are the top ones by clipped importance; the last token stays
        cand = am[b, :-1].nonzero().flatten()
        k = int(kept[b, :-1].sum())
        want = torch.zeros_like(am[b])
        want[cand[imp[b, cand].topk(k).indices]] = True
        want[-1] = True
        assert torch.equal(kept[b], want), f"row {b}"
    assert not bool((kept & ~am).any()), "padding was kept"
    with torch.no_grad():
        ref = reference(model, inp, cut, kept, alignment, imp)
    err = (got - ref).abs().max().item()
    assert err < 1e-4, f"{alignment}: differs from the reference by {err:.2e}"


def test_progressive_cuts_nest_and_meet_the_budget():
    model = tiny_mamba()
    inp = batch()
    with torch.no_grad(), prunekit.prune_tokens(model, "top_ssm", keep=0.6, layers=(1, 3, 4)) as s:
        model(**inp)
    assert s.stats.cut_layers == [1, 3, 4] and s.stats.calls == 1
    prev = inp["attention_mask"].bool()
    for kept in s.stats.kept_masks:
        assert not bool((kept & ~prev).any()), "a cut kept a token an earlier cut dropped"
        assert bool(kept[:, -1].all())
        prev = kept
    assert abs(s.stats.kept_fraction - 0.6) < 0.08


@pytest.mark.parametrize("alignment", ["align", "contract"])
def test_keep_all_equals_dense_restoration_and_generate(alignment):
    model = tiny_mamba()
    inp = batch()
    with torch.no_grad():
        dense = model(**inp).logits
        before = snapshot(model)
        with prunekit.prune_tokens(model, "top_ssm", keep=1.0, alignment=alignment):
            same = model(**inp).logits
        with prunekit.prune_tokens(model, "top_ssm", keep=0.5, alignment=alignment) as s:
            pruned_last = model(**inp).logits[:, -1]
            gen = model.generate(**inp, max_new_tokens=4, do_sample=False)
        with pytest.raises(RuntimeError, match="inside"):
            with prunekit.prune_tokens(model, "top_ssm", keep=0.5, alignment=alignment):
                model(**inp)
                raise RuntimeError("inside the block")
        after = model(**inp).logits
    assert (dense - same).abs().max().item() < 1e-5
    assert s.stats.kept_fraction < 0.7
    assert gen.shape == (2, 20)
    assert torch.equal(gen[:, 16], pruned_last.argmax(-1)), "the first new token is not the pruned prefill's"
    assert torch.equal(dense, after)
    assert_same(before, snapshot(model))


def test_other_cut_methods_run_and_attention_methods_are_refused():
    model = tiny_mamba()
    inp = batch()
    with torch.no_grad(), prunekit.prune_tokens(model, "random", keep=0.5, layer=2) as s:
        out = model(**inp).logits
    assert out.shape[1] < 16 and s.stats.kept_fraction == pytest.approx(0.5, abs=0.1)
    with pytest.raises(SignalUnavailableError, match="ssm_output"):
        with prunekit.prune_tokens(model, "zero_tprune", keep=0.5):
            pass
    with pytest.raises(UnsupportedModelError, match="llm"):
        with prunekit.prune_tokens(model, "fastv", keep=0.5, stage="llm"):
            pass
