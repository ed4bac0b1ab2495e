"""Per-sample data-pruning scores: EL2N and GraNd (Paul, Ganguli and Dziugaite, *Deep Learning on a
Data Diet: Finding Important Examples Early in Training*, NeurIPS 2021), the predictive entropy
(DeepCore's "Uncertainty-Entropy"; Guo, Zhao and Bai, *DeepCore: A Comprehensive Library for Coreset
Selection in Deep Learning*, DEXA 2022, code PatrickZH/DeepCore), forgetting events (Toneva et al.,
*An Empirical Study of Example Forgetting during Deep Neural Network Learning*, ICLR 2019; official
code mtoneva/example_forgetting) and seeded random scores. For every score, **higher = keep**
(the hard-keeping rule of these papers; :func:`prunekit.data.select.topk` keeps the highest).

**Data.** ``data`` is either

- a *dataset of samples*: a ``torch.utils.data.Dataset``, or any object with ``.select`` and
  ``.column_names`` (a ``datasets.Dataset``); it is batched here in order (no shuffle) by
  ``batch_size`` with ``collate_fn`` (torch's ``default_collate`` when ``None``; pass e.g. a
  ``DataCollatorWithPadding`` for text); or
- any other iterable of *batches* (a ``DataLoader`` without shuffling, a list of batches).

A batch is a mapping (model inputs plus the labels under ``label_key``: ``"labels"`` or ``"label"``
when ``None``; a ``"sample_index"`` entry and non-tensor entries are dropped before the forward) or
an ``(x, y)`` pair (the model is called as ``model(x)``). The model's output may be the logits, or
hold them as ``.logits`` / ``["logits"]`` / its first element: ``(batch, classes)`` logits, one
label per sample. Sample ``i`` is the ``i``-th sample in iteration order. Models run in eval mode
under ``no_grad`` (no augmentation is applied here: pass un-augmented data), and get their
train/eval mode back afterwards, also after an exception.

**Causal language models** (a model giving ``(batch, seq, vocab)`` logits, with ``labels``
``(batch, seq)`` holding ``-100`` on prompt and padding tokens, the transformers convention): each
score is reduced over the sample's *answer tokens*, the positions ``t >= 1`` with
``labels[t] != -100``, predicted by the logits at ``t - 1`` (the shift the model's own loss does).
EL2N and the entropy are the per-token scores' mean over the answer tokens; GraNd is the norm of the
last layer's gradient of the sample's mean answer-token loss; a sample is "correct" (forgetting) when
every answer token is the argmax (teacher-forced exact match). These reductions are prunekit's
[ours]: Paul et al., Toneva et al. and DeepCore score classifiers only. The labels are then not
class ids, so no labels are returned (class balance needs ``labels=``). A sample without an answer
token raises ``ValueError``. Pad the batches with e.g. ``DataCollatorForSeq2Seq(tokenizer)``
(labels padded with -100) as ``collate_fn``. Precomputed ``logits=`` are for classifiers only.

Instead of a model and data, pass precomputed ``logits=`` (``(N, C)``, or ``(M, N, C)`` / a list for
``M`` models) and ``labels=`` (``(N,)``), e.g. from a transformers ``Trainer.predict``.

Scores average over models: pass a list of models (Paul et al. average EL2N and GraNd over 10
independent short training runs; prunekit does not train them here, it takes them).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import TrainerCallback

__all__ = [
    "ForgettingTracker",
    "el2n",
    "entropy",
    "forgetting",
    "forgetting_counts",
    "grand",
    "random_scores",
    "with_index",
]

INDEX_KEY = "sample_index"
IGNORE = -100  # the transformers label of a token that is not trained


# ------------------------------------------------------------------ data plumbing
def is_dataset(data) -> bool:
    """A dataset of samples (batched here), as opposed to an iterable of batches."""
    if isinstance(data, torch.utils.data.Dataset):
        return True
    return hasattr(data, "select") and hasattr(data, "column_names") and hasattr(data, "__getitem__")


def iter_batches(data, batch_size: int = 64, collate_fn: Callable | None = None) -> Iterable:
    """The batches of ``data`` (see the module docstring), in order."""
    if data is None:
        raise ValueError("no data: pass a dataset, an iterable of batches, or logits= and labels=")
    if is_dataset(data):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        return torch.utils.data.DataLoader(
            data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn or _default_collate
        )
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise ValueError(
            "data must be a Dataset or an iterable of batches (dicts or (x, y) pairs); got "
            f"{type(data).__name__}"
        )
    return data


def _default_collate(samples):
    """torch's ``default_collate``, with a clear error for samples of different lengths."""
    try:
        return torch.utils.data.default_collate(samples)
    except RuntimeError as e:
        if "equal size" not in str(e) and "same size" not in str(e) and "must match" not in str(e):
            raise
        raise ValueError(
            "the samples have different lengths and cannot be stacked into a batch: pass collate_fn= "
            "that pads them, e.g. transformers.DataCollatorForSeq2Seq(tokenizer) (pads labels with -100) "
            f"for token sequences ({e})"
        ) from e


def split_batch(batch, label_key: str | None = None) -> tuple[tuple, dict, torch.Tensor | None]:
    """``(args, kwargs, labels)`` of one batch: what the model is called with, and the labels."""
    if isinstance(batch, Mapping):
        keys = [label_key] if label_key else ["labels", "label"]
        key = next((k for k in keys if k in batch), None)
        labels = batch[key] if key is not None else None
        kwargs = {
            k: v for k, v in batch.items() if k != key and k != INDEX_KEY and isinstance(v, torch.Tensor)
        }
        return (), kwargs, (torch.as_tensor(labels) if labels is not None else None)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return (batch[0],), {}, torch.as_tensor(batch[1])
    raise ValueError(
        f"a batch must be a mapping (model inputs and labels) or an (x, y) pair; got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def logits_of(output) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits``/``["logits"]``, or element 0."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"cannot find logits in the model's output of type {type(output).__name__}")


def _check(logits: torch.Tensor, labels: torch.Tensor | None, first: int = 0) -> None:
    """Shapes and ranges of one batch's logits and labels; ``first``: the batch's first sample index
    (for the messages)."""
    if logits.dim() == 3:
        _check_sequences(logits, labels, first)
        return
    if logits.dim() != 2:
        raise ValueError(
            "expected (batch, classes) logits, one prediction per sample, or a causal LM's (batch, seq, "
            f"vocab) logits with (batch, seq) labels; got shape {tuple(logits.shape)}"
        )
    if labels is None:
        return
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)} "
            "(one integer label per sample)"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids; got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        bad = labels[(labels < 0) | (labels >= logits.shape[1])][0]
        raise ValueError(f"label {int(bad)} is out of range; allowed: 0..{logits.shape[1] - 1}")


def _check_sequences(logits: torch.Tensor, labels: torch.Tensor | None, first: int = 0) -> None:
    if labels is None:
        raise ValueError(
            "a causal LM's samples are scored over their answer tokens: the batches need labels (batch, seq) "
            "with -100 on the prompt and padding (under 'labels', or label_key=)"
        )
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match the (batch, seq, vocab) logits of shape "
            f"{tuple(logits.shape)}: give one label per token (-100 where not trained)"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be integer token ids (-100 where not trained); got dtype {labels.dtype}"
        )
    v = logits.shape[-1]
    bad = (labels != IGNORE) & ((labels < 0) | (labels >= v))
    if bool(bad.any()):
        raise ValueError(
            f"label {int(labels[bad][0])} is out of range; allowed: 0..{v - 1}, or -100 (not trained)"
        )
    n = (labels[:, 1:] != IGNORE).sum(1)
    if bool((n == 0).any()):
        rows = (torch.nonzero(n == 0).flatten() + first).tolist()
        raise ValueError(
            f"samples {rows[:10]} have no answer token (labels != -100 after the first position): every "
            "sample needs at least one trained token to be scored; drop them or fix their labels"
        )


def answer_tokens(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The answer tokens of a causal LM batch: ``(z, y, row, n, pos)`` with ``z`` ``(N, V)`` the logits
    predicting them (position ``t - 1``), ``y`` ``(N,)`` their ids, ``row`` ``(N,)`` their sample,
    ``n`` ``(B,)`` the answer tokens per sample, ``pos`` ``(B, T-1)`` bool (``labels[:, 1:] != -100``)."""
    pos = labels[:, 1:] != IGNORE
    return logits[:, :-1][pos], labels[:, 1:][pos], torch.nonzero(pos)[:, 0], pos.sum(1), pos


def _mean_by_row(v: torch.Tensor, row: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The mean of the per-token values ``v`` ``(N,)`` of each sample (``row``, ``n`` per sample)."""
    total = torch.zeros(n.numel(), dtype=v.dtype, device=v.device).index_add_(0, row, v)
    return total / n.clamp_min(1).to(v.dtype)


def _sequence_mean(fn: Callable, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``fn`` (a per-row score of ``(N, V)`` logits and ``(N,)`` labels) averaged over each sample's
    answer tokens: ``(B,)``."""
    _check_sequences(logits, labels)
    z, y, row, n, _ = answer_tokens(logits, labels.to(logits.device))
    return _mean_by_row(fn(z, y), row, n)


def correct_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the argmax is the label (``(B, C)`` logits); for a causal LM's ``(B, T, V)``
    logits, every answer token is the argmax (teacher-forced exact match) [ours]."""
    labels = labels.to(logits.device)
    _check(logits, labels)
    if logits.dim() == 2:
        return logits.argmax(-1) == labels
    pos = labels[:, 1:] != IGNORE
    hit = logits[:, :-1].argmax(-1) == labels[:, 1:]
    return (hit | ~pos).all(1)


@contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` for the block; every submodule's ``training`` flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


def _models(model) -> list[nn.Module]:
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise ValueError(f"model must be an nn.Module or a non-empty list of them; got {model!r:.80}")
    return models


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def score_pass(
    model: nn.Module,
    data,
    fn: Callable[..., torch.Tensor],
    *,
    batch_size: int = 64,
    collate_fn: Callable | None = None,
    label_key: str | None = None,
    need_labels: bool = True,
    capture: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One no-grad eval pass of ``model`` over ``data``: ``fn(logits, labels[, emb])`` per batch,
    concatenated to ``(N,)`` float32 on the CPU, and the labels ``(N,)`` (``None`` if the batches
    have none, or for a causal LM's token labels). ``capture``: a Linear whose input (``emb``) is
    passed to ``fn``."""
    device = _device(model)
    out, ys, seen, first = [], [], {}, 0

    def grab(module, args, output):
        seen["emb"], seen["out"] = args[0], output

    handle = capture.register_forward_hook(grab) if capture is not None else None
    try:
        with eval_mode(model), torch.no_grad():
            for batch in iter_batches(data, batch_size, collate_fn):
                args, kwargs, labels = split_batch(batch, label_key)
                if labels is None and need_labels:
                    raise ValueError(
                        "a batch has no labels: give them under 'labels' or 'label' (or name the key with "
                        "label_key=), or as the y of (x, y) batches"
                    )
                seen.clear()
                args = [_to(a, device) for a in args]
                logits = logits_of(model(*args, **{k: _to(v, device) for k, v in kwargs.items()}))
                labels = labels.to(logits.device) if labels is not None else None
                _check(logits, labels, first)
                if capture is not None:
                    emb = _captured(seen, logits, capture)
                    out.append(fn(logits, labels, emb).float().cpu())
                else:
                    out.append(fn(logits, labels).float().cpu())
                first += out[-1].numel()
                if labels is not None and logits.dim() == 2:  # a LM's token labels are not class ids
                    ys.append(labels.cpu())
    finally:
        if handle is not None:
            handle.remove()
    if not out:
        raise ValueError("empty dataset: the data gave no batch")
    return torch.cat(out), (torch.cat(ys).long() if ys else None)


def _captured(seen: dict, logits: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if "emb" not in seen:
        raise ValueError(
            f"the last layer {layer} did not run in the forward pass; name another with last_layer="
        )
    emb, out = seen["emb"], seen["out"]
    if emb.shape[:-1] != logits.shape[:-1] or out.shape != logits.shape or not torch.equal(out, logits):
        raise ValueError(
            f"the output of the last layer {layer} (shape {tuple(out.shape)}) is not the model's logits "
            f"(shape {tuple(logits.shape)}); GraNd's last-layer gradient needs the Linear that produces the "
            "logits from (batch, [seq,] features) inputs: name it with last_layer="
        )
    return emb


def last_linear(model: nn.Module, name: str | None = None) -> nn.Module:
    """The Linear producing the logits: ``name`` (a submodule name), else the last ``nn.Linear``
    registered in ``model`` (a classifier head is registered last in HF models and in
    :mod:`prunekit.models.convnets`); the pass then checks its output is the logits."""
    if name is not None:
        modules = dict(model.named_modules())
        if name not in modules:
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(f"no submodule {name!r} in the model; its last Linear layers: {linears[-5:]}")
        return modules[name]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear: name the layer producing the logits with last_layer=")
    return linears[-1]


def _given(logits, labels, *, need_labels: bool = True) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Precomputed ``logits`` as a list of ``(N, C)`` tensors (one per model), and the labels."""
    if isinstance(logits, torch.Tensor):
        stack = [logits] if logits.dim() == 2 else list(logits) if logits.dim() == 3 else None
        if stack is None:
            raise ValueError(
                f"logits must be (N, classes) or (models, N, classes); got shape {tuple(logits.shape)}"
            )
    else:
        stack = [torch.as_tensor(x) for x in logits]
    if not stack:
        raise ValueError("logits= is empty: give at least one model's (N, classes) logits")
    if labels is None and need_labels:
        raise ValueError("logits= needs labels= (one integer class id per sample)")
    labels = torch.as_tensor(labels).long() if labels is not None else None
    n = stack[0].shape[0]
    for x in stack:
        if x.dim() != 2 or x.shape[0] != n:
            raise ValueError(
                f"every model's logits must be (N, classes) with the same N={n}; got shape {tuple(x.shape)}"
            )
        _check(x, labels)
    if n == 0:
        raise ValueError("empty dataset: logits= holds no sample")
    return stack, labels


# ------------------------------------------------------------------ scores
def el2n_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``‖softmax(z) − onehot(y)‖₂`` per row of ``logits`` ``(B, C)``: ``(B,)``. For a causal LM's
    ``(B, T, V)`` logits and ``(B, T)`` labels, the mean over each sample's answer tokens [ours]."""
    if logits.dim() == 3:
        return _sequence_mean(el2n_from_logits, logits, labels)
    err = torch.softmax(logits.float(), dim=-1)  # (B, C)
    err[torch.arange(err.shape[0], device=err.device), labels] -= 1.0
    return err.norm(dim=-1)


def grand_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, emb: torch.Tensor, on_probabilities: bool = False
) -> torch.Tensor:
    """The norm of the last layer's per-sample gradient ``[g, vec(g ⊗ emb)]`` (bias then weight),
    ``g = ∂ℓ/∂z`` for ``ℓ = CE(z, y)``: ``g = softmax(z) − onehot(y)``. It equals
    ``‖g‖·sqrt(1 + ‖emb‖²)``. ``on_probabilities``: DeepCore's loss, CE applied to ``p = softmax(z)``
    as if it were logits: ``g = J_softmax(z)ᵀ (softmax(p) − onehot(y))``."""
    if logits.dim() == 3:
        return _grand_sequences(logits, labels, emb, on_probabilities)
    g = _loss_grad(logits, labels, on_probabilities)
    return g.norm(dim=-1) * torch.sqrt(1.0 + emb.float().pow(2).sum(-1))


def _loss_grad(logits: torch.Tensor, labels: torch.Tensor, on_probabilities: bool) -> torch.Tensor:
    """``∂CE/∂z`` per row of ``(B, C)`` logits (see :func:`grand_from_logits`): ``(B, C)`` fp32."""
    p = torch.softmax(logits.float(), dim=-1)  # (B, C)
    rows = torch.arange(p.shape[0], device=p.device)
    if on_probabilities:
        v = torch.softmax(p, dim=-1)
        v[rows, labels] -= 1.0
        g = p * v - p * (p * v).sum(-1, keepdim=True)  # Jᵀv with J = diag(p) − p pᵀ (symmetric)
    else:
        g = p
        g[rows, labels] -= 1.0
    return g


def _grand_sequences(
    logits: torch.Tensor, labels: torch.Tensor, emb: torch.Tensor, on_probabilities: bool
) -> torch.Tensor:
    """GraNd of a causal LM's samples: the norm of the gradient of each sample's mean answer-token
    loss ``(1/n) Σ_t CE(z_t, y_t)`` with respect to the last Linear's bias and weight, ``(B,)``:
    ``(1/n)·sqrt(Σ_{s,t} (g_s·g_t)(1 + e_s·e_t))`` over the sample's answer tokens ``s, t``, from the
    Gram matrices of the per-token ``g`` and inputs ``e`` (padded per sample; no per-sample loop)."""
    _check_sequences(logits, labels)
    labels = labels.to(logits.device)
    z, y, row, n, pos = answer_tokens(logits, labels)
    g = _loss_grad(z, y, on_probabilities)  # (N, V)
    e = emb[:, :-1][pos].float()  # (N, D): the inputs of the positions whose logits predict the tokens
    slot = torch.arange(row.numel(), device=row.device) - (torch.cumsum(n, 0) - n)[row]
    B, L = n.numel(), int(n.max())
    G = g.new_zeros(B, L, g.shape[-1]).index_put_((row, slot), g)
    E = e.new_zeros(B, L, e.shape[-1]).index_put_((row, slot), e)
    K = G @ G.transpose(1, 2)  # (B, L, L): g_s·g_t (zero on padding)
    sq = (K * (1.0 + E @ E.transpose(1, 2))).sum((1, 2))
    return sq.clamp_min(0).sqrt() / n.to(sq.dtype)


def entropy_from_logits(logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``H(softmax(z)) = −Σ p log p`` in nats per row (``0 log 0 = 0``). For a causal LM's
    ``(B, T, V)`` logits, the mean over each sample's answer tokens (``labels`` mark them), Q-Tuning's
    sample entropy."""
    if logits.dim() == 3:
        return _sequence_mean(entropy_from_logits, logits, labels)
    p = torch.softmax(logits.float(), dim=-1)
    return -torch.special.xlogy(p, p).sum(-1)


def _score(fn, model, data, logits, labels, *, need_labels=True, batch_size=64, collate_fn=None,
           label_key=None, embeddings=None, last_layer=None):  # fmt: skip
    """``fn``'s scores averaged over the models (or the given logits), and the labels."""
    if logits is not None:
        return _mean_over_models_given(fn, logits, labels, embeddings, need_labels)
    if model is None:
        raise ValueError("pass a model (or a list of models) and data, or precomputed logits= and labels=")
    runs, ys = [], None
    for m in _models(model):
        capture = last_linear(m, last_layer) if embeddings == "capture" else None
        s, y = score_pass(m, data, fn, batch_size=batch_size, collate_fn=collate_fn, label_key=label_key,
                          need_labels=need_labels, capture=capture)  # fmt: skip
        if ys is not None and y is not None and not torch.equal(y, ys):
            raise ValueError("the models saw different labels: the data must be the same, in the same order")
        runs.append(s)
        ys = y
    return torch.stack(runs).mean(0), ys


def _on(labels: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if labels is None else labels.to(like.device)


def _mean_over_models_given(fn, logits, labels, embeddings, need_labels):
    stack, labels = _given(logits, labels, need_labels=need_labels)
    if embeddings is None or isinstance(embeddings, str):
        if fn is grand_from_logits or getattr(fn, "needs_emb", False):
            raise ValueError("GraNd from logits= needs embeddings=: the last Linear's inputs, (N, features)")
        return torch.stack([fn(x.float(), _on(labels, x)).cpu() for x in stack]).mean(0), labels
    single = isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2
    embs = [torch.as_tensor(e) for e in ([embeddings] if single else embeddings)]
    bad = [e.shape for e, s in zip(embs, stack, strict=False) if e.dim() != 2 or e.shape[0] != s.shape[0]]
    if len(embs) != len(stack) or bad:
        raise ValueError(
            f"embeddings= must match logits=: {len(stack)} model(s) of N={stack[0].shape[0]} samples, "
            f"(N, features) each; got {len(embs)} of shape {tuple(embs[0].shape)}"
        )
    pairs = zip(stack, embs, strict=True)
    per = [fn(x.float(), _on(labels, x), e.float().to(x.device)).cpu() for x, e in pairs]
    return torch.stack(per).mean(0), labels


def el2n(
    model: nn.Module | Sequence[nn.Module] | None = None,
    data=None,
    *,
    logits=None,
    labels=None,
    batch_size: int = 64,
    collate_fn: Callable | None = None,
    label_key: str | None = None,
) -> torch.Tensor:
    """EL2N (Paul et al. 2021): ``E_models ‖softmax(f(x)) − onehot(y)‖₂`` per sample, ``(N,)``.

    ``model``: one model or a list (the paper averages 10 independent runs, each trained for a few
    epochs: CIFAR, epoch 20 of 200); the mean is over them. Or ``logits=`` (``(N, C)``, ``(M, N, C)``
    or a list) with ``labels=``. Data, batches and modes: see the module docstring. Higher = harder
    = kept by the paper's rule."""
    return _score(el2n_from_logits, model, data, logits, labels, batch_size=batch_size,
                  collate_fn=collate_fn, label_key=label_key)[0]  # fmt: skip


def grand(
    model: nn.Module | Sequence[nn.Module] | None = None,
    data=None,
    *,
    logits=None,
    labels=None,
    embeddings=None,
    last_layer: str | None = None,
    on_probabilities: bool = False,
    batch_size: int = 64,
    collate_fn: Callable | None = None,
    label_key: str | None = None,
) -> torch.Tensor:
    """GraNd (Paul et al. 2021), DeepCore's last-layer approximation: ``E_models ‖[g, vec(g ⊗ e)]‖₂``
    per sample, ``(N,)``, the norm of the gradient of the loss with respect to the last Linear's
    bias and weight; ``g = ∂ℓ/∂z`` in closed form and ``e`` the Linear's input, captured by a forward
    hook on ``last_layer`` (a submodule name; default the last ``nn.Linear`` registered, checked to
    produce the logits). Computed as ``‖g‖·sqrt(1 + ‖e‖²)`` (no autograd, no per-sample loop).

    The paper's GraNd is the norm of the gradient with respect to *all* weights, at initialisation or
    early in training, averaged over 10 runs; DeepCore (the reference implementation) keeps only the
    last layer's, and so does this. Departures from DeepCore's ``grand.py``: the loss is the usual
    cross-entropy on the logits (DeepCore applies its ``CrossEntropyLoss`` to softmax *outputs*, a
    double softmax; ``on_probabilities=True`` reproduces that); and DeepCore's bias term is kept even
    when the Linear has no bias, as DeepCore does. Or pass ``logits=``, ``labels=`` and
    ``embeddings=`` (the Linear's inputs, ``(N, D)`` or one per model)."""

    def fn(z, y, e):
        return grand_from_logits(z, y, e, on_probabilities)

    fn.needs_emb = True
    return _score(fn, model, data, logits, labels, batch_size=batch_size, collate_fn=collate_fn,
                  label_key=label_key, embeddings="capture" if embeddings is None else embeddings,
                  last_layer=last_layer)[0]  # fmt: skip


def entropy(
    model: nn.Module | Sequence[nn.Module] | None = None,
    data=None,
    *,
    logits=None,
    batch_size: int = 64,
    collate_fn: Callable | None = None,
    label_key: str | None = None,
) -> torch.Tensor:
    """The entropy of the predictive distribution, ``−Σ_c p_c log p_c`` (nats), per sample, ``(N,)``,
    mean over models: DeepCore's ``uncertainty.py`` with ``selection_method="Entropy"``. Higher =
    more uncertain = kept. Departures from DeepCore: DeepCore scores ``Σ p log(p + 1e-6)`` (the
    *negative* entropy, with an epsilon) and keeps its highest values, i.e. the most *confident*
    samples, the opposite of its LeastConfidence and Margin rules; here the exact entropy
    (``0 log 0 = 0``) is kept highest-first, as uncertainty sampling intends. Labels are not needed."""
    return _score(entropy_from_logits, model, data, logits, None, need_labels=False, batch_size=batch_size,
                  collate_fn=collate_fn, label_key=label_key)[0]  # fmt: skip


def random_scores(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` scores uniform in [0, 1) from a generator seeded with ``seed`` (the same scores for the
    same seed, on any machine): the random baseline as a score (used for class-balanced random)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0 (the number of samples); got {n!r}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(n, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------ forgetting
def forgetting_counts(correct) -> torch.Tensor:
    """Forgetting events (Toneva et al. 2019) from a ``(T, N)`` matrix of correctness (``T``
    successive presentations, e.g. epochs, of ``N`` samples): the number of ``t`` with
    ``correct[t-1, i]`` and not ``correct[t, i]``, as float; a sample never correct (never learned)
    gets ``+inf``, as in the paper. The first presentation cannot be a forgetting event."""
    c = torch.as_tensor(correct)
    if c.dim() != 2:
        raise ValueError(f"correct must be a (presentations, samples) matrix; got shape {tuple(c.shape)}")
    if c.dtype != torch.bool:
        if not bool(((c == 0) | (c == 1)).all()):
            raise ValueError("correct must hold booleans (or 0/1)")
        c = c.bool()
    events = (c[:-1] & ~c[1:]).sum(0).double()  # (N,)
    events[~c.any(0)] = math.inf
    return events


class ForgettingTracker(TrainerCallback):
    """Forgetting events of ``n`` samples over training (Toneva et al. 2019), counted from the
    prediction at each presentation of a sample: a *forgetting event* is a presentation classified
    wrongly right after one classified correctly; :meth:`counts` gives ``+inf`` to samples never
    classified correctly (never learned; also those never presented, see :attr:`seen`).

    **Plain loop.** ``tracker.update(indices, logits, labels)`` after each forward (or
    ``update(indices, correct=...)``); ``indices`` are the samples' positions in the dataset.

    **transformers ``Trainer``.** Pass it in ``callbacks=[tracker]``. The sample indices travel in
    the batch: add a ``"sample_index"`` column with :func:`with_index` and set
    ``TrainingArguments(remove_unused_columns=False)`` (the ``Trainer`` would drop the column, which
    the model's ``forward`` does not take; :meth:`on_train_begin` refuses to start otherwise). On
    ``on_train_begin`` a forward pre-hook on the model takes ``sample_index`` out of the inputs
    (the model never sees it) and a forward hook reads the logits and ``labels`` of every forward
    in training mode (the training step's own forward: no extra compute); forwards in eval mode
    (evaluation) are not counted. The hooks go on ``on_train_end`` (or :meth:`remove_hooks`, e.g.
    after an exception). Under multi-process data parallelism each step's indices and correctness
    are all-gathered, so every process holds the counts of all samples; under ``nn.DataParallel``
    each replica's thread keeps its own batch slice.

    Departures: Toneva et al. and DeepCore (``forgetting.py``) count from the training forward, as
    the callback does (train mode, augmented inputs); the data-pruning spec prefers eval-mode,
    un-augmented predictions once per epoch: for that, call :meth:`update` with eval logits after
    each epoch, or use :func:`forgetting_counts` / :func:`forgetting` on per-epoch checkpoints.
    DeepCore gives never-learned samples no special count (and its in-place update as read,
    ``events[batch_inds][mask] += 1``, increments a copy); the +inf is Toneva et al.'s. A sample
    repeated inside one batch (e.g. a distributed sampler's padding) counts as successive
    presentations, in batch order. ``correct_fn(logits, labels) -> (B,) bool`` replaces the argmax
    rule; for a causal LM (``(B, T, V)`` logits) the default rule is that every answer token is the
    argmax, teacher-forced [ours]."""

    def __init__(
        self,
        n: int,
        *,
        index_key: str = INDEX_KEY,
        label_key: str = "labels",
        correct_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1 (the number of training samples); got {n!r}")
        self.n, self.index_key, self.label_key, self.correct_fn = n, index_key, label_key, correct_fn
        self.last = torch.zeros(n, dtype=torch.bool)  # correct at the latest presentation
        self.learned = torch.zeros(n, dtype=torch.bool)  # ever correct
        self.events = torch.zeros(n, dtype=torch.long)
        self.seen = torch.zeros(n, dtype=torch.long)  # presentations
        self._handles: list = []
        self._local = threading.local()  # the index taken by the pre-hook, per thread (nn.DataParallel)
        self._lock = threading.Lock()

    # -------------------------------------------------------------- counting
    def update(self, indices, logits=None, labels=None, *, correct=None) -> None:
        """Record one presentation of the samples ``indices`` (``(B,)``): their correctness
        ``correct`` (``(B,)`` bool), or ``argmax(logits) == labels`` (``correct_fn`` if given)."""
        idx = torch.as_tensor(indices).detach().reshape(-1).long().cpu()
        if correct is None:
            if logits is None or labels is None:
                raise ValueError("update needs logits and labels, or correct=")
            logits, labels = logits.detach(), torch.as_tensor(labels).detach().to(logits.device)
            if self.correct_fn is not None:
                correct = self.correct_fn(logits, labels)
            else:
                correct = correct_from_logits(logits, labels)
        correct = torch.as_tensor(correct).detach().reshape(-1).bool().cpu()
        if correct.shape != idx.shape:
            raise ValueError(f"{idx.numel()} indices but {correct.numel()} predictions: one per sample")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            bad = idx[(idx < 0) | (idx >= self.n)][0]
            raise ValueError(f"sample index {int(bad)} is out of range; allowed: 0..{self.n - 1}")
        with self._lock:
            if idx.unique().numel() == idx.numel():
                self._record(idx, correct)
            else:  # repeated samples (rare): successive presentations, in batch order
                for i in range(idx.numel()):
                    self._record(idx[i : i + 1], correct[i : i + 1])

    def _record(self, idx: torch.Tensor, correct: torch.Tensor) -> None:
        self.events[idx] += (self.last[idx] & ~correct).long()
        self.last[idx] = correct
        self.learned[idx] |= correct
        self.seen[idx] += 1

    def counts(self) -> torch.Tensor:
        """Forgetting events per sample, ``(n,)`` float; ``+inf`` for samples never learned."""
        out = self.events.double()
        out[~self.learned] = math.inf
        return out

    # -------------------------------------------------------------- transformers Trainer
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "remove_unused_columns", False):
            raise ValueError(
                f"ForgettingTracker reads each sample's index from the batch column {self.index_key!r}, "
                "which the Trainer drops with remove_unused_columns=True: set "
                "TrainingArguments(remove_unused_columns=False) and add the column with "
                "prunekit.data.with_index(dataset)"
            )
        if model is None:
            raise ValueError("ForgettingTracker.on_train_begin got no model to hook")
        self.attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.remove_hooks()

    def attach(self, model: nn.Module) -> ForgettingTracker:
        """Hook ``model`` (what :meth:`on_train_begin` does); returns ``self``."""
        self.remove_hooks()
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post, with_kwargs=True),
        ]
        return self

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._local.pending = None

    def _pre(self, module, args, kwargs):
        idx = kwargs.pop(self.index_key, None)
        if module.training:
            if idx is None:
                raise ValueError(
                    f"a training batch has no {self.index_key!r}: add it with "
                    "prunekit.data.with_index(dataset) and set TrainingArguments(remove_unused_columns=False)"
                )
            self._local.pending = idx
        return args, kwargs

    def _post(self, module, args, kwargs, output):
        idx, self._local.pending = getattr(self._local, "pending", None), None
        if idx is None or not module.training:
            return None
        if self.label_key not in kwargs:
            raise ValueError(
                f"a training batch has no labels under {self.label_key!r} (label_key=); note that a Trainer "
                "with label_smoothing_factor > 0 takes the labels out of the inputs before the forward"
            )
        logits, labels = logits_of(output).detach(), kwargs[self.label_key].detach()
        if self.correct_fn is not None:
            correct = self.correct_fn(logits, labels)
        else:
            correct = correct_from_logits(logits, labels)
        idx = torch.as_tensor(idx, device=correct.device).reshape(-1).long()
        idx, correct = _all_gather(idx, correct.reshape(-1).long())
        self.update(idx, correct=correct.bool())
        return None


def _all_gather(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each 1-D tensor concatenated over the processes of the default group (rank order), or as is
    when not distributed. Sizes may differ between processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return tensors
    world = dist.get_world_size()
    size = torch.tensor([tensors[0].numel()], device=tensors[0].device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    most = int(max(int(s) for s in sizes))
    out = []
    for t in tensors:
        padded = torch.zeros(most, dtype=t.dtype, device=t.device)
        padded[: t.numel()] = t
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)]))
    return tuple(out)


def forgetting(
    tracker: ForgettingTracker | None = None,
    *,
    correct=None,
    checkpoints: Sequence[nn.Module] | None = None,
    data=None,
    batch_size: int = 64,
    collate_fn: Callable | None = None,
    label_key: str | None = None,
) -> torch.Tensor:
    """Forgetting counts ``(N,)`` (``+inf`` = never learned) from one source: a
    :class:`ForgettingTracker` after training; ``correct``, a ``(T, N)`` correctness matrix; or
    ``checkpoints``, models saved after successive epochs (in order), each evaluated on ``data`` in
    eval mode (the spec's un-augmented per-epoch predictions)."""
    given = [x is not None for x in (tracker, correct, checkpoints)]
    if sum(given) != 1:
        raise ValueError(
            "forgetting needs exactly one of: a ForgettingTracker (tracker=), a (presentations, samples) "
            "correctness matrix (correct=), or per-epoch checkpoints with data (checkpoints=, data=)"
        )
    if tracker is not None:
        return tracker.counts()
    if correct is not None:
        return forgetting_counts(correct)
    rows = []
    for m in _models(checkpoints):
        right, _ = score_pass(m, data, lambda z, y: correct_from_logits(z, y).float(), batch_size=batch_size,
                              collate_fn=collate_fn, label_key=label_key)  # fmt: skip
        rows.append(right.bool())
    return forgetting_counts(torch.stack(rows))


# ------------------------------------------------------------------ indices in batches
class IndexedDataset(torch.utils.data.Dataset):
    """``dataset`` whose items (mappings) carry their position under ``key``."""

    def __init__(self, dataset, key: str = INDEX_KEY) -> None:
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise ValueError(
                f"with_index needs samples that are mappings (dicts of model inputs and labels); got "
                f"{type(item).__name__}"
            )
        return {**item, self.key: i}


def with_index(dataset, key: str = INDEX_KEY):
    """``dataset`` with each sample's position under ``key`` (for :class:`ForgettingTracker` in a
    ``Trainer``): a ``datasets.Dataset`` gets a column (``add_column``); any other map-style dataset
    of dict samples is wrapped (:class:`IndexedDataset`)."""
    if hasattr(dataset, "add_column") and hasattr(dataset, "column_names"):
        if key in dataset.column_names:
            raise ValueError(f"the dataset already has a column {key!r}")
        return dataset.add_column(key, list(range(len(dataset))))
    return IndexedDataset(dataset, key)
