"""Mixture-of-experts decoders in transformers 5 (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): where the
experts and routers are, how a token is routed, and the surgery that removes experts.

In transformers 5 a sparse MoE block sits at ``layer.mlp`` and holds

- ``experts``: the **fused** expert weights, ``gate_up_proj (E, 2I, H)`` (the gate is the first
  ``I`` rows, up the next ``I``) and ``down_proj (E, H, I)``; its forward takes
  ``(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))`` (eager loop, ``batched_mm`` or
  ``grouped_mm``, chosen by ``config._experts_implementation``);
- ``gate``: the router, a ``(E, H)`` weight; ``softmax`` over the ``E`` logits in fp32, top-k,
  and the k weights renormalised to sum 1 (Mixtral always; the others when
  ``norm_topk_prob``);
- Qwen2-MoE also a ``shared_expert`` MLP and its sigmoid ``shared_expert_gate``, which every token
  uses: they are left alone. Qwen2/3-MoE layers in ``mlp_only_layers`` (or off the
  ``decoder_sparse_step``) have a dense MLP and no experts.

Removing experts ``K`` of a layer (:func:`remove_experts`) indexes ``gate_up_proj``,
``down_proj`` and the router rows by ``K`` and sets ``num_experts`` on the experts and the router
(the eager loop's ``one_hot(num_classes=num_experts + 1)`` and ``grouped_mm``'s histogram read
it). A token that would have gone to a removed expert is re-routed by the softmax over the
remaining logits, exactly as if the removed experts' logits were ``-inf``: that is the reversible
mask (:func:`masked_routing`), and the equality of the two is the test.

Checkpoints: ``config.prunekit_experts`` holds each layer's expert count (``None`` for a dense
layer); ``prunekit.load_pruned`` resizes a freshly built model with :func:`resize` before the
safetensors load (``save_pretrained`` writes the per-expert format and the load re-fuses
whatever experts are present). When every MoE layer keeps the same count it also goes into the
global config field (``num_local_experts`` or ``num_experts``), so plain ``from_pretrained``
works too. With different counts per layer, ``output_router_logits=True`` (the load-balancing
auxiliary loss, which assumes one model-wide expert count) is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModelError
from .decoder import decoder_layers

#: router classes whose forward is softmax -> top-k -> (optional) renormalisation, no bias
ROUTERS = ("MixtralTopKRouter", "Qwen2MoeTopKRouter", "Qwen3MoeTopKRouter", "OlmoeTopKRouter")
FAMILIES = "Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE"
RECORD = "prunekit_experts"


@dataclass(frozen=True)
class MoELayer:
    """One decoder layer's sparse MoE block."""

    index: int  # the decoder layer
    block: nn.Module  # layer.mlp
    experts: nn.Module  # block.experts (fused 3-D weights)
    router: nn.Module  # block.gate

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def normalize(self) -> bool:
        """Whether the k routing weights are renormalised to sum 1 (Mixtral has no flag: always)."""
        return bool(getattr(self.router, "norm_topk_prob", True))

    @property
    def expert_params(self) -> int:
        """Weights of one expert (gate, up and down)."""
        e = self.experts
        return (e.gate_up_proj[0].numel() + e.down_proj[0].numel()) if self.num_experts else 0


def _is_moe_block(mod: nn.Module | None) -> bool:
    return mod is not None and hasattr(mod, "experts") and hasattr(mod, "gate")


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The sparse MoE blocks of a causal LM's decoder layers (dense layers are skipped). A block of
    an unsupported layout raises :class:`UnsupportedModelError` naming what is missing."""
    _, layers = decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        block = getattr(layer, "mlp", None)
        if not _is_moe_block(block):
            continue
        router, experts = block.gate, block.experts
        if type(router).__name__ not in ROUTERS:
            raise UnsupportedModelError(
                f"layer {i}: router {type(router).__name__} is not supported; expert pruning supports "
                f"{FAMILIES} ({', '.join(ROUTERS)})"
            )
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(experts, name, None)
            if not isinstance(p, torch.Tensor) or p.dim() != 3:
                raise UnsupportedModelError(
                    f"layer {i}: {type(experts).__name__} has no fused 3-D {name}; expert pruning supports "
                    f"the fused experts of transformers 5 ({FAMILIES})"
                )
        if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False):
            raise UnsupportedModelError(
                f"layer {i}: transposed or biased fused experts are not supported ({FAMILIES} only)"
            )
        out.append(MoELayer(i, block, experts, router))
    return out


def route(moe: MoELayer, hidden: torch.Tensor, keep: torch.Tensor | None = None):
    """The router's ``(logits (T, E), weights (T, k), indices (T, k))`` for hidden states, computed
    as the family's router does; ``keep`` (``(E,)`` bool) sets the other experts' logits to ``-inf``
    first (the softmax then runs over the kept experts only)."""
    r = moe.router
    logits = F.linear(hidden.reshape(-1, r.weight.shape[1]), r.weight)
    scores = logits.float()
    if keep is not None:
        scores = scores.masked_fill(~keep.to(scores.device), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    top, idx = torch.topk(probs, r.top_k, dim=-1)
    if moe.normalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top.to(_score_dtype(moe, logits)), idx


def _score_dtype(moe: MoELayer, logits: torch.Tensor) -> torch.dtype:
    # Mixtral returns fp32 weights; Qwen2-MoE, Qwen3-MoE and OLMoE cast them to the logits' dtype
    return torch.float32 if type(moe.router).__name__.startswith("Mixtral") else logits.dtype


class MaskedRouting:
    """A forward hook on a router that routes as if the experts outside ``keep`` were removed
    (their logits ``-inf`` before the softmax). ``remove()`` takes it off."""

    def __init__(self, moe: MoELayer, keep: torch.Tensor) -> None:
        self.moe, self.keep = moe, keep.bool()
        self.handle = moe.router.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple, out):
        logits, weights, idx = route(self.moe, args[0], self.keep)
        return logits, weights, idx

    def remove(self) -> None:
        self.handle.remove()


def masked_routing(moe: MoELayer, keep: torch.Tensor) -> MaskedRouting:
    """Route layer ``moe`` over the experts in ``keep`` only (reversible; see :class:`MaskedRouting`)."""
    check_expert_keep(keep, moe)
    return MaskedRouting(moe, keep)


def check_expert_keep(keep: torch.Tensor, moe: MoELayer) -> None:
    """A keep mask ``(E,)`` a layer can run: at least ``top_k`` experts kept."""
    E, k = moe.num_experts, moe.top_k
    if keep.dtype != torch.bool or keep.shape != (E,):
        raise ValueError(f"layer {moe.index}: an expert keep mask must be bool of shape ({E},); got "
                         f"{keep.dtype} {tuple(keep.shape)}")  # fmt: skip
    n = int(keep.sum())
    if n == 0:
        raise ValueError(f"layer {moe.index} would lose all its {E} experts; keep at least top_k={k}")
    if n < k:
        raise ValueError(
            f"layer {moe.index} would keep {n} experts, fewer than its top_k={k} (num_experts_per_tok); "
            f"keep between {k} and {E}"
        )


def _index(module: nn.Module, name: str, idx: torch.Tensor) -> None:
    p = getattr(module, name)
    setattr(
        module, name, nn.Parameter(p.detach()[idx.to(p.device)].contiguous(), requires_grad=p.requires_grad)
    )


def remove_experts(moe: MoELayer, keep: torch.Tensor) -> None:
    """Physically keep only the experts in ``keep`` (``(E,)`` bool): their fused weights, their
    router rows, and ``num_experts`` on the experts and the router."""
    check_expert_keep(keep, moe)
    idx = keep.nonzero().flatten()
    with torch.no_grad():
        _index(moe.experts, "gate_up_proj", idx)
        _index(moe.experts, "down_proj", idx)
        _index(moe.router, "weight", idx)
    moe.experts.num_experts = moe.router.num_experts = len(idx)
    if hasattr(moe.block, "num_experts"):
        moe.block.num_experts = len(idx)


# ------------------------------------------------------------------ checkpoints
def _global_field(config) -> str:
    return "num_local_experts" if hasattr(config, "num_local_experts") else "num_experts"


def record(model: nn.Module) -> list[int | None]:
    """Each decoder layer's expert count (``None``: a dense layer)."""
    _, layers = decoder_layers(model)
    counts: list[int | None] = [None] * len(layers)
    for m in moe_layers(model):
        counts[m.index] = m.num_experts
    return counts


def write_record(model: nn.Module, counts: list[int | None]) -> bool:
    """Store the counts in ``config.prunekit_experts``; when they are all equal also in the global
    expert-count field (returns whether it did)."""
    cfg = model.config
    text = getattr(cfg, "text_config", None)
    configs = [c for c in (cfg, text) if c is not None]
    for c in configs:
        setattr(c, RECORD, counts)
    sizes = {n for n in counts if n is not None}
    if len(sizes) != 1:
        return False
    n = sizes.pop()
    for c in configs:
        if hasattr(c, "num_local_experts") or hasattr(c, "num_experts"):
            setattr(c, _global_field(c), n)
            if hasattr(c, "num_experts") and hasattr(c, "num_local_experts"):  # Qwen3-MoE has both
                c.num_experts = c.num_local_experts = n
    return True


def resize(model: nn.Module, counts: list[int | None]) -> None:
    """Give a freshly built model (weights about to be loaded) the recorded expert counts."""
    _, layers = decoder_layers(model)
    if len(counts) != len(layers):
        raise ValueError(f"{RECORD} describes {len(counts)} layers; the config builds {len(layers)}")
    for m in moe_layers(model):
        n = counts[m.index]
        if n is None:
            raise ValueError(f"{RECORD} says layer {m.index} is dense, but the config builds experts there")
        if n == m.num_experts:
            continue
        for mod, name in ((m.experts, "gate_up_proj"), (m.experts, "down_proj"), (m.router, "weight")):
            p = getattr(mod, name)
            setattr(mod, name, nn.Parameter(p.new_empty((n, *p.shape[1:])), requires_grad=p.requires_grad))
        m.experts.num_experts = m.router.num_experts = n
