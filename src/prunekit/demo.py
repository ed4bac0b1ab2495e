"""The README's main job: every token method so far on real packaged models, against dense.

- **SmolLM2-135M-Instruct** (real weights) on Wikipedia passages: FastV vs random dropping at
  decoder layer 2; quality = top-1 next-token agreement with dense and KL(dense || pruned);
  latency = prefill time.
- **DINOv2-S/14** (real weights) on real Fashion-MNIST images: ToMe, FasterVLM's [CLS]-attention
  ranking, DivPrune and random at the encoder stage; quality = accuracy of a linear probe fit on
  dense features of training images, and cosine of the [CLS] output to dense; latency = forward
  time of a batch of 16.

Dense and pruned runs are interleaved in one process; latency is the median after a warm-up.
Results go to a JSON-lines file, one line per row.
"""

from __future__ import annotations

import json
import pathlib
import platform
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .errors import PrunekitError
from .timing import interleaved_medians
from .tokens.engine import prune_tokens

KEEP = 0.5


@dataclass
class Row:
    model: str
    method: str
    stage: str
    tokens_kept: float
    quality: dict[str, float]
    latency_s: float
    latency_ratio: float
    options: dict = field(default_factory=dict)
    note: str = ""


def _text_rows(quick: bool, bar: tqdm) -> list[Row]:
    from .assets import wiki_text
    from .models import zoo

    model, tok = zoo.smollm2(dtype=torch.bfloat16)  # bf16: ~4x faster than fp32 on AVX512-BF16 CPUs
    tok.padding_side = "left"
    n = 8 if quick else 16
    passages = [p[:800] for p in wiki_text().split("\n\n") if len(p) > 1000][:n]
    enc = tok(passages, return_tensors="pt", padding=True, truncation=True, max_length=128)
    configs = {"dense": None, "fastv": ("fastv", {"layer": 2}), "random": ("random", {"layer": 2})}

    def forward(cfg):
        if cfg is None:
            return model(**enc, logits_to_keep=1).logits[:, -1].float(), None
        name, opts = cfg
        with prune_tokens(model, name, keep=KEEP, **opts) as s:
            return model(**enc, logits_to_keep=1).logits[:, -1].float(), s.stats

    rows = []
    with torch.inference_mode():
        outs = {k: forward(c) for k, c in configs.items()}
        bar.update(1)
        lat = interleaved_medians(
            {k: (lambda c=c: forward(c)) for k, c in configs.items()}, repeats=2 if quick else 3
        )
        bar.update(1)
    dense = outs["dense"][0].log_softmax(-1)
    for k, cfg in configs.items():
        logp = outs[k][0].log_softmax(-1)
        kl = (dense.exp() * (dense - logp)).sum(-1).mean().item()
        agree = (dense.argmax(-1) == logp.argmax(-1)).float().mean().item()
        stats = outs[k][1]
        rows.append(
            Row(
                model="SmolLM2-135M",
                method=k,
                stage="-" if cfg is None else "llm",
                tokens_kept=1.0 if stats is None else stats.kept_fraction,
                quality={"top1_agree": agree, "kl": kl},
                latency_s=lat[k],
                latency_ratio=lat[k] / lat["dense"],
                options={} if cfg is None else cfg[1],
                note=f"{enc.input_ids.shape[0]} Wikipedia passages x {enc.input_ids.shape[1]} tokens",
            )
        )
    return rows


def fit_probe(train: torch.Tensor, labels: torch.Tensor, classes: int = 10, l2: float = 1e-3):
    """A linear probe (multinomial logistic regression, L-BFGS) on standardised features."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    z = (train - mean) / std
    W = torch.zeros(z.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ W + bias, labels) + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    W, bias = W.detach(), bias.detach()
    return lambda x: (((x - mean) / std) @ W + bias).argmax(-1)


def _vision_rows(quick: bool, bar: tqdm) -> list[Row]:
    from .assets import cache_dir, fashion_mnist
    from .models import zoo

    model = zoo.dinov2_small()
    n_train, n_test = (500, 64) if quick else (1000, 192)
    Xtr, ytr = fashion_mnist("train")
    Xte, yte = fashion_mnist("test")
    feats_file = cache_dir("demo") / f"dinov2s_fashion_train_{n_train}.npz"

    def cls(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(pixel_values=b).pooler_output for b in x.split(32)])

    with torch.inference_mode():
        if feats_file.exists():
            train = torch.from_numpy(np.load(feats_file)["f"])
        else:
            train = cls(zoo.image_batch(Xtr[:n_train]))
            np.savez(feats_file, f=train.numpy())
    bar.update(1)
    labels = torch.from_numpy(ytr[:n_train].astype(np.int64))
    probe = fit_probe(train, labels)
    test_x = zoo.image_batch(Xte[:n_test])
    truth = torch.from_numpy(yte[:n_test].astype(np.int64))
    timing_batch = test_x[:16]
    configs = {
        "dense": None,
        "tome": ("tome", {}),
        "fastervlm": ("fastervlm", {"layer": 4}),
        "divprune": ("divprune", {"layer": 4}),
        "random": ("random", {"layer": 4}),
    }
    rows, runners, dense_feats = [], {}, None
    with torch.inference_mode():
        for k, cfg in configs.items():
            try:
                if cfg is None:
                    feats, stats = cls(test_x), None
                    run = lambda: model(pixel_values=timing_batch)  # noqa: E731
                else:
                    name, opts = cfg
                    with prune_tokens(model, name, keep=KEEP, stage="encoder", **opts) as s:
                        feats = cls(test_x)
                    stats = s.stats

                    def run(name=name, opts=opts):
                        with prune_tokens(model, name, keep=KEEP, stage="encoder", **opts):
                            return model(pixel_values=timing_batch)

            except (PrunekitError, ImportError, NotImplementedError) as e:
                rows.append(
                    Row(
                        "DINOv2-S",
                        k,
                        "encoder",
                        float("nan"),
                        {},
                        float("nan"),
                        float("nan"),
                        note=f"skipped: {e}",
                    )
                )
                bar.update(1)
                continue
            if dense_feats is None:
                dense_feats = feats
            rows.append(
                Row(
                    model="DINOv2-S",
                    method=k,
                    stage="-" if cfg is None else "encoder",
                    tokens_kept=1.0 if stats is None else stats.kept_fraction,
                    quality={
                        "probe_acc": (probe(feats) == truth).float().mean().item(),
                        "cls_cosine": torch.nn.functional.cosine_similarity(feats, dense_feats).mean().item(),
                    },
                    latency_s=float("nan"),
                    latency_ratio=float("nan"),
                    options={} if cfg is None else cfg[1],
                    note=f"Fashion-MNIST: {n_test} test images, probe on {n_train} dense train features",
                )
            )
            runners[k] = run
            bar.update(1)
        lat = interleaved_medians(runners, repeats=2 if quick else 7)
    for r in rows:
        if r.method in lat:
            r.latency_s, r.latency_ratio = lat[r.method], lat[r.method] / lat["dense"]
    bar.update(1)
    return rows


def format_table(rows: list[Row]) -> str:
    head = ["model", "method", "stage", "tokens kept", "quality", "vs dense", "latency", "latency ratio"]
    dense = {r.model: r for r in rows if r.method == "dense"}
    lines = []
    for r in rows:
        if r.note.startswith("skipped"):
            lines.append([r.model, r.method, r.stage, "-", r.note[:60], "", "", ""])
            continue
        q = ", ".join(f"{k} {v:.3f}" for k, v in r.quality.items())
        main = next(iter(r.quality))
        base = dense[r.model].quality[main] if r.model in dense else float("nan")
        rel = f"{r.quality[main] / base:.1%} {main}" if main != "kl" and base else ""
        lines.append([
            r.model, r.method, r.stage, f"{r.tokens_kept:.0%}", q, rel, f"{r.latency_s * 1e3:.0f} ms",
            f"{r.latency_ratio:.2f}x",
        ])  # fmt: skip
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    fmt = lambda x: "  ".join(str(c).ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def run(out: str = "results/demo.jsonl", quick: bool = False) -> list[Row]:
    torch.manual_seed(0)
    bar = tqdm(total=2 + 7, desc="prunekit demo", unit="step")
    rows = _text_rows(quick, bar) + _vision_rows(quick, bar)
    bar.close()
    print(
        f"\nprunekit {__version__} demo: keep={KEEP} of the candidate tokens, "
        f"CPU with {torch.get_num_threads()} threads"
    )
    print(format_table(rows))
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "prunekit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": "cpu",
    }
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps({**asdict(r), **meta}) + "\n")
    print(f"\nresults appended to {path} ({len(rows)} JSON lines)")
    return rows
