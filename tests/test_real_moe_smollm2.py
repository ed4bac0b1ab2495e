"""Expert pruning on the real MoE built from packaged parts (``prunekit.zoo.smollm2_moe``): the issue's
"done when" command (``prunekit prune smollm2-moe --method stun --sparsity 0.4 --out DIR``) writes a
checkpoint that ``prunekit.load_pruned`` reloads with identical logits and that generates; and STUN's
expert choice keeps Wikipedia text better than random expert removal at the same count."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_real_structured_smollm2 import wiki_ppl

import prunekit
from prunekit.models.moe import moe_layers


@pytest.mark.slow  # a few minutes on 2 cores (the MoE is built once and cached; two prunings)
def test_cli_stun_checkpoint_reloads_generates_and_beats_random(tmp_path, capsys):
    from prunekit import zoo
    from prunekit.cli import main

    out = tmp_path / "stun"
    argv = ["prune", "smollm2-moe", "--method", "stun", "--sparsity", "0.4", "--out", str(out),
            "--samples", "8", "--seq-len", "256", "--dtype", "float32", "--json"]  # fmt: skip
    assert main(argv) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["actual_sparsity"] == pytest.approx(0.4, abs=0.01)
    assert line["experts_removed"] == pytest.approx(0.25, abs=0.01)
    stun = prunekit.load_pruned(out, dtype=torch.float32).eval()
    assert stun.config.prunekit["method"] == "stun"
    dense, tok = zoo.smollm2_moe(torch.float32)
    n_before = sum(m.num_experts for m in moe_layers(dense))
    assert sum(m.num_experts for m in moe_layers(stun)) == n_before - round(0.25 * n_before)

    tok.padding_side = "left"
    enc = tok(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    gen = stun.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (2, enc.input_ids.shape[1] + 8)

    # stage 1 alone against random removal of the same number of experts
    ids = torch.tensor(tok(prunekit.assets.book_text(), add_special_tokens=False).input_ids[: 8 * 256]).view(8, 256)
    p = {}
    for method, opts in (("stun", {"then": None}), ("expert_random", {})):
        with prunekit.prune_weights(dense, method, 0.25, calibration=ids, progress=False, **opts):
            p[method] = wiki_ppl(dense, tok)
    print(f"Wikipedia ppl, 25 % of experts removed: {p}")
    assert math.isfinite(p["stun"]) and p["stun"] < p["expert_random"]
