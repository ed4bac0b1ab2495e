"""Expert pruning for mixture-of-experts decoders: STUN [``stun``] and the baselines
[``expert_random``], [``expert_frequency``]. The surgery is ``prunekit.models.moe``; STUN's
clustering is ``prunekit.weights.stun``; unstructured pruning of the fused experts is the ordinary
weights engine (``prunekit.weights.experts``).

**Budgets.** ``expert_random`` and ``expert_frequency`` (and ``stun`` with ``then=None``) take
``sparsity`` = the fraction of **experts** removed (over every MoE layer). ``stun`` with a second
stage (``then="wanda"``, the default, or ``"owl"``) takes ``sparsity`` = the fraction of the decoder
layers' **prunable weights** removed in total (every Linear weight in the decoder layers, the
fused experts included; embeddings, ``lm_head``, norms and routers not counted), of which the
removed experts are one part (``experts=``, the fraction of experts removed in stage 1) and the
unstructured stage the rest: ``s2 = (s * T - R) / (T - R)`` for ``T`` prunable weights of which
stage 1 removed ``R``.

**Reversible.** Until ``finalize()`` removed experts are masked in routing only (their router logits
``-inf``: ``prunekit.models.moe.masked_routing``), stage 2 by the usual masks; ``restore()`` gives
the model back exactly. ``finalize()`` makes stage 2 permanent, then slices the fused experts and
the router rows and records each layer's expert count (``config.prunekit_experts``) for
``prunekit.load_pruned``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ... import __version__
from ...errors import PrunekitError, UnsupportedModelError
from ...models.decoder import decoder_layers
from ...models.moe import FAMILIES, MoELayer, masked_routing, moe_layers, remove_experts, write_record
from ...registry import register
from ..calibration import calibration_batches, calibration_ids, calibration_tokens
from ..engine import JSONReport, WeightPruning
from ..structures import check_sparsity
from ..stun import PAIRS, coselection, distances, normalized, plan_clusters, representatives

THEN = ("wanda", "owl", None)
SELECTORS = ("cluster", "frequency")


@dataclass
class ExpertLayerReport:
    layer: int
    experts_before: int
    kept: list[int]  # kept experts (original indices)
    params_before: int  # the layer's expert weights
    params_after: int
    tokens: list[int] = field(default_factory=list)  # calibration selections per expert


@dataclass
class ExpertReport(JSONReport):
    """What expert pruning removed (and stage 2's unstructured report). ``to_dict`` is one JSON line.
    ``params_targeted`` counts every prunable weight of the decoder layers (experts and Linears)."""

    model: str
    method: str
    config: str
    sparsity: float
    calibration_tokens: int
    pattern: str = "experts"
    allocation: str = ""
    experts_removed: float = 0.0  # fraction of the routed experts removed
    linear_params: int = 0  # prunable weights outside the fused experts (attention, shared experts)
    seconds: float = 0.0
    peak_memory_bytes: float = float("nan")
    memory_how: str = ""
    layers: list[ExpertLayerReport] = field(default_factory=list)
    unstructured: dict | None = None  # stage 2's WeightReport.to_dict(), once finalized or restored
    unstructured_pruned: int = 0

    @property
    def params_targeted(self) -> int:
        return self.linear_params + sum(r.params_before for r in self.layers)

    @property
    def params_pruned(self) -> int:
        return sum(r.params_before - r.params_after for r in self.layers) + self.unstructured_pruned

    @property
    def layer_sparsity(self) -> list[float]:
        """Fraction of each MoE layer's expert weights removed by expert removal."""
        return [1 - r.params_after / max(r.params_before, 1) for r in self.layers]

    def __str__(self) -> str:
        n_before = sum(r.experts_before for r in self.layers)
        n_kept = sum(len(r.kept) for r in self.layers)
        extra = f" + {self.unstructured_pruned:,} weights unstructured" if self.unstructured_pruned else ""
        return (
            f"{self.method} on {self.model}: {n_before - n_kept} of {n_before} experts removed "
            f"({self.experts_removed:.1%}){extra}; {self.params_pruned:,} of {self.params_targeted:,} "
            f"prunable weights removed ({self.params_pruned / max(self.params_targeted, 1):.1%}) "
            f"in {self.seconds:.1f} s"
        )


class ExpertPruning(WeightPruning):
    """Experts removed from routing (reversibly), plus an optional unstructured stage.
    ``restore()``: the model exactly as before; ``finalize()``: stage 2 made permanent, the
    experts sliced out, the counts recorded in the config."""

    def __init__(self, model: nn.Module, report: ExpertReport) -> None:
        super().__init__(model, report)  # type: ignore[arg-type]
        self.keeps: dict[int, torch.Tensor] = {}
        self.moes: dict[int, MoELayer] = {}
        self._routing: list = []
        self.stage2: WeightPruning | None = None

    def apply(self, moe: MoELayer, keep: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        self._routing.append(masked_routing(moe, keep))
        self.keeps[moe.index], self.moes[moe.index] = keep, moe
        per = moe.expert_params
        self.report.layers.append(
            ExpertLayerReport(
                layer=moe.index, experts_before=moe.num_experts, kept=keep.nonzero().flatten().tolist(),
                params_before=per * moe.num_experts, params_after=per * int(keep.sum()),
                tokens=[] if tokens is None else tokens.tolist(),
            )
        )  # fmt: skip
        n_before = sum(r.experts_before for r in self.report.layers)
        self.report.experts_removed = 1 - sum(len(r.kept) for r in self.report.layers) / n_before

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{"<layers>.<i>.mlp.experts": kept experts (E,) bool}`` and stage 2's weight masks."""
        if self.state != "pruned":
            raise PrunekitError(f"the masks are gone: this pruning was {self.state}")
        prefix, _ = decoder_layers(self.model)
        out = {f"{prefix}.{i}.mlp.experts": k for i, k in self.keeps.items()}
        if self.stage2 is not None:
            out.update(self.stage2.masks)
        return out

    def _unroute(self) -> None:
        for r in self._routing:
            r.remove()
        self._routing.clear()

    def _stage2_report(self) -> None:
        if self.stage2 is not None:
            self.report.unstructured = self.stage2.report.to_dict()

    def restore(self) -> None:
        if self.state == "finalized":
            raise PrunekitError("finalize() made this pruning permanent; it cannot be restored")
        if self.stage2 is not None and self.stage2.state == "pruned":
            self.stage2.restore()
        self._unroute()
        self.keeps.clear()
        self.state = "restored"

    def finalize(self) -> ExpertReport:  # type: ignore[override]
        """Make stage 2 permanent, slice out the removed experts and their router rows, and
        record each layer's expert count in the config (for ``prunekit.load_pruned``)."""
        if self.state != "pruned":
            raise PrunekitError(f"nothing to finalize: this pruning was {self.state}")
        if self.stage2 is not None and self.stage2.state == "pruned":
            self.stage2.finalize()
        self._stage2_report()
        self._unroute()
        for i, keep in sorted(self.keeps.items()):
            remove_experts(self.moes[i], keep)
        from ...models.moe import record

        write_record(self.model, record(self.model))
        cfgs = (getattr(self.model, "config", None), getattr(self.model.config, "text_config", None))
        for c in {id(x): x for x in cfgs if x is not None}.values():
            c.prunekit = {"method": self.report.method, "version": __version__}
        self.state = "finalized"
        return self.report  # type: ignore[return-value]


def router_choices(
    model: nn.Module, moes: list[MoELayer], ids, batch_size: int, progress: bool = True
) -> list[torch.Tensor]:
    """Every MoE layer's top-k choices ``(tokens, k)`` on the calibration ids: one forward pass per
    batch of the unpruned model (STUN's O(1) passes), read from the routers' outputs."""
    from tqdm.auto import tqdm

    got: list[list[torch.Tensor]] = [[] for _ in moes]

    def hook(j: int):
        def fn(module: nn.Module, args: tuple, out) -> None:
            got[j].append(out[2].detach().cpu())

        return fn

    from ...models.structure import decoder_stack

    stack, _ = decoder_stack(model)  # the decoder alone: no lm_head logits to hold
    handles = [m.router.register_forward_hook(hook(j)) for j, m in enumerate(moes)]
    dev = next(model.parameters()).device
    try:
        for x in tqdm(
            calibration_batches(ids, batch_size), desc="routing", disable=not progress, leave=False
        ):
            x = x.to(dev)
            stack(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(g) for g in got]


def linear_params(model: nn.Module) -> int:
    """Prunable weights outside the fused experts: the decoder layers' Linears, routers excluded."""
    from ..experts import is_router

    prefix, layers = decoder_layers(model)
    return sum(
        mod.weight.numel()
        for i, layer in enumerate(layers)
        for sub, mod in layer.named_modules()
        if isinstance(mod, nn.Linear) and not is_router(f"{prefix}.{i}.{sub}", mod)
    )


@dataclass
class ExpertMethod:
    """Common ground of the expert-removal methods: the budget, the calibration pass, the handle."""

    seed: int = 0

    name: ClassVar[str] = "?"
    structured: ClassVar[bool] = True
    needs_routing: ClassVar[bool] = True
    allocation: ClassVar[str] = "uniform per layer"

    def plan(
        self, moes: list[MoELayer], choices: list[torch.Tensor] | None, n_remove: int
    ) -> list[torch.Tensor]:
        """``(E,)`` keep masks per MoE layer removing ``n_remove`` experts in total."""
        raise NotImplementedError

    def expert_fraction(self, sparsity) -> float:
        return check_sparsity(0.25 if sparsity is None else sparsity, "the fraction of experts removed")

    def stage2(self):
        return None

    def prune_model(
        self, model: nn.Module, sparsity, *, calibration=None, tokenizer=None, n_samples: int = 16,
        seq_len: int = 512, batch_size: int = 4, seed: int = 0, progress: bool = True,
    ) -> ExpertPruning:  # fmt: skip
        """Remove experts from ``model`` (see the module docstring); ``prunekit.prune_weights``
        calls this. Returns the reversible :class:`ExpertPruning`."""
        from ..engine import run_pruning

        moes = moe_layers(model)
        if not moes:
            raise UnsupportedModelError(
                f"{self.name} removes experts of mixture-of-experts decoders ({FAMILIES}); "
                f"{type(model).__name__} has no MoE layer"
            )
        frac = self.expert_fraction(sparsity)
        total = sum(m.num_experts for m in moes)
        n_remove = round(frac * total)
        most = total - sum(m.top_k for m in moes)
        if n_remove > most:
            raise ValueError(
                f"{self.name}: removing {frac:g} of the experts ({n_remove} of {total}) would leave a layer "
                f"fewer than top_k experts; at most {most / total:.4f} can go"
            )
        if any(p.is_meta for p in model.parameters()):
            raise PrunekitError("the model has weights on the meta device; load it fully first")
        stage2 = self.stage2()
        needs_ids = self.needs_routing or stage2 is not None
        ids = calibration_ids(tokenizer, calibration, n_samples, seq_len, seed) if needs_ids else None
        report = ExpertReport(
            model=type(model).__name__, method=self.name, config=repr(self),
            sparsity=float(sparsity if sparsity is not None else frac),
            calibration_tokens=calibration_tokens(ids),
            allocation=self.allocation, linear_params=linear_params(model),
        )  # fmt: skip
        handle = ExpertPruning(model, report)

        def work() -> None:
            with torch.no_grad():
                choices = (
                    router_choices(model, moes, ids, batch_size, progress) if self.needs_routing else None
                )
                keeps = self.plan(moes, choices, n_remove)
            for j, (moe, keep) in enumerate(zip(moes, keeps, strict=True)):
                tokens = None
                if choices is not None:
                    tokens = torch.bincount(choices[j].flatten(), minlength=moe.num_experts)
                handle.apply(moe, keep, tokens)
            if stage2 is not None:
                self.run_stage2(model, handle, stage2, sparsity, ids, batch_size, seed, progress)

        return run_pruning(model, handle, work)

    def run_stage2(self, model, handle, stage2, sparsity, ids, batch_size, seed, progress) -> None:
        from ..engine import prune_weights

        rep: ExpertReport = handle.report
        T = rep.params_targeted
        R = sum(r.params_before - r.params_after for r in rep.layers)
        s2 = (sparsity * T - R) / (T - R)
        if s2 < 0:
            raise ValueError(
                f"{self.name}: removing {rep.experts_removed:.3f} of the experts already removes "
                f"{R / T:.3f} of the prunable weights, more than sparsity={sparsity}; lower experts="
            )
        prefix, _ = decoder_layers(model)
        gone = {
            f"{prefix}.{r.layer}.mlp.experts.{e}." for r in rep.layers for e in range(r.experts_before)
            if e not in set(r.kept)
        }  # fmt: skip
        keep = lambda name, mod: not any(name.startswith(g) for g in gone)  # noqa: E731
        handle.stage2 = prune_weights(
            model,
            stage2,
            s2,
            calibration=ids,
            targets=keep,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
        rep.unstructured_pruned = handle.stage2.report.params_pruned
        rep.allocation = f"{self.allocation}; then {stage2} at {s2:.4f}"


def _uniform_counts(moes: list[MoELayer], n_remove: int) -> list[int]:
    """Experts removed per layer for a uniform budget: equal shares, the remainder to the first
    layers (each layer keeps at least top_k)."""
    total = sum(m.num_experts for m in moes)
    raw = [n_remove * m.num_experts / total for m in moes]
    counts = [int(r) for r in raw]
    order = sorted(range(len(moes)), key=lambda j: raw[j] - counts[j], reverse=True)
    for j in order[: n_remove - sum(counts)]:
        counts[j] += 1
    for j, m in enumerate(moes):
        if m.num_experts - counts[j] < m.top_k:
            raise ValueError(
                f"layer {m.index} would keep {m.num_experts - counts[j]} experts, fewer than its "
                f"top_k={m.top_k}"
            )
    return counts


@register(
    "expert_random",
    family="weights",
    paper="STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning",
    stages=("after-training",),
    signals=(),
    summary="structured: removes random experts, the same number in every MoE layer (baseline)",
)
@dataclass
class ExpertRandom(ExpertMethod):
    """Random expert removal: the same number of experts in every MoE layer (``sparsity`` =
    fraction of experts), chosen uniformly at random under ``seed``. A baseline of STUN's paper."""

    needs_routing: ClassVar[bool] = False

    def plan(self, moes, choices, n_remove):
        g = torch.Generator().manual_seed(self.seed)
        out = []
        for m, n in zip(moes, _uniform_counts(moes, n_remove), strict=True):
            keep = torch.ones(m.num_experts, dtype=torch.bool)
            keep[torch.randperm(m.num_experts, generator=g)[:n]] = False
            out.append(keep)
        return out


@register(
    "expert_frequency",
    family="weights",
    paper="STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning",
    stages=("after-training",),
    signals=("router_topk",),
    summary="structured: removes the experts the router selects least often on calibration text",
)
@dataclass
class ExpertFrequency(ExpertMethod):
    """Router-frequency expert removal: in every MoE layer the same number of experts go, those
    the router chose least often (in its top-k) on the calibration tokens; ties go to the lower
    index. One forward pass over the calibration data. A baseline of STUN's paper."""

    def plan(self, moes, choices, n_remove):
        out = []
        for m, top, n in zip(moes, choices, _uniform_counts(moes, n_remove), strict=True):
            freq = torch.bincount(top.flatten(), minlength=m.num_experts)
            keep = torch.ones(m.num_experts, dtype=torch.bool)
            keep[torch.argsort(freq, stable=True)[:n]] = False
            out.append(keep)
        return out


@register(
    "stun",
    family="weights",
    paper="STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning",
    stages=("after-training",),
    signals=("router_topk",),
    summary="structured + unstructured: experts clustered by co-selection, global threshold; then Wanda/OWL",
)
@dataclass
class STUN(ExpertMethod):
    """STUN (Structured-Then-Unstructured pruning for MoE; official code thnkinbtfly/STUN).

    Stage 1, expert pruning with O(1) forward passes (``prunekit.weights.stun`` has each step and
    every departure from the official code): one pass over the calibration data records each
    router's top-k; experts that are often selected together are close (``D = -C/|mean|``);
    greedy clustering with rejection under **one global threshold** merges clusters until
    ``experts`` of all experts are gone (layers lose different numbers); each cluster keeps its
    member nearest the cluster's mean weights, unchanged, with its router row; the others' rows are
    deleted (no re-calibration: their tokens go where the remaining logits send them).

    Stage 2 (``then``): Wanda (default) or OWL on every remaining Linear and expert up to the total
    ``sparsity``; ``then=None`` stops after stage 1 and ``sparsity`` is then the fraction of experts.

    Options: ``experts`` (fraction of experts removed in stage 1, default 0.25; the README's Arctic
    command removes 0.2 of the experts); ``pairs`` (``"topk"``: every pair in the top-k, ours;
    ``"top2"``: the official count); ``mix_weight`` (adds router-row distances, the official
    ``--mix_weight``); ``divide_mean`` (the official ``--divide_mean``, on); ``normalize`` (ours, off:
    co-selection divided by ``sqrt(f_i f_j)``, see ``prunekit.weights.stun.normalized``); ``selector``
    (``"cluster"``: STUN's stage 1; ``"frequency"``, ours: stage 1 removes the least-selected experts,
    as ``expert_frequency``, so the structured-then-unstructured recipe can be tested apart from
    its expert selector).
    """

    experts: float | None = 0.25
    then: str | None = "wanda"
    pairs: str = "topk"
    mix_weight: float | None = None
    divide_mean: bool = True
    normalize: bool = False
    selector: str = "cluster"

    allocation: ClassVar[str] = "global threshold"

    def __post_init__(self) -> None:
        if isinstance(self.then, str) and self.then.lower() in ("none", "null"):
            self.then = None  # from the CLI: --option then=none
        if self.then not in THEN:
            raise ValueError(f"then must be one of {list(THEN)}; got {self.then!r}")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {list(SELECTORS)}; got {self.selector!r}")
        if self.pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {list(PAIRS)}; got {self.pairs!r}")
        if self.experts is not None:
            check_sparsity(self.experts, "the fraction of experts removed in stage 1")

    def stage2(self):
        return self.then

    def expert_fraction(self, sparsity) -> float:
        if self.then is None:
            return check_sparsity(
                (self.experts if self.experts is not None else 0.25) if sparsity is None else sparsity,
                "the fraction of experts removed (then=None)",
            )
        check_sparsity(0.4 if sparsity is None else sparsity, "the fraction of prunable weights removed")
        return 0.25 if self.experts is None else self.experts

    def prune_model(self, model, sparsity, **kw):
        if self.then is not None and sparsity is None:
            sparsity = 0.4
        return super().prune_model(model, sparsity, **kw)

    def plan(self, moes, choices, n_remove):
        if self.selector == "frequency":
            return ExpertFrequency().plan(moes, choices, n_remove)
        Ds = []
        for m, top in zip(moes, choices, strict=True):
            C = coselection(top, m.num_experts, self.pairs)
            if self.normalize:
                C = normalized(C, top)
            Ds.append(distances(C, m.router.weight, self.mix_weight, self.divide_mean))
        total = sum(m.num_experts for m in moes)
        labels = plan_clusters(Ds, total - n_remove, [m.top_k for m in moes])
        out = []
        for m, lab in zip(moes, labels, strict=True):
            W = torch.cat(
                [m.experts.gate_up_proj.detach().flatten(1), m.experts.down_proj.detach().flatten(1)], 1
            )
            out.append(representatives(lab, W))
        return out
