"""LoRA recovery after structured pruning on SmolLM2-135M: Wikipedia perplexity dense, pruned, and
pruned + ``prunekit.recover``.

The model (fp32) is pruned as ``benchmarks/structured_quality.py`` does (``--method``, FLAP by
default, at ``--sparsity`` of the prunable weights, ``gqa=query_slots`` unless ``--option`` says
otherwise; calibration: ``--samples`` LAMBADA windows of 512
tokens), finalized, then recovered with LoRA (LLM-Pruner's recipe: r=8, alpha 16, dropout 0.05,
lr 1e-4 unless given) on Wikipedia text **disjoint from the evaluation**: the perplexity task cuts
the tokenized ``prunekit.assets.wiki_text()`` into 512-token chunks and evaluates a seeded subset
of ``--ppl-chunks`` of them; training uses the other chunks, each cut into windows of
``--seq-len`` tokens. Perplexity is measured on the same chunks (512 tokens, every position
scored) before and after recovery; the recovered model is saved and reloaded with
``prunekit.load_pruned`` (logits checked identical).

Run: PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/recover_smollm2.py [--steps 75] [--lr 1e-4]
Writes JSON lines to --out (default benchmarks/results/recover_smollm2.jsonl).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from contextlib import nullcontext

import torch

import prunekit
from prunekit.assets import wiki_text
from prunekit.bench.models import BUILTIN
from prunekit.bench.tasks import make_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="flap")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option (default: gqa=query_slots)")  # fmt: skip
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens")
    p.add_argument("--ppl-chunks", type=int, default=16, help="Wikipedia chunks of 512 tokens")
    p.add_argument("--steps", type=int, default=75)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/recover_smollm2.jsonl")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.open("a")  # rows of earlier runs (other methods) stay
    opts = {"gqa": "query_slots"}
    for kv in a.option:
        k, _, v = kv.partition("=")
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()

    loaded = BUILTIN["smollm2"](torch.float32)
    task = make_task("wikitext", limit=a.ppl_chunks)
    task.prepare(loaded)
    # The evaluation chunks, as the task picks them; the training windows come from the others.
    ids = torch.tensor(loaded.tokenizer(wiki_text(), add_special_tokens=False).input_ids)
    n = ids.numel() // task.chunk
    chunks = ids[: n * task.chunk].view(n, task.chunk)
    held_out = set(task.subsample(n).tolist())
    assert torch.equal(chunks[sorted(held_out)], task.chunks)
    train_chunks = chunks[[i for i in range(n) if i not in held_out]]
    windows = train_chunks.reshape(-1, a.seq_len)  # 512-token chunks -> seq_len windows, in order
    dense_ppl = task.evaluate(loaded, nullcontext).metrics["ppl"]
    emit({"model": "SmolLM2-135M-Instruct fp32", "stage": "dense", "ppl": dense_ppl,
          "ppl_chunks": a.ppl_chunks, "ppl_seq_len": task.chunk})  # fmt: skip

    pr = prunekit.prune_weights(
        loaded.model, a.method, a.sparsity, tokenizer=loaded.tokenizer, n_samples=a.samples, **opts
    )
    report = pr.finalize()
    params = sum(t.numel() for t in loaded.model.parameters())
    emit({"stage": "pruned", "method": a.method, "options": opts, "sparsity": a.sparsity,
          "actual_sparsity": report.to_dict()["actual_sparsity"], "params": params,
          "ppl": task.evaluate(loaded, nullcontext).metrics["ppl"], "prune_s": report.seconds})  # fmt: skip

    t0 = time.perf_counter()
    rec = prunekit.recover(
        loaded.model, windows, steps=a.steps, lora_rank=a.rank, lr=a.lr, batch_size=a.batch_size, seed=a.seed
    )
    wall = time.perf_counter() - t0
    ppl = task.evaluate(loaded, nullcontext).metrics["ppl"]
    with tempfile.TemporaryDirectory() as tmp:
        loaded.model.save_pretrained(tmp)
        reloaded = prunekit.load_pruned(tmp, dtype=torch.float32).eval()
        x = task.chunks[:1]
        with torch.inference_mode():
            same = torch.equal(reloaded(input_ids=x).logits, loaded.model(input_ids=x).logits)
    d = rec.to_dict()
    d.pop("modules")
    emit({"stage": "recovered", "method": a.method, "options": opts, "ppl": ppl,
          "params": sum(t.numel() for t in loaded.model.parameters()),
          "train_windows": len(windows), "train_tokens_seen": a.steps * a.batch_size * a.seq_len,
          "recover_wall_s": wall, "reload_identical": same, "threads": a.threads, **d})  # fmt: skip
    log.close()


if __name__ == "__main__":
    main()
