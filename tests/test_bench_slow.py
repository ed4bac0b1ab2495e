"""The README's main job on the real packaged models, at small limits (slow: a few minutes)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_default_bench_on_real_models_writes_rows_report_and_plots(tmp_path):
    from prunekit.bench import Sweep, bench, read_results

    sweep = Sweep(
        models=["smollm2", "dinov2-s", "minilm"],
        tasks=["arc_easy", "fashion", "sst2"],
        methods=["fastv", "random", "tome"],
        keep=[0.25],
        limits={"arc_easy": 40, "fashion": 128, "sst2": 128},
        repeats=1,
    )
    bench(config=sweep, out=str(tmp_path), progress=False)
    rows = read_results(tmp_path / "results.jsonl")
    assert not [r for r in rows if r["status"] == "error"], [r.get("reason") for r in rows]
    ok = {(r["model"], r["method"]): r for r in rows if r["status"] == "ok"}
    # real models: dense quality far above chance (ARC-e: 4 choices; Fashion-MNIST: 10 classes)
    assert ok[("smollm2", "dense")]["quality"]["acc"] > 0.4
    assert ok[("dinov2-s", "dense")]["quality"]["probe_acc"] > 0.7
    # informed selection beats random at the same budget, on the agreement with dense
    assert ok[("smollm2", "fastv")]["quality"]["kl"] < ok[("smollm2", "random")]["quality"]["kl"]
    assert ok[("dinov2-s", "tome")]["quality"]["cosine"] > ok[("dinov2-s", "random")]["quality"]["cosine"]
    # ToMe refuses the post-norm BERT blocks: recorded as n/a with the reason, not as an error
    na = {(r["model"], r["method"]): r for r in rows if r["status"] == "n/a"}
    assert "post-norm" in na[("minilm", "tome")]["reason"] and ("minilm", "random") in ok
    # FastV at 25 %: fewer FLOPs and a smaller KV cache than dense
    f = ok[("smollm2", "fastv")]
    assert f["flops"]["ratio"] < 0.8 and f["memory"]["kv_bytes"] < f["memory"]["dense_kv_bytes"]
    text = (tmp_path / "report.md").read_text()
    assert "## smollm2 · arc_easy" in text and "## dinov2-s · fashion" in text
    for name in ("smollm2_arc_easy", "dinov2-s_fashion", "minilm_sst2"):
        assert (tmp_path / f"pareto_{name}.png").exists()
