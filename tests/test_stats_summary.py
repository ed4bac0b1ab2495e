"""``print(session.stats)`` is a short summary with the key numbers (issue 21, item 3): the full
record (every kept index) stays in the attributes."""

from __future__ import annotations

import torch

import prunekit
from tiny import DECODERS

L = 1001  # a long prompt: 1,000 candidates (all but the last token)


def prompt() -> torch.Tensor:
    return torch.randint(3, 250, (1, L), generator=torch.Generator().manual_seed(0))


def short(text: str, max_lines: int = 6) -> None:
    lines = text.splitlines()
    assert len(lines) <= max_lines and max(map(len, lines)) <= 120, text


def test_kv_stats_summary_is_short_and_has_the_counts():
    model = DECODERS["llama"]()  # 4 layers, 2 KV heads
    with torch.no_grad(), prunekit.compress_kv(model, "snapkv", keep=0.5) as s:
        model(prompt())
    text = str(s.stats)
    assert text == repr(s.stats)
    short(text)
    # by hand: 4 layers x 2 KV heads x 1001 tokens seen; int(0.5 * 1001) = 500 kept per head
    entries_in, kept = 4 * 2 * L, 4 * 2 * 500
    assert s.stats.entries_in == entries_in and s.stats.entries_kept == kept
    assert "snapkv" in text and f"{kept:,} of {entries_in:,} ({kept / entries_in:.1%}" in text
    assert "1,000 entries kept per layer" in text  # 2 heads x 500
    assert len(s.stats.kept[0]) == 4 and s.stats.kept[0][0][0].shape == (1, 2, 500)  # the full record


def test_lazy_and_weight_summaries_are_short():
    model = DECODERS["llama"]()
    with torch.no_grad(), prunekit.compress_kv(model, "lazyllm", keep=0.5) as s:
        model(prompt())
    short(str(s.stats))
    assert "lazyllm" in str(s.stats) and f"{s.stats.entries_in:,}" in str(s.stats)
    with prunekit.prune_weights(model, "magnitude", 0.5, progress=False) as pr:
        text = repr(pr.report)
    assert len(pr.report.linears) == 28 and "\n" not in text and len(text) < 300
    assert "73,728 of 147,456" in text  # half of the 28 Linears' weights


def test_token_stats_summary_is_short_and_has_the_counts():
    model = DECODERS["llama"]()
    with torch.no_grad(), prunekit.prune_tokens(model, "fastv", keep=500, layer=2) as s:
        model(prompt())
    text = str(s.stats)
    assert text == repr(s.stats)
    short(text)
    assert "fastv at stage llm, 1 selection" in text
    assert "500 of 1,000 (50.0%)" in text  # candidates
    assert "from layer 2: 501 of 1,001" in text  # the last token stays
    assert s.stats.kept_masks[0].shape == (1, L)
