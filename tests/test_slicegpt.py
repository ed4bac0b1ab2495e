"""SliceGPT: the computational invariance (no slicing = the dense model), the PCA basis against an
independent eigen-decomposition, the hand-worked sparsity -> width mapping, save -> load_pruned,
generate with left padding, restore (also after an exception), and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.errors import UnsupportedModelError
from prunekit.models.slicing import RMSN, SlicedLayer
from prunekit.weights.export import save_pruned
from prunekit.weights.methods import slicegpt as sg
from test_structured import CAL, build
from tiny import text_inputs


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, n=5):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)


def slice_(model, sparsity=None, **kw):
    return prunekit.prune_weights(model, "slicegpt", sparsity, calibration=CAL, progress=False, **kw)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {id(p) for p in model.parameters()}


def same_as(model, snap) -> bool:
    state, ids = snap
    now = model.state_dict()
    return (
        now.keys() == state.keys()
        and all(torch.equal(now[k], state[k]) for k in state)
        and {id(p) for p in model.parameters()} == ids
    )


# ------------------------------------------------------------------ computational invariance
@pytest.mark.parametrize("orientation", ["pca", "random"])
@pytest.mark.parametrize(("family", "attn", "tied"), [
    ("llama", "eager", False), ("qwen2", "sdpa", True), ("mistral", "sdpa", False),
])  # fmt: skip
def test_no_slicing_is_the_dense_model(family, attn, tied, orientation):
    model = build(family, attn, tie_word_embeddings=tied)
    inputs = text_inputs(batch=3, length=16)  # left-padded
    dense = logits(model, inputs)
    E = model.model.embed_tokens.weight.detach().clone()
    pr = slice_(model, slicing=0.0, final_orientation=orientation)
    assert pr.report.hidden == 64 and all(isinstance(layer, SlicedLayer) for layer in model.model.layers)
    assert isinstance(model.model.norm, RMSN) and model.lm_head.weight is not model.model.embed_tokens.weight
    assert not torch.allclose(model.model.embed_tokens.weight, E, atol=1e-3)  # really rotated
    real = inputs["attention_mask"].bool()
    assert torch.allclose(logits(model, inputs)[real], dense[real], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("slice_head", [False, True])
def test_slicing_is_exact_when_the_residual_stream_lies_in_a_subspace(slice_head):
    # embeddings, o_proj and down_proj confined to a 40-dim subspace: the residual stream never leaves
    # it, so keeping its top 48 principal directions loses nothing (a wrong rotation, shortcut or
    # slice would)
    model = build("llama", "eager")
    B, _ = torch.linalg.qr(torch.randn(64, 40, generator=torch.Generator().manual_seed(5)))
    P = B @ B.T
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ P)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(P @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(P @ layer.mlp.down_proj.weight)
    inputs = text_inputs(batch=2, length=12)
    dense = logits(model, inputs)
    slice_(model, slicing=0.25, slice_head=slice_head)
    assert model.lm_head.in_features == (48 if slice_head else 64)
    real = inputs["attention_mask"].bool()
    assert torch.allclose(logits(model, inputs)[real], dense[real], atol=1e-5, rtol=1e-5)


def test_faithful_centring_changes_an_rmsnorm_model():
    # quirk (a): mean-centring the embeddings is not function-preserving before an RMSNorm
    model = build("llama", "eager")
    inputs = text_inputs(batch=1, length=12)
    dense = logits(model, inputs)
    slice_(model, slicing=0.0, faithful=True)
    assert model.model.layers[0].input_layernorm.eps == 1e-5  # quirk (b) kept too
    assert (logits(model, inputs) - dense).abs().max() > 1e-3


def test_random_orientation_slices_the_same_subspace():
    # a rotation inside the kept d' coordinates changes the basis, not the function
    a, b = build("llama", "eager"), build("llama", "eager")
    inputs = text_inputs(batch=2, length=12)
    slice_(a, slicing=0.25)
    slice_(b, slicing=0.25, final_orientation="random")
    assert a.model.embed_tokens.weight.shape == b.model.embed_tokens.weight.shape == (256, 48)
    assert not torch.allclose(a.model.embed_tokens.weight, b.model.embed_tokens.weight, atol=1e-3)
    real = inputs["attention_mask"].bool()
    assert torch.allclose(logits(a, inputs)[real], logits(b, inputs)[real], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ the PCA
def test_embedding_basis_is_the_eigenbasis_of_the_calibration_covariance():
    model = build("llama", "eager")
    E = model.model.embed_tokens.weight.detach().double().numpy()
    X = E[CAL.reshape(-1).numpy()]  # layer 0's inputs: the embeddings of the calibration tokens
    C = X.T @ X
    C[np.diag_indices(64)] += 0.01 * np.trace(C) / 64
    _, vec = np.linalg.eigh(C)
    ref = vec[:, ::-1][:, :32]  # descending
    slice_(model, slicing=0.5)
    new = model.model.embed_tokens.weight.detach().double().numpy()  # E @ Q[:, :32]
    Q = np.linalg.lstsq(E, new, rcond=None)[0]
    assert np.allclose(np.abs((Q * ref).sum(0)), 1.0, atol=1e-4)  # each direction, up to sign


def test_pca_sorts_descending_with_one_percent_damping():
    x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])[None]  # C = diag(9, 1), damping 0.05
    val, Q = sg.pca([x])
    assert val.tolist() == pytest.approx([9.05, 1.05]) and torch.equal(
        Q.abs(), torch.eye(2, dtype=torch.float64)
    )


# ------------------------------------------------------------------ sparsity -> width
def test_sparsity_maps_to_the_width_hand_worked():
    # H=64, 8 query / 2 KV heads of 8, I=128, 5 layers: 34,816 prunable weights a layer, 174,080 in all.
    # Sliced to d (last layer writes all 64: the head is not sliced), shortcuts d*d + d*d_out:
    #   d=40: 4 * 24,960 + 28,992 = 128,832 -> removes 0.2599;  d=32: 102,400 -> removes 0.4118
    model = build("llama", "eager")
    pr = slice_(model, 0.3)
    r = pr.report
    assert (r.hidden, r.params_targeted, r.params_pruned) == (40, 174_080, 174_080 - 128_832)
    assert [x.params_after for x in r.layers] == [24_960] * 4 + [28_992]
    assert [x.shortcut_params for x in r.layers] == [3200] * 4 + [4160]
    assert model.model.layers[-1].mlp.down_proj.weight.shape == (64, 128) and model.lm_head.in_features == 64
    assert slice_(build("llama", "eager"), 0.4).report.hidden == 32


def test_whole_model_parameters_count_the_untied_head():
    model = build("qwen2", "eager", tie_word_embeddings=True)
    before = sum(p.numel() for p in model.parameters())
    r = slice_(model, slicing=0.25).report  # d' = 48
    assert r.untied_head and not model.config.tie_word_embeddings
    V = 256
    layers = sum(x.params_after for x in r.layers)
    biases = 5 * (64 + 16 + 16)  # q/k/v biases (Qwen2), not sliced
    assert r.model_params_before == before
    assert (
        r.model_params_after
        == V * 48 + layers + biases + V * 64
        == sum(p.numel() for p in model.parameters())
    )


# ------------------------------------------------------------------ save, reload, generate
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_then_load_pruned_gives_identical_outputs(family, tmp_path):
    model = build(family, "eager", tie_word_embeddings=True)
    inputs = text_inputs(batch=2, length=14)
    report = slice_(model, 0.3).finalize()
    save_pruned(model, tmp_path, report)
    loaded = prunekit.load_pruned(tmp_path, dtype=torch.float32, attn_implementation="eager")
    assert type(loaded) is type(model) and loaded.config.prunekit_slicing["layers"][0]["hidden"] == 40
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert torch.equal(greedy(loaded, inputs), greedy(model, inputs))
    with pytest.raises(Exception, match=r"(?i)mismatch|size"):  # plain loading refuses: never silent
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_left_padded_batch_matches_each_row_alone(attn):
    model = build("mistral", attn)
    slice_(model, 0.3).finalize()
    inputs = text_inputs(batch=2, length=12)  # row 1 is 3 tokens shorter, left-padded
    out = greedy(model, inputs, n=6)
    for b in range(2):
        keep = inputs["attention_mask"][b].bool()
        alone = {
            "input_ids": inputs["input_ids"][b, keep][None],
            "attention_mask": torch.ones(1, int(keep.sum())),
        }
        assert torch.equal(greedy(model, alone, n=6)[0, -6:], out[b, -6:])


# ------------------------------------------------------------------ restore
def test_restore_gives_back_the_model_exactly():
    model = build("qwen2", "sdpa", tie_word_embeddings=True)
    snap, classes = snapshot(model), [type(m) for m in model.modules()]
    inputs = text_inputs(batch=2, length=12)
    dense = logits(model, inputs)
    with slice_(model, 0.3) as pr:
        assert not torch.equal(logits(model, inputs), dense) and pr.masks == {}
    assert pr.state == "restored" and same_as(model, snap) and [type(m) for m in model.modules()] == classes
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    assert torch.equal(logits(model, inputs), dense)
    with pytest.raises(prunekit.PrunekitError, match="restored"):
        pr.finalize()


def test_a_failure_half_way_restores(monkeypatch):
    model = build("llama", "eager")
    snap = snapshot(model)
    calls = []
    real = sg.pca

    def failing(xs, damp=0.01):
        calls.append(1)
        if len(calls) == 5:  # layer 1's MLP-norm input: layer 0 is already sliced
            raise RuntimeError("boom")
        return real(xs, damp)

    monkeypatch.setattr(sg, "pca", failing)
    with pytest.raises(RuntimeError, match="boom"):
        slice_(model, 0.3)
    assert same_as(model, snap) and not any(isinstance(m, (SlicedLayer, RMSN)) for m in model.modules())


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), True, "0.2"])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        slice_(build("llama"), bad)


def test_bad_options_are_refused():
    model = build("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="not both"):
        slice_(model, 0.2, slicing=0.2)
    with pytest.raises(ValueError, match=r"final_orientation must be one of \['pca', 'random'\]"):
        slice_(model, 0.2, final_orientation="svd")
    with pytest.raises(ValueError, match="round_to must be"):
        slice_(model, 0.2, round_to=0)
    with pytest.raises(ValueError, match="would empty a layer"):
        slice_(model, 0.95)
    assert same_as(model, snap)


def test_unsupported_models_are_refused():
    with pytest.raises(UnsupportedModelError, match="post-norms"):
        slice_(build("gemma3"), 0.2)
    from transformers import MixtralConfig, MixtralForCausalLM

    from tiny import TXT

    moe = MixtralForCausalLM(MixtralConfig(**dict(TXT, num_local_experts=2, num_experts_per_tok=1)))
    with pytest.raises(UnsupportedModelError, match="Llama, Qwen2"):
        slice_(moe, 0.2)
    model = build("llama")
    slice_(model, 0.2).finalize()
    with pytest.raises(UnsupportedModelError, match="already sliced"):
        slice_(model, 0.2)
