"""SAP vs the lottery ticket (LT-0.2) vs one-shot ranking (OS-0.2) on the Fashion-MNIST MLP
(784-128-256-10, the PQI/SAP paper's MLP), spec ``training-aware.md`` §6's smallest demonstration,
CPU-reduced.

Each run (mode, seed): ``prunekit.training.sap.sap`` with ``--iterations`` prune steps between
``--iterations + 1`` trainings of ``--epochs`` passes over the first ``--train-limit`` training
images (batch ``--batch-size``, AdamW lr ``--lr`` on the transformers Trainer, linear decay, grad
clip 1), rewinding to θ₀ before each; global scope; the last checkpoint of every training is pruned
(not the official best-on-test). Test accuracy on the first ``--test-limit`` test images after
every training, global PQI (p=½, q=1) of the surviving weights.

Departures from the paper's run (200 epochs of SGD 0.1, T = 30): far fewer epochs and iterations,
AdamW, the last checkpoint. The claim checked: SAP adapts its step (big cuts early, smaller as PQI
rises) and reaches a higher compression than LT-0.2 at equal accuracy.

``os-r`` ranks by θ₀ as the official code does (``model_state_dict[0]`` is the state before any
training); ``os-0.2@first-trained`` ranks by the first trained model, as the spec words it.

Resumable: one JSON line per finished run in ``--out``; runs already there are skipped. Writes a
markdown table (``.md``) and a plot (``.png``) next to it.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sap_fashion.py            # the default demo
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/sap_fashion.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import time

import _shared
import torch

from prunekit.models.convnets import MLP, fashion_batches
from prunekit.training.sap import sap

ROOT = pathlib.Path(__file__).resolve().parent


def run_one(mode: str, seed: int, args, train, test) -> dict:
    model = MLP(sizes=(784, 128, 256, 10), seed=seed)
    t0 = time.perf_counter()
    prune_mode, _, os_reference = mode.partition("@")
    report = sap(
        model, train, mode=prune_mode, os_reference=os_reference or "init", iterations=args.iterations,
        steps_per_iteration=args.epochs * len(train),
        lr=args.lr, eval_batches=test, seed=seed, lr_scheduler_type=args.schedule,
    )  # fmt: skip
    return {
        "mode": mode, "seed": seed, "iterations": args.iterations, "epochs": args.epochs,
        "train_limit": args.train_limit, "test_limit": args.test_limit, "lr": args.lr,
        "dense": report.dense, "selection": report.selection, "rows": report.rows,
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def _mean(xs):
    return statistics.fmean(xs) if xs else math.nan


def _sd(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def table(runs: list[dict], modes: list[str]) -> str:
    lines = [
        "| mode | iter | remaining % | PQI (½,1) | test acc % (mean ± sd over seeds) | pruned next % |",
        "|---|---|---|---|---|---|",
    ]
    summary = []
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        if not rs:
            continue
        n_it = min(len(r["rows"]) for r in rs)
        for i in range(n_it):
            rows = [r["rows"][i] for r in rs]
            frac = _mean([x["fraction"] for x in rows]) * 100
            pqi = _mean([x["pqi"] for x in rows])
            acc = [x["accuracy"] * 100 for x in rows]
            nxt = [x.get("pruned_next", 0) / x["kept"] * 100 for x in rows]
            lines.append(
                f"| {mode} | {i} | {frac:.2f} | {pqi:.4f} | {_mean(acc):.2f} ± {_sd(acc):.2f} | "
                f"{_mean(nxt):.1f} |"
            )
        dense_acc = _mean([r["rows"][0]["accuracy"] for r in rs]) * 100
        # the smallest remaining fraction whose mean accuracy stays within 1 point of the dense run
        ok = [
            _mean([r["rows"][i]["fraction"] for r in rs]) * 100
            for i in range(n_it)
            if _mean([r["rows"][i]["accuracy"] for r in rs]) * 100 >= dense_acc - 1
        ]
        last = [r["rows"][n_it - 1] for r in rs]
        summary.append(
            f"| {mode} | {len(rs)} | {dense_acc:.2f} | {_mean([x['fraction'] for x in last]) * 100:.2f} | "
            f"{_mean([x['accuracy'] for x in last]) * 100:.2f} | {min(ok):.2f} |"
        )
    head = [
        "| mode | seeds | dense acc % | final remaining % | final acc % "
        "| smallest remaining % within 1 pt of dense |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + summary) + "\n\n" + "\n".join(lines) + "\n"


def plot(runs: list[dict], modes: list[str], path: pathlib.Path) -> None:
    plt = _shared.pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]
        if not rs:
            continue
        n_it = min(len(r["rows"]) for r in rs)
        frac = [_mean([r["rows"][i]["fraction"] for r in rs]) * 100 for i in range(n_it)]
        acc = [_mean([r["rows"][i]["accuracy"] for r in rs]) * 100 for i in range(n_it)]
        pqi = [_mean([r["rows"][i]["pqi"] for r in rs]) for i in range(n_it)]
        a.plot(frac, acc, "o-", label=mode)
        b.plot(range(n_it), pqi, "o-", label=mode)
    a.set_xscale("log")
    a.invert_xaxis()
    a.set_xlabel("remaining weights (%)")
    a.set_ylabel("test accuracy (%)")
    a.set_title("accuracy vs remaining parameters")
    b.set_xlabel("iteration")
    b.set_ylabel("global PQI (p=1/2, q=1)")
    b.set_title("PQ index by iteration")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("SAP vs LT vs OS, Fashion-MNIST MLP 784-128-256-10 (CPU-reduced)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--modes",
        default="si-0.5-1-0-1,lt-0.2,os-0.2",
        help="prune modes; 'os-0.2@first-trained' ranks by the first trained model (default θ₀: official)",
    )
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1, help="passes over the training subset per iteration")
    ap.add_argument("--train-limit", type=int, default=60000)
    ap.add_argument("--test-limit", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--schedule", default="linear", help="the Trainer's lr_scheduler_type")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "sap_fashion.jsonl"))
    ap.add_argument(
        "--smoke", action="store_true", help="tiny settings (2k images, 2 iterations), to a _smoke file"
    )
    ap.add_argument("--report-only", action="store_true", help="no training: tables and plot from --out")
    args = ap.parse_args()
    if args.smoke:
        args.iterations, args.train_limit, args.test_limit = 2, 2000, 1000
        args.out = args.out.replace(".jsonl", "_smoke.jsonl")
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    key = ("iterations", "epochs", "train_limit", "test_limit", "lr")
    done = _shared.rows(out)
    if not args.report_only:
        train = fashion_batches("train", args.batch_size, limit=args.train_limit, seed=0)
        test = fashion_batches("test", 1000, limit=args.test_limit, seed=None)
    for mode in modes:
        for seed in seeds:
            same = [
                r for r in done
                if r["mode"] == mode and r["seed"] == seed and all(r[k] == getattr(args, k) for k in key)
            ]  # fmt: skip
            if same or args.report_only:
                continue
            row = run_one(mode, seed, args, train, test)
            last = row["rows"][-1]
            print(f"{mode} seed {seed}: {row['seconds']:.0f} s, final remaining {last['fraction']:.3f}, "
                  f"acc {last['accuracy']:.4f}", flush=True)  # fmt: skip
            _shared.append(out, row)
            done.append(row)
    runs = [r for r in done if all(r[k] == getattr(args, k) for k in key) and r["seed"] in seeds]
    md = out.with_suffix(".md")
    md.write_text(
        f"# SAP on the Fashion-MNIST MLP\n\n{args.iterations} iterations x {args.epochs} epoch(s) of "
        f"{args.train_limit} images, AdamW lr {args.lr}, test on {args.test_limit} images, seeds {seeds} "
        "(the seeds column says how many each mode has).\n\n" + table(runs, modes)
    )
    plot(runs, modes, out.with_suffix(".png"))
    print(md.read_text())


if __name__ == "__main__":
    main()
