"""The README's demo, end to end (slow: real models, ~1 minute once the features are cached)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_quick_run_writes_every_row(tmp_path, capsys):
    from prunekit.demo import run

    out = tmp_path / "demo.jsonl"
    rows = run(out=str(out), quick=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["model"], r["method"]) for r in lines} == {(r.model, r.method) for r in rows}
    assert not [r for r in rows if r.note.startswith("skipped")], "every method should run"
    by = {(r.model, r.method): r for r in rows}
    assert by[("SmolLM2-135M", "fastv")].quality["kl"] < by[("SmolLM2-135M", "random")].quality["kl"]
    assert by[("DINOv2-S", "tome")].quality["cls_cosine"] > by[("DINOv2-S", "random")].quality["cls_cosine"]
    assert "latency ratio" in capsys.readouterr().out
