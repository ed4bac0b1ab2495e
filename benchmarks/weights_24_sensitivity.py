"""How much 2:4 results move under float-level changes of the calibration: Wanda (and optionally
SparseGPT) 2:4 on SmolLM2-135M fp32 with the same 16 x 512 LAMBADA ids, varying only what should
not matter mathematically: the attention kernel (eager / SDPA) and the calibration batch size
(4 / 1, which changes the order of the sums). Reports each variant's Wikipedia perplexity and its
mask agreement with the first variant, beside the unstructured 50 % masks for contrast.

Why: prunekit and llm-compressor agree on 99.9 % of Wanda's unstructured mask but 98.9 % of its
2:4 mask, and their 2:4 perplexities differ by 3-5 %. In a group of four weights, two scores
close to each other decide which two survive, so tiny differences in the activation norms flip
whole pairs, and each flip changes the next layers' inputs. If prunekit against itself shows the
same agreement and a similar spread, the gap is this sensitivity, not a different algorithm.

Run: PYTHONPATH=src python benchmarks/weights_24_sensitivity.py [--methods wanda sparsegpt]
"""

from __future__ import annotations

import argparse
import json

import torch

import prunekit
from prunekit.bench.models import _smollm2
from prunekit.bench.tasks import make_task
from prunekit.weights.calibration import calibration_ids

VARIANTS = [("eager", 4), ("sdpa", 4), ("eager", 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="*", default=["wanda"])
    p.add_argument("--patterns", nargs="*", default=["2:4", "unstructured"])
    p.add_argument("--ppl-chunks", type=int, default=27)
    a = p.parse_args()
    loaded = _smollm2(torch.float32)
    ids = calibration_ids(loaded.tokenizer, None, 16, 512)
    ppl = make_task("wikitext", limit=a.ppl_chunks)
    ppl.prepare(loaded)
    from contextlib import nullcontext

    for method in a.methods:
        for pattern in a.patterns:
            first = None
            for attn, bs in VARIANTS:
                model = _smollm2(torch.float32).model
                model.set_attn_implementation(attn)
                pr = prunekit.prune_weights(
                    model, method, 0.5 if pattern == "unstructured" else None, pattern=pattern,
                    calibration=ids, batch_size=bs, progress=False,
                )  # fmt: skip
                masks = {k: v.clone() for k, v in pr.masks.items()}
                pr.finalize()
                model.set_attn_implementation("sdpa")
                loaded.model = model
                value = ppl.evaluate(loaded, nullcontext).metrics["ppl"]
                row = {
                    "method": method,
                    "pattern": pattern,
                    "attention": attn,
                    "batch_size": bs,
                    "ppl": value,
                }
                if first is None:
                    first = masks
                else:
                    same = sum(int((masks[k] == first[k]).sum()) for k in masks)
                    row["mask_agreement_with_first"] = same / sum(m.numel() for m in masks.values())
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
