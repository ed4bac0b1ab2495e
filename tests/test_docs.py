"""The generated documentation: README's methods table is current, every method has a page with all
its options, and every method is placed in the taxonomy. (`make docs` builds the site with
`mkdocs build --strict`, which fails on a broken link or a page missing from the nav.)"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import docgen  # noqa: E402

import prunekit  # noqa: E402
from prunekit.registry import MethodInfo, get  # noqa: E402


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    """Rows of the markdown table whose header starts with ``| first_header |``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_readme_methods_table_is_current():
    text = (ROOT / "README.md").read_text()
    region = text.split(docgen.BEGIN, 1)[1].split(docgen.END, 1)[0]
    rows = {r[0].strip("`"): r for r in _table_rows(region, "name")}
    want = {m.name: m for m in prunekit.methods()}
    assert set(rows) == set(want), (
        f"README's table is stale: missing {sorted(set(want) - set(rows))}, extra "
        f"{sorted(set(rows) - set(want))}; run `python scripts/docgen.py`"
    )
    for name, m in want.items():
        assert rows[name][1] == m.family and rows[name][2] == ", ".join(m.stages), name
    assert docgen.readme_with_table(text) == text, "README's table is stale: run `python scripts/docgen.py`"


def test_every_method_is_placed_in_the_taxonomy():
    page = docgen.taxonomy_page()
    rows = {re.search(r"`(\w+)`", r[0]).group(1): r for r in _table_rows(page, "method")}
    assert set(rows) == {m.name for m in prunekit.methods()}
    for name, (_, which, speedup, when, how) in rows.items():
        assert which and speedup and when and how, name
    # hand-checked placements
    assert rows["fastv"][4] == "attention" and rows["fastv"][1] == "tokens: in the LLM"
    assert rows["divprune"][4] == "similarity / diversity"
    assert rows["random"][4] == "none: random (baseline)"
    assert rows["atp_llava"][4].startswith("learned")
    assert rows["magnitude"][4] == "magnitude" and rows["magnitude"][2].startswith("specific")
    assert "saliency" in rows["sparsegpt"][4] and "run time" in rows["snapkv"][3]
    assert rows["wanda"][3].startswith("after training") and rows["tome"][2].startswith("universal")
    assert "prefill" in rows["lazyllm"][2] and "prefill" not in rows["h2o"][2]
    when = page.split("## When", 1)[1].split("## How", 1)[0]
    run_time = when.split("**Run time**", 1)[1].split("\n")[0]
    assert "`fastv`" in run_time and "`snapkv`" in run_time and "`wanda`" not in run_time


def test_a_family_without_a_taxonomy_rule_fails():
    fake = MethodInfo("x", "sampling", "p", ("decode",), (), False, object)
    with pytest.raises(ValueError, match="no taxonomy rule for family 'sampling'"):
        docgen.placement(fake)


@pytest.mark.parametrize("info", prunekit.methods(), ids=lambda m: m.name)
def test_method_page_lists_every_option(info):
    page = docgen.method_page(info)
    assert page.startswith(f"# `{info.name}`") and info.paper in page
    fields = [f.name for f in dataclasses.fields(info.factory) if f.init and not f.name.startswith("_")]
    options = {r[0].strip("`"): r for r in _table_rows(page, "option")} if fields else {}
    assert list(options) == fields


def test_method_page_details_hand_checked():
    fastv = docgen.method_page(get("fastv"))
    opts = {r[0].strip("`"): r for r in _table_rows(fastv, "option")}
    assert opts["layer"][1] == "`2`" and "decoder layer K" in opts["layer"][3]
    official = fastv.split("## Against the official code", 1)[1].split("## Where", 1)[0]
    assert "batch row 0" in official
    assert "[bench result `vlm_methods`](../results/vlm_methods.md)" in fastv
    sparsegpt = {r[0].strip("`"): r for r in _table_rows(docgen.method_page(get("sparsegpt")), "option")}
    assert sparsegpt["blocksize"][1] == "`128`" and sparsegpt["allocation"][1] == "`'uniform'`"


def test_departures_pick_paragraphs_and_bullets():
    doc = "Intro.\n\n- follows the paper\n- unlike the official code, X\n\nOurs: a choice of ours.\n\nEnd."
    assert docgen.departures(doc) == ["unlike the official code, X", "Ours: a choice of ours."]
