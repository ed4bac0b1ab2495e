"""Mixture-of-experts pruning on tiny Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE configs: expert removal
equals a reference that masks the removed experts' router logits to -inf (eager, SDPA,
``generate``), save -> ``load_pruned``, per-expert statistics against hand-routed tokens, STUN's
clustering on hand-made co-selection matrices, restore, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

import prunekit
from prunekit.models.moe import masked_routing, moe_layers, remove_experts
from prunekit.weights.calibration import collect, layer0_inputs
from prunekit.weights.engine import _select
from prunekit.weights.export import save_pruned
from prunekit.weights.methods.experts import STUN, ExpertFrequency
from prunekit.weights.structures import Pattern, keep_mask
from prunekit.weights.stun import coselection, distances, merges, plan_clusters, representatives

IDS = dict(eos_token_id=1, bos_token_id=0, pad_token_id=2)


def _config(family: str, k: int = 2, E: int = 8, layers: int = 3):
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=k, **IDS)  # fmt: skip
    if family == "mixtral":
        return MixtralConfig(intermediate_size=16, num_local_experts=E, **common)
    if family == "qwen2_moe":  # a shared expert, and a dense layer (mlp_only_layers)
        return Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=16,
                              shared_expert_intermediate_size=24,
                              num_experts=E, mlp_only_layers=[1], **common)  # fmt: skip
    if family == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=16, num_experts=E, head_dim=8,
                              norm_topk_prob=True, **common)  # fmt: skip
    return OlmoeConfig(intermediate_size=16, num_experts=E, **common)  # olmoe, norm_topk_prob False


def _model(family: str, attn: str = "eager", seed: int = 0, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(family, **kw), attn_implementation=attn).eval()


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


def _reference_router(router, removed: torch.Tensor, normalize: bool, fp32_out: bool):
    """An independent router: logits of removed experts -inf, softmax in fp32, top-k, renormalise."""

    def hook(module, args, out):
        x = args[0].reshape(-1, module.weight.shape[1])
        logits = x @ module.weight.T
        z = logits.float().clone()
        z[:, removed] = float("-inf")
        p = z.softmax(-1)
        w, i = p.topk(module.top_k, dim=-1)
        if normalize:
            w = w / w.sum(-1, keepdim=True)
        return logits, (w if fp32_out else w.to(logits.dtype)), i

    return router.register_forward_hook(hook)


def _removed(E: int, layer: int) -> torch.Tensor:
    """A different, non-uniform choice of removed experts per layer."""
    return torch.tensor([e for e in range(E) if (e + layer) % 3 == 0])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_removal_equals_minus_inf_router_reference(family, attn):
    model = _model(family, attn)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row
    moes = moe_layers(model)
    hooks = [
        _reference_router(m.router, _removed(m.num_experts, m.index), m.normalize, family == "mixtral")
        for m in moes
    ]
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        ref_gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for h in hooks:
        h.remove()
    for m in moes:
        keep = torch.ones(m.num_experts, dtype=torch.bool)
        keep[_removed(m.num_experts, m.index)] = False
        remove_experts(m, keep)
        assert (
            m.experts.gate_up_proj.shape[0]
            == m.router.weight.shape[0]
            == m.experts.num_experts
            == int(keep.sum())
        )
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("family", FAMILIES)
def test_stun_masked_equals_finalized_and_reloads(family, tmp_path):
    model = _model(family, k=3 if family == "olmoe" else 2)
    ids = torch.randint(3, 96, (4, 24), generator=torch.Generator().manual_seed(2))
    pruned = prunekit.prune_weights(
        model, STUN(experts=0.3, then="wanda"), 0.5, calibration=ids, progress=False
    )
    with torch.no_grad():
        masked = model(ids).logits
    report = pruned.finalize()
    with torch.no_grad():
        final = model(ids).logits
    torch.testing.assert_close(final, masked, atol=1e-5, rtol=1e-5)
    d = report.to_dict()
    assert d["actual_sparsity"] == pytest.approx(0.5, abs=0.02)  # Wanda rounds each short row down
    counts = model.config.prunekit_experts
    n_moe = [c for c in counts if c is not None]
    assert sum(n_moe) == sum(r.experts_before for r in report.layers) - round(
        0.3 * sum(r.experts_before for r in report.layers)
    )
    save_pruned(model, tmp_path, report)
    loaded = prunekit.load_pruned(tmp_path, attn_implementation="eager")
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, final)
    for m, m2 in zip(moe_layers(model), moe_layers(loaded), strict=True):
        assert torch.equal(m.experts.gate_up_proj, m2.experts.gate_up_proj)
        assert torch.equal(m.router.weight, m2.router.weight)


def test_nonuniform_counts_reload(tmp_path):
    model = _model("mixtral")
    for m, keep_n in zip(moe_layers(model), (8, 5, 3), strict=True):
        keep = torch.zeros(8, dtype=torch.bool)
        keep[:keep_n] = True
        remove_experts(m, keep)
    from prunekit.models.moe import record, write_record

    assert write_record(model, record(model)) is False  # different counts: the global field stays
    assert model.config.num_local_experts == 8
    ids = torch.randint(3, 96, (2, 10))
    model.save_pretrained(tmp_path)
    loaded = prunekit.load_pruned(tmp_path, attn_implementation="eager")
    assert [m.num_experts for m in moe_layers(loaded)] == [8, 5, 3]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_counts_reload_with_plain_from_pretrained(family, tmp_path):
    model = _model(family)
    ids = torch.randint(3, 96, (2, 10))
    pruned = prunekit.prune_weights(model, "expert_frequency", 0.25, calibration=ids, progress=False)
    pruned.finalize()
    assert {n for n in model.config.prunekit_experts if n is not None} == {6}
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert [m.num_experts for m in moe_layers(plain)] == [6] * len(moe_layers(model))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)


def test_per_expert_statistics_equal_hand_routed_tokens():
    model = _model("mixtral", E=4)
    ids = torch.randint(3, 96, (3, 16), generator=torch.Generator().manual_seed(3))
    prefix, layers = "model.layers", model.model.layers
    chosen = _select(layers, prefix, None)[0]
    inputs = layer0_inputs(model, layers, ids, batch_size=3)
    got = {}
    block_in = []
    h = layers[0].mlp.register_forward_pre_hook(lambda mod, args: block_in.append(args[0].detach()))
    stats, _ = collect(chosen, inputs, layers[0], frozenset({"x_norm", "hessian"}))
    h.remove()
    x = torch.cat([b.reshape(-1, 32) for b in block_in])
    W_r = layers[0].mlp.gate.weight.detach()
    top = (x @ W_r.T).softmax(-1).topk(2, dim=-1).indices  # hand routing
    Wgu = layers[0].mlp.experts.gate_up_proj.detach()
    for e in range(4):
        xe = x[(top == e).any(-1)]
        act = F.silu(xe @ Wgu[e, :16].T) * (xe @ Wgu[e, 16:].T)
        s_gu = stats[f"{prefix}.0.mlp.experts.{e}.gate_up_proj"]
        s_dn = stats[f"{prefix}.0.mlp.experts.{e}.down_proj"]
        assert s_gu.n_tokens == s_dn.n_tokens == len(xe)
        torch.testing.assert_close(s_gu.x_sq, (xe * xe).sum(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s_gu.xtx, xe.T @ xe, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s_dn.x_sq, (act * act).sum(0), rtol=1e-4, atol=1e-6)
        got[e] = len(xe)
    assert sum(got.values()) == x.shape[0] * 2


def test_wanda_on_experts_matches_reference_and_unreached_rule():
    model = _model("mixtral", E=4, layers=1)
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(4))
    moe = moe_layers(model)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # expert 3 is taken out of routing: no calibration token reaches it
    off = masked_routing(moe, torch.tensor([True, True, True, False]))
    block_in = []
    h = model.model.layers[0].mlp.register_forward_pre_hook(
        lambda mod, args: block_in.append(args[0].detach())
    )
    pruned = prunekit.prune_weights(model, "wanda", 0.5, calibration=ids, batch_size=2, progress=False)
    h.remove()
    off.remove()
    x = block_in[0].reshape(-1, 32)
    logits = x @ moe.router.weight.detach().T
    logits[:, 3] = float("-inf")
    top = logits.softmax(-1).topk(2, dim=-1).indices
    masks = pruned.masks
    Wgu = moe.experts.parametrizations.gate_up_proj.original.detach()
    for e in range(3):
        xe = x[(top == e).any(-1)]
        ref = keep_mask(Wgu[e].abs() * (xe * xe).sum(0).sqrt()[None], 0.5, Pattern())
        assert torch.equal(masks[f"model.layers.0.mlp.experts.{e}.gate_up_proj"], ref)
    assert pruned.report.unreached == 2  # expert 3's gate_up_proj and down_proj
    ref3 = keep_mask(Wgu[3].abs(), 0.5, Pattern())  # the stated rule: magnitude
    assert torch.equal(masks["model.layers.0.mlp.experts.3.gate_up_proj"], ref3)
    pruned.restore()
    assert set(model.state_dict()) == set(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("method,kw", [("sparsegpt", {}), ("wanda", {"pattern": "2:4"}), ("owl", {})])
def test_unstructured_methods_on_experts_restore_exactly(method, kw):
    model = _model("qwen2_moe")
    ids = torch.randint(3, 96, (2, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(ids).logits
    pruned = prunekit.prune_weights(model, method, 0.5, calibration=ids, progress=False, **kw)
    names = list(pruned.masks)
    assert any(".experts." in n for n in names) and not any("shared_expert_gate" in n for n in names)
    if kw.get("pattern") == "2:4":
        W = model.model.layers[0].mlp.experts.down_proj.detach()
        assert bool(((W != 0).reshape(W.shape[0], W.shape[1], -1, 4).sum(-1) <= 2).all())
    pruned.restore()
    assert set(model.state_dict()) == set(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_failure_in_stage2_restores_the_model(monkeypatch):
    model = _model("olmoe")
    ids = torch.randint(3, 96, (2, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(ids).logits

    def boom(*a, **k):
        raise RuntimeError("stage 2 failed")

    monkeypatch.setattr("prunekit.weights.engine.prune_weights", boom)
    with pytest.raises(RuntimeError, match="stage 2 failed"):
        prunekit.prune_weights(model, "stun", 0.5, calibration=ids, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    assert all(not m.router._forward_hooks for m in moe_layers(model))


# ------------------------------------------------------------------ STUN's pieces, by hand
def test_coselection_counts_every_pair_in_the_top_k():
    top = torch.tensor([[0, 1, 2], [0, 1, 3], [2, 3, 1]])
    C = coselection(top, 4)
    expect = torch.zeros(4, 4, dtype=torch.float64)
    for row in top.tolist():
        for a in row:
            for b in row:
                if a != b:
                    expect[a, b] += 1
    assert torch.equal(C, expect)
    C2 = coselection(top, 4, pairs="top2")  # the official count: the first two only
    assert C2[0, 1] == 2 and C2[2, 3] == 1 and C2[0, 2] == 0 and C2.sum() == 6


def test_normalized_coselection_is_the_cosine_of_selection_vectors():
    from prunekit.weights.stun import normalized

    top = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 2]])  # f = (4, 2, 2)
    C = normalized(coselection(top, 3), top)
    assert C[0, 1] == pytest.approx(2 / (4 * 2) ** 0.5) and C[1, 2] == 0.0


def test_stun_frequency_selector_is_the_frequency_baseline():
    model = _model("mixtral", E=4, layers=1)
    moe = moe_layers(model)[0]
    choices = [torch.tensor([[0, 1], [0, 2], [0, 1], [2, 1]])]
    assert torch.equal(
        STUN(selector="frequency").plan([moe], choices, 2)[0], torch.tensor([True, True, False, False])
    )
    with pytest.raises(ValueError, match="selector must be one of"):
        STUN(selector="loss")


def test_distances_divide_by_mean_and_infinite_diagonal():
    C = torch.tensor([[0.0, 4.0], [4.0, 0.0]])
    D = distances(C)
    # -C has mean -2 over the four entries: D = -C / 2
    assert D[0, 1] == -2.0 and D[1, 0] == -2.0 and torch.isinf(D.diagonal()).all()


def test_greedy_clustering_with_rejection_by_hand():
    inf = float("inf")
    # 0-1 and 1-2 are close, 0-2 far: merging {0,1} with 2 is rejected (0 to 2 >= tau)
    D = torch.tensor(
        [[inf, -3.0, 5.0, 4.0], [-3.0, inf, -2.0, 4.0], [5.0, -2.0, inf, 4.0], [4.0, 4.0, 4.0, inf]]
    )
    seq = merges(D, tau=0.0, min_clusters=1)
    assert len(seq) == 1
    assert seq[0][0] == -3.0
    assert seq[0][1].tolist() == [0, 0, 2, 3]
    # tau 4.5: (1,2) at -2 is rejected (2 to 0 is 5); then the pairs at 4 in index order: (0,3)
    # merges 3 into {0,1} (3 to 0 and 1 is 4 < 4.5); (2,3) is rejected (2 to 0 is 5)
    seq = merges(D, tau=4.5, min_clusters=1)
    assert [lab.tolist() for _, lab in seq] == [[0, 0, 2, 3], [0, 0, 2, 0]]
    seq = merges(D, tau=10.0, min_clusters=2)  # stops at two clusters
    assert seq[-1][1].unique().numel() == 2


def test_global_threshold_meets_the_exact_budget_with_different_counts_per_layer():
    # layer A: two strongly co-selected blocks {0,1,2} {3,4,5}; layer B: nothing co-selected
    CA = torch.zeros(6, 6)
    for blk in ([0, 1, 2], [3, 4, 5]):
        for a in blk:
            for b in blk:
                if a != b:
                    CA[a, b] = 10.0
    CB = torch.zeros(6, 6)  # all distances 0: after every co-selected pair of layer A
    Ds = [distances(CA), distances(CB)]
    labels = plan_clusters(Ds, target=12 - 4, mins=[2, 2])
    a, b = labels
    assert a.unique().numel() == 2 and a[:3].unique().numel() == 1 and a[3:].unique().numel() == 1
    assert b.unique().numel() == 6  # the four merges all went to the co-selected layer
    with pytest.raises(ValueError, match="between 4"):
        plan_clusters(Ds, target=3, mins=[2, 2])


def test_representative_is_the_member_nearest_the_cluster_mean():
    labels = torch.tensor([0, 0, 0, 3])
    W = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [9.0, 9.0]])  # mean of 0..2 is 2: member 1
    assert representatives(labels, W).tolist() == [False, True, False, True]


def test_frequency_removes_the_least_selected_experts():
    model = _model("mixtral", E=4, layers=1)
    moe = moe_layers(model)[0]
    choices = [torch.tensor([[0, 1], [0, 2], [0, 1], [2, 1]])]  # counts 3, 3, 2, 0
    keep = ExpertFrequency().plan([moe], choices, 2)[0]
    assert keep.tolist() == [True, True, False, False]


# ------------------------------------------------------------------ errors
def test_clear_errors():
    model = _model("mixtral", E=4)
    moe = moe_layers(model)[0]
    with pytest.raises(ValueError, match="lose all its 4 experts"):
        remove_experts(moe, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="fewer than its top_k=2"):
        remove_experts(moe, torch.tensor([True, False, False, False]))
    ids = torch.randint(3, 96, (2, 8))
    with pytest.raises(ValueError, match=r"at most 0\.5000"):
        prunekit.prune_weights(model, "expert_random", 0.75, progress=False)
    with pytest.raises(ValueError, match="then must be one of"):
        STUN(then="sparsegpt")
    with pytest.raises(ValueError, match="already removes"):
        prunekit.prune_weights(model, STUN(experts=0.5), 0.1, calibration=ids, progress=False)
    with pytest.raises(ValueError, match="gradients"):
        prunekit.prune_weights(model, "gblm", 0.5, calibration=ids, progress=False)
    dense = AutoModelForCausalLM.from_config(
        __import__("transformers").LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=16,
            **IDS,
        )
    )
    with pytest.raises(prunekit.errors.UnsupportedModelError, match="no MoE layer"):
        prunekit.prune_weights(dense, "expert_random", 0.25, progress=False)
    assert all(not m.router._forward_hooks for m in moe_layers(model))
