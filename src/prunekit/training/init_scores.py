"""Pruning-at-initialisation (PAI) scores and what is built from them: per-layer densities
(PreCropping, spec ``training-aware.md`` §8) and residual-block scores (Layers-Lottery, §9).

Scores, one tensor per prunable weight (the ``weight`` of every ``nn.Linear`` / ``nn.Conv1d/2d/3d``,
keyed ``"<module name>.weight"``):

- :func:`snip` ``|g ⊙ w|`` (Lee et al., "SNIP: Single-shot Network Pruning based on Connection
  Sensitivity", ICLR 2019);
- :func:`grasp` ``−w ⊙ (H g)`` by a Hessian-vector product (Wang et al., "Picking Winning Tickets
  Before Training by Preserving Gradient Flow", ICLR 2020; official alecwangcq/GraSP);
- :func:`synflow` ``|w ⊙ ∂R/∂w|`` with ``R = 1ᵀ ∏|W_l| 1`` and :func:`synflow_mask`, its iterative
  form (Tanaka et al., "Pruning neural networks without any data by iteratively conserving
  synaptic flow", NeurIPS 2020; official ganguli-lab/Synaptic-Flow).

Every score function leaves the model exactly as it found it (parameters, buffers such as BN
running statistics, ``requires_grad``, ``.grad``, train/eval mode), also after an exception.

Built on them:

- :func:`global_masks` / :func:`layer_densities`: one global threshold at a density, and the
  fraction of each layer it keeps (PreCropping v1, a reconstruction);
- :func:`precrop_densities`: the PreCrop v2 closed form ``d_l = min(1, λ/N_l)`` (derived in the
  spec, *ours*, unconfirmed against the paper);
- :func:`block_scores` / :func:`least_important`: one score per residual block and the blocks to
  remove (Layers-Lottery; the block reduction is *ours*, unconfirmed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: which end of each criterion's score is the least important (Layers-Lottery §9: GraSP removes
#: the weights with the highest −θ⊙Hg, so its least important block has the highest mean)
LEAST_IMPORTANT = {"snip": "lowest", "synflow": "lowest", "magnitude": "lowest", "grasp": "highest"}


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ``weight`` of every ``nn.Linear`` / ``nn.Conv1d/2d/3d`` in ``model``, keyed
    ``"<module name>.weight"`` (a shared module counted once); biases and norms are not scored."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module; got {type(model).__name__}")
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, PRUNABLE) and isinstance(mod.weight, nn.Parameter) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            out[f"{name}.weight" if name else "weight"] = mod.weight
    if not out:
        kinds = ", ".join(t.__name__ for t in PRUNABLE)
        raise ValueError(f"{type(model).__name__} has no layer to score: supported layers are {kinds}")
    return out


@contextmanager
def _preserved(model: nn.Module, weights: Mapping[str, nn.Parameter], snapshot_params: bool = False):
    """Restore on exit: buffers (BN running stats), ``requires_grad``, ``.grad``, each module's
    train/eval flag and, with ``snapshot_params``, every parameter's values. The weights get
    ``requires_grad=True`` inside."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    with torch.no_grad():
        bufs = [(b, b.detach().clone()) for b in model.buffers()]
        vals = [(p, p.detach().clone()) for p in params] if snapshot_params else []
    try:
        for w in weights.values():
            w.requires_grad_(True)
        yield
    finally:
        with torch.no_grad():
            for b, v in bufs:
                b.copy_(v)
            for p, v in vals:
                p.copy_(v)
        for p, f, g in zip(params, flags, grads, strict=True):
            p.requires_grad_(f)
            p.grad = g
        for m, t in modes:
            m.training = t


def _call(model: nn.Module, inputs):
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    raise ValueError(
        f"inputs must be a tensor, a tuple of positional inputs or a dict; got {type(inputs).__name__}"
    )


def _as_tensor(out) -> torch.Tensor:
    """A model's output as one tensor: itself, ``.logits`` / ``["logits"]``, or the first element."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"cannot read a tensor from the model's output ({type(out).__name__}); pass closure=")


def _loss(model, inputs, labels, loss_fn, closure, temperature: float = 1.0) -> torch.Tensor:
    if closure is not None:
        if inputs is not None or labels is not None:
            raise ValueError("give either closure= or (inputs, labels), not both")
        loss = closure(model)
    else:
        if inputs is None or labels is None:
            raise ValueError("a score needs (inputs, labels) or closure=fn(model) -> scalar loss")
        if not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable(outputs, labels); got {loss_fn!r}")
        loss = loss_fn(_as_tensor(_call(model, inputs)) / temperature, labels)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError("the loss must be a scalar tensor that depends on the model's weights")
    return loss.reshape(())


def _grads(out: torch.Tensor, ws: list[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    gs = torch.autograd.grad(out, ws, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(ws, gs, strict=True)]


def snip(
    model: nn.Module,
    inputs=None,
    labels: torch.Tensor | None = None,
    loss_fn: Callable = F.cross_entropy,
    *,
    closure: Callable[[nn.Module], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """SNIP connection sensitivity ``|∂L/∂w ⊙ w|`` (Lee et al., ICLR 2019) on one batch: the loss
    is ``loss_fn(model(inputs), labels)`` (``inputs`` a tensor, a tuple of positional inputs or a
    dict of keywords; the output's ``.logits`` or first element if it is not a tensor), or
    ``closure(model)``. Returns ``{"<module>.weight": score}`` for every Linear / Conv weight.

    The paper normalises by the sum of all scores; that does not change the ranking and is left
    out. The model runs in the mode it is in (BN in train mode uses batch statistics, as at θ₀);
    everything is restored afterwards, BN running statistics included. The library does not
    re-initialise the model before scoring (some SNIP ports do, mil-ad/snip#3).
    """
    weights = prunable_weights(model)
    ws = list(weights.values())
    with _preserved(model, weights):
        loss = _loss(model, inputs, labels, loss_fn, closure)
        gs = _grads(loss, ws)
    return {n: (g * w).detach().abs() for (n, w), g in zip(weights.items(), gs, strict=True)}


def grasp(
    model: nn.Module,
    inputs=None,
    labels: torch.Tensor | None = None,
    loss_fn: Callable = F.cross_entropy,
    *,
    closure: Callable[[nn.Module], torch.Tensor] | None = None,
    temperature: float = 200.0,
) -> dict[str, torch.Tensor]:
    """GraSP scores ``−w ⊙ (H g)`` (Wang et al., ICLR 2020), ``g = ∂L/∂w`` and ``H g`` a
    Hessian-vector product by double backward (``Hg = ∂(g_detachedᵀ ∂L/∂w)/∂w``), as the official
    code. **The highest scores are removed** (the official mask keeps ``score <= threshold``):
    use ``keep_high=False`` in :func:`global_masks` / :func:`layer_densities` and
    ``criterion="grasp"`` in :func:`least_important`.

    ``temperature``: the official code divides the logits by T = 200 before the cross-entropy;
    applied here to ``model(inputs)`` (a ``closure`` applies its own). Departures from the official
    code: one batch instead of its class-balanced sample split into two halves (``g`` and ``Hg``
    summed over the halves, which for equal halves is 4× the one-batch value: the ranking is the
    same); one forward pass feeds both ``g`` and ``Hg`` (the official code runs two, which differ
    only by dropout); the official ``reinit`` (xavier on every Linear before scoring) is not done.
    Scaled-dot-product attention runs on its math kernel here (the fused kernels have no double
    backward), so Hugging Face models loaded with ``attn_implementation="sdpa"`` work. Restores
    the model as :func:`snip` does.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0 (official: 200); got {temperature!r}")
    weights = prunable_weights(model)
    ws = list(weights.values())
    # the fused attention kernels have no double backward; the math kernel is composed of ops
    with _preserved(model, weights), sdpa_kernel(SDPBackend.MATH):
        loss = _loss(model, inputs, labels, loss_fn, closure, float(temperature))
        gf = _grads(loss, ws, create_graph=True)
        z = sum((g.detach() * g).sum() for g in gf if g.requires_grad)
        hg = (
            _grads(z, ws)
            if isinstance(z, torch.Tensor) and z.requires_grad
            else [torch.zeros_like(w) for w in ws]
        )
    return {n: (-w * h).detach() for (n, w), h in zip(weights.items(), hg, strict=True)}


@contextmanager
def _linearized(model: nn.Module, weights: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """SynFlow's set-up, undone exactly on exit (also after an exception): eval mode, every
    floating-point parameter and buffer replaced by its absolute value (the official ``linearize``
    takes ``abs`` of the whole ``state_dict``)."""
    with _preserved(model, weights, snapshot_params=True):
        model.eval()
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                if t.is_floating_point():
                    t.abs_()
        yield


def _check_shape(input_shape) -> tuple[int, ...]:
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    if (
        not isinstance(input_shape, Sequence)
        or not input_shape
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_shape)
    ):
        raise ValueError(
            f"input_shape must be one input's shape without the batch dim, e.g. (3, 28, 28): {input_shape!r}"
        )
    return tuple(input_shape)


def _synflow_scores(model: nn.Module, ws: list[torch.Tensor], shape: tuple[int, ...]) -> list[torch.Tensor]:
    ref = ws[0]
    x = torch.ones((1, *shape), dtype=ref.dtype, device=ref.device)  # (1, *input_shape)
    r = _as_tensor(model(x)).sum()
    return [(g * w).detach().abs() for g, w in zip(_grads(r, ws), ws, strict=True)]


def synflow(model: nn.Module, input_shape: Sequence[int], masks: Mapping[str, torch.Tensor] | None = None):
    """SynFlow scores ``|w ⊙ ∂R/∂w|`` (Tanaka et al., NeurIPS 2020), as the official ``SynFlow.score``:
    every parameter and buffer replaced by its absolute value, the model in eval mode, an all-ones
    input of shape ``(1, *input_shape)``, ``R = sum(model(x))``. For a chain of bias-free linear
    layers ``R = 1ᵀ|W_L|…|W_1|1`` and every layer's scores sum to ``R`` (conservation).

    ``masks`` (optional, True = kept) are applied to the weights first (pruned weights score 0), as
    in one round of :func:`synflow_mask`. The model is restored exactly afterwards (signs, BN
    mode and statistics), also after an exception. Runs in the model's dtype: a deep network can
    overflow float32 (call ``model.double()`` first, as some SynFlow ports do).
    """
    shape = _check_shape(input_shape)
    weights = prunable_weights(model)
    ws = list(weights.values())
    with _linearized(model, weights):
        if masks is not None:
            with torch.no_grad():
                for n, w in weights.items():
                    w.mul_(_mask_for(masks, n, w))
        scores = _synflow_scores(model, ws, shape)
    return dict(zip(weights, scores, strict=True))


def _mask_for(masks: Mapping[str, torch.Tensor], name: str, w: torch.Tensor) -> torch.Tensor:
    if name not in masks:
        raise ValueError(f"masks has no entry for {name!r}; it needs one per prunable weight")
    m = masks[name]
    if tuple(m.shape) != tuple(w.shape):
        raise ValueError(f"mask for {name!r} has shape {tuple(m.shape)}; the weight has {tuple(w.shape)}")
    return m.to(device=w.device, dtype=w.dtype)


def _check_density(density: float) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density (the fraction of weights kept) must be in (0, 1]; got {density!r}")
    return float(density)


def synflow_mask(
    model: nn.Module,
    density: float,
    rounds: int = 100,
    *,
    input_shape: Sequence[int],
    schedule: str = "exponential",
) -> dict[str, torch.Tensor]:
    """Iterative SynFlow (Tanaka et al., NeurIPS 2020; official ``prune_loop``): ``rounds`` rounds of
    scoring with the current mask applied, each pruning globally to density
    ``d_r = density^{(r+1)/rounds}`` (``schedule="exponential"``, the paper's) or
    ``1 − (1 − density)(r+1)/rounds`` (``"linear"``). Each round: ``k = int((1 − d_r)·N)`` and,
    if ``k >= 1``, every weight with ``score <= kthvalue(scores, k)`` is pruned (the official rule:
    ties with the threshold go too; pruned weights score 0 and stay pruned). Returns boolean masks
    (True = kept) per prunable weight; the model is restored exactly.
    """
    density = _check_density(density)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1 (official: 100); got {rounds!r}")
    if schedule not in ("exponential", "linear"):
        raise ValueError(f"schedule must be 'exponential' or 'linear'; got {schedule!r}")
    shape = _check_shape(input_shape)
    weights = prunable_weights(model)
    ws = list(weights.values())
    masks = [torch.ones_like(w, dtype=torch.bool) for w in ws]
    with _linearized(model, weights):
        with torch.no_grad():
            absw = [w.detach().clone() for w in ws]
        n_total = sum(w.numel() for w in ws)
        for r in range(rounds):
            with torch.no_grad():
                for w, a, m in zip(ws, absw, masks, strict=True):
                    w.copy_(a * m)
            scores = _synflow_scores(model, ws, shape)
            frac = (r + 1) / rounds
            d_r = density**frac if schedule == "exponential" else 1.0 - (1.0 - density) * frac
            k = int((1.0 - d_r) * n_total)
            if k < 1:
                continue
            threshold = torch.kthvalue(torch.cat([s.reshape(-1) for s in scores]), k).values
            masks = [s > threshold for s in scores]
    return dict(zip(weights, masks, strict=True))


def _flat_scores(scores: Mapping[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor], torch.Tensor]:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty mapping name -> tensor (as snip/grasp/synflow return)")
    names, ts = list(scores), [torch.as_tensor(v).detach() for v in scores.values()]
    return names, ts, torch.cat([t.reshape(-1).to(torch.float64) for t in ts])


def global_masks(
    scores: Mapping[str, torch.Tensor], density: float, keep_high: bool = True
) -> dict[str, torch.Tensor]:
    """One global threshold over all layers: exactly ``k = round(density·N)`` entries kept, the
    highest scores (``keep_high=True``: SNIP, SynFlow) or the lowest (``keep_high=False``: GraSP,
    whose highest scores are removed). Ties are broken by position (parameter order, then index:
    a stable sort), so the count is exact; the official SNIP/GraSP codes keep or drop whole tie
    groups instead (ours)."""
    density = _check_density(density)
    names, ts, flat = _flat_scores(scores)
    k = round(density * flat.numel())
    order = torch.sort(flat, descending=keep_high, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[order[:k]] = True
    parts = keep.split([t.numel() for t in ts])
    return {n: p.view_as(t) for n, p, t in zip(names, parts, ts, strict=True)}


def layer_densities(
    scores: Mapping[str, torch.Tensor], density: float, keep_high: bool = True
) -> dict[str, float]:
    """Each layer's kept fraction ``d_l = kept_l / N_l`` under one global threshold at ``density``
    (:func:`global_masks`): the layer-wise densities PreCropping v1 turns into channel widths
    (spec §8, a reconstruction: PreCropping has no official code)."""
    return {n: m.float().mean().item() for n, m in global_masks(scores, density, keep_high).items()}


def precrop_densities(param_counts, budget: float):
    """PreCrop v2 densities (spec §8, **ours**: derived there, unconfirmed against the paper): random
    masking at density ``d_l`` scales the expected SynFlow objective by ``∏ d_l``, so maximise
    ``Σ log d_l`` subject to ``Σ d_l N_l <= B`` and ``0 < d_l <= 1``. The KKT conditions give
    ``d_l = min(1, λ/N_l)``: every layer not kept whole keeps the same number λ of parameters.

    ``param_counts``: ``{name: N_l}`` (ints, or tensors whose ``numel`` is taken, e.g.
    :func:`prunable_weights`) or a sequence; ``budget``: the kept fraction ``B / Σ N_l`` in (0, 1].
    λ is solved exactly by water-filling over the sorted counts (the spec suggests bisection, which
    converges to the same λ). Returns the densities in the input's structure.
    """
    if isinstance(param_counts, Mapping):
        names, vals = list(param_counts), list(param_counts.values())
    elif isinstance(param_counts, Sequence) and not isinstance(param_counts, str):
        names, vals = None, list(param_counts)
    else:
        raise ValueError("param_counts must be a mapping name -> count or a sequence of counts")
    if not vals:
        raise ValueError("param_counts is empty")
    counts = []
    for v in vals:
        v = v.numel() if isinstance(v, torch.Tensor) else v
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"parameter counts must be ints >= 1; got {v!r}")
        counts.append(v)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget (the fraction of parameters kept) must be in (0, 1]; got {budget!r}")
    n = torch.tensor(counts, dtype=torch.float64)
    b = budget * n.sum()
    srt = n.sort().values  # ascending
    fixed = torch.cat([torch.zeros(1, dtype=torch.float64), srt.cumsum(0)[:-1]])  # Σ of the k smallest
    free = torch.arange(len(counts), 0, -1, dtype=torch.float64)  # layers left unsaturated
    lam = (b - fixed) / free  # λ if exactly the k smallest layers are kept whole
    # the first k whose λ_k fits under the next layer's count is the solution (too few layers kept
    # whole give λ_k above it; more give λ_k below λ*); k = L-1 always fits since budget <= 1
    fits = lam <= srt * (1 + 1e-12)
    lam_star = lam[int(torch.argmax(fits.to(torch.int8)))]
    d = torch.clamp(lam_star / n, max=1.0).tolist()
    return dict(zip(names, d, strict=True)) if names is not None else d


def block_scores(
    scores: Mapping[str, torch.Tensor],
    blocks: Sequence[str] | Mapping[str, Sequence[str]],
    reduce: str = "mean",
) -> dict[str, float]:
    """One score per residual block for Layers-Lottery (Jordao et al., arXiv 2301.10835, Alg. 2;
    spec §9). How per-weight SNIP/GraSP scores become a block score is **not stated** in the paper:
    ``reduce="mean"`` (the default, *ours*, following the author's other layer criteria, which
    average per-unit scores) is the mean over every entry of the block's scored weights;
    ``"sum"`` their sum. Per-stage normalisation is not in the paper and not offered.

    ``blocks``: module-name prefixes (a parameter belongs to block ``"layer1.0"`` when its name
    starts with ``"layer1.0."``) or ``{block: [parameter names]}``. Returns ``{block: score}``; pass
    it to :func:`least_important` with the criterion's name to get the blocks to remove.
    """
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum'; got {reduce!r}")
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty mapping name -> tensor")
    if isinstance(blocks, Mapping):
        members = {b: list(ps) for b, ps in blocks.items()}
        for b, ps in members.items():
            missing = [p for p in ps if p not in scores]
            if missing:
                raise ValueError(f"block {b!r}: no score for {missing[:3]}")
    elif isinstance(blocks, Sequence) and not isinstance(blocks, str):
        members = {b: [n for n in scores if n.startswith(f"{b}.")] for b in blocks}
    else:
        raise ValueError(
            "blocks must be a sequence of module-name prefixes or a mapping block -> parameter names"
        )
    out = {}
    for b, ps in members.items():  # a loop over blocks; each block's reduction is one tensor op
        if not ps:
            raise ValueError(f"block {b!r} holds no scored parameter (scored: {list(scores)[:4]}...)")
        flat = torch.cat([torch.as_tensor(scores[p]).detach().reshape(-1).to(torch.float64) for p in ps])
        out[b] = (flat.mean() if reduce == "mean" else flat.sum()).item()
    return out


def least_important(block_scores: Mapping[str, float], p: int, criterion: str) -> list[str]:
    """The ``p`` least important blocks, in order (Layers-Lottery Alg. 2 step 2): the lowest scores
    for ``snip`` / ``synflow`` / ``magnitude``, the **highest** for ``grasp`` (GraSP removes the
    weights with the highest ``−θ⊙Hg``, so by the spec's reading the least important block has the
    highest mean; *ours*, unconfirmed). Ties keep the blocks' order. Restrict ``block_scores`` to
    the removable blocks first (blocks next to a down-sampling layer cannot go: paper A.1)."""
    if criterion not in LEAST_IMPORTANT:
        raise ValueError(f"criterion must be one of {sorted(LEAST_IMPORTANT)}; got {criterion!r}")
    names = list(block_scores)
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= len(names):
        raise ValueError(f"p (blocks to remove) must be an int in [0, {len(names)}]; got {p!r}")
    vals = torch.tensor([float(block_scores[n]) for n in names], dtype=torch.float64)
    if torch.isnan(vals).any():
        raise ValueError("block scores contain NaN")
    order = torch.sort(vals, descending=LEAST_IMPORTANT[criterion] == "highest", stable=True).indices
    return [names[i] for i in order[:p].tolist()]


__all__ = [
    "LEAST_IMPORTANT",
    "PRUNABLE",
    "block_scores",
    "global_masks",
    "grasp",
    "layer_densities",
    "least_important",
    "precrop_densities",
    "prunable_weights",
    "snip",
    "synflow",
    "synflow_mask",
]
