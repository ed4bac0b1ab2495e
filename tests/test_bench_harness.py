"""The lm-evaluation-harness adapter, offline, on a local multiple-choice task file: dense scores
equal one plain forward per (context, choice), and a token method is active during the eval."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed (pip install 'prunekit[lmeval]')")

DOCS = [
    {"question": "The capital of France is", "choices": ["Paris", "Berlin", "a small green frog"], "gold": 0},
    {"question": "Two plus two equals", "choices": ["four", "seven"], "gold": 0},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin", "Fahrenheit"], "gold": 0},
    {"question": "The opposite of hot is", "choices": ["warm", "cold"], "gold": 1},
    {"question": "A week has seven", "choices": ["days", "years", "planets and moons"], "gold": 0},
]


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A task YAML that reads a JSON-lines file next to it: nothing is downloaded."""
    d = tmp_path_factory.mktemp("lmeval_task")
    data = d / "docs.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    (d / "pk_local_mc.yaml").write_text(
        "task: pk_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return str(d)


def _evaluate(lm, include_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=lm, tasks=["pk_local_mc"], task_manager=TaskManager(include_path=include_path),
        log_samples=True, bootstrap_iters=0,
    )  # fmt: skip
    samples = sorted(out["samples"]["pk_local_mc"], key=lambda s: s["doc_id"])
    return out["results"]["pk_local_mc"]["acc,none"], [[r[0] for r in s["filtered_resps"]] for s in samples]


def _plain_logprob(model, tok, ctx: str, cont: str) -> float:
    c = tok(ctx, add_special_tokens=False).input_ids
    x = tok(cont, add_special_tokens=False).input_ids
    lp = model(torch.tensor([c + x])).logits[0, :-1].float().log_softmax(-1)[len(c) - 1 :]
    return lp.gather(-1, torch.tensor(x)[:, None]).sum().item()


def test_dense_eval_equals_a_plain_forward_per_choice(local_task):
    from prunekit.bench.harness import PrunedLM
    from prunekit.bench.models import load

    loaded = load("tiny-llama")
    model, tok = loaded.model, loaded.tokenizer
    acc, scores = _evaluate(PrunedLM(model, tok), local_task)
    with torch.inference_mode():
        ref = [[_plain_logprob(model, tok, d["question"], " " + c) for c in d["choices"]] for d in DOCS]
    for got, want in zip(scores, ref, strict=True):
        assert got == pytest.approx(want, abs=2e-4)
    hand = sum(int(torch.tensor(r).argmax()) == d["gold"] for r, d in zip(ref, DOCS, strict=True)) / len(DOCS)
    assert acc == pytest.approx(hand)


def test_a_token_method_is_active_during_the_eval(local_task):
    from prunekit.bench.harness import PrunedLM
    from prunekit.bench.models import load
    from prunekit.bench.tasks.base import NotApplicableError

    loaded = load("tiny-llama")
    model, tok = loaded.model, loaded.tokenizer
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = _evaluate(PrunedLM(model, tok), local_task)[1]
    lm = PrunedLM(model, tok, "fastv", keep=0.5, layer=1)
    pruned = _evaluate(lm, local_task)[1]
    assert lm.sessions and all(0 < s.kept_fraction < 1 for s in lm.sessions)
    flat = lambda xs: [g for doc in xs for g in doc]  # noqa: E731
    assert flat(pruned) != pytest.approx(flat(dense), abs=1e-4)  # later layers saw fewer tokens
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # model restored
    assert _evaluate(PrunedLM(model, tok), local_task)[1] == dense
    with pytest.raises(NotApplicableError, match="every position"):
        lm.loglikelihood_rolling([])
