"""Budgets, the registry and the command line."""

from __future__ import annotations

import json
import math
import re

import pytest

import prunekit
from prunekit.cli import main
from prunekit.errors import UnknownMethodError


@pytest.mark.parametrize("bad", [0, -1, 0.0, -0.5, 1.5, math.nan, True, "half", None])
def test_bad_budgets_name_the_range_and_the_value(bad):
    with pytest.raises(ValueError) as e:
        prunekit.validate_keep(bad)
    msg = str(e.value)
    assert "keep" in msg and (repr(bad) in msg or str(bad) in msg)
    assert ">= 1" in msg or "(0, 1]" in msg


@pytest.mark.parametrize(
    ("keep", "n", "expected"),
    [
        (64, 576, 64),  # a count
        (1000, 576, 576),  # a count is capped at the candidates
        (0.5, 576, 288),
        (0.111, 576, 64),  # 63.936 -> 64
        (0.25, 10, 2),  # 2.5 -> 2: Python's round (banker's), as the official FastV-HF/DivPrune code
        (0.35, 10, 4),  # 3.5 -> 4
        (0.01, 10, 1),  # never 0 kept
        (1.0, 7, 7),
        (3, 0, 0),
    ],
)
def test_resolve_keep_hand_worked(keep, n, expected):
    assert prunekit.resolve_keep(keep, n) == expected


def test_registry_rows_have_every_field():
    rows = prunekit.methods()
    names = {m.name for m in rows}
    assert {"fastv", "fastervlm", "divprune", "tome", "random"} <= names
    for m in rows:
        r = m.row()
        assert set(r) == {"name", "family", "paper", "stages", "signals", "trains"}
        assert r["paper"] and r["stages"] and isinstance(r["trains"], bool)
        if m.family == "tokens":
            assert set(r["stages"]) <= {"vision", "llm", "encoder"}
        elif m.family == "kv":  # when the cache is edited
            assert set(r["stages"]) <= {"prefill", "after-prefill", "decode"}
        elif m.family == "decode":  # draft trees: while decoding
            assert r["stages"] == ["decode"]
        elif m.family == "training":  # methods that train: when, relative to the model's training
            assert len(r["stages"]) == 1 and m.trains
            assert r["stages"][0] in {"before-training", "during-training", "fine-tuning", "after-training"}
        elif m.family == "data":  # training-data pruning: when, relative to the training it prunes for
            assert len(r["stages"]) == 1
            assert r["stages"][0] in {"before-training", "during-training", "fine-tuning", "after-training"}
        else:  # weights: one-shot, on a trained model
            assert m.family == "weights" and r["stages"] == ["after-training"]
    assert {m.name for m in prunekit.methods(family="weights")} >= {
        "magnitude",
        "wanda",
        "sparsegpt",
        "gblm",
        "owl",
    }


def test_unknown_method_lists_close_matches():
    with pytest.raises(UnknownMethodError) as e:
        prunekit.registry.get("fastvv")
    assert "'fastv'" in str(e.value) and "Known methods" in str(e.value)
    assert prunekit.registry.get("FastV").name == "fastv"


def test_unknown_names_are_matched_within_the_family_the_call_takes():
    from prunekit.registry import instantiate

    with pytest.raises(UnknownMethodError) as e:
        instantiate("wandaa", "weights", {}, "prune_weights")
    msg = str(e.value)
    weights = [m.name for m in prunekit.methods("weights")]
    assert msg.startswith("unknown weights method 'wandaa'. Did you mean 'wanda'")
    assert "'random'" not in msg and f"Known weights methods: {', '.join(weights)}." in msg  # a token method
    with pytest.raises(UnknownMethodError) as e:
        prunekit.registry.get("fastvv", "kv")  # the token method is not offered for a kv call
    assert "'fastv'" not in str(e.value) and "Known kv methods: " in str(e.value)
    expected = rf"'fastv' is a tokens method; prune_weights takes weights methods: {', '.join(weights)}$"
    with pytest.raises(ValueError, match=expected):
        instantiate("fastv", "weights", {}, "prune_weights")
    with pytest.raises(UnknownMethodError, match="Did you mean 'el2n'") as e:
        prunekit.registry.get("el2m", "data")
    assert "'fastv'" not in str(e.value) and "Known data methods: " in str(e.value)


def test_cli_prune_suggests_weight_methods_before_loading_anything(capsys):
    assert main(["prune", "no-such-model", "--method", "wandaa", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert "unknown weights method 'wandaa'. Did you mean 'wanda'" in err and "'random'" not in err


def _methods_table(capsys, *argv):
    assert main(["methods", *argv]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = out[2 : out.index("")]  # header, rule, rows, blank line, hint
    return out, {line.split()[0]: line.split()[1:] for line in rows}


def test_cli_methods_table_and_json(capsys):
    out, rows = _methods_table(capsys)
    assert out[0].split() == ["name", "family", "stages", "trains", "paper"]
    assert {m.name for m in prunekit.methods()} == set(rows)
    for m in prunekit.methods():
        assert rows[m.name][:3] == [m.family, ",".join(m.stages), "yes" if m.trains else "no"]
    assert main(["methods", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"] for r in lines} == set(rows)


@pytest.mark.parametrize(
    "argv", [[], ["--matrix"], ["--family", "kv"], ["--stage", "llm"], ["--family", "data"]]
)
def test_cli_methods_fits_100_columns_and_wide_shows_everything(capsys, argv):
    assert main(["methods", *argv]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out and max(len(line) for line in out) <= 100
    if argv:
        return
    assert any(line.endswith("…") for line in out)  # long titles are cut...
    assert main(["methods", "--wide"]) == 0
    wide = capsys.readouterr().out
    for m in prunekit.methods():  # ...and --wide shows them in full, with the signals
        assert m.paper in wide and ",".join(m.signals) in wide


@pytest.mark.parametrize("family", ["tokens", "kv", "weights", "data"])
def test_cli_methods_family_filter(capsys, family):
    _, rows = _methods_table(capsys, "--family", family)
    assert set(rows) == {m.name for m in prunekit.registry._REGISTRY.values() if m.family == family}


@pytest.mark.parametrize("stage", ["vision", "llm", "encoder", "decode", "after-training"])
def test_cli_methods_stage_filter(capsys, stage):
    _, rows = _methods_table(capsys, "--stage", stage)
    assert set(rows) == {m.name for m in prunekit.registry._REGISTRY.values() if stage in m.stages}
    for family in ("tokens", "kv"):  # both filters: the methods of the family at that stage
        want = {
            m.name for m in prunekit.registry._REGISTRY.values() if stage in m.stages and m.family == family
        }
        if want:
            assert set(_methods_table(capsys, "--family", family, "--stage", stage)[1]) == want


@pytest.mark.parametrize("family", ["empty"])
def test_cli_methods_of_an_empty_family_say_so(capsys, monkeypatch, family):
    monkeypatch.setattr(prunekit.registry, "FAMILIES", (*prunekit.registry.FAMILIES, family))
    assert main(["methods", "--family", family]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"no {family} methods yet") and "name  " not in out and "---" not in out
    assert main(["methods", "--stage", "nowhere"]) == 2
    assert "unknown stage 'nowhere'; allowed: [" in capsys.readouterr().err


def test_cli_info_lists_every_option_with_its_default(capsys):
    import dataclasses

    for m in prunekit.methods():
        assert main(["info", m.name]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{m.name}: a {m.family} method") and m.summary.split()[0] in out
        table = out.split("\n  option")[1].splitlines()[2:]  # after the header and the rule
        opts = {line.split()[0]: line.split()[1:] for line in table if line.startswith("  ")}
        fields = [f for f in dataclasses.fields(m.factory) if f.init]
        assert list(opts) == [f.name for f in fields], m.name
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert " ".join(opts[f.name]).startswith(repr(default)), (m.name, f.name)
    assert main(["info", "fastv"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\n  layer +2 +int\n", out)  # FastV's K = 2, the paper's default
    assert "signals  last_token_attention@llm-layer K-1" in out and "stages   llm" in out


def test_cli_info_and_errors_exit_2_with_a_message(capsys):
    assert main(["info", "divprune", "--full"]) == 0
    out = capsys.readouterr().out
    assert "Max–Min Diversity" in out and "vision, encoder" in out
    assert main(["info", "tomee"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method 'tomee'") and "'tome'" in err
    assert main(["methods", "--family", "bogus"]) == 2
    assert "allowed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_cli_methods_matrix(capsys):
    assert main(["methods", "--matrix", "--wide"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["method", "llava", "llava_next"]
    rows = {line.split()[0]: line.split()[1:] for line in out[2 : out.index("")]}
    assert set(rows) == {m.name for m in prunekit.methods("tokens")}
    assert rows["fastervlm"][:4] == ["vision", "vision", "-", "-"]  # Qwen2-VL's tower has no [CLS]
    assert main(["methods", "--matrix", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {r["name"]: r["support"] for r in lines}
    assert by_name["fastv"]["decoder (Llama/Qwen2/Mistral)"] == "llm"
    assert by_name["hiprune"]["qwen2_vl"] == "vision"  # merged-token maps
    assert by_name["holitom"]["llava_next"] is None  # per-crop maps, and HoliTom groups by sample

    assert main(["methods", "--matrix"]) == 0  # 100 columns: two-line headers, three-letter cells
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["method", "llava", "next"]
    assert {line.split()[0]: line.split()[1:] for line in out[3 : out.index("")]}["fastervlm"][:4] == [
        "vis", "vis", "-", "-"
    ]  # fmt: skip


def test_readme_lists_every_method():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [m.name for m in prunekit.methods() if f"| `{m.name}` |" not in readme]
    assert not missing, f"methods missing from the README's table: {missing}"
