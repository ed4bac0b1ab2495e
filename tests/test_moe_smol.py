"""MoEfication of a Llama into a Mixtral (prunekit.zoo.moe_smol): partition, router, assembly, cache.

Fast tests run on tiny random Llama configs; the real SmolLM2 MoE is checked in the slow test."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from prunekit.zoo.moe_smol import (
    MoERecipe,
    assemble_moe,
    balanced_assign,
    expert_importance,
    fit_router,
    load_or_build,
    mixtral_config,
    moefy,
    partition_channels,
    set_top_k,
    topk_recall,
)


def _llama(attn: str = "sdpa", seed: int = 0, inter: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=inter, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attn,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _random_groups(n_layers: int, inter: int, E: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(inter, generator=g).reshape(E, inter // E) for _ in range(n_layers)]


# ------------------------------------------------------------------ partition
def test_balanced_assign_hand_worked():
    # every row prefers cluster 0; it takes its two best (rows 0, 1), the rest go to cluster 1
    scores = torch.tensor([[3.0, 0.0], [2.0, 1.0], [1.0, 0.5], [0.0, 0.0]])
    assert balanced_assign(scores).tolist() == [0, 0, 1, 1]
    # round one: rows 0, 1, 3 propose to cluster 0 (room 2, takes 0 and 1), row 2 to cluster 1;
    # round two: row 3 goes to cluster 1, though it scores 3 on cluster 0
    scores = torch.tensor([[5.0, 0.0], [4.0, 0.0], [0.0, 5.0], [3.0, 2.0]])
    assert balanced_assign(scores).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="4 rows cannot split into 3"):
        balanced_assign(torch.rand(4, 3))


def test_partition_is_balanced_and_covers_every_channel():
    torch.manual_seed(0)
    groups = partition_channels(torch.randn(96, 50).abs(), 8, seed=3)
    assert groups.shape == (8, 12)
    assert sorted(groups.reshape(-1).tolist()) == list(range(96))
    with pytest.raises(ValueError, match="96 channels cannot split into 7"):
        partition_channels(torch.randn(96, 50), 7)


def test_partition_recovers_obvious_coactivation_groups():
    # 4 groups of 6 channels; each group fires on its own quarter of the 80 tokens, channels shuffled
    torch.manual_seed(0)
    truth = torch.randperm(24).reshape(4, 6)
    feats = 0.05 * torch.rand(24, 80)
    for g in range(4):
        feats[truth[g][:, None], torch.arange(20 * g, 20 * g + 20)[None]] += 1 + torch.rand(6, 20)
    for seed in range(3):
        got = partition_channels(feats, 4, seed=seed)
        assert {frozenset(r.tolist()) for r in got} == {frozenset(r.tolist()) for r in truth}


# ------------------------------------------------------------------ router
def test_expert_importance_matches_per_expert_products():
    torch.manual_seed(0)
    h, down = torch.randn(10, 12), torch.randn(5, 12)
    groups = torch.tensor([[0, 5, 7], [1, 2, 11], [3, 4, 6], [8, 9, 10]])
    ref = torch.stack([torch.stack([(down[:, g] @ h[t, g]).norm() for g in groups]) for t in range(10)])
    torch.testing.assert_close(expert_importance(h, down, groups, chunk=3), ref)


def test_topk_recall_hand_worked():
    imp = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    logits = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.0, 0.0, 1.0, 2.0]])
    # token 0: router {2, 0} vs truth {0, 1}: 1/2; token 1: {3, 2} vs {3, 2}: 1
    assert topk_recall(logits, imp, 2) == pytest.approx(0.75)


@pytest.mark.parametrize("steps", [0, 100])
def test_router_recall_beats_random_on_learnable_structure(steps):
    # expert importance log-linear in x plus noise: a linear router can learn it, a random one cannot
    torch.manual_seed(0)
    T, H, E, k = 2000, 24, 8, 2
    x, a = torch.randn(T, H), torch.randn(E, H)
    imp = torch.exp(x @ a.T / 2 + 0.3 * torch.randn(T, E))
    w = fit_router(x, imp, k, steps=steps)
    assert w.shape == (E, H)
    assert (x @ w.T).std(1).mean().item() == pytest.approx(1.0, rel=1e-4)  # unit spread across experts
    random = topk_recall(torch.randn(T, E), imp, k)
    assert random < 0.4  # k / E = 0.25 in expectation
    assert topk_recall(x @ w.T, imp, k) > random + 0.4


def test_moefy_router_beats_random_on_held_out_tokens():
    torch.manual_seed(0)
    m = _llama(inter=64)
    ids = torch.randint(3, 128, (8, 32))
    r = MoERecipe(n_experts=8, top_k=2, n_windows=8, seq_len=32, heldout=0.25, router_steps=50)
    groups, routers, log = moefy(m, ids, r)
    assert len(groups) == len(routers) == 3
    assert all(sorted(g.reshape(-1).tolist()) == list(range(64)) for g in groups)
    assert log["fit_tokens"] == 6 * 32 and log["calibration_tokens"] == 8 * 32
    for k, rec in log["recall_heldout"].items():
        assert rec > log["recall_random"][k], (k, rec)
    groups2, routers2, _ = moefy(m, ids, r)  # deterministic under the seed
    assert all(torch.equal(a, b) for a, b in zip(groups, groups2, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(routers, routers2, strict=True))


# ------------------------------------------------------------------ assembly
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_uniform_routing_with_all_experts_is_the_dense_model(attn):
    dense = _llama(attn)
    E = 8
    moe = assemble_moe(dense, _random_groups(3, 64, E), None, top_k=E)
    assert isinstance(moe, MixtralForCausalLM) and not moe.training
    assert moe.config.intermediate_size == 8 and moe.config.num_local_experts == E
    ids = torch.randint(3, 128, (2, 24))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        ref, got = dense(ids, attention_mask=mask).logits, moe(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)
    a = dense.generate(ids[1:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    b = moe.generate(ids[1:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_set_top_k_rescales_experts_and_checks_range():
    dense = _llama()
    moe = assemble_moe(dense, _random_groups(3, 64, 4), None, top_k=2)
    ids = torch.randint(3, 128, (1, 16))
    with torch.no_grad():
        ref = dense(ids).logits
        assert not torch.allclose(moe(ids).logits, ref, atol=1e-3)  # 2 of 4 experts: not the dense MLP
        set_top_k(moe, 4)
        torch.testing.assert_close(moe(ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert moe.config.num_experts_per_tok == 4 and moe.model.layers[0].mlp.gate.top_k == 4
    with pytest.raises(ValueError, match=r"top_k must be in 1\.\.4.*got 5"):
        set_top_k(moe, 5)


def test_top_k_experts_sum_those_experts_channels():
    # a router that always picks experts {0, 1}: the block equals the dense MLP restricted to their channels
    dense = _llama()
    E, groups = 4, _random_groups(3, 64, 4)
    routers = [torch.zeros(E, 32) for _ in range(3)]
    moe = assemble_moe(dense, groups, routers, top_k=2)
    moe.model.layers[1].mlp.gate.register_forward_hook(_force_first_two)  # Mixtral's router has no bias
    with torch.no_grad():
        x = torch.randn(5, 32)
        mlp, block = dense.model.layers[1].mlp, moe.model.layers[1].mlp
        keep = groups[1][:2].reshape(-1)
        h = torch.nn.functional.silu(x @ mlp.gate_proj.weight[keep].T) * (x @ mlp.up_proj.weight[keep].T)
        torch.testing.assert_close(
            block(x[None])[0], h @ mlp.down_proj.weight[:, keep].T, rtol=1e-5, atol=1e-6
        )


def _force_first_two(module, args, out):
    logits, _, _ = out
    n = logits.shape[0]
    return logits, torch.full((n, 2), 0.5), torch.tensor([[0, 1]]).expand(n, 2)


def test_mixtral_config_copies_llama_sizes_and_refuses_uneven_split():
    dense = _llama()
    c = mixtral_config(dense.config, 4, 2)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 4, 2, 8)
    assert c.rope_parameters["rope_theta"] == 5000.0 and c.tie_word_embeddings and c.sliding_window is None
    assert (c.num_local_experts, c.num_experts_per_tok, c.intermediate_size) == (4, 2, 16)
    with pytest.raises(ValueError, match="intermediate_size 64 does not split into 5"):
        mixtral_config(dense.config, 5, 2)


@pytest.mark.parametrize(
    "kw, msg",
    [({"top_k": 17}, "top_k=17"), ({"n_experts": 0}, "n_experts=0"), ({"heldout": 1.0}, "heldout=1.0"),
     ({"beta": -1.0}, "beta=-1.0")],
)  # fmt: skip
def test_recipe_refuses_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MoERecipe(**kw)


def test_recipe_key_changes_with_fields():
    assert MoERecipe().key() == MoERecipe().key()
    assert MoERecipe(top_k=2).key() != MoERecipe().key()


# ------------------------------------------------------------------ cache
def test_cache_round_trip(tmp_path, monkeypatch):
    from prunekit import zoo
    from prunekit.assets import cache_dir

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    _, tok = zoo.smollm2()
    dense = _llama()
    routers = [torch.randn(4, 32) for _ in range(3)]
    built = assemble_moe(dense, _random_groups(3, 64, 4), routers, top_k=2, beta=0.5)
    calls = []

    def make():
        calls.append(1)
        return built, tok, {"note": "tiny"}

    folder = cache_dir("smollm2-moe") / "tiny"
    assert folder.parent.parent == tmp_path
    first, _ = load_or_build(folder, make, torch.float32)
    second, tok2 = load_or_build(folder, make, torch.float32)
    assert len(calls) == 1
    assert (folder / "model.safetensors").exists() and (folder / "build-log.json").exists()
    ids = torch.randint(3, 128, (2, 12))
    with torch.no_grad():
        ref = built(ids).logits
        assert torch.equal(first(ids).logits, ref) and torch.equal(second(ids).logits, ref)
    assert tok2("hello world").input_ids == tok("hello world").input_ids
    assert (
        second.config.num_experts_per_tok == 2 and second.lm_head.weight is second.model.embed_tokens.weight
    )


# ------------------------------------------------------------------ the real model
@pytest.mark.slow
def test_real_smollm2_moe_matches_dense_with_all_experts_and_uniform_weights():
    from prunekit import zoo
    from prunekit.zoo import smollm2_moe
    from prunekit.zoo.moe_smol import build_log

    dense, tok = zoo.smollm2(torch.float32)
    moe, _ = smollm2_moe(torch.float32)
    c, d = moe.config, dense.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (
        d.hidden_size, d.num_hidden_layers, d.num_attention_heads, d.num_key_value_heads,
    )  # fmt: skip
    assert c.num_local_experts * c.intermediate_size == d.intermediate_size
    log = build_log()
    k = str(c.num_experts_per_tok)
    assert log["recall_heldout"][k] > log["recall_random"][k] + 0.2
    ids = tok("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.gate.weight.zero_()
        set_top_k(moe, c.num_local_experts)
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-3)
