"""``prunekit.prune_data``: score a training set with a registered data method and keep a subset."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..registry import instantiate
from .methods import ScoreInputs
from .select import kept_count


@dataclass
class DataPruneReport:
    """What :func:`prune_data` kept. ``indices``: the kept sample indices ``(k,)``, ascending;
    ``scores``: every sample's score ``(N,)`` (higher = kept; ``+inf`` = never learned for
    forgetting; ``None`` for plain random); ``keep``: the budget as given; ``kept``/``total``:
    ``k`` and ``N``; ``kept_per_class``: class id -> kept count, when the labels are known;
    ``options``: the method's options (its dataclass fields). :meth:`subset` is the pruned dataset."""

    method: str
    keep: int | float
    kept: int
    total: int
    seed: int
    indices: torch.Tensor
    scores: torch.Tensor | None = None
    options: dict = field(default_factory=dict)
    kept_per_class: dict | None = None
    seconds: float = 0.0
    dataset: Any = field(default=None, repr=False, compare=False)

    def subset(self, dataset=None):
        """The kept samples of ``dataset`` (default: the one pruned), in ascending index order: an
        object with ``.select`` (a ``datasets.Dataset``) -> ``dataset.select(indices)``; a tensor ->
        ``dataset[indices]``; a list or tuple -> a list; any other dataset -> ``torch.utils.data.Subset``."""
        ds = self.dataset if dataset is None else dataset
        if ds is None:
            raise ValueError("no dataset to take the subset of: pass it, report.subset(dataset)")
        if len(ds) != self.total:
            raise ValueError(f"the dataset has {len(ds)} samples; the report was made for {self.total}")
        idx = self.indices.tolist()
        if callable(getattr(ds, "select", None)) and hasattr(ds, "column_names"):
            return ds.select(idx)
        if isinstance(ds, torch.Tensor):
            return ds[self.indices]
        if isinstance(ds, (list, tuple)):
            return [ds[i] for i in idx]
        return torch.utils.data.Subset(ds, idx)

    def to_dict(self) -> dict:
        """Plain types: lists for the tensors (``inf`` stays a float), no dataset."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "dataset"}
        out["indices"] = self.indices.tolist()
        out["scores"] = None if self.scores is None else self.scores.tolist()
        return out

    def to_json(self, **kw) -> str:
        """JSON of :meth:`to_dict`; a ``+inf`` score is written ``Infinity`` (Python's ``json``)."""
        return json.dumps(self.to_dict(), **kw)


def prune_data(
    dataset,
    method: str,
    keep: int | float,
    model=None,
    seed: int = 0,
    *,
    logits=None,
    labels=None,
    embeddings=None,
    correct=None,
    tracker=None,
    batch_size: int = 64,
    collate_fn: Callable | None = None,
    label_key: str | None = None,
    **options,
) -> DataPruneReport:
    """Score ``dataset``'s samples with the data method ``method`` (a registry name of family
    ``"data"``: ``random_data``, ``el2n``, ``grand``, ``forgetting``, ``entropy``; ``prunekit methods
    --family data``) and keep ``keep`` of them: a fraction in (0, 1] (``round(keep·N)``, at least 1)
    or an int count in 1..N. Returns a :class:`DataPruneReport`; ``report.subset()`` is the pruned
    dataset (a ``torch.utils.data.Subset``, a ``datasets.Dataset`` via ``.select``, or a list).

    ``model``: the trained model scoring the samples (eval mode, no grad, its mode restored), or a
    list of models (the mean of their scores; for ``forgetting``, per-epoch checkpoints). Instead,
    ``logits=`` (``(N, C)`` or one per model) with ``labels=``; GraNd then also needs ``embeddings=``
    (the last Linear's inputs). ``forgetting`` also takes ``tracker=`` (a
    :class:`~prunekit.data.ForgettingTracker`) or ``correct=`` (a ``(presentations, N)`` matrix).
    ``dataset`` is batched in order by ``batch_size`` with ``collate_fn`` (see
    :mod:`prunekit.data.scores` for the sample and batch formats; ``label_key`` names the labels).
    A causal LM's samples (``(batch, seq, vocab)`` logits, ``labels`` ``-100`` on the prompt and
    padding) are scored over their answer tokens (see :mod:`prunekit.data.scores`); pad them with a
    ``collate_fn`` such as ``DataCollatorForSeq2Seq(tokenizer)``.
    ``seed`` fixes the random methods (the same indices for the same seed). Other keyword arguments
    are the method's options (``balance=True``: per-class selection; ``prunekit info NAME``)."""
    t0 = time.perf_counter()
    m = instantiate(method, "data", options, "prune_data")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}")
    inp = ScoreInputs(dataset, model, logits, labels, embeddings, correct, tracker, batch_size, collate_fn,
                      label_key)  # fmt: skip
    inputs = ("model", "logits", "labels", "embeddings", "correct", "tracker")
    extra = sorted({k for k in inputs if getattr(inp, k) is not None} - set(m.uses))
    if extra:
        takes = list(m.uses) or "the dataset only"
        raise ValueError(f"method {m.name!r} does not use {extra}; besides the dataset it takes: {takes}")
    n = _size(dataset, logits, labels, correct, tracker)
    kept_count(keep, n)  # a clear error for a bad budget or an empty dataset before any scoring
    indices, scores, y = m.select(inp, keep, seed)
    if scores is not None and scores.numel() != n:
        raise ValueError(f"the method gave {scores.numel()} scores for a dataset of {n} samples")
    per_class = None
    if y is not None:
        if y.numel() != n:
            raise ValueError(f"{y.numel()} labels for a dataset of {n} samples: give one label per sample")
        c, k = torch.unique(y[indices], return_counts=True)
        per_class = dict(zip(c.tolist(), k.tolist(), strict=True))
    return DataPruneReport(
        method=m.name,
        keep=keep,
        kept=int(indices.numel()),
        total=n,
        seed=seed,
        indices=indices,
        scores=None if scores is None else scores.double(),
        options={f.name: getattr(m, f.name) for f in dataclasses.fields(m)},
        kept_per_class=per_class,
        seconds=time.perf_counter() - t0,
        dataset=dataset,
    )


def _size(dataset, logits, labels, correct, tracker) -> int:
    """``N``: the dataset's length; without a dataset, that of the given logits, labels or counts."""
    if dataset is not None:
        try:
            return len(dataset)
        except TypeError as e:
            raise ValueError(
                f"the dataset must be sized (have a len); got {type(dataset).__name__}: pass a map-style "
                "dataset or a list"
            ) from e
    for x, dim in ((logits, -2), (labels, 0), (correct, 1)):
        if x is not None:
            t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x[0] if dim == -2 else x)
            return int(t.shape[dim]) if t.dim() > 0 else 0
    if tracker is not None:
        return tracker.n
    raise ValueError("no dataset: pass the dataset (or logits=/labels= for precomputed scores)")
