"""Static data-pruning methods of the registry (family ``"data"``), called through
:func:`prunekit.prune_data`: each scores every training sample once and keeps the top ``keep``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..registry import register
from . import scores as S
from .select import class_balanced, random_subset, topk

_STAGES = ("before-training",)


@dataclass
class ScoreInputs:
    """What :func:`prunekit.prune_data` hands a method: the dataset and whatever the user gave."""

    dataset: Any
    model: Any = None
    logits: Any = None
    labels: Any = None
    embeddings: Any = None
    correct: Any = None
    tracker: Any = None
    batch_size: int = 64
    collate_fn: Callable | None = None
    label_key: str | None = None

    def data(self):
        """The dataset as :func:`~prunekit.data.scores.score_pass` takes it: a list (or other sized
        sequence of samples) is batched in order like a Dataset."""
        if self.dataset is None or S.is_dataset(self.dataset):
            return self.dataset
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate_fn
        )

    def loader(self) -> dict:
        return {"batch_size": self.batch_size, "collate_fn": self.collate_fn, "label_key": self.label_key}


class DataMethod:
    """Base of the static data methods: ``scores`` gives ``(scores (N,), labels (N,) or None)``;
    ``select`` keeps the best ``keep`` (class-balanced when ``balance``)."""

    name: ClassVar[str]
    balance: bool
    descending: ClassVar[bool] = True  # higher score = keep
    uses: ClassVar[tuple[str, ...]] = ()  # the ScoreInputs fields besides the dataset it may read
    taxonomy: ClassVar[dict]

    def scores(self, inp: ScoreInputs, seed: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        raise NotImplementedError

    def select(self, inp: ScoreInputs, keep, seed: int):
        """``(indices, scores, labels)``: the kept indices (ascending), the scores and the labels."""
        s, y = self.scores(inp, seed)
        if self.balance:
            y = y if y is not None else dataset_labels(inp)
            return class_balanced(s, y, keep, descending=self.descending), s, y
        return topk(s, keep, descending=self.descending), s, y


def dataset_labels(inp: ScoreInputs) -> torch.Tensor:
    """The labels ``(N,)`` of the samples, for class balance: ``labels=``, a ``targets`` attribute,
    a ``datasets`` column (``label_key``, ``"labels"`` or ``"label"``), or read from each sample."""
    if inp.labels is not None:
        return torch.as_tensor(inp.labels).long().reshape(-1)
    ds = inp.dataset
    if ds is None:
        raise ValueError("balance=True needs the labels: pass labels= (one class id per sample)")
    if getattr(ds, "targets", None) is not None:
        return torch.as_tensor(ds.targets).long().reshape(-1)
    keys = [inp.label_key] if inp.label_key else ["labels", "label"]
    columns = getattr(ds, "column_names", None)
    if columns is not None:
        key = next((k for k in keys if k in columns), None)
        if key is None:
            raise ValueError(f"balance=True needs labels; the dataset has no column {keys} (label_key=)")
        col = ds[key]  # a tensor, a list, or a datasets Column
        col = col if isinstance(col, torch.Tensor) else torch.tensor([int(v) for v in col])
        return col.long().reshape(-1)
    out = []
    for i in range(len(ds)):  # reading labels only; no model runs here
        item = ds[i]
        if isinstance(item, Mapping):
            key = next((k for k in keys if k in item), None)
            if key is None:
                raise ValueError(f"balance=True needs labels; sample {i} has no {keys} (label_key=)")
            out.append(int(item[key]))
        else:
            out.append(int(item[1]))
    return torch.tensor(out, dtype=torch.long)


def _no_model(what: str) -> ValueError:
    return ValueError(
        f"{what} needs a trained model: prune_data(dataset, ..., model=model), a list of models (their "
        "mean), or precomputed logits= and labels="
    )


@register(
    "random_data",
    family="data",
    paper="Distilling the Knowledge in Data Pruning",
    stages=_STAGES,
    signals=(),
    summary="a uniform random subset under a seed: the baseline that matches the scores once KD is on",
)
@dataclass
class RandomData(DataMethod):
    """Random pruning: ``round(keep·N)`` samples uniformly without replacement, by a generator seeded
    with ``seed`` (the same subset for the same seed). Ben-Baruch et al. find that with knowledge
    distillation from a teacher trained on the full data, random pruning matches or beats the
    sophisticated scores (see ``kd_data``). ``balance=True`` draws the same fraction from each class
    (random scores, then the per-class top-k); the scores are ``None`` otherwise. A ``model`` is
    accepted and ignored, so that one ``prune_data`` call serves every data method."""

    balance: bool = False  # per-class selection (DeepCore's balance=True), default off
    taxonomy: ClassVar[dict] = {"how": "none: random (baseline)"}
    uses: ClassVar[tuple[str, ...]] = ("model", "labels")  # a model is ignored: one call fits every method

    def select(self, inp: ScoreInputs, keep, seed: int):
        n = _length(inp)
        if self.balance:
            s, y = S.random_scores(n, seed), dataset_labels(inp)
            return class_balanced(s, y, keep), s, y
        return random_subset(n, keep, seed), None, _labels_given(inp)


@register(
    "el2n",
    family="data",
    paper="Deep Learning on a Data Diet: Finding Important Examples Early in Training",
    stages=_STAGES,
    signals=("logits", "labels"),
    summary="keeps the samples with the largest error ‖softmax(f(x)) − onehot(y)‖₂, mean over models",
)
@dataclass
class EL2N(DataMethod):
    """EL2N (Paul, Ganguli and Dziugaite, NeurIPS 2021): the L2 norm of the error vector
    ``softmax(f(x)) − onehot(y)``, averaged over models, the highest kept (:func:`prunekit.data.el2n`).

    The paper scores with networks trained for a few epochs (CIFAR-10: epoch 20 of 200) and averages
    10 independent runs; prunekit does not train them: pass the model (or a list of models, their mean)
    or precomputed ``logits=`` with ``labels=``. Models run in eval mode on the data as given (no
    augmentation), the spec's rule. ``balance=True`` is DeepCore's per-class selection [its
    reference implementation; off by default, as there]."""

    balance: bool = False  # per-class selection (DeepCore's balance=True), default off
    uses: ClassVar[tuple[str, ...]] = ("model", "logits", "labels")
    taxonomy: ClassVar[dict] = {"how": "prediction error (the L2 norm of softmax − onehot)"}

    def scores(self, inp, seed):
        if inp.model is None and inp.logits is None:
            raise _no_model("el2n")
        return S._score(S.el2n_from_logits, inp.model, inp.data(), inp.logits, inp.labels, **inp.loader())


@register(
    "grand",
    family="data",
    paper="Deep Learning on a Data Diet: Finding Important Examples Early in Training",
    stages=_STAGES,
    signals=("logits", "labels", "last_linear_input"),
    summary="keeps the samples with the largest last-layer gradient norm (DeepCore's GraNd approximation)",
)
@dataclass
class GraNd(DataMethod):
    """GraNd (Paul et al. 2021) in DeepCore's last-layer form: the norm of the per-sample gradient of
    the loss with respect to the last Linear's bias and weight, ``‖[g, vec(g ⊗ e)]‖₂ =
    ‖g‖·sqrt(1 + ‖e‖²)`` with ``g = softmax(z) − onehot(y)`` and ``e`` the Linear's input (captured by
    a forward hook on ``last_layer``, default the model's last ``nn.Linear``), averaged over models,
    the highest kept (:func:`prunekit.data.grand`).

    Departures: the paper's GraNd uses the gradient of all weights, at initialisation or early in
    training, averaged over 10 runs; DeepCore's official code (and this) only the last layer's.
    DeepCore's ``grand.py`` applies its cross-entropy to the softmax outputs (a double softmax);
    here the loss is the usual cross-entropy on the logits, and ``on_probabilities=True`` reproduces
    DeepCore's. Models are not trained here: pass them (or ``logits=``, ``labels=`` and
    ``embeddings=``)."""

    balance: bool = False  # per-class selection (DeepCore's balance=True), default off
    last_layer: str | None = None  # the Linear giving the logits (a submodule name); None: the last Linear
    on_probabilities: bool = False  # DeepCore's loss: cross-entropy applied to softmax outputs
    uses: ClassVar[tuple[str, ...]] = ("model", "logits", "labels", "embeddings")
    taxonomy: ClassVar[dict] = {"how": "gradient (the norm of the last layer's per-sample gradient)"}

    def scores(self, inp, seed):
        if inp.model is None and inp.logits is None:
            raise _no_model("grand")

        def fn(z, y, e):
            return S.grand_from_logits(z, y, e, self.on_probabilities)

        fn.needs_emb = True
        emb = "capture" if inp.embeddings is None else inp.embeddings
        return S._score(fn, inp.model, inp.data(), inp.logits, inp.labels, embeddings=emb,
                        last_layer=self.last_layer, **inp.loader())  # fmt: skip


@register(
    "forgetting",
    family="data",
    paper="An Empirical Study of Example Forgetting during Deep Neural Network Learning",
    stages=_STAGES,
    signals=("train_predictions",),
    summary="keeps the most often forgotten samples (correct → wrong over training; never learned first)",
)
@dataclass
class Forgetting(DataMethod):
    """Forgetting events (Toneva et al., ICLR 2019): how often a sample goes from classified correctly
    to wrongly between successive presentations in training; never-learned samples count +inf; the
    highest kept. The counts come from one of: ``tracker=`` (a :class:`~prunekit.data.ForgettingTracker`
    that watched the training, in a plain loop or as a ``Trainer`` callback), ``correct=`` (a
    ``(presentations, N)`` correctness matrix), or ``model=`` a list of per-epoch checkpoints, each
    evaluated on the dataset in eval mode.

    Departures: Toneva et al.'s official code and DeepCore count the training forward's predictions
    (the tracker does too); checkpoints evaluated in eval mode follow the data-pruning spec's
    preference for un-augmented predictions instead. DeepCore's ``forgetting.py`` defaults to
    ``balance=True`` and has no +inf for never-learned samples; here balance is off by default (as
    for every data method) and the +inf is the paper's."""

    balance: bool = False  # per-class selection (DeepCore's balance=True; on by default there)
    uses: ClassVar[tuple[str, ...]] = ("model", "correct", "tracker", "labels")
    taxonomy: ClassVar[dict] = {"how": "training dynamics (forgetting events)"}

    def scores(self, inp, seed):
        if inp.tracker is None and inp.correct is None and inp.model is None:
            raise ValueError(
                "forgetting needs tracker= (a ForgettingTracker that watched training), correct= (a "
                "(presentations, N) correctness matrix) or model= (a list of per-epoch checkpoints)"
            )
        if inp.tracker is not None or inp.correct is not None:
            return S.forgetting(inp.tracker, correct=inp.correct), _labels_given(inp)
        if not isinstance(inp.model, (list, tuple)) or len(inp.model) < 2:
            raise ValueError(
                "forgetting counts changes over training: model= must be a list of at least 2 per-epoch "
                f"checkpoints (in order); got {type(inp.model).__name__}. Or pass tracker= or correct="
            )
        rows, labels = [], None
        for m in S._models(inp.model):
            right, labels = S.score_pass(m, inp.data(), _correct, **inp.loader())
            rows.append(right.bool())
        return S.forgetting_counts(torch.stack(rows)), labels


@register(
    "entropy",
    family="data",
    paper="DeepCore: A Comprehensive Library for Coreset Selection in Deep Learning",
    stages=_STAGES,
    signals=("logits",),
    summary="keeps the samples whose predictive distribution has the highest entropy (uncertainty)",
)
@dataclass
class Entropy(DataMethod):
    """Uncertainty sampling by entropy, DeepCore's ``Uncertainty`` with ``selection_method="Entropy"``:
    ``−Σ p log p`` of the model's softmax, mean over models, the highest kept
    (:func:`prunekit.data.entropy`). Departure from DeepCore's official code, which keeps the highest
    ``Σ p log(p + 1e-6)`` (the negative entropy: the most confident samples, the opposite of its other
    uncertainty rules): here the exact entropy is kept highest-first, as uncertainty sampling means."""

    balance: bool = False  # per-class selection (DeepCore's balance=True), default off
    uses: ClassVar[tuple[str, ...]] = ("model", "logits", "labels")
    taxonomy: ClassVar[dict] = {"how": "predictive uncertainty (entropy)"}

    def scores(self, inp, seed):
        if inp.model is None and inp.logits is None:
            raise _no_model("entropy")
        s, y = S._score(S.entropy_from_logits, inp.model, inp.data(), inp.logits, None, need_labels=False,
                        **inp.loader())  # fmt: skip
        if y is None and inp.labels is not None:
            y = torch.as_tensor(inp.labels).long()
        return s, y


def _labels_given(inp: ScoreInputs) -> torch.Tensor | None:
    return None if inp.labels is None else torch.as_tensor(inp.labels).long().reshape(-1)


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return S.correct_from_logits(logits, labels).float()


def _length(inp: ScoreInputs) -> int:
    if inp.dataset is not None:
        try:
            return len(inp.dataset)
        except TypeError as e:
            raise ValueError(
                f"the dataset has no length ({type(inp.dataset).__name__}): pass a sized dataset"
            ) from e
    if inp.labels is not None:
        return int(torch.as_tensor(inp.labels).numel())
    raise ValueError("no dataset: pass the dataset (or labels= to size it)")
