"""FTP (``prunekit.training.ftp``, a reconstruction) on SmolLM2-135M, trained with the one call and
measured for zero-shot accuracy and tail perplexity against its baselines; one JSON line per run.

For each mean token sparsity (``--sparsities``):

1. ``prunekit.training.ftp(model, LAMBADA passages, sparsity=s, ...)``: the GA (static router,
   ``--population`` x ``--generations`` on ``--calib-windows`` windows of ``--seq-len`` tokens), then
   the router (``--steps`` steps, batch 1, the windows after the GA's); the router is saved to
   ``--routers`` (``ftp_router_{s}.safetensors``) and reused when the script is run again;
2. zero-shot accuracy on the 7 tasks (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA;
   ``--zs-limit`` questions each) and Wikipedia perplexity over the last ``--tail`` positions of
   ``--ppl-chunks`` chunks of 512 tokens, for: the trained router (its GA schedule), the static
   router with the GA schedule and with uniform allocation, random skipping (the GA schedule),
   and ShortGPT removing ``round(s * 30)`` blocks (matched FLOPs); dense once.

Zero-shot scoring here is lm-eval's: one forward over context + continuation, no cache, batch 1
(FTP routes the whole sequence, as in a prefill; its padded-batch refusal rules out the bench's
batched scorer). The dense row checks this scorer against the bench's (cached, batched) one.

Resumable (rows in ``--out`` are skipped). Run (about 40 min on 2 cores at the defaults):
    PYTHONPATH=src python benchmarks/ftp_zeroshot.py
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from structured_smollm2 import resume

import prunekit
from prunekit.assets import book_text
from prunekit.bench.models import BUILTIN
from prunekit.bench.tasks import make_task
from prunekit.bench.tasks.lm import MC_TASKS
from prunekit.tokens import ftp
from prunekit.training import FTPResult


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.30, 0.22])
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--calib-windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tail", type=int, default=64)
    p.add_argument("--ppl-chunks", type=int, default=8)
    p.add_argument("--zs-limit", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--routers", default="benchmarks/results")
    p.add_argument("--out", default="benchmarks/results/ftp_zeroshot.jsonl")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out, done = resume(a.out)
    loaded = BUILTIN["smollm2"](torch.float32)
    model, tok = loaded.model.eval(), loaded.tokenizer
    L = len(model.model.layers)
    tasks = [make_task(n, limit=a.zs_limit) for n in MC_TASKS]
    for t in tasks:
        t.prepare(loaded)
    ppl_task = make_task("wikitext", limit=a.ppl_chunks)
    ppl_task.prepare(loaded)

    def measure(treat, m) -> dict:
        t0 = time.perf_counter()
        zs = {}
        with torch.inference_mode(), treat():
            for t in tasks:
                lp = torch.zeros(len(t.pairs), dtype=torch.float64)
                for i, pair in enumerate(t.pairs):
                    ids = torch.tensor([pair.ctx + pair.cont])
                    logits = m(input_ids=ids, use_cache=False).logits[0, len(pair.ctx) - 1 : -1]
                    cont = torch.tensor(pair.cont)[:, None]
                    lp[i] = logits.float().log_softmax(-1).gather(-1, cont).sum()
                zs[t.name] = t.accuracy(lp)[t.primary]
            nll = []
            for x in ppl_task.chunks.split(4):
                lps = m(input_ids=x, use_cache=False).logits[:, :-1].float().log_softmax(-1)
                nll.append(-lps.gather(-1, x[:, 1:, None])[..., 0][:, -a.tail :].flatten())
        ppl = math.exp(float(torch.cat(nll).mean()))
        return {"zero_shot": zs, "zero_shot_mean": statistics.fmean(zs.values()), "ppl_tail": ppl,
                "eval_s": time.perf_counter() - t0}  # fmt: skip

    def emit(row: dict) -> None:
        done[row["key"]] = row
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    if "dense" not in done:
        row = {"key": "dense", "method": "dense", "sparsity": 0.0, **measure(nullcontext, model)}
        row["zero_shot_bench_scorer"] = {
            t.name: t.evaluate(loaded, nullcontext).metrics[t.primary] for t in tasks
        }
        emit(row)
    texts = [book_text()[:400_000]]
    for s in a.sparsities:
        path = pathlib.Path(a.routers) / f"ftp_router_{s:.2f}.safetensors"
        k = f"ftp/{s}"
        if k not in done:
            if path.is_file():
                res, train = FTPResult.load(path), {}
            else:
                res = prunekit.training.ftp(
                    model, texts, tokenizer=tok, sparsity=s, seq_len=a.seq_len,
                    calib_windows=a.calib_windows, population=a.population, generations=a.generations,
                    steps=a.steps, lr=a.lr, progress=False,
                )  # fmt: skip
                res.save(path)
                train = res.to_dict()
            emit({"key": k, "method": "ftp (router+ga)", "sparsity": s, "train": train,
                  **measure(lambda r=res: r.skipping(model), model)})  # fmt: skip
        sched = FTPResult.load(path).schedule
        runs = {
            "static+ga": ("static", sched),
            "static+uniform": ("static", ftp.uniform_schedule(L, s)),
            "random+ga": ("random", sched),
        }
        for name, (router, sc) in runs.items():
            k = f"{name}/{s}"
            if k not in done:
                treat = lambda r=router, c=sc: ftp.token_skipping(model, r, c)  # noqa: E731
                emit({"key": k, "method": name, "sparsity": s, **measure(treat, model)})
        k = f"shortgpt/{s}"
        if k not in done:
            n = round(s * L)
            pruned = BUILTIN["smollm2"](torch.float32)
            pr = prunekit.prune_weights(pruned.model, "shortgpt", s, tokenizer=tok, n_samples=16, n_layers=n,
                                        progress=False)  # fmt: skip
            pr.finalize()
            emit({"key": k, "method": "shortgpt", "sparsity": s, "blocks_removed": n,
                  **measure(nullcontext, pruned.model.eval())})  # fmt: skip
            del pruned
    write_table(out, list(done.values()), a)


def write_table(out: pathlib.Path, rows: list[dict], a) -> None:
    names = list(MC_TASKS)
    lines = [
        "# FTP on SmolLM2-135M: zero-shot accuracy (reconstruction; CPU-reduced settings)",
        "",
        f"Zero-shot: {a.zs_limit} questions per task (acc or acc_norm as the Wanda tables), lm-eval's "
        "scoring (one forward over context + continuation, batch 1). ppl (tail): Wikipedia, last "
        f"{a.tail} positions of {a.ppl_chunks} chunks of 512 tokens. FTP trained with "
        f"`prunekit.training.ftp` (GA {a.population} x {a.generations} on {a.calib_windows} windows of "
        f"{a.seq_len} tokens; router {a.steps} steps, lr {a.lr}).",
        "",
        "| sparsity | method | " + " | ".join(names) + " | mean | ppl (tail) | train s |",
        "|---|---|" + "---|" * len(names) + "---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["sparsity"], r["method"])):
        tr = r.get("train", {}).get("seconds", {})
        ts = f"{sum(tr.values()):.0f}" if tr else ""
        lines.append(
            f"| {r['sparsity']:.2f} | {r['method']} | "
            + " | ".join(f"{r['zero_shot'][n]:.2f}" for n in names)
            + f" | {r['zero_shot_mean']:.3f} | {r['ppl_tail']:.2f} | {ts} |"
        )
    dense = next((r for r in rows if r["key"] == "dense"), None)
    if dense and "zero_shot_bench_scorer" in dense:
        b = dense["zero_shot_bench_scorer"]
        lines += ["", "Dense with the bench's cached, batched scorer (a check of this script's scorer): "
                  + ", ".join(f"{n} {b[n]:.2f}" for n in names) + "."]  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
