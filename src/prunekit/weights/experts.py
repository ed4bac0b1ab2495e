"""Unstructured and N:M pruning of fused MoE experts: each expert's matrices are pruned as if they
were Linears, with input statistics from the tokens routed to that expert.

A fused expert tensor (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``) is seen as ``E``
Linear weights ``(out, in)``: :class:`ExpertWeight` is one of them. Its input statistics
(:func:`expert_hook`) are computed from the experts module's own call: the hidden states of the
tokens the router sent to expert ``e`` (``gate_up_proj``'s input) and, for ``down_proj``,
``act(gate) * up`` of those tokens (the routing weight multiplies the *output*, so it is not part of
the input, as for a Linear). This recomputes the experts' first matmul in the hook, independent of
the experts implementation (eager loop, ``batched_mm``, ``grouped_mm``).

**An expert that no calibration token reached** has no input statistics. Its weights are then
ranked by magnitude ``|W|`` (under the same pattern and comparison group), whatever the method:
Wanda's score would be all zeros (the mask an arbitrary tie-break) and SparseGPT's Hessian is zero.
The report counts such experts (``WeightReport.unreached``). This rule is ours.

Masks are one parametrization per fused tensor (``W * keep``, ``keep (E, out, in)``), filled one
expert at a time; routers are never pruned (nor Qwen2-MoE's ``shared_expert_gate``, a router too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .calibration import accumulate

FUSED = ("gate_up_proj", "down_proj")


@dataclass(eq=False)
class ExpertWeight:
    """Expert ``e``'s matrix inside the fused parameter ``experts.<pname>``, seen as a Linear."""

    experts: nn.Module
    pname: str  # "gate_up_proj" or "down_proj"
    e: int

    @property
    def weight(self) -> torch.Tensor:
        """The ``(out, in)`` weight (a view of the fused, possibly masked, tensor)."""
        return getattr(self.experts, self.pname)[self.e]

    @property
    def fused(self) -> torch.Tensor:
        """The fused 3-D tensor's stored values (the original under a parametrization)."""
        if hasattr(self.experts, "parametrizations") and self.pname in self.experts.parametrizations:
            return self.experts.parametrizations[self.pname].original
        return getattr(self.experts, self.pname)


def expert_weights(layer_index: int, layer: nn.Module, prefix: str) -> dict[str, ExpertWeight]:
    """``{qualified name: ExpertWeight}`` of one decoder layer's fused experts (empty for a dense
    layer), named ``<prefix>.<i>.mlp.experts.<e>.<gate_up_proj|down_proj>``."""
    block = getattr(layer, "mlp", None)
    if block is None or not hasattr(block, "experts") or not hasattr(block, "gate"):
        return {}
    experts = block.experts
    n = int(experts.gate_up_proj.shape[0])
    return {
        f"{prefix}.{layer_index}.mlp.experts.{e}.{p}": ExpertWeight(experts, p, e)
        for e in range(n)
        for p in FUSED
    }


def is_router(name: str, module: nn.Module) -> bool:
    """Routing weights that stay dense: a router module, or Qwen2-MoE's ``shared_expert_gate``."""
    return name.endswith("shared_expert_gate") or (
        name.endswith(".gate") and not isinstance(module, nn.Linear)
    )


def expert_hook(entries: dict[str, ExpertWeight], stats: dict, needs: frozenset[str]):
    """A forward hook (with kwargs) on an experts module that adds, for every listed expert
    weight, the input statistics of the tokens routed to its expert (see the module docstring)."""
    by_e: dict[int, dict[str, str]] = {}
    for name, w in entries.items():
        by_e.setdefault(w.e, {})[w.pname] = name

    def fn(module: nn.Module, args: tuple, kwargs: dict, out) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        x_all = hidden.detach().reshape(-1, hidden.shape[-1])
        gate_up = module.gate_up_proj
        E = gate_up.shape[0]
        onehot = torch.zeros(index.shape[0], E + 1, dtype=torch.bool, device=index.device)
        onehot.scatter_(1, index.clamp(max=E), True)  # a token's k experts (a sentinel column for >= E)
        for e, names in by_e.items():
            tokens = onehot[:, e].nonzero().flatten()
            x = x_all[tokens].float()
            if "gate_up_proj" in names:
                accumulate(stats[names["gate_up_proj"]], x, needs)
            if "down_proj" in names:
                h = (
                    module._apply_gate(x.to(gate_up.dtype) @ gate_up[e].T)
                    if len(tokens)
                    else x.new_zeros(0, module.down_proj.shape[-1])
                )
                accumulate(stats[names["down_proj"]], h.float(), needs)

    return fn
