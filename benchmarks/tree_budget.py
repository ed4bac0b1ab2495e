"""Which tree size pays on this device: the expected speedup over greedy of every cut of each
drafter's tree, from its measured node acceptance and the measured forward costs (issue 24).

Each drafter decodes the 12 prompts of ``decode_speed.py`` (3 per task, 64 new tokens) verifying
its full tree at every step, so each node's acceptance rate is counted on every step. Then, for
each cut ``n`` (the ``n`` best nodes), the expected speedup over plain decoding is::

    (1 + p_1 + ... + p_n) * c(1) / (mean over steps of c(min(n, size) + 1) + draft seconds per step)

the quantity ``tree="auto"`` maximises. A drafter whose curve stays below 1 cannot beat greedy
decoding on this device with any cut of its tree.

    python benchmarks/tree_budget.py   # about 5 minutes on 2 CPU cores

Writes ``benchmarks/results/tree_budget.{json,md,png}``.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch

from prunekit.speculative import RASD, TokenRecycling, generate, measure_costs
from prunekit.speculative.tasks import TASKS, task_inputs

OUT = pathlib.Path("benchmarks/results/tree_budget")


def curve(d, costs) -> tuple[np.ndarray, float]:
    gains = d.gains()
    n = np.arange(len(gains) + 1)
    tokens = 1.0 + np.concatenate([[0.0], np.cumsum(gains)])
    sizes = np.asarray(d.stats.sizes)
    verify = costs(np.minimum(n[:, None], sizes[None, :]) + 1).mean(1)
    total, count = d.draft_time
    draft = total / max(count, 1)
    return tokens * costs(1) / (verify + np.where(n > 0, draft, 0.0)), draft


def main() -> None:
    from prunekit.zoo import smollm2

    model, tok = smollm2(torch.float32)
    model.config._attn_implementation = "sdpa"
    costs = measure_costs(model)
    prompts = [ids for task in TASKS for ids in task_inputs(tok, task, 3)]
    drafters = {
        "token_recycling (hot, official 80)": TokenRecycling(),
        "prompt_lookup tree (24)": RASD(draft_model=False),
        "draft tree (8-layer draft, 24)": RASD(retrieval=False),
        "rasd (24)": RASD(),
    }
    rows = {}
    for name, d in drafters.items():
        mats = []
        for ids in prompts:  # calibrate past every step: every step verifies and counts the full tree
            out = generate(model, ids, drafter=d, max_new_tokens=64, tree="auto", calibrate=10**9)
            mats.append((out.stats.new_tokens, out.stats.forwards))
        speed, draft = curve(d, costs)
        best = int(np.argmax(speed))
        rows[name] = {
            "mat_full": sum(t for t, _ in mats) / sum(f for _, f in mats),
            "draft_ms": draft * 1000,
            "best_n": best,
            "best_speedup": float(speed[best]),
            "full_speedup": float(speed[-1]),
            "curve": speed.tolist(),
            "mean_nodes": float(np.mean(d.stats.sizes)),
        }
        print(name, {k: v for k, v in rows[name].items() if k != "curve"}, flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps({"costs": costs.as_dict(), "drafters": rows}))
    lines = [
        "# Which tree size pays on this CPU (SmolLM2-135M-Instruct, fp32)",
        "",
        "Command: `python benchmarks/tree_budget.py`. Expected speedup over plain decoding of the best",
        "cut of each drafter's tree, from its node acceptance (12 prompts, full tree verified at every",
        "step) and the measured forward costs; `n` = draft nodes kept.",
        "",
        "| drafter | MAT, full tree | draft ms / step | full tree: expected speedup | best n "
        "| best expected speedup |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['mat_full']:.2f} | {r['draft_ms']:.1f} | {r['full_speedup']:.2f}× "
            f"| {r['best_n']} | {r['best_speedup']:.2f}× |"
        )
    lines += ["", f"c(1) = {costs(1) * 1000:.1f} ms; c(n)/c(1): "
              + ", ".join(f"{n}: {costs.ratio(n):.2f}" for n in costs.sizes)]  # fmt: skip
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        ax.plot(range(len(r["curve"])), r["curve"], label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("draft nodes kept (best first)")
    ax.set_ylabel("expected speedup vs plain decoding")
    ax.set_title("Tree size vs expected speedup, SmolLM2-135M on a 2-core CPU", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
