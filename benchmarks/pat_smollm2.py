"""PAT (``prunekit.training.pat``) on SmolLM2-135M: keep 75 % of the hidden size (576 -> 432), against
dense and against prune-then-LoRA at equal training steps; one JSON line per stage.

Stages (each loads the model fresh in fp32; done stages in ``--out`` are skipped, so an interrupted
run continues; the merged models are kept in ``--work`` for the latency stage):

- ``dense``: Wikipedia perplexity (``prunekit.assets.wiki_text()``, ``--ppl-chunks`` chunks of 512
  tokens, every position scored, the ``wikitext`` bench task) and parameters.
- ``pat``: ``prunekit.training.pat`` (default recipe: HSM rank 32, LoRA r=20 / alpha 4 on
  q/k/v/o/gate/up/down, lr ``--lr``, mask lr ``--mask-lr``, tied-safe embedding) for ``--steps``
  steps of ``--batch-size`` x ``--seq-len`` tokens of LAMBADA passages (``book_text()``, disjoint
  from the Wikipedia evaluation); merged perplexity, parameters, training time, merged-vs-hooked
  max logit error; saved and reloaded with ``prunekit.load_pruned`` (logits checked identical) and
  a short greedy generation.
- ``baseline``: prune-then-LoRA: drop the 144 channels with the smallest ``‖E[:, j]‖₂ · mean|γ_j|``
  (γ: every RMSNorm's weight; *ours*, the spec names ``γ`` without saying which norm), shrunk with
  the same surgery (``pat.merge`` with a pure mask), then ``prunekit.recover`` (LoRA; r, alpha as
  ``--base-rank``/``--base-alpha``, LLM-Pruner's r=8 / alpha 16 by default, the same lr, steps,
  batches and data as PAT); perplexity before and after recovery.
- ``structured``: structured pruning plus recovery **at equal parameters**: ``--struct-method``
  (CFSP, the best structured method at 20-30 % in ``structured_smollm2.md``) at the sparsity that
  leaves the PAT model's parameter count (from the ``pat`` row; heads and FFN channels, the hidden
  size kept), finalized, then the same LoRA recovery as the baseline (steps, data, lr, r, alpha);
  perplexity before and after recovery.
- ``zeroshot``: the 7 zero-shot tasks (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA;
  ``--zs-limit`` questions each, the same for every model; acc or acc_norm as the Wanda tables) of
  dense and every saved model (PAT, baseline, structured).
- ``latency``: prefill (batch 1 x ``--prefill`` tokens) and greedy decode (64-token prompt,
  ``--new-tokens`` tokens) of dense, PAT-merged and baseline (same shape as PAT), interleaved in one
  process, medians of ``--repeats``, fp32, ``--threads`` threads.

Run (about 15 min on 2 shared cores at the defaults):
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/pat_smollm2.py [--steps 40]
Writes JSON lines to ``--out`` (default benchmarks/results/pat_smollm2.jsonl) and a markdown table
next to it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from contextlib import nullcontext

import torch

import prunekit
from prunekit.assets import book_text
from prunekit.bench.measure import interleaved_latency
from prunekit.bench.models import BUILTIN, Loaded
from prunekit.bench.tasks import make_task
from prunekit.training import pat_tuning as P


def params(model) -> int:
    return sum(t.numel() for t in model.parameters())


def channel_scores(model) -> torch.Tensor:
    """``‖E[:, j]‖₂ · mean_norms |γ_j|`` (larger = kept)."""
    inner, layers = P._stack(model)
    norms = [inner.norm.weight] + [
        n.weight for ly in layers for n in (ly.input_layernorm, ly.post_attention_layernorm)
    ]
    gamma = torch.stack([n.detach().abs().float() for n in norms]).mean(0)
    return inner.embed_tokens.weight.detach().float().norm(dim=0) * gamma


def magnitude_shrink(model, keep: int) -> list[int]:
    """Prune the hidden size to the ``keep`` best channels by :func:`channel_scores`, no training."""
    scores = channel_scores(model)
    mods = P.attach(model, keep, tied="mask")
    with torch.no_grad():  # a mask whose top-``keep`` are the best channels; the HSMs are identity
        mods.mask.theta.copy_(scores - scores.sort(descending=True).values[keep - 1] + 0.5)
    model.eval()
    return P.merge(model, mods)["kept"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=int, default=432)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--mask-lr", type=float, default=None, help="default: 1/steps")
    p.add_argument("--base-rank", type=int, default=8)
    p.add_argument("--base-alpha", type=float, default=16.0)
    p.add_argument("--ppl-chunks", type=int, default=16)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--struct-method", default="cfsp")
    p.add_argument("--zs-limit", type=int, default=50)
    stages = ["dense", "pat", "baseline", "structured", "zeroshot", "latency"]
    p.add_argument("--stages", nargs="*", default=stages,
                   help="run only these stages (e.g. the baseline in a second process)")  # fmt: skip
    p.add_argument("--work", default="/tmp/pat_smollm2")
    p.add_argument("--out", default="benchmarks/results/pat_smollm2.jsonl")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = pathlib.Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []
    done = {r["stage"]: r for r in rows}
    log = out.open("a")
    common = {"keep": a.keep, "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len, "lr": a.lr,
              "seed": a.seed, "threads": a.threads}  # fmt: skip

    def emit(row: dict) -> None:
        row = {**row, **common}
        print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "kept")}), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()
        done[row["stage"]] = row

    task = make_task("wikitext", limit=a.ppl_chunks)

    def fresh():
        loaded = BUILTIN["smollm2"](torch.float32)
        task.prepare(loaded)
        return loaded

    def ppl(loaded) -> float:
        return task.evaluate(loaded, nullcontext).metrics["ppl"]

    def windows(tok) -> torch.Tensor:
        ids = torch.tensor(tok(book_text(), add_special_tokens=False).input_ids)
        n = ids.numel() // a.seq_len
        return ids[: n * a.seq_len].view(n, a.seq_len)

    def recover_and_save(loaded, name: str):
        """The LoRA recovery shared by the baseline and structured stages (same data, steps, lr,
        rank), then the model saved under ``work/name``; returns the report and its dict."""
        rec = prunekit.recover(
            loaded.model, windows(loaded.tokenizer), steps=a.steps, lora_rank=a.base_rank,
            lora_alpha=a.base_alpha, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed,
            progress=False,
        )  # fmt: skip
        loaded.model.save_pretrained(work / name)
        d = rec.to_dict()
        d.pop("modules")
        return rec, d

    if "dense" not in done and "dense" in a.stages:
        loaded = fresh()
        emit(
            {"stage": "dense", "ppl": ppl(loaded), "params": params(loaded.model), "ppl_chunks": a.ppl_chunks}
        )

    if "pat" not in done and "pat" in a.stages:
        loaded = fresh()
        t0 = time.perf_counter()
        rep = P.pat(
            loaded.model, windows(loaded.tokenizer), keep=a.keep, steps=a.steps, batch_size=a.batch_size,
            seq_len=a.seq_len, lr=a.lr, mask_lr=a.mask_lr, seed=a.seed, progress=False,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        merged_ppl = ppl(loaded)
        loaded.model.save_pretrained(work / "pat")
        loaded.tokenizer.save_pretrained(work / "pat")
        reloaded = prunekit.load_pruned(work / "pat", dtype=torch.float32).eval()
        x = task.chunks[:1]
        with torch.inference_mode():
            same = torch.equal(reloaded(input_ids=x).logits, loaded.model(input_ids=x).logits)
        prompt = loaded.tokenizer("The capital of France is", return_tensors="pt")
        gen = reloaded.generate(**prompt, max_new_tokens=12, do_sample=False)
        d = rep.to_dict()
        emit({"stage": "pat", "ppl": merged_ppl, "params": params(loaded.model), "pat_wall_s": wall,
              "train_s": rep.seconds, "reload_identical": same,
              "generated": loaded.tokenizer.decode(gen[0], skip_special_tokens=True), **d})  # fmt: skip

    if "baseline" not in done and "baseline" in a.stages:
        loaded = fresh()
        t0 = time.perf_counter()
        kept = magnitude_shrink(loaded.model, a.keep)
        shrink_s = time.perf_counter() - t0
        pruned_ppl = ppl(loaded)
        rec, d = recover_and_save(loaded, "baseline")
        emit({"stage": "baseline", "ppl": ppl(loaded), "ppl_pruned": pruned_ppl,
              "params": params(loaded.model),
              "shrink_s": shrink_s, "train_s": rec.seconds, "kept": kept,
              "hidden_after": loaded.model.config.hidden_size, **d})  # fmt: skip

    if "structured" not in done and "structured" in a.stages:
        if "pat" not in done:
            raise SystemExit("the structured stage matches the PAT model's parameters: run pat first")
        loaded = fresh()
        before = params(loaded.model)
        prunable = sum(
            m.weight.numel() for ly in loaded.model.model.layers
            for m in (*(getattr(ly.self_attn, f"{x}_proj") for x in "qkvo"),
                      *(getattr(ly.mlp, f"{x}_proj") for x in ("gate", "up", "down")))
        )  # fmt: skip
        sparsity = (before - done["pat"]["params"]) / prunable
        t0 = time.perf_counter()
        pr = prunekit.prune_weights(loaded.model, a.struct_method, sparsity, tokenizer=loaded.tokenizer)
        pr.finalize()
        prune_s = time.perf_counter() - t0
        pruned_ppl = ppl(loaded)
        rec, d = recover_and_save(loaded, "structured")
        emit({"stage": "structured", "method": a.struct_method, "sparsity": sparsity, "ppl": ppl(loaded),
              "ppl_pruned": pruned_ppl, "params": params(loaded.model), "prune_s": prune_s,
              "train_s": rec.seconds, **d})  # fmt: skip

    if "zeroshot" not in done and "zeroshot" in a.stages:
        from prunekit.bench.tasks.lm import MC_TASKS

        zs_tasks = [make_task(n, limit=a.zs_limit) for n in MC_TASKS]
        row = {"stage": "zeroshot", "zs_limit": a.zs_limit}
        dense = fresh()
        for name in ("dense", "pat", "baseline", "structured"):
            if name == "dense":
                loaded = dense
            elif (work / name / "config.json").is_file():
                model = prunekit.load_pruned(work / name, dtype=torch.float32).eval()
                loaded = Loaded(f"smollm2-{name}", "lm", model, dense.tokenizer)
            else:
                continue
            t0 = time.perf_counter()
            acc = {t.name: t.evaluate(loaded, nullcontext).metrics[t.primary] for t in zs_tasks}
            row[f"zs_{name}"] = acc
            row[f"zs_mean_{name}"] = statistics.fmean(acc.values())
            print(name, json.dumps(acc), f"{time.perf_counter() - t0:.0f} s", flush=True)
        emit(row)

    if "latency" not in done and "latency" in a.stages:
        dense = BUILTIN["smollm2"](torch.float32).model.eval()
        models = {"dense": dense}
        for name in ("pat", "baseline", "structured"):
            if (work / name / "config.json").is_file():
                models[name] = prunekit.load_pruned(work / name, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randint(3, 40000, (1, a.prefill), generator=g)
        prompt = torch.randint(3, 40000, (1, 64), generator=g)

        def prefill(model):
            def run():
                with torch.inference_mode():
                    model(input_ids=x)

            return run

        def decode(model):
            def run():
                with torch.inference_mode():
                    model.generate(
                        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=a.new_tokens,
                        min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0,
                    )  # fmt: skip

            return run

        tp = interleaved_latency({k: prefill(m) for k, m in models.items()}, repeats=a.repeats)
        td = interleaved_latency({k: decode(m) for k, m in models.items()}, repeats=max(a.repeats // 2, 2))
        row = {
            "stage": "latency",
            "prefill_tokens": a.prefill,
            "new_tokens": a.new_tokens,
            "repeats": a.repeats,
        }
        for k in models:
            row[f"prefill_s_{k}"] = statistics.median(tp[k])
            row[f"decode_tok_s_{k}"] = a.new_tokens / statistics.median(td[k])
            row[f"params_{k}"] = params(models[k])
        for k in [k for k in models if k != "dense"]:
            row[f"prefill_speedup_{k}"] = row["prefill_s_dense"] / row[f"prefill_s_{k}"]
            row[f"decode_speedup_{k}"] = row[f"decode_tok_s_{k}"] / row["decode_tok_s_dense"]
        emit(row)
    log.close()
    write_md(out, done)


def write_md(out: pathlib.Path, done: dict) -> None:
    if not all(k in done for k in ("dense", "pat", "baseline", "latency")):
        return
    dn, pt, bl, lat = done["dense"], done["pat"], done["baseline"], done["latency"]
    st, zs = done.get("structured"), done.get("zeroshot", {})

    def zero(name: str) -> str:
        v = zs.get(f"zs_mean_{name}")
        return "-" if v is None else f"{v:.3f}"

    def speed(name: str) -> str:
        if f"prefill_speedup_{name}" not in lat:
            return "- | -"
        return f"{lat[f'prefill_speedup_{name}']:.2f} | {lat[f'decode_speedup_{name}']:.2f}"

    lines = [
        f"# PAT on SmolLM2-135M-Instruct: hidden {pt['hidden_before']} -> {pt['hidden_after']}",
        "",
        f"{pt['steps']} steps of {pt['batch_size']}x{pt['seq_len']} LAMBADA tokens, lr {pt['lr']}, "
        f"fp32, {pt['threads']} thread(s); Wikipedia perplexity, {dn['ppl_chunks']} chunks of 512 tokens"
        + (f"; zero-shot: mean of 7 tasks, {zs['zs_limit']} questions each" if zs else "")
        + ".",
        "",
        "| model | hidden | params | Wikipedia ppl | zero-shot | training s | prefill speed-up "
        "| decode speed-up |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense | {pt['hidden_before']} | {dn['params']:,} | {dn['ppl']:.2f} | {zero('dense')} | - "
        "| 1.00 | 1.00 |",
        f"| PAT (merged) | {pt['hidden_after']} | {pt['params']:,} | {pt['ppl']:.2f} | {zero('pat')} | "
        f"{pt['train_s']:.0f} | {speed('pat')} |",
        f"| magnitude prune, no training | {bl['hidden_after']} | {bl['params']:,} | "
        f"{bl['ppl_pruned']:.2f} | - | - | - | - |",
        f"| magnitude prune + LoRA r={bl['lora_rank']} | {bl['hidden_after']} | {bl['params']:,} | "
        f"{bl['ppl']:.2f} | {zero('baseline')} | {bl['train_s']:.0f} | {speed('baseline')} |",
    ]
    if st:
        lines += [
            f"| {st['method']} {st['sparsity']:.3f}, no training | {pt['hidden_before']} | "
            f"{st['params']:,} | "
            f"{st['ppl_pruned']:.2f} | - | - | - | - |",
            f"| {st['method']} {st['sparsity']:.3f} + LoRA r={st['lora_rank']} | {pt['hidden_before']} | "
            f"{st['params']:,} | {st['ppl']:.2f} | {zero('structured')} | {st['train_s']:.0f} | "
            f"{speed('structured')} |",
        ]
    lines += [
        "",
        f"PAT merged vs hooked (eval gate): max |logit| error {pt['merge_error']:.2e}; reload identical: "
        f"{pt['reload_identical']}; channels with m > 0 at the end: {pt['above_threshold']} (asked "
        f"{pt['keep']}); last loss terms "
        f"{json.dumps({k: round(v, 4) for k, v in pt['terms_last'].items()})}.",
        f"Greedy generation of the reloaded PAT model: {pt['generated']!r}.",
        f"Prefill of 1x{lat['prefill_tokens']} tokens: dense {lat['prefill_s_dense'] * 1e3:.0f} ms, PAT "
        f"{lat['prefill_s_pat'] * 1e3:.0f} ms; decode dense {lat['decode_tok_s_dense']:.1f} tok/s, PAT "
        f"{lat['decode_tok_s_pat']:.1f} tok/s (medians, interleaved, one process).",
    ]
    if zs:
        names = list(zs["zs_dense"])
        lines += ["", "| zero-shot | " + " | ".join(names) + " | mean |", "|---|" + "---|" * (len(names) + 1)]
        for name in ("dense", "pat", "baseline", "structured"):
            if f"zs_{name}" in zs:
                acc = zs[f"zs_{name}"]
                lines.append(
                    f"| {name} | " + " | ".join(f"{acc[n]:.2f}" for n in names) + f" | {zero(name)} |"
                )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
