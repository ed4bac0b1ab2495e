"""Weight pruning: hand-worked criteria and patterns, SparseGPT against a naive OBS reference,
sequential calibration against an independent recomputation, OWL, restore / finalize / reload,
and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize

import prunekit
from prunekit.errors import PrunekitError, UnknownMethodError, UnsupportedModelError
from prunekit.weights import Pattern, keep_mask, parse_pattern
from prunekit.weights.allocate import outlier_ratio, owl
from prunekit.weights.calibration import CalibrationError, calibration_ids
from prunekit.weights.method import WeightMethod
from prunekit.weights.sparsegpt import sparsegpt
from prunekit.weights.structures import resolve_sparsity
from tiny import DECODERS, VLMS

CAL = torch.randint(3, 256, (6, 24), generator=torch.Generator().manual_seed(1))


def decoder(name="llama"):
    return DECODERS[name]("sdpa").eval()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, snap) -> bool:
    state = model.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)


# ------------------------------------------------------------------ structures (hand-worked)
def test_row_mask_prunes_the_lowest_of_each_row():
    score = torch.tensor([[4.0, 2.0, 3.0, 5.0], [16.0, 3.0, 2.0, 1.0]])
    keep = keep_mask(score, 0.5, Pattern(), "row")
    assert keep.tolist() == [[True, False, False, True], [True, True, False, False]]


def test_layer_mask_compares_the_whole_layer():
    score = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert keep_mask(score, 0.5, Pattern(), "layer").tolist() == [[False] * 4, [True] * 4]
    assert keep_mask(score, 0.5, Pattern(), "row").tolist() == [[False, False, True, True]] * 2
    ties = torch.tensor([[3.0, 1.0, 3.0, 3.0]])  # ties go by position (stable sort)
    assert keep_mask(ties, 0.5, Pattern(), "layer").tolist() == [[False, False, True, True]]


def test_nm_mask_keeps_the_n_largest_of_every_block():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(5, 16, generator=g)
    keep = keep_mask(score, 0.5, parse_pattern("2:4"), "row")
    blocks = keep.view(5, 4, 4)
    assert (blocks.sum(-1) == 2).all()
    for r in range(5):
        for b in range(4):
            vals = score[r, 4 * b : 4 * b + 4].tolist()
            top2 = sorted(range(4), key=lambda i: -vals[i])[:2]
            assert sorted(blocks[r, b].nonzero().flatten().tolist()) == sorted(top2)
    keep48 = keep_mask(score, 0.5, parse_pattern("4:8"), "row")
    assert (keep48.view(5, 2, 8).sum(-1) == 4).all()


@pytest.mark.parametrize("bad", ["2:2", "0:4", "5:4", "2-4", "sparse", "a:b"])
def test_bad_patterns_are_refused(bad):
    with pytest.raises(ValueError, match="N:M"):
        parse_pattern(bad)


def test_sparsity_range_and_nm_agreement():
    assert resolve_sparsity(None, Pattern()) == 0.5
    assert resolve_sparsity(None, Pattern(1, 4)) == 0.75
    for bad in (1.0, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            resolve_sparsity(bad, Pattern())
    with pytest.raises(ValueError, match=r"removes exactly 0\.5"):
        resolve_sparsity(0.6, Pattern(2, 4))
    with pytest.raises(ValueError, match="divisible"):
        keep_mask(torch.rand(2, 6), 0.5, Pattern(2, 4))


# ------------------------------------------------------------------ allocation (hand-worked)
def test_owl_allocation_by_hand():
    # ratios 0.1 / 0.2 / 0.3 -> densities 0, 0.08, 0.16 -> centred on 0.5 -> sparsities .58 .50 .42
    got = owl([0.1, 0.2, 0.3], 0.5, 0.08)
    assert got == pytest.approx([0.58, 0.50, 0.42])
    assert owl([0.2, 0.2], 0.5, 0.08) == [0.5, 0.5]
    with pytest.raises(ValueError, match="lam"):
        owl([0.1, 0.9], 0.5, 0.6)


def test_outlier_ratio_by_hand():
    # mean of [1, 1, 1, 1, 1, 1, 1, 1, 1, 11] is 2; above 5 x 2 = 10 only the 11 -> 0.1
    scores = [torch.ones(3, 3), torch.tensor([11.0])]
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.1)


# ------------------------------------------------------------------ SparseGPT vs naive OBS
def naive_obs(W, H, pruned, percdamp=0.01):
    """Row by row, column by column: prune w_j with the explicit inverse Hessian of the columns
    not yet processed (OBS restricted to columns >= j), no Cholesky, no blocks, no lazy batches."""
    W = W.double().clone()
    Hd = H.double() + percdamp * H.double().diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    n = W.shape[1]
    for j in range(n):
        Hs = torch.linalg.inv(Hd[j:, j:])  # (n-j, n-j)
        err = torch.where(pruned[:, j], W[:, j], torch.zeros_like(W[:, j])) / Hs[0, 0]
        W[:, j:] -= err[:, None] * Hs[:, 0][None, :]
    return W


def hessian_case(out_f=6, in_f=10, tokens=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    mix = torch.eye(in_f) + 0.6 * torch.randn(in_f, in_f, generator=g)  # correlated inputs, as in LLMs
    X = (torch.randn(tokens, in_f, generator=g) @ mix) * torch.linspace(0.2, 3.0, in_f)
    return W, X, 2 * X.T @ X / tokens


@pytest.mark.parametrize("blocksize", [3, 4, 128])
def test_sparsegpt_update_equals_naive_obs(blocksize):
    W, _, H = hessian_case()
    new, keep = sparsegpt(W, H, 0.5, Pattern(), blocksize=blocksize)
    ref = naive_obs(W, H, ~keep)
    err = (new.double() - ref).abs().max().item()
    print(f"max |sparsegpt - naive OBS| = {err:.2e} (tol 1e-4)")
    assert err < 1e-4
    assert torch.equal(new == 0, ~keep | (W == 0))


def test_sparsegpt_mask_selection_is_the_obs_saliency():
    W, _, H = hessian_case()
    _, keep = sparsegpt(W, H, 0.5, Pattern(), blocksize=128)  # one block: saliency from the original W
    Hd = H.double() + 0.01 * H.double().diagonal().mean() * torch.eye(10, dtype=torch.float64)
    d = torch.tensor([torch.linalg.inv(Hd[j:, j:])[0, 0].item() for j in range(10)])
    sal = W.double() ** 2 / d[None, :]
    thresh = sal.flatten().sort().values[W.numel() // 2]  # official: prune up to the k-th value inclusive
    assert torch.equal(keep, sal > thresh)
    assert int((~keep).sum()) == W.numel() // 2 + 1


def test_sparsegpt_update_reduces_reconstruction_error():
    W, X, H = hessian_case(out_f=16, in_f=32, tokens=200, seed=3)
    for pattern in (Pattern(), Pattern(2, 4)):
        new, keep = sparsegpt(W, H, 0.5, pattern, blocksize=8)
        with_update = ((X @ (W - new).T) ** 2).sum().item()
        mask_only = ((X @ (W - W * keep).T) ** 2).sum().item()
        print(f"{pattern}: reconstruction error {with_update:.2f} with update vs {mask_only:.2f} mask only")
        assert with_update < 0.9 * mask_only
        if not pattern.unstructured:
            assert (keep.view(16, 8, 4).sum(-1) == 2).all()


def test_sparsegpt_dead_inputs_are_zeroed():
    W, X, _ = hessian_case()
    X[:, 2] = 0
    H = 2 * X.T @ X / X.shape[0]
    new, _ = sparsegpt(W, H, 0.5, Pattern())
    assert (new[:, 2] == 0).all()


# ------------------------------------------------------------------ sequential calibration
def test_wanda_masks_follow_the_pruned_previous_layer():
    """Layer 1's Wanda mask must come from inputs made by the *pruned* layer 0 (recomputed here with
    the model's own forward), layer 0's from the embeddings."""
    model = decoder()
    pr = prunekit.prune_weights(model, "wanda", 0.5, calibration=CAL, progress=False, batch_size=4)
    masks = pr.masks
    with torch.no_grad():
        hs = model(input_ids=CAL, output_hidden_states=True).hidden_states  # pruned model
        for i in (0, 1):
            layer = model.model.layers[i]
            x = layer.input_layernorm(hs[i]).reshape(-1, 64).float()
            W = layer.self_attn.q_proj.parametrizations.weight.original
            score = W.abs() * x.pow(2).sum(0).sqrt()[None, :]
            assert torch.equal(
                masks[f"model.layers.{i}.self_attn.q_proj"], keep_mask(score, 0.5, Pattern(), "row")
            )
    pr.restore()


def _dense_wanda_masks(model, seqs, prefix="model.layers.0."):
    """Wanda masks of decoder layer 0's Linears computed independently: input norms gathered by
    hooks on the dense model run on each sequence alone, then each row drops its half lowest."""
    lins = {n: m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)}
    sq = {n: torch.zeros(m.in_features) for n, m in lins.items()}

    def hook(name):
        def fn(mod, args, out):
            sq[name] += args[0].detach().reshape(-1, args[0].shape[-1]).float().pow(2).sum(0)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in lins.items()]
    with torch.no_grad():
        for q in seqs:
            model(input_ids=torch.as_tensor(q)[None])
    for h in handles:
        h.remove()
    masks = {}
    for n, m in lins.items():
        score = m.weight.detach().abs().float() * sq[n].sqrt()[None, :]
        drop = torch.sort(score, dim=1, stable=True).indices[:, : m.in_features // 2]
        masks[n] = torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
    return masks


def test_ragged_token_id_lists_calibrate_each_sequence_alone():
    """A ragged list of 1-D id tensors (and the same as lists of ints): layer 0's Wanda masks equal
    the ones computed from each sequence's own dense inputs; an equal-length list equals the
    ``(N, L)`` tensor it stacks to."""
    model = decoder()
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 256, (n,), generator=g) for n in (24, 9, 31)]
    expected = _dense_wanda_masks(model, seqs)
    for cal in (seqs, [q.tolist() for q in seqs]):
        with prunekit.prune_weights(
            model, "wanda", 0.5, calibration=cal, targets=["layers.0."], progress=False
        ) as pr:
            assert pr.report.calibration_tokens == 24 + 9 + 31
            assert pr.masks.keys() == expected.keys()
            for name, mask in pr.masks.items():
                assert torch.equal(mask, expected[name]), name
    same = [q[:9] for q in seqs]
    with prunekit.prune_weights(model, "wanda", 0.5, calibration=same, progress=False) as a:
        as_list = {k: v.clone() for k, v in a.masks.items()}
    with prunekit.prune_weights(model, "wanda", 0.5, calibration=torch.stack(same), progress=False) as b:
        assert all(torch.equal(as_list[k], v) for k, v in b.masks.items())


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ([1.0, 2.0], "got a list of float"),
        ([torch.tensor([1, 2]), "some text"], "got a list of Tensor, str"),
        ([torch.zeros(5)], r"calibration\[0\] is a tensor of shape \(5,\) dtype torch.float32"),
        ([torch.tensor([4])], r"calibration\[0\] has 1 token"),
        (7, "got int"),
        (torch.arange(5), r"\(N, L\) integer tensor; got shape \(5,\)"),
    ],
)
def test_bad_calibration_is_refused_naming_what_was_given(bad, says):
    with pytest.raises(CalibrationError, match=says) as e:
        prunekit.prune_weights(decoder(), "wanda", 0.5, calibration=bad, tokenizer=object(), progress=False)
    if "got" in says and "shape" not in says:
        assert "list of 1-D LongTensors or of lists of ints" in str(e.value)  # the accepted forms


def test_each_layer_type_is_calibrated_with_its_own_mask_and_rope():
    """Gemma-3 passes sliding-window and full-attention layers different masks and RoPE tables:
    every layer's Wanda masks must come from the inputs the model's own forward gives its Linears
    (q_proj: what the earlier layers made; o_proj: also the layer's own mask and RoPE). A window
    of 8 in 24-token windows makes the two masks differ."""
    from tiny import gemma3

    model = gemma3("sdpa", ["full_attention", "sliding_attention", "full_attention", "sliding_attention"])
    dense = copy.deepcopy(model)
    pr = prunekit.prune_weights(model, "wanda", 0.5, calibration=CAL, progress=False, batch_size=4)
    for i in range(4):  # layers before i pruned by hand, layer i dense (Wanda gathers a layer at once)
        ref = copy.deepcopy(dense)
        with torch.no_grad():
            for key, mask in pr.masks.items():
                if int(key.split(".")[2]) < i:
                    ref.get_submodule(key).weight.mul_(mask)
        seen: dict[str, torch.Tensor] = {}
        attn = ref.model.layers[i].self_attn
        hooks = [
            getattr(attn, n).register_forward_pre_hook(lambda m, a, n=n, d=seen: d.__setitem__(n, a[0]))
            for n in ("q_proj", "o_proj")
        ]
        with torch.no_grad():
            ref(input_ids=CAL)
        for h in hooks:
            h.remove()
        for n, x in seen.items():
            W = getattr(attn, n).weight
            score = W.abs() * x.reshape(-1, x.shape[-1]).float().pow(2).sum(0).sqrt()[None, :]
            key = f"model.layers.{i}.self_attn.{n}"
            assert torch.equal(pr.masks[key], keep_mask(score, 0.5, Pattern(), "row")), key
    pr.restore()


def test_gblm_gradient_term_matches_per_sample_backward():
    model = decoder()
    pr = prunekit.prune_weights(model, "gblm", 0.5, calibration=CAL[:3], progress=False, wanda_term=False)
    got = pr.masks["model.layers.0.mlp.down_proj"]
    pr.restore()
    W = model.model.layers[0].mlp.down_proj.weight
    acc = torch.zeros_like(W)
    for x in CAL[:3]:
        model.zero_grad()
        model(input_ids=x[None], labels=x[None]).loss.backward()
        acc += (100 * W.grad) ** 2
    model.zero_grad()
    ref = keep_mask(W.detach().abs() * acc.sqrt(), 0.5, Pattern(), "row")
    assert torch.equal(got, ref)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_owl_gives_layers_different_sparsities_around_the_target():
    model = decoder()
    pr = prunekit.prune_weights(model, "owl", 0.5, calibration=CAL, progress=False, owl_lam=0.1)
    targets = sorted({r.target for r in pr.report.linears})
    assert len(targets) > 1
    per_layer = [next(r.target for r in pr.report.linears if r.layer == i) for i in range(4)]
    assert sum(per_layer) / 4 == pytest.approx(0.5)
    assert max(per_layer) - min(per_layer) == pytest.approx(0.2)
    pr.restore()


# ------------------------------------------------------------------ reversible, permanent, reload
@pytest.mark.parametrize("name", sorted(DECODERS))
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "gblm", "owl"])
def test_restore_gives_back_the_model_exactly(name, method):
    model = decoder(name)
    snap = snapshot(model)
    params = {n: p for n, p in model.named_parameters()}
    classes = {n: type(m) for n, m in model.named_modules()}
    ids = CAL[:2]
    dense = model(input_ids=ids).logits
    with prunekit.prune_weights(model, method, 0.5, calibration=CAL, progress=False) as pr:
        pruned = model(input_ids=ids).logits
        assert not torch.allclose(pruned, dense)
        assert pr.report.to_dict()["actual_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert same_state(model, snap)
    assert {n: p for n, p in model.named_parameters()} == params  # the same Parameter objects
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert torch.equal(model(input_ids=ids).logits, dense)


def test_restore_after_a_failure_half_way():
    class Boom(WeightMethod):
        name = "boom"
        calls = 0

        def score(self, W, stats):
            Boom.calls += 1
            if Boom.calls > 9:
                raise RuntimeError("boom")
            return W.abs()

    model = decoder()
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        prunekit.prune_weights(model, Boom(), 0.5, progress=False)
    assert same_state(model, snap)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_finalize_writes_zeros_and_reloads(tmp_path):
    model = decoder()
    pr = prunekit.prune_weights(model, "sparsegpt", pattern="2:4", calibration=CAL, progress=False)
    ids = CAL[:2]
    masked = model(input_ids=ids).logits
    report = pr.finalize()
    assert report.pattern == "2:4"
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, masked)
    q = model.model.layers[2].self_attn.q_proj.weight
    assert ((q != 0).view(q.shape[0], -1, 4).sum(-1) <= 2).all()
    with pytest.raises(PrunekitError, match="permanent"):
        pr.restore()
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    assert torch.equal(again(input_ids=ids).logits, masked)


def test_irreversible_pruning_equals_finalized_reversible_pruning():
    a, b = decoder(), decoder()
    prunekit.prune_weights(a, "sparsegpt", 0.5, calibration=CAL, progress=False).finalize()
    pr = prunekit.prune_weights(b, "sparsegpt", 0.5, calibration=CAL, progress=False, reversible=False)
    assert pr.state == "finalized"
    assert not any(parametrize.is_parametrized(m) for m in b.modules())
    assert same_state(b, snapshot(a))


def test_targets_choose_the_linears():
    model = decoder()
    pr = prunekit.prune_weights(model, "magnitude", 0.5, targets=["mlp"], progress=False)
    assert {r.name.split(".")[-1] for r in pr.report.linears} == {"gate_proj", "up_proj", "down_proj"}
    pr.restore()
    pr = prunekit.prune_weights(
        model, "magnitude", 0.5, targets=lambda n, m: n.endswith("o_proj"), progress=False
    )
    assert len(pr.report.linears) == 4
    pr.restore()


def test_vlm_language_model_is_pruned():
    model = VLMS["llava"]("sdpa").eval()
    snap = snapshot(model)
    with prunekit.prune_weights(model, "wanda", 0.5, calibration=CAL % 200 + 3, progress=False) as pr:
        assert all(".language_model.layers." in r.name for r in pr.report.linears)
    assert same_state(model, snap)


# ------------------------------------------------------------------ errors
def test_clear_errors():
    model = decoder()
    with pytest.raises(UnknownMethodError, match="wanda"):
        prunekit.prune_weights(model, "wandaa")
    with pytest.raises(ValueError, match="takes weights methods"):
        prunekit.prune_weights(model, "fastv")
    with pytest.raises(ValueError, match="unknown option"):
        prunekit.prune_weights(model, "wanda", calibration=CAL, blocksize=3)
    with pytest.raises(ValueError, match="OWL"):
        prunekit.prune_weights(model, "owl", pattern="2:4", calibration=CAL)
    with pytest.raises(CalibrationError, match="tokenizer") as e:
        prunekit.prune_weights(model, "wanda")
    assert "list of 1-D LongTensors" in str(e.value)  # says the id forms that need no tokenizer
    with pytest.raises(CalibrationError, match="empty"):
        prunekit.prune_weights(model, "wanda", calibration=["  "], tokenizer=object())
    with pytest.raises(ValueError, match="no Linear"):
        prunekit.prune_weights(model, "magnitude", targets=["nothing"])
    with pytest.raises(ValueError, match="group"):
        prunekit.prune_weights(model, "magnitude", group="column")
    pr = prunekit.prune_weights(model, "magnitude", progress=False)
    with pytest.raises(PrunekitError, match="already masked"):
        prunekit.prune_weights(model, "magnitude")
    pr.restore()
    from tiny_encoders import build

    for bad, got in ((build("bert"), "got BertModel (model_type 'bert')"), ((model, None), "got a tuple")):
        with pytest.raises(UnsupportedModelError, match="weight pruning supports causal LMs") as e:
            prunekit.prune_weights(bad, "magnitude")
        for family in ("llama", "qwen2", "mistral", "llava", "qwen2_vl", got):
            assert family in str(e.value)


def test_calibration_windows_are_seeded():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": [ord(c) for c in text]})()

    a = calibration_ids(Tok(), ["abcdefghij" * 10], n_samples=3, seq_len=8, seed=0)
    b = calibration_ids(Tok(), ["abcdefghij" * 10], n_samples=3, seq_len=8, seed=0)
    assert a.shape == (3, 8) and torch.equal(a, b)
    with pytest.raises(CalibrationError, match="fewer than one window"):
        calibration_ids(Tok(), ["abc"], seq_len=8)


# ------------------------------------------------------------------ streaming, CLI
@pytest.mark.parametrize(
    ("method", "options"), [("wanda", {}), ("sparsegpt", {"pattern": "2:4"}), ("owl", {})]
)
def test_streaming_equals_in_memory_bit_for_bit(tmp_path, method, options):
    from transformers import AutoModelForCausalLM

    from prunekit.weights.stream import prune_checkpoint

    model = decoder()
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")  # several shards
    report = prune_checkpoint(
        tmp_path / "src", tmp_path / "out", method, calibration=CAL, progress=False, **options
    )
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval().state_dict()
    pr = prunekit.prune_weights(model, method, calibration=CAL, progress=False, **options)
    assert [(r.name, r.sparsity) for r in report.linears] == [(r.name, r.sparsity) for r in pr.report.linears]
    pr.finalize()
    mine = model.state_dict()
    assert streamed.keys() == mine.keys()
    assert all(torch.equal(streamed[k], mine[k]) for k in mine)


def test_streaming_refuses_what_it_cannot_bound(tmp_path):
    from prunekit.weights.stream import prune_checkpoint

    decoder().save_pretrained(tmp_path / "src")
    with pytest.raises(PrunekitError, match="gradients through the whole model"):
        prune_checkpoint(tmp_path / "src", tmp_path / "out", "gblm", calibration=CAL)
    with pytest.raises(PrunekitError, match="max_layer_bytes"):
        prune_checkpoint(
            tmp_path / "src", tmp_path / "out", "magnitude", max_layer_bytes=1000, progress=False
        )
    with pytest.raises(ValueError, match="differ"):
        prune_checkpoint(tmp_path / "src", tmp_path / "src", "magnitude")
    with pytest.raises(UnsupportedModelError, match=r"config\.json"):
        prune_checkpoint(tmp_path / "nothing", tmp_path / "out", "magnitude")


def test_cli_prune_saves_a_loadable_2_4_checkpoint(tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from prunekit.cli import main

    out = tmp_path / "pruned"
    argv = ["prune", "tiny-llama", "--method", "wanda", "--pattern", "2:4", "--out", str(out),
            "--samples", "2", "--seq-len", "32", "--json"]  # fmt: skip
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["pattern"] == "2:4" and line["actual_sparsity"] == pytest.approx(0.5)
    model = AutoModelForCausalLM.from_pretrained(out)
    W = model.model.layers[1].mlp.down_proj.weight
    assert ((W != 0).view(W.shape[0], -1, 4).sum(-1) <= 2).all()
    assert json.loads((out / "sparsity_config.json").read_text())["sparsity_structure"] == "2:4"
    assert main(["prune", "tiny-llama", "--method", "wanda", "--sparsity", "1.5", "--out", str(out)]) == 2
    assert "[0, 1)" in capsys.readouterr().err
