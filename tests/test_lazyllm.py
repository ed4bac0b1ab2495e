"""LazyLLM inside the prefill and decoding: against an independent full-recompute reference with
masks, keep-everything identity, the first cut by hand, the budget, restoration, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

import prunekit
from invariants import assert_same, snapshot
from prunekit.models.compat import cache_keyword, output_cache
from reference import decoder_layers, greedy
from tiny import DECODERS, text_inputs

CUTS = (1, 2, 3)  # the tiny decoders have 4 layers: segments [0,1), [1,2), [2,3), [3,4)


def _finite_err(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(b)
    assert torch.equal(fin, torch.isfinite(a))
    return (a - b)[fin].abs().max().item()


@pytest.mark.parametrize("fam", ["llama", "qwen2", "mistral"])
def test_keep_everything_is_dense_and_model_restored(fam):
    model = DECODERS[fam]("sdpa")
    inp = text_inputs(2)
    before = snapshot(model)
    with torch.no_grad():
        dense_t, dense_l = greedy(model, inp)
        with prunekit.compress_kv(model, "lazyllm", keep=1.0, layers=CUTS) as s:
            t, l = greedy(model, inp)
        with pytest.raises(RuntimeError, match="inside"):
            with prunekit.compress_kv(model, "lazyllm", keep=0.5, layers=CUTS):
                greedy(model, inp)
                raise RuntimeError("boom inside the block")
        _, after_l = greedy(model, inp)
    assert s.stats.kept_fraction == 1.0 and s.stats.revived == 0
    assert _finite_err(l, dense_l) < 1e-5 and torch.equal(t, dense_t)
    assert torch.equal(after_l, dense_l)
    assert_same(before, snapshot(model))


def _positions(am: torch.Tensor) -> torch.Tensor:
    return (am.cumsum(-1) - 1).clamp_min(0)


def _drive(model, inp: dict, chunks: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Prefill, then feed greedy tokens in calls of ``chunks`` tokens each (a multi-token call
    feeds its tokens teacher-forced, as the bench's continuations are). Returns the full ids, the
    full 2-D mask, and each call's output logits (prefill: the last row)."""
    ids, am = inp["input_ids"], inp["attention_mask"]
    out = model(input_ids=ids, attention_mask=am, position_ids=_positions(am), use_cache=True)
    cache, logits = output_cache(out), [out.logits[:, -1:]]
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for n in chunks:
        new = torch.cat([nxt, (nxt + 1 + torch.arange(n - 1)) % 200], dim=1)  # greedy first, then forced
        ids = torch.cat([ids, new], dim=1)
        am = torch.cat([am, torch.ones_like(new)], dim=1)
        pos = _positions(am)[:, -n:]
        kw = {cache_keyword(): cache}
        out = model(input_ids=new, attention_mask=am, position_ids=pos, use_cache=True, **kw)
        logits.append(out.logits)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return ids, am, logits


def _reference(model, ids, am, comp: dict, act: dict) -> torch.Tensor:
    """Full recompute without a cache on an eager model: in a layer of segment ``s >= 1`` the row of
    a token computed there at call ``c`` sees the keys active in segment ``s`` at call ``c`` (at
    indices <= its own, and itself), i.e. exactly what its KV was computed from; segment 0 is
    causal. Returns all rows' logits."""
    T = ids.shape[1]
    layers = decoder_layers(model)
    bounds = [0, *CUTS, len(layers)]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    eye = torch.eye(T, dtype=torch.bool)
    handles = []
    for s in range(1, len(bounds) - 1):
        allowed = causal[None] & am.bool()[:, None, :] | eye  # rows never computed here: anything
        for c, a in act[s].items():  # a: (B, T) keys active at call c
            rows = comp[s] == c  # (B, T) tokens computed in segment s at call c
            allowed = torch.where(rows[:, :, None], (a[:, None, :] & causal[None]) | eye, allowed)
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)

        def hook(layer, args, kw, bias=bias):
            kw["attention_mask"] = bias[:, None]
            return args, kw

        for layer in layers[bounds[s] : bounds[s + 1]]:
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        return model(input_ids=ids, attention_mask=am, position_ids=_positions(am), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefill_pruning_and_revival_equal_a_masked_full_recompute(fam, attn):
    """Batch 2, left padding, GQA (qwen2); a prefill, a 3-token teacher-forced call, four single-token
    steps. Every output row equals the reference built from the recorded selections, and tokens
    are revived from the aux cache along the way."""
    model = DECODERS[fam](attn)
    inp = text_inputs(2)
    chunks = [3, 1, 1, 1, 1]
    T = inp["input_ids"].shape[1] + sum(chunks)
    B = inp["input_ids"].shape[0]
    comp = {s: torch.full((B, T), -1) for s in range(1, len(CUTS) + 1)}
    act: dict[int, dict[int, torch.Tensor]] = {s: {} for s in comp}
    call = {"c": -1}
    with torch.no_grad(), prunekit.compress_kv(model, "lazyllm", keep=0.4, layers=CUTS) as sess:
        orig_model_hook, orig_cut = sess._on_model, sess._cut

        def on_model(module, args, kw):
            call["c"] += 1
            return orig_model_hook(module, args, kw)

        def cut(s, h, eager):
            before = sess.computed[s].clone()
            out = orig_cut(s, h, eager)
            P = before.shape[1]
            comp[s][:, :P][sess.computed[s] & ~before] = call["c"]
            act[s][call["c"]] = torch.nn.functional.pad(sess.active[s], (0, T - P))
            return out

        sess.hooks.remove()  # reinstall with the recording wrappers
        sess._on_model, sess._cut = on_model, cut
        sess.install()
        ids, am, logits = _drive(model, inp, chunks)
    assert sess.stats.revived > 0
    assert abs(sess.stats.prefill_kept_fraction - 0.4) < 0.08

    ref_model = DECODERS[fam]("eager")
    ref_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref = _reference(ref_model, ids, am, comp, act)
    L = inp["input_ids"].shape[1]
    ends = [L, *(L + torch.tensor(chunks).cumsum(0)).tolist()]
    got = torch.cat(logits, dim=1)
    want = torch.cat([ref[:, L - 1 : L], *(ref[:, a:b] for a, b in itertools.pairwise(ends))], dim=1)
    assert (got - want).abs().max().item() < 1e-4


def test_first_cut_keeps_the_top_tokens_of_the_last_tokens_head_mean_attention_one_layer_before():
    """Hand check of the selection: at the first pruning layer (2), the prefill keeps the k_1 real
    prompt tokens the last token attends most at layer 1 (dense there), plus the last token."""
    model = DECODERS["qwen2"]("eager")
    inp = text_inputs(2)
    with torch.no_grad():
        att = model(**inp, output_attentions=True).attentions[1]  # (B, H, L, L), dense up to layer 2
    with torch.no_grad(), prunekit.compress_kv(model, "lazyllm", keep=0.5, layers=(2, 3)) as sess:
        model(**inp, use_cache=True)
    row = att[:, :, -1].mean(dim=1)  # (B, L) head mean of the last token's row
    valid = inp["attention_mask"].bool()
    L = valid.shape[1]
    for b in range(2):
        n = int(valid[b].sum())
        k = int(sess.k[0, b])
        # the last token gets +inf: it takes one of the k places, the others are the next best
        scores = row[b].clone()
        scores[L - 1] = float("inf")
        want = set(scores.masked_fill(~valid[b], -1).topk(k).indices.tolist())
        got = set(sess.active[1][b].nonzero().flatten().tolist())
        assert got == want, (b, n, k)


def test_budget_is_the_mean_fraction_of_prompt_kv_per_layer():
    model = DECODERS["llama"]("sdpa")
    inp = text_inputs(1, length=40)
    for keep in (0.8, 0.5, 0.3):
        with torch.no_grad(), prunekit.compress_kv(model, "lazyllm", keep=keep, layers=CUTS) as sess:
            model(**inp, use_cache=True)
        assert abs(sess.stats.prefill_kept_fraction - keep) < 0.04, keep


def test_refusals_name_the_bad_value():
    model = DECODERS["llama"]("sdpa")
    with pytest.raises(ValueError, match=r"keep=0.1 is below .* at least 0.500"):
        with prunekit.compress_kv(model, "lazyllm", keep=0.1, layers=(2, 3)):
            pass
    with pytest.raises(ValueError, match=r"ascending distinct ints in \[1, 3\]"):
        with prunekit.compress_kv(model, "lazyllm", keep=0.5, layers=(0, 2)):
            pass


def test_models_with_sliding_window_layers_are_refused():
    from test_kv import _gemma3

    with pytest.raises(prunekit.errors.UnsupportedModelError, match="sliding-window"):
        with prunekit.compress_kv(_gemma3("sdpa"), "lazyllm", keep=0.5):
            pass


def test_bench_scores_lazyllm_step_by_step_as_generate_decodes():
    """The bench feeds a continuation one token per call for LazyLLM (it re-selects every step):
    scoring the model's own greedy continuation from generate() under LazyLLM must find it greedy
    and give the same log-probabilities as generate()'s scores."""
    from prunekit.bench.models import Loaded
    from prunekit.bench.tasks.lm import Pair, score_pairs

    model = DECODERS["llama"]("sdpa")
    inp = text_inputs(1)
    open_ = lambda: prunekit.compress_kv(model, "lazyllm", keep=0.4, layers=CUTS)  # noqa: E731
    with torch.no_grad(), open_():
        out = model.generate(
            **inp, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    ctx = inp["input_ids"][0].tolist()
    cont = out.sequences[0, len(ctx) :].tolist()
    want = sum(torch.log_softmax(sc[0].float(), -1)[t].item() for sc, t in zip(out.scores, cont, strict=True))
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 0})()
    loaded = Loaded("tiny", "lm", model, tok)
    got = score_pairs(loaded, [Pair(ctx, cont)], open_)
    assert bool(got["greedy"][0])
    assert got["logprob"][0].item() == pytest.approx(want, abs=1e-4)
