"""Structured pruning of DINOv2-S/14 (attention heads and MLP channels) scored with the bench's
Fashion-MNIST probe, one JSON line per (method, sparsity).

For each run a copy of the dense model (fp32) is pruned with ``prunekit.prune_weights`` at
``sparsity`` = the fraction of the encoder layers' prunable weights removed (q/k/v/o and fc1/fc2 of
the 12 layers; embeddings, norms, layer scales, biases not counted), calibrated on ``--calib``
Fashion-MNIST *train* images (indices 1000.., disjoint from the probe's training images and from
the test images), finalized, saved as safetensors and reloaded with ``prunekit.load_pruned`` (the
features are checked identical to the finalized model's), then measured:

- **quality**: the bench task ``fashion`` (``prunekit.bench.tasks.vision.FashionMNIST``) exactly as
  ``prunekit bench`` computes it: a linear probe (and 10-NN) **fit once on the dense model's
  features** of 1000 training images, applied to the pruned model's pooled features of
  ``--test`` test images (a seeded subset, the same for every row). ``cosine`` / ``top1`` compare
  the pruned features and predictions with the dense model's on the same images. Since a probe
  fit on dense features also penalises features that moved but stay separable, ``own probe``
  adds a probe fit on the model's **own** features: 5-fold cross-validation over the test images
  (no extra forward passes; ours, not a bench metric).
- **size**: all parameters, and the prunable weights kept;
- **speed**: the model forward (prefill) on a batch of 16 test images at 224 px, pruned and dense
  interleaved in this one process (median of ``--repeats`` after one warm-up round), fp32, on
  however many threads ``OMP_NUM_THREADS`` gives; ``predicted`` is the ratio of Linear weights
  (every Linear of the model, patch projection excluded) pruned / dense.

Resumable: rows already in ``--out`` are skipped. Writes ``--out`` (JSON lines) and a markdown
table next to it (``.md``) after every row.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/structured_dinov2.py
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import tempfile
import time

import torch

import prunekit
from prunekit.assets import fashion_mnist
from prunekit.bench.measure import interleaved_latency
from prunekit.bench.models import Loaded
from prunekit.bench.tasks.vision import FashionMNIST, fit_probe, knn_predict
from prunekit.zoo.packaged import image_batch

METHODS = ["flap", "wanda_sp", "magnitude_sp", "random_sp"]
SPARSITIES = [0.3, 0.5, 0.2]


def linear_weights(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def own_probe(feats: torch.Tensor, truth: torch.Tensor, folds: int = 5) -> float:
    """Accuracy of a linear probe fit on the model's **own** features: ``folds``-fold
    cross-validation over the test images (seeded split, the same for every row)."""
    order = torch.randperm(len(truth), generator=torch.Generator().manual_seed(0))
    right = 0
    for part in order.chunk(folds):
        fit = torch.ones(len(truth), dtype=torch.bool)
        fit[part] = False
        probe = fit_probe(feats[fit], truth[fit], 10)
        right += int((probe(feats[part]) == truth[part]).sum())
    return right / len(truth)


def evaluate(task: FashionMNIST, model: torch.nn.Module) -> dict:
    with torch.inference_mode():
        feats = task._features(model, task.test_x)
    pred = task.probe(feats)
    knn = knn_predict(task.train, task.labels, feats, task.k, 10)
    return {
        "feats": feats,
        "pred": pred,
        "probe_acc": (pred == task.truth).double().mean().item(),
        "knn_acc": (knn == task.truth).double().mean().item(),
        "probe_own": own_probe(feats, task.truth),
    }


def write_table(rows: list[dict], md: pathlib.Path, header: str) -> None:
    lines = [
        "# Structured pruning of DINOv2-S: heads and MLP channels, Fashion-MNIST probe",
        "",
        header,
        "",
        "| method | sparsity | removed | probe_acc | retention | knn_acc | cosine / top-1 | own probe | "
        "params | heads kept | channels kept | prefill vs dense | predicted | prune s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    for r in sorted(rows, key=lambda r: (r["method"] != "dense", r["method"], r["sparsity"])):
        ret = r["probe_acc"] / dense["probe_acc"] if dense else float("nan")
        lines.append(
            f"| {r['method']} | {r['sparsity']:g} | {r['removed']:.1%} | {r['probe_acc']:.3f} | {ret:.1%} | "
            f"{r['knn_acc']:.3f} | {r['cosine']:.4f} / {r['top1']:.2f} | {r['probe_own']:.3f} | "
            f"{r['params'] / 1e6:.2f}M | "
            f"{r['heads']} | {r['channels']} | {r['prefill_ratio']:.2f}x | {r['predicted']:.2f}x | "
            f"{r['prune_s']:.1f} |"
        )
    md.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--sparsities", nargs="*", type=float, default=SPARSITIES)
    p.add_argument("--test", type=int, default=100, help="Fashion-MNIST test images (bench default 500)")
    p.add_argument("--calib", type=int, default=16, help="calibration images (train split, from index 1000)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/structured_dinov2.jsonl")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {(r["method"], r["sparsity"]) for r in rows}

    torch.manual_seed(0)
    dense = prunekit.zoo.dinov2_small()
    task = FashionMNIST(limit=args.test)
    task.prepare(Loaded("dinov2-s", "vit", dense))  # dense train features (cached), probe fit on them
    Xtr, _ = fashion_mnist("train")
    calib = image_batch(Xtr[task.n_train : task.n_train + args.calib], 224)
    timing_x = task.test_x[: task.timing_batch]
    base = evaluate(task, dense)
    n_dense, lin_dense = sum(t.numel() for t in dense.parameters()), linear_weights(dense)
    header = (
        f"prunekit {prunekit.__version__}, torch {torch.__version__}; {torch.get_num_threads()} thread(s), "
        f"fp32 CPU. Probe fit on **dense** train features (1000 images), {len(task.truth)} test images; "
        f"calibration {args.calib} train images; prefill = batch {len(timing_x)} x 224 px, median of "
        f"{args.repeats} interleaved with dense. `removed` = prunable weights removed (report); "
        f"`predicted` = Linear weights kept; `own probe` = probe fit on the model's own test "
        f"features, 5-fold CV."
    )
    if ("dense", 0.0) not in done:
        rows.append({
            "method": "dense", "sparsity": 0.0, "removed": 0.0, "probe_acc": base["probe_acc"],
            "knn_acc": base["knn_acc"], "cosine": 1.0, "top1": 1.0, "params": n_dense, "heads": 6 * 12,
            "channels": 1536 * 12, "prefill_ratio": 1.0, "predicted": 1.0, "prune_s": 0.0,
            "prefill_dense_s": float("nan"), "n_test": len(task.truth), "probe_own": base["probe_own"],
        })  # fmt: skip
        with out.open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
    write_table(rows, out.with_suffix(".md"), header)

    for s in args.sparsities:  # sparsity-major: an interrupted sweep has every method at the first ones
        for method in args.methods:
            if (method, s) in done:
                continue
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            pruning = prunekit.prune_weights(
                model, method, s, calibration=calib, batch_size=8, progress=False
            )
            rep = pruning.finalize()
            prune_s = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as d:
                model.save_pretrained(d)
                loaded = prunekit.load_pruned(d).eval()
            with torch.inference_mode():
                a, b = (
                    model(pixel_values=timing_x[:2]).pooler_output,
                    loaded(pixel_values=timing_x[:2]).pooler_output,
                )
            if not torch.equal(a, b):
                raise SystemExit(
                    f"{method} {s}: load_pruned differs from the finalized model by {(a - b).abs().max()}"
                )
            del model
            res = evaluate(task, loaded)

            def fwd(m):
                def run():
                    with torch.inference_mode():
                        m(pixel_values=timing_x)

                return run

            t = interleaved_latency({"dense": fwd(dense), "pruned": fwd(loaded)}, repeats=args.repeats)
            cos = torch.nn.functional.cosine_similarity(res["feats"], base["feats"], dim=-1).mean().item()
            rows.append({
                "method": method, "sparsity": s, "removed": rep.params_pruned / rep.params_targeted,
                "probe_acc": res["probe_acc"], "knn_acc": res["knn_acc"], "cosine": cos,
                "top1": (res["pred"] == base["pred"]).double().mean().item(),
                "params": sum(x.numel() for x in loaded.parameters()),
                "heads": sum(len(r.q_heads) for r in rep.layers),
                "channels": sum(r.channels for r in rep.layers),
                "heads_per_layer": [len(r.q_heads) for r in rep.layers],
                "channels_per_layer": [r.channels for r in rep.layers],
                "prefill_ratio": statistics.median(t["pruned"]) / statistics.median(t["dense"]),
                "prefill_dense_s": statistics.median(t["dense"]), "prefill_s": statistics.median(t["pruned"]),
                "predicted": linear_weights(loaded) / lin_dense, "prune_s": prune_s,
                "n_test": len(task.truth), "probe_own": res["probe_own"],
                "calib_images": args.calib, "threads": torch.get_num_threads(),
            })  # fmt: skip
            with out.open("a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
            write_table(rows, out.with_suffix(".md"), header)
            print(
                f"{method} {s}: probe {res['probe_acc']:.3f} (dense {base['probe_acc']:.3f}), "
                f"prefill {rows[-1]['prefill_ratio']:.2f}x, {prune_s:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
