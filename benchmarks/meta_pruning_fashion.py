"""Meta Pruning via Graph Metanetworks in miniature (spec training-aware.md §7): MLP 784-128-128-10
on Fashion-MNIST.

1. ``--models`` data models (default 12), seeds 0.., each trained ``--data-epochs`` epoch(s) from
   scratch (AdamW 1e-3 through the ``Trainer``); the last ``--held-out`` (default 2) are held out;
2. a metanetwork (:class:`~prunekit.training.meta_pruning.MetaGNN`, hidden 32, 4 layers) meta-trained
   ``--meta-epochs`` epochs (default 15) on the others, one 2048-image batch per model and step
   (official objective: CE through the rewritten weights + the group-norm regulariser, reg 10,
   α 16; AdamW 1e-3, ×0.1 at epoch 3), the last epoch kept (officially a hand-picked checkpoint);
3. on each held-out model, for each speed-up in ``--speedups`` (FLOPs before / after):
   ``metanet``: metanetwork rewrite -> 1 epoch fine-tune -> progressive global group-L2 pruning of
   hidden neurons -> 1 epoch fine-tune; ``baseline``: the same pipeline without the metanetwork and
   its fine-tune (as the official baseline); ``baseline-ft`` (ours): without the metanetwork but with
   the same 1-epoch fine-tune before pruning, so that the metanetwork alone is compared (the data
   models, trained 1 epoch, gain from any further training).

Metrics: test accuracy (10 000 images) against the speed-up reached; the area under the
accuracy-vs-speed-up curve (trapezoids over the grid, divided by its width: a mean accuracy) and
the accuracy at 3x. The claim (§7): the metanetwork makes the network easier to prune (a flatter
curve, a larger area).

**CPU-reduced** (the paper: ResNet-56 / CIFAR-10, data models 200 epochs + pruned to 1.32x + 80
epochs, meta-training 100 epochs, fine-tunes 100 and 140 epochs).

Rows go to ``<out>.jsonl`` as they finish (a rerun skips the rows there; the data models and the
metanetwork are cached in ``<out>_models.pt`` / ``<out>_metanet.pt``); then ``<out>.md`` and
``<out>.png``.

Cost (1 thread): data models ~3 s each, meta-training ~2.3 s CPU per step (150 steps; the graph
has 1050 nodes and 118 016 edges; ~2.5 GB peak memory), each pruning row 2-5 s: about 6-7 min
on an idle core, 12 min measured on this shared 2-core machine under load.

Run: PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/meta_pruning_fashion.py
Smoke: ... --models 3 --held-out 1 --meta-epochs 1 --train 2048 --speedups 2 --out /tmp/meta_smoke
"""

from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import pathlib
import statistics
import time

import _shared
import torch

from prunekit.models import convnets as C
from prunekit.training import train_batches

M = importlib.import_module("prunekit.training.meta_pruning")
ARMS = ("metanet", "baseline", "baseline-ft")


def data_models(args, out: pathlib.Path, f, train) -> list[C.MLP]:
    cache = pathlib.Path(f"{out}_models.pt")
    states = torch.load(cache, weights_only=True) if cache.exists() else []
    models = []
    for s in range(args.models):
        m = C.MLP(tuple(args.sizes), seed=s)
        if s < len(states):
            m.load_state_dict(states[s])
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(s)).tolist()
            res = train_batches(
                m, [train[i] for i in order], steps=args.data_epochs * len(train), lr=1e-3, seed=s,
                progress=False,
            )  # fmt: skip
            acc = C.evaluate_classifier(m, "test", limit=args.test)
            f.write(json.dumps({"key": f"data/{s}", "kind": "data", "seed": s, "accuracy": acc,
                                "train_s": res.seconds}) + "\n")  # fmt: skip
            f.flush()
            print(f"data model {s}: acc {acc:.4f} ({res.seconds:.1f} s)", flush=True)
            states.append(m.state_dict())
            torch.save(states, cache)
        models.append(m)
    return models


def metanetwork(args, out: pathlib.Path, f, models) -> M.MetaGNN:
    cache = pathlib.Path(f"{out}_metanet.pt")
    net = M.MetaGNN(hidden=args.hidden, layers=args.layers, seed=0)
    if cache.exists():
        net.load_state_dict(torch.load(cache, weights_only=True))
        return net.eval()
    big = C.fashion_batches("train", args.meta_batch, limit=args.train, seed=1)
    t0 = time.perf_counter()
    net, hist = M.meta_train(
        models, big, epochs=args.meta_epochs, metanet=net, reg=args.reg, alpha=args.alpha, progress=False
    )
    secs = time.perf_counter() - t0
    for e in range(args.meta_epochs):
        h = [r for r in hist if r["epoch"] == e]
        row = {"key": f"meta/{e}", "kind": "meta", "epoch": e, "ce": statistics.fmean(r["ce"] for r in h),
               "reg": statistics.fmean(r["reg"] for r in h), "seconds": secs}  # fmt: skip
        f.write(json.dumps(row) + "\n")
        print(f"meta epoch {e}: ce {row['ce']:.4f} reg {row['reg']:.1f}", flush=True)
    f.flush()
    torch.save(net.state_dict(), cache)
    return net


def run(args) -> None:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".jsonl")
    done = {r["key"] for r in _shared.rows(path)}
    train = C.fashion_batches("train", args.batch_size, limit=args.train, seed=0)
    test = C.fashion_batches("test", 1000, limit=args.test, seed=None)
    with path.open("a") as f:
        models = data_models(args, out, f, train)
        meta_set, held = models[: -args.held_out], models[-args.held_out :]
        net = metanetwork(args, out, f, meta_set)
        steps = args.ft_epochs * len(train)
        for h, model in zip(range(args.models - args.held_out, args.models), held, strict=True):
            for arm in ARMS:
                for sp in args.speedups:
                    key = f"{arm}/{h}/{sp}"
                    if key in done:
                        continue
                    t0 = time.perf_counter()
                    start = model
                    if arm == "baseline-ft":  # the metanet arm's first fine-tune, without the metanetwork
                        start = copy.deepcopy(model)
                        train_batches(start, train, steps=steps, lr=1e-3, seed=h, progress=False)
                    _, rep = M.meta_pruning(
                        start, net if arm == "metanet" else None, train, speedup=sp, finetune_steps=steps,
                        final_steps=steps, lr=1e-3, seed=h, eval_batches=test,
                    )  # fmt: skip
                    row = {"key": key, "kind": "prune", "arm": arm, "model": h, "target": sp,
                           "speedup": rep.speedup, "widths": rep.widths, "stages": rep.stages,
                           "accuracy": rep.stages["final"]["accuracy"],
                           "pruned_accuracy": rep.stages["pruned"]["accuracy"],
                           "seconds": time.perf_counter() - t0}  # fmt: skip
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    print(f"{key}: speed-up {rep.speedup:.2f}, pruned {row['pruned_accuracy']:.4f}, "
                          f"final {row['accuracy']:.4f} ({row['seconds']:.1f} s)", flush=True)  # fmt: skip
    report(out)


def _auc(pts: list[tuple[float, float]]) -> float:
    """Trapezoid area under accuracy(speed-up) over the points' range, divided by the range."""
    pts = sorted(pts)
    if len(pts) < 2:
        return pts[0][1] if pts else float("nan")
    area = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in itertools.pairwise(pts))
    return area / (pts[-1][0] - pts[0][0])


def report(out: pathlib.Path) -> None:
    rows = _shared.rows(out.with_suffix(".jsonl"))
    data = [r for r in rows if r["kind"] == "data"]
    meta = sorted((r for r in rows if r["kind"] == "meta"), key=lambda r: r["epoch"])
    prune = [r for r in rows if r["kind"] == "prune"]
    targets = sorted({r["target"] for r in prune})
    held = sorted({r["model"] for r in prune})
    lines = [
        "# Meta Pruning in miniature: MLP 784-128-128-10 on Fashion-MNIST",
        "",
        (f"{len(data)} data models (1 epoch each; mean test accuracy "
         f"{statistics.fmean(r['accuracy'] for r in data):.4f})" if data else "Data models from the cache")
        + f", held out: {held}. Metanetwork meta-trained "
        f"{len(meta)} epochs"
        + (f" ({meta[-1]['seconds']:.0f} s; CE {meta[0]['ce']:.3f} -> {meta[-1]['ce']:.3f}, "
           f"R {meta[0]['reg']:.0f} -> {meta[-1]['reg']:.0f})" if meta else "")
        + ". Accuracy: 10 000 test images, mean over the held-out models. Rows: "
        f"`{out.name}.jsonl`.",
        "",
        "| target speed-up | arm | speed-up reached | acc. after pruning | acc. after fine-tune | widths |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    curves: dict[str, list[tuple[float, float]]] = {a: [] for a in ARMS}
    raw: dict[str, list[tuple[float, float]]] = {a: [] for a in ARMS}  # before the final fine-tune
    for t in targets:
        for arm in ARMS:
            rs = [r for r in prune if r["target"] == t and r["arm"] == arm]
            if not rs:
                continue
            sp = statistics.fmean(r["speedup"] for r in rs)
            acc = statistics.fmean(r["accuracy"] for r in rs)
            pacc = statistics.fmean(r["pruned_accuracy"] for r in rs)
            curves[arm].append((t, acc))
            raw[arm].append((t, pacc))
            w = "; ".join("-".join(str(v) for v in r["widths"].values()) for r in rs)
            lines.append(f"| {t:g} | {arm} | {sp:.2f} | {100 * pacc:.2f} | {100 * acc:.2f} | {w} |")
    lines.append("")
    for arm in ARMS:
        rs = [r for r in prune if r["arm"] == arm]
        pre = {}
        for st in ("input", "metanet", "finetuned"):
            vals = [r["stages"][st]["accuracy"] for r in rs if st in r["stages"]]
            if vals:
                pre[st] = statistics.fmean(vals)
        if pre:
            said = ", ".join(f"{k} {100 * v:.2f} %" for k, v in pre.items())
            lines.append(f"- before pruning, {arm}: {said}")
    lines.append("")
    auc = {a: _auc(c) for a, c in curves.items() if c}
    at3 = {a: dict(c).get(3.0) for a, c in curves.items() if c}
    lines += [
        "| arm | area under acc.(speed-up) / width | acc. at 3x | the same before the final fine-tune |",
        "|---|---|---|---|",
    ]
    for a in auc:
        a3 = f"{100 * at3[a]:.2f}" if at3[a] is not None else "—"
        r3 = dict(raw[a]).get(3.0)
        r3 = f"{100 * r3:.2f}" if r3 is not None else "—"
        lines.append(f"| {a} | {100 * auc[a]:.2f} | {a3} | {100 * _auc(raw[a]):.2f} / {r3} |")
    base = [a for a in ("baseline", "baseline-ft") if a in auc]
    if "metanet" in auc and base:
        diffs = {a: auc["metanet"] - auc[a] for a in base}
        holds = "holds" if all(d > 0 for d in diffs.values()) else "does not hold"
        said = ", ".join(f"{100 * d:+.2f} pp vs {a}" for a, d in diffs.items())
        lines += ["", f"Area difference of the metanet arm: {said}: the claim (the metanetwork makes the "
                  f"network easier to prune) {holds} in miniature."]  # fmt: skip
    _shared.write_table(out, lines)
    plt = _shared.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm, c in curves.items():
        if c:
            ax.plot([p[0] for p in c], [100 * p[1] for p in c], "o-", label=arm)
    ax.set_xlabel("FLOPs speed-up (target)")
    ax.set_ylabel("test accuracy after fine-tune (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Meta Pruning, MLP on Fashion-MNIST (CPU-reduced)")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=12)
    ap.add_argument("--held-out", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[784, 128, 128, 10])
    ap.add_argument("--train", type=int, default=None, help="training images (default all 60 000)")
    ap.add_argument("--test", type=int, default=None, help="test images (default all 10 000)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data-epochs", type=int, default=1)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--meta-epochs", type=int, default=15)
    ap.add_argument("--meta-batch", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reg", type=float, default=10.0)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    ap.add_argument("--out", default="benchmarks/results/meta_pruning_fashion")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.held_out < 1 or args.held_out >= args.models:
        ap.error(f"--held-out must be in [1, {args.models - 1}]; got {args.held_out}")
    if args.report_only:
        report(pathlib.Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
