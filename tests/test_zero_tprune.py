"""Zero-TPrune and progressive encoder cuts: Weighted PageRank and the S-stage on hand-worked
cases, the signals at each cut against an eager masked reference, the cuts against a masked
reference, batching and BERT padding, restoration."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import numpy as np
import pytest
import torch

import prunekit
from invariants import assert_same, snapshot
from prunekit.budget import resolve_keep
from prunekit.errors import SignalUnavailableError
from prunekit.models import get_adapter
from prunekit.tokens.context import Signal, TokenContext
from prunekit.tokens.methods.zero_tprune import (
    ZeroTPrune,
    combine_heads,
    similarity_prune,
    weighted_page_rank,
)
from prunekit.tokens.schedule import mean_tokens
from tiny_encoders import ENCODERS, build, inputs, output

# A 3-token attention graph (row = query, rows sum to 1).
A3 = np.array([[0.1, 0.9, 0.0], [0.0, 0.2, 0.8], [0.6, 0.0, 0.4]])


def stationary(A: np.ndarray) -> np.ndarray:
    """The eigenvector of A^T for eigenvalue 1, summing to 1 (numpy, independent of prunekit)."""
    w, v = np.linalg.eig(A.T)
    x = np.real(v[:, np.argmin(np.abs(w - 1))])
    return x / x.sum()


def power_iteration(A: np.ndarray, iterations: int) -> np.ndarray:
    s = np.full(A.shape[0], 1.0 / A.shape[0])
    for _ in range(iterations):
        s = A.T @ s
    return s


# ------------------------------------------------------------------ I-stage
def test_weighted_page_rank_hand_worked():
    A = torch.tensor(A3)
    # one step from 1/3: column sums / 3 = (0.7, 1.1, 1.2) / 3
    # two steps: (0.7*0.1 + 1.2*0.6, 0.7*0.9 + 1.1*0.2, 1.1*0.8 + 1.2*0.4) / 3 = (0.79, 0.85, 1.36) / 3
    expected = {1: [0.7 / 3, 1.1 / 3, 1.2 / 3], 2: [0.79 / 3, 0.85 / 3, 1.36 / 3]}
    for it, exp in expected.items():
        got = weighted_page_rank(A, it)
        assert torch.allclose(got, torch.tensor(exp, dtype=torch.float32), atol=1e-6), (it, got)
    # many steps: the stationary distribution of the attention's random walk (numpy eigenvector)
    got = weighted_page_rank(A, 200)
    assert np.allclose(got.numpy(), stationary(A3), atol=1e-5)
    assert abs(got.sum().item() - 1) < 1e-6


def test_weighted_page_rank_is_per_head_and_per_group():
    g = np.random.default_rng(0)
    maps = g.random((2, 3, 5, 5)) ** 3  # (G, H, M, M)
    maps /= maps.sum(-1, keepdims=True)
    got = weighted_page_rank(torch.tensor(maps, dtype=torch.float32), 30).numpy()
    for gi in range(2):
        for h in range(3):
            exp = power_iteration(maps[gi, h], 30)
            assert np.allclose(got[gi, h], exp, atol=1e-5), (gi, h)


def test_importance_runs_on_the_whole_graph_and_averages_heads():
    """The protected token (first) is part of the graph; the candidates' scores are the heads'
    mean of their stationary shares."""
    g = np.random.default_rng(1)
    maps = g.random((1, 2, 4, 4)) + np.eye(4) * 2  # (G, H, 1 + 3, 1 + 3)
    maps /= maps.sum(-1, keepdims=True)
    ctx = TokenContext(
        "encoder",
        tokens=torch.zeros(1, 3, 4),
        signals={"attention_graph": torch.tensor(maps, dtype=torch.float32)},
    )
    expected = np.mean([stationary(maps[0, h])[1:] for h in range(2)], axis=0)
    got = ZeroTPrune(iterations=300).score(ctx)[0].numpy()
    assert np.allclose(got, expected, atol=1e-5), (got, expected)


def test_head_variance_filter_leaves_out_flat_heads():
    s = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]]])  # (G, H, N): a flat head
    assert torch.allclose(combine_heads(s), s.mean(dim=1))
    assert torch.allclose(combine_heads(s, (0.1, 10.0)), s[:, 1])  # the flat head (variance 0) is out
    assert torch.allclose(combine_heads(s, (50.0, 60.0)), s.mean(dim=1))  # none in range: all heads


# ------------------------------------------------------------------ S-stage
def s_stage_case():
    # importance: I = {0, 2, 4} (0.9, 0.8, 0.7), U = {1, 3, 5} (0.1, 0.2, 0.3)
    importance = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3]])
    keys = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # 0 (I)
            [0.0, 0.0, -1.0],  # 1 (U): best cos to I = 0 (unique: stays although least important)
            [0.0, 1.0, 0.0],  # 2 (I)
            [1.0, 1.0, 0.0],  # 3 (U): best cos 0.707 (to 0 and 2)
            [0.0, 0.0, 1.0],  # 4 (I)
            [0.9, 0.1, 0.0],  # 5 (U): best cos 0.994 (to 0)
        ]
    )[None]
    return importance, keys


def test_s_stage_prunes_the_unimportant_tokens_most_similar_to_important_ones():
    importance, keys = s_stage_case()
    assert similarity_prune(importance, keys, 5).tolist() == [[0, 1, 2, 3, 4]]  # 5 goes first
    assert similarity_prune(importance, keys, 4).tolist() == [[0, 1, 2, 4]]  # then 3; not 1
    # at least half removed: U cannot serve it, the most important stay
    assert similarity_prune(importance, keys, 3).tolist() == [[0, 2, 4]]
    assert similarity_prune(importance, keys, 6).tolist() == [[0, 1, 2, 3, 4, 5]]
    # groups are independent: a second group with the roles of 1 and 5 swapped in the keys
    keys2 = keys.clone()
    keys2[0, [1, 5]] = keys[0, [5, 1]]
    both = similarity_prune(importance.repeat(2, 1), torch.cat([keys, keys2]), 4)
    assert both.tolist() == [[0, 1, 2, 4], [0, 2, 4, 5]]


def test_select_combines_the_two_stages_on_head_mean_keys():
    """Candidates behind one protected token: importance from the graph, similarity on keys
    averaged over heads (on concatenated keys the other unimportant token would go)."""
    A = torch.tensor(
        [
            [0.1, 0.5, 0.3, 0.1],
            [0.1, 0.6, 0.2, 0.1],
            [0.1, 0.5, 0.3, 0.1],
            [0.1, 0.5, 0.3, 0.1],
        ]
    )[None, None]  # (1, 1, 4, 4): every query attends alike; candidates (0.5, 0.3, 0.1)
    # keys (G, N, H=2, hd=2): head means 0 -> (1, 0), 1 -> (1, 0), 2 -> (1, 0.05)
    keys = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[2.0, 1.0], [0.0, -1.0]], [[1.0, 0.1], [1.0, 0.0]]]])
    ctx = TokenContext("encoder", tokens=torch.zeros(1, 3, 4), signals={"attention_graph": A, "keys": keys})
    m = ZeroTPrune()
    assert m.score(ctx)[0].argsort(descending=True).tolist() == [0, 1, 2]
    # N = 3: I = {0, 1}, U = {2}; removing one removes all of U: the top 2 by importance
    assert m.select(ctx, 2).keep.tolist() == [[0, 1]]
    assert m.select(ctx, 3).keep.tolist() == [[0, 1, 2]]
    # 4 candidates, every query attends (0.1 | 0.4, 0.3, 0.1, 0.1): I = {0, 1}, U = {2, 3}.
    # Head means: 3 -> (1, 0), cos 1 to candidate 0; 2 -> cos 0.9988: 3 goes. (Concatenated keys:
    # 3 = (3, 0, -1, 0) has cos 0.775 to 1, 2 = (1, 0.1, 1, 0) cos 0.9975 to 0: 2 would go.)
    A4 = torch.full((1, 1, 5, 5), 0.1)
    A4[..., 1:] = torch.tensor([0.4, 0.3, 0.1, 0.1])
    keys4 = torch.cat([keys, torch.tensor([[[[3.0, 0.0], [-1.0, 0.0]]]])], dim=1)
    signals = {"attention_graph": A4, "keys": keys4}
    ctx4 = TokenContext("encoder", tokens=torch.zeros(1, 4, 4), signals=signals)
    assert m.select(ctx4, 3).keep.tolist() == [[0, 1, 2]]


def test_default_blocks_and_schedule():
    m = ZeroTPrune()
    assert m.cuts(12) == (4, 7, 10) and m.cuts(24) == (8, 14, 20) and m.cuts(4) == (1, 2, 3)
    # the keep rate 0.7 at 4/7/10 of 12: 196 -> 137, 96, 67; a mean of 134.75 per block
    counts = m.counts(196, 135, 12)
    assert all(abs(c - e) <= 1 for c, e in zip(counts, (137, 96, 67), strict=True)), counts
    assert abs(mean_tokens((4, 7, 10), counts, 196, 12) - 135) <= 0.5
    assert m.counts(196, 196, 12) == (196, 196, 196)
    for bad in (dict(iterations=0), dict(iterations=2.5), dict(head_variance=(2.0, 1.0))):
        with pytest.raises(ValueError, match="zero_tprune"):
            ZeroTPrune(**bad)


# ------------------------------------------------------------------ on models
def real_tokens(model, inp: dict) -> torch.Tensor:
    """``(B, T)`` bool: the padding mask of a text input, else every token of the image."""
    if "attention_mask" in inp:
        return inp["attention_mask"].bool()
    cfg = model.config
    T = (cfg.image_size // cfg.patch_size) ** 2 + get_adapter(model).protected
    return torch.ones(inp["pixel_values"].shape[0], T, dtype=torch.bool)


@pytest.mark.parametrize("fam", ENCODERS)
def test_keep_all_is_dense_restoration_and_stats(fam):
    model = build(fam)
    inp = inputs(fam, model, batch=2)
    valid = real_tokens(model, inp)
    p = get_adapter(model).protected
    before = snapshot(model)
    with torch.no_grad():
        dense = output(model(**inp))
        with prunekit.prune_tokens(model, "zero_tprune", keep=1.0) as s:
            same = output(model(**inp))
        assert s.stats.kept_fraction == 1.0 and s.stats.cut_layers == [1, 2, 3]
        with prunekit.prune_tokens(model, "zero_tprune", keep=0.5) as s:
            pruned = output(model(**inp))
        with pytest.raises(RuntimeError, match="inside"):
            with prunekit.prune_tokens(model, "zero_tprune", keep=0.5):
                model(**inp)
                raise RuntimeError("inside the block")
        after = output(model(**inp))
    err = (dense - same).abs().max().item()
    assert err < 1e-5, f"keep=1.0 differs from dense by {err:.2e} (tolerance 1e-5)"
    assert not torch.allclose(pruned, dense) and torch.equal(dense, after)
    assert_same(before, snapshot(model))
    # one record per call; each cut in the input's coordinates, nested, protected kept, no padding
    stats = s.stats
    assert stats.calls == 1 and stats.cut_layers == [1, 2, 3] and len(stats.kept_masks) == 3
    n0 = (valid[:, p:]).sum(1).tolist()
    prev = valid
    for cut, kept in enumerate(stats.kept_masks):
        assert kept.shape == valid.shape and bool(kept[:, :p].all())
        assert not bool((kept & ~prev).any()), f"cut {cut} kept a token an earlier cut dropped"
        want = [ZeroTPrune().counts(n, resolve_keep(0.5, n), 4)[cut] for n in n0]
        assert (kept[:, p:].sum(1)).tolist() == want
        prev = kept
    per_cut = [[int(k[b, p:].sum()) for k in stats.kept_masks] for b in range(2)]
    means = [mean_tokens((1, 2, 3), per_cut[b], n0[b], 4) for b in range(2)]
    assert stats.tokens_in == sum(n0) and stats.tokens_kept == pytest.approx(sum(means))
    assert abs(stats.kept_fraction - 0.5) < 0.06


@contextmanager
def hidden_dropped(model, cuts: list[tuple[int, torch.Tensor]], valid: torch.Tensor):
    """Eager reference: every token kept, but from block K of each cut on, the tokens that cut
    dropped are hidden as keys (an additive mask on top of the model's own)."""
    layers = get_adapter(model).layers
    handles = []
    for i, layer in enumerate(layers):
        alive = next((kept for K, kept in reversed(cuts) if i >= K), None)
        if alive is None:
            continue
        hide = (valid & ~alive)[:, None, None, :]  # (B, 1, 1, T)

        def hook(layer, args, kw, hide=hide):
            am = args[1] if len(args) > 1 else kw.get("attention_mask")
            T = args[0].shape[1]
            base = torch.zeros(args[0].shape[0], 1, 1, T) if am is None else am.float()
            new = base.masked_fill(hide, torch.finfo(torch.float32).min)
            if len(args) > 1:
                return (args[0], new, *args[2:]), kw
            kw["attention_mask"] = new
            return args, kw

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("fam", ENCODERS)
def test_progressive_cuts_equal_the_masked_reference(fam):
    model = build(fam, attn="eager")
    inp = inputs(fam, model, batch=2)
    valid = real_tokens(model, inp)
    with torch.no_grad(), prunekit.prune_tokens(model, "zero_tprune", keep=0.4) as s:
        pruned = model(**inp, output_hidden_states=True).hidden_states[-1]  # (B, T', D): kept first
    cuts = list(zip(s.stats.cut_layers, s.stats.kept_masks, strict=True))
    with torch.no_grad(), hidden_dropped(model, cuts, valid):
        ref = model(**inp, output_hidden_states=True).hidden_states[-1]
    final = cuts[-1][1]
    for b in range(2):
        n = int(final[b].sum())
        err = (pruned[b, :n] - ref[b, final[b]]).abs().max().item()
        assert err < 1e-5, f"row {b}: kept tokens differ from the masked reference by {err:.2e} (tol 1e-5)"
    lengths = [pruned.shape[1]] * 2 if s.output_mask is None else s.output_mask.sum(1).tolist()
    assert lengths == final.sum(1).tolist()


class Spy(ZeroTPrune):
    """Records the signals and budget of every select call."""

    seen: list

    def select(self, ctx: TokenContext, k: int):
        self.seen.append((ctx.layer, {key: v.clone() for key, v in ctx.signals.items()}, k))
        return super().select(ctx, k)


@pytest.mark.parametrize("fam", ["vit", "deit", "bert"])
def test_signals_are_the_attention_and_keys_of_the_block_before_each_cut(fam):
    """At each cut, the graph equals eager attention of block K-1 on the survivors (earlier cuts
    hidden), over [protected, candidates]; the keys equal that block's own key projection."""
    model = build(fam, attn="eager")
    inp = inputs(fam, model, batch=2)
    valid = real_tokens(model, inp)
    spy = Spy()
    spy.seen = []
    with torch.no_grad(), prunekit.prune_tokens(model, spy, keep=0.5) as s:
        model(**inp)
    cuts = list(zip(s.stats.cut_layers, s.stats.kept_masks, strict=True))
    adapter = get_adapter(model)
    p = adapter.protected
    layers = adapter.layers
    keys: dict[int, torch.Tensor] = {}

    def key_hook(i):
        def hook(module, args, out):
            keys[i] = out

        return hook

    handles = [adapter.attention_parts(layers[K - 1])[2].register_forward_hook(key_hook(K)) for K, _ in cuts]
    try:
        with torch.no_grad(), hidden_dropped(model, cuts, valid):
            att = model(**inp, output_attentions=True).attentions
    finally:
        for h in handles:
            h.remove()
    H = att[0].shape[1]
    for c, (K, _) in enumerate(cuts):
        alive = valid if c == 0 else cuts[c - 1][1]
        calls = [seen for seen in spy.seen if seen[0] == K]
        for b in range(2):
            cand = alive[b].clone()
            cand[:p] = False
            pos = cand.nonzero().flatten()
            graph = torch.cat([torch.arange(p), pos])
            exp_graph = att[K - 1][b][:, graph][:, :, graph]  # (H, p+n, p+n)
            exp_keys = keys[K][b, pos].view(len(pos), H, -1)  # (n, H, hd)
            # groups of one size are stacked in sample order; BERT's rows differ in size
            rows = [(sig, i) for _, sig, _ in calls for i in range(sig["keys"].shape[0])]
            if fam == "bert":
                sig, i = next(r for r in rows if r[0]["keys"].shape[1] == len(pos))
            else:
                sig, i = rows[b]
            torch.testing.assert_close(sig["attention_graph"][i], exp_graph, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(sig["keys"][i], exp_keys, atol=1e-5, rtol=1e-4)
            assert torch.allclose(sig["attention_graph"][i].sum(-1), torch.ones(H, len(graph)), atol=1e-5)


@pytest.mark.parametrize("fam", ["vit", "deit", "bert"])
def test_each_row_of_a_batch_is_pruned_as_if_alone(fam):
    """Batch of 2 vs each row alone; BERT's padded row alone is the row without its padding."""
    model = build(fam)
    inp = inputs(fam, model, batch=2)
    with torch.no_grad(), prunekit.prune_tokens(model, "zero_tprune", keep=0.5) as s:
        both = model(**inp, output_hidden_states=True).hidden_states[-1]
        valid = s.output_mask
        assert (valid is not None) == (fam == "bert")  # ragged rows only with padding
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


def test_refusals_leave_the_model_unchanged():
    model = build("vit")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"unreachable.*allowed keep: 4\.8 to 16"):  # (16 + 3 * 1) / 4
        with prunekit.prune_tokens(model, "zero_tprune", keep=0.2):
            model(**inputs("vit", model))
    with pytest.raises(ValueError, match=r"ascending distinct ints in \[1, 3\]"):
        with prunekit.prune_tokens(model, "zero_tprune", keep=0.5, layers=(3, 2)):
            pass

    @dataclasses.dataclass
    class AtALayer(ZeroTPrune):
        def needs(self, stage):
            return (Signal("attention_graph", 2), Signal("keys"))

    AtALayer.name = "zero_tprune"
    with pytest.raises(SignalUnavailableError, match="progressive"):
        with prunekit.prune_tokens(model, AtALayer(), keep=0.5):
            pass
    assert_same(before, snapshot(model))
    with torch.no_grad(), prunekit.prune_tokens(model, "zero_tprune", keep=0.75, layers=(2,)) as s:
        model(**inputs("vit", model))
    assert s.stats.cut_layers == [2]  # one cut is a progressive schedule of one


def test_a_fraction_too_small_for_a_short_sentence_keeps_the_fewest_instead_of_failing():
    """keep=0.45 of a 3-candidate sentence is below what cuts at blocks 1/2/3 allow (block 0 sees
    all three: a mean of at least (3 + 1 + 1 + 1) / 4 = 1.5): that row gets the smallest whole mean,
    2; the long row meets the fraction."""
    model = build("bert")
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, 4:] = 0  # [CLS] + 3 candidates
    with torch.no_grad(), prunekit.prune_tokens(model, "zero_tprune", keep=0.45) as s:
        model(input_ids=ids, attention_mask=am)
    short = [int(k[1, 1:].sum()) for k in s.stats.kept_masks]
    assert short == list(ZeroTPrune().counts(3, 2, 4))
    long = [int(k[0, 1:].sum()) for k in s.stats.kept_masks]
    assert long == list(ZeroTPrune().counts(11, resolve_keep(0.45, 11), 4))
    with pytest.raises(ValueError, match="unreachable"):  # a count is taken literally
        with torch.no_grad(), prunekit.prune_tokens(model, "zero_tprune", keep=1):
            model(input_ids=ids, attention_mask=am)
