"""SpAtten's progressive quantisation on SmolLM2-135M (packaged weights): Wikipedia perplexity and
the bytes of keys and values each setting would move, against fp16 and a plain 12-bit fetch.

Run: PYTHONPATH=src python benchmarks/spatten_pq.py [--chunks 8]
Prints one JSON line per setting and a markdown table.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

import torch

from prunekit.bench.models import _smollm2
from prunekit.bench.tasks import make_task
from prunekit.kv import PQStats, progressive_quantization

SETTINGS = [(12, 6, 0.0), (12, 6, 0.1), (12, 6, 0.3), (12, 4, 0.1), (12, 4, 0.3), (8, 4, 0.1), (12, 6, 1.0)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=8, help="Wikipedia chunks of 512 tokens")
    a = p.parse_args()
    loaded = _smollm2(torch.float32)
    task = make_task("wikitext", limit=a.chunks)
    dense = task.evaluate(loaded, nullcontext).metrics["ppl"]
    rows = [{"setting": "dense (fp32 attention)", "ppl": dense}]
    print(json.dumps(rows[0]), flush=True)
    for total, msb, thr in SETTINGS:
        stats = PQStats()
        ppl = task.evaluate(
            loaded,
            lambda t=total, m=msb, h=thr, st=stats: progressive_quantization(loaded.model, t, m, h, st),
        ).metrics["ppl"]
        st = stats.to_dict()
        row = {"setting": f"{total} bits, {msb} MSBs, threshold {thr}", "ppl": ppl, **st}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| setting | wiki ppl | rows refetching LSBs | bytes moved vs fp16 | vs 12-bit |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "moved_bytes" not in r:
            print(f"| {r['setting']} | {r['ppl']:.2f} | - | 1.00 | - |")
            continue
        print(f"| {r['setting']} | {r['ppl']:.2f} | {r['refetch_fraction']:.1%} | {r['moved_vs_fp16']:.3f} | "
              f"{r['moved_bytes'] / (r['fp16_bytes'] * 12 / 16):.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
