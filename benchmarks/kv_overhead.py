"""Time each KV-cache method's own work (scoring, selection, cache edits) against the dense prefill
it follows, on SmolLM2-135M (packaged weights), one process, side by side.

Run: PYTHONPATH=src python benchmarks/kv_overhead.py [--batch 4] [--length 1024] [--keep 0.25]
Prints one JSON line per method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import prunekit
from prunekit.bench.models import _smollm2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    model = _smollm2(torch.float32).model
    ids = torch.randint(100, 20000, (a.batch, a.length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for info in prunekit.methods("kv"):
            dense, own, total = [], [], []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                model(input_ids=ids, logits_to_keep=1)
                dense.append(time.perf_counter() - t0)
                with prunekit.compress_kv(model, info.name, keep=a.keep) as s:
                    t0 = time.perf_counter()
                    model(input_ids=ids, logits_to_keep=1)
                    total.append(time.perf_counter() - t0)
                own.append(s.stats.compress_seconds)
            d, o = statistics.median(dense), statistics.median(own)
            print(json.dumps({"method": info.name, "batch": a.batch, "length": a.length, "keep": a.keep,
                              "dense_prefill_s": d, "prefill_s": statistics.median(total),
                              "method_s": o, "method_share_of_prefill": o / d}))  # fmt: skip


if __name__ == "__main__":
    main()
