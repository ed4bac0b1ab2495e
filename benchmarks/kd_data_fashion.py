"""KD on pruned data in miniature: Ben-Baruch et al., "Distilling the Knowledge in Data Pruning"
(ICML 2025, arXiv 2403.07854; no official code), spec ``data-draft.md`` §1 "Smallest faithful
demonstration", on a Fashion-MNIST CNN.

- **Teacher**: the student's own CNN (self-distillation, as the paper's theory motivates) trained on
  100 % of the training images with the same recipe; a *smaller* (half the channels) and a *wider*
  (twice the channels) teacher too. Every teacher's test accuracy is reported.
- **Scores** (``prunekit.data``): random; EL2N and GraNd (last-layer, DeepCore's approximation),
  averaged over two early models: the teacher after its first epoch and one extra one-epoch run;
  forgetting events over the teacher's run (eval-mode predictions on the un-augmented training
  images twice per epoch). Hard samples kept (highest scores), ties by index.
- **Grid**: kept fractions f ∈ {0.1, 0.3, 0.5, 1.0} × α ∈ {0 (no KD), 0.5, 0.9, "auto"} (the
  prunekit heuristic: 0.5 / 0.8 / 0.7 / 0.5 at f = 0.1 / 0.3 / 0.5 / 1.0; "auto" is only trained
  where it differs from 0.5 and 0.9) × the four scores, τ = 4 (unconfirmed, the spec's choice for
  10 classes). At f = 0.1 also KD from the smaller and the wider teacher.
- Every student trains the same number of epochs over its own subset (so a smaller subset gets
  fewer steps), AdamW with linear decay, batch 64, no augmentation: the teacher's logits are cached
  once over the training set (valid only because there is no augmentation).

**CPU-reduced**: the spec's CNN is conv 32/64 + FC (0.4 M parameters); here the student is
``ConvNet(widths=(16, 32))`` (conv3x3-BN-ReLU, 2x2 max-pools, FC from 32x7x7: 21 k parameters),
the small teacher ``(8, 16)``, the wide teacher ``(32, 64)``; ``--train`` 20 000 of the 60 000
training images (a seeded subset, the same for every seed) and ``--epochs`` 4; the full 10 000 test
images. About 20 min per seed on one core. Two seeds by default: at this scale differences below
the seeds' spread are noise.

Rows go to ``<out>.jsonl`` as they finish (a rerun skips rows already there; the teachers and the
scores are cached under ``--cache``); then ``<out>.md`` (tables, mean ± std over seeds, and which
of the paper's four claims hold) and ``<out>.png``.

Run:   PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/kd_data_fashion.py --seeds 0 1
Smoke: PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/kd_data_fashion.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import os
import pathlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import _shared
import torch
from torch import nn
from tqdm import tqdm

from prunekit.data import scores as DS
from prunekit.data.kd import alpha_for_fraction, default_tau, train_kd
from prunekit.data.select import random_subset, topk

ALPHAS = (0.0, 0.5, 0.9)
KD_ALPHAS = (0.5, 0.9)  # the teacher-size comparison
WITH_KD = (0.5, 0.9, "auto")  # "with KD": the best of these
SCORES = ("random", "el2n", "grand", "forgetting")
TEACHERS = ("self", "small", "big")  # the student's architecture, a smaller one, a wider one
TOL = 0.005  # "matches": within 0.5 accuracy points


# ------------------------------------------------------------------ the task (shared with kd_data_sst2.py)
@dataclass
class Task:
    """A classification task on tensors: ``build(arch, seed)`` makes a model whose
    ``forward(**{key: x})`` returns logits (or ``{"logits": ...}``); ``arch`` is ``"student"``,
    ``"small"`` or ``"big"`` (the teachers; ``"self"`` is the student's architecture)."""

    name: str  # with the fold, when a task differs per seed (the cache key)
    title: str
    key: str
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    build: Callable[[str, int], nn.Module]
    archs: dict[str, str]
    epochs: int
    batch_size: int
    lr: float
    tau: float | str = "auto"
    weight_decay: float = 0.0
    evals_per_epoch: int = 2  # forgetting: eval-mode predictions on the training set per epoch
    notes: dict = field(default_factory=dict)


class Batches:
    """Mini-batches of the kept indices ``idx`` in a seeded order, reshuffled every pass;
    ``hook(step)`` is called before each batch after the first (so after each completed step)."""

    def __init__(self, task: Task, idx: torch.Tensor, seed: int, hook=None) -> None:
        self.task, self.idx, self.hook, self.step = task, idx, hook, 0
        self.g = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.idx) / self.task.batch_size)

    def __iter__(self):
        perm = self.idx[torch.randperm(len(self.idx), generator=self.g)]
        bs = self.task.batch_size
        for s in range(0, len(perm), bs):
            if self.hook is not None and self.step > 0:
                self.hook(self.step)
            b = perm[s : s + bs]
            self.step += 1
            yield {self.task.key: self.task.x[b], "labels": self.task.y[b], "sample_index": b}


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out["logits"]


@torch.no_grad()
def predict(model: nn.Module, task: Task, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return torch.cat([_logits(model(**{task.key: x[i : i + batch]})) for i in range(0, len(x), batch)])
    finally:
        model.train(was)


def accuracy(model: nn.Module, task: Task) -> float:
    return float((predict(model, task, task.x_test).argmax(-1) == task.y_test).float().mean())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def data_batches(task: Task, batch: int = 1000) -> list[dict]:
    """The whole training set in order, for the scores."""
    return [
        {task.key: task.x[i : i + batch], "labels": task.y[i : i + batch]}
        for i in range(0, len(task.y), batch)
    ]


# ------------------------------------------------------------------ teachers and scores
def train_full(task: Task, arch: str, seed: int, epochs: int | None = None, track: bool = False):
    """``arch`` trained on 100 % of the training set. ``track``: also the ``(T, N)`` correctness
    matrix (eval mode, ``evals_per_epoch`` times per epoch) and a copy after the first epoch."""
    model = task.build(arch, seed)
    everything = torch.arange(len(task.y))
    rows, early = [], {}
    batches = Batches(task, everything, seed)
    per_epoch = len(batches)
    every = max(1, per_epoch // task.evals_per_epoch)

    def hook(step: int) -> None:
        if step % every == 0:
            rows.append(predict(model, task, task.x).argmax(-1) == task.y)
        if step == per_epoch:
            early["model"] = copy.deepcopy(model)

    batches.hook = hook if track else None
    t0 = time.perf_counter()
    train_kd(
        model,
        None,
        batches,
        epochs=epochs or task.epochs,
        alpha=0.0,
        lr=task.lr,
        weight_decay=task.weight_decay,
    )
    seconds = time.perf_counter() - t0
    if track:
        rows.append(predict(model, task, task.x).argmax(-1) == task.y)
        early.setdefault("model", copy.deepcopy(model))  # a one-epoch run
    return model, seconds, (torch.stack(rows) if rows else None), early.get("model")


def compute_scores(task: Task, early: list[nn.Module], correct: torch.Tensor) -> dict[str, torch.Tensor]:
    data = data_batches(task)
    return {
        "el2n": DS.el2n(early, data),
        "grand": DS.grand(early, data),
        "forgetting": DS.forgetting(correct=correct),
    }


def kept(score: str, f: float, scores: dict, n: int, seed: int) -> torch.Tensor:
    if f >= 1.0:
        return torch.arange(n)
    if score == "random":
        return random_subset(n, f, seed=seed)
    return topk(scores[score], f)  # the highest (hardest) samples, ties by index


# ------------------------------------------------------------------ the grid
def alpha_label(a) -> str:
    return "auto" if a == "auto" else f"{a:g}"


def jobs(args, seed: int) -> list[tuple]:
    """``(kind, score, f, alpha, teacher)`` for one seed, in run order."""
    out = [("teacher", "-", 1.0, "-", t) for t in TEACHERS]
    for f in args.fractions:
        grid = list(ALPHAS) + (["auto"] if alpha_for_fraction(f) not in ALPHAS else [])
        for score in SCORES if f < 1 else ("full",):
            out += [("student", score, f, a, "self") for a in grid]
    for f in args.teacher_fractions:
        for score in SCORES if f < 1 else ("full",):
            for t in ("small", "big"):
                out += [("student", score, f, a, t) for a in ALPHAS if a > 0]
    return out


def key(kind, score, f, a, teacher, seed) -> str:
    return f"{kind}/{score}/{f:g}/{alpha_label(a) if kind == 'student' else a}/{teacher}/{seed}"


def resume(path: pathlib.Path) -> dict[str, dict]:
    return {r["key"]: r for r in _shared.rows(path)}


def cache_tag(task: Task, args) -> str:
    cfg = json.dumps([task.name, task.archs, len(task.y), task.epochs, task.batch_size, task.lr, task.notes])
    return hashlib.sha1(cfg.encode()).hexdigest()[:10]


def prepare(task: Task, args, seed: int, cache: pathlib.Path) -> dict:
    """Teachers (weights cached), their training-set logits, and the scores for ``seed``."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"seed{seed}.pt"
    if path.exists():
        state = torch.load(path, weights_only=False)
    else:
        state = {"teachers": {}, "seconds": {}}
        for t in TEACHERS:
            arch = task.archs["student" if t == "self" else t]
            tqdm.write(f"[{task.name} seed {seed}] training the {t} teacher ({arch})")
            m, s, correct, early = train_full(
                task, "student" if t == "self" else t, 1000 + seed, track=t == "self"
            )
            state["teachers"][t] = m.state_dict()
            state["seconds"][t] = s
            if t == "self":
                tqdm.write(
                    f"[{task.name} seed {seed}] scores: an extra one-epoch run, EL2N, GraNd, forgetting"
                )
                extra, *_ = train_full(task, "student", 2000 + seed, epochs=1)
                state["scores"] = compute_scores(task, [early, extra], correct)
                state["forgetting_evals"] = int(correct.shape[0])
        torch.save(state, path)
    models = {}
    for t, sd in state["teachers"].items():
        m = task.build("student" if t == "self" else t, 1000 + seed)
        m.load_state_dict(sd)
        models[t] = m
    state["models"] = models
    state["logits"] = {t: predict(m, task, task.x) for t, m in models.items()}  # the cache (no augmentation)
    return state


def run(task_for: Callable[[int], Task], args, title: str) -> None:
    """Every job of every seed not yet in ``<out>.jsonl``; ``task_for(seed)`` is the seed's task
    (the same for every seed, or e.g. one cross-validation fold per seed)."""
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".jsonl")
    done = resume(path)
    todo = [(seed, j) for seed in args.seeds for j in jobs(args, seed) if key(*j, seed) not in done]
    bar = tqdm(total=len(todo), desc=f"{title}: runs", unit="run")
    state, state_seed = None, None
    with path.open("a") as fh:
        for seed, (kind, score, f, a, teacher) in todo:
            if state_seed != seed:
                task = task_for(seed)
                cache = pathlib.Path(args.cache) / f"kd_data-{task.name}-{cache_tag(task, args)}"
                state, state_seed = prepare(task, args, seed, cache), seed
            t0 = time.perf_counter()
            row = {
                "key": key(kind, score, f, a, teacher, seed),
                "task": task.name,
                "kind": kind,
                "seed": seed,
                "teacher": teacher,
                "teacher_arch": task.archs["student" if teacher == "self" else teacher],
                "n_train": len(task.y),
                "n_test": len(task.y_test),
                "epochs": task.epochs,
                "batch_size": task.batch_size,
                "lr": task.lr,
            }
            if kind == "teacher":
                m = state["models"][teacher]
                row.update(accuracy=accuracy(m, task), params=n_params(m), train_s=state["seconds"][teacher])
            else:
                idx = kept(score, f, state["scores"], len(task.y), seed)
                student = task.build("student", seed)
                alpha = alpha_for_fraction(f) if a == "auto" else a
                res = train_kd(
                    student,
                    None,
                    Batches(task, idx, seed),
                    epochs=task.epochs,
                    alpha=alpha,
                    tau=task.tau,
                    teacher_logits=state["logits"][teacher],
                    lr=task.lr,
                    weight_decay=task.weight_decay,
                )
                row.update(
                    score=score,
                    fraction=f,
                    alpha=alpha_label(a),
                    alpha_value=alpha,
                    tau=res.tau if res.tau != "auto" else default_tau(int(task.y.max()) + 1),
                    kept=len(idx),
                    steps=res.steps,
                    accuracy=accuracy(student, task),
                    params=n_params(student),
                    train_s=res.seconds,
                    final_loss=res.losses[-1] if res.losses else None,
                )
            row["wall_s"] = time.perf_counter() - t0
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            bar.update(1)
            tqdm.write(f"{row['key']}: acc {100 * row['accuracy']:.2f}")
    bar.close()


# ------------------------------------------------------------------ report


def _cell(vals: list[float] | None) -> str:
    if not vals:
        return "–"
    m, s = _shared.mean_sd(vals)
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def summarise(rows: list[dict]) -> dict:
    """Accuracies per (score, f, α label, teacher) over seeds; ``auto`` filled from the equal grid α."""
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        if r["kind"] == "student":
            acc.setdefault((r["score"], r["fraction"], r["alpha"], r["teacher"]), []).append(r["accuracy"])
    for (score, f, a, t), v in list(acc.items()):
        auto = alpha_for_fraction(f)
        if a == f"{auto:g}" and (score, f, "auto", t) not in acc:
            acc[(score, f, "auto", t)] = v
    return acc


def best_alpha(
    acc: dict, score: str, f: float, teacher: str = "self", alphas=None
) -> tuple[float, float] | None:
    """(α, mean accuracy) of the best α of ``alphas`` (default the grid 0, 0.5, 0.9 and the auto
    value) at ``f``."""
    cands = []
    for a in alphas or [*ALPHAS, "auto"]:
        v = acc.get((score, f, alpha_label(a), teacher))
        if v:
            cands.append((statistics.fmean(v), alpha_for_fraction(f) if a == "auto" else a))
    if not cands:
        return None
    m, a = max(cands)
    return a, m


def _verdict(yes: int, of: int) -> str:
    if not of:
        return "not measured"
    return (
        "holds"
        if yes == of
        else f"partly holds ({yes}/{of})"
        if 2 * yes >= of
        else f"does not hold ({yes}/{of})"
    )


def claims(acc: dict, teachers: dict, fractions: list[float]) -> list[str]:
    low = [f for f in fractions if f < 1]
    scores = [s for s in SCORES if any(k[0] == s for k in acc)]
    out = []
    # (a) KD improves every pruning method at every fraction
    cells, better = 0, 0
    for s in scores:
        for f in low:
            base, b = acc.get((s, f, "0", "self")), best_alpha(acc, s, f, alphas=WITH_KD)
            if base and b:
                cells += 1
                better += b[1] > statistics.fmean(base)
    auto_better = sum(
        1
        for s in scores
        for f in low
        if acc.get((s, f, "auto", "self"))
        and acc.get((s, f, "0", "self"))
        and statistics.fmean(acc[(s, f, "auto", "self")]) > statistics.fmean(acc[(s, f, "0", "self")])
    )
    verdict = _verdict(better, cells)
    out.append(
        f"- **(a) KD improves every pruning method at every fraction**: {verdict} — the best α > 0 beats "
        f"α = 0 in {better}/{cells} (score, f < 1) cells; α = auto alone in {auto_better}/{cells}."
    )
    # (b) with KD, random matches or beats the scores
    parts, ok = [], 0
    for f in low:
        r = best_alpha(acc, "random", f, alphas=WITH_KD)
        others = [(best_alpha(acc, s, f, alphas=WITH_KD), s) for s in scores if s != "random"]
        others = [(b[1], s) for b, s in others if b]
        if r and others:
            top, name = max(others)
            ok += r[1] >= top - TOL
            parts.append(f"f = {f:g}: random+KD {100 * r[1]:.2f} vs best score+KD {100 * top:.2f} ({name})")
    full0 = acc.get(("full", 1.0, "0", "self"))
    r50 = best_alpha(acc, "random", 0.5, alphas=WITH_KD)
    extra = ""
    if full0 and r50:
        extra = (
            f"; random 50 % + KD {100 * r50[1]:.2f} vs 100 % without KD {100 * statistics.fmean(full0):.2f} "
            f"({'beats' if r50[1] > statistics.fmean(full0) else 'does not beat'} it)"
        )
    verdict = _verdict(ok, len(parts))
    out.append(
        f"- **(b) with KD, random pruning matches or beats the scores** (within {100 * TOL:.1f} points): "
        f"{verdict} — {'; '.join(parts)}{extra}."
    )
    # (c) the best α grows as the kept fraction shrinks
    per_f = {}
    for f in sorted(fractions):
        bs = [best_alpha(acc, s, f) for s in ([*scores] if f < 1 else ["full"])]
        bs = [b[0] for b in bs if b]
        if bs:
            per_f[f] = statistics.fmean(bs)
    fs = sorted(per_f)
    mono = all(per_f[a] >= per_f[b] for a, b in itertools.pairwise(fs)) and len(fs) > 1
    grows = len(fs) > 1 and per_f[fs[0]] > per_f[fs[-1]]
    verdict = "holds" if mono and grows else "partly holds" if grows else "does not hold"
    out.append(
        f"- **(c) the best α grows as the kept fraction shrinks**: {verdict} — mean best α over the scores: "
        + ", ".join(f"f = {f:g}: {per_f[f]:.2f}" for f in fs)
        + "."
    )
    # (d) teacher size at low fractions
    parts = []
    for f in low:
        res = {}
        for t in TEACHERS:
            vals = [best_alpha(acc, s, f, t, KD_ALPHAS) for s in scores]
            if vals and all(vals):
                res[t] = statistics.fmean(v[1] for v in vals)
        if len(res) == 3:
            hurt = res["big"] < res["self"]
            helps = res["small"] >= res["self"]
            parts.append(
                f"f = {f:g} (mean over the scores of the best α in {{0.5, 0.9}}): smaller teacher "
                f"{100 * res['small']:.2f}, same-size {100 * res['self']:.2f}, wider {100 * res['big']:.2f}: "
                f"a larger teacher {'hurts' if hurt else 'does not hurt'}, a smaller one "
                f"{'helps (or ties)' if helps else 'does not help'}"
            )
    tacc = ", ".join(f"{t} {_cell(v)}" for t, v in teachers.items())
    if parts:
        both = all("does not" not in p for p in parts)
        some = any("hurts" in p and "does not hurt" not in p for p in parts) or any(
            "helps" in p for p in parts
        )
        verdict = "holds" if both else "partly holds" if some else "does not hold"
        out.append(
            f"- **(d) at low fractions a larger teacher hurts and a smaller one can help**: {verdict} — "
            f"{'; '.join(parts)} (teachers' test accuracy: {tacc})."
        )
    else:
        out.append("- **(d) teacher size**: not measured.")
    return out


def report(out: pathlib.Path, name: str, title: str | None = None, setup: str = "") -> None:
    rows = [json.loads(x) for x in out.with_suffix(".jsonl").read_text().splitlines() if x.strip()]
    if not rows:
        return
    acc = summarise(rows)
    teachers: dict[str, list[float]] = {}
    tinfo: dict[str, dict] = {}
    for r in rows:
        if r["kind"] == "teacher":
            teachers.setdefault(r["teacher"], []).append(r["accuracy"])
            tinfo[r["teacher"]] = r
    seeds = sorted({r["seed"] for r in rows})
    st = [r for r in rows if r["kind"] == "student"]
    fractions = sorted({r["fraction"] for r in st})
    r0 = rows[0]
    lines = [
        f"# {title or 'KD on pruned data (Ben-Baruch et al., ICML 2025) in miniature: ' + name}",
        "",
        setup
        or (
            f"{r0['n_train']} training images, {r0['n_test']} test images, {r0['epochs']} epochs over each "
            f"subset, batch {r0['batch_size']}, AdamW lr {r0['lr']}."
        ),
        f"Seeds: {', '.join(map(str, seeds))} (mean ± std over seeds; at this scale differences within the "
        f"spread are noise). Rows: `{out.name}.jsonl`. τ = {st[0]['tau'] if st else '–'} (unconfirmed). "
        "α = auto is the prunekit heuristic (0.9 at f = 0.1, 0.7 at 0.5, 0.5 at 1.0, linear between), "
        "not the paper's formula.",
        "",
        "Methods: `kd_data` (`prunekit.data.kd`: `kd_loss`, `train_kd`) on subsets selected by "
        "`random_data`, `el2n`, `grand` and `forgetting` (`prunekit.data`); EL2N and GraNd averaged over "
        "the teacher after its first epoch and one extra one-epoch run, forgetting over the teacher's run.",
        "",
        "## Teachers (trained on 100 %)",
        "",
        "| teacher | architecture | parameters | test accuracy |",
        "|---|---|---|---|",
    ]
    for t in TEACHERS:
        if t in teachers:
            lines.append(
                f"| {t} | {tinfo[t]['teacher_arch']} | {tinfo[t]['params']:,} | {_cell(teachers[t])} |"
            )
    lines += [
        "",
        "## Test accuracy (%) by kept fraction, score and KD weight α (teacher: same architecture)",
        "",
        "KD gain: the best of α ∈ {0.5, 0.9, auto} minus α = 0, in points. Best α: over α ∈ {0, 0.5, "
        "0.9, auto}.",
        "",
        "| kept f | score | α = 0 (no KD) | α = 0.5 | α = 0.9 | α = auto | best α | KD gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for f in sorted(fractions, reverse=True):
        for s in SCORES if f < 1 else ("full",):
            if (s, f, "0", "self") not in acc and (s, f, "0.5", "self") not in acc:
                continue
            cells = [_cell(acc.get((s, f, a, "self"))) for a in ("0", "0.5", "0.9", "auto")]
            b, kd = best_alpha(acc, s, f), best_alpha(acc, s, f, alphas=WITH_KD)
            base = acc.get((s, f, "0", "self"))
            gain = f"{100 * (kd[1] - statistics.fmean(base)):+.2f}" if kd and base else "–"
            auto = f"{cells[3]} (α={alpha_for_fraction(f):.2f})" if cells[3] != "–" else "–"
            lines.append(
                f"| {f:g} | {s} | {cells[0]} | {cells[1]} | {cells[2]} | {auto} | {b[0]:g} | {gain} |"
                if b
                else f"| {f:g} | {s} | {' | '.join(cells)} | – | – |"
            )
    lines += [
        "",
        "## Best α per kept fraction",
        "",
        "| kept f | " + " | ".join(SCORES) + " |",
        "|---|" + "---|" * len(SCORES),
    ]
    for f in sorted(fractions, reverse=True):
        bs = [best_alpha(acc, s if f < 1 else "full", f) for s in SCORES]
        lines.append(f"| {f:g} | " + " | ".join(f"{b[0]:g}" if b else "–" for b in bs) + " |")
    tf = sorted({k[1] for k in acc if k[3] != "self"}, reverse=True)
    if tf:
        lines += [
            "",
            "## Teacher size at low kept fractions",
            "",
            "| kept f | score | teacher | α = 0 (no KD) | α = 0.5 | α = 0.9 |",
            "|---|---|---|---|---|---|",
        ]
        for f in tf:
            for s in SCORES:
                for t in TEACHERS:
                    if (s, f, "0.9", t) in acc:
                        lines.append(
                            f"| {f:g} | {s} | {t} ({_cell(teachers.get(t))}) | "
                            f"{_cell(acc.get((s, f, '0', 'self')))} | {_cell(acc.get((s, f, '0.5', t)))} | "
                            f"{_cell(acc.get((s, f, '0.9', t)))} |"
                        )
    lines += ["", "## The paper's four claims in miniature", "", *claims(acc, teachers, fractions)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, acc, teachers, fractions, name)


def plot(out: pathlib.Path, acc: dict, teachers: dict, fractions: list[float], name: str) -> None:
    plt = _shared.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for i, s in enumerate(SCORES):
        c = f"C{i}"
        for a, style, lab in (("0", "--", "no KD"), ("auto", "-", "KD α=auto")):
            pts = []
            for f in fractions:
                v = acc.get(("full" if f >= 1 else s, f, a, "self"))
                if v:
                    pts.append((f, 100 * statistics.fmean(v)))
            if pts:
                ax.plot(*zip(*pts, strict=True), style, marker="o", color=c, label=f"{s}, {lab}")
    if "self" in teachers:
        ax.axhline(
            100 * statistics.fmean(teachers["self"]), color="k", lw=0.8, ls=":", label="teacher (100 %)"
        )
    ax.set_xlabel("kept fraction f")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, f in enumerate(f for f in fractions if f < 1):
        pts = []
        for a in ALPHAS:
            vals = [
                statistics.fmean(acc[(s, f, f"{a:g}", "self")])
                for s in SCORES
                if (s, f, f"{a:g}", "self") in acc
            ]
            if vals:
                pts.append((a, 100 * statistics.fmean(vals)))
        if pts:
            ax.plot(
                *zip(*pts, strict=True), marker="o", color=f"C{i}", label=f"f = {f:g} (mean of the scores)"
            )
    ax.set_xlabel("KD weight α")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"KD on pruned data: {name}")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


# ------------------------------------------------------------------ Fashion-MNIST
class _Net(nn.Module):
    """``ConvNet`` returning the logits from ``pixel_values`` (the scores and the loop read ``logits``)."""

    def __init__(self, widths, seed: int) -> None:
        super().__init__()
        from prunekit.models.convnets import ConvNet

        self.net = ConvNet(widths=widths, seed=seed)
        self.fc = self.net.fc  # the last Linear, for GraNd's last-layer gradient

    def forward(self, pixel_values: torch.Tensor, labels=None):
        return self.net(pixel_values=pixel_values)


def fashion_task(args) -> Task:
    from prunekit.models.convnets import fashion_batches

    train = fashion_batches("train", args.train, limit=args.train, seed=0)[0]
    test = fashion_batches("test", 10_000, limit=args.test, seed=None)[0]
    widths = {
        "student": tuple(args.widths),
        "small": tuple(w // 2 for w in args.widths),
        "big": tuple(2 * w for w in args.widths),
    }
    return Task(
        name="fashion",
        title="Fashion-MNIST CNN",
        key="pixel_values",
        x=train["pixel_values"],
        y=train["labels"],
        x_test=test["pixel_values"],
        y_test=test["labels"],
        build=lambda arch, seed: _Net(widths[arch], seed),
        archs={k: f"ConvNet {'-'.join(map(str, w))}" for k, w in widths.items()},
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        tau="auto",
    )


def fashion_setup(args) -> str:
    w = args.widths
    return (
        f"CPU-reduced: student ConvNet {w[0]}-{w[1]} (conv3x3-BN-ReLU, 2x2 max-pools, one FC), "
        f"a seeded subset of {args.train} of the 60 000 training images, {args.epochs} epochs over "
        f"each kept subset (fewer steps for smaller subsets), batch {args.batch_size}, AdamW lr "
        f"{args.lr} with linear decay, no augmentation (teacher logits cached); the "
        f"{args.test or 10_000} Fashion-MNIST test images."
    )


def add_common(ap: argparse.ArgumentParser, out: str, seeds: list[int]) -> None:
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5, 1.0])
    ap.add_argument(
        "--teacher-fractions",
        type=float,
        nargs="*",
        default=[0.1],
        help="kept fractions where the smaller and wider teachers are tried",
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds)
    ap.add_argument("--out", default=out)
    ap.add_argument(
        "--cache",
        default=os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "prunekit", "bench"
        ),
    )
    ap.add_argument("--smoke", action="store_true", help="a tiny run to check the script end to end")
    ap.add_argument("--report-only", action="store_true")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=20_000, help="training images (a seeded subset)")
    ap.add_argument("--test", type=int, default=None, help="test images (default: all 10 000)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--widths", type=int, nargs=2, default=[16, 32], help="the student's conv widths")
    add_common(ap, "benchmarks/results/kd_data_fashion", [0, 1])
    args = ap.parse_args()
    if args.smoke:
        args.train, args.test, args.epochs, args.seeds = 1000, 500, 1, [0]
        args.fractions, args.out = [0.1, 0.5, 1.0], "/tmp/kd_data_fashion_smoke"
        for suffix in (".jsonl", ".md", ".png"):
            pathlib.Path(args.out).with_suffix(suffix).unlink(missing_ok=True)
    if args.report_only:
        report(pathlib.Path(args.out), "Fashion-MNIST CNN", setup=fashion_setup(args))
        return
    task = fashion_task(args)
    run(lambda seed: task, args, task.title)
    report(pathlib.Path(args.out), task.title, setup=fashion_setup(args))


if __name__ == "__main__":
    main()
