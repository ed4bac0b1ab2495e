"""The MoEfied SmolLM2 (``prunekit.zoo.smollm2_moe``) measured: build time, router top-k recall on
held-out calibration tokens, and Wikipedia perplexity at every k of E, against dense SmolLM2.

Builds the MoE of the default recipe (or loads it from the cache; ``--rebuild`` builds again and
times it), in fp32. One model serves every k: ``prunekit.zoo.moe_smol.set_top_k`` sets k and
rescales the experts' ``down_proj`` so the k weights stay about 1/k. ``--betas`` also evaluates
routers with larger logit scales (weights that follow the router's confidence) at each k, by scaling
the router weights. Perplexity: ``make_task("wikitext", limit=--chunks)``, non-overlapping chunks of
512 tokens.

Run (about 10 min on 2 cores with a cached model, plus the build when it is not cached):
    PYTHONPATH=src python benchmarks/moe_build.py
Writes JSON lines to ``benchmarks/results/smollm2_moe.jsonl`` and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from contextlib import nullcontext

import torch

from prunekit import zoo
from prunekit.bench.models import Loaded
from prunekit.bench.tasks import make_task
from prunekit.zoo.moe_smol import MoERecipe, build_log, set_top_k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,2,4,8,16")
    ap.add_argument("--betas", default="", help="extra router logit scales to try, e.g. 0.5,1,2")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/smollm2_moe.jsonl")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    recipe = MoERecipe()
    out = pathlib.Path(a.out)
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    task = make_task("wikitext", limit=a.chunks)
    dense, tok = zoo.smollm2(torch.float32)
    emit({"model": "smollm2 (dense)", "k": None, "beta": None,
          "ppl": task.evaluate(Loaded("smollm2", "lm", dense, tok), nullcontext).metrics["ppl"]})  # fmt: skip
    del dense
    t = time.perf_counter()
    moe, tok = zoo.smollm2_moe(torch.float32, recipe=recipe, rebuild=a.rebuild)
    load_s = time.perf_counter() - t
    log = build_log(recipe)
    emit({"model": "smollm2-moe", "recipe": recipe.key(), "build_s": log["seconds_build"], "load_s": load_s,
          "recall_heldout": log["recall_heldout"], "recall_random": log["recall_random"],
          "calibration_tokens": log["calibration_tokens"], "fit_tokens": log["fit_tokens"]})  # fmt: skip
    routers = [layer.mlp.gate.weight.detach().clone() for layer in moe.model.layers]
    betas = [recipe.beta, *(float(b) for b in a.betas.split(",") if b)]
    for beta in betas:
        with torch.no_grad():
            for layer, w in zip(moe.model.layers, routers, strict=True):
                layer.mlp.gate.weight.copy_(w * (beta / recipe.beta))
        for k in (int(k) for k in a.ks.split(",")):
            set_top_k(moe, k)
            t = time.perf_counter()
            ppl = task.evaluate(Loaded("smollm2", "lm", moe, tok), nullcontext).metrics["ppl"]
            emit(
                {"model": "smollm2-moe", "k": k, "beta": beta, "ppl": ppl, "eval_s": time.perf_counter() - t}
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out.with_suffix(".md").write_text(table(rows, recipe))


def table(rows: list[dict], recipe: MoERecipe) -> str:
    dense = next(r["ppl"] for r in rows if r["model"] == "smollm2 (dense)")
    info = next(r for r in rows if "recall_heldout" in r)
    E = recipe.n_experts
    lines = [
        f"# SmolLM2-135M MoEfied: {E} experts of {1536 // E} channels per layer (recipe `{info['recipe']}`)",
        "",
        f"Built in {info['build_s']:.0f} s on this machine's CPU ({info['calibration_tokens']} calibration "
        f"tokens, {info['fit_tokens']} for the fits, the rest held out). Wikipedia perplexity, "
        f"512-token chunks, fp32; dense SmolLM2: **{dense:.2f}**.",
        "",
        "| k of E | beta | ppl | vs dense | router top-k recall (held out) | random |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("k") is None:
            continue
        rec = info["recall_heldout"].get(str(r["k"]))
        rnd = info["recall_random"].get(str(r["k"]))
        lines.append(
            f"| {r['k']} of {E} | {r['beta']:g} | {r['ppl']:.4g} | {r['ppl'] / dense:.3g}x | "
            f"{'' if rec is None else f'{rec:.3f}'} | {'' if rnd is None else f'{rnd:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
