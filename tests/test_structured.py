"""Structured weight pruning: masked model == physically shrunk model (eager, SDPA, GQA, Qwen2
biases, Gemma-3 sliding layers, generate with left padding), save -> load_pruned, restore, each
method's ranking against a hand-worked case or an independent computation, and clear errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn.utils import parametrize
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import prunekit
from prunekit.errors import UnsupportedModelError
from prunekit.models.structure import LayerGeometry, LayerKeep, NoAttention
from prunekit.weights.calibration import CalibrationError
from prunekit.weights.export import save_pruned
from prunekit.weights.structured import (
    StructuredMethod,
    attention_units,
    cfsp_budgets,
    cfsp_scores,
    global_counts,
    layer_keep,
    layers_to_remove,
    uniform_keep,
    wanda_sp,
)
from tiny import TXT, text_inputs

CAL = torch.randint(3, 256, (6, 24), generator=torch.Generator().manual_seed(1))
GQA = dict(TXT, num_attention_heads=8, num_key_value_heads=2, head_dim=8, num_hidden_layers=5)


def build(family: str, attn: str = "sdpa", **over):
    """Tiny decoders with GQA 8 query / 2 KV heads (g = 4), head_dim 8, 5 layers."""
    torch.manual_seed(0)
    kw = dict(GQA, **over)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw, attn_implementation=attn))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw, attn_implementation=attn))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**kw, sliding_window=None, attn_implementation=attn))
    elif family == "gemma3":
        n = kw["num_hidden_layers"]
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        cfg = Gemma3TextConfig(**{k: v for k, v in kw.items() if k != "max_position_embeddings"},
                               sliding_window=8, layer_types=types)  # fmt: skip
        cfg._attn_implementation = attn
        model = Gemma3ForCausalLM(cfg)
    else:
        raise KeyError(family)
    return model.eval()


@dataclasses.dataclass
class Fixed(StructuredMethod):
    """A method that returns a given plan (to test masks and surgery on every kind of unit)."""

    keeps: list = dataclasses.field(default_factory=list)
    name = "fixed"

    def plan(self, data, sparsity):
        return [dataclasses.replace(k) for k in self.keeps]


def hand_plan(H: int = 64, inter: int = 128) -> list[LayerKeep]:
    g = torch.Generator().manual_seed(3)
    t = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return [
        # one KV group kept (KV head 1 with its query heads 4..7), 100 channels, both biases
        LayerKeep(q_heads=t(4, 5, 6, 7), kv_heads=t(1), channels=torch.randperm(inter, generator=g)[:100].sort()[0],  # noqa: E501
                  o_bias=torch.randn(H, generator=g), down_bias=torch.randn(H, generator=g)),
        LayerKeep(removed=True),  # the whole layer
        LayerKeep(q_heads=t(), kv_heads=t(), o_bias=torch.randn(H, generator=g)),  # attention alone
        LayerKeep(channels=t(), down_bias=torch.randn(H, generator=g)),  # MLP alone
        LayerKeep(q_heads=t(0, 2, 5, 7), kv_heads=t(0, 1)),  # 2 query heads in each KV group
    ]  # fmt: skip


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, n=6):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0)


def prunable(model) -> int:
    return sum(
        mod.weight.numel()
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )  # fmt: skip


# ------------------------------------------------------------------ masked == shrunk
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3"])
def test_shrunk_model_equals_masked_model(family, attn):
    model = build(family, attn)
    inputs = text_inputs(batch=3, length=20)  # left-padded rows of 20, 17, 14 tokens
    dense = logits(model, inputs)
    before = prunable(model)
    pruned = prunekit.prune_weights(model, Fixed(keeps=hand_plan()), 0.3, progress=False)
    masked = logits(model, inputs)
    masked_gen = greedy(model, inputs)
    assert (masked - dense).abs().max() > 1e-2  # the masks do change the model
    report = pruned.finalize()
    real = inputs["attention_mask"].bool()
    assert torch.allclose(logits(model, inputs)[real], masked[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy(model, inputs), masked_gen)
    layers = model.model.layers
    assert len(layers) == 4 and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    if family == "gemma3":  # layer 1 (full) went: types of layers 0, 2, 3, 4 remain
        assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention",
                                            "sliding_attention"]  # fmt: skip
    a0 = layers[0].self_attn
    assert a0.q_proj.weight.shape == (32, 64) and a0.k_proj.weight.shape == (8, 64)
    assert a0.num_key_value_groups == 4 and a0.o_proj.bias is not None
    assert layers[0].mlp.down_proj.weight.shape == (64, 100)
    assert isinstance(layers[1].self_attn, NoAttention)
    assert layers[2].mlp.down_proj.weight.shape == (64, 0)
    assert layers[3].self_attn.num_key_value_groups == 2 and layers[3].self_attn.q_proj.weight.shape == (
        32,
        64,
    )
    if family == "qwen2":  # q/k/v biases are sliced with their rows
        assert a0.q_proj.bias.shape == (32,) and a0.k_proj.bias.shape == (8,)
    assert prunable(model) == before - report.params_pruned
    assert [r.q_heads for r in report.layers] == [[4, 5, 6, 7], [], [], list(range(8)), [0, 2, 5, 7]]
    assert [r.removed for r in report.layers] == [False, True, False, False, False]


@pytest.mark.parametrize(
    "method", ["flap", "wanda_sp", "magnitude_sp", "random_sp", "shortgpt", "cfsp", "llm_pruner"]
)
def test_every_method_shrinks_to_the_masked_model(method):
    model = build("llama", "sdpa", num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    inputs = text_inputs(batch=2, length=16)
    opts = {"skip_first": 1, "skip_last": 1} if method == "llm_pruner" else {}
    pruned = prunekit.prune_weights(model, method, 0.4, calibration=CAL, progress=False, **opts)
    masked = logits(model, inputs)
    report = pruned.finalize()
    assert abs(report.to_dict()["actual_sparsity"] - 0.4) < 0.12
    real = inputs["attention_mask"].bool()
    assert torch.allclose(logits(model, inputs)[real], masked[real], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ save and reload
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_save_then_load_pruned_gives_identical_outputs(family, tmp_path):
    model = build(family, "eager")
    inputs = text_inputs(batch=2, length=16)
    report = prunekit.prune_weights(model, Fixed(keeps=hand_plan()), 0.3, progress=False).finalize()
    save_pruned(model, tmp_path, report)  # model.save_pretrained and prunekit_report.json
    assert not (tmp_path / "sparsity_config.json").exists()
    loaded = prunekit.load_pruned(tmp_path, dtype=torch.float32, attn_implementation="eager")
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert torch.equal(greedy(loaded, inputs), greedy(model, inputs))
    assert loaded.config.prunekit_structure[0]["num_attention_heads"] == 4
    assert isinstance(loaded.model.layers[1].self_attn, NoAttention)
    with pytest.raises(Exception, match=r"(?i)mismatch|size"):  # plain loading refuses: never silent
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.slow  # loads SmolLM2 for its tokenizer
def test_cli_prune_writes_a_checkpoint_load_pruned_reloads(tmp_path, capsys):
    import json

    from prunekit.cli import main

    out = tmp_path / "flap"
    argv = ["prune", "tiny-llama", "--method", "flap", "--sparsity", "0.3", "--out", str(out),
            "--samples", "2", "--seq-len", "32", "--json"]  # fmt: skip
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["pattern"] == "structured" and line["actual_sparsity"] == pytest.approx(0.3, abs=0.02)
    model = prunekit.load_pruned(out)
    assert [m["intermediate_size"] for m in model.config.prunekit_structure] == [
        r["channels"] for r in line["layers"]
    ]
    ids = torch.tensor([[1, 5, 9, 13], [0, 1, 7, 8]])
    gen = model.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, 7)


def test_uniform_result_loads_with_plain_from_pretrained(tmp_path):
    model = build("llama", "eager")
    inputs = text_inputs(batch=2, length=16)
    prunekit.prune_weights(model, "magnitude_sp", 0.5, progress=False).finalize()
    assert model.config.prunekit_uniform
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 1)
    model.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert torch.equal(logits(plain, inputs), logits(model, inputs))


# ------------------------------------------------------------------ restore
def test_restore_gives_back_the_model_exactly():
    model = build("qwen2")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = text_inputs(batch=2, length=12)
    dense = logits(model, inputs)
    with prunekit.prune_weights(model, "flap", 0.3, calibration=CAL, progress=False) as pruned:
        assert pruned.masks and not torch.equal(logits(model, inputs), dense)
    assert pruned.state == "restored"
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    state = model.state_dict()
    assert state.keys() == snap.keys() and all(torch.equal(state[k], snap[k]) for k in snap)
    assert torch.equal(logits(model, inputs), dense)


def test_a_failure_half_way_restores():
    class Broken(Fixed):
        def plan(self, data, sparsity):
            return [LayerKeep(channels=torch.arange(3)), LayerKeep(q_heads=torch.tensor([0, 1, 4]))]

    model = build("llama")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"same number of query heads|KV head"):
        prunekit.prune_weights(model, Broken(), 0.3, progress=False)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snap.items())


# ------------------------------------------------------------------ rankings (hand-worked)
def test_global_counts_hand_worked():
    # H=2, d=1, 2 heads = 2 KV groups (MHA), 4 channels: group cost 8, channel cost 6, 40 per layer
    geo = LayerGeometry(hidden=2, head_dim=1, n_q=2, n_kv=2, inter=4)
    gs = [torch.tensor([0.5, -1.0]), torch.tensor([0.1, 0.9])]
    cs = [torch.tensor([1.0, 0.2, -0.3, -2.0]), torch.tensor([0.3, -0.5, 0.0, 1.5])]
    units, cost = attention_units(gs[0], geo, "kv_groups")
    assert units.tolist() == gs[0].tolist() and cost == 8.0
    # ranked: (guards) L0g0 L0c0 L1g1 L1c3 = 28, then L1c0 34, L0c1 40, L1g0 48, L1c2 54 | L0c2 60
    # the kept cost nearest 0.7 * 80 = 56 is 54
    assert global_counts([geo, geo], gs, [8.0, 8.0], cs, 0.3) == [(1, 2), (2, 3)]
    k0 = layer_keep(geo, gs[0], "kv_groups", 1, cs[0], 2)
    assert k0.kv_heads.tolist() == [0] and k0.q_heads.tolist() == [0] and k0.channels.tolist() == [0, 1]
    k1 = layer_keep(geo, gs[1], "kv_groups", 2, cs[1], 3)
    assert k1.q_heads is None and k1.channels.tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="would empty a layer"):
        global_counts([geo, geo], gs, [8.0, 8.0], cs, 0.7)  # at most 1 - 28/80 = 0.65 can go


def test_uniform_keep_hand_worked():
    # H=4, d=2, 4 q / 2 kv (g=2): group cost 6*4*2 = 48; channel 12; layer 96 + 120 = 216
    geo = LayerGeometry(hidden=4, head_dim=2, n_q=4, n_kv=2, inter=10)
    chans = torch.arange(10, 0, -1).double()
    keep = uniform_keep(geo, torch.tensor([3.0, 3.0, 1.0, 1.0]), chans, 0.4)
    # round(0.8) = 1 group (KV head 1 has the lower score) -> 48; then round((86.4 - 48) / 12) = 3 channels
    assert keep.kv_heads.tolist() == [0] and keep.q_heads.tolist() == [0, 1]
    assert keep.channels.tolist() == list(range(7))


def test_query_slots_hand_worked():
    geo = LayerGeometry(hidden=4, head_dim=2, n_q=4, n_kv=2, inter=10)
    head = torch.tensor([5.0, 1.0, 2.0, 4.0])  # group 0: heads 0, 1; group 1: heads 2, 3
    units, cost = attention_units(head, geo, "query_slots")
    assert units.tolist() == [1.5, 4.5] and cost == 32.0  # sorted per group (1, 5), (2, 4); 2*2*4*2
    keep = uniform_keep(geo, head, torch.arange(10, 0, -1).double(), 0.4, "query_slots")
    # 1 slot (32) then round((86.4 - 32) / 12) = 5 channels; each group keeps its best head
    assert keep.q_heads.tolist() == [0, 3] and keep.kv_heads.tolist() == [0, 1]
    assert keep.channels.tolist() == list(range(5))


@pytest.mark.parametrize("method", ["flap", "magnitude_sp"])
def test_query_slots_keep_every_kv_head_and_shrink_to_the_masked_model(method):
    model = build("llama", "eager")
    inputs = text_inputs(batch=2, length=16)
    pruned = prunekit.prune_weights(model, method, 0.6, calibration=CAL, gqa="query_slots", progress=False)
    masked = logits(model, inputs)
    assert all(r.kv_heads == [0, 1] for r in pruned.report.layers)
    assert any(len(r.q_heads) < 8 for r in pruned.report.layers)
    # k/v weights are in no unit: the removed weights still come to 0.6 of all (one slot = 2048 = 1.2 %)
    assert pruned.report.to_dict()["actual_sparsity"] == pytest.approx(0.6, abs=0.012)
    for r in pruned.report.layers:  # the same number of query heads in each KV group
        assert sum(h < 4 for h in r.q_heads) == sum(h >= 4 for h in r.q_heads)
    pruned.finalize()
    groups = [layer.self_attn.num_key_value_groups for layer in model.model.layers]
    assert groups == [len(r.q_heads) // 2 for r in pruned.report.layers]
    real = inputs["attention_mask"].bool()
    assert torch.allclose(logits(model, inputs)[real], masked[real], atol=1e-5, rtol=1e-5)


def test_wanda_sp_score_hand_worked():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    assert wanda_sp(torch.tensor([4.0, 9.0]), W).tolist() == [4.0, 3.0]  # mean|W| (2, 1) * (2, 3)


def test_layers_to_remove_hand_worked():
    assert layers_to_remove([5.0, 1.0, 3.0, 2.0], [10] * 4, 0.5) == [1, 3]
    assert layers_to_remove([5.0, 1.0, 3.0, 2.0], [10] * 4, 0.1) == []  # 0 is nearer 0.1 than 0.25
    with pytest.raises(ValueError, match="every one of the 4"):
        layers_to_remove([5.0, 1.0, 3.0, 2.0], [10] * 4, 0.9)


# ------------------------------------------------------------------ rankings (independent)
def _dense_inputs(model, names=("o_proj", "down_proj")) -> dict:
    """Inputs of every o_proj / down_proj in one plain dense forward (hooks)."""
    got: dict = {}
    hooks = []
    for n, mod in model.named_modules():
        if n.rsplit(".", 1)[-1] in names:
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, n=n: got.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]).double())
            ))  # fmt: skip
    with torch.no_grad():
        for x in CAL.split(4):
            model(input_ids=x, attention_mask=torch.ones_like(x))
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def test_flap_matches_an_independent_computation():
    model = build("llama", num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_hidden_layers=4)
    X = _dense_inputs(model)
    H, d = 64, 16
    items = []  # (score, cost, layer, kind, index)
    for i, layer in enumerate(model.model.layers):
        Wo = layer.self_attn.o_proj.weight.detach().double()
        Wd = layer.mlp.down_proj.weight.detach().double()
        xa, xm = X[f"model.layers.{i}.self_attn.o_proj"], X[f"model.layers.{i}.mlp.down_proj"]
        att = (xa.var(0) * (Wo**2).sum(0)) ** 2  # WIFV, squared for attention (FLAP)
        mlp = xm.var(0) * (Wd**2).sum(0)
        za, zm = (att - att.mean()) / att.std(), (mlp - mlp.mean()) / mlp.std()
        heads = [float(za[h * d : (h + 1) * d].mean()) for h in range(4)]
        best_h, best_c = max(range(4), key=lambda h: heads[h]), int(zm.argmax())
        for h in range(4):
            items.append((float("inf") if h == best_h else heads[h], 4 * H * d, i, "h", h))
        for j in range(128):
            items.append((float("inf") if j == best_c else float(zm[j]), 3 * H, i, "c", j))
    total = sum(c for _, c, *_ in items)
    ranked = sorted(items, key=lambda t: -t[0])
    best, run, n_keep = None, 0, 0
    for n, (_, c, *_) in enumerate(ranked, 1):
        run += c
        if best is None or abs(run - 0.5 * total) < best:
            best, n_keep = abs(run - 0.5 * total), n
    kept = {(i, k, j) for _, _, i, k, j in ranked[:n_keep]}
    pruned = prunekit.prune_weights(model, "flap", 0.5, calibration=CAL, progress=False)
    assert any(r.q_heads != [0, 1, 2, 3] for r in pruned.report.layers)  # heads did go somewhere
    for i, layer in enumerate(model.model.layers):
        r = pruned.report.layers[i]
        assert r.q_heads == [h for h in range(4) if (i, "h", h) in kept]
        keep = pruned.keeps[i]
        chans = list(range(128)) if keep.channels is None else keep.channels.tolist()
        assert chans == [j for j in range(128) if (i, "c", j) in kept]
        # bias compensation: W[:, pruned] @ mean(x)[pruned]
        xm = X[f"model.layers.{i}.mlp.down_proj"].mean(0)
        gone = [j for j in range(128) if j not in chans]
        if gone:
            want = layer.mlp.down_proj.parametrizations.weight.original.double()[:, gone] @ xm[gone]
            assert torch.allclose(keep.down_bias.double(), want, atol=1e-5)


def test_magnitude_sp_matches_column_norms():
    model = build("llama")  # 8 q / 2 kv: a unit is a KV group of 4 query heads
    norms = []
    for layer in model.model.layers:
        Wo, Wd = layer.self_attn.o_proj.weight.detach(), layer.mlp.down_proj.weight.detach()
        g = [float(sum(Wo[:, c].norm() for c in range(k * 32, (k + 1) * 32))) for k in range(2)]
        norms.append((g, Wd.norm(dim=0)))
    pruned = prunekit.prune_weights(model, "magnitude_sp", 0.5, progress=False)
    for (g, cn), r, keep in zip(norms, pruned.report.layers, pruned.keeps.values(), strict=True):
        kv = 0 if g[0] > g[1] else 1
        assert r.kv_heads == [kv] and r.q_heads == list(range(kv * 4, kv * 4 + 4))
        n_gone = 128 - len(keep.channels)
        assert keep.channels.tolist() == sorted(cn.argsort(descending=True)[: 128 - n_gone].tolist())


def test_wanda_sp_first_layer_matches_an_independent_computation():
    model = build("llama", num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    X = _dense_inputs(model)  # layer 0 sees dense inputs even in the sequential pass
    Wd = model.model.layers[0].mlp.down_proj.weight.detach().double()
    xm = X["model.layers.0.mlp.down_proj"]
    score = Wd.abs().mean(0) * xm.pow(2).sum(0).sqrt()
    pruned = prunekit.prune_weights(model, "wanda_sp", 0.3, calibration=CAL, progress=False)
    keep = pruned.keeps[0].channels
    assert keep.tolist() == sorted(score.argsort(descending=True)[: len(keep)].tolist())
    assert len({len(k.channels) for k in pruned.keeps.values()}) == 1  # uniform per layer


@pytest.mark.parametrize("faithful", [False, True])
def test_shortgpt_block_influence_matches_an_independent_computation(faithful):
    model = build("llama", num_hidden_layers=6)
    raw = []  # the last decoder layer's own output (before the final norm)
    hook = model.model.layers[-1].register_forward_hook(lambda m, a, o: raw.append(o))
    bi = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for x in CAL.split(4):
            out = model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True)
            hs = list(out.hidden_states)  # the last one is after the final norm (the official BI)
            if not faithful:
                hs[-1] = raw[-1]
            for i in range(6):
                cos = torch.nn.functional.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)
                bi[i] += (1 - cos).sum()
    hook.remove()
    pruned = prunekit.prune_weights(
        model, "shortgpt", 0.34, calibration=CAL, faithful=faithful, progress=False
    )
    assert [r.removed for r in pruned.report.layers].count(True) == 2  # 2 of 6 equal layers = 0.33
    assert [i for i, r in enumerate(pruned.report.layers) if r.removed] == sorted(bi.argsort()[:2].tolist())


def test_cfsp_budgets_hand_worked():
    sig = [1 / (1 + math.exp(1)), 0.5, 1 / (1 + math.exp(-1))]  # u = (-1, 0, 1) at temperature 0.1
    assert cfsp_budgets([0.1, 0.2, 0.3], 0.5, 0.1) == pytest.approx(sig)  # mean s = 0.5: k = s
    # keep 0.8: max(s)/mean * 0.8 >= 1, so deviations shrink by gamma, then k = s / mean * 0.8
    gamma = 0.5 * (1 / 0.8 - 1) / (sig[2] - 0.5) / 1.05
    shrunk = [0.5 + (x - 0.5) * gamma for x in sig]
    assert cfsp_budgets([0.1, 0.2, 0.3], 0.8, 0.1) == pytest.approx([x / 0.5 * 0.8 for x in shrunk])


def test_cfsp_official_score_is_the_activation_norm():
    g = torch.Generator().manual_seed(0)
    H, I = 6, 10
    Wd, Wu, Wg = (torch.randn(H, I, generator=g, dtype=torch.float64) for _ in range(3))
    a, b, c = torch.rand(I, generator=g, dtype=torch.float64) + 0.1, 0.7, 1.3
    # the official three_w_one_wa, literally: each term normalised over dim 0, then the mean over dim 0
    D = Wd.abs() * a**b
    M = (D / D.sum(0) + Wu.abs() / Wu.abs().sum(0) + Wg.abs() / Wg.abs().sum(0)) * a**c
    assert torch.allclose(cfsp_scores(a, Wd, Wu, Wg, True, c), M.mean(0))
    assert not torch.allclose(cfsp_scores(a, Wd, Wu, Wg, False, c), M.mean(0))


def test_cfsp_matches_an_independent_computation():
    model = build("llama", num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_hidden_layers=4)
    X = _dense_inputs(model)
    ang = torch.zeros(4, dtype=torch.float64)
    hooks = [
        layer.register_forward_hook(
            lambda m, a, o, i=i: ang.__setitem__(i, ang[i] + (torch.nn.functional.cosine_similarity(
                a[0].double(), o.double(), dim=-1).clamp(-1, 1).arccos() / math.pi).sum())
        ) for i, layer in enumerate(model.model.layers)
    ]  # fmt: skip
    with torch.no_grad():
        for x in CAL.split(4):
            model(input_ids=x, attention_mask=torch.ones_like(x))
    for h in hooks:
        h.remove()
    ang /= CAL.numel()
    # MLP = 3*64*128 = 24576 of 40960 prunable weights per layer: sparsity 0.3 -> p = 0.5 of channels
    budgets = cfsp_budgets(ang.tolist(), 0.5, 0.2)
    pruned = prunekit.prune_weights(model, "cfsp", 0.3, calibration=CAL, temperature=0.2, progress=False)
    for i, (k, r) in enumerate(zip(budgets, pruned.report.layers, strict=True)):
        assert r.q_heads == [0, 1, 2, 3] and r.channels == round(k * 128)  # attention untouched
        norm = X[f"model.layers.{i}.mlp.down_proj"].pow(2).sum(0).sqrt()
        want = sorted(norm.argsort(descending=True)[: r.channels].tolist())
        assert pruned.keeps[i].channels.tolist() == want
    assert len({r.channels for r in pruned.report.layers}) > 1  # budgets differ between layers
    pruned.restore()
    with pytest.raises(ValueError, match="MLP channels only"):
        prunekit.prune_weights(model, "cfsp", 0.7, calibration=CAL, progress=False)


def test_llm_pruner_matches_an_independent_computation():
    model = build("llama")  # 8 q / 2 kv, 5 layers: a group is a KV head with its 4 query heads
    for p in model.parameters():
        p.grad = None
    for x in CAL.split(4):  # the LM loss of each batch of 4 windows, gradients summed
        model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss.backward()
    want = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        sal = {n: (mod.weight * mod.weight.grad).abs().detach().double() for n, mod in [
            ("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj),
            ("g", m.gate_proj), ("u", m.up_proj), ("d", m.down_proj)]}  # fmt: skip
        groups = [
            float(sal["q"][32 * k : 32 * k + 32].sum() + sal["o"][:, 32 * k : 32 * k + 32].sum()
                  + sal["k"][8 * k : 8 * k + 8].sum() + sal["v"][8 * k : 8 * k + 8].sum())
            for k in range(2)
        ]  # fmt: skip
        chans = sal["g"].sum(1) + sal["u"].sum(1) + sal["d"].sum(0)
        want.append((groups, chans))
    model.zero_grad(set_to_none=True)
    pruned = prunekit.prune_weights(
        model, "llm_pruner", 0.3, calibration=CAL, skip_first=1, skip_last=1, progress=False
    )
    for i, (r, keep) in enumerate(zip(pruned.report.layers, pruned.keeps.values(), strict=True)):
        if i in (0, 4):  # skipped layers stay whole
            assert r.params_after == r.params_before
            continue
        groups, chans = want[i]
        assert r.kv_heads == [0 if groups[0] > groups[1] else 1]  # round(0.5 * 2) = 1 group goes
        n = len(keep.channels)
        assert keep.channels.tolist() == sorted(chans.argsort(descending=True)[:n].tolist())
    # 0.3 of the whole model from 3 of 5 equal layers: each of them loses 0.5 of its weights
    assert pruned.report.to_dict()["actual_sparsity"] == pytest.approx(0.3, abs=0.01)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), True, "0.2"])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prunekit.prune_weights(build("llama"), "magnitude_sp", bad, progress=False)


def test_unsupported_models_are_refused():
    from tiny_encoders import build as encoder

    with pytest.raises(UnsupportedModelError):  # encoders: heads and channels, activation methods only
        prunekit.prune_weights(encoder("bert"), "cfsp", 0.2, calibration=CAL, progress=False)
    from transformers import MixtralConfig, MixtralForCausalLM

    moe = MixtralForCausalLM(MixtralConfig(**dict(TXT, num_local_experts=2, num_experts_per_tok=1)))
    with pytest.raises(UnsupportedModelError, match="Llama, Qwen2"):
        prunekit.prune_weights(moe, "magnitude_sp", 0.2, progress=False)


def test_a_structure_the_model_lacks_is_refused():
    mha = build("llama", num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    with pytest.raises(ValueError, match="grouped-query attention"):
        prunekit.prune_weights(mha, "magnitude_sp", 0.3, gqa="query_slots", progress=False)


def test_a_sparsity_that_would_empty_a_layer_is_refused():
    model = build("llama")
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="would empty a layer"):
        prunekit.prune_weights(model, "flap", 0.95, calibration=CAL, progress=False)
    with pytest.raises(ValueError, match="every one of the 5"):
        prunekit.prune_weights(model, "shortgpt", 0.95, calibration=CAL, progress=False)
    with pytest.raises(ValueError, match="every one of the 5"):
        prunekit.prune_weights(model, "shortgpt", calibration=CAL, n_layers=5, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in snap.items())


@pytest.mark.parametrize("cal", [[], [""], torch.zeros(0, 8, dtype=torch.long)])
def test_empty_calibration_is_refused(cal):
    with pytest.raises(CalibrationError, match=r"empty|non-empty"):
        prunekit.prune_weights(
            build("llama"), "flap", 0.2, calibration=cal, tokenizer=object(), progress=False
        )


def test_options_that_do_not_apply_are_refused():
    model = build("llama")
    with pytest.raises(ValueError, match="unstructured methods only"):
        prunekit.prune_weights(model, "flap", 0.5, pattern="2:4", calibration=CAL, progress=False)
    with pytest.raises(ValueError, match="targets"):
        prunekit.prune_weights(model, "flap", 0.2, targets=["mlp"], calibration=CAL, progress=False)
    with pytest.raises(ValueError, match="gqa must be one of"):
        prunekit.prune_weights(model, "flap", 0.2, gqa="heads", calibration=CAL, progress=False)
    pruned = prunekit.prune_weights(model, "magnitude_sp", 0.2, progress=False)
    with pytest.raises(prunekit.PrunekitError, match="already masked"):
        prunekit.prune_weights(model, "magnitude_sp", 0.2, progress=False)
    pruned.finalize()
    with pytest.raises(prunekit.PrunekitError, match="cannot be restored"):
        pruned.restore()
