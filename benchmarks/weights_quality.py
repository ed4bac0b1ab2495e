"""Weight pruning on SmolLM2-135M (packaged real weights; ``--model gemma3-270m`` for the optional
Gemma-3-270M): Wikipedia perplexity and the seven zero-shot tasks of the Wanda / SparseGPT tables,
for dense and every method x pattern, with each method's prune time and peak memory. One process.
Each run loads the model fresh in fp32, prunes it (calibration, Hessians, SparseGPT's update in
fp32), finalizes, and evaluates it in ``--eval-dtype`` (fp32 by default; bf16 is faster only on
CPUs with native bf16 kernels).

Run: PYTHONPATH=src python benchmarks/weights_quality.py [--zero-shot-limit 100] [--ppl-chunks 27]
Writes JSON lines to --out (default runs/weights/results.jsonl), a markdown table next to it, and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from contextlib import nullcontext

import torch

import prunekit
from prunekit.bench.models import BUILTIN
from prunekit.bench.tasks import make_task

ZERO_SHOT = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
RUNS = [
    ("magnitude", "unstructured", {}),
    ("wanda", "unstructured", {}),
    ("sparsegpt", "unstructured", {}),
    ("gblm", "unstructured", {}),
    ("owl", "unstructured", {}),
    ("sparsegpt", "unstructured", {"allocation": "owl"}),
    ("magnitude", "2:4", {}),
    ("wanda", "2:4", {}),
    ("sparsegpt", "2:4", {}),
    ("gblm", "2:4", {}),
]


def label(method: str, options: dict) -> str:
    return method + (f"({','.join(f'{k}={v}' for k, v in options.items())})" if options else "")


def evaluate(loaded, tasks) -> dict:
    out, t0 = {}, time.perf_counter()
    for t in tasks:
        out[t.name] = t.evaluate(loaded, nullcontext).metrics[t.primary]
    out["eval_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 or gemma3-270m (optional asset)")
    p.add_argument("--zero-shot-limit", type=int, default=100)
    p.add_argument("--ppl-chunks", type=int, default=27)
    p.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--only", nargs="*", help="method names to run (default: all)")
    p.add_argument("--no-zero-shot", action="store_true")
    p.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default="runs/weights/results.jsonl")
    a = p.parse_args()
    torch.manual_seed(0)
    eval_dtype = getattr(torch, a.eval_dtype)
    load = BUILTIN[a.model]
    loaded = load(torch.float32)
    tasks = [make_task("wikitext", limit=a.ppl_chunks)]
    if not a.no_zero_shot:
        tasks += [make_task(n, limit=a.zero_shot_limit) for n in ZERO_SHOT]
    for t in tasks:
        t.prepare(loaded)  # tokenise once
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    loaded.model.to(eval_dtype)
    log = out.open("w")  # one line per run as it finishes, so a cut run keeps what it measured

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()

    rows: list[dict] = []
    emit({"method": "dense", "pattern": "-", **evaluate(loaded, tasks)})
    for method, pattern, options in RUNS:
        if a.only and method not in a.only:
            continue
        t0 = time.perf_counter()
        loaded.model = load(torch.float32).model
        pr = prunekit.prune_weights(
            loaded.model, method, None if pattern != "unstructured" else a.sparsity, pattern=pattern,
            tokenizer=loaded.tokenizer, n_samples=a.samples, **options,
        )  # fmt: skip
        report = pr.finalize()
        loaded.model.to(eval_dtype)
        emit({"method": label(method, options), "pattern": pattern, **evaluate(loaded, tasks),
               "prune_s": report.seconds, "peak_mb": report.peak_memory_bytes / 2**20,
               "actual_sparsity": report.to_dict()["actual_sparsity"],
               "layer_sparsity": report.layer_sparsity,
               "wall_s": time.perf_counter() - t0})  # fmt: skip
    log.close()
    table = f"{a.model}, evaluated in {a.eval_dtype}\n\n" + markdown(rows, [t.name for t in tasks])
    out.with_suffix(".md").write_text(table)
    print(table)


def markdown(rows: list[dict], names: list[str]) -> str:
    zs = [n for n in names if n != "wikitext"]
    head = ["method", "pattern", "wiki ppl", *zs, "mean acc" if zs else None, "prune s", "peak MB"]
    head = [h for h in head if h]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["pattern"], f"{r['wikitext']:.2f}"]
        cells += [f"{r[n]:.3f}" for n in zs]
        if zs:
            cells.append(f"{sum(r[n] for n in zs) / len(zs):.3f}")
        cells += [
            f"{r['prune_s']:.1f}" if "prune_s" in r else "-",
            f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
