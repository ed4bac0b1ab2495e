"""DToP on a segmentation task from real images: the real DINOv2-S/14 with linear segmentation heads
(final + auxiliary after blocks 4 and 8, trained once on CPU, cached), Fashion-MNIST scenes with a
class per pixel (11 classes with background), per-pixel mIoU against the computation DToP saves.

Heads fit on dense features see shifted features once easy tokens leave (the backbone is frozen;
the paper trains end to end). "heads in the loop" refits the heads after the first exit and the
final head on the features DToP itself produces on the training scenes
(``prunekit.zoo.segmentation.fit_heads_in_loop``), the frozen backbone's stand-in for that training.

Computation is the ViT blocks' FLOPs from the tokens each block processed (q/k/v/o, MLP, QK^T, AV;
the linear heads add < 0.1 %), relative to dense. Wall time: each setting and dense are timed
alternately on the same batch in this process (median of ``--repeats``), and the ratio is reported.

Run: PYTHONPATH=src python benchmarks/dtop_segmentation.py [--test 100] [--train 256]
Writes JSON lines to runs/dtop/results.jsonl, a markdown table and a plot (mIoU vs computation).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

from prunekit.tokens.dtop import DToP, block_flops
from prunekit.zoo import dinov2_small, image_batch
from prunekit.zoo.segmentation import (
    confusion,
    fit_heads_in_loop,
    mean_iou,
    paint,
    scenes,
    segmentation_heads,
)

#: (name, p0, top_k, exit blocks, heads refit in the loop)
SETTINGS = [
    ("dense", float("inf"), 5, (4, 8), False),
    ("p0=0.99, exits 4+8", 0.99, 5, (4, 8), False),
    ("p0=0.95, exits 4+8", 0.95, 5, (4, 8), False),
    ("p0=0.9, exits 4+8", 0.9, 5, (4, 8), False),
    ("p0=0.95, exits 4+8, top_k=0", 0.95, 0, (4, 8), False),
    ("p0=0.99, exit 8", 0.99, 5, (8,), False),
    ("p0=0.99, exits 4+8, heads in the loop", 0.99, 5, (4, 8), True),
    ("p0=0.99, exit 8, heads in the loop", 0.99, 5, (8,), True),
    ("p0=0.95, exit 8, heads in the loop", 0.95, 5, (8,), True),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--test", type=int, default=100, help="held-out scenes")
    p.add_argument("--train", type=int, default=256, help="training scenes for the heads")
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/dtop/results.jsonl")
    a = p.parse_args()
    torch.manual_seed(0)
    model = dinov2_small()
    t0 = time.perf_counter()
    heads = segmentation_heads(model, n_train=a.train)
    heads_s = time.perf_counter() - t0
    images, masks = scenes("test", a.test, seed=1)
    x = image_batch(images)
    truth = torch.from_numpy(masks.astype("int64"))
    cfg = model.config
    dense_flops = None
    rows = []
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    timing_x = x[: a.batch]
    dense_runner = DToP(model, heads, p0=float("inf"))
    with out.open("w") as log:
        train_images = train_masks = None
        for name, p0, top_k, exits, refit in SETTINGS:
            use = heads
            if refit:
                if train_images is None:
                    train_images, train_masks = scenes("train", a.train, seed=0)
                use = fit_heads_in_loop(model, heads, train_images, train_masks, p0, top_k, exits)
            runner = DToP(model, use, p0=p0, top_k=top_k, exits=exits)
            conf, flops, exited = torch.zeros(11, 11, dtype=torch.long), 0.0, 0
            for s in range(0, len(x), a.batch):
                o = runner(x[s : s + a.batch])
                conf += confusion(paint(o.logits.argmax(-1)), truth[s : s + a.batch])
                flops += sum(
                    float(block_flops(c.double(), cfg.hidden_size, cfg.mlp_ratio).sum())
                    for c in o.tokens_per_block
                )
                exited += int((o.exit_block < len(runner.layers)).sum())
            dense_flops = dense_flops or flops
            times, dense_times = [], []
            for _ in range(a.repeats):  # alternate, same batch
                for r, acc in ((runner, times), (dense_runner, dense_times)):
                    t = time.perf_counter()
                    r(timing_x)
                    acc.append(time.perf_counter() - t)
            row = {"setting": name, "p0": p0 if p0 != float("inf") else None, "top_k": top_k,
                   "exits": list(exits), "heads_in_loop": refit,
                   "miou": mean_iou(conf), "pixel_acc": (conf.diag().sum() / conf.sum()).item(),
                   "flops_ratio": flops / dense_flops, "exited_fraction": exited / (len(x) * 256),
                   "time_ratio": statistics.median(times) / statistics.median(dense_times),
                   "seconds_per_image": statistics.median(times) / len(timing_x)}  # fmt: skip
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    lines = [
        f"DINOv2-S/14 + linear heads (exits after blocks 4, 8), {a.test} held-out scenes, 11 classes; "
        f"heads trained on {a.train} scenes ({heads_s:.0f} s incl. features, or loaded from cache)\n",
        "| setting | mIoU | pixel acc | tokens exited | FLOPs vs dense | time vs dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (r["setting"], f"{r['miou']:.3f}", f"{r['pixel_acc']:.3f}", f"{r['exited_fraction']:.2f}",
                 f"{r['flops_ratio']:.3f}", f"{r['time_ratio']:.3f}")  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(table)
    print(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in rows:
            ax.scatter(r["flops_ratio"], r["miou"])
            ax.annotate(r["setting"], (r["flops_ratio"], r["miou"]), fontsize=6)
        ax.set_xlabel("ViT FLOPs relative to dense")
        ax.set_ylabel("per-pixel mIoU")
        ax.set_title("DToP on DINOv2-S, Fashion-MNIST scenes")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
