"""Mixture-of-experts pruning measured on the MoEfied SmolLM2 (``prunekit.zoo.smollm2_moe``: a
``MixtralForCausalLM`` built from SmolLM2-135M's weights), one JSON line per (method, options,
sparsity).

Two comparisons:

1. **Expert removal** at 25 % and 50 % of the experts (``--expert-fractions``): STUN stage 1
   (``stun:then=None``) against router frequency (``expert_frequency``) and random removal
   (``expert_random``).
2. **STUN's claim** at 40 % and 50 % total sparsity (``--totals``, the fraction of every prunable
   decoder weight: attention and experts): STUN (``experts`` of the experts removed, then Wanda or
   OWL up to the total) against Wanda and OWL alone.

For each run the MoE is loaded fresh in fp32 from its cache, pruned (calibration: ``--samples``
LAMBADA windows of 512 tokens, seed 0), finalized (experts sliced out, zeros written), saved as
safetensors, reloaded with ``prunekit.load_pruned`` (logits checked identical), then measured: Wikipedia
perplexity at 512 and 128 tokens, the 7 zero-shot tasks (``--zs-limit`` questions each), parameters,
checkpoint MB, pruning seconds and peak memory and, for expert removal, prefill (b1x512, b8x128) and
greedy-decode latency ratios against the unpruned MoE, interleaved in this one process.

Resumable (runs already in ``--out`` are skipped). Run (about an hour on 2 idle cores):
    PYTHONPATH=src python benchmarks/moe_smollm2.py
Writes JSON lines to ``--out``, a markdown table and a plot next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import tempfile
import time

import torch
from structured_quality import parse  # the sibling scripts (benchmarks/ is on sys.path)
from structured_smollm2 import Quality, resume, speed, zero_shot_lines

import prunekit
from prunekit.bench.models import BUILTIN

REMOVAL = ["stun:then=None", "expert_frequency", "expert_random"]
TOTAL = ["stun:experts=0.25", "wanda", "stun:experts=0.25,then=owl", "owl", "stun:experts=0.125"]


def key(method: str, opts: dict, sparsity: float) -> str:
    return json.dumps(["smollm2-moe", method, opts, sparsity], sort_keys=True)


def counts(model) -> dict:
    """Parameters, and the fused expert weights among them (what expert removal shrinks)."""
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return {"params": sum(p.numel() for p in model.parameters()), "expert_params": experts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--expert-fractions", nargs="*", type=float, default=[0.25, 0.5])
    p.add_argument("--totals", nargs="*", type=float, default=[0.4, 0.5])
    p.add_argument("--removal", nargs="*", default=REMOVAL)
    p.add_argument("--total-methods", nargs="*", default=TOTAL)
    p.add_argument("--samples", type=int, default=8, help="calibration windows of 512 tokens")
    p.add_argument("--ppl-chunks", type=int, default=8)
    p.add_argument("--zs-limit", type=int, default=30, help="questions per zero-shot task (0: none)")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default="benchmarks/results/moe_smollm2.jsonl")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    out, done = resume(a.out)
    load = BUILTIN["smollm2-moe"]
    dense = load(torch.float32)
    quality = Quality(dense, a.ppl_chunks, a.zs_limit)

    def emit(row: dict) -> None:
        done[row["key"]] = row
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    k = key("dense", {}, 0.0)
    if k not in done:
        emit({"key": k, "method": "unpruned MoE", "options": {}, "sparsity": 0.0, "kind": "dense",
              **quality(dense), **counts(dense.model)})  # fmt: skip
    jobs = [("removal", m, s) for s in a.expert_fractions for m in a.removal]
    jobs += [("total", m, s) for s in a.totals for m in a.total_methods]
    for kind, entry, s in jobs:
        method, opts = parse(entry)
        opts = {k: (None if v == "None" else v) for k, v in opts.items()}
        k = key(method, opts, s)
        if k in done:
            continue
        row = {"key": k, "method": method, "options": opts, "sparsity": s, "kind": kind}
        t0 = time.perf_counter()
        try:
            loaded = load(torch.float32)
            tok = loaded.tokenizer
            pr = prunekit.prune_weights(loaded.model, method, s, tokenizer=tok, n_samples=a.samples, **opts)
            report = pr.finalize()
            with tempfile.TemporaryDirectory() as tmp:
                loaded.model.save_pretrained(tmp)
                mb = sum(f.stat().st_size for f in pathlib.Path(tmp).glob("*.safetensors")) / 2**20
                # the same experts implementation as the loaded model (the bench's CPU choice: eager)
                impl = loaded.model.config._experts_implementation
                reloaded = prunekit.load_pruned(tmp, dtype=torch.float32, experts_implementation=impl).eval()
            x = torch.randint(3, 40000, (1, 128), generator=torch.Generator().manual_seed(1))
            with torch.inference_mode():
                same = torch.equal(reloaded(input_ids=x).logits, loaded.model(input_ids=x).logits)
            loaded.model = reloaded
            rep = report.to_dict()
            experts = [len(r["kept"]) for r in rep["layers"]] if "experts_removed" in rep else None
            row.update({
                **quality(loaded), **counts(reloaded), "checkpoint_mb": mb, "reload_identical": same,
                "actual_sparsity": rep["actual_sparsity"], "experts_removed": rep.get("experts_removed", 0.0),
                "experts_per_layer": experts, "prune_s": report.seconds,
                "peak_mb": report.peak_memory_bytes / 2**20,
            })  # fmt: skip
            if kind == "removal" and not a.no_speed:
                row.update(speed(dense.model, reloaded, a.threads, a.repeats, a.new_tokens))
                torch.set_num_threads(a.threads)
        except (ValueError, prunekit.PrunekitError) as e:
            row["error"] = f"{type(e).__name__}: {e}"
        row["wall_s"] = time.perf_counter() - t0
        emit(row)
    write_table(out, list(done.values()), a)


def _f(v, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _name(r: dict) -> str:
    return r["method"] + "".join(f" {k}={v}" for k, v in r["options"].items())


def write_table(out: pathlib.Path, rows: list[dict], a) -> None:
    """Two markdown tables (expert removal; equal total sparsity) and a plot."""
    rows = sorted(rows, key=lambda r: (r["kind"], r["sparsity"], _name(r)))
    base = next((r for r in rows if r["kind"] == "dense"), None)
    lines = [
        f"MoEfied SmolLM2 (prunekit.zoo.smollm2_moe), fp32. Calibration: {a.samples} LAMBADA windows of 512 "
        f"tokens. Wikipedia perplexity over {a.ppl_chunks} chunks of 512 tokens (ppl@512) and "
        f"{4 * a.ppl_chunks} of 128; zero-shot: {a.zs_limit} questions per task, mean of 7. Speed: pruned / "
        f"unpruned-MoE time ratios, interleaved medians, {a.threads} threads. Every checkpoint was saved, "
        "reloaded with load_pruned and checked identical. Command: benchmarks/moe_smollm2.py.",
        "",
    ]
    if base:
        lines += [f"Unpruned MoE: ppl@512 {_f(base['ppl'])}, ppl@128 {_f(base['ppl128'])}, zero-shot mean "
                  f"{_f(base.get('zero_shot_mean'), '.3f')}, {base['params']:,} parameters.", ""]  # fmt: skip
    lines += [
        "**Expert removal** (sparsity = fraction of the experts removed):",
        "",
        "| experts removed | method | ppl@512 | ppl@128 | zero-shot mean | params | "
        "experts per layer (min-max) | prefill b1x512 | prefill b8x128 | decode | prune s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != "removal":
            continue
        if "error" in r:
            lines.append(f"| {r['sparsity']:g} | {_name(r)} | {r['error'][:90]} |" + " |" * 9)
            continue
        per = r.get("experts_per_layer") or []
        lines.append(
            f"| {r['sparsity']:g} | {_name(r)} | {_f(r['ppl'])} | {_f(r['ppl128'])} | "
            f"{_f(r.get('zero_shot_mean'), '.3f')} | {r['params']:,} | "
            f"{min(per, default=0)}-{max(per, default=0)} | "
            f"{_f(r.get('prefill_b1x512'), '.3f')} | {_f(r.get('prefill_b8x128'), '.3f')} | "
            f"{_f(r.get('decode'), '.3f')} | {_f(r.get('prune_s'), '.0f')} | {_f(r.get('peak_mb'), '.0f')} |"
        )
    lines += [
        "",
        "**Equal total sparsity** (fraction of every prunable decoder weight removed; STUN: experts, then "
        "unstructured):",
        "",
        "| total sparsity | method | actual | experts removed | ppl@512 | ppl@128 | zero-shot mean | "
        "prune s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != "total":
            continue
        if "error" in r:
            lines.append(f"| {r['sparsity']:g} | {_name(r)} | {r['error'][:90]} |" + " |" * 6)
            continue
        lines.append(
            f"| {r['sparsity']:g} | {_name(r)} | {_f(r['actual_sparsity'], '.3f')} | "
            f"{_f(r.get('experts_removed'), '.3f')} | {_f(r['ppl'])} | {_f(r['ppl128'])} | "
            f"{_f(r.get('zero_shot_mean'), '.3f')} | {_f(r.get('prune_s'), '.0f')} | "
            f"{_f(r.get('peak_mb'), '.0f')} |"
        )
    lines += zero_shot_lines(rows, {"kind": lambda r: r["kind"], "sparsity": lambda r: f"{r['sparsity']:g}",
                                    "method": _name})  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(out, rows, base)


def plot(out: pathlib.Path, rows: list[dict], base: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in sorted({_name(r) for r in rows if r["kind"] == "removal"}):
        pts = sorted((r["sparsity"], r["ppl"]) for r in rows if r["kind"] == "removal" and _name(r) == name
                     and "ppl" in r)  # fmt: skip
        if base:
            pts = [(0.0, base["ppl"]), *pts]
        if pts:
            ax1.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax1.set(xlabel="fraction of experts removed", ylabel="Wikipedia ppl@512", yscale="log")
    ax1.set_title("expert removal")
    ax1.legend(fontsize=8)
    totals = sorted({r["sparsity"] for r in rows if r["kind"] == "total"})
    names = sorted({_name(r) for r in rows if r["kind"] == "total"})
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        ys = [next((r.get("ppl", float("nan")) for r in rows if r["kind"] == "total" and _name(r) == name
                    and r["sparsity"] == s), float("nan")) for s in totals]  # fmt: skip
        ax2.bar([i + j * width for i in range(len(totals))], ys, width, label=name)
    ax2.set_xticks([i + 0.4 - width / 2 for i in range(len(totals))], [f"{s:g}" for s in totals])
    ax2.set(xlabel="total sparsity", ylabel="Wikipedia ppl@512", yscale="log")
    ax2.set_title("STUN vs unstructured alone")
    if base:
        ax2.axhline(base["ppl"], color="grey", ls="--", lw=1, label="unpruned MoE")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
