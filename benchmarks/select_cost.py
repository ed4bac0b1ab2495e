"""Selection cost of every vision- and llm-stage token method at LLaVA-1.5 scale.

Times ``method.select`` alone on synthetic inputs shaped like LLaVA-1.5-7B's: one image of
N = 576 visual tokens (24 x 24), hidden size 4096, 16 heads (vision maps of 576 x 576), a 40-token
prompt; keep 64. Median of ``--repeats`` calls after a warm-up, on this machine's CPU (an upper
bound for a GPU). Prints one JSON line per method and a table.

Run: PYTHONPATH=src python benchmarks/select_cost.py [--n 576] [--keep 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import prunekit
from prunekit import registry
from prunekit.tokens.context import TokenContext

SKIP = {
    "tome": "merges inside every encoder block (no one-shot select)",
    "flowcut": "selects inside the vision tower, a few CLS rows per layer (no one-shot select)",
}


def context(n: int, d: int, heads: int, text: int, stage: str, gen: torch.Generator) -> TokenContext:
    side = int(n**0.5)
    attn = torch.rand(1, heads, n, n, generator=gen).softmax(-1)
    sig = {
        "cls_attention": torch.rand(1, n, generator=gen).softmax(-1),
        "attention_map": attn,
        "text_embeddings": torch.randn(1, text, d, generator=gen),
        "last_token_attention": torch.rand(1, n, generator=gen).softmax(-1),
        "instruction_attention": torch.rand(1, text, n, generator=gen).softmax(-1),
        "instruction_mask": torch.ones(1, text, dtype=torch.bool),
        "instruction_embeddings": torch.randn(1, text, d, generator=gen),
        "input_embeddings": torch.randn(1, n, d, generator=gen),
        "transition": torch.rand(1, n, generator=gen),
        "cumulative_attention": torch.rand(1, n, generator=gen),
    }
    for layer in range(24):  # methods that ask for a map "@layer"
        sig[f"attention_map@{layer}"] = attn
    return TokenContext(stage=stage, tokens=torch.randn(1, n, d, generator=gen), signals=sig,
                        grid=(side, side), layer=2)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=576)
    p.add_argument("--keep", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for info in prunekit.methods("tokens"):
        if info.name in SKIP:
            continue
        stage = info.stages[0]
        if stage not in ("vision", "llm"):  # encoder-only methods (Zero-TPrune, ToP-ViM): not LLaVA-shaped
            continue
        opts = {"num_crops": 16} if info.name == "holov" else {}
        m = registry.get(info.name).factory(**opts)
        ctx = context(a.n, 4096, 16, 40, stage, gen)
        if info.name == "holitom":  # a video: 4 frames of N / 4 tokens, one attention map per frame
            f = a.n // 4
            maps = torch.rand(1, 4, 16, f, f, generator=gen).softmax(-1)
            ctx = TokenContext(stage=stage, tokens=ctx.tokens[:, : 4 * f], signals={"attention_map": maps})
        m.select(ctx, a.keep)  # warm-up
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            m.select(ctx, a.keep)
            times.append(time.perf_counter() - t0)
        row = {"method": info.name, "stage": stage, "n": a.n, "keep": a.keep,
               "select_ms": 1e3 * statistics.median(times)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row))
    print(f"\n| method | stage | select ms (N={a.n}, keep {a.keep}) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['stage']} | {r['select_ms']:.2f} |")


if __name__ == "__main__":
    main()
