"""Budgets, the registry and the command line."""

from __future__ import annotations

import json
import math

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


def test_cli_methods_table_and_json(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "family", "stages"]
    body = {line.split()[0] for line in out[2:]}
    assert {m.name for m in prunekit.methods()} == body
    assert main(["methods", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"] for r in rows} == body


def test_cli_info_and_errors_exit_2_with_a_message(capsys):
    assert main(["info", "divprune"]) == 0
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
    assert main(["methods", "--matrix"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["method", "llava", "llava_next"]
    rows = {line.split()[0]: line.split()[1:] for line in out[2:] if line and not line.startswith("cells")}
    assert set(rows) == {m.name for m in prunekit.methods("tokens")}
    assert rows["fastervlm"][:4] == ["vision", "vision", "-", "-"]  # Qwen2-VL's tower has no [CLS]
    assert main(["methods", "--matrix", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {r["name"]: r["support"] for r in lines}
    assert by_name["fastv"]["decoder (Llama/Qwen2/Mistral)"] == "llm"
    assert by_name["hiprune"]["qwen2_vl"] == "vision"  # merged-token maps
    assert by_name["holitom"]["llava_next"] is None  # per-crop maps, and HoliTom groups by sample


def test_readme_lists_every_method():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [m.name for m in prunekit.methods() if f"| `{m.name}` |" not in readme]
    assert not missing, f"methods missing from the README's table: {missing}"
