"""Static data-pruning scores on causal LMs (answer tokens only), and ``prune_data`` feeding a real
transformers ``Trainer`` with the Q-Tuning collator and the forgetting tracker, on a tiny Llama.
References are hand-worked cases or independent per-sample computations (unpadded forwards, autograd)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit.data import scores as S
from prunekit.data.qtuning import QTuningCallback, QTuningCollator
from tiny import pad_answers

V = 64


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _pairs(n=12, seed=0):
    """Prompt -> answer samples of different lengths; labels -100 on the prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, a = int(rng.integers(3, 8)), int(rng.integers(1, 6))
        ids = rng.integers(1, V, size=p + a).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def _one(model, sample):
    """Unpadded forward of one sample: (logits (T, V) predicting positions 1.., the answer labels,
    the lm_head inputs (T, D)), only at the positions that predict answer tokens."""
    ids = torch.tensor([sample["input_ids"]])
    lab = torch.tensor(sample["labels"])
    seen = {}
    h = model.lm_head.register_forward_hook(lambda m, a, o: seen.update(e=a[0]))
    with torch.no_grad():
        z = model(input_ids=ids).logits[0]
    h.remove()
    keep = lab[1:] != -100
    return z[:-1][keep], lab[1:][keep], seen["e"][0][:-1][keep]


# ------------------------------------------------------------------ hand-worked cases
def test_sequence_el2n_and_entropy_hand_worked():
    # answer positions 1 and 2: predicted by z0 = [0, 0] (p = .5/.5, y = 0) and z1 = [ln 3, 0]
    # (p = .75/.25, y = 1); position 0 has no predicting logit, position 3 is padding
    z = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0], [1.0, 2.0]]])
    y = torch.tensor([[-100, 0, 1, -100]])
    e1, e2 = math.sqrt(0.5), math.sqrt(2 * 0.75**2)
    assert S.el2n_from_logits(z, y).item() == pytest.approx((e1 + e2) / 2, rel=1e-6)
    h1 = math.log(2.0)
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert S.entropy_from_logits(z, y).item() == pytest.approx((h1 + h2) / 2, rel=1e-6)


def test_sequence_grand_hand_worked():
    # one answer token: the classification formula ‖g‖·sqrt(1 + ‖e‖²); two: (1/2)·‖Σ g_t ⊗ [1, e_t]‖
    z = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    e = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [9.0, 9.0]]])
    g0, g1 = torch.tensor([-0.5, 0.5]), torch.tensor([0.75, -0.75])
    one = torch.tensor([[-100, 0, -100]])
    assert S.grand_from_logits(z, one, e).item() == pytest.approx(g0.norm().item() * math.sqrt(2.0))
    two = torch.tensor([[-100, 0, 1]])
    gb = (g0 + g1) / 2  # bias gradient
    gw = (torch.outer(g0, e[0, 0]) + torch.outer(g1, e[0, 1])) / 2
    want = math.sqrt(gb.pow(2).sum().item() + gw.pow(2).sum().item())
    assert S.grand_from_logits(z, two, e).item() == pytest.approx(want, rel=1e-6)


def test_sequence_correct_is_all_answer_tokens():
    z = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [0.0, 2.0]], [[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]])
    y = torch.tensor([[-100, 0, 1], [-100, 0, 1]])  # row 0: both right; row 1: the second wrong
    assert S.correct_from_logits(z, y).tolist() == [True, False]
    assert S.correct_from_logits(z, torch.tensor([[-100, 0, -100], [-100, 0, -100]])).tolist() == [True, True]


# ------------------------------------------------------------------ against per-sample references
def test_prune_data_scores_match_unpadded_per_sample_references():
    model = _tiny_llama()
    data = _pairs(10)
    got = {m: prunekit.prune_data(data, m, keep=0.5, model=model, collate_fn=pad_answers, batch_size=4).scores
           for m in ("el2n", "entropy", "grand")}  # fmt: skip
    for i, s in enumerate(data):
        z, y, _ = _one(model, s)
        p = z.softmax(-1)
        el2n = (p - F.one_hot(y, V)).norm(dim=-1).mean()
        ent = -(p * p.log()).sum(-1).mean()
        assert got["el2n"][i].item() == pytest.approx(el2n.item(), rel=1e-4)
        assert got["entropy"][i].item() == pytest.approx(ent.item(), rel=1e-4)


def test_sequence_grand_matches_autograd_on_the_lm_head():
    model = _tiny_llama()
    data = _pairs(6, seed=3)
    got = prunekit.prune_data(data, "grand", keep=3, model=model, collate_fn=pad_answers, batch_size=3).scores
    W = model.lm_head.weight
    for i, s in enumerate(data):
        _, y, e = _one(model, s)
        w = W.detach().clone().requires_grad_(True)
        b = torch.zeros(V, requires_grad=True)
        loss = F.cross_entropy(e @ w.T + b, y)  # the sample's mean answer-token loss
        gw, gb = torch.autograd.grad(loss, (w, b))
        want = torch.sqrt(gw.pow(2).sum() + gb.pow(2).sum())
        assert got[i].item() == pytest.approx(want.item(), rel=1e-4)


def test_el2n_keeps_the_highest_and_is_reproducible():
    model = _tiny_llama()
    data = _pairs(12)
    r1 = prunekit.prune_data(data, "el2n", keep=0.25, model=model, collate_fn=pad_answers)
    r2 = prunekit.prune_data(data, "el2n", keep=0.25, model=model, collate_fn=pad_answers, batch_size=5)
    assert torch.equal(r1.indices, r2.indices) and r1.kept == 3
    assert set(r1.indices.tolist()) == set(torch.topk(r1.scores, 3).indices.tolist())
    assert r1.kept_per_class is None  # token labels are not classes
    assert [d["input_ids"] for d in r1.subset()] == [data[i]["input_ids"] for i in r1.indices.tolist()]


def _greedy_pairs(model, n=8, seed=0):
    """Samples whose answers are ``model``'s own greedy continuation (every answer token its argmax)
    for even indices, random answers for odd ones."""
    out = []
    for i, s in enumerate(_pairs(n, seed)):
        p = s["labels"].count(-100)
        ids = s["input_ids"][:p]
        for _ in range(len(s["input_ids"]) - p):
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids = [*ids, nxt]
        if i % 2:
            ids = s["input_ids"]
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def test_forgetting_from_lm_checkpoints():
    a, b = _tiny_llama(0), _tiny_llama(1)
    data = _greedy_pairs(a)
    rep = prunekit.prune_data(data, "forgetting", keep=4, model=[a, b, a], collate_fn=pad_answers)

    def exact(m, sample):  # every answer token is the argmax, from an unpadded forward
        z, y, _ = _one(m, sample)
        return bool((z.argmax(-1) == y).all())

    rows = [[exact(m, s) for s in data] for m in (a, b, a)]
    assert all(rows[0][0::2]) and not any(rows[1][0::2])  # learned, forgotten under b, relearned
    want = S.forgetting_counts(torch.tensor(rows))
    assert want[0::2].tolist() == [1.0] * 4
    assert torch.equal(rep.scores, want.double())


# ------------------------------------------------------------------ errors
def test_sample_without_answer_tokens_is_named():
    data = _pairs(6)
    data[4] = {"input_ids": data[4]["input_ids"], "labels": [-100] * len(data[4]["input_ids"])}
    with pytest.raises(ValueError, match=r"samples \[4\] have no answer token"):
        prunekit.prune_data(data, "el2n", keep=0.5, model=_tiny_llama(), collate_fn=pad_answers, batch_size=3)


def test_unpadded_token_samples_get_a_clear_error():
    data = [
        {"input_ids": torch.tensor(d["input_ids"]), "labels": torch.tensor(d["labels"])} for d in _pairs(4)
    ]
    ds = _ListDataset(data)  # default_collate cannot stack them
    with pytest.raises(ValueError, match=r"different lengths.*DataCollatorForSeq2Seq"):
        prunekit.prune_data(ds, "entropy", keep=0.5, model=_tiny_llama())


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_sequence_labels_out_of_range_and_missing():
    z = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError, match=r"label 7 is out of range; allowed: 0..3, or -100"):
        S.el2n_from_logits(z, torch.tensor([[-100, 7, 1]]))
    with pytest.raises(ValueError, match="need labels"):
        S._check(z, None)


# ------------------------------------------------------------------ in a real Trainer
def test_prune_data_then_qtuning_in_a_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _tiny_llama()
    data = _pairs(32)
    report = prunekit.prune_data(data, "el2n", keep=0.5, model=model, collate_fn=pad_answers)
    assert not model.training  # the scoring restored the model's mode
    kept = report.subset()
    assert len(kept) == 16
    coll = QTuningCollator(model, pad_answers, r_sample=0.5, r_token=0.5)
    before = model.lm_head.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=kept, data_collator=coll,
                      callbacks=[QTuningCallback(coll)])  # fmt: skip
    trainer.train()
    assert not torch.equal(model.lm_head.weight, before)
    assert coll.stats.batches >= 2
    logs = [h for h in trainer.state.log_history if "qtuning/grad_token_fraction" in h]
    assert logs and 0 < logs[-1]["qtuning/grad_token_fraction"] < 1


def test_forgetting_tracker_on_a_causal_lm_in_a_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _tiny_llama()
    data = _pairs(16)
    tracker = prunekit.data.ForgettingTracker(len(data))
    indexed = prunekit.data.with_index(data)

    def collate(features):
        out = pad_answers(features)
        out["sample_index"] = torch.tensor([f["sample_index"] for f in features])
        return out

    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
                             learning_rate=5e-2, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False, seed=0)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=indexed, data_collator=collate, callbacks=[tracker]).train()
    assert tracker.seen.tolist() == [2] * 16  # every sample presented once per epoch
    rep = prunekit.prune_data(data, "forgetting", keep=4, tracker=tracker)
    assert rep.kept == 4 and rep.scores.numel() == 16


def test_prune_data_and_qtuning_under_trl_sft_trainer(tmp_path):
    """TRL's SFTTrainer (a Trainer subclass): its tokenised prompt/completion dataset is scored and
    pruned, and a second SFTTrainer fine-tunes on the subset with the Q-Tuning collator over TRL's."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(V - 3)]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=wl, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    rng = np.random.default_rng(0)

    def text(n):
        return " ".join(f"w{int(i)}" for i in rng.integers(0, V - 3, size=n))

    rows = [(text(int(rng.integers(3, 8))), " " + text(int(rng.integers(2, 6)))) for _ in range(24)]
    ds = Dataset.from_list([{"prompt": p, "completion": c} for p, c in rows])
    model = _tiny_llama()
    model.config.eos_token_id = 1
    trl_collate = DataCollatorForLanguageModeling(pad_token_id=0)
    coll = QTuningCollator(model, trl_collate, r_sample=0.5, r_token=0.5)

    def args(d):
        return SFTConfig(output_dir=str(tmp_path / d), max_steps=2, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True,
                         save_strategy="no", disable_tqdm=True, seed=0)  # fmt: skip

    first = SFTTrainer(
        model=model, args=args("a"), train_dataset=ds, processing_class=tok, data_collator=coll
    )
    tokenised = first.train_dataset  # TRL's: input_ids, and labels -100 on the prompt
    rep = prunekit.prune_data(tokenised, "entropy", keep=0.5, model=model, collate_fn=trl_collate)
    kept = rep.subset()
    assert len(kept) == 12 and kept["input_ids"] == [tokenised[i]["input_ids"] for i in rep.indices.tolist()]
    trainer = SFTTrainer(model=model, args=args("b"), train_dataset=kept, processing_class=tok,
                         data_collator=coll, callbacks=[QTuningCallback(coll)])  # fmt: skip
    before = model.lm_head.weight.detach().clone()
    trainer.train()
    assert not torch.equal(model.lm_head.weight, before)
    logs = [h for h in trainer.state.log_history if "qtuning/grad_token_fraction" in h]
    assert (
        logs
        and 0 < logs[-1]["qtuning/grad_token_fraction"] < 1
        and logs[-1]["qtuning/sample_fraction"] == 0.5
    )
