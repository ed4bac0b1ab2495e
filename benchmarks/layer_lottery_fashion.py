"""Layers-Lottery in miniature (spec training-aware.md §9; the paper has no code): a ResNet-lite
(3 stages x 4 blocks, widths 16/32/64) on Fashion-MNIST, residual blocks scored at θ₀ on one batch of
256 and removed before training.

Arms, for p in ``--remove`` (default 1, 2, 3) removable blocks:
- ``grasp`` / ``snip``: :func:`prunekit.training.layer_lottery` (block score = mean per-weight score,
  ours); the rebuilt network inherits the kept blocks' θ₀;
- ``random``: p removable blocks drawn at random (seeded), same θ₀ inheritance;
- ``filters``: every block's inner width scaled by one ratio, the widest whose parameter count is at
  most the GraSP network's at the same p (filter pruning at an equal parameter count, ours), a fresh
  init;
- ``dense``: the full network from the same θ₀.
Winning ticket (paper): Acc(F') + ξ >= Acc(F), ξ = 1 pp or one std of the dense runs.

**CPU-reduced**: each run trains ``--epochs`` epochs on a ``--train`` image subset (default 10 000 of
60 000; a full epoch of this network takes several minutes on this 2-core machine); test accuracy on
``--test`` images (default all 10 000).

Rows go to ``<out>.jsonl`` as they finish (rerunning skips rows already there); then ``<out>.md``
(mean ± std over seeds) and ``<out>.png`` (accuracy against blocks removed and MACs).

Run: PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/layer_lottery_fashion.py
Smoke: ... --train 512 --test 500 --epochs 1 --seeds 0 --remove 1 --out /tmp/lottery_smoke/lottery
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import _shared
import torch

from prunekit.models import convnets as C
from prunekit.training import layer_lottery, train_network

ARMS = ("dense", "grasp", "snip", "random", "filters")


def dense_net(seed: int) -> C.ResNetLite:
    return C.ResNetLite(stages=3, blocks=4, widths=(16, 32, 64), seed=seed)


def filters_net(seed: int, target_params: int) -> tuple[C.ResNetLite, float]:
    """Inner widths scaled by the largest ratio r (bisection) whose network has <= target_params."""
    dense = dense_net(seed)
    inner = [g for g in C.group_widths(dense) if g.startswith("inner.")]
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        net = C.with_widths(dense, ratios=dict.fromkeys(inner, max(mid, 1e-6)), seed=seed)
        lo, hi = (mid, hi) if C.count_params(net) <= target_params else (lo, mid)
    return C.with_widths(dense, ratios=dict.fromkeys(inner, max(lo, 1e-6)), seed=seed), lo


def build(arm: str, p: int, seed: int, batch: dict, grasp_params: dict):
    dense = dense_net(seed)
    if arm == "dense":
        return dense, {"removed": []}
    if arm in ("grasp", "snip"):
        net, rep = layer_lottery(dense, batch, remove=p, score=arm)
        if arm == "grasp":
            grasp_params[(p, seed)] = rep.params_after
        return net, {"removed": rep.removed, "block_scores": rep.scores}
    if arm == "random":
        removable = sorted(n for n, b in C.blocks(dense).items() if b.removable)
        g = torch.Generator().manual_seed(7919 * seed + p)
        pick = [removable[i] for i in torch.randperm(len(removable), generator=g)[:p].tolist()]
        C.remove_blocks(dense, pick)
        return dense, {"removed": pick}
    if arm == "filters":
        if (p, seed) not in grasp_params:
            net, rep = layer_lottery(dense, batch, remove=p, score="grasp")
            grasp_params[(p, seed)] = rep.params_after
        net, r = filters_net(seed, grasp_params[(p, seed)])
        return net, {"removed": [], "inner_ratio": r}
    raise ValueError(f"unknown arm {arm!r}; arms are {ARMS}")


def run(args) -> None:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".jsonl")
    done = _shared.done_keys(path)
    train = C.fashion_batches("train", args.batch_size, limit=args.train, seed=0)
    score_batch = C.fashion_batches("train", args.score_batch, limit=args.score_batch, seed=1)[0]
    steps = args.epochs * len(train)
    arms = [a for a in ARMS if not args.arms or a in args.arms.split(",")]
    jobs = [(a, 0) for a in arms if a == "dense"] + [
        (a, p) for p in args.remove for a in arms if a != "dense"
    ]
    grasp_params: dict = {}
    with path.open("a") as f:
        for seed in args.seeds:
            for arm, p in jobs:
                key = f"{arm}/{p}/{seed}"
                if key in done:
                    continue
                t0 = time.perf_counter()
                net, info = build(arm, p, seed, score_batch, grasp_params)
                build_s = time.perf_counter() - t0
                res = train_network(net, train, steps=steps, lr=args.lr, seed=seed, progress=False)
                acc = C.evaluate_classifier(net, "test", limit=args.test)
                row = {
                    "key": key, "arm": arm, "remove": p, "seed": seed, "accuracy": acc,
                    "params": C.count_params(net), "macs": C.count_flops(net), "blocks": len(C.blocks(net)),
                    "train_s": res.seconds, "build_s": build_s, "steps": steps, "epochs": args.epochs,
                    "train_images": sum(len(b["labels"]) for b in train),
                    "final_loss": res.losses[-1] if res.losses else None, **info,
                }  # fmt: skip
                f.write(json.dumps(row) + "\n")
                f.flush()
                print(f"{key}: acc {acc:.4f}, removed {info['removed']}, {row['macs']} MACs, "
                      f"train {res.seconds:.1f} s", flush=True)  # fmt: skip
    report(out)


def report(out: pathlib.Path) -> None:
    rows = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines() if x.strip()]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["remove"], r["arm"]), []).append(r)
    dense = groups.get((0, "dense"), [])
    d_acc, d_sd = _shared.mean_sd([r["accuracy"] for r in dense]) if dense else (None, 0.0)
    xi = max(0.01, d_sd)
    lines = [
        "# Layers-Lottery in miniature: ResNet-lite (3x4 blocks, 16/32/64) on Fashion-MNIST",
        "",
        f"CPU-reduced: {rows[0]['train_images']} training images, {rows[0]['epochs']} epoch(s) "
        f"({rows[0]['steps']} steps), AdamW; blocks scored on one batch of 256 at θ₀; test accuracy on "
        f"the Fashion-MNIST test images. Rows: `{out.name}.jsonl`. Winning ticket: Acc + ξ >= dense, "
        f"ξ = max(1 pp, dense std) = {100 * xi:.2f} pp.",
        "",
        "| blocks removed | arm | seeds | accuracy | vs dense | ticket? | params | MACs | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (p, arm), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], ARMS.index(kv[0][1]))):
        a, sd = _shared.mean_sd([r["accuracy"] for r in rs])
        t, _ = _shared.mean_sd([r["train_s"] for r in rs])
        params, macs = statistics.fmean(r["params"] for r in rs), statistics.fmean(r["macs"] for r in rs)
        gain = "-" if d_acc is None or arm == "dense" else f"{100 * (a - d_acc):+.2f} pp"
        ticket = "-" if d_acc is None or arm == "dense" else ("yes" if a + xi >= d_acc else "no")
        lines.append(
            f"| {p} | {arm} | {len(rs)} | {100 * a:.2f} ± {100 * sd:.2f} | {gain} | {ticket} | "
            f"{params:,.0f} | {macs:,.0f} | {t:.1f} |"
        )
    _shared.write_table(out, lines)
    plt = _shared.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm in ARMS:
        pts = sorted(
            (k[0], _shared.mean_sd([r["accuracy"] for r in v]), statistics.fmean(r["macs"] for r in v))
            for k, v in groups.items()
            if k[1] in (arm, "dense")
        )
        if not pts or arm == "dense":
            continue
        axes[0].errorbar([q[0] for q in pts], [100 * q[1][0] for q in pts], [100 * q[1][1] for q in pts],
                         marker="o", capsize=3, label=arm)  # fmt: skip
        axes[1].plot([q[2] for q in pts], [100 * q[1][0] for q in pts], "o-", label=arm)
    if d_acc is not None:
        for ax in axes:
            ax.axhline(100 * d_acc, color="k", lw=0.8, ls="--", label="dense")
    axes[0].set_xlabel("residual blocks removed (p)")
    axes[1].set_xlabel("MACs per image")
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Layers-Lottery on Fashion-MNIST (CPU-reduced)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=10_000, help="training images (a seeded subset)")
    ap.add_argument("--test", type=int, default=None, help="test images (default: all 10 000)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--score-batch", type=int, default=256, help="images in the one scoring batch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--remove", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", default="", help=f"comma-separated subset of {ARMS}")
    ap.add_argument("--out", default="benchmarks/results/layer_lottery_fashion")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.report_only:
        report(pathlib.Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
