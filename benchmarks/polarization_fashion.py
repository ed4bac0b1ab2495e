"""Consensus gates with polarization (a reconstruction) vs the official BN polariser vs network
slimming, at the same kept channel count, on a Fashion-MNIST ResNet-lite (3 stages x 2 blocks,
widths 16/32/64), spec ``training-aware.md`` §5's smallest demonstration, CPU-reduced.

Stages (one JSON line each in ``--out``; stages already there with the same settings are skipped,
so an interrupted run continues):

- ``dense``: the network trained plainly for the same steps (the reference accuracy);
- ``gates``: ``prunekit.training.polarization.polarization(variant="gates")``, consensus gates on
  every inner channel group (``inner.s.b``; residual streams are not gated), target sparsity
  ``--sparsity``, λ_s = 1, λ_p = 1e-3, t = 1.2, cut at ḡ > 0.5 on ``--calib`` calibration batches;
  its kept count K sets the budget of the next two; ``--budget layer`` (ours) puts the budget
  term on every layer's mean gate instead of the global mean (the spec's), which kept a
  Fashion-MNIST MLP's first layer from closing entirely;
- ``bn``: the official BN polariser (γ from 0.5, clamped to [0, 1], λ = ``--bn-lam``, t = 1.4),
  the global top-K γ kept (its own valley-threshold count is recorded too);
- ``slimming``: λ‖γ‖₁ (``--slim-lam``), the global top-K |γ| kept;
- ``blocks`` (optional, ``--stages``): consensus gates on the removable residual blocks.

Each pruned network is evaluated right after the physical cut (no fine-tuning) and after
``--ft-epochs`` epochs of fine-tuning (same lr), with parameters, multiply-accumulates and the
bimodality of the scores (the fraction of ḡ or γ in (0.1, 0.9)). Training: ``--epochs`` passes
over the first ``--train-limit`` training images (default 10 000 of 60 000: a full epoch of the
ResNet-lite takes 150-450 s on these shared cores), batch ``--batch-size``, AdamW ``--lr``.

The claim checked: the polarised gates separate cleanly (low bimodality), so the cut needs no
threshold tuning and accuracy after the cut is higher than slimming's at the same count.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/polarization_fashion.py            # ~15-25 min
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/polarization_fashion.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import pathlib
import time

import _shared
import torch

from prunekit.models.convnets import ConvNet, ResNetLite, count_flops, count_params, fashion_batches
from prunekit.training import train_batches
from prunekit.training.polarization import polarization
from prunekit.training.polarize import valley_threshold
from prunekit.training.sap import batch_accuracy

ROOT = pathlib.Path(__file__).resolve().parent
KEY = ("model", "epochs", "ft_epochs", "train_limit", "test_limit", "lr", "sparsity", "budget", "seed")


def build(args):
    if args.model == "resnet":
        return ResNetLite(stages=3, blocks=2, widths=(16, 32, 64), seed=args.seed)
    return ConvNet(widths=(32, 64, 128, 128), seed=args.seed)


def run_stage(stage: str, args, train, test, calib, budget: int | None) -> dict:
    model = build(args)
    steps = args.epochs * len(train)
    t0 = time.perf_counter()
    row = {"stage": stage, **{k: getattr(args, k) for k in KEY}}
    if stage == "dense":
        train_batches(model, train, steps=steps, lr=args.lr, seed=args.seed, progress=False)
        row.update(acc=batch_accuracy(model, test), params=count_params(model), flops=count_flops(model))
        row["seconds"] = time.perf_counter() - t0
        return row
    if stage == "gates":
        kw = dict(
            variant="gates", units="channels", sparsity=args.sparsity, calib_batches=calib, budget=args.budget
        )
    elif stage == "blocks":
        kw = dict(
            variant="gates", units="blocks", sparsity=args.sparsity, calib_batches=calib, budget=args.budget
        )
    elif stage == "bn":
        kw = dict(variant="bn", lam_p=args.bn_lam, keep_count=budget)
    else:
        kw = dict(variant="slimming", lam_p=args.slim_lam, keep_count=budget)
    rep = polarization(model, train, steps=steps, lr=args.lr, seed=args.seed, **kw)
    row.update(
        label=rep.label, kept_units=rep.kept_units, total_units=rep.total_units, kept=rep.kept,
        blocks_removed=rep.blocks_removed, threshold=rep.threshold, bimodality=rep.bimodality,
        params=rep.params_after, params_before=rep.params_before, flops=rep.flops_after,
        flops_before=rep.flops_before, terms=rep.terms, scores=rep.scores,
        acc_cut=batch_accuracy(model, test), train_seconds=rep.seconds,
    )  # fmt: skip
    if stage == "bn":
        scores = [torch.tensor(v) for v in rep.scores.values()]
        thr = valley_threshold(scores)
        row["valley_threshold"] = thr
        row["valley_kept"] = int(sum(int((s >= thr).sum()) for s in scores))
    if args.ft_epochs:
        train_batches(
            model, train, steps=args.ft_epochs * len(train), lr=args.lr, seed=args.seed, progress=False
        )
        row["acc_ft"] = batch_accuracy(model, test)
    row["seconds"] = time.perf_counter() - t0
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| stage | method | kept units | params | MACs | bimodality (0.1, 0.9) | acc after cut % "
        "| acc after fine-tune % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["stage"] == "dense":
            acc = f"{r['acc'] * 100:.2f}"
            lines.append(f"| dense | (no pruning) | all | {r['params']:,} | {r['flops']:,} | - | {acc} | - |")
            continue
        ft = f"{r['acc_ft'] * 100:.2f}" if "acc_ft" in r else "-"
        kept = f"{r['kept_units']}/{r['total_units']}"
        if r["stage"] == "blocks":
            kept += f" blocks (removed {', '.join(r['blocks_removed']) or 'none'})"
        if r["stage"] == "bn":
            kept += f" (valley {r['valley_threshold']:.2f} would keep {r['valley_kept']})"
        lines.append(
            f"| {r['stage']} | {r['label']} | {kept} | {r['params']:,} | {r['flops']:,} | "
            f"{r['bimodality']:.3f} | {r['acc_cut'] * 100:.2f} | {ft} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
    plt = _shared.pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if r["stage"] == "dense":
            a.axhline(r["acc"] * 100, color="gray", ls="--", label="dense")
            continue
        m = r["flops"] / 1e6
        a.plot([m], [r["acc_cut"] * 100], "o", label=f"{r['stage']} (cut)")
        if "acc_ft" in r:
            a.plot([m], [r["acc_ft"] * 100], "^", label=f"{r['stage']} (+fine-tune)")
        if r["stage"] in ("gates", "bn", "slimming"):
            vals = [v for vs in r["scores"].values() for v in vs]
            b.hist(vals, bins=50, range=(0, max(1.0, max(vals))), alpha=0.5, label=r["stage"])
    a.set_xlabel("MACs per image (M)")
    a.set_ylabel("test accuracy (%)")
    a.set_title("accuracy after the physical cut")
    b.set_xlabel("score (ḡ for gates, γ for BN / slimming)")
    b.set_ylabel("units")
    b.set_title("score histograms before the cut")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("consensus gates (reconstruction) vs BN polariser vs slimming, same kept count")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("resnet", "convnet"), default="resnet")
    ap.add_argument("--stages", default="dense,gates,bn,slimming")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=10000)
    ap.add_argument("--test-limit", type=int, default=10000)
    ap.add_argument("--calib", type=int, default=4, help="calibration batches (from the training subset)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--budget", choices=("global", "layer"), default="global", help="the gates' budget term")
    ap.add_argument("--bn-lam", type=float, default=5e-5)
    ap.add_argument("--slim-lam", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "polarization_fashion.jsonl"))
    ap.add_argument("--smoke", action="store_true", help="tiny settings (640 images, 1 epoch), to *_smoke.*")
    args = ap.parse_args()
    if args.smoke:
        args.epochs, args.ft_epochs, args.train_limit, args.test_limit = 1, 1, 640, 500
        args.out = args.out.replace(".jsonl", "_smoke.jsonl")
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _shared.rows(out)
    done = [r for r in done if all(r.get(k) == getattr(args, k) for k in KEY)]
    train = fashion_batches("train", args.batch_size, limit=args.train_limit, seed=args.seed)
    test = fashion_batches("test", 1000, limit=args.test_limit, seed=None)
    calib = train[: args.calib]
    stages = args.stages.split(",")
    for stage in stages:
        if stage not in ("dense", "gates", "bn", "slimming", "blocks"):
            raise SystemExit(f"unknown stage {stage!r}")
        if any(r["stage"] == stage for r in done):
            continue
        gates = [r for r in done if r["stage"] == "gates"]
        budget = gates[0]["kept_units"] if gates else None
        if stage in ("bn", "slimming") and budget is None:
            raise SystemExit(f"stage {stage!r} needs the 'gates' stage first (its kept count is the budget)")
        row = run_stage(stage, args, train, test, calib, budget)
        print(f"{stage}: {row['seconds']:.0f} s", flush=True)
        _shared.append(out, row)
        done.append(row)
    rows = [r for s in stages for r in done if r["stage"] == s]
    md = out.with_suffix(".md")
    md.write_text(
        f"# Polarization on Fashion-MNIST ({args.model})\n\n{args.epochs} epoch(s) on {args.train_limit} "
        f"training images (a subset), {args.ft_epochs} fine-tune epoch(s), AdamW lr {args.lr}, test on "
        f"{args.test_limit} images, target sparsity {args.sparsity}, seed {args.seed}.\n\n" + table(rows)
    )
    plot(rows, out.with_suffix(".png"))
    print(md.read_text())


if __name__ == "__main__":
    main()
