"""FTP token skipping (a reconstruction, see prunekit.tokens.ftp): real skipping, kv modes against a
masked reference computation, hand-worked router features, GA determinism, generate, training,
restoration and errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import DynamicCache

import tiny
from prunekit.models.compat import cache_keyword, output_cache
from prunekit.tokens import ftp

T = 10


def _ids(B=1, n=T, seed=0):
    return torch.randint(3, 250, (B, n), generator=torch.Generator().manual_seed(seed))


def _capture(model, idx):
    """Input and output of decoder layer ``idx`` on the next forward."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["in"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        seen["out"] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        seen["pe"] = kwargs["position_embeddings"]

    h = model.model.layers[idx].register_forward_hook(hook, with_kwargs=True)
    return seen, h


def test_skipped_tokens_pass_unchanged_static_priority():
    m = tiny.llama()
    seen, h = _capture(m, 1)
    with torch.no_grad(), ftp.token_skipping(m, "static", [0.0, 0.5, 0.0, 0.0]) as sess:
        m(input_ids=_ids())
    h.remove()
    # static priority {x0, x9, x8, ...}: k = ceil(0.5 * 10) = 5 -> computed {0, 6, 7, 8, 9}
    skipped, kept = [1, 2, 3, 4, 5], [0, 6, 7, 8, 9]
    assert torch.equal(seen["out"][0, skipped], seen["in"][0, skipped])
    assert (seen["out"][0, kept] - seen["in"][0, kept]).abs().amax(-1).min() > 1e-3
    assert sess.kept == [0.5]


def _masked_reference(layer, h, pe, kept, kv):
    """The unmodified layer on every token with an additive mask (eager attention): under
    kv='drop' the skipped tokens are hidden as keys (a skipped query sees only itself, to stay
    finite); under 'keep' the plain causal mask. Then skipped rows are replaced by their input."""
    n = h.shape[1]
    allowed = torch.ones(n, n).tril().bool()
    if kv == "drop":
        key_ok = torch.zeros(n, dtype=torch.bool)
        key_ok[kept] = True
        allowed = (allowed & key_ok[None, :]) | torch.eye(n, dtype=torch.bool)
    mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    out = type(layer).forward(layer, h, attention_mask=mask, position_embeddings=pe)
    out = out[0] if isinstance(out, tuple) else out
    skipped = [j for j in range(n) if j not in kept]
    out = out.clone()
    out[:, skipped] = h[:, skipped]
    return out


@pytest.mark.parametrize("kv", ["drop", "keep"])
def test_kv_modes_equal_masked_reference(kv):
    m = tiny.llama(attn="eager")
    seen, h = _capture(m, 2)
    with torch.no_grad(), ftp.token_skipping(m, "static", [0.0, 0.3, 0.6, 0.2], kv=kv):
        m(input_ids=_ids())
    h.remove()
    kept = [0, 7, 8, 9]  # block 2 at 0.6: k = ceil(0.4 * 10) = 4 -> {x0, x9, x8, x7}
    with torch.no_grad():
        ref = _masked_reference(m.model.layers[2], seen["in"], seen["pe"], kept, kv)
    torch.testing.assert_close(seen["out"], ref, atol=2e-5, rtol=1e-5)


def test_kv_drop_and_keep_differ():
    """The two modes are different computations (a skipped token's K/V matters under 'keep')."""
    m = tiny.llama()
    x = _ids()
    outs = {}
    for kv in ("drop", "keep"):
        with torch.no_grad(), ftp.token_skipping(m, "static", [0.0, 0.5, 0.5, 0.5], kv=kv):
            outs[kv] = m(input_ids=x).logits
    assert (outs["drop"] - outs["keep"]).abs().max() > 1e-4


def test_zero_schedule_equals_dense_model():
    m = tiny.llama()
    x = _ids(B=2)
    with torch.no_grad():
        ref = m(input_ids=x).logits
        with ftp.token_skipping(m, ftp.FTPRouter(), [0.0] * 4):
            out = m(input_ids=x).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_router_features_hand_worked():
    A = torch.tensor(
        [
            [[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]],
            [[1.0, 0, 0], [0.9, 0.1, 0], [0.1, 0.1, 0.8]],
        ]
    )[None]  # (1, 2 heads, 3, 3)
    pos = torch.arange(3)[None]
    att = ftp.received_attention(A, pos, pos)
    # head 1: key0 (1+.5+.2)/3, key1 (.5+.3)/2, key2 .5/1; head 2: 2/3, .1, .8; mean of heads
    torch.testing.assert_close(att, torch.tensor([[(1.7 / 3 + 2 / 3) / 2, 0.25, 0.65]]))
    f = ftp.router_features(att, 0.3)
    want = torch.tensor([[[0.0, att[0, 0], 0.5, 0.3], [0.5, 0.25, 0.0, 0.3], [1.0, 0.65, 1.0, 0.3]]])
    torch.testing.assert_close(f, want)


def test_received_attention_subset_queries():
    """kv='keep': 2 kept queries (positions 1, 3) over 4 keys; key 2 is seen only by query 3."""
    A = torch.tensor([[0.5, 0.5, 0, 0], [0.1, 0.2, 0.3, 0.4]])[None, None]
    att = ftp.received_attention(A, torch.tensor([[1, 3]]), torch.arange(4)[None])
    torch.testing.assert_close(att, torch.tensor([[0.3, 0.35, 0.3, 0.4]]))


def test_static_keep_and_counts():
    assert ftp.keep_count(10, 0.3) == 7 and ftp.keep_count(10, 0.0) == 10 and ftp.keep_count(4, 0.9) == 1
    assert ftp.static_keep(6, 0.5).tolist() == [1.0, 0, 0, 0, 1, 1]


def test_renormalise_hand_worked():
    pinned = torch.tensor([True, False, False, True])
    s = ftp.renormalise(torch.tensor([0.5, 0.1, 0.3, 0.5]), 0.2, pinned)
    # free entries scaled to sum 0.8: 0.1, 0.3 -> 0.2, 0.6
    torch.testing.assert_close(s, torch.tensor([0.0, 0.2, 0.6, 0.0], dtype=torch.float64))
    s = ftp.renormalise(torch.tensor([0.0, 0.0, 0.8, 0.0]), 0.4, pinned)  # 1.6 -> 0.9 cap, 0.7
    torch.testing.assert_close(s, torch.tensor([0.0, 0.7, 0.9, 0.0], dtype=torch.float64))


def test_ga_deterministic_under_seed():
    m = tiny.llama(num_hidden_layers=5)
    calib = _ids(B=2, n=12, seed=3)
    kw = dict(population=4, generations=3, seed=7)
    a, ha = ftp.ga_schedule(m, calib, 0.3, **kw)
    b, hb = ftp.ga_schedule(m, calib, 0.3, **kw)
    assert a == b and ha == hb
    assert a[0] == 0.0 and a[-1] == 0.0 and all(0 <= v <= 0.9 for v in a)
    assert sum(a) / 5 == pytest.approx(0.3)
    assert all(x <= y for x, y in itertools.pairwise(ha))  # elitism: best never worsens


@pytest.mark.parametrize("kv", ["drop", "keep"])
def test_generate_with_skipping(kv):
    m = tiny.llama()
    x = _ids(n=12)
    with torch.no_grad(), ftp.token_skipping(m, ftp.FTPRouter(seed=1), [0.0, 0.5, 0.5, 0.5], kv=kv):
        out = m.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=4, min_new_tokens=4,
            do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        )  # fmt: skip
    assert out.sequences.shape == (1, 16)
    lens = [output_cache(out).layers[i].keys.shape[2] for i in range(4)]
    assert lens[0] == 15  # block 0 is dense: 12 prompt + 3 decoded tokens of K/V
    if kv == "drop":
        assert all(n <= 6 + 3 for n in lens[1:])  # 6 of 12 prompt tokens computed, at most all decoded
    else:
        assert lens == [15] * 4


def test_generate_zero_schedule_equals_dense():
    m = tiny.llama()
    x = _ids(n=12)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref = m.generate(input_ids=x, **kw)
    with ftp.token_skipping(m, "static", [0.0] * 4):
        out = m.generate(input_ids=x, **kw)
    assert torch.equal(out, ref)


def test_restored_after_exception():
    m = tiny.llama()
    x = _ids()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        ref = m(input_ids=x).logits
    with pytest.raises(RuntimeError, match="boom"), ftp.token_skipping(m, "static", [0, 0.5, 0.5, 0.5]):
        raise RuntimeError("boom")
    assert all("forward" not in vars(layer) for layer in m.model.layers)
    assert not m.model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(m(input_ids=x).logits, ref)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_clear_errors():
    m = tiny.llama()
    with (
        pytest.raises(ValueError, match="kv must be one of"),
        ftp.token_skipping(m, "static", [0.0] * 4, kv="x"),
    ):
        pass
    with pytest.raises(ValueError, match="4 decoder layers"), ftp.token_skipping(m, "static", [0.0] * 3):
        pass
    with pytest.raises(ValueError, match=r"schedule\[0\]"), ftp.token_skipping(m, "static", [0.1, 0, 0, 0]):
        pass
    with (
        pytest.raises(ValueError, match=r"schedule\[2\] = 0.95"),
        ftp.token_skipping(m, "static", [0, 0, 0.95, 0]),
    ):
        pass
    with pytest.raises(ValueError, match="router must be"), ftp.token_skipping(m, "learned", [0.0] * 4):
        pass
    x = _ids(B=2)
    mask = torch.ones_like(x)
    mask[1, 0] = 0
    with ftp.token_skipping(m, "static", [0, 0.5, 0, 0]), pytest.raises(ValueError, match="padded"):
        m(input_ids=x, attention_mask=mask)
    with (
        ftp.token_skipping(m, "static", [0, 0.5, 0, 0]),
        pytest.raises(NotImplementedError, match="one token"),
    ):
        cache = DynamicCache(config=m.config)
        m(input_ids=_ids(), **{cache_keyword(): cache}, use_cache=True)
        m(input_ids=_ids(n=3), **{cache_keyword(): cache}, use_cache=True)
    with pytest.raises(ValueError, match="target must be in"):
        ftp.ga_schedule(m, _ids(B=1), 0.6)
    with pytest.raises(ValueError, match="tail"):
        ftp.lm_loss(m, _ids(), tail=20)


def test_train_router_trains_only_the_router():
    m = tiny.llama()
    for p in m.lm_head.parameters():
        p.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    router = ftp.FTPRouter(hidden=8, seed=0)
    r0 = {k: v.clone() for k, v in router.state_dict().items()}
    res = ftp.train_router(m, router, _ids(B=4, n=16), [0.0, 0.5, 0.5, 0.5], steps=3, lr=1e-2)
    assert res.steps == 3 and set(res.terms[0]) == {"distill", "sparsity", "guide"}
    assert res.terms[-1]["guide"] == 0.0  # decayed to 0 by half of the steps
    assert any(not torch.equal(v, r0[k]) for k, v in router.state_dict().items())
    assert all(torch.equal(v, weights[k]) for k, v in m.state_dict().items())
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert not hasattr(m, "ftp_router")


def test_straight_through_keeps_values():
    """p / sg(p) is 1 in value: with gradients on, the routed output equals the no-grad one."""
    m = tiny.llama()
    x = _ids()
    r = ftp.FTPRouter(hidden=8)
    with ftp.token_skipping(m, r, [0.0, 0.5, 0.5, 0.5]):
        with torch.no_grad():
            a = m(input_ids=x).logits
        b = m(input_ids=x).logits
        b.sum().backward()
    torch.testing.assert_close(a, b.detach())
    assert r.net[0].weight.grad is not None and r.net[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("router", ["random", "learned"])
def test_batched_decode_keep(router):
    """Batch 2 decoding under kv='keep' (rows decide separately); kv='drop' refuses it clearly."""
    m = tiny.llama()
    r = ftp.FTPRouter(seed=2) if router == "learned" else "random"
    x = _ids(B=2, n=12)
    kw = dict(
        attention_mask=torch.ones_like(x), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0
    )
    with torch.no_grad(), ftp.token_skipping(m, r, [0.0, 0.6, 0.6, 0.6], kv="keep", threshold=0.9):
        assert m.generate(input_ids=x, **kw).shape == (2, 16)
    with torch.no_grad(), ftp.token_skipping(m, "random", [0.0, 0.9, 0.9, 0.9], kv="drop", seed=1):
        with pytest.raises(NotImplementedError, match="batch size 1"):
            m.generate(input_ids=x, **kw)


# --------------------------------------------------------------------------- the one call


def test_one_call_is_the_three_stages_and_round_trips(tmp_path):
    from prunekit.training import FTPResult
    from prunekit.training import ftp as ftp_call

    m = tiny.llama()
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    ids = _ids(B=6, n=16)
    kw = {"population": 4, "generations": 2, "tail": None}
    res = ftp_call(m, ids, sparsity=0.3, seq_len=16, calib_windows=2, steps=3, lr=1e-2, hidden=8,
                   progress=False, **kw)  # fmt: skip
    # the same stages called one by one: the GA on the first 2 windows, the router on the other 4
    sched, hist = ftp.ga_schedule(m, ids[:2], 0.3, seed=0, **kw)
    assert res.schedule == sched and res.ga_fitness == hist
    assert sum(sched) / len(sched) == pytest.approx(0.3)
    router = ftp.FTPRouter(hidden=8, seed=0)
    ftp.train_router(m, router, ids[2:], sched, steps=3, lr=1e-2, seed=0, tail=None)
    for k, v in router.state_dict().items():
        assert torch.allclose(res.router.state_dict()[k], v), k
    assert all(torch.equal(v, weights[k]) for k, v in m.state_dict().items())  # the LLM is untouched
    assert len(res.losses) == 3 and set(res.seconds) == {"ga", "router"}

    res.save(tmp_path / "ftp.safetensors")
    back = FTPResult.load(tmp_path / "ftp.safetensors")
    assert (back.schedule, back.sparsity, back.kv) == (res.schedule, 0.3, "drop")
    x = _ids(seed=5)
    with torch.no_grad():
        with res.skipping(m):
            a = m(input_ids=x).logits
        with back.skipping(m):
            b = m(input_ids=x).logits
        dense = m(input_ids=x).logits
    assert torch.equal(a, b) and not torch.allclose(a, dense)


def test_one_call_errors(tmp_path):
    from prunekit.training import FTPResult
    from prunekit.training import ftp as ftp_call

    m = tiny.llama()
    with pytest.raises(ValueError, match="kv must be one of"):
        ftp_call(m, _ids(B=4, n=16), seq_len=16, kv="skip", progress=False)
    with pytest.raises(ValueError, match="give 2 windows of 16 tokens; the GA needs calib_windows=4"):
        ftp_call(m, _ids(B=2, n=16), seq_len=16, progress=False)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['temperature'\]"):
        ftp_call(m, _ids(B=4, n=16), seq_len=16, temperature=2.0, progress=False)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not an FTP router saved by prunekit"):
        FTPResult.load(tmp_path / "other.safetensors")


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("pat", "steps", 7),
        ("ftp", "steps", 7),
        ("precrop", "density", 0.05),
        ("layer_lottery", "remove", 2),
        ("journey", "steps", 7),
        ("sap", "steps_per_iteration", 7),
        ("polarization", "steps", 7),
        ("lrp", "rate", 0.45),
        ("meta_pruning", "speedup", 3.0),
    ],
)
def test_registry_entries_match_the_calls(name, option, value):
    """The registered option classes carry the functions' own defaults (no second copy drifting)."""
    import dataclasses
    import inspect
    import sys

    import prunekit

    info = prunekit.registry.get(name, "training")
    # the function lives beside its option class (prunekit.training.sap is also a module's name)
    params = inspect.signature(getattr(sys.modules[info.factory.__module__], name)).parameters
    for f in dataclasses.fields(info.factory):
        assert f.name in params and params[f.name].kind is inspect.Parameter.KEYWORD_ONLY, f.name
        assert f.default == params[f.name].default, f.name
    obj = prunekit.registry.instantiate(name, "training", {option: value}, "test")
    assert getattr(obj, option) == value and callable(obj)


def test_one_call_restores_the_model_after_an_exception(monkeypatch):
    from prunekit.training import ftp as ftp_call

    m = tiny.llama()
    m.train()
    x = _ids(seed=3)
    m.eval()
    with torch.no_grad():
        dense = m(input_ids=x).logits
    m.train()
    calls = []

    def boom(model, calibration, target, **kw):
        calls.append(target)
        with ftp.token_skipping(model, "static", ftp.uniform_schedule(4, target)):
            raise RuntimeError("GA failed")

    monkeypatch.setattr(ftp, "ga_schedule", boom)
    with pytest.raises(RuntimeError, match="GA failed"):
        ftp_call(m, _ids(B=6, n=16), seq_len=16, calib_windows=2, progress=False)
    assert calls == [0.3] and m.training and not hasattr(m, "ftp_router")
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(input_ids=x).logits, dense)  # no layer left patched
