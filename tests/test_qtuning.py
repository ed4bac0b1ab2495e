"""Q-Tuning (prunekit.data.qtuning): statistics, bisection, quadrants, token scores, token modes, the
Trainer collator. Hand-worked cases and an independent numpy reference of Algorithm 1."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import pytest
import torch

from prunekit.data import qtuning as Q
from tiny import pad_answers

# ------------------------------------------------------------------ statistics


def test_answer_statistics_hand_computed():
    # vocabulary of 3; row 0: prompt token at 0, answer tokens at 1 and 2 (predicted by logits 0 and 1)
    p0, p1 = [0.5, 0.25, 0.25], [0.1, 0.2, 0.7]
    logits = torch.zeros(2, 3, 3)
    logits[0, 0] = torch.tensor(p0).log()
    logits[0, 1] = torch.tensor(p1).log()
    logits[0, 2] = torch.tensor([5.0, -3.0, 0.0])  # the last position predicts nothing
    logits[1, 0] = torch.tensor([0.0, 0.0, 0.0])  # row 1: one answer token (position 1, label 0)
    logits[1, 1] = torch.tensor([9.0, 9.0, 9.0])
    labels = torch.tensor([[-100, 1, 2], [-100, 0, -100]])
    s = Q.answer_statistics(logits, labels)
    h0 = -sum(p * math.log(p) for p in p0)
    h1 = -sum(p * math.log(p) for p in p1)
    assert s.ppl[0].item() == pytest.approx(math.sqrt(4 / 0.7), rel=1e-5)
    assert s.entropy[0].item() == pytest.approx((h0 + h1) / 2, rel=1e-5)
    assert s.ppl[1].item() == pytest.approx(3.0, rel=1e-5)
    assert s.entropy[1].item() == pytest.approx(math.log(3), rel=1e-5)
    assert s.token_ppl[0].tolist() == pytest.approx([1.0, 4.0, 1 / 0.7], rel=1e-5)
    assert s.answer.tolist() == [[False, True, True], [False, True, False]]


def test_nll_is_clamped_at_50_before_exp():
    logits = torch.zeros(1, 2, 2)
    logits[0, 0] = torch.tensor([0.0, -200.0])  # label 1 has NLL ~200
    s = Q.answer_statistics(logits, torch.tensor([[-100, 1]]))
    assert s.token_ppl[0, 1].item() == pytest.approx(math.exp(50), rel=1e-5)
    assert s.ppl[0].item() == pytest.approx(math.exp(50), rel=1e-5)


def test_samples_without_answer_tokens_raise():
    logits = torch.zeros(3, 4, 5)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, -100, -100, -100], [0, -100, -100, -100]])
    with pytest.raises(ValueError, match=r"rows \[1, 2\]"):
        Q.answer_statistics(logits, labels)


# ------------------------------------------------------------------ quantiles, partition, bisection


@pytest.mark.parametrize("n", [1, 2, 5, 8, 33, 100])
def test_inverted_cdf_quantile_matches_numpy(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=n).round(1)  # ties included
    qs = [0.0, 1.0, 0.49, 0.51, 0.25, 0.75, 1 / 3, 0.2450, 0.5] + [k / n for k in range(n + 1)]
    for q in qs:
        ref = np.quantile(x, q, method="inverted_cdf")
        assert Q.inverted_cdf_quantile(torch.tensor(x), q).item() == ref, (n, q)


def test_partition_hand_made_cloud():
    # (ppl, ent); at α = β = 0.25 over 8 samples: ppl_hi = Q_.75 = 6, ppl_lo = Q_.25 = 2,
    # ent_lo = Q_.25 = 2, ent_hi = Q_.75 = 6 (inverted CDF: index ceil(8q) - 1)
    pts = [(8, 1), (7, 8), (1, 7), (2, 2), (6, 6), (3, 5), (4, 4), (5, 3)]
    ppl = torch.tensor([p for p, _ in pts], dtype=torch.float64)
    ent = torch.tensor([e for _, e in pts], dtype=torch.float64)
    assert Q.partition(ppl, ent, 0.25, 0.25).tolist() == [2, 1, 4, 3, 1, 0, 0, 0]


def _reference(ppl, ent, r_sample, K=10):
    """Algorithm 1 written independently with numpy (same choices as the module docstring)."""
    ppl, ent = np.asarray(ppl, float), np.asarray(ent, float)
    B = len(ppl)
    alo = blo = 0.0
    ahi = bhi = 0.49
    for _ in range(K):
        a, b = (alo + ahi) / 2, (blo + bhi) / 2
        phi, plo = np.quantile(ppl, 1 - a, method="inverted_cdf"), np.quantile(ppl, a, method="inverted_cdf")
        elo, ehi = np.quantile(ent, b, method="inverted_cdf"), np.quantile(ent, 1 - b, method="inverted_cdf")
        quad = []
        for p, e in zip(ppl, ent, strict=True):
            if p >= phi and e <= elo:
                quad.append(2)
            elif p <= plo and e >= ehi:
                quad.append(4)
            elif p >= phi and e >= ehi:
                quad.append(1)
            elif p <= plo and e <= elo:
                quad.append(3)
            else:
                quad.append(0)
        r = sum(q in (2, 4) for q in quad) / B
        if r < r_sample:
            alo, blo = a, b
        else:
            ahi, bhi = a, b

    def mm(x):
        return (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else np.zeros_like(x)

    supp = np.abs(mm(ppl) - mm(ent))
    target = max(1, math.floor(r_sample * B))
    keep = [i for i in range(B) if quad[i] in (2, 4)]

    def best(cands, k):
        return sorted(cands, key=lambda i: (-supp[i], i))[:k]

    if len(keep) > target:
        keep = best(keep, target)
    else:
        extra = best([i for i in range(B) if quad[i] in (1, 3)], target - len(keep))
        extra += best([i for i in range(B) if quad[i] == 0], target - len(keep) - len(extra))
        keep += extra
    return sorted(keep), quad, a, b


CLOUDS = {
    "gaussian": lambda rng, B: (np.exp(rng.normal(size=B)), rng.gamma(2.0, size=B)),
    "correlated": lambda rng, B: (lambda z: (np.exp(z), z + 0.3 * rng.normal(size=B)))(rng.normal(size=B)),
    "ties": lambda rng, B: (
        rng.integers(1, 4, size=B).astype(float),
        rng.integers(1, 3, size=B).astype(float),
    ),
    "constant": lambda rng, B: (np.ones(B), np.full(B, 2.0)),
}


@pytest.mark.parametrize("cloud", list(CLOUDS))
@pytest.mark.parametrize("B", [1, 3, 8, 16, 33, 100])
@pytest.mark.parametrize("r", [0.1, 0.125, 0.25, 0.5, 0.7, 1.0])
def test_bisection_keeps_exactly_floor_r_b_and_matches_reference(cloud, B, r):
    rng = np.random.default_rng(B * 7 + int(r * 1000))
    ppl, ent = CLOUDS[cloud](rng, B)
    sel = Q.select_samples(torch.tensor(ppl), torch.tensor(ent), r)
    assert len(sel.kept) == max(1, math.floor(r * B))
    assert len(set(sel.kept.tolist())) == len(sel.kept)
    keep, quad, a, b = _reference(ppl, ent, r)
    assert sel.kept.tolist() == keep
    assert sel.quadrant.tolist() == quad
    assert (sel.alpha, sel.beta) == (a, b)


def test_cap_keeps_highest_support():
    # one bisection step (α = β = 0.245): the quantiles tie, so all 8 samples land in Q2 ∪ Q4 (the
    # priority rule) and the cap keeps the 2 with the highest support |ppl^ - ent^| (rows 6 and 7: 1)
    ppl = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 5])
    ent = torch.tensor([1.0, 1, 1, 1, 1, 1, 3, 1])
    sel = Q.select_samples(ppl, ent, 0.25, max_iter=1)
    assert sel.capped == 6 and sel.kept.tolist() == [6, 7]


def test_top_up_from_q1_q3_by_support():
    # points on a rising diagonal: Q2 and Q4 stay empty, the batch splits into Q3 (rows 0-3) and Q1
    # (rows 4-7); supp = |p - e| / 7 = [0, .5, 0, 0, .2, 0, 0, 0] / 7 -> the top-up takes rows 1 and 4
    ppl = torch.arange(1.0, 9.0)
    ent = torch.tensor([1.0, 2.5, 3, 4, 5.2, 6, 7, 8])
    sel = Q.select_samples(ppl, ent, 0.25)
    assert sel.quadrant.tolist() == [3, 3, 3, 3, 1, 1, 1, 1]
    assert sel.topped_up == 2 and sel.kept.tolist() == [1, 4]


# ------------------------------------------------------------------ token scores


def test_token_scores_have_no_half_and_replicate_edges():
    ppl = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    s = Q.token_scores(ppl, torch.tensor([4]), 0.5)
    # s_i = 0.5 PPL_i + 0.5 (PPL_{i-1} + PPL_{i+1}); a missing neighbour is the token's own PPL
    assert s[0].tolist() == [0.5 + 0.5 * (1 + 2), 1 + 0.5 * (1 + 4), 2 + 0.5 * (2 + 8), 4 + 0.5 * (4 + 8)]
    s1 = Q.token_scores(torch.tensor([[3.0, 5.0, 7.0, 0.0]]), torch.tensor([3]), 1.0)
    assert s1[0, :3].tolist() == [3 + 5, 3 + 7, 5 + 7] and s1[0, 3].item() == math.inf


def test_select_tokens_keeps_lowest_scores_in_sequence_positions():
    # row 0: prompt at 0..1, answer 2..7 with PPL [1, 9, 1, 1, 1, 1]; λ = 0.5 gives
    # s = [5.5, 5.5, 5.5, 1.5, 1.5, 1.5] -> keep floor(0.5 * 6) = 3: positions 5, 6, 7
    # row 1: answer 1..3 with PPL [2, 1, 8] -> s = [2.5, 5.5, 8.5] (λ=0.5, edges own) -> keep 1: position 1
    tok = torch.ones(2, 8)
    tok[0, 2:] = torch.tensor([1.0, 9, 1, 1, 1, 1])
    tok[1, 1:4] = torch.tensor([2.0, 1, 8])
    ans = torch.zeros(2, 8, dtype=torch.bool)
    ans[0, 2:] = True
    ans[1, 1:4] = True
    keep = Q.select_tokens(tok, ans, 0.5, 0.5)
    assert torch.nonzero(keep[0]).flatten().tolist() == [5, 6, 7]
    assert torch.nonzero(keep[1]).flatten().tolist() == [1]
    keep_all = Q.select_tokens(tok, ans, 1.0, 0.5)
    assert torch.equal(keep_all, ans)
    one = Q.select_tokens(tok, ans, 0.01, 0.5)  # at least one token
    assert one.sum(1).tolist() == [1, 1]


def test_neighbour_sum_without_half_changes_the_choice():
    # PPL [1, 6, 1, 4, 4]: no /2 -> s = [4, 4, 5.5, 4.5, 6]; with /2 -> [2.25, 3.5, 3, 3.25, 4]
    # keep 2: no /2 keeps positions 0, 1 (tie broken to the earlier); /2 would keep 0 and 2
    tok = torch.tensor([[1.0, 1, 6, 1, 4, 4]])
    ans = torch.tensor([[False, True, True, True, True, True]])
    keep = Q.select_tokens(tok, ans, 0.5, 0.5)
    assert torch.nonzero(keep[0]).flatten().tolist() == [1, 2]


def test_median_test_only_prunes_detrimental_tokens():
    # PPL [1, 9, 9, 1]: median (lower) 1; detrimental = PPL > 1 and neighbours' mean > 1: positions 1, 2
    tok = torch.tensor([[1.0, 1, 9, 9, 1]])
    ans = torch.tensor([[False, True, True, True, True]])
    keep = Q.select_tokens(tok, ans, 0.25, 0.5, median_test=True)
    assert torch.nonzero(keep[0]).flatten().tolist() == [1, 4]


# ------------------------------------------------------------------ token modes


def _stats(ppl, ent, token_ppl, labels):
    return Q.AnswerStats(torch.tensor(ppl), torch.tensor(ent), token_ppl, Q.answer_mask(labels))


def _batch(side="right"):
    ids = torch.arange(1, 41).view(4, 10)
    labels = ids.clone()
    labels[:, :4] = -100
    att = torch.ones_like(ids)
    if side == "right":
        att[0, 8:] = 0
        labels[0, 8:] = -100
    else:
        att[0, :2] = 0
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


@pytest.mark.parametrize("side", ["right", "left"])
def test_loss_mask_and_drop(side):
    b = _batch(side)
    tok = torch.rand(4, 10, generator=torch.Generator().manual_seed(0)) * 5 + 1
    st = _stats([9.0, 1.0, 8.0, 2.0], [1.0, 9.0, 2.0, 8.0], tok, b["labels"])  # 0, 2: Q2-like; 1, 3: Q4-like
    lm, info = Q.filter_batch(b, st, r_sample=0.5, r_token=0.5, token_mode="loss_mask")
    dr, info2 = Q.filter_batch(b, st, r_sample=0.5, r_token=0.5, token_mode="drop", pad_token_id=0)
    assert info.kept == info2.kept and len(info.kept) == 2
    quads = [info.quadrant[i] for i in info.kept]
    for r, (row, q) in enumerate(zip(info.kept, quads, strict=True)):
        orig = b["labels"][row]
        ans = [t for t in range(1, 10) if orig[t] != -100]
        kept_t = [t for t in range(10) if lm["labels"][r, t] != -100]
        assert torch.equal(lm["input_ids"][r], b["input_ids"][row])  # context intact
        if q == 2:
            assert len(kept_t) == max(1, len(ans) // 2) and set(kept_t) <= set(ans)
        else:
            assert kept_t == ans
        pruned = set(ans) - set(kept_t)
        stay = [t for t in range(10) if t not in pruned and b["attention_mask"][row, t] == 1]
        m = dr["attention_mask"][r].bool()
        assert dr["input_ids"][r][m].tolist() == b["input_ids"][row, stay].tolist()
        assert dr["labels"][r][m].tolist() == lm["labels"][r, stay].tolist()
    assert info.grad_tokens == sum(int((lm["labels"][r] != -100).sum()) for r in range(2))
    assert dr["input_ids"].shape[1] == int(dr["attention_mask"].sum(1).max())  # re-padded to the longest
    assert bool((dr["attention_mask"][:, -1 if side == "left" else 0] == 1).all())  # padding side kept
    assert int(dr["attention_mask"][0].sum()) < 10


def test_topped_up_samples_keep_tokens_unless_by_side():
    # rising diagonal (as test_top_up_from_q1_q3_by_support): rows 1 and 4 are topped up; row 1 has
    # ent^ > ppl^ (Q4's side), row 4 too (5.2 > 5): with "by_side" neither is pruned; flip row 4's
    # entropy below its PPL and it is pruned as a Q2 sample
    labels = torch.full((8, 6), 7)
    labels[:, 0] = -100
    b = {"input_ids": torch.ones(8, 6, dtype=torch.long), "labels": labels}
    tok = torch.arange(1.0, 7.0).repeat(8, 1)
    ppl = [1.0, 2, 3, 4, 5, 6, 7, 8]
    for ent4, want in ((5.2, [5, 5]), (4.8, [5, 2])):
        ent = [1.0, 2.5, 3, 4, ent4, 6, 7, 8]
        st = _stats(ppl, ent, tok, labels)
        out, info = Q.filter_batch(b, st, r_sample=0.25, r_token=0.5)
        assert info.kept == [1, 4] and (out["labels"] != -100).sum(1).tolist() == [5, 5]
        out, info = Q.filter_batch(b, st, r_sample=0.25, r_token=0.5, topup_tokens="by_side")
        assert info.kept == [1, 4] and (out["labels"] != -100).sum(1).tolist() == want


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"r_sample": 0.0}, r"r_sample .*\(0, 1\].*0\.0"),
        ({"r_sample": 1.5}, r"r_sample .*\(0, 1\].*1\.5"),
        ({"r_token": -0.1}, r"r_token .*\(0, 1\].*-0\.1"),
        ({"lam": 1.2}, r"lam .*\[0, 1\].*1\.2"),
        ({"lam": -0.5}, r"lam .*\[0, 1\].*-0\.5"),
        ({"token_mode": "mask"}, r"token_mode .*'mask'"),
        ({"max_iter": 0}, r"max_iter .*>= 1.*0"),
        ({"topup_tokens": "all"}, r"topup_tokens .*'all'"),
    ],
)
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        Q.QTuning(**kw)


def test_registry_entry():
    import prunekit.registry as R

    info = R.get("q_tuning")
    assert info.family == "data" and info.factory is Q.QTuning


# ------------------------------------------------------------------ model and Trainer


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                      attention_dropout=0.1)  # fmt: skip
    return LlamaForCausalLM(cfg)


def test_step_filter_scores_in_eval_mode_and_restores_flags():
    model = _tiny_llama()
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    flags = [m.training for m in model.modules()]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (8, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    out1, info1 = Q.step_filter(batch, model)
    out2, info2 = Q.step_filter(batch, model)  # dropout is off in the scoring forward: same selection
    assert [m.training for m in model.modules()] == flags
    assert info1.kept == info2.kept and torch.equal(out1["labels"], out2["labels"])
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    ref = Q.answer_statistics(logits, labels)
    assert info1.ppl == pytest.approx(ref.ppl.tolist(), rel=1e-5)
    assert len(info1.kept) == 2 and out1["input_ids"].shape[0] == 2


def test_collator_in_a_real_trainer_matches_step_filter(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _tiny_llama()
    rng = np.random.default_rng(0)
    data = []
    for i in range(48):
        n, a = int(rng.integers(4, 9)), int(rng.integers(2, 7))
        ids = rng.integers(1, 64, size=n + a).tolist()
        data.append({"input_ids": ids, "labels": [-100] * n + ids[n:], "id": i})  # "id" is removed

    class Recording(Q.QTuningCollator):
        calls: ClassVar[list] = []

        def __call__(self, features):
            assert all(set(f) == {"input_ids", "labels"} for f in features)  # remove_unused_columns
            raw = self.base_collator(features)
            state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            flags = [m.training for m in self.model.modules()]
            out = super().__call__(features)
            assert [m.training for m in self.model.modules()] == flags
            self.calls.append((raw, state, out, self.last))
            return out

    qt = Q.QTuning(r_sample=0.25, r_token=0.5, lam=0.5)
    coll = Recording(model, pad_answers, **{k: getattr(qt, k) for k in ("r_sample", "r_token", "lam")})
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].shape[0]) if torch.is_grad_enabled() else None,
        with_kwargs=True,
    )
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
                             save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
                             seed=0)  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=data, data_collator=coll, callbacks=[qt.callback(coll)]
    )
    trainer.train()
    hook.remove()
    assert seen == [2, 2, 2]  # the trained forwards got the filtered batches (⌊0.25 · 8⌋ rows)
    assert len(coll.calls) >= 3
    ref_model = _tiny_llama(seed=1)
    for raw, state, out, info in coll.calls:
        ref_model.load_state_dict(state)
        ref_model.train()
        ref_out, ref_info = Q.step_filter(raw, ref_model, r_sample=0.25, r_token=0.5, lam=0.5)
        assert ref_info.kept == info.kept
        for k in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(ref_out[k], out[k]), k
    assert any(c[1]["lm_head.weight"].ne(coll.calls[0][1]["lm_head.weight"]).any() for c in coll.calls)
    logs = [h for h in trainer.state.log_history if "qtuning/grad_token_fraction" in h]
    assert logs and 0 < logs[-1]["qtuning/grad_token_fraction"] < 1
    assert (
        logs[-1]["qtuning/Q1"]
        + logs[-1]["qtuning/Q2"]
        + logs[-1]["qtuning/Q3"]
        + logs[-1]["qtuning/Q4"]
        + logs[-1]["qtuning/none"]
        == 8 * coll.stats.batches
    )
    assert "qtuning" in trainer.state.log_history[-1]
