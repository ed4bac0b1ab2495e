"""Pruning by explaining on a Fashion-MNIST CNN (spec ``training-aware.md`` §4, demonstration (a)).

A 3-conv CNN (``ConvNet(widths=(32, 64, 64))``: conv3x3-BN-ReLU, 2x2 max-pool after the first two,
one Linear) is trained from scratch for ``--epochs`` epochs (Adam, lr 1e-3, batch 128, seeded; the
trained weights are cached next to ``--out``). Every criterion scores the 160 filters once, from
``--per-class`` reference images per class of the *training* split (PXP's "10 samples per class"),
and the filters are pruned **globally** at each rate 0, 0.05, ..., 0.9 (``int(rate · 160)`` filters,
every layer keeping at least one) by reversible masks, **without fine-tuning**; top-1 accuracy on
the first ``--test`` test images.

Criteria (``prunekit.training.lrp_rules``):

- ``lrp_yeom``: Yeom et al. 2021: α1β0 on convs, ε on the Linear, BN passed through, ``Σ_{n,h,w}|R|``
  at the conv output, per-layer ``v/Σv``;
- ``lrp_pxp``: PXP (Hatefi et al. 2024) default: ε everywhere (BN with ε), ``Σ_n|Σ_{h,w} R|``, no
  normalisation;
- ``l1`` (filter L1 norm), ``taylor`` (``|a·g|``, Molchanov), ``gradient`` (``Σ|∂L/∂a|``): with
  Yeom's per-layer normalisation (his code applies ``--norm`` to every criterion);
- ``random``: seeded uniform scores, ``--seeds`` seeds.

Relevance starts from the one-hot of the true class, each reference image on its own (PXP's batch
size 1; for one image Yeom's ``output·T / sum(output·T)`` is this one-hot too).

Metrics per criterion: ``A_PR`` = the mean accuracy over the rates (the paper's average of the
points) and ``A_PR_trapz`` (``np.trapz`` over the rates divided by their span); ``Top-PR`` = the
highest rate whose accuracy is at least 95 % of the unpruned one. Claim (Yeom, PXP): without
fine-tuning and with scarce reference data, LRP >= the other criteria.

Cost on one busy CPU thread: training ~4 min (0.24 s per batch of 128), one evaluation on 2000 test
images ~3 s, 190 evaluations (5 criteria + 5 random seeds, 19 rates): about 15 min in all.

Resumable: rows already in ``--out`` (JSON lines, one per criterion, seed and rate) are skipped.
Writes ``--out``, a markdown summary (``.md``) and a plot (``.png``) next to it.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/lrp_fashion.py
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/lrp_fashion.py --smoke   # a tiny check
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import _shared
import numpy as np
import torch
import torch.nn.functional as F

from prunekit.models.convnets import ConvNet, evaluate_classifier, fashion_batches, groups, mask_channels
from prunekit.training import lrp_rules as lrp

RATES = [round(0.05 * i, 2) for i in range(19)]  # 0 .. 0.9
CRITERIA = ["lrp_yeom", "lrp_pxp", "l1", "taylor", "gradient", "random"]


def train(args, path: pathlib.Path) -> ConvNet:
    model = ConvNet(widths=(32, 64, 64), seed=args.seed)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    batches = fashion_batches("train", 128, limit=args.train_limit, seed=args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(args.seed)
    model.train()
    t0 = time.time()
    for epoch in range(args.epochs):
        for b in batches:
            loss = F.cross_entropy(model(b["pixel_values"]).logits, b["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def reference(per_class: int, seed: int) -> list[dict]:
    """``per_class`` training images of each class (the first ones in a seeded shuffle), one batch
    of one image each."""
    (b,) = fashion_batches("train", 60000, seed=seed + 1)
    picks = torch.cat([(b["labels"] == c).nonzero().flatten()[:per_class] for c in range(10)])
    return [{"pixel_values": b["pixel_values"][i : i + 1], "labels": b["labels"][i : i + 1]} for i in picks]


def scores(model: ConvNet, name: str, ref: list[dict], seed: int) -> dict[str, torch.Tensor]:
    yeom = lrp.Composite(
        layers={torch.nn.Conv2d: "alpha1beta0", torch.nn.Linear: "epsilon"}, batchnorm="pass"
    )
    if name == "lrp_yeom":
        return lrp.lrp_scores(model, ref, yeom, "onehot", "before_sum", "layer_l1")
    if name == "lrp_pxp":
        return lrp.lrp_scores(model, ref, lrp.PXP_EPSILON, "onehot", "after_sum", None)
    if name == "l1":
        s = lrp.weight_l1_scores(model)
    elif name == "taylor":
        s = lrp.taylor_scores(model, ref)
    elif name == "gradient":
        s = lrp.gradient_scores(model, ref)
    else:
        return lrp.random_scores(model, seed)
    return {k: v / v.sum() for k, v in s.items()}


def summarise(rows: list[dict], out: pathlib.Path) -> None:
    by: dict[str, dict[int, dict[float, float]]] = {}
    for r in rows:
        by.setdefault(r["criterion"], {}).setdefault(r["seed"], {})[r["rate"]] = r["acc"]
    lines = [
        "| criterion | seeds | A_PR (mean) | A_PR (trapz) | Top-PR | acc @50% | acc @70% |",
        "|---|---|---|---|---|---|---|",
    ]
    curves = {}
    for crit in CRITERIA:
        runs = [v for v in by.get(crit, {}).values() if all(rt in v for rt in RATES)]
        if not runs:
            continue
        acc = np.array([[run[rt] for rt in RATES] for run in runs])  # (seeds, rates)
        base = acc[:, 0:1]
        apr = acc.mean(1)
        trapz = np.trapezoid(acc, RATES, axis=1) / (RATES[-1] - RATES[0])
        ok = acc >= 0.95 * base
        top = np.array([max(rt for rt, o in zip(RATES, row, strict=True) if o) for row in ok])

        def fmt(v):
            return f"{v.mean():.3f}" + (f" ± {v.std():.3f}" if len(v) > 1 else "")

        lines.append(
            f"| {crit} | {len(runs)} | {fmt(apr)} | {fmt(trapz)} | {fmt(top)} | "
            f"{fmt(acc[:, RATES.index(0.5)])} | {fmt(acc[:, RATES.index(0.7)])} |"
        )
        curves[crit] = acc
    _shared.write_table(out, lines)
    plt = _shared.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for crit, acc in curves.items():
        m = acc.mean(0)
        (line,) = ax.plot(RATES, m, marker="o", ms=3, label=crit)
        if len(acc) > 1:
            ax.fill_between(RATES, acc.min(0), acc.max(0), alpha=0.2, color=line.get_color())
    ax.set_xlabel("fraction of conv filters pruned (global, no fine-tuning)")
    ax.set_ylabel("Fashion-MNIST top-1")
    ax.set_title("Pruning by explaining: 3-conv CNN (32-64-64)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/lrp_fashion.jsonl")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test", type=int, default=2000, help="test images (10000: the whole split, ~4x slower)")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--seeds", type=int, default=5, help="seeds of the random criterion")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--smoke", action="store_true", help="tiny: 2000 training images, 1 epoch, 500 test images"
    )
    args = p.parse_args()
    rates = RATES
    if args.smoke:
        args.epochs, args.train_limit, args.test, args.seeds = 1, 2000, 500, 2
        args.out = str(pathlib.Path(args.out).with_name("lrp_fashion_smoke.jsonl"))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = train(args, out.with_suffix(".pt"))
    rows = _shared.rows(out)
    done = {(r["criterion"], r["seed"], r["rate"]) for r in rows}
    ref = reference(args.per_class, args.seed)
    total = sum(g.width for g in groups(model).values())
    for crit in CRITERIA:
        for seed in range(args.seeds if crit == "random" else 1):
            todo = [rt for rt in rates if (crit, seed, rt) not in done]
            if not todo:
                continue
            t0 = time.time()
            s = scores(model, crit, ref, seed)
            t_score = time.time() - t0
            for rt in todo:
                keep = lrp.least_relevant(s, rt)
                with mask_channels(model, keep):
                    acc = evaluate_classifier(model, "test", limit=args.test)
                row = {
                    "criterion": crit, "seed": seed, "rate": rt, "acc": acc,
                    "pruned": total - sum(len(k) for k in keep.values()), "filters": total,
                    "score_s": round(t_score, 2), "test": args.test, "per_class": args.per_class,
                    "epochs": args.epochs, "train_limit": args.train_limit,
                }  # fmt: skip
                rows.append(row)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{crit} seed {seed} rate {rt:.2f}: acc {acc:.4f}", flush=True)
    summarise(rows, out)


if __name__ == "__main__":
    main()
