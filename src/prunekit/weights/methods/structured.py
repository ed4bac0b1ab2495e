"""Structured weight methods: FLAP, CFSP, LLM-Pruner, ShortGPT, and the Wanda-SP / Mag-SP / random
baselines.

Every method removes whole units (KV groups with their query heads, MLP channels, layers) through
``prunekit.prune_weights(model, name, sparsity=...)``; ``sparsity`` is the fraction of the
decoder layers' prunable weights removed (see ``prune_structured``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...models.structure import LayerKeep
from ...registry import register
from ..structured import (
    LayerData,
    StructuredMethod,
    attention_units,
    attn_channels,
    cfsp_budgets,
    cfsp_scores,
    flap_bias,
    global_counts,
    head_scores,
    layer_keep,
    layers_to_remove,
    magnitude_sp,
    standardize,
    uniform_keep,
    wanda_sp,
    wifv,
)

_STAGES = ("after-training",)


@register(
    "flap",
    family="weights",
    paper="Fluctuation-based Adaptive Structured Pruning for Large Language Models",
    stages=_STAGES,
    signals=("activation_variance",),
    summary="structured: fluctuation metric (WIFV), global adaptive structure, bias compensation",
)
@dataclass
class FLAP(StructuredMethod):
    """FLAP (An et al., AAAI 2024), official code CASIA-IVA-Lab/FLAP @ 3bb57db, structure AL-AM
    and metric WIFV (its defaults for the main results).

    1. The dense model runs on the calibration windows (scoring is not sequential, as in FLAP);
       the inputs of ``o_proj`` and ``down_proj`` give each channel's mean and variance.
    2. ``S_j = Var(X_j) * ||W[:, j]||^2``; the attention metric is squared (FLAP's
       ``W_metric ** 2`` for ``o_proj``; ``faithful=False`` drops the square).
    3. Within each layer, attention and MLP scores are standardised separately (unbiased std);
       a unit's score is the mean over its channels.
    4. One global ranking of every unit with its exact parameter cost (FLAP hard-codes 512/3
       channels per head); keep the prefix nearest ``1 - sparsity`` of the prunable weights.
    5. Bias compensation ``b = W[:, pruned] @ mean(X)[pruned]`` into ``o_proj`` and ``down_proj``,
       computed in fp32/fp64 (FLAP stores the mean in fp16).

    Departures (ours): the variance is the exact unbiased sample variance over all tokens (FLAP's
    running update drops the first sequence's spread; the scale cancels in the standardisation);
    each layer keeps its best KV group and best channel (FLAP can empty a layer); ties at the
    threshold are broken by rank. **GQA** (``gqa=``): by default the attention unit is a whole KV
    group (its KV head and its ``g`` query heads, score = mean over their channels), as the nyunAI
    fork's ``prune_kv_heads=True``; for MHA (``g = 1``) this is FLAP's per-head pruning.
    ``gqa="query_slots"`` keeps every KV head and removes one query head per group at a time
    (see ``attention_units``). Either way every kept KV head keeps the same number of query
    heads: a legal transformers GQA layer.

    The biases survive saving as per-layer ``o_proj_bias`` / ``down_proj_bias`` flags in
    ``config.prunekit_structure`` (``prunekit.load_pruned`` creates them); transformers' own
    ``attention_bias`` / ``mlp_bias`` would add biases to q/k/v or gate/up too."""

    faithful: bool = True  # keep FLAP's squared attention metric
    compensate: bool = True  # bias compensation

    needs = frozenset({"activations"})

    def plan(self, data: list[LayerData], sparsity: float) -> list[LayerKeep]:
        heads, units, costs, chans = [], [], [], []
        for d in data:
            att = wifv(d.variance("attn"), d.o_weight)
            if self.faithful:
                att = att**2
            heads.append(head_scores(standardize(att), d.geo, reduce="mean"))
            u, c = attention_units(heads[-1], d.geo, self.gqa)
            units.append(u)
            costs.append(c)
            chans.append(standardize(wifv(d.variance("mlp"), d.down_weight)))
        counts = global_counts([d.geo for d in data], units, costs, chans, sparsity)
        keeps = [
            layer_keep(d.geo, h, self.gqa, nu, c, nc)
            for d, h, c, (nu, nc) in zip(data, heads, chans, counts, strict=True)
        ]
        if self.compensate:
            for d, k in zip(data, keeps, strict=True):
                k.o_bias = flap_bias(d.o_weight, d.mean("attn"), attn_channels(k, d.geo))
                k.down_bias = flap_bias(d.down_weight, d.mean("mlp"), k.channels)
        return keeps


@register(
    "wanda_sp",
    family="weights",
    paper="Fluctuation-based Adaptive Structured Pruning for Large Language Models (Wanda-SP baseline)",
    stages=_STAGES,
    signals=("x_norm",),
    summary="structured Wanda: mean|W| * ||X|| per channel, summed per unit, uniform per layer",
)
@dataclass
class WandaSP(StructuredMethod):
    """Wanda-SP, FLAP's structured Wanda baseline (FLAP lib/prune.py ``prune_wanda_sp``):
    ``S_j = mean_o |W[o, j]| * ||X_j||_2`` over the o_proj / down_proj inputs, a unit's score is the
    sum over its channels, uniform per layer, no bias. Sequential: each layer is pruned, then run
    pruned to make the next layer's inputs. Per-layer counts are :func:`uniform_keep`'s (ours)."""

    needs = frozenset({"activations"})
    sequential = True

    def plan_layer(self, i: int, d: LayerData, sparsity: float) -> LayerKeep:
        h = head_scores(wanda_sp(d.attn_sq, d.o_weight), d.geo)
        return uniform_keep(d.geo, h, wanda_sp(d.mlp_sq, d.down_weight), sparsity, self.gqa)


@register(
    "magnitude_sp",
    family="weights",
    paper="Fluctuation-based Adaptive Structured Pruning for Large Language Models (Mag-SP baseline)",
    stages=_STAGES,
    signals=(),
    summary="structured magnitude: column norm of o_proj / down_proj per unit, uniform per layer",
)
@dataclass
class MagnitudeSP(StructuredMethod):
    """Mag-SP, FLAP's structured magnitude baseline: ``S_j = ||W[:, j]||_2`` of the o_proj /
    down_proj columns, summed per unit, uniform per layer (:func:`uniform_keep`). No data."""

    def plan_layer(self, i: int, d: LayerData, sparsity: float) -> LayerKeep:
        h = head_scores(magnitude_sp(d.o_weight), d.geo)
        return uniform_keep(d.geo, h, magnitude_sp(d.down_weight), sparsity, self.gqa)


@register(
    "random_sp",
    family="weights",
    paper="random structured baseline",
    stages=_STAGES,
    signals=(),
    summary="structured: random units, uniform per layer (seeded)",
)
@dataclass
class RandomSP(StructuredMethod):
    """Random KV groups and MLP channels, uniform per layer (:func:`uniform_keep`), seeded."""

    seed: int = 0

    def plan(self, data: list[LayerData], sparsity: float) -> list[LayerKeep]:
        gen = torch.Generator().manual_seed(self.seed)
        out = []
        for d in data:
            h = torch.rand(d.geo.n_q, generator=gen, dtype=torch.float64)
            c = torch.rand(d.geo.inter, generator=gen, dtype=torch.float64)
            out.append(uniform_keep(d.geo, h, c, sparsity, self.gqa))
        return out


@register(
    "shortgpt",
    family="weights",
    paper="ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
    stages=_STAGES,
    signals=("block_influence",),
    summary="structured: remove the decoder layers of lowest Block Influence",
)
@dataclass
class ShortGPT(StructuredMethod):
    """ShortGPT (Men et al., 2024; official code icip-cas/ShortGPT @ 9a2ee8d): Block Influence
    ``BI_l = sum_tokens (1 - cos(h_in, h_out))`` of each decoder layer on the dense model; remove
    the lowest-BI layers in one shot, as many as bring the removed prunable weights nearest
    ``sparsity`` (``n_layers`` fixes the count instead). Layers are deleted at ``finalize()`` and
    ``layer_idx``, ``num_hidden_layers`` and ``layer_types`` renumbered, so plain
    ``from_pretrained`` reloads the result.

    ``faithful=True`` compares the last layer's input with its output **after the final norm**, as
    the official code does through ``hidden_states[-1]`` (which inflates the last layer's BI so it
    is never removed); the default compares raw decoder-layer outputs (fixed). Calibration is
    prunekit's windows (the official code uses 256-token strides of PG19 validation books)."""

    n_layers: int | None = None
    faithful: bool = False

    needs = frozenset({"influence"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_layers is not None and (isinstance(self.n_layers, bool) or self.n_layers < 0):
            raise ValueError(f"n_layers must be an int >= 0; got {self.n_layers!r}")

    def plan(self, data: list[LayerData], sparsity: float) -> list[LayerKeep]:
        bi = [float(d.influence) for d in data]
        if self.n_layers is not None:
            if self.n_layers >= len(data):
                raise ValueError(
                    f"n_layers={self.n_layers} would remove every one of the {len(data)} decoder layers"
                )
            order = torch.tensor(bi, dtype=torch.float64).argsort(stable=True)
            drop = sorted(order[: self.n_layers].tolist())
        else:
            drop = layers_to_remove(bi, [d.geo.params for d in data], sparsity)
        return [LayerKeep(removed=i in drop) for i in range(len(data))]


@register(
    "cfsp",
    family="weights",
    paper="CFSP: An Efficient Structured Pruning Framework for LLMs with Coarse-to-Fine Activation "
    "Information",
    stages=_STAGES,
    signals=("angular_distance", "x_norm"),
    summary="structured, MLP channels only: layer budgets from angular distance, channel scores",
)
@dataclass
class CFSP(StructuredMethod):
    """CFSP (Wang et al., COLING 2025), official code wyxscir/CFSP @ b2d5b13: **MLP channels only**
    (attention is never pruned, as in the official code).

    1. Coarse: each layer's importance is the angular distance ``arccos(cos(h_in, h_out)) / pi``
       between its input and output, over the dense model's calibration tokens.
    2. Budgets (:func:`cfsp_budgets`): ``sigmoid((I_l - mean I) / temperature)`` normalised so the
       layers keep on average ``1 - p`` of their channels, more for layers that change more.
    3. Fine: channel scores (:func:`cfsp_scores`); each layer keeps its best ``k_l * I`` channels.

    ``sparsity`` is prunekit's (fraction of the prunable weights); CFSP's ``p`` (mean fraction of
    MLP channels removed) is derived from it, so a sparsity above the MLP's share of the prunable
    weights is refused. Departures, all said: the importance is the **mean** per token, not the
    sum, and ``temperature`` replaces the hard-coded ``1e4`` divisor (the default,
    ``1e4 / (128 * 1024)``, gives the official scale at its 128 x 1024 calibration tokens at any
    token count); a layer keeps ``round(k_l * I)`` channels, rounded to ``round_to`` (the official
    ``cuda_friendly`` uses 128, and keeps **every** channel when that rounds to 0; here at least
    ``round_to`` stay), where the official code keeps ``int(k_l * I) + 1``.
    ``faithful=True`` (default) keeps the official score, which reduces to the activation norm
    ``a_j^c`` (its normalisations average away); ``faithful=False`` is a RIA-style reading (ours,
    unconfirmed). The exponent ``c`` is not confirmed (default 1; any ``c > 0`` ranks the same in
    faithful mode). CFSP's recovery fine-tuning is not described in its code; not done here."""

    faithful: bool = True
    c: float = 1.0
    temperature: float = 1e4 / (128 * 1024)
    round_to: int = 1

    needs = frozenset({"activations", "angular"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be an int >= 1; got {self.round_to!r}")

    def plan(self, data: list[LayerData], sparsity: float) -> list[LayerKeep]:
        total = sum(d.geo.params for d in data)
        mlp = sum(3 * d.geo.hidden * d.geo.inter for d in data)
        p = sparsity * total / mlp
        if p >= 1.0:
            raise ValueError(
                f"sparsity {sparsity} would empty a layer: CFSP prunes MLP channels only, which are "
                f"{mlp / total:.4f} of the prunable weights"
            )
        budgets = cfsp_budgets([float(d.angular) for d in data], 1.0 - p, self.temperature)
        out = []
        for d, k in zip(data, budgets, strict=True):
            inter, r = d.geo.inter, self.round_to
            n = min(max(round(k * inter / r) * r, r), inter)
            score = cfsp_scores(
                d.mlp_sq.sqrt(), d.down_weight, d.up_weight.T, d.gate_weight.T, self.faithful, self.c
            )
            ch = None if n >= inter else score.argsort(descending=True, stable=True)[:n].sort().values
            out.append(LayerKeep(channels=ch))
        return out


@register(
    "llm_pruner",
    family="weights",
    paper="LLM-Pruner: On the Structural Pruning of Large Language Models",
    stages=_STAGES,
    signals=("gradient",),
    summary="structured: first-order Taylor importance of dependency groups, block-wise, uniform",
)
@dataclass
class LLMPruner(StructuredMethod):
    """LLM-Pruner (Ma et al., NeurIPS 2023), block-wise mode (the paper's tables), official code
    horseee/LLM-Pruner @ 128a07d. Importance ``param_first``: ``sum |w * dL/dw|`` over every weight
    of a group (grouping ``sum``), ``L`` the LM loss of the dense model on the calibration
    windows. Groups: an MLP channel (gate and up rows, down column) and, under GQA, a KV head with
    its query heads (q, k, v rows and o columns; the official ``llama3.py``), or with
    ``gqa="query_slots"`` query heads balanced per KV group (q rows and o columns only). Only layers
    ``[skip_first, L - skip_last)`` are pruned (the official scripts: 4..30 of 32), all at one
    ratio, chosen so the removed weights are ``sparsity`` of the whole model's prunable weights.

    Departures: calibration is prunekit's windows (the paper: 10 BookCorpus samples of 64 tokens;
    pass ``n_samples=10, seq_len=64`` for its size), the gradient is summed over batches; a layer's
    counts come from :func:`uniform_counts` (whole attention units, the MLP absorbing the
    rounding) where the official code prunes ``C - int(C (1 - p))`` channels per root rounded to
    heads. Other importances (``vectorize``, ``param_second``, ``param_mix``) and channel-wise mode
    are not implemented. LoRA recovery is ``prunekit``'s separate step (not yet)."""

    skip_first: int = 4
    skip_last: int = 2

    needs = frozenset({"taylor"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("skip_first", "skip_last"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} must be an int >= 0; got {v!r}")

    def plan(self, data: list[LayerData], sparsity: float) -> list[LayerKeep]:
        L = len(data)
        pruned = range(self.skip_first, L - self.skip_last)
        if not len(pruned):
            raise ValueError(
                f"skip_first={self.skip_first} and skip_last={self.skip_last} leave none of the {L} layers "
                "to prune; lower them"
            )
        total = sum(d.geo.params for d in data)
        inside = sum(data[i].geo.params for i in pruned)
        ratio = sparsity * total / inside
        if ratio >= 1.0:
            raise ValueError(
                f"sparsity {sparsity} would empty a layer: layers {pruned.start}..{pruned.stop - 1} hold "
                f"{inside / total:.4f} of the prunable weights"
            )
        out = []
        for i, d in enumerate(data):
            if i not in pruned:
                out.append(LayerKeep())
                continue
            t = d.taylor
            head = t["heads"].clone()
            if self.gqa == "kv_groups":  # a group's score is the sum over all its members
                head += (t["kv"] / d.geo.group).repeat_interleave(d.geo.group)
            out.append(uniform_keep(d.geo, head, t["channels"], ratio, self.gqa))
        return out
