"""Weight methods in the bench: a structured method (FLAP) and an unstructured one (Wanda) run as
treatments beside a token method on the same tasks, each on a pruned, finalized copy made once per
sweep; params kept is the true fraction of the dense model's Linear weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunekit.bench import bench, runner
from prunekit.bench.models import load
from prunekit.bench.treatments import Treatment

TINY = dict(limit=3, repeats=1)
PRUNABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_sizes(model: nn.Module) -> tuple[int, int]:
    """``(all Linear weights incl. lm_head, the decoder's q/k/v/o/gate/up/down weights)``."""
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    total = sum(m.weight.numel() for _, m in lins)
    prunable = sum(m.weight.numel() for n, m in lins if n.rsplit(".", 1)[-1] in PRUNABLE)
    return total, prunable


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    calls = []
    original = Treatment.pruned_copy

    def counting(self, loaded, seed=0):
        calls.append((self.method, self.keep))
        return original(self, loaded, seed)

    Treatment.pruned_copy = counting
    try:
        out = tmp_path_factory.mktemp("bench_weights")
        rows = bench(["tiny-llama"], ["arc_easy", "wikitext"], ["flap", "wanda", "fastv"], [0.7],
                     out=str(out), progress=False, **TINY)  # fmt: skip
        dense_model = runner._models[("tiny-llama", "auto", "cpu")].model
    finally:
        Treatment.pruned_copy = original
    return {(r["task"], r["method"]): r for r in rows}, calls, dense_model


def test_structured_treatment_runs_beside_a_token_method(swept):
    by, calls, dense_model = swept
    for task in ("arc_easy", "wikitext"):
        assert by[(task, "flap")]["status"] == "ok", by[(task, "flap")].get("reason")
        assert by[(task, "wanda")]["status"] == "ok", by[(task, "wanda")].get("reason")
    assert by[("arc_easy", "fastv")]["status"] == "ok"
    # pruned once per treatment for the whole sweep (two tasks)
    assert sorted(calls) == [("flap", 0.7), ("wanda", 0.7)]
    # the physically smaller copy is what was timed and counted: fewer FLOPs, a smaller KV cache
    # (FLAP removes KV heads); the unstructured copy keeps every shape
    flap, wanda = by[("arc_easy", "flap")], by[("arc_easy", "wanda")]
    assert flap["flops"]["prefill"] < flap["flops"]["dense_prefill"]
    assert flap["quality"]["kl"] > 0 and flap["tokens_kept"] == 1.0
    assert wanda["flops"]["ratio"] == pytest.approx(1.0)
    # the bench's own model is left dense
    assert all(torch.count_nonzero(m.weight) == m.weight.numel()
               for m in dense_model.modules() if isinstance(m, nn.Linear))  # fmt: skip


def test_params_kept_is_the_true_fraction(swept):
    by, _, _ = swept
    dense = load("tiny-llama").model
    total, prunable = linear_sizes(dense)
    # FLAP at keep 0.7: the surviving Linear weights, counted on an independently pruned copy's shapes
    flap_copy = Treatment("flap", 0.7).pruned_copy(load("tiny-llama"))
    kept_total, kept_prunable = linear_sizes(flap_copy.model)
    assert kept_total - kept_prunable == total - prunable  # lm_head untouched
    assert abs(1 - kept_prunable / prunable - 0.3) < 0.05  # ~30 % of the prunable weights removed
    for task in ("arc_easy", "wikitext"):
        assert by[(task, "flap")]["params_kept"] == pytest.approx(kept_total / total, abs=1e-12)
    # Wanda at keep 0.7: 30 % of every decoder Linear's weights zeroed (per output row, exactly)
    expected = 1 - 0.3 * prunable / total
    assert by[("arc_easy", "wanda")]["params_kept"] == pytest.approx(expected, abs=2e-4)
    assert by[("arc_easy", "fastv")]["params_kept"] == 1.0


def test_weight_treatment_budgets_and_options_are_checked():
    with pytest.raises(ValueError, match=r"float in \(0, 1\] \(sparsity = 1 - keep\); got 3"):
        Treatment("flap", 3).validate()
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['layer'\] for method 'flap'"):
        Treatment("flap", 0.8, {"layer": 2}).validate()
    Treatment("flap", 0.8, {"gqa": "query_slots", "n_samples": 4}).validate()
    Treatment("wanda", 0.5, {"pattern": "2:4"}).validate()
    assert Treatment("flap", 0.8).sparsity == pytest.approx(0.2)
