"""Which experts does each expert-removal method take out of the MoEfied SmolLM2? For 25 % of the
experts removed, the mean popularity rank of the removed experts (0 = the layer's most routed
expert, 15 = the least) and the share of the calibration routing they carried.

Run: PYTHONPATH=src python benchmarks/stun_diagnosis.py   (about a minute on 2 cores)
"""

from __future__ import annotations

import torch

from prunekit.bench.models import BUILTIN
from prunekit.models.moe import moe_layers
from prunekit.weights.calibration import calibration_ids
from prunekit.weights.methods.experts import STUN, ExpertFrequency, ExpertRandom, router_choices


def main() -> None:
    loaded = BUILTIN["smollm2-moe"](torch.float32)
    moes = moe_layers(loaded.model)
    ids = calibration_ids(loaded.tokenizer, None, 8, 512, 0)  # the benchmark's calibration windows
    with torch.no_grad():
        choices = router_choices(loaded.model, moes, ids, 4, progress=False)
    n_remove = round(0.25 * sum(m.num_experts for m in moes))
    methods = {
        "stun (co-selection clusters)": STUN(then=None),
        "stun normalize=True": STUN(then=None, normalize=True),
        "expert_frequency": ExpertFrequency(),
        "expert_random": ExpertRandom(),
    }
    print("| method | mean popularity rank of removed experts (0 = most routed) | routing share removed |")
    print("|---|---|---|")
    for name, method in methods.items():
        keeps = method.plan(moes, choices, n_remove)
        ranks, shares = [], []
        for m, top, keep in zip(moes, choices, keeps, strict=True):
            freq = torch.bincount(top.flatten(), minlength=m.num_experts)
            rank = freq.argsort(descending=True, stable=True).argsort()
            ranks += rank[~keep].tolist()
            shares.append(float(freq[~keep].sum()) / top.numel())
        print(f"| {name} | {sum(ranks) / len(ranks):.2f} | {sum(shares) / len(shares):.3f} |")


if __name__ == "__main__":
    main()
