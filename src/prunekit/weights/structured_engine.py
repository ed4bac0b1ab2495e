"""Structured pruning through ``prune_weights``: calibrate, plan, mask reversibly, then slice.

- **Sparsity** is the fraction of the *prunable parameters* removed: the weights of ``q_proj``,
  ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj`` and ``down_proj`` of every decoder
  layer. Embeddings, ``lm_head``, norms and biases are not counted (nor removed).
- **Masks**: removed units are zeroed by parametrizations (``W * keep``, rows or columns), and
  a compensation bias is added by a forward hook; a method's replacement weights for ``o_proj`` /
  ``down_proj`` (``LayerKeep.o_weight`` / ``down_weight``: Týr's updated kept weights) are a
  further parametrization that returns the stored tensor; ``restore()`` removes them all.
- **Own pipelines**: a method that defines :meth:`StructuredMethod.run` (one that runs the model
  itself, as Týr's supernet and search) gets the calibration ids and returns every layer's keep.
- **finalize()**: slices the tensors (``models.structure.shrink_layer``), deletes removed
  layers, sets ``num_key_value_groups`` per layer, and writes each layer's widths into
  ``config.prunekit_structure`` so ``model.save_pretrained`` makes a checkpoint that
  ``prunekit.load_pruned`` rebuilds (uniform widths without added biases also go into the
  global config fields, for plain ``from_pretrained``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import __version__
from ..errors import PrunekitError
from ..models.structure import (
    ATTN,
    LayerKeep,
    check_keep,
    decoder_stack,
    geometry,
    layer_masks,
    record,
    remove_layers,
    set_uniform_config,
    shrink_layer,
)
from .calibration import LayerInputs, calibration_ids, layer0_inputs, loss_gradients
from .engine import JSONReport, WeightPruning, _Keep, run_pruning
from .structured import LayerData, StructuredMethod, check_sparsity


@dataclass
class LayerReport:
    """What one decoder layer kept (indices are the original units')."""

    layer: int
    removed: bool
    q_heads: list[int]
    kv_heads: list[int]
    channels: int  # MLP channels kept
    channels_before: int
    params_before: int
    params_after: int
    o_bias: bool = False
    down_bias: bool = False


@dataclass
class StructuredReport(JSONReport):
    """What a structured :func:`prune_weights` removed. ``to_dict`` is one JSON line."""

    model: str
    method: str
    config: str
    sparsity: float
    calibration_tokens: int
    pattern: str = "structured"
    allocation: str = ""
    seconds: float = 0.0
    peak_memory_bytes: float = float("nan")
    memory_how: str = ""
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def params_targeted(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_pruned(self) -> int:
        return sum(r.params_before - r.params_after for r in self.layers)

    @property
    def layer_sparsity(self) -> list[float]:
        return [1 - r.params_after / r.params_before for r in self.layers]

    def __str__(self) -> str:
        gone = sum(r.removed for r in self.layers)
        return (
            f"{self.method} (structured) at {self.sparsity:g} on {self.model}: {self.params_pruned:,} of "
            f"{self.params_targeted:,} prunable weights removed "
            f"({self.params_pruned / max(self.params_targeted, 1):.1%}), {gone} layers removed, "
            f"in {self.seconds:.1f} s"
        )


class _AddBias(nn.Module):
    """A forward hook's payload: ``out + bias``."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = bias

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return out + self.bias.to(device=out.device, dtype=out.dtype)


class _Replace(nn.Module):
    """The parametrization ``W -> stored`` (a method's updated weight, same shape)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        return self.weight.to(W.dtype)


class StructuredPruning(WeightPruning):
    """Reversible structured masks: ``restore()`` gives back the model exactly; ``finalize()``
    physically removes the masked units (and layers) and records the widths in the config."""

    def __init__(self, model: nn.Module, report: StructuredReport) -> None:
        super().__init__(model, report)  # type: ignore[arg-type]
        self.keeps: dict[int, LayerKeep] = {}
        self._params: list[tuple[nn.Linear, str]] = []
        self._hooks: list = []

    def apply(self, i: int, layer: nn.Module, keep: LayerKeep) -> None:
        """Mask layer ``i`` as ``keep`` says (and add its compensation biases by hooks)."""
        geo = geometry(layer)
        check_keep(keep, geo, f"layer {i}")
        if not keep.removed:  # replacement weights first, so the masks apply on top
            for lin, w in ((layer.self_attn.o_proj, keep.o_weight), (layer.mlp.down_proj, keep.down_weight)):
                if w is not None and isinstance(lin, nn.Linear):
                    if tuple(w.shape) != tuple(lin.weight.shape):
                        raise ValueError(
                            f"layer {i}: a replacement weight of shape {tuple(w.shape)} for a weight of "
                            f"shape {tuple(lin.weight.shape)}"
                        )
                    rep = _Replace(w.detach().to(device=lin.weight.device, dtype=lin.weight.dtype))
                    parametrize.register_parametrization(lin, "weight", rep)
                    self._params.append((lin, "weight"))
        for lin, pname, mask in layer_masks(layer, keep):
            parametrize.register_parametrization(lin, pname, _Keep(mask))
            self._params.append((lin, pname))
        if not keep.removed:
            for lin, b in ((layer.self_attn.o_proj, keep.o_bias), (layer.mlp.down_proj, keep.down_bias)):
                if b is not None:
                    self._hooks.append(lin.register_forward_hook(_AddBias(b.to(lin.weight.device))))
        self.keeps[i] = keep
        q, _, c = keep.counts(geo)
        all_q = list(range(geo.n_q)) if keep.q_heads is None else keep.q_heads.tolist()
        all_kv = list(range(geo.n_kv)) if keep.kv_heads is None else keep.kv_heads.tolist()
        self.report.layers.append(
            LayerReport(
                layer=i, removed=keep.removed, q_heads=[] if keep.removed else all_q,
                kv_heads=[] if keep.removed or not q else all_kv, channels=c, channels_before=geo.inter,
                params_before=geo.params, params_after=keep.params_after(geo),
                o_bias=keep.o_bias is not None and not keep.removed,
                down_bias=keep.down_bias is not None and not keep.removed,
            )
        )  # fmt: skip

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        if self.state != "pruned":
            raise PrunekitError(f"the masks are gone: this pruning was {self.state}")
        names = {id(m): n for n, m in self.model.named_modules()}
        out = {}
        for lin, pname in self._params:
            p = next((q for q in getattr(lin.parametrizations, pname) if isinstance(q, _Keep)), None)
            if p is not None:
                out[f"{names.get(id(lin), '?')}.{pname}"] = p.keep
        return out

    def _unmask(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for lin, pname in self._params:
            if parametrize.is_parametrized(lin, pname):
                parametrize.remove_parametrizations(lin, pname, leave_parametrized=False)
        self._params.clear()

    def restore(self) -> None:
        if self.state == "finalized":
            raise PrunekitError("finalize() made this pruning permanent; it cannot be restored")
        self._unmask()
        self.keeps.clear()
        self.state = "restored"

    def finalize(self) -> StructuredReport:  # type: ignore[override]
        """Slice out every masked unit, delete removed layers, record widths in the config."""
        if self.state != "pruned":
            raise PrunekitError(f"nothing to finalize: this pruning was {self.state}")
        self._unmask()
        stack, layers = decoder_stack(self.model)
        drop = []
        for i, keep in sorted(self.keeps.items()):
            if keep.removed:
                drop.append(i)
            else:
                shrink_layer(layers[i], keep)
        remove_layers(self.model, drop)
        spec = record(self.model)
        head_dim = geometry(decoder_stack(self.model)[1][0]).head_dim if spec else 0
        cfg = getattr(stack, "config", None)
        for c in {id(x): x for x in (cfg, getattr(self.model, "config", None)) if x is not None}.values():
            c.prunekit_structure = spec
            c.prunekit = {"method": self.report.method, "version": __version__}
        if cfg is not None:
            cfg.prunekit_uniform = set_uniform_config(cfg, spec, head_dim)
        self.state = "finalized"
        return self.report  # type: ignore[return-value]


def _stats(
    layer: nn.Module, inputs: LayerInputs, needs: frozenset[str], keep_outputs: bool, final_norm=None
) -> tuple[dict, list[torch.Tensor] | None]:
    """Run ``layer`` on every batch gathering sums of x and x^2 of its o_proj / down_proj inputs
    (``activations``), its Block Influence (``influence``) and its mean angular distance per token
    (``angular``)."""
    acc: dict = {"n": 0, "influence": 0.0, "angular": 0.0, "n_angular": 0}

    def hook(which: str):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if which == "attn":
                acc["n"] += x.shape[0]
            acc[f"{which}_sum"] = acc.get(f"{which}_sum", 0) + x.sum(0)
            acc[f"{which}_sq"] = acc.get(f"{which}_sq", 0) + (x * x).sum(0)

        return fn

    handles = []
    if "activations" in needs:
        handles = [
            layer.self_attn.o_proj.register_forward_hook(hook("attn")),
            layer.mlp.down_proj.register_forward_hook(hook("mlp")),
        ]
    want = keep_outputs or bool({"influence", "angular"} & needs)
    try:
        outs = inputs.run(layer, want)
    finally:
        for h in handles:
            h.remove()
    if "influence" in needs:
        for h_in, h_out in zip(inputs.hidden, outs, strict=True):
            if final_norm is not None:
                h_out = final_norm(h_out)
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            acc["influence"] += float(torch.nan_to_num(1.0 - cos, nan=0.5).sum())
    if "angular" in needs:
        for h_in, h_out in zip(inputs.hidden, outs, strict=True):
            cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
            ang = torch.nan_to_num(cos.clamp(-1.0, 1.0).arccos() / math.pi, nan=0.5)
            acc["angular"] += float(ang.sum())
            acc["n_angular"] += ang.numel()
    return acc, (outs if keep_outputs else None)


def taylor_saliences(
    model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int, progress: bool = True
) -> list[dict[str, torch.Tensor]]:
    """LLM-Pruner's first-order Taylor salience ``|w * dL/dw|`` (``param_first``), ``L`` the LM loss
    of the dense model, its gradient summed over calibration batches, reduced per unit of each
    decoder layer: ``{"heads": (n_q,) q rows + o columns of each query head, "kv": (n_kv,) k and v
    rows of each KV head, "channels": (I,) gate and up rows + down column}`` (fp64, CPU)."""

    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    mods = [{n: getattr(layer.self_attn if n in ATTN else layer.mlp, n) for n in names} for layer in layers]
    params = [mod[n].weight for mod in mods for n in names]
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for step in loss_gradients(model, params, ids.split(batch_size), "taylor", progress):
        for acc, g in zip(grads, step, strict=True):
            acc += g.float()
    out, it = [], iter(zip(params, grads, strict=True))
    for layer in layers:
        sal = {n: (w.detach().double() * g.double()).abs() for n, (w, g) in zip(names, it, strict=False)}
        geo = geometry(layer)
        d = geo.head_dim
        heads = sal["q_proj"].sum(1) + sal["o_proj"].sum(0)
        kv = sal["k_proj"].sum(1) + sal["v_proj"].sum(1)
        out.append({
            "heads": heads.reshape(geo.n_q, d).sum(-1).cpu(),
            "kv": kv.reshape(geo.n_kv, d).sum(-1).cpu(),
            "channels": (sal["gate_proj"].sum(1) + sal["up_proj"].sum(1) + sal["down_proj"].sum(0)).cpu(),
        })  # fmt: skip
    return out


def _data(layer: nn.Module, acc: dict | None) -> LayerData:
    geo = geometry(layer)
    mlp = layer.mlp
    d = LayerData(geo, layer.self_attn.o_proj.weight.detach(), mlp.down_proj.weight.detach())
    d.up_weight, d.gate_weight = mlp.up_proj.weight.detach(), mlp.gate_proj.weight.detach()
    if acc:
        d.n_tokens = acc["n"]
        for k in ("attn_sum", "attn_sq", "mlp_sum", "mlp_sq"):
            if k in acc:
                setattr(d, k, acc[k].cpu())
        d.influence = acc["influence"]
        d.angular = acc["angular"] / max(acc["n_angular"], 1)
    return d


def prune_structured(
    model: nn.Module,
    m: StructuredMethod,
    sparsity,
    *,
    calibration=None,
    tokenizer=None,
    n_samples: int = 16,
    seq_len: int = 512,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> StructuredPruning:
    """Structured pruning of a causal LM's decoder layers; see :func:`prunekit.prune_weights`.
    Encoders (ViT, DeiT, DINOv2, CLIP towers, BERT) go to
    :func:`prunekit.weights.structured_encoder.prune_encoder`."""
    from tqdm.auto import tqdm

    from ..models.encoder_structure import is_encoder

    if is_encoder(model):
        from .structured_encoder import prune_encoder

        return prune_encoder(
            model, m, sparsity, calibration=calibration, tokenizer=tokenizer, n_samples=n_samples,
            seq_len=seq_len, batch_size=batch_size, seed=seed, progress=progress,
        )  # fmt: skip

    s = check_sparsity(0.5 if sparsity is None else sparsity)
    stack, layers = decoder_stack(model)
    m.check([geometry(layer) for layer in layers])  # unsupported layouts fail here, before any work
    for layer in layers:
        if any(parametrize.is_parametrized(mod) for mod in layer.modules()):
            raise PrunekitError(
                "the model is already masked; restore() or finalize() the earlier pruning first"
            )
    ids = calibration_ids(tokenizer, calibration, n_samples, seq_len, seed) if m.needs else None
    report = StructuredReport(
        model=type(model).__name__, method=m.name, config=repr(m), sparsity=s,
        calibration_tokens=0 if ids is None else ids.numel(),
        allocation="search" if getattr(m, "run", None) else "sequential" if m.sequential else "global",
    )  # fmt: skip
    handle = StructuredPruning(model, report)

    def work() -> None:
        if getattr(m, "run", None) is not None:  # a method with its own pipeline (Týr)
            with torch.no_grad():
                keeps = m.run(model, layers, ids, s, batch_size=batch_size, seed=seed, progress=progress)
            for i, (layer, keep) in enumerate(zip(layers, keeps, strict=True)):
                handle.apply(i, layer, keep)
            return
        taylor = taylor_saliences(model, layers, ids, batch_size, progress) if "taylor" in m.needs else None
        layer_needs = m.needs - {"taylor"}
        with torch.no_grad():
            if not layer_needs:
                data = [_data(layer, None) for layer in layers]
                for d, t in zip(data, taylor or [None] * len(data), strict=True):
                    d.taylor = t
                keeps = m.plan(data, s)
            else:
                inputs = layer0_inputs(model, layers, ids, batch_size)
                data, keeps = [], []
                # ShortGPT faithful: the last layer's output after the final norm (hidden_states[-1])
                official = "influence" in layer_needs and getattr(m, "faithful", False)
                norm = getattr(stack, "norm", None) if official else None
                for i, layer in enumerate(tqdm(layers, desc=m.name, disable=not progress, leave=False)):
                    inp = inputs.at(i)
                    last = norm if i == len(layers) - 1 else None
                    acc, outs = _stats(
                        layer, inp, layer_needs, keep_outputs=not m.sequential, final_norm=last
                    )
                    data.append(_data(layer, acc))
                    if m.sequential:
                        keeps.append(m.plan_layer(i, data[-1], s))
                        handle.apply(i, layer, keeps[-1])
                        outs = inp.run(layer)  # the pruned layer feeds the next
                    inputs = inputs.then(outs)
                if m.sequential:
                    return
                keeps = m.plan(data, s)
            for i, (layer, keep) in enumerate(zip(layers, keeps, strict=True)):
                handle.apply(i, layer, keep)

    return run_pruning(model, handle, work)
