"""Sweeps: expansion, validation, the JSONL rows, resume, report and plots, the CLI, and the
same sweep on a local Ray instance (tiny random models with the real tokenizers)."""

from __future__ import annotations

import json

import pytest

from prunekit.bench import Sweep, bench, load_config, read_results, run_sweep, write_report
from prunekit.bench.spec import RunSpec
from prunekit.cli import main
from prunekit.errors import PrunekitError

TINY = dict(limit=3, repeats=1)


def test_runs_pair_models_with_tasks_of_their_kind_and_route_options():
    s = Sweep(models=["tiny-llama", "tiny-vit"], tasks=["arc_easy", "fashion"], methods=["fastv", "tome"],
              keep=[0.5, 0.25], options={"layer": 3})  # fmt: skip
    runs = s.runs()
    # (tiny-llama, arc_easy) and (tiny-vit, fashion): dense + 2 methods x 2 budgets each
    assert len(runs) == 2 * (1 + 2 * 2)
    assert {(r.model, r.task) for r in runs} == {("tiny-llama", "arc_easy"), ("tiny-vit", "fashion")}
    fastv = next(r for r in runs if r.method == "fastv")
    tome = next(r for r in runs if r.method == "tome")
    assert fastv.options == {"layer": 3} and tome.options == {}  # ToMe has no cut layer
    assert len({r.key() for r in runs}) == len(runs)
    assert fastv.label == "fastv(layer=3)"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": ["arc_esay"]}, "did you mean 'arc_easy'"),
        ({"models": ["smollm3"]}, "unknown model 'smollm3'"),
        ({"methods": ["fastvv"]}, "fastv"),
        ({"keep": [1.5]}, "keep"),
        ({"options": {"nope": 1}}, "accepted by none"),
        ({"repeats": 0}, "repeats"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "int8"}, "dtype"),
        ({"tasks": ["fashion"]}, "no task"),
    ],
)
def test_bad_sweeps_are_refused_with_the_bad_value_named(change, message):
    base = dict(models=["tiny-llama"], tasks=["arc_easy"], methods=["fastv"], keep=[0.5])
    with pytest.raises((ValueError, PrunekitError), match=message):
        Sweep(**{**base, **change}).runs()


def test_yaml_config(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text(
        "models: tiny-llama\ntasks: [arc_easy]\n"
        "methods:\n  - fastv\n  - {name: random, options: {layer: 3}}\n"
        "keep: [0.5, 8]\nlimit: 3\n"
    )
    runs = load_config(str(f)).runs()
    assert [(r.method, r.keep, r.options) for r in runs] == [
        ("dense", 1.0, {}), ("fastv", 0.5, {}), ("fastv", 8, {}), ("random", 0.5, {"layer": 3}),
        ("random", 8, {"layer": 3}),
    ]  # fmt: skip
    (tmp_path / "bad.yaml").write_text("models: [tiny-llama]\ntaskz: [arc_easy]\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_config(str(tmp_path / "bad.yaml"))


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rows = bench(["tiny-llama", "tiny-vit"], ["arc_easy", "wikitext", "fashion"], ["random", "fastv"], [0.5],
                 out=str(out), progress=False, **TINY)  # fmt: skip
    return out, rows


def test_rows_carry_config_versions_and_every_measure(swept):
    out, rows = swept
    lines = read_results(out / "results.jsonl")
    by = {(r["model"], r["task"], r["method"]): r for r in lines}
    r = by[("tiny-llama", "arc_easy", "fastv")]
    assert r["status"] == "ok" and r["config"].startswith("RunSpec(")
    assert {"prunekit", "torch", "transformers", "python", "device_name", "threads"} <= set(r["env"])
    assert {"acc", "acc_norm", "kl", "top1_agree"} <= set(r["quality"])
    assert 0.4 < r["tokens_kept"] < 0.7 and r["params_kept"] == 1.0
    lat, mem = r["latency"], r["memory"]
    assert lat["prefill_s"] > 0 and lat["dense_prefill_s"] > 0 and lat["select_s"] > 0
    assert lat["decode_tps"] > 0 and lat["dense_decode_tps"] > 0
    assert 0 < mem["kv_bytes"] < mem["dense_kv_bytes"]  # layers from K on cache the kept tokens only
    assert r["flops"]["prefill"] < r["flops"]["dense_prefill"]
    dense = by[("tiny-llama", "arc_easy", "dense")]
    assert dense["quality"]["kl"] == 0 and dense["retention"] == 1.0
    assert by[("tiny-vit", "fashion", "random")]["quality"]["cosine"] < 1.0
    # perplexity cannot measure a prompt-token method: recorded as not applicable, with the reason
    na = by[("tiny-llama", "wikitext", "random")]
    assert na["status"] == "n/a" and "perplexity" in na["reason"]
    # fastv does not run on a ViT: n/a, naming the stage
    assert "stages" in by[("tiny-vit", "fashion", "fastv")]["reason"]
    assert all(x["status"] == "ok" for x in rows)


def test_report_has_a_table_per_task_and_plots(swept):
    out, _ = swept
    text = (out / "report.md").read_text()
    for head in (
        "## tiny-llama · arc_easy",
        "## tiny-llama · wikitext",
        "## tiny-vit · fashion",
        "## Not run",
    ):
        assert head in text
    assert "| fastv | 0.5 |" in text
    pngs = sorted(p.name for p in out.glob("pareto_*.png"))
    assert pngs == [
        "pareto_tiny-llama_arc_easy.png",
        "pareto_tiny-llama_wikitext.png",
        "pareto_tiny-vit_fashion.png",
    ]
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_resume_skips_finished_runs_and_retries_errors(tmp_path):
    specs = [RunSpec("tiny-llama", "arc_easy", m, 0.5, limit=2, repeats=1) for m in ("dense", "random")]
    results = tmp_path / "r.jsonl"
    assert len(run_sweep(specs, results, progress=False)) == 2
    assert run_sweep(specs, results, progress=False) == []
    rows = read_results(results)
    rows[1]["status"] = "error"
    results.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"key": "trunc')  # killed mid-write
    again = run_sweep(specs, results, progress=False)
    assert [r["method"] for r in again] == ["random"]


def test_cli_bench_writes_results_report_and_plot(tmp_path, capsys):
    code = main(
        [
            "bench",
            "--model",
            "tiny-llama",
            "--task",
            "arc_easy",
            "--methods",
            "random",
            "--keep",
            "0.5,4",
            "--limit",
            "2",
            "--repeats",
            "1",
            "--option",
            "layer=3",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "| random(layer=3) | 4 |" in out and f"report:  {tmp_path / 'report.md'}" in out
    assert (tmp_path / "pareto_tiny-llama_arc_easy.png").exists()
    assert main(["bench", "--model", "tiny-llama", "--task", "arc_esay", "--out", str(tmp_path)]) == 2
    assert "did you mean 'arc_easy'" in capsys.readouterr().err
    assert main(["bench", "--list"]) == 0
    assert "needle-8k" in capsys.readouterr().out


def test_the_same_sweep_on_a_local_ray_instance(tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'prunekit[ray]')")
    specs = [RunSpec("tiny-llama", "arc_easy", m, 0.5, limit=2, repeats=1) for m in ("dense", "random")]
    local = run_sweep(specs, tmp_path / "local.jsonl", progress=False)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        remote = run_sweep(specs, tmp_path / "ray.jsonl", ray_address="local", progress=False)
        assert run_sweep(specs, tmp_path / "ray.jsonl", ray_address="local", progress=False) == []  # resume
    finally:
        ray.shutdown()
    key = lambda r: r["key"]  # noqa: E731
    assert [r["key"] for r in sorted(remote, key=key)] == [r["key"] for r in sorted(local, key=key)]
    for a, b in zip(sorted(local, key=key), sorted(remote, key=key), strict=True):
        assert b["status"] == "ok" and b["quality"] == pytest.approx(a["quality"], abs=1e-5)
    assert write_report(tmp_path / "ray.jsonl").exists()


# ------------------------------------------------------------------ small runs stay small
@pytest.mark.parametrize(
    ("limit", "expected"), [(None, 5), (100, 5), (50, 5), (49, 4), (20, 2), (4, 1), (1, 1)]
)
def test_repeats_default_to_five_and_shrink_with_a_small_limit(limit, expected):
    from prunekit.bench.spec import auto_repeats

    assert auto_repeats(limit) == expected
    runs = Sweep(models=["tiny-llama"], tasks=["arc_easy"], methods=["random"], limit=limit).runs()
    assert {r.repeats for r in runs} == {expected}
    given = Sweep(
        models=["tiny-llama"], tasks=["arc_easy"], methods=["random"], limit=limit, repeats=3
    ).runs()
    assert {r.repeats for r in given} == {3}  # a number the user gives is kept


def test_per_task_limits_set_per_task_repeats():
    runs = Sweep(models=["tiny-llama"], tasks=["arc_easy", "wikitext"], limits={"arc_easy": 4}).runs()
    assert {(r.task, r.limit, r.repeats) for r in runs} == {("arc_easy", 4, 1), ("wikitext", None, 5)}


def test_the_lm_timing_batch_is_capped_by_the_limit():
    from contextlib import nullcontext

    from prunekit.bench.models import load
    from prunekit.bench.tasks import make_task

    loaded = load("tiny-llama")
    for limit, batch in ((2, 2), (100, 8)):  # arc_easy: 4 choices a question, so 8 pairs from 2+ questions
        task = make_task("arc_easy", limit=limit)
        task.prepare(loaded)
        out = task.timing(loaded)["prefill"](nullcontext)
        assert out.logits.shape[0] == batch == task.timed_batch


def _captured_sweep(monkeypatch, tmp_path, argv):
    import prunekit.bench as B

    seen = []

    def fake_report(results, out):
        (out / "report.md").write_text("report\n")
        return out / "report.md"

    monkeypatch.setattr(B, "run_sweep", lambda specs, results, ray_address=None: seen.extend(specs) or [])
    monkeypatch.setattr(B, "write_report", fake_report)
    tmp_path.mkdir(exist_ok=True)
    assert main([*argv, "--out", str(tmp_path)]) == 0
    return seen


def test_cli_limit_caps_the_repeats_unless_given(monkeypatch, tmp_path):
    base = ["bench", "--model", "tiny-llama", "--task", "arc_easy", "--methods", "random"]
    assert {s.repeats for s in _captured_sweep(monkeypatch, tmp_path, [*base, "--limit", "4"])} == {1}
    assert {s.repeats for s in _captured_sweep(monkeypatch, tmp_path, base)} == {5}
    given = _captured_sweep(monkeypatch, tmp_path, [*base, "--limit", "4", "--repeats", "3"])
    assert {s.repeats for s in given} == {3}


def test_demo_takes_a_limit(monkeypatch, tmp_path):
    from prunekit.bench import DEFAULT

    specs = _captured_sweep(monkeypatch, tmp_path, ["demo", "--limit", "4"])
    assert {s.model for s in specs} == set(DEFAULT.models) and len(specs) == len(DEFAULT.runs())
    assert {(s.limit, s.repeats) for s in specs} == {(4, 1)}  # the default sweep's 3 repeats capped too
    specs = _captured_sweep(monkeypatch, tmp_path, ["demo"])
    assert {s.repeats for s in specs} == {3} and {s.limit for s in specs} == {100, 256, None}
