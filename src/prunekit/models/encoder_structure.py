"""Dependency groups of encoder layers (ViT, DeiT, DINOv2, CLIP vision and text towers, BERT), and
the surgery that removes them.

An encoder layer's prunable units (weights are ``(out, in)``; ``d`` = head dim, ``H`` = hidden):

- **head** ``h``: rows ``[h*d, (h+1)*d)`` of the query, key and value projections and of their
  biases, and the same columns of the attention output projection;
- **MLP channel** ``j``: row ``j`` of the MLP input Linear (``fc1`` / BERT's ``intermediate.dense``)
  and of its bias, column ``j`` of the MLP output Linear (``fc2`` / BERT's ``output.dense``).

Multi-head attention only (every family here has as many key/value heads as query heads): a head
is one unit, its cost ``4 H d`` weights; a channel costs ``2 H``. The modules per family:

=================  ==========================================  ===================  =========================
family             q / k / v / output projection               MLP in / out         head count attribute(s)
=================  ==========================================  ===================  =========================
vit, deit, dinov2  ``attention.{q,k,v,o}_proj``                ``mlp.fc1/fc2``      ``num_attention_heads``
clip (both)        ``self_attn.{q,k,v,out}_proj``              ``mlp.fc1/fc2``      ``num_heads``
bert               ``attention.self.{query,key,value}``,       ``intermediate.``    ``num_attention_heads``,
                   ``attention.output.dense``                  / ``output.dense``   ``all_head_size``
=================  ==========================================  ===================  =========================

In transformers 5 every one of these attentions reshapes with ``view(..., -1, head_dim)`` and
flattens back with ``reshape(..., -1)``, so a layer with fewer heads runs unchanged; the head-count
attributes are updated anyway (they are read by other code, e.g. prunekit's token pruning).
DINOv2's ``layer_scale1/2`` (a per-channel ``lambda`` after the output projection and after
``fc2``) are not pruned (the residual width stays); they scale the output projections' rows, which
the scoring reads (:func:`output_weights`). DINOv2's SwiGLU MLP (``use_swiglu_ffn``) and BERT with
cross-attention (``add_cross_attention``) are refused.

Masks first, surgery last, as for decoders (:mod:`prunekit.models.structure`):
:func:`encoder_masks` names the tensors and keep masks, :func:`shrink_encoder_layer` slices them
out; a removed head's q/k/v rows are zero (its attention output is zero) and its output-projection
columns are zero, so masked and sliced layers compute the same function. Every layer keeps at least
one head (a zero-head ``view(..., -1, d)`` of an empty tensor is ambiguous).

Checkpoints: :func:`record_encoder` writes each layer's widths into the tower's config as
``prunekit_encoder_structure`` (for a CLIP tower pruned inside a ``CLIPModel`` that is the shared
``vision_config`` / ``text_config``); :func:`resize_encoders` gives a freshly built model those
widths before ``prunekit.load_pruned`` loads the safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .structure import LayerGeometry, LayerKeep, _fresh, _rows, _set, _vector

RECORD = "prunekit_encoder_structure"
LAYER_PATHS = ("layers", "layer", "encoder.layers", "encoder.layer")


@dataclass(frozen=True)
class EncoderNames:
    """Attribute paths inside one encoder layer."""

    q: str
    k: str
    v: str
    o: str
    fc1: str
    fc2: str
    heads: tuple[str, ...]  # attributes holding the head count
    head_dim: str  # attribute holding the head dim
    all_head: str | None = None  # attribute holding heads * head_dim (BERT)
    layer_scale: tuple[str | None, str | None] = (None, None)  # (after attention, after MLP)


VIT = EncoderNames(
    q="attention.q_proj", k="attention.k_proj", v="attention.v_proj", o="attention.o_proj", fc1="mlp.fc1",
    fc2="mlp.fc2", heads=("attention.num_attention_heads",), head_dim="attention.head_dim",
)  # fmt: skip
DINOV2 = EncoderNames(**{**VIT.__dict__, "layer_scale": ("layer_scale1.lambda1", "layer_scale2.lambda1")})
CLIP = EncoderNames(
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj", fc1="mlp.fc1",
    fc2="mlp.fc2", heads=("self_attn.num_heads",), head_dim="self_attn.head_dim",
)  # fmt: skip
BERT = EncoderNames(
    q="attention.self.query", k="attention.self.key", v="attention.self.value", o="attention.output.dense",
    fc1="intermediate.dense", fc2="output.dense", heads=("attention.self.num_attention_heads",),
    head_dim="attention.self.attention_head_size", all_head="attention.self.all_head_size",
)  # fmt: skip

#: model_type -> (names, modality: "image" takes pixel_values, "text" takes input_ids)
FAMILIES: dict[str, tuple[EncoderNames, str]] = {
    "vit": (VIT, "image"),
    "deit": (VIT, "image"),
    "dinov2": (DINOV2, "image"),
    "clip_vision_model": (CLIP, "image"),
    "clip_text_model": (CLIP, "text"),
    "bert": (BERT, "text"),
}


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(obj, path: str, value) -> None:
    *parent, last = path.split(".")
    setattr(_get(obj, ".".join(parent)) if parent else obj, last, value)


@dataclass
class EncoderStack:
    """One encoder tower: the module owning it (with its ``config``), its layers, names, modality."""

    owner: nn.Module
    config: object
    layers: nn.ModuleList
    names: EncoderNames
    modality: str

    @property
    def family(self) -> str:
        return self.config.model_type


def _stacks(model: nn.Module) -> list[tuple[nn.Module, nn.ModuleList]]:
    """Every module with a ``config`` that owns a layer list (at one of :data:`LAYER_PATHS`)."""
    out, seen = [], set()
    for mod in model.modules():
        if getattr(mod, "config", None) is None or not hasattr(mod.config, "model_type"):
            continue
        for path in LAYER_PATHS:
            try:
                layers = _get(mod, path)
            except AttributeError:
                continue
            if isinstance(layers, nn.ModuleList) and len(layers) and id(layers) not in seen:
                seen.add(id(layers))
                out.append((mod, layers))
                break
    return out


def is_encoder(model: nn.Module) -> bool:
    """Whether structured pruning should take the encoder path for ``model``."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) in (*FAMILIES, "clip")


def encoder_stack(model: nn.Module) -> EncoderStack:
    """The one encoder tower of ``model``; a model with two (a full ``CLIPModel``) or none raises
    ``UnsupportedModelError`` naming what to pass instead."""
    found = [(o, la) for o, la in _stacks(model) if o.config.model_type in FAMILIES]
    if len(found) > 1:
        kinds = sorted({o.config.model_type for o, _ in found})
        raise UnsupportedModelError(
            f"{type(model).__name__} holds {len(found)} encoder towers ({', '.join(kinds)}); structured "
            "pruning prunes one: pass model.vision_model or model.text_model (the widths go into the shared "
            "vision_config / text_config, so saving the whole model keeps them)"
        )
    if not found:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type {mt!r}): no encoder layers found; encoder structured "
            f"pruning supports {sorted(FAMILIES)}"
        )
    owner, layers = found[0]
    names, modality = FAMILIES[owner.config.model_type]
    for i, layer in enumerate(layers):
        if getattr(layer, "crossattention", None) is not None:
            raise UnsupportedModelError(f"{owner.config.model_type}: layer {i} has cross-attention")
        for path in (names.q, names.k, names.v, names.o, names.fc1, names.fc2):
            try:
                lin = _get(layer, path)
            except AttributeError:
                lin = None
            if not isinstance(lin, nn.Linear):
                what = type(_get(layer, path.rsplit(".", 1)[0])).__name__ if "." in path else "?"
                raise UnsupportedModelError(
                    f"{owner.config.model_type}: layer {i} has no nn.Linear {path!r} (module {what}); "
                    "structured pruning supports the plain fc1/fc2 MLP (not DINOv2's SwiGLU)"
                )
    return EncoderStack(owner, owner.config, layers, names, modality)


def linears(layer: nn.Module, names: EncoderNames) -> dict[str, nn.Linear]:
    return {k: _get(layer, getattr(names, k)) for k in ("q", "k", "v", "o", "fc1", "fc2")}


def encoder_geometry(layer: nn.Module, names: EncoderNames) -> LayerGeometry:
    """Widths of an encoder layer, read from its weights (``n_kv = n_q``: MHA)."""
    lin = linears(layer, names)
    d = _get(layer, names.head_dim)
    if not isinstance(d, int) or d < 1:
        raise UnsupportedModelError(f"{type(layer).__name__}: {names.head_dim} is not a positive int ({d!r})")
    n = lin["q"].out_features // d
    if lin["k"].out_features != n * d or lin["v"].out_features != n * d or lin["o"].in_features != n * d:
        raise UnsupportedModelError(f"{type(layer).__name__}: q/k/v/output widths differ (not MHA)")
    return LayerGeometry(lin["o"].out_features, d, n, n, lin["fc2"].in_features, mlp_mats=2)


def output_weights(layer: nn.Module, names: EncoderNames) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights writing each unit into the residual stream: the output projection and ``fc2``,
    rows scaled by DINOv2's layer scale ``lambda`` where there is one (``diag(lambda) W``)."""
    lin = linears(layer, names)
    out = []
    for key, scale in zip(("o", "fc2"), names.layer_scale, strict=True):
        W = lin[key].weight.detach()
        if scale is not None:
            W = W * _get(layer, scale).detach()[:, None].to(W.dtype)
        out.append(W)
    return out[0], out[1]


def check_encoder_keep(keep: LayerKeep, geo: LayerGeometry, where: str = "") -> None:
    """Refuse what an encoder layer cannot run: removing it, no head, no channel, or uneven q/kv."""
    if keep.removed:
        raise ValueError(f"{where}: encoder structured pruning removes heads and channels, not layers")
    if keep.q_heads is not None:
        q = keep.q_heads.tolist()
        if not q:
            raise ValueError(f"{where}: every head would go; an encoder layer keeps at least one")
        if q != sorted(set(q)) or q[0] < 0 or q[-1] >= geo.n_q:
            raise ValueError(f"{where}: kept heads must be ascending, distinct, in [0, {geo.n_q}); got {q}")
        if keep.kv_heads is not None and keep.kv_heads.tolist() != q:
            raise ValueError(f"{where}: multi-head attention keeps the same query and key/value heads")
    if keep.channels is not None and len(keep.channels) == 0:
        raise ValueError(f"{where}: every MLP channel would go; an encoder layer keeps at least one")


def encoder_masks(
    layer: nn.Module, names: EncoderNames, keep: LayerKeep
) -> list[tuple[nn.Linear, str, torch.Tensor]]:
    """``(Linear, "weight" or "bias", keep mask)`` for every tensor of the layer that loses units;
    ``(out, 1)`` masks rows, ``(1, in)`` columns."""
    geo = encoder_geometry(layer, names)
    lin = linears(layer, names)
    out: list[tuple[nn.Linear, str, torch.Tensor]] = []
    dev = lin["o"].weight.device
    qh = None if keep.q_heads is None else _rows(keep.q_heads, geo.head_dim)
    head_vec = _vector(geo.n_q * geo.head_dim, qh, dev)
    ch_vec = _vector(geo.inter, keep.channels, lin["fc2"].weight.device)
    for vec, row_mods, col_mod in ((head_vec, ("q", "k", "v"), "o"), (ch_vec, ("fc1",), "fc2")):
        if bool(vec.all()):
            continue
        for key in row_mods:
            out.append((lin[key], "weight", vec[:, None]))
            if lin[key].bias is not None:
                out.append((lin[key], "bias", vec))
        out.append((lin[col_mod], "weight", vec[None, :]))
    return out


def _add_bias(lin: nn.Linear, extra: torch.Tensor | None) -> torch.Tensor | None:
    if extra is None:
        return lin.bias
    extra = extra.to(device=lin.weight.device, dtype=torch.float32)
    total = extra if lin.bias is None else lin.bias.detach().float() + extra
    return total.to(lin.weight.dtype)


def shrink_encoder_layer(layer: nn.Module, names: EncoderNames, keep: LayerKeep) -> None:
    """Physically remove what ``keep`` drops from one (unmasked) encoder layer, add the compensation
    biases (``o_bias`` into the output projection, ``down_bias`` into ``fc2``), update the head counts."""
    geo = encoder_geometry(layer, names)
    check_encoder_keep(keep, geo)
    lin = linears(layer, names)
    d = geo.head_dim
    with torch.no_grad():
        heads = keep.q_heads if keep.q_heads is not None else torch.arange(geo.n_q)
        rows = _rows(heads.to(lin["o"].weight.device), d)
        for key in ("q", "k", "v"):
            m = lin[key]
            idx = rows.to(m.weight.device)
            _set(m, m.weight[idx], None if m.bias is None else m.bias[idx])
        o = lin["o"]
        _set(o, o.weight[:, rows.to(o.weight.device)], _add_bias(o, keep.o_bias))
        ch = keep.channels if keep.channels is not None else torch.arange(geo.inter)
        f1, f2 = lin["fc1"], lin["fc2"]
        idx = ch.to(f1.weight.device)
        _set(f1, f1.weight[idx], None if f1.bias is None else f1.bias[idx])
        _set(f2, f2.weight[:, ch.to(f2.weight.device)], _add_bias(f2, keep.down_bias))
    _set_counts(layer, names, len(heads), d)


def _set_counts(layer: nn.Module, names: EncoderNames, n: int, d: int) -> None:
    for path in names.heads:
        _set_attr(layer, path, n)
    if names.all_head is not None:
        _set_attr(layer, names.all_head, n * d)


# ------------------------------------------------------------------ checkpoints
def record_encoder(stack: EncoderStack) -> list[dict]:
    """Each layer's widths and bias flags (what :func:`resize_encoders` needs)."""
    out = []
    for layer in stack.layers:
        geo = encoder_geometry(layer, stack.names)
        lin = linears(layer, stack.names)
        out.append({
            "num_attention_heads": geo.n_q,
            "intermediate_size": geo.inter,
            "o_bias": lin["o"].bias is not None,
            "fc2_bias": lin["fc2"].bias is not None,
        })  # fmt: skip
    return out


def resize_encoders(model: nn.Module) -> int:
    """Give every encoder tower of a freshly built ``model`` whose config holds a record the
    recorded per-layer widths (weights about to be loaded); returns how many towers were resized."""
    n = 0
    for owner, layers in _stacks(model):
        spec = getattr(owner.config, RECORD, None)
        if spec is None:
            continue
        mt = owner.config.model_type
        if mt not in FAMILIES:
            raise UnsupportedModelError(f"{RECORD} on a {mt!r} config; encoder families: {sorted(FAMILIES)}")
        names = FAMILIES[mt][0]
        if len(spec) != len(layers):
            raise ValueError(f"{RECORD} describes {len(spec)} layers; the {mt} config builds {len(layers)}")
        for i, (layer, s) in enumerate(zip(layers, spec, strict=True)):
            geo = encoder_geometry(layer, names)
            lin = linears(layer, names)
            nh, inter, H, d = s["num_attention_heads"], s["intermediate_size"], geo.hidden, geo.head_dim
            if nh < 1 or inter < 1:
                raise ValueError(f"{mt} layer {i}: {nh} heads and {inter} channels recorded; need >= 1 each")
            new = {
                "q": _fresh(lin["q"], nh * d, H, lin["q"].bias is not None),
                "k": _fresh(lin["k"], nh * d, H, lin["k"].bias is not None),
                "v": _fresh(lin["v"], nh * d, H, lin["v"].bias is not None),
                "o": _fresh(lin["o"], H, nh * d, s["o_bias"]),
                "fc1": _fresh(lin["fc1"], inter, H, lin["fc1"].bias is not None),
                "fc2": _fresh(lin["fc2"], H, inter, s["fc2_bias"]),
            }
            for key, mod in new.items():
                _set_attr(layer, getattr(names, key), mod)
            _set_counts(layer, names, nh, d)
        n += 1
    return n
