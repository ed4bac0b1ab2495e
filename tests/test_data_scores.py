"""Static data-pruning scores and selection (prunekit.data): hand-worked cases, references by
autograd, seeds, ties, class balance, errors, and prune_data end to end (a torch MLP, a tiny BERT,
the forgetting tracker inside a transformers Trainer)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit.data import (
    ForgettingTracker,
    class_balanced,
    el2n,
    entropy,
    forgetting,
    forgetting_counts,
    grand,
    kept_count,
    random_subset,
    topk,
    with_index,
)
from prunekit.models.convnets import MLP

LOG = math.log
# Three samples, three classes, softmaxes by hand: p0 = (1/4, 1/4, 1/2), p1 = (1/3, 1/3, 1/3),
# p2 = (1/4, 1/2, 1/4); labels 2, 0, 0.
LOGITS = torch.tensor([[0.0, 0.0, LOG(2)], [0.0, 0.0, 0.0], [0.0, LOG(2), 0.0]])
LABELS = torch.tensor([2, 0, 0])


# ------------------------------------------------------------------ scores by hand
def test_el2n_hand_worked():
    # errors: (1/4, 1/4, -1/2) -> sqrt(6)/4; (-2/3, 1/3, 1/3) -> sqrt(6)/3; (-3/4, 1/2, 1/4) -> sqrt(14)/4
    want = torch.tensor([math.sqrt(6) / 4, math.sqrt(6) / 3, math.sqrt(14) / 4])
    torch.testing.assert_close(el2n(logits=LOGITS, labels=LABELS), want)
    # the mean over models: a second model whose logits are uniform everywhere (error sqrt(6)/3)
    two = torch.stack([LOGITS, torch.zeros(3, 3)])
    torch.testing.assert_close(el2n(logits=two, labels=LABELS), (want + math.sqrt(6) / 3) / 2)


def test_entropy_hand_worked():
    want = torch.tensor([1.5 * LOG(2), LOG(3), 1.5 * LOG(2)])
    torch.testing.assert_close(entropy(logits=LOGITS), want)
    # a certain prediction (a class at -inf logit has p = 0, 0 log 0 = 0)
    torch.testing.assert_close(entropy(logits=torch.tensor([[0.0, -math.inf, -math.inf]])), torch.zeros(1))


def test_grand_hand_worked():
    # g = softmax - onehot (the EL2N error vector); score = |g| sqrt(1 + |e|^2); |e|^2 = 5, 0, 3
    emb = torch.tensor([[1.0, 2.0], [0.0, 0.0], [1.0, math.sqrt(2)]])
    want = torch.tensor([math.sqrt(6) / 4 * math.sqrt(6), math.sqrt(6) / 3, math.sqrt(14) / 4 * 2])
    torch.testing.assert_close(grand(logits=LOGITS, labels=LABELS, embeddings=emb), want)


def _per_sample_lastlayer_grad_norms(model, last, x, y, on_probabilities=False):
    """Reference: autograd of the loss of each sample alone w.r.t. the last Linear's weight and bias."""
    out = []
    for i in range(x.shape[0]):
        model.zero_grad()
        z = model(x[i : i + 1])
        z = z.logits if hasattr(z, "logits") else z
        loss = F.cross_entropy(F.softmax(z, -1) if on_probabilities else z, y[i : i + 1])
        gw, gb = torch.autograd.grad(loss, [last.weight, last.bias])
        out.append(torch.cat([gb.flatten(), gw.flatten()]).norm())
    return torch.stack(out)


@pytest.mark.parametrize("on_probabilities", [False, True])
def test_grand_matches_autograd_of_the_last_layer(on_probabilities):
    torch.manual_seed(0)
    model = MLP((12, 9, 5), seed=3)
    x, y = torch.randn(10, 12), torch.randint(0, 5, (10,))
    want = _per_sample_lastlayer_grad_norms(model, model.layers[-1], x, y, on_probabilities)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]  # an iterable of (x, y) batches
    got = grand(model, data, on_probabilities=on_probabilities)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    # the same through prune_data, on a Dataset, by name, with the last layer named explicitly
    ds = torch.utils.data.TensorDataset(x, y)
    rep = prunekit.prune_data(ds, "grand", 4, model=model, batch_size=3, last_layer="layers.1",
                              on_probabilities=on_probabilities)  # fmt: skip
    torch.testing.assert_close(rep.scores.float(), want.detach(), rtol=1e-5, atol=1e-6)
    assert rep.indices.tolist() == sorted(torch.argsort(want, descending=True)[:4].tolist())


def test_grand_refuses_a_last_layer_that_does_not_give_the_logits():
    model = MLP((12, 9, 5))
    x, y = torch.randn(4, 12), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="is not the model's logits"):
        grand(model, [(x, y)], last_layer="layers.0")
    with pytest.raises(ValueError, match="no submodule 'head'"):
        grand(model, [(x, y)], last_layer="head")
    with pytest.raises(ValueError, match="needs embeddings="):
        grand(logits=LOGITS, labels=LABELS)


def test_scores_restore_the_model_mode_and_average_models():
    a, b = MLP((12, 9, 5), seed=1), MLP((12, 9, 5), seed=2)
    a.train()
    b.eval()
    b.layers[0].train()  # a mixed state must come back exactly
    x, y = torch.randn(6, 12), torch.randint(0, 5, (6,))
    got = el2n([a, b], [(x, y)])
    assert a.training and all(m.training for m in a.modules())
    assert not b.training and b.layers[0].training and not b.layers[1].training
    ref = [el2n(logits=m(x).logits.detach(), labels=y) for m in (a, b)]
    torch.testing.assert_close(got, (ref[0] + ref[1]) / 2)


# ------------------------------------------------------------------ forgetting
CORRECT = torch.tensor(
    [  # presentations x samples
        [1, 0, 0, 1],
        [0, 0, 1, 1],
        [1, 0, 0, 1],
        [0, 0, 1, 0],
    ],
    dtype=torch.bool,
)
# sample 0: 1->0, 0->1, 1->0: 2 events; 1: never learned, inf; 2: 0,1,0,1: 1 event; 3: 1,1,1,0: 1 event
FORGOT = torch.tensor([2.0, math.inf, 1.0, 1.0], dtype=torch.float64)


def test_forgetting_counts_hand_worked():
    torch.testing.assert_close(forgetting_counts(CORRECT), FORGOT)
    torch.testing.assert_close(forgetting_counts(CORRECT.int()), FORGOT)
    with pytest.raises(ValueError, match="booleans"):
        forgetting_counts(torch.full((2, 2), 2))


def test_forgetting_tracker_plain_loop_matches_the_matrix():
    t = ForgettingTracker(4)
    for epoch in range(4):  # each epoch presents the samples in another order, in two batches
        order = torch.roll(torch.arange(4), epoch)
        for part in (order[:2], order[2:]):
            t.update(part, correct=CORRECT[epoch, part])
    torch.testing.assert_close(t.counts(), FORGOT)
    assert t.seen.tolist() == [4, 4, 4, 4]
    # from logits: argmax == label
    t2 = ForgettingTracker(4)
    for row in CORRECT:
        labels = torch.zeros(4, dtype=torch.long)
        logits = torch.stack([torch.where(row, 1.0, -1.0), torch.zeros(4)], dim=1)  # class 0 iff correct
        t2.update(torch.arange(4), logits, labels)
    torch.testing.assert_close(t2.counts(), FORGOT)
    torch.testing.assert_close(forgetting(t2), FORGOT)
    with pytest.raises(ValueError, match=r"sample index 4 is out of range; allowed: 0\.\.3"):
        t2.update(torch.tensor([4]), correct=torch.tensor([True]))


def test_forgetting_tracker_repeated_samples_in_a_batch_are_successive_presentations():
    t = ForgettingTracker(2)
    t.update(torch.tensor([0, 0, 1, 0]), correct=torch.tensor([True, False, True, True]))
    assert t.events.tolist() == [1, 0] and t.seen.tolist() == [3, 1] and t.last.tolist() == [True, True]


def test_forgetting_from_checkpoints_and_prune_data():
    # per-epoch "checkpoints": fixed linear maps whose correctness on 4 samples follows CORRECT
    x = torch.eye(4)
    labels = torch.zeros(4, dtype=torch.long)
    ckpts = []
    for row in CORRECT:
        lin = torch.nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.stack([torch.where(row, 1.0, -1.0), torch.zeros(4)]))
        ckpts.append(lin)
    ds = torch.utils.data.TensorDataset(x, labels)
    torch.testing.assert_close(forgetting(checkpoints=ckpts, data=ds, batch_size=3), FORGOT)
    rep = prunekit.prune_data(ds, "forgetting", 2, model=ckpts)
    assert rep.indices.tolist() == [0, 1]  # inf first, then 2 events
    rep = prunekit.prune_data(ds, "forgetting", 3, correct=CORRECT)
    assert rep.indices.tolist() == [0, 1, 2]  # the tie 2 vs 3 (1 event each) goes to the lower index


# ------------------------------------------------------------------ selection
def test_kept_count_rounds_and_has_clear_errors():
    assert kept_count(0.3, 10) == 3 and kept_count(0.25, 10) == 2  # round half to even: 2.5 -> 2
    assert kept_count(0.01, 10) == 1 and kept_count(1.0, 7) == 7 and kept_count(7, 7) == 7
    for bad, msg in [
        (0.0, r"keep=0.0 is out of range: a fraction must be in \(0, 1\]"),
        (1.5, r"keep=1.5 is out of range"),
        (0, r"keep=0 is out of range: a count must be in 1..10"),
        (11, r"keep=11 is out of range: a count must be in 1..10"),
        (True, r"keep must be a fraction in \(0, 1\] or an int count in 1..10; got True"),
        ("half", r"got 'half'"),
    ]:
        with pytest.raises(ValueError, match=msg):
            kept_count(bad, 10)
    with pytest.raises(ValueError, match="empty dataset"):
        kept_count(0.5, 0)


def test_topk_is_stable_with_ties_broken_by_index():
    s = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert topk(s, 2).tolist() == [1, 2]
    assert topk(s, 4).tolist() == [1, 2, 3, 4]
    assert topk(s, 2, descending=False).tolist() == [0, 3]
    assert topk(torch.zeros(6), 0.5).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="NaN"):
        topk(torch.tensor([1.0, float("nan")]), 1)


def test_class_balanced_counts():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2])
    s = torch.arange(12, dtype=torch.float)  # within a class, the later samples score higher
    # a fraction: round(0.5 n_c) per class: 2, 1, 3
    assert class_balanced(s, y, 0.5).tolist() == [2, 3, 5, 9, 10, 11]
    # a count of 5 shared by largest remainders: quotas 5/3, 5/6, 5/2 -> floors 1, 0, 2, +1 to class 1 and 0
    assert class_balanced(s, y, 5).tolist() == [2, 3, 5, 10, 11]
    # at least one per class (round(0.1 * 2) = 0 for class 1)
    assert torch.unique(y[class_balanced(s, y, 0.1)], return_counts=True)[1].tolist() == [1, 1, 1]
    # ties inside a class go to the lower index; topk(balance_labels=) is the same selection
    assert class_balanced(torch.zeros(12), y, 0.5).tolist() == [0, 1, 4, 6, 7, 8]
    assert topk(s, 0.5, balance_labels=y).tolist() == [2, 3, 5, 9, 10, 11]
    with pytest.raises(ValueError, match="11 labels for 12 scores"):
        class_balanced(s, y[:-1], 0.5)


def test_random_subset_is_fixed_by_the_seed():
    a, b, c = (
        random_subset(100, 0.3, seed=7),
        random_subset(100, 0.3, seed=7),
        random_subset(100, 0.3, seed=8),
    )
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
    assert a.numel() == 30 and a.unique().numel() == 30 and a.tolist() == sorted(a.tolist())
    ds = list(range(50))
    r1 = prunekit.prune_data(ds, "random_data", 0.2, seed=3)
    r2 = prunekit.prune_data(ds, "random_data", 0.2, seed=3)
    assert r1.indices.tolist() == r2.indices.tolist() == random_subset(50, 0.2, seed=3).tolist()
    assert r1.subset() == [ds[i] for i in r1.indices.tolist()]
    labels = torch.arange(50) % 5
    rb = prunekit.prune_data(ds, "random_data", 0.2, seed=3, labels=labels, balance=True)
    assert rb.kept_per_class == {c: 2 for c in range(5)}
    assert rb.indices.tolist() == prunekit.prune_data(ds, "random_data", 0.2, seed=3, labels=labels,
                                                      balance=True).indices.tolist()  # fmt: skip


# ------------------------------------------------------------------ errors
def test_prune_data_errors_are_clear():
    ds = torch.utils.data.TensorDataset(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"keep=1.2 is out of range: a fraction must be in \(0, 1\]"):
        prunekit.prune_data(ds, "random_data", 1.2)
    with pytest.raises(ValueError, match=r"keep=7 is out of range: a count must be in 1\.\.6"):
        prunekit.prune_data(ds, "random_data", 7)
    with pytest.raises(ValueError, match="empty dataset"):
        prunekit.prune_data([], "random_data", 0.5)
    with pytest.raises(ValueError, match="empty dataset"):
        prunekit.prune_data(torch.utils.data.TensorDataset(torch.zeros(0, 4)), "el2n", 0.5, model=MLP((4, 3)))
    with pytest.raises(ValueError, match=r"labels of shape \(2,\) do not match logits of shape \(3, 3\)"):
        el2n(logits=LOGITS, labels=LABELS[:2])
    with pytest.raises(ValueError, match=r"label 3 is out of range; allowed: 0\.\.2"):
        el2n(logits=LOGITS, labels=torch.tensor([0, 3, 1]))
    with pytest.raises(prunekit.UnknownMethodError, match="Did you mean 'el2n'"):
        prunekit.prune_data(ds, "el2m", 0.5)
    with pytest.raises(ValueError, match="'fastv' is a tokens method; prune_data takes data methods"):
        prunekit.prune_data(ds, "fastv", 0.5)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\] for method 'el2n'"):
        prunekit.prune_data(ds, "el2n", 0.5, bogus=1)
    with pytest.raises(ValueError, match="el2n needs a trained model"):
        prunekit.prune_data(ds, "el2n", 0.5)
    with pytest.raises(ValueError, match=r"'el2n' does not use \['correct'\]"):
        prunekit.prune_data(ds, "el2n", 0.5, model=MLP((4, 3)), correct=CORRECT)
    with pytest.raises(ValueError, match="a list of at least 2 per-epoch checkpoints"):
        prunekit.prune_data(ds, "forgetting", 0.5, model=MLP((4, 3)))
    # a model is accepted (and ignored) by random_data, so one call serves every method
    a = prunekit.prune_data(ds, "random_data", 0.5, model=MLP((4, 3)), seed=1)
    assert a.indices.tolist() == prunekit.prune_data(ds, "random_data", 0.5, seed=1).indices.tolist()
    with pytest.raises(ValueError, match="forgetting needs tracker="):
        prunekit.prune_data(ds, "forgetting", 0.5)
    with pytest.raises(ValueError, match="the report was made for 6"):
        prunekit.prune_data(ds, "random_data", 0.5).subset(list(range(5)))


# ------------------------------------------------------------------ end to end
def test_prune_data_el2n_on_an_mlp_against_a_reference():
    torch.manual_seed(1)
    x, y = torch.randn(30, 1, 4, 4), torch.randint(0, 3, (30,))
    model = MLP((16, 8, 3), seed=4)
    ds = torch.utils.data.TensorDataset(x, y)
    rep = prunekit.prune_data(ds, "el2n", 0.3, model=model, batch_size=7)
    with torch.no_grad():
        p = model(x).logits.softmax(-1)
    ref = (p - F.one_hot(y, 3)).norm(dim=-1)
    torch.testing.assert_close(rep.scores.float(), ref)
    assert rep.kept == 9 and rep.total == 30
    assert rep.indices.tolist() == sorted(torch.sort(ref, descending=True, stable=True).indices[:9].tolist())
    sub = rep.subset()
    assert isinstance(sub, torch.utils.data.Subset) and sub.indices == rep.indices.tolist()
    assert sum(rep.kept_per_class.values()) == 9
    d = rep.to_dict()
    assert (
        d["method"] == "el2n" and d["options"] == {"balance": False} and d["indices"] == rep.indices.tolist()
    )
    assert '"kept": 9' in rep.to_json()
    # balance=True: round(0.3 n_c) per class
    bal = prunekit.prune_data(ds, "el2n", 0.3, model=model, balance=True)
    counts = torch.bincount(y, minlength=3)
    assert bal.kept_per_class == {c: max(1, round(0.3 * int(counts[c]))) for c in range(3)}


class _Selectable:
    """A stand-in for a datasets.Dataset: .select and .column_names."""

    column_names = ("x", "label")

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def select(self, idx):
        return _Selectable([self.rows[i] for i in idx])


def test_subset_uses_select_for_hf_like_datasets():
    ds = _Selectable([{"x": torch.tensor([float(i)]), "label": 0} for i in range(8)])
    rep = prunekit.prune_data(ds, "random_data", 3, seed=1)
    sub = rep.subset()
    assert isinstance(sub, _Selectable) and [int(r["x"]) for r in sub.rows] == rep.indices.tolist()


def _tiny_bert(num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=16, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


def _text_samples(n=12, seq=6, classes=3):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 40, (n, seq), generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": int(labels[i])} for i in range(n)]  # fmt: skip


def test_prune_data_on_a_tiny_hf_classifier():
    model = _tiny_bert()
    samples = _text_samples()
    x = torch.stack([s["input_ids"] for s in samples])
    y = torch.tensor([s["labels"] for s in samples])
    rep = prunekit.prune_data(samples, "grand", 0.5, model=model, batch_size=5)
    # reference: autograd of each sample's CE w.r.t. the classifier head (the last Linear)
    want = []
    for i in range(len(samples)):
        model.zero_grad()
        loss = F.cross_entropy(model(input_ids=x[i : i + 1]).logits, y[i : i + 1])
        gw, gb = torch.autograd.grad(loss, [model.classifier.weight, model.classifier.bias])
        want.append(torch.cat([gb, gw.flatten()]).norm())
    torch.testing.assert_close(rep.scores.float(), torch.stack(want).detach(), rtol=1e-4, atol=1e-6)
    assert rep.kept == 6 and rep.indices.tolist() == sorted(
        torch.stack(want).argsort(descending=True)[:6].tolist()
    )
    # EL2N from the model equals EL2N from its precomputed logits
    with torch.no_grad():
        logits = model(input_ids=x).logits
    a = prunekit.prune_data(samples, "el2n", 4, model=model)
    b = prunekit.prune_data(samples, "el2n", 4, logits=logits, labels=y)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert a.indices.tolist() == b.indices.tolist()


def test_forgetting_tracker_in_a_trainer_counts_what_a_plain_loop_counts(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _tiny_bert()
    samples = _text_samples()
    tracker = ForgettingTracker(len(samples))
    seen = []  # the test's own record of every training forward: (indices, logits, labels)

    def pre(module, args, kwargs):  # registered before the tracker's, so it sees sample_index
        if module.training:
            seen.append([kwargs["sample_index"].clone()])

    def post(module, args, kwargs, out):
        assert "sample_index" not in kwargs  # the tracker's pre-hook took it out: the model never sees it
        if module.training:
            seen[-1] += [out.logits.detach().clone(), kwargs["labels"].clone()]

    h = [
        model.register_forward_pre_hook(pre, with_kwargs=True),
        model.register_forward_hook(post, with_kwargs=True),
    ]
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4,
                             learning_rate=5e-2, report_to="none", save_strategy="no", logging_strategy="no",
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=with_index(samples), callbacks=[tracker]).train()
    for x in h:
        x.remove()
    assert len(seen) == 9 and not tracker._handles  # 3 epochs x 3 batches; hooks removed at the end
    plain = ForgettingTracker(len(samples))
    for idx, logits, labels in seen:
        plain.update(idx, logits, labels)
    torch.testing.assert_close(tracker.counts(), plain.counts())
    assert tracker.seen.tolist() == [3] * 12
    # and the (epochs x N) matrix of the same predictions gives the same counts
    correct = torch.zeros(3, 12, dtype=torch.bool)
    for step, (idx, logits, labels) in enumerate(seen):
        correct[step // 3, idx] = logits.argmax(-1) == labels
    torch.testing.assert_close(tracker.counts(), forgetting_counts(correct))
    # a run that would drop the index column is refused
    bad = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        Trainer(model=model, args=bad, train_dataset=with_index(samples), callbacks=[tracker]).train()


def test_prune_data_and_the_index_column_on_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    samples = _text_samples()
    ds = datasets.Dataset.from_dict(
        {
            "input_ids": [s["input_ids"].tolist() for s in samples],
            "attention_mask": [s["attention_mask"].tolist() for s in samples],
            "label": [s["labels"] for s in samples],
            "text": [f"sample {i}" for i in range(len(samples))],  # a string column: not a model input
        }
    ).with_format("torch")
    model = _tiny_bert()
    rep = prunekit.prune_data(ds, "el2n", 0.25, model=model, batch_size=5)
    ref = prunekit.prune_data(samples, "el2n", 0.25, model=model)  # the same samples as a list of dicts
    torch.testing.assert_close(rep.scores, ref.scores)
    sub = rep.subset()
    assert isinstance(sub, datasets.Dataset)
    assert list(sub["text"]) == [f"sample {i}" for i in rep.indices.tolist()]
    bal = prunekit.prune_data(ds, "random_data", 0.5, balance=True, seed=2)  # labels read from the column
    counts = torch.bincount(torch.tensor([s["labels"] for s in samples]))
    assert bal.kept_per_class == {c: max(1, round(0.5 * int(n))) for c, n in enumerate(counts) if n}
    indexed = with_index(ds)
    assert [int(i) for i in indexed["sample_index"]] == list(range(12))
    with pytest.raises(ValueError, match="already has a column 'sample_index'"):
        with_index(indexed)


def _gather_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from prunekit.data.scores import _all_gather

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        idx = torch.arange(rank * 10, rank * 10 + 2 + rank)  # 2 on rank 0, 3 on rank 1
        ok = (idx % 2 == 0).long()
        got = _all_gather(idx, ok)
        torch.save([t.tolist() for t in got], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tracker_gather_over_two_processes(tmp_path):
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_gather_worker, args=(2, init, str(tmp_path / "out")), nprocs=2, join=True)
    want = [[0, 1, 10, 11, 12], [1, 0, 1, 0, 1]]  # rank order, uneven sizes
    assert torch.load(tmp_path / "out.0") == want and torch.load(tmp_path / "out.1") == want
