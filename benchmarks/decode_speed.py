"""Draft trees on SmolLM2-135M-Instruct: MAT, wall-clock speedup against greedy and identical-output
rate per method and task, side by side in one process (issue 24).

Every prompt runs every method in turn (interleaved), so slow drifts of the shared CPU hit all of
them alike. Speedup = greedy seconds / method seconds, summed over a task's prompts, where greedy is
``model.generate(do_sample=False)``. Identical = the method's tokens equal greedy's. Token
Recycling's matrix and the fitted budgets carry over from prompt to prompt (the official hot
start), in the order below; "cold" resets the matrix before every prompt.

    python benchmarks/decode_speed.py                      # 3 prompts per task, 64 new tokens
    python benchmarks/decode_speed.py --prompts 5 --new 96 --out benchmarks/results/decode_speed_big

Rows go to ``<out>.jsonl`` as they finish (rerunning skips the rows already there); the summary to
``<out>.md`` and the plot (speedup against MAT by task) to ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from structured_smollm2 import resume

from prunekit.speculative import generate, make_drafter, measure_costs, truncated
from prunekit.speculative.tasks import TASKS, task_inputs

#: (label, kind, options): kind "hf" runs model.generate, "ours" runs prunekit.speculative.generate
METHODS = [
    ("greedy", "hf", {}),
    ("hf prompt lookup", "hf", {"prompt_lookup_num_tokens": 10}),
    ("hf assistant (8 layers)", "hf", {"assistant": 8}),
    ("greedy, prunekit loop", "ours", {"drafter": None, "tree": 0}),
    ("token recycling, official 80", "ours", {"drafter": "token_recycling", "tree": "official"}),
    (
        "token recycling, cold, official 80",
        "ours",
        {"drafter": "token_recycling", "tree": "official", "cold": True},
    ),
    ("token recycling, fitted", "ours", {"drafter": "token_recycling", "tree": "auto"}),
    ("prompt-lookup tree, fitted", "ours", {"drafter": "prompt_lookup", "tree": "auto"}),
    ("prompt-lookup tree, 24", "ours", {"drafter": "prompt_lookup", "tree": 24}),
    ("draft tree, 24", "ours", {"drafter": "draft_tree", "tree": 24}),
    ("rasd unpruned, 24", "ours", {"drafter": "rasd", "tree": 24, "prune": False}),
    ("rasd, 24", "ours", {"drafter": "rasd", "tree": 24}),
    ("rasd, fitted", "ours", {"drafter": "rasd", "tree": "auto"}),
]


def run_hf(model, ids, new: int, opts: dict, assistants: dict):
    kw = {"do_sample": False, "max_new_tokens": new, "min_new_tokens": 0}
    if "prompt_lookup_num_tokens" in opts:
        kw["prompt_lookup_num_tokens"] = opts["prompt_lookup_num_tokens"]
    if "assistant" in opts:
        kw["assistant_model"] = assistants.setdefault(opts["assistant"], truncated(model, opts["assistant"]))
    t = time.perf_counter()
    out = model.generate(ids, **kw)
    return out, time.perf_counter() - t, None


def run_ours(model, ids, new: int, label: str, opts: dict):
    opts = dict(opts)
    cold = opts.pop("cold", False)
    drafter, tree = opts.pop("drafter"), opts.pop("tree")
    d = (
        None if drafter is None else _kept.setdefault(label, make_drafter(drafter, None, **opts))
    )  # one per method
    if cold:
        d.reset()
    out = generate(model, ids, drafter=d, max_new_tokens=new, tree=tree)
    return out.sequences, out.stats.wall_s, out.stats.as_dict()


_kept: dict = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=3, help="prompts per task")
    ap.add_argument("--new", type=int, default=64, help="max new tokens")
    ap.add_argument("--out", default="benchmarks/results/decode_speed")
    ap.add_argument("--methods", default="", help="labels to run, separated by semicolons (default: all)")
    args = ap.parse_args()

    from prunekit.zoo import smollm2

    model, tok = smollm2(torch.float32)
    model.config._attn_implementation = "sdpa"
    path, done = resume(args.out + ".jsonl")
    costs = measure_costs(model)
    (pathlib.Path(args.out + "-costs.json")).write_text(json.dumps(costs.as_dict()))
    print("forward cost ratios c(n)/c(1):", {n: round(costs.ratio(n), 2) for n in costs.sizes}, flush=True)
    methods = [m for m in METHODS if not args.methods or m[0] in args.methods.split(";")]
    assistants: dict = {}
    eos = model.generation_config.eos_token_id
    with path.open("a") as f:
        for task in TASKS:
            for i, ids in enumerate(task_inputs(tok, task, args.prompts)):
                ref = None
                for label, kind, opts in methods:
                    key = f"{task}/{i}/{label}"
                    if kind == "hf":
                        out, secs, stats = run_hf(model, ids, args.new, opts, assistants)
                    else:
                        out, secs, stats = run_ours(model, ids, args.new, label, opts)
                    if label == "greedy":
                        ref = out
                    if key in done:
                        continue
                    new = out.shape[1] - ids.shape[1]
                    same = bool(ref is not None and torch.equal(out, ref))
                    row = {"key": key, "task": task, "prompt": i, "method": label,
                           "prompt_tokens": ids.shape[1], "new_tokens": new, "seconds": secs,
                           "identical": same, "eos": eos, "stats": stats}  # fmt: skip
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    mat = f"{stats['mat']:.2f}" if stats else "-"
                    print(
                        f"{key}: {secs:.2f} s, {new} tokens, MAT {mat}, identical {row['identical']}",
                        flush=True,
                    )
    report(args.out, costs)


def report(out: str, costs=None) -> None:
    rows = [json.loads(x) for x in pathlib.Path(out + ".jsonl").read_text().splitlines()]
    greedy = {(r["task"], r["prompt"]): r["seconds"] for r in rows if r["method"] == "greedy"}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table: dict[str, dict] = {}
    for m in methods:
        for task in [*TASKS, "all"]:
            rs = [r for r in rows if r["method"] == m and (task == "all" or r["task"] == task)]
            rs = [r for r in rs if (r["task"], r["prompt"]) in greedy]
            if not rs:
                continue
            g = sum(greedy[(r["task"], r["prompt"])] for r in rs)
            s = sum(r["seconds"] for r in rs)
            tokens = sum(r["new_tokens"] for r in rs)
            forwards = sum(r["stats"]["forwards"] for r in rs) if rs[0]["stats"] else None
            acc: dict[str, int] = {}
            for r in rs:
                for k, v in ((r["stats"] or {}).get("accepted") or {}).items():
                    acc[k] = acc.get(k, 0) + v
            nodes = sum(r["stats"]["nodes"] for r in rs) if forwards else None
            table.setdefault(m, {})[task] = {
                "speedup": g / s,
                "mat": tokens / forwards if forwards else None,
                "identical": sum(r["identical"] for r in rs) / len(rs),
                "n": len(rs),
                "accepted": acc,
                "nodes": nodes / forwards if forwards else None,
                "budget": rs[-1]["stats"]["budget"] if rs[0]["stats"] else None,
            }
    lines = [
        "# Draft trees on SmolLM2-135M-Instruct (fp32, SDPA, CPU)",
        "",
        f"Command: `python benchmarks/decode_speed.py` ({len(greedy)} prompts; rows in "
        f"`{pathlib.Path(out).name}.jsonl`).",
        "Speedup: greedy `generate()` seconds / method seconds over the same prompts (interleaved, one "
        "process).",
        "MAT: new tokens per target forward. Identical: the share of prompts whose output equals greedy's.",
        "",
        "| method | "
        + " | ".join(f"{t} speedup / MAT" for t in [*TASKS, "all"])
        + " | identical | nodes/step | budget |",
        "|---|" + "---|" * (len(TASKS) + 4),
    ]
    for m, per in table.items():
        cells = []
        for t in [*TASKS, "all"]:
            c = per.get(t)
            cells.append(
                "-"
                if c is None
                else f"{c['speedup']:.2f}× / " + ("-" if c["mat"] is None else f"{c['mat']:.2f}")
            )
        a = per["all"]
        nodes = "-" if a["nodes"] is None else f"{a['nodes']:.1f}"
        lines.append(
            f"| {m} | "
            + " | ".join(cells)
            + f" | {a['identical']:.0%} | {nodes} | {a['budget'] if a['budget'] is not None else '-'} |"
        )
    lines += [
        "",
        "Accepted draft tokens by source (all tasks):",
        "",
        "| method | " + " | ".join(["draft", "retrieval", "both", "recycling"]) + " |",
        "|---|---|---|---|---|",
    ]
    for m, per in table.items():
        acc = per["all"]["accepted"]
        if acc:
            lines.append(
                f"| {m} | "
                + " | ".join(str(acc.get(k, "-")) for k in ["draft", "retrieval", "both", "recycling"])
                + " |"
            )
    if costs is None and pathlib.Path(out + "-costs.json").exists():
        from prunekit.speculative import ForwardCosts

        c = json.loads(pathlib.Path(out + "-costs.json").read_text())
        costs = ForwardCosts(tuple(c["sizes"]), tuple(c["seconds"]), c["past"])
    if costs is not None:
        head = f"Forward cost, {costs.past} cached tokens (c(n) / c(1); c(1) = {costs(1) * 1e3:.1f} ms):"
        lines += [
            "",
            head,
            "",
            "| tokens | " + " | ".join(map(str, costs.sizes)) + " |",
            "|---|" + "---|" * len(costs.sizes),
            "| cost | " + " | ".join(f"{costs.ratio(n):.2f}" for n in costs.sizes) + " |",
        ]
    pathlib.Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, table)


def plot(out: str, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = dict(zip(TASKS, "osD^", strict=True))
    colors = plt.cm.tab20.colors
    for j, (m, per) in enumerate(table.items()):
        for t in TASKS:
            c = per.get(t)
            if c and c["mat"] is not None:
                ax.scatter(c["mat"], c["speedup"], marker=markers[t], color=colors[j % 20], s=40,
                           label=m if t == TASKS[0] else None)  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("MAT (tokens per target forward)")
    ax.set_ylabel("wall-clock speedup vs greedy generate()")
    title = (
        "Draft trees on SmolLM2-135M, CPU (marker = task: o summ., s context QA, D numbers, ^ continuation)"
    )
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=120)


if __name__ == "__main__":
    main()
