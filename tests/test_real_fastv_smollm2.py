"""FastV on the real packaged SmolLM2-135M (text prompts): it keeps the next-token distribution
closer to the dense model's than random dropping at the same budget."""

from __future__ import annotations

import pytest
import torch

import prunekit


@pytest.fixture(scope="module")
def smollm2():
    from prunekit import zoo

    model, tok = zoo.smollm2(dtype=torch.float32)
    tok.padding_side = "left"
    return model, tok


def test_fastv_keeps_next_token_distribution_better_than_random(smollm2):
    from prunekit.assets import wiki_text

    model, tok = smollm2
    passages = [p[:700] for p in wiki_text().split("\n\n") if len(p) > 800][:8]
    enc = tok(passages, return_tensors="pt", padding=True)
    with torch.no_grad():
        dense = model(**enc).logits[:, -1].float().log_softmax(-1)

        def kl_to_dense(method: str) -> float:
            with prunekit.prune_tokens(model, method, keep=0.5, layer=2) as s:
                pruned = model(**enc).logits[:, -1].float().log_softmax(-1)
            assert abs(s.stats.kept_fraction - 0.5) < 0.02
            return (dense.exp() * (dense - pruned)).sum(-1).mean().item()

        fastv, rand = kl_to_dense("fastv"), kl_to_dense("random")
    print(f"KL(dense || pruned) at keep=0.5, K=2: fastv {fastv:.3f}, random {rand:.3f}")
    assert fastv < 0.75 * rand, f"FastV KL {fastv:.3f} not clearly below random {rand:.3f}"
