"""Týr-the-Pruner: the local pruner against least squares and a brute-force OBS, the supernet levels,
the mutation's conservation, sparse KL against a direct computation, the tournament, and the
method on a tiny GQA llama (masked == shrunk, restore, determinism, errors)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

import prunekit
from prunekit.weights.tyr import (
    expected_weight,
    group_scores,
    level_range,
    local_prune,
    local_prune_levels,
    mutate,
    obs_remove,
    prepare,
    refit,
    sparse_kl,
    spread,
    tournament,
)
from test_structured import CAL, _dense_inputs, build, logits
from tiny import text_inputs

FAST = dict(generations=3, offspring=4, survivors=(2, 1), stage_tokens=(24, 48), iterations=2)


def problem(n=200, c_in=12, c_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, c_in, generator=g, dtype=torch.float64) @ torch.randn(
        c_in, c_in, generator=g, dtype=torch.float64
    )
    W = torch.randn(c_out, c_in, generator=g, dtype=torch.float64)
    return X, W


# ------------------------------------------------------------------ local pruner
def test_refit_is_the_least_squares_solution_on_the_kept_set():
    X, W = problem()
    H, B, G = prepare(X.T @ X, W, damp=0.0)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    want = torch.linalg.lstsq(X[:, keep], X @ W.T).solution  # min ||X_K B - X W^T||
    got = refit(H, G, keep)
    assert torch.allclose(got[keep], want, atol=1e-9) and not got[~keep].any()
    # local_prune's result is that refit on whatever it kept
    Bn, kept, _ = local_prune(B, H, G, group=1, n_remove=5, rounds=3)
    assert int((~kept).sum()) == 5
    sol = torch.linalg.lstsq(X[:, kept], X @ W.T).solution
    assert torch.allclose(Bn[kept], sol, atol=1e-9) and not Bn[~kept].any()


def test_obs_remove_gives_the_optimum_without_the_removed_channels():
    X, W = problem()
    H, B, _ = prepare(X.T @ X, W, damp=0.0)
    Wc, Hinv = B.clone(), torch.linalg.inv(H)
    idx = torch.tensor([2, 7, 9])
    obs_remove(Wc, Hinv, idx)
    rest = torch.ones(12, dtype=torch.bool)
    rest[idx] = False
    assert torch.allclose(Wc[rest], torch.linalg.lstsq(X[:, rest], X @ W.T).solution, atol=1e-8)
    assert torch.allclose(Hinv[rest][:, rest], torch.linalg.inv(H[rest][:, rest]), atol=1e-8)
    assert not Wc[idx].any() and not Hinv[idx].any() and not Hinv[:, idx].any()


def brute_scores(B, Hinv, G, group, live):
    """The release's objective, group by group, with explicit block inverses."""
    out = []
    for s in range(B.shape[0] // group):
        sl = slice(s * group, (s + 1) * group)
        if not live[s]:
            out.append(float("inf"))
            continue
        blk = torch.linalg.inv(Hinv[sl, sl])
        out.append(float((B[sl] * (blk @ B[sl] / 2 + G[sl])).sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("group", [1, 3])
def test_group_scores_match_the_formula_group_by_group(group):
    X, W = problem()
    H, B, G = prepare(X.T @ X, W)
    Hinv = torch.linalg.inv(H)
    live = torch.ones(12 // group, dtype=torch.bool)
    live[1] = False
    obs_remove(B, Hinv, torch.arange(group, 2 * group))  # group 1 already pruned
    got = group_scores(B, Hinv, G, group, live)
    assert torch.allclose(got, brute_scores(B, Hinv, G, group, live), rtol=1e-9)
    if group == 1:  # 1x1 blocks: w^2 / (2 Hinv_jj) + w g
        d = Hinv.diagonal()
        j = 5
        assert float(got[j]) == pytest.approx(float((B[j] ** 2 / (2 * d[j]) + B[j] * G[j]).sum()))


def test_local_prune_picks_by_brute_force_round_by_round():
    X, W = problem(seed=4)
    H, B, G = prepare(X.T @ X, W, damp=0.0)
    _, _, picks = local_prune(B, H, G, group=1, n_remove=3, rounds=3)
    # independent: each round, the live channel of lowest objective given the least-squares optimum and
    # inverse Hessian of the channels still alive
    live = torch.ones(12, dtype=torch.bool)
    for pick in picks:
        Bl = torch.zeros_like(B)
        Bl[live] = torch.linalg.lstsq(X[:, live], X @ W.T).solution
        Hinv = torch.zeros_like(H)
        Hinv[live.nonzero(), live.nonzero().T] = torch.linalg.inv(H[live][:, live])
        want = int(brute_scores(Bl, Hinv, G, 1, live).argmin())
        assert pick.tolist() == [want]
        live[want] = False


def test_local_prune_edges_and_buckets():
    X, W = problem()
    H, B, G = prepare(X.T @ X, W)
    same, kept, _ = local_prune(B, H, G, group=2, n_remove=0, rounds=1)
    assert torch.equal(same, B) and kept.all()  # sparsity 0: unchanged
    zero, kept, _ = local_prune(B, H, G, group=2, n_remove=6, rounds=1)
    assert not zero.any() and not kept.any()  # sparsity 1: the module is removed
    # 6 heads of 2 channels in 3 KV groups (buckets): 1 slot = one head from every group
    _, kept, _ = local_prune(B, H, G, group=2, n_remove=3, rounds=1, buckets=3)
    assert kept.reshape(3, 2).sum(1).tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="multiple of 3"):
        local_prune(B, H, G, group=2, n_remove=2, rounds=1, buckets=3)


def test_nested_levels_share_one_trajectory():
    X, W = problem(seed=2)
    H, B, G = prepare(X.T @ X, W, damp=0.0)
    one = local_prune_levels(B, H, G, 1, [5], rounds=3)[0]
    ref = local_prune(B, H, G, 1, 5, rounds=3)
    assert torch.equal(one[1], ref[1]) and torch.allclose(one[0], ref[0])  # one level = local_prune
    levels = local_prune_levels(B, H, G, 1, [0, 2, 5, 12], rounds=2)
    assert torch.equal(levels[0][0], B) and not levels[-1][0].any()
    kept = [k for _, k in levels]
    assert [int((~k).sum()) for k in kept] == [0, 2, 5, 12]
    assert bool((kept[2] <= kept[1]).all())  # nested: what level 1 removed, level 2 removed too
    for Bn, k in levels[1:3]:
        assert torch.allclose(Bn[k], torch.linalg.lstsq(X[:, k], X @ W.T).solution, atol=1e-9)
    with pytest.raises(ValueError, match="ascending"):
        local_prune_levels(B, H, G, 1, [5, 2], rounds=2)


# ------------------------------------------------------------------ supernet and search
def test_levels_spread_and_expectation_hand_worked():
    assert level_range(centre=304, step=192, total=1536, n_levels=9) == (1, 4)
    assert level_range(centre=1, step=1, total=3, n_levels=9) == (1, 2)
    assert level_range(centre=0, step=1, total=3, n_levels=3) == (0, 1)
    assert spread(24, 30).tolist() == [0, 1, 1, 1, 1] * 6  # floor((i+1)*24/30) - floor(i*24/30)
    assert int(spread(24, 30).sum()) == 24
    Ws = [torch.full((2, 2), 4.0), torch.full((2, 2), 1.0), torch.zeros(2, 2)]
    # weights (1 - s): 1, 0.5, 0 -> (4 + 0.5) / 1.5 = 3
    assert torch.equal(expected_weight(Ws, [0.0, 0.5, 1.0]), torch.full((2, 2), 3.0))


def test_mutation_conserves_each_kind_and_stays_in_range():
    g = torch.Generator().manual_seed(0)
    n = 12
    kind = torch.arange(n) % 2
    lo = -torch.randint(0, 3, (n,), generator=g)
    hi = torch.randint(0, 3, (n,), generator=g)
    state = torch.zeros(n, dtype=torch.long)
    changed = 0
    for _ in range(200):
        child = mutate(state, lo, hi, kind, g)
        for k in (0, 1):
            assert int(child[kind == k].sum()) == int(state[kind == k].sum())
        assert bool(((child >= lo) & (child <= hi)).all())
        changed += int(not torch.equal(child, state))
        state = child
    assert changed > 100


def test_sparse_kl_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(7, 50, generator=g), torch.randn(7, 50, generator=g)
    k = 9
    vals, idx = t.topk(k, -1)
    got = sparse_kl(vals, idx, s)
    for row in range(7):
        top = sorted(range(50), key=lambda v: -float(t[row, v]))[:k]
        p = torch.tensor([float(t[row, v]) for v in top]).exp()
        q = torch.tensor([float(s[row, v]) for v in top]).exp()
        p, q = p / p.sum(), q / q.sum()
        assert float(got[row]) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-4, abs=1e-6)
    full = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none")
    vals, idx = t.topk(50, -1)
    assert torch.allclose(sparse_kl(vals, idx, s), full.sum(-1), atol=1e-5)  # k = V: the full KL


def test_tournament_hand_worked():
    score = {0: 5.0, 1: 1.0, 2: 3.0, 3: 2.0, 9: 1.5}  # candidate id -> fitness (lower is better)
    cands = [torch.tensor([i]) for i in range(4)]
    parent = torch.tensor([9])
    seen = []

    def evaluate(cs, stage):
        seen.append((stage, sorted(int(c) for c in cs)))
        return [score[int(c)] for c in cs]

    best, fit = tournament(cands, parent, (2, 1), evaluate)
    # stage 0 keeps 1 and 3; the parent joins before the last stage; 1 wins
    assert seen == [(0, [0, 1, 2, 3]), (1, [1, 3, 9])] and int(best) == 1 and fit == 1.0
    score[9] = 0.5
    assert int(tournament(cands, parent, (2, 1), evaluate)[0]) == 9  # elitist


# ------------------------------------------------------------------ the method on a tiny GQA llama
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tyr_shrinks_to_the_masked_model(attn):
    model = build("llama", attn)  # 8 query / 2 KV heads, 5 layers, I = 128
    inputs = text_inputs(batch=2, length=16)
    original = [lay.mlp.down_proj.weight.detach().clone() for lay in model.model.layers]
    pruned = prunekit.prune_weights(model, "tyr", 0.3, calibration=CAL, progress=False, **FAST)
    masked = logits(model, inputs)
    report = pruned.report
    assert report.to_dict()["actual_sparsity"] == pytest.approx(0.3, abs=0.03)
    for r in report.layers:  # GQA stays balanced: the same number of query heads in both KV groups
        assert sum(h < 4 for h in r.q_heads) == sum(h >= 4 for h in r.q_heads)
    # kept weights are updated (refit), not only masked
    k0 = pruned.keeps[0]
    if k0.channels is not None and len(k0.channels):
        w = model.model.layers[0].mlp.down_proj.weight.detach()
        assert not torch.allclose(w[:, k0.channels], original[0][:, k0.channels])
    pruned.finalize()
    real = inputs["attention_mask"].bool()
    assert torch.allclose(logits(model, inputs)[real], masked[real], atol=1e-5, rtol=1e-5)


def test_tyr_kv_groups_and_whole_modules():
    model = build("llama", "sdpa")
    pruned = prunekit.prune_weights(
        model, "tyr", 0.5, calibration=CAL, gqa="kv_groups", progress=False, **FAST
    )
    for r in pruned.report.layers:  # a KV group goes with its 4 query heads
        assert len(r.q_heads) == 4 * len(r.kv_heads)
    assert sum(len(r.kv_heads) for r in pruned.report.layers) == 5  # round(0.5 * 10) groups of 10 go
    inputs = text_inputs(batch=2, length=16)
    masked = logits(model, inputs)
    pruned.finalize()
    real = inputs["attention_mask"].bool()
    assert torch.allclose(logits(model, inputs)[real], masked[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", [{"faithful": True}, {"expectation": "centre"}, {"nested": False}])
def test_tyr_variants_shrink_to_the_masked_model(opts):
    model = build("llama", "sdpa", num_hidden_layers=3)
    pruned = prunekit.prune_weights(model, "tyr", 0.3, calibration=CAL, progress=False, **FAST, **opts)
    assert pruned.report.allocation == "search"
    inputs = text_inputs(batch=2, length=16)
    masked = logits(model, inputs)
    pruned.finalize()
    real = inputs["attention_mask"].bool()
    assert torch.allclose(logits(model, inputs)[real], masked[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("faithful", [True, False])
def test_faithful_supernet_calibrates_on_the_dense_model(faithful):
    from tqdm import tqdm

    from prunekit.models.structure import geometry
    from prunekit.weights.methods.tyr import Tyr

    model = build("llama", num_hidden_layers=2)
    X = _dense_inputs(model)["model.layers.1.mlp.down_proj"]  # layer 1's dense inputs
    layers = model.model.layers
    m = Tyr(faithful=faithful)
    centre = torch.tensor([[1, 32], [1, 32]])
    with torch.no_grad():
        net = m._supernet(model, layers, CAL, 4, centre, (1, 16), geometry(layers[0]), tqdm(disable=True))
    W = layers[1].mlp.down_proj.weight.detach()
    H, B, G = prepare(X.T @ X, W)
    want = local_prune_levels(B, H, G, 1, net[3].removed, m.mlp_rounds)
    same = all(
        torch.equal(k, kw) and torch.allclose(Wl, Bw.t().float(), atol=1e-4)
        for Wl, k, (Bw, kw) in zip(net[3].weights, net[3].kept, want, strict=True)
    )
    assert same == faithful  # the fix calibrates layer 1 on the expected pruned layer 0


def test_tyr_restores_exactly_and_is_deterministic():
    model = build("qwen2")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = text_inputs(batch=2, length=12)
    dense = logits(model, inputs)
    with prunekit.prune_weights(model, "tyr", 0.3, calibration=CAL, progress=False, **FAST) as pruned:
        first = logits(model, inputs)
        assert not torch.allclose(first, dense)
        plan = [(r.q_heads, r.channels) for r in pruned.report.layers]
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snap.items())
    assert torch.equal(logits(model, inputs), dense)
    again = prunekit.prune_weights(model, "tyr", 0.3, calibration=CAL, progress=False, **FAST)
    assert [(r.q_heads, r.channels) for r in again.report.layers] == plan
    assert torch.equal(logits(model, inputs), first)
    again.restore()


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"expectation": "mean"}, "expectation must be one of"),
        ({"survivors": (2, 1), "stage_tokens": (8,)}, "one entry per"),
        ({"survivors": (0,), "stage_tokens": (8,)}, "survivors must be"),
        ({"step": 0.0}, r"step must be a fraction in \(0, 1\]"),
        ({"n_levels": 0}, "n_levels must be an int >= 1"),
        ({"kl_topk": 2.5}, "kl_topk must be an int"),
        ({"gqa": "heads"}, "gqa must be one of"),
    ],
)
def test_bad_options_are_refused(opts, match):
    with pytest.raises(ValueError, match=match):
        prunekit.prune_weights(build("llama"), "tyr", 0.2, calibration=CAL, progress=False, **opts)


def test_a_sparsity_tyr_cannot_reach_is_refused():
    model = build("llama")  # query slots keep k/v: at most 8/10 of the attention weights can go
    with pytest.raises(ValueError, match="would empty a layer"):
        prunekit.prune_weights(model, "tyr", 0.9, calibration=CAL, progress=False)
    mha = build("llama", num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="grouped-query attention"):
        prunekit.prune_weights(mha, "tyr", 0.2, calibration=CAL, progress=False)
