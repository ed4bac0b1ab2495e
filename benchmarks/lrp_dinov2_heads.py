"""Pruning DINOv2-S attention heads by explaining (spec ``training-aware.md`` §4, demonstration (b)).

The real DINOv2-S/14 backbone (``prunekit.zoo.dinov2_small``, 12 layers x 6 heads = 72 heads) under
a **3-class Fashion-MNIST linear probe** (PXP restricts ImageNet to 3 random classes; here 3
Fashion-MNIST classes drawn with ``--class-seed``): multinomial logistic regression (L-BFGS, as the
bench's ``fit_probe``) on the dense model's pooled features (``pooler_output``, the normed CLS) of
``--probe-train`` training images, the standardisation folded into one ``nn.Linear``, so the
network ``backbone -> Linear`` returns class logits and LRP explains it. Images: grey 28 px
upsampled to ``--size`` px (3 channels, ImageNet normalisation, ``prunekit.zoo.packaged.image_batch``).

Every criterion ranks the 72 heads **once** on the unpruned model, from ``--per-class`` reference
images per class of the *training* split (disjoint from the probe's), each explained alone with
its true class (PXP's batch size 1 and one-hot start):

- ``lrp_eps``: PXP's default composite, ε everywhere incl. the softmax (AttnLRP's rule), LayerNorm
  ε; head score Σ keys -> abs -> Σ tokens and samples (``prunekit.training.lrp_rules.attention_head_scores``);
- ``lrp_cp``: CP-LRP (the attention probabilities held constant, ε on Linears and ``A·V``);
- ``lrp_zplus``: z⁺ on every Linear (Yeom's toy rule; PXP's "Yeom-z+" baseline), the rest as
  ``lrp_eps``. The Linears' inputs in a ViT are signed (after LayerNorm), so z⁺ is taken in its
  signed form ``x⁺W⁺ + x⁻W⁻`` (= α1β0; zennit's ``ZPlus``); ``x·W⁺`` alone divides by sums near
  zero and gave non-finite scores here;
- ``magnitude``: the L2 norm of the head's columns of the output projection, rows scaled by DINOv2's
  layer scale (the weights writing the head into the residual stream; *ours*: PXP ran no magnitude
  baseline on ViTs);
- ``taylor``: ``Σ_n |Σ_{tokens, d} a·g|`` with ``a`` the head's slice of the output projection's
  input and ``g`` the gradient of the summed cross-entropy there (Molchanov's first-order Taylor
  for a head);
- ``random``: seeded uniform scores, ``--seeds`` seeds.

Heads are pruned **globally** at each rate 0, 0.05, ..., 0.9 (``int(rate · 72)`` heads, a layer may
lose all of its heads, as PXP) by **masking**: a forward pre-hook zeroes the pruned heads' slices of
the output projection's input, which is what PXP's zeroing of the softmax output computes (and what
``prunekit.training.lrp_prune``'s encoder masks compute: ``tests/test_lrp_pruning.py`` checks the
equality). No fine-tuning. Accuracy: the probe's top-1 on ``--test`` test images of the 3 classes.

Metrics per criterion: ``A_PR`` = the area under accuracy vs rate (``np.trapezoid`` over the rates,
divided by their span; the paper's mean of the points is reported too); ``Top-PR`` = the highest
rate whose accuracy is at least 95 % of the unpruned one. Paper's claim (Hatefi et al. 2024, ViT-B/16
heads, 3 ImageNet classes: ε 0.85 vs Yeom-z⁺ 0.74 vs random 0.76): ε-LRP ranks heads at least as
well as the other criteria, and better than z⁺. The table's last column says, per row, whether
``lrp_eps``'s A_PR is >= that row's (for ``lrp_zplus``: strictly greater).

Cost, measured on one thread of a busy 2-core machine (load ~5) at 112 px: one evaluation of the
150 test images 8-12 s; the ε-LRP scores of 30 reference images 16 s (Taylor 6 s); the probe's
features 22 s (cached next to ``--out`` after the first run). 10 rankings x 18 non-zero rates =
180 evaluations: about 30 min in all (``--size 56``: about 4x less; ``--rates`` with a 0.1 step:
half).

Resumable: rows already in ``--out`` (JSON lines, one per criterion, seed and rate) are skipped.
Writes ``--out``, a markdown table (``.md``) and a plot (``.png``) next to it.

    PYTHONPATH=src OMP_NUM_THREADS=2 python benchmarks/lrp_dinov2_heads.py
    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/lrp_dinov2_heads.py --smoke   # a tiny check
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.assets import fashion_mnist
from prunekit.models.encoder_structure import encoder_stack, output_weights
from prunekit.training import lrp_rules as lrp
from prunekit.zoo.packaged import image_batch

RATES = [round(0.05 * i, 2) for i in range(19)]  # 0 .. 0.9
CRITERIA = ["lrp_eps", "lrp_cp", "lrp_zplus", "magnitude", "taylor", "random"]
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
COMPOSITES = {
    "lrp_eps": lrp.PXP_EPSILON,
    "lrp_cp": lrp.Composite(default="epsilon", layernorm="epsilon", softmax="cp"),
    "lrp_zplus": lrp.Composite(
        default="alpha1beta0", batchnorm="epsilon", layernorm="epsilon", softmax="epsilon"
    ),
}


class ProbeClassifier(nn.Module):
    """``backbone(pixel_values).pooler_output -> Linear``: class logits for LRP and evaluation."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values=pixel_values).pooler_output)


def fit_linear_probe(feats: torch.Tensor, labels: torch.Tensor, classes: int, l2: float = 1e-3) -> nn.Linear:
    """The bench's probe (standardise, multinomial logistic regression by L-BFGS, L2 1e-3) with the
    standardisation folded into one Linear."""
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mean) / std
    W = torch.zeros(z.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W + b, labels) + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    lin = nn.Linear(z.shape[1], classes)
    with torch.no_grad():
        lin.weight.copy_((W / std[:, None]).T)
        lin.bias.copy_(b - (mean / std) @ W)
    return lin


def features(backbone: nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat(
            [backbone(pixel_values=x[i : i + batch]).pooler_output for i in range(0, len(x), batch)]
        )


def pick(labels: np.ndarray, classes: list[int], per_class: int, skip: int = 0) -> np.ndarray:
    """The first ``per_class`` indices of each class after skipping ``skip`` of each (file order)."""
    return np.concatenate([np.flatnonzero(labels == c)[skip : skip + per_class] for c in classes])


# ------------------------------------------------------------------ head masks and scores
def attention_keys(model: nn.Module) -> list[str]:
    """The attention module names, as ``attention_head_scores`` keys them (one per layer)."""
    stack = encoder_stack(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] + "." + stack.names.o.rsplit(".", 1)[0] for layer in stack.layers]


class HeadMask:
    """PXP's head mask: the pruned heads' slices of each output projection's input set to zero."""

    def __init__(self, model: nn.Module, keys: list[str], drop: dict[str, list[int]], head_dim: int) -> None:
        self.handles = []
        for k in keys:
            heads = drop.get(k, [])
            if not heads:
                continue
            o = model.get_submodule(k).o_proj
            cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])

            def pre(mod, args, cols=cols):
                x = args[0].clone()
                x[..., cols] = 0
                return (x, *args[1:])

            self.handles.append(o.register_forward_pre_hook(pre))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def magnitude_scores(model: nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    stack = encoder_stack(model)
    out = {}
    for k, layer in zip(keys, stack.layers, strict=True):
        Wo, _ = output_weights(layer, stack.names)  # (H, heads * d), rows scaled by the layer scale
        n = layer.attention.num_attention_heads
        out[k] = Wo.reshape(Wo.shape[0], n, -1).pow(2).sum((0, 2)).sqrt()
    return out


def taylor_scores(
    model: nn.Module, keys: list[str], ref: list[dict], head_dim: int
) -> dict[str, torch.Tensor]:
    acts: dict[str, torch.Tensor] = {}
    handles = []

    def keep(k):
        def pre(mod, args):
            a = args[0]
            if a.requires_grad:
                a.retain_grad()
            acts[k] = a

        return pre

    out = {k: 0.0 for k in keys}
    try:
        for k in keys:
            handles.append(model.get_submodule(k).o_proj.register_forward_pre_hook(keep(k)))
        for b in ref:
            x = b["pixel_values"].clone().requires_grad_(True)  # gradients flow without the weights'
            with torch.enable_grad():
                loss = F.cross_entropy(model(x), b["labels"], reduction="sum")
                grads = torch.autograd.grad(loss, [acts[k] for k in keys])
            for k, g in zip(keys, grads, strict=True):
                ag = (acts[k].detach() * g).unflatten(-1, (-1, head_dim))  # (B, N, heads, d)
                out[k] = out[k] + ag.sum((1, 3)).abs().sum(0)
    finally:
        for h in handles:
            h.remove()
    return out


def criterion_scores(model, name: str, keys, ref, head_dim: int, seed: int) -> dict[str, torch.Tensor]:
    if name in COMPOSITES:
        return lrp.attention_head_scores(model, ref, COMPOSITES[name])
    if name == "magnitude":
        return magnitude_scores(model, keys)
    if name == "taylor":
        return taylor_scores(model, keys, ref, head_dim)
    g = torch.Generator().manual_seed(seed)
    heads = encoder_stack(model).config.num_attention_heads
    return {k: torch.rand(heads, generator=g) for k in keys}


# ------------------------------------------------------------------ the summary
def metrics(acc: np.ndarray, rates: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A_PR by trapezoid / span, the mean of the points, and Top-PR, per run (rows)."""
    trapz = np.trapezoid(acc, rates, axis=1) / (rates[-1] - rates[0])
    ok = acc >= 0.95 * acc[:, :1]
    top = np.array([max(r for r, o in zip(rates, row, strict=True) if o) for row in ok])
    return trapz, acc.mean(1), top


def summarise(rows: list[dict], out: pathlib.Path, rates: list[float], header: str) -> None:
    by: dict[str, dict[int, dict[float, float]]] = {}
    for r in rows:
        by.setdefault(r["criterion"], {}).setdefault(r["seed"], {})[r["rate"]] = r["acc"]
    curves = {}
    for crit in CRITERIA:
        runs = [v for v in by.get(crit, {}).values() if all(rt in v for rt in rates)]
        if runs:
            curves[crit] = np.array([[run[rt] for rt in rates] for run in runs])
    apr = {c: metrics(a, rates)[0].mean() for c, a in curves.items()}
    lines = [
        "# Pruning DINOv2-S heads by explaining (3-class Fashion-MNIST probe, no fine-tuning)",
        "",
        header,
        "",
        "| criterion | runs | A_PR (trapz) | A_PR (mean of points) | Top-PR | acc @30% | acc @50% | acc @70% "
        "| paper's claim (ε-LRP >= this row; > for z+) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v):
        return f"{v.mean():.3f}" + (f" ± {v.std():.3f}" if len(v) > 1 else "")

    def at(acc, r):
        return fmt(acc[:, rates.index(r)]) if r in rates else "-"

    for crit, acc in curves.items():
        trapz, mean, top = metrics(acc, rates)
        if crit == "lrp_eps" or "lrp_eps" not in apr:
            claim = "-"
        elif crit == "lrp_zplus":
            claim = (
                "holds" if apr["lrp_eps"] > apr[crit] else "fails"
            ) + f" (Δ {apr['lrp_eps'] - apr[crit]:+.3f})"
        else:
            claim = (
                "holds" if apr["lrp_eps"] >= apr[crit] else "fails"
            ) + f" (Δ {apr['lrp_eps'] - apr[crit]:+.3f})"
        lines.append(
            f"| {crit} | {len(acc)} | {fmt(trapz)} | {fmt(mean)} | {fmt(top)} | {at(acc, 0.3)} | "
            f"{at(acc, 0.5)} | {at(acc, 0.7)} | {claim} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for crit, acc in curves.items():
        (line,) = ax.plot(rates, acc.mean(0), marker="o", ms=3, label=f"{crit} (A_PR {apr[crit]:.3f})")
        if len(acc) > 1:
            ax.fill_between(rates, acc.min(0), acc.max(0), alpha=0.2, color=line.get_color())
    ax.set_xlabel("fraction of the 72 attention heads pruned (global, masked, no fine-tuning)")
    ax.set_ylabel("3-class probe top-1")
    ax.set_title("DINOv2-S heads: ε-LRP (PXP) vs baselines")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


# ------------------------------------------------------------------ the run
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/lrp_dinov2_heads.jsonl")
    p.add_argument("--size", type=int, default=112, help="image side in px (multiple of 14)")
    p.add_argument("--class-seed", type=int, default=0, help="which 3 classes (a seeded draw of 10)")
    p.add_argument("--probe-train", type=int, default=100, help="probe training images per class")
    p.add_argument("--per-class", type=int, default=10, help="LRP/Taylor reference images per class")
    p.add_argument("--test", type=int, default=50, help="test images per class")
    p.add_argument("--seeds", type=int, default=5, help="seeds of the random criterion")
    p.add_argument("--criteria", nargs="*", default=CRITERIA)
    p.add_argument("--rates", nargs="*", type=float, default=RATES)
    p.add_argument("--smoke", action="store_true", help="tiny: 56 px, 4 rates, 2 random seeds, few images")
    args = p.parse_args()
    if args.smoke:
        args.size, args.probe_train, args.per_class, args.test, args.seeds = 56, 20, 2, 10, 2
        args.rates = [0.0, 0.3, 0.6, 0.9]
        args.out = str(pathlib.Path(args.out).with_name("lrp_dinov2_heads_smoke.jsonl"))
    rates = sorted(args.rates)
    if rates[0] != 0.0:
        rates = [0.0, *rates]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    classes = sorted(
        torch.randperm(10, generator=torch.Generator().manual_seed(args.class_seed))[:3].tolist()
    )
    config = {
        "size": args.size, "classes": classes, "probe_train": args.probe_train, "per_class": args.per_class,
        "test": args.test,
    }  # fmt: skip

    torch.manual_seed(0)
    backbone = prunekit.zoo.dinov2_small()
    Xtr, ytr = fashion_mnist("train")
    Xte, yte = fashion_mnist("test")
    remap = {c: i for i, c in enumerate(classes)}
    t0 = time.perf_counter()
    tr = pick(ytr, classes, args.probe_train)
    probe_file = out.with_name(
        out.stem + f"_probe_{args.size}px_{'-'.join(map(str, classes))}_{args.probe_train}.pt"
    )
    if probe_file.exists():
        head = nn.Linear(384, 3)
        head.load_state_dict(torch.load(probe_file, weights_only=True))
    else:
        feats = features(backbone, image_batch(Xtr[tr], args.size))
        head = fit_linear_probe(feats, torch.tensor([remap[int(c)] for c in ytr[tr]]), 3)
        torch.save(head.state_dict(), probe_file)
    model = ProbeClassifier(backbone, head).eval()
    t_probe = time.perf_counter() - t0
    te = pick(yte, classes, args.test)
    test_x = image_batch(Xte[te], args.size)
    test_y = torch.tensor([remap[int(c)] for c in yte[te]])
    rf = pick(ytr, classes, args.per_class, skip=args.probe_train)  # disjoint from the probe's images
    ref_x = image_batch(Xtr[rf], args.size)
    ref = [
        {"pixel_values": ref_x[i : i + 1], "labels": torch.tensor([remap[int(ytr[j])]])}
        for i, j in enumerate(rf)
    ]
    keys = attention_keys(model)
    head_dim = backbone.config.hidden_size // backbone.config.num_attention_heads
    n_heads = len(keys) * backbone.config.num_attention_heads

    cache: dict[frozenset, float] = {}

    def evaluate(drop: dict[str, list[int]]) -> float:
        key = frozenset((k, h) for k, hs in drop.items() for h in hs)
        if key not in cache:
            with HeadMask(model, keys, drop, head_dim), torch.inference_mode():
                pred = torch.cat([model(test_x[i : i + 32]).argmax(-1) for i in range(0, len(test_x), 32)])
            cache[key] = (pred == test_y).double().mean().item()
        return cache[key]

    t0 = time.perf_counter()
    dense = evaluate({})
    t_eval = time.perf_counter() - t0
    print(
        f"classes {[CLASSES[c] for c in classes]}; dense probe acc {dense:.3f} on {len(test_y)} test images; "
        f"probe {t_probe:.1f} s; one evaluation {t_eval:.1f} s",
        flush=True,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    rows = [r for r in rows if r.get("config") == config]
    done = {(r["criterion"], r["seed"], r["rate"]) for r in rows}
    for crit in args.criteria:
        if crit not in CRITERIA:
            raise SystemExit(f"unknown criterion {crit!r}; choose from {CRITERIA}")
        for seed in range(args.seeds if crit == "random" else 1):
            todo = [rt for rt in rates if (crit, seed, rt) not in done]
            if not todo:
                continue
            t0 = time.perf_counter()
            s = criterion_scores(model, crit, keys, ref, head_dim, seed)
            t_score = time.perf_counter() - t0
            for rt in todo:
                keep = lrp.least_relevant(s, rt, min_keep=0)
                drop = {k: sorted(set(range(len(s[k]))) - set(keep[k].tolist())) for k in keys}
                t1 = time.perf_counter()
                acc = evaluate(drop)
                row = {
                    "criterion": crit, "seed": seed, "rate": rt, "acc": acc,
                    "pruned": sum(len(v) for v in drop.values()), "heads": n_heads,
                    "per_layer_kept": [len(keep[k]) for k in keys], "score_s": round(t_score, 2),
                    "eval_s": round(time.perf_counter() - t1, 2), "threads": torch.get_num_threads(),
                    "config": config,
                }  # fmt: skip
                rows.append(row)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{crit} seed {seed} rate {rt:.2f}: acc {acc:.3f} ({row['pruned']} heads)", flush=True)
    header = (
        f"prunekit {prunekit.__version__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"fp32 CPU. DINOv2-S at {args.size} px; classes {[CLASSES[c] for c in classes]}; probe fit on "
        f"{3 * args.probe_train} dense train features; {3 * args.per_class} reference images (train split, "
        f"disjoint); {len(test_y)} test images; dense accuracy {dense:.3f}. Rates "
        f"{rates[0]:g}..{rates[-1]:g} ({len(rates)} points) of the {n_heads} heads, global, masked, no "
        "fine-tuning. A_PR: trapezoid area "
        "over the rates / their span; Top-PR: highest rate keeping 95 % of the dense accuracy."
    )
    summarise(rows, out, rates, header)


if __name__ == "__main__":
    main()
