"""KV-cache compression inside generate(): exactness against a masked full-cache reference,
keep-everything identity, positions, restoration, hand-worked selections, errors."""

from __future__ import annotations

import copy

import pytest
import torch

import prunekit
from invariants import assert_same, snapshot
from prunekit.kv.context import KVContext
from prunekit.kv.methods.h2o import H2O
from prunekit.kv.methods.pyramidkv import pyramid_budget
from prunekit.kv.methods.snapkv import SnapKV, pooled
from prunekit.kv.methods.streamingllm import StreamingLLM
from prunekit.models.compat import cache_keyword, output_cache
from reference import decoder_layers, greedy
from tiny import DECODERS, VLMS, text_inputs

METHODS = [
    ("streamingllm", {}),
    ("snapkv", {"window": 4}),
    ("snapkv", {"window": 4, "heads": "query"}),
    ("pyramidkv", {"window": 4, "beta": 4.0}),
    ("pyramidkv", {"window": 4, "beta": 4.0, "heads": "query"}),
    ("h2o", {}),
    ("kvcrush", {"base": "snapkv", "base_options": {"window": 4}, "crush_ratio": 0.5}),
    ("kvcrush", {"base": "snapkv", "base_options": {"window": 4, "heads": "query"}, "crush_ratio": 0.5}),
]


def _finite_err(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a))
    return (a - b)[fin].abs().max().item()


@pytest.mark.parametrize(("method", "opts"), METHODS)
@pytest.mark.parametrize("fam", ["llama", "qwen2", "mistral"])
def test_keep_everything_is_dense_and_model_restored(fam, method, opts):
    model = DECODERS[fam]("sdpa")
    inp = text_inputs(2)
    before = snapshot(model)
    with torch.no_grad():
        dense_t, dense_l = greedy(model, inp)
        with prunekit.compress_kv(model, method, keep=1.0, **opts) as s:
            t, l = greedy(model, inp)
        with pytest.raises(RuntimeError, match="inside"):
            with prunekit.compress_kv(model, method, keep=0.5, **opts):
                greedy(model, inp)
                raise RuntimeError("boom inside the block")
        _, after_l = greedy(model, inp)
    assert s.stats.kept_fraction == 1.0 and s.stats.evicted_in_decode == 0
    assert _finite_err(l, dense_l) < 1e-5 and torch.equal(t, dense_t)
    assert torch.equal(after_l, dense_l)
    assert_same(before, snapshot(model))


class _Recorder:
    """Wraps a method's decode_step to record, per step and layer, the slots the step attended to."""

    def __init__(self, method):
        self.steps: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []
        original = method.decode_step

        def decode_step(session, attn, kw, cache_layer, i):
            if not self.steps or i in self.steps[-1]:  # a new step starts at the first layer seen again
                self.steps.append({})
            self.steps[-1][i] = (session.slot_pos[i].clone(), session.slot_valid[i].clone())
            return original(session, attn, kw, cache_layer, i)

        method.decode_step = decode_step


def _positions_mask(pos: torch.Tensor, ok: torch.Tensor, total: int) -> torch.Tensor:
    """``(B, Hkv, K)`` slot positions + validity -> ``(B, Hkv, total)`` bool: position attended."""
    m = torch.zeros(*pos.shape[:2], total, dtype=torch.bool)
    return m.scatter_(2, pos, ok)


@pytest.mark.parametrize(("method", "opts"), METHODS)
@pytest.mark.parametrize("fam", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_eviction_equals_masked_full_cache_reference(fam, method, opts, attn):
    """Compressed generate() (batch 2, left padding, GQA) == full-cache generate() whose decode
    steps hide, per layer and KV head, exactly the evicted prompt keys."""
    model = DECODERS[fam](attn)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    inp = text_inputs(2)
    L = inp["input_ids"].shape[1]
    m = prunekit.registry.get(method).factory(**opts)
    rec = _Recorder(m) if m.decode else None
    with torch.no_grad(), prunekit.compress_kv(model, m, keep=0.4) as s:
        tokens, logits = greedy(model, inp, steps=6)
    kept = s.stats.kept[0]  # per layer: (positions (B, Hkv, K), validity)
    assert 0.3 < s.stats.kept_fraction < 0.5
    if m.decode:
        assert s.stats.evicted_in_decode > 0 and len(rec.steps) == 5

    layers = decoder_layers(ref)
    step = {"n": -1}
    Hq = ref.config.num_attention_heads

    def hook(layer, args, kw):
        am = kw["attention_mask"]
        if am is None or am.shape[2] != 1:  # prefill: full attention, as in the compressed run
            return None
        i = layer.self_attn.layer_idx
        if i == 0:
            step["n"] += 1
        total = am.shape[-1]
        if rec is not None:
            pos, ok = rec.steps[step["n"]][i]
            seen = _positions_mask(pos, ok, total)
        else:
            pos, ok = kept[i]
            seen = _positions_mask(pos, ok, total)
            seen[..., L:] = True  # decoded tokens are never evicted
        hide = ~seen.repeat_interleave(Hq // seen.shape[1], dim=1)[:, :, None, :]  # (B, Hq, 1, total)
        kw["attention_mask"] = am.expand(-1, Hq, -1, -1).masked_fill(hide, torch.finfo(am.dtype).min)
        return args, kw

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            ref_tokens, ref_logits = greedy(ref, inp, steps=6)
    finally:
        for h in handles:
            h.remove()
    assert _finite_err(logits, ref_logits) < 1e-4
    assert torch.equal(tokens, ref_tokens)


def test_direct_calls_without_position_ids_decode_at_the_original_positions():
    model = DECODERS["llama"]("sdpa")
    inp = text_inputs(1)
    with torch.no_grad(), prunekit.compress_kv(model, "snapkv", keep=0.5, window=4):
        want, _ = greedy(model, inp, steps=4)
        out = model(**inp)  # prefill (compressed), then a manual greedy loop with no position ids
        cache, got = output_cache(out), []
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(4):
            got.append(nxt)
            out = model(input_ids=nxt, **{cache_keyword(): cache})
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    assert torch.equal(torch.cat(got, 1), want)
    assert cache.get_seq_length() < inp["input_ids"].shape[1]


# ------------------------------------------------------------------ hand-worked selections
def _ctx(valid: torch.Tensor, hkv: int = 1, signals: dict | None = None, budget=None) -> KVContext:
    B, L = valid.shape
    z = torch.zeros(B, hkv, L, 2)
    return KVContext(z, z, valid, 0, 4, signals or {}, budget=budget)


def test_streamingllm_keeps_sinks_then_recent_real_tokens():
    valid = torch.tensor([[False, False, True, True, True, True, True, True]])  # 6 real tokens
    s = StreamingLLM(n_sink=2).score(_ctx(valid))[0, 0]
    order = torch.sort(s.masked_fill(~valid[0], float("-inf")), descending=True, stable=True).indices
    assert order[:4].tolist() == [2, 3, 7, 6]  # sinks = the first two real tokens, then the newest


def test_snapkv_scores_pool_the_window_rows_and_keep_the_window():
    # one head, L = 6, window 2: mean of the two window rows over keys 0..3 = [.1, .5, .1, .3]
    rows = torch.tensor([[0.2, 0.4, 0.0, 0.2, 0.2, 0.0], [0.0, 0.6, 0.2, 0.4, 0.0, 0.0]])
    ctx = _ctx(torch.ones(1, 6, dtype=torch.bool), signals={"window_attention": rows[None, None]})
    got = SnapKV(window=2, kernel=3).score(ctx)[0, 0]
    body = torch.tensor(
        [(0 + 0.1 + 0.5) / 3, (0.1 + 0.5 + 0.1) / 3, (0.5 + 0.1 + 0.3) / 3, (0.1 + 0.3 + 0) / 3]
    )
    torch.testing.assert_close(got[:4], body)
    assert bool((got[4:] == body.max() + 1).all())
    torch.testing.assert_close(
        pooled(torch.tensor([[1.0, 3.0, 2.0]]), 3, "max"), torch.tensor([[3.0, 3.0, 3.0]])
    )


def test_snapkv_averages_the_query_heads_of_a_kv_group():
    rows = torch.zeros(1, 2, 1, 4)
    rows[0, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    rows[0, 1, 0] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    ctx = _ctx(torch.ones(1, 4, dtype=torch.bool), hkv=1, signals={"window_attention": rows})
    torch.testing.assert_close(SnapKV(window=1, kernel=1).score(ctx)[0, 0, :3], torch.tensor([0.5, 0.0, 0.5]))


def test_pyramid_budgets_follow_the_kvpress_formula():
    # n = 1000, k = 250, window 8, beta 20: min = 12.5, max = 487.5; 4 layers, step 158.33
    got = [pyramid_budget(1000, 250, layer, 4, 8, 20.0) for layer in range(4)]
    assert got == [488, 329, 171, 12]  # round(487.5), round(329.17), round(170.83), round(12.5)
    assert abs(sum(got) / 4 - 250) <= 1
    assert pyramid_budget(100, 50, 0, 4, 8, 20.0) == 92  # max capped at n - window, min = 2k - max
    assert pyramid_budget(40, 8, 0, 4, 8, 20.0) == 8  # min = 8 / 20 < window: uniform


def test_h2o_keeps_heavy_hitters_and_the_recent_half():
    acc = torch.tensor([[[0.9, 0.1, 0.8, 0.2, 0.3, 0.05, 0.0]]])  # (B, Hq=1, L=7)
    ctx = _ctx(torch.ones(1, 7, dtype=torch.bool), signals={"attention_sum": acc}, budget=torch.tensor([4]))
    s = H2O(recent_ratio=0.5).score(ctx)[0, 0]
    top = torch.sort(torch.sort(s, descending=True, stable=True).indices[:4]).values
    assert top.tolist() == [0, 2, 5, 6]  # 2 heavy hitters (0, 2) + the 2 most recent (5, 6)


def test_kvcrush_buckets_and_representatives_hand_worked():
    from prunekit.kv.methods.kvcrush import bucket_ids, head_bits, representatives

    scores = torch.tensor([[[0.9, 0.1, 0.5, 0.2], [0.1, 0.8, 0.6, 0.1]]])  # (B=1, Hkv=2, L=4)
    valid = torch.ones(1, 4, dtype=torch.bool)
    bits = head_bits(scores, valid)  # head means .425 and .4
    assert bits[0].tolist() == [[True, False], [False, True], [True, True], [False, False]]
    assert bucket_ids(bits, "hash")[0].tolist() == [1, 2, 3, 0]
    assert bucket_ids(bits, "anchor")[0].tolist() == [1, 1, 0, 2]
    # evicted tokens 1..4, buckets {5: [1, 2], 7: [3], 9: [4]}: the largest bucket first, its best member
    imp = torch.tensor([0.0, 0.2, 0.3, 0.1, 0.4, 0.0])
    cand = torch.tensor([False, True, True, True, True, False])
    keys = torch.tensor([0, 5, 5, 7, 9, 0])
    assert representatives(imp, cand, keys, 2).nonzero().flatten().tolist() == [2, 3]
    assert representatives(imp, cand, keys, 5).nonzero().flatten().tolist() == [2, 3, 4]
    # two rows in one call, each with its own count: row 1 has buckets {3: [0, 1, 2], 4: [5]}
    from prunekit.kv.methods.kvcrush import representatives_batch

    imp2 = torch.stack([imp, torch.tensor([0.5, 0.9, 0.1, 0.0, 0.0, 0.7])])
    cand2 = torch.stack([cand, torch.tensor([True, True, True, False, False, True])])
    keys2 = torch.stack([keys, torch.tensor([3, 3, 3, 0, 0, 4])])
    got = representatives_batch(imp2, cand2, keys2, torch.tensor([1, 2]))
    assert got.nonzero().tolist() == [[0, 2], [1, 1], [1, 5]]


def test_kvcrush_keeps_base_tokens_plus_one_representative_per_bucket_in_every_head():
    from prunekit.kv.methods.kvcrush import KVCrush

    L = 8
    ws = torch.rand(1, 2, 1, L, generator=torch.Generator().manual_seed(0))  # 2 query heads = 2 KV heads
    ctx = _ctx(
        torch.ones(1, L, dtype=torch.bool), hkv=2, signals={"window_attention": ws}, budget=torch.tensor([4])
    )
    m = KVCrush(base="snapkv", base_options={"window": 1, "kernel": 1}, crush_ratio=0.5)
    s = m.score(ctx)
    kept = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :4]  # per head
    base = torch.sort(m.inner.score(ctx), dim=-1, descending=True, stable=True).indices[..., :2]
    both = set(kept[0, 0].tolist()) & set(kept[0, 1].tolist())
    reps = both - set(base.flatten().tolist())
    assert len(reps) == 2, (kept, base)  # two representatives, shared by both heads
    for h in range(2):
        assert set(base[0, h].tolist()) <= set(kept[0, h].tolist())


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: prunekit.compress_kv(m, "nosuch", keep=0.5), "nosuch"),
        (lambda m: prunekit.compress_kv(m, "fastv", keep=0.5), "is a tokens method"),
        (lambda m: prunekit.compress_kv(m, "snapkv", keep=1.5), r"keep as a ratio .*; got 1\.5"),
        (lambda m: prunekit.compress_kv(m, "snapkv", keep=0.5, ratio=0.5), "give the budget once"),
        (lambda m: prunekit.compress_kv(m, "snapkv", ratio=0.0), r"ratio .* must be in \(0, 1\]"),
        (lambda m: prunekit.compress_kv(m, "snapkv", keep=0.5, kernel=4), "kernel must be an odd int"),
        (lambda m: prunekit.compress_kv(m, "snapkv", keep=0.5, heads="q"), r"heads must be one of \['kv', "),
        (lambda m: prunekit.compress_kv(m, "snapkv", keep=0.5, preset="lb"), "preset must be one of"),
        (lambda m: prunekit.compress_kv(m, "snapkv", keep=0.5, wndow=4), r"unknown option\(s\) \['wndow'\]"),
        (lambda m: prunekit.compress_kv(m, "kvcrush", keep=0.5, base="h2o"), "evicts while decoding"),
        (lambda m: prunekit.compress_kv(m, "kvcrush", keep=0.5, base="fastv"), "another kv method"),
    ],
)
def test_bad_input_is_refused_clearly(call, match):
    model = DECODERS["llama"]("sdpa")
    with pytest.raises((ValueError, prunekit.PrunekitError, KeyError), match=match):
        with call(model):
            pass


def test_vlms_and_right_padding_are_refused():
    with pytest.raises(prunekit.UnsupportedModelError, match="VLMs: not yet"):
        with prunekit.compress_kv(VLMS["llava"]("sdpa"), "snapkv", keep=0.5):
            pass
    model = DECODERS["llama"]("sdpa")
    inp = text_inputs(2)
    inp = {"input_ids": inp["input_ids"].flip(1), "attention_mask": inp["attention_mask"].flip(1)}
    with pytest.raises(prunekit.PrunekitError, match="left padding"):
        with torch.no_grad(), prunekit.compress_kv(model, "snapkv", keep=0.5):
            model(**inp)


def test_gather_slots_equals_gather():
    from prunekit.kv.engine import gather_slots

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 40, 5, generator=g)
    idx = torch.randint(0, 40, (3, 2, 7), generator=g)
    assert torch.equal(gather_slots(x, idx), x.gather(2, idx[..., None].expand(-1, -1, -1, 5)))


def _gemma3(attn: str):
    from tiny import gemma3

    return gemma3(attn, ["sliding_attention", "full_attention", "sliding_attention", "full_attention"])


@pytest.mark.parametrize(
    ("method", "opts"),
    [("snapkv", {"window": 4}), ("snapkv", {"window": 4, "heads": "query"}), ("h2o", {})],
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma3_compresses_the_full_attention_layers_and_leaves_the_sliding_ones(method, opts, attn):
    """Gemma-3 (sliding window 8, 20-token prompts, batch 2, left padding, GQA): compressed
    generate() == full-cache generate() hiding the evicted prompt keys in the full-attention
    layers (1 and 3); the sliding layers keep their own window cache and masks."""
    model = _gemma3(attn)
    ref = _gemma3("eager")
    inp = text_inputs(2)
    L = inp["input_ids"].shape[1]
    m = prunekit.registry.get(method).factory(**opts)
    rec = _Recorder(m) if m.decode else None
    with torch.no_grad(), prunekit.compress_kv(model, m, keep=0.4) as s:
        tokens, logits = greedy(model, inp, steps=5)
    assert [a.self_attn.num_key_value_groups for a in model.model.layers] == [2] * 4
    full_layers = [1, 3]
    kept = s.stats.kept[0]
    assert kept[0] is None and kept[2] is None  # the sliding layers are left alone
    assert 0.3 < s.stats.kept_fraction < 0.5
    step = {"n": -1}
    Hq = ref.config.num_attention_heads

    def hook(layer, args, kw):
        am = kw["attention_mask"]
        i = layer.self_attn.layer_idx
        if am is None or am.shape[2] != 1 or i not in full_layers:
            return None
        if i == full_layers[0]:
            step["n"] += 1
        total = am.shape[-1]
        pos, ok = rec.steps[step["n"]][i] if rec is not None else kept[i]
        seen = _positions_mask(pos, ok, total)
        if rec is None:
            seen[..., L:] = True
        hide = ~seen.repeat_interleave(Hq // seen.shape[1], dim=1)[:, :, None, :]
        kw["attention_mask"] = am.expand(-1, Hq, -1, -1).masked_fill(hide, torch.finfo(am.dtype).min)
        return args, kw

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in ref.model.layers]
    try:
        with torch.no_grad():
            ref_tokens, ref_logits = greedy(ref, inp, steps=5)
    finally:
        for h in handles:
            h.remove()
    assert _finite_err(logits, ref_logits) < 1e-4
    assert torch.equal(tokens, ref_tokens)


def test_kvcrush_query_head_bits_read_each_attention_head():
    from prunekit.kv.methods.kvcrush import KVCrush, bucket_ids, head_bits

    L = 6
    ws = torch.rand(1, 4, 2, L, generator=torch.Generator().manual_seed(1))  # 4 query heads, 1 KV head
    ctx = _ctx(
        torch.ones(1, L, dtype=torch.bool), hkv=1, signals={"window_attention": ws}, budget=torch.tensor([3])
    )
    m = KVCrush(base="snapkv", base_options={"window": 1, "kernel": 1}, bits="query_heads")
    want = bucket_ids(head_bits(ws.mean(dim=2), ctx.valid), "hash")  # 4 bits: up to 16 buckets
    assert int(want.max()) < 16 and len(set(want[0].tolist())) > 2  # more than one KV head's 2 buckets
    assert torch.equal(bucket_ids(head_bits(m._bit_scores(ctx, m.inner.score(ctx)), ctx.valid), "hash"), want)
    with pytest.raises(ValueError, match="has none"):
        KVCrush(base="streamingllm", bits="query_heads")


def test_streamingllm_fast_indices_equal_its_scores_top_k():
    m = StreamingLLM(n_sink=3)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    valid[2, :9] = False  # 3 real tokens, fewer than the sinks
    for k in ([5, 4, 2], [1, 8, 3], [12, 3, 3]):
        ctx = _ctx(valid, hkv=2, budget=torch.tensor(k))
        idx, ok = m.indices(ctx)
        scores = m.score(ctx).float().masked_fill(~valid[:, None, :], float("-inf"))
        for b in range(3):
            want = torch.sort(scores[b, 0], descending=True, stable=True).indices[: k[b]].sort().values
            assert idx[b, 0][ok[b, 0]].tolist() == want.tolist() and idx[b, 1].tolist() == idx[b, 0].tolist()


# ------------------------------------------------------------------ SnapKV per query head (official layout)
def test_snapkv_presets_fill_the_options_left_at_their_defaults():
    m = SnapKV(preset="longbench")
    assert (m.window, m.kernel, m.pooling) == (32, 7, "max")  # the paper's LongBench configs
    m = SnapKV(preset="longbench", window=16)
    assert (m.window, m.kernel, m.pooling) == (16, 7, "max")
    assert (SnapKV().window, SnapKV().kernel, SnapKV().pooling) == (64, 5, "avg")  # the official class


def test_snapkv_query_heads_keep_one_row_per_query_head():
    rows = torch.zeros(1, 2, 1, 4)  # 2 query heads of one KV head
    rows[0, 0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    rows[0, 1, 0] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    ctx = _ctx(torch.ones(1, 4, dtype=torch.bool), hkv=1, signals={"window_attention": rows})
    got = SnapKV(window=1, kernel=1, heads="query").score(ctx)[0]
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 2.0]]))


def _official_rule_kept(model, inp: dict, window: int, kernel: int, pooling: str, budget: int):
    """Independent reference of the official SnapKV rule (one unpadded row): per layer, the rotated
    keys and values repeated to one KV head per query head, the last ``window`` queries' softmax
    attention (causal) summed over the window, pooled over the keys before the window, and each
    query head's top ``budget - window`` of those plus the window. Returns per layer the kept
    positions ``(Hq, budget)`` ascending, the pooled scores ``(Hq, L - window)`` and the repeated
    keys / values ``(Hq, L, D)``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    seen = {}

    def grab(attn, args, kw):
        seen[attn.layer_idx] = (kw["hidden_states"], kw["position_embeddings"])

    attns = [layer.self_attn for layer in model.model.layers]
    handles = [a.register_forward_pre_hook(grab, with_kwargs=True) for a in attns]
    try:
        with torch.no_grad():
            model(**inp)
    finally:
        for h in handles:
            h.remove()
    out = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h, (cos, sin) = seen[i]
        B, L, _ = h.shape
        D = attn.head_dim
        q = attn.q_proj(h).view(B, L, Hq, D).transpose(1, 2)
        k = attn.k_proj(h).view(B, L, Hkv, D).transpose(1, 2)
        v = attn.v_proj(h).view(B, L, Hkv, D).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = k.repeat_interleave(Hq // Hkv, dim=1), v.repeat_interleave(Hq // Hkv, dim=1)
        logits = q[:, :, L - window :] @ k.transpose(2, 3) / D**0.5  # (1, Hq, w, L)
        rows = torch.arange(L - window, L)[:, None]
        logits = logits.masked_fill(torch.arange(L)[None, :] > rows, float("-inf"))
        s = logits.softmax(dim=-1).sum(dim=2)[0, :, : L - window]  # (Hq, L - w)
        pool = torch.nn.functional.avg_pool1d if pooling == "avg" else torch.nn.functional.max_pool1d
        s = pool(s[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
        top = s.topk(budget - window, dim=-1).indices
        kept = torch.cat([top, torch.arange(L - window, L).expand(Hq, -1)], dim=1).sort(dim=1).values
        out.append((kept, s, k[0], v[0]))
    return out


@pytest.mark.parametrize(("kernel", "pooling"), [(3, "avg"), (5, "max")])
def test_snapkv_query_heads_select_and_store_what_the_official_rule_does(kernel, pooling):
    """Tiny Llama with GQA (4 query, 2 KV heads), 24 tokens, window 4, budget 10: the kept
    positions per query head and the compressed cache (4 heads) == the independent reference."""
    model = DECODERS["llama"]("eager")
    inp = text_inputs(1, length=24, seed=3)
    want = _official_rule_kept(model, inp, window=4, kernel=kernel, pooling=pooling, budget=10)
    with (
        torch.no_grad(),
        prunekit.compress_kv(
            model, "snapkv", keep=10, window=4, kernel=kernel, pooling=pooling, heads="query"
        ) as s,
    ):
        cache = output_cache(model(**inp))
        assert [a.self_attn.num_key_value_groups for a in model.model.layers] == [1] * 4
    assert [a.self_attn.num_key_value_groups for a in model.model.layers] == [2] * 4  # restored
    for i, (kept, scores, k, v) in enumerate(want):
        pos, ok = s.stats.kept[0][i]
        pos = pos[0]
        assert bool(ok.all()) and pos.shape == kept.shape
        if pooling == "avg":  # no ties: the same positions
            assert torch.equal(pos, kept), (i, pos, kept)
        else:  # max pooling makes plateaus of equal scores: the same top scores, the window kept
            body = pos[:, :6]
            assert bool((pos[:, 6:] == torch.arange(20, 24)).all())
            assert torch.equal(
                scores.gather(1, body).sort(dim=1).values, scores.topk(6, dim=1).values.sort(dim=1).values
            )
            kept = pos  # the cache must hold what was selected
        idx = kept[..., None].expand(-1, -1, k.shape[-1])
        torch.testing.assert_close(cache.layers[i].keys[0], k.gather(1, idx))
        torch.testing.assert_close(cache.layers[i].values[0], v.gather(1, idx))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_snapkv_query_heads_restore_the_layout_between_prompts_and_after_an_error(attn):
    """A second prompt in the same block prefills on the model's own layout again (it would fail
    with the expanded layout's num_key_value_groups = 1), and an error mid-generation restores it."""
    model = DECODERS["qwen2"](attn)
    inp = text_inputs(2)
    with torch.no_grad(), prunekit.compress_kv(model, "snapkv", keep=0.5, window=4, heads="query") as s:
        first, _ = greedy(model, inp, steps=3)
        second, _ = greedy(model, inp, steps=3)
    assert torch.equal(first, second) and s.stats.calls == 2
    with pytest.raises(RuntimeError, match="mid-generation"):
        with torch.no_grad(), prunekit.compress_kv(model, "snapkv", keep=0.5, window=4, heads="query"):
            model(**inp)  # compressed: every layer expanded
            raise RuntimeError("mid-generation")
    assert [a.self_attn.num_key_value_groups for a in model.model.layers] == [2] * 4
