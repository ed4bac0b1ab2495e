"""Why SparseGPT does not beat Wanda on SmolLM2 with 16 x 512 LAMBADA calibration tokens: the same
two methods with more calibration windows and with in-domain (Wikipedia) calibration text, scored
by perplexity on Wikipedia chunks that no calibration window overlaps.

Run: PYTHONPATH=src python benchmarks/weights_calibration.py [--ppl-chunks 27]
Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

import torch

import prunekit
from prunekit.assets import wiki_text
from prunekit.bench.models import _smollm2
from prunekit.bench.tasks import make_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ppl-chunks", type=int, default=27)
    a = p.parse_args()
    loaded = _smollm2(torch.float32)
    task = make_task("wikitext", limit=a.ppl_chunks)
    task.prepare(loaded)
    # held out: evaluate on chunks of the first half of the Wikipedia text only, calibrate on its
    # second half (windows never overlap an evaluated chunk)
    wiki = wiki_text()
    ids = torch.tensor(loaded.tokenizer(wiki[: len(wiki) // 2], add_special_tokens=False).input_ids)
    n_chunks = ids.numel() // task.chunk
    pick = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(0))[: a.ppl_chunks].sort().values
    task.chunks = ids[: n_chunks * task.chunk].view(n_chunks, task.chunk)[pick]
    wiki_cal = [wiki[len(wiki) // 2 :]]
    runs = [("lambada", 16, None), ("lambada", 64, None), ("wikipedia", 16, wiki_cal)]
    for source, n, texts in runs:
        for method in ("wanda", "sparsegpt"):
            loaded.model = _smollm2(torch.float32).model
            pr = prunekit.prune_weights(
                loaded.model, method, 0.5, calibration=texts, tokenizer=loaded.tokenizer, n_samples=n,
                progress=False, reversible=False,
            )  # fmt: skip
            ppl = task.evaluate(loaded, nullcontext).metrics["ppl"]
            row = {"calibration": source, "windows": n, "method": method, "ppl": ppl}
            print(json.dumps({**row, "prune_s": pr.report.seconds}), flush=True)
    loaded.model = _smollm2(torch.float32).model
    print(json.dumps({"dense_ppl": task.evaluate(loaded, nullcontext).metrics["ppl"]}), flush=True)


if __name__ == "__main__":
    main()
