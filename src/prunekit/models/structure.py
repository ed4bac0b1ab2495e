"""Dependency groups of decoder layers, and the surgery that removes them (Llama, Qwen2, Mistral,
Gemma-3; the language model inside a VLM).

A decoder layer's prunable units (weights are ``(out, in)``; ``d`` = head dim, ``H`` = hidden):

- **query head** ``h``: rows ``[h*d, (h+1)*d)`` of ``q_proj`` (and its bias: Qwen2) and the same
  columns of ``o_proj``;
- **KV group** ``k``: KV head ``k`` (its rows of ``k_proj``/``v_proj`` and their biases) with its
  ``g = n_q / n_kv`` query heads ``[k*g, (k+1)*g)``;
- **MLP channel** ``j``: row ``j`` of ``gate_proj`` and ``up_proj``, column ``j`` of ``down_proj``;
- **attention alone**, **MLP alone**, or the **whole layer**.

GQA (transformers 5): attention reshapes with ``view(..., -1, head_dim)`` and query head ``i``
reads KV head ``i // num_key_value_groups``, a per-module attribute. So a legal result keeps, in
every layer, the same number of query heads in each kept KV group, in kv-major order, and sets
``self_attn.num_key_value_groups`` per layer; :func:`check_keep` refuses anything else.

Masks first, surgery last: :func:`layer_masks` names the tensors and keep masks that zero the
removed units (reversibly, as parametrizations), :func:`shrink_layer` slices them out for good.
The masked and the sliced layer compute the same function: a removed query head's ``o_proj``
columns are zero, so it adds exactly nothing; a removed layer's ``o_proj`` and ``down_proj`` are
zero, so it is the identity on the residual stream.

Checkpoints: :func:`record` writes each layer's widths into ``config.prunekit_structure``; the
loader (:func:`prunekit.load_pruned`) resizes a freshly built model with :func:`resize` before
loading the safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .compat import cache_of
from .decoder import decoder_layers

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LayerGeometry:
    """Widths of one decoder layer, read from its weights."""

    hidden: int
    head_dim: int
    n_q: int
    n_kv: int
    inter: int
    mlp_mats: int = 3  # weight matrices an MLP channel spans: 3 (gate, up, down); 2 (fc1, fc2) in encoders

    @property
    def channel_cost(self) -> int:
        """Weights of one MLP channel."""
        return self.mlp_mats * self.hidden

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_q // self.n_kv if self.n_kv else 0

    @property
    def params(self) -> int:
        """Prunable weights: q, k, v, o, gate, up, down (fc1, fc2 in encoders; biases, norms not counted)."""
        return 2 * (self.n_q + self.n_kv) * self.hidden * self.head_dim + self.channel_cost * self.inter


@dataclass
class LayerKeep:
    """What one decoder layer keeps. Index tensors are into the layer's units before pruning;
    ``None`` keeps them all; an empty ``q_heads`` removes the attention, an empty ``channels`` the
    MLP. ``o_bias``/``down_bias`` (``(H,)``) are added to ``o_proj``/``down_proj`` outputs (bias
    compensation, FLAP). ``o_weight``/``down_weight`` (full shapes ``(H, n_q*d)``/``(H, I)``, zeros in
    the removed columns) replace ``o_proj``/``down_proj``'s weights: methods that update the kept
    weights (Týr's OBS update and refit)."""

    q_heads: torch.Tensor | None = None  # kept query heads, ascending (kv-major)
    kv_heads: torch.Tensor | None = None  # kept KV heads, ascending
    channels: torch.Tensor | None = None  # kept MLP channels, ascending
    removed: bool = False  # the whole layer goes
    o_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    o_weight: torch.Tensor | None = None
    down_weight: torch.Tensor | None = None

    def counts(self, geo: LayerGeometry) -> tuple[int, int, int]:
        """``(query heads, KV heads, MLP channels)`` kept."""
        if self.removed:
            return 0, 0, 0
        q = geo.n_q if self.q_heads is None else len(self.q_heads)
        kv = geo.n_kv if self.kv_heads is None else len(self.kv_heads)
        c = geo.inter if self.channels is None else len(self.channels)
        return q, (kv if q else 0), c

    def params_after(self, geo: LayerGeometry) -> int:
        q, kv, c = self.counts(geo)
        return 2 * (q + kv) * geo.hidden * geo.head_dim + geo.channel_cost * c


def _linear(mod: nn.Module, name: str) -> nn.Linear:
    lin = getattr(mod, name, None)
    if not isinstance(lin, nn.Linear):
        raise UnsupportedModelError(
            f"{type(mod).__name__} has no nn.Linear {name!r}: structured pruning supports Llama, Qwen2, "
            "Mistral and Gemma-3 decoder layers (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj)"
        )
    return lin


def geometry(layer: nn.Module) -> LayerGeometry:
    """The widths of a decoder layer; an unsupported layout raises UnsupportedModelError."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        raise UnsupportedModelError(
            f"{type(layer).__name__} has no self_attn/mlp: structured pruning supports Llama, Qwen2, "
            "Mistral and Gemma-3 decoder layers"
        )
    down = _linear(mlp, "down_proj")
    for name in ("gate_proj", "up_proj"):
        _linear(mlp, name)
    if isinstance(attn, NoAttention):
        return LayerGeometry(down.out_features, attn.head_dim, 0, 0, down.in_features)
    q, k = _linear(attn, "q_proj"), _linear(attn, "k_proj")
    _linear(attn, "v_proj")
    o = _linear(attn, "o_proj")
    d = getattr(attn, "head_dim", None)
    if not isinstance(d, int):
        raise UnsupportedModelError(f"{type(attn).__name__} has no integer head_dim")
    return LayerGeometry(o.out_features, d, q.out_features // d, k.out_features // d, down.in_features)


def decoder_stack(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """``(the module holding embed_tokens/layers/norm, its layers)``."""
    prefix, layers = decoder_layers(model)
    parent = prefix.rsplit(".", 1)[0] if "." in prefix else ""
    return (model.get_submodule(parent) if parent else model), layers


def check_keep(keep: LayerKeep, geo: LayerGeometry, where: str = "") -> None:
    """Refuse a keep that transformers' attention cannot run: every kept KV head must keep the
    same number of query heads, each reading its own KV head (kv-major)."""
    if keep.removed or keep.q_heads is None:
        if keep.kv_heads is not None and not keep.removed and len(keep.kv_heads) != geo.n_kv:
            raise ValueError(f"{where}: KV heads removed while every query head is kept")
        return
    q = keep.q_heads.tolist()
    kv = list(range(geo.n_kv)) if keep.kv_heads is None else keep.kv_heads.tolist()
    if q != sorted(set(q)) or kv != sorted(set(kv)):
        raise ValueError(f"{where}: kept heads must be ascending and distinct; got q={q}, kv={kv}")
    if not q:
        return
    per = {k: 0 for k in kv}
    for h in q:
        owner = h // geo.group
        if owner not in per:
            raise ValueError(f"{where}: query head {h} is kept but its KV head {owner} is not")
        per[owner] += 1
    if len(set(per.values())) != 1:
        raise ValueError(
            f"{where}: every kept KV head must keep the same number of query heads (GQA); got {per}"
        )


def _rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    return (heads[:, None] * d + torch.arange(d, device=heads.device)).flatten()


def _vector(n: int, kept: torch.Tensor | None, device) -> torch.Tensor:
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    if kept is None:
        keep[:] = True
    else:
        keep[kept.to(device)] = True
    return keep


def layer_masks(layer: nn.Module, keep: LayerKeep) -> list[tuple[nn.Linear, str, torch.Tensor]]:
    """``(Linear, "weight" or "bias", keep mask)`` for every tensor of the layer that loses units.
    Masks broadcast against the tensor: ``(out, 1)`` zeroes rows, ``(1, in)`` columns."""
    geo = geometry(layer)
    attn, mlp = layer.self_attn, layer.mlp
    out: list[tuple[nn.Linear, str, torch.Tensor]] = []

    def rows(lin: nn.Linear, vec: torch.Tensor) -> None:
        if bool(vec.all()):
            return
        out.append((lin, "weight", vec[:, None]))
        if lin.bias is not None:
            out.append((lin, "bias", vec))

    def cols(lin: nn.Linear, vec: torch.Tensor, bias_too: bool = False) -> None:
        if bool(vec.all()):
            return
        out.append((lin, "weight", vec[None, :]))
        if bias_too and lin.bias is not None:
            out.append((lin, "bias", torch.zeros_like(lin.bias, dtype=torch.bool)))

    dev = attn.o_proj.weight.device
    if keep.removed:
        q_vec = torch.zeros(geo.n_q * geo.head_dim, dtype=torch.bool, device=dev)
        kv_vec = torch.zeros(geo.n_kv * geo.head_dim, dtype=torch.bool, device=dev)
        ch = torch.zeros(geo.inter, dtype=torch.bool, device=mlp.down_proj.weight.device)
    else:
        qh = None if keep.q_heads is None else _rows(keep.q_heads, geo.head_dim)
        q_vec = _vector(geo.n_q * geo.head_dim, qh, dev)
        kvh = None if keep.kv_heads is None else _rows(keep.kv_heads, geo.head_dim)
        kv_vec = _vector(geo.n_kv * geo.head_dim, kvh, dev)
        ch = _vector(geo.inter, keep.channels, mlp.down_proj.weight.device)
    rows(attn.q_proj, q_vec)
    rows(attn.k_proj, kv_vec)
    rows(attn.v_proj, kv_vec)
    cols(attn.o_proj, q_vec, bias_too=keep.removed or not bool(q_vec.any()))
    rows(mlp.gate_proj, ch)
    rows(mlp.up_proj, ch)
    cols(mlp.down_proj, ch, bias_too=keep.removed or not bool(ch.any()))
    return out


class NoAttention(nn.Module):
    """The attention of a layer whose every head was removed: outputs zeros (plus ``o_proj``'s
    bias, if any). It still appends an empty (zero-head) entry to the KV cache so the cache's
    sequence length stays right for the layers (and masks) that read it."""

    def __init__(self, hidden: int, head_dim: int, layer_idx: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.hidden_size, self.head_dim, self.layer_idx = hidden, head_dim, layer_idx
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.num_key_value_groups = 1

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        B, T = hidden_states.shape[:2]
        cache = cache_of(kwargs)  # ``cache=`` from transformers 5.24 on, ``past_key_values=`` before
        if cache is not None:
            empty = hidden_states.new_zeros(B, 0, T, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        out = torch.zeros_like(hidden_states)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out, None


def _set(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    grad = lin.weight.requires_grad
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=grad)
    lin.bias = None if bias is None else nn.Parameter(bias.contiguous(), requires_grad=grad)
    lin.out_features, lin.in_features = weight.shape


def _plus(native: torch.Tensor | None, extra: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    if extra is None:
        return native
    extra = extra.to(device=like.device, dtype=torch.float32)
    total = extra if native is None else native.detach().float() + extra
    return total.to(like.dtype)


def shrink_layer(layer: nn.Module, keep: LayerKeep) -> None:
    """Physically remove what ``keep`` drops from one (unmasked) decoder layer, add the
    compensation biases, and set ``num_key_value_groups``. Whole-layer removal is
    :func:`remove_layers`' job."""
    geo = geometry(layer)
    check_keep(keep, geo)
    attn, mlp = layer.self_attn, layer.mlp
    d = geo.head_dim
    with torch.no_grad():
        q_heads = keep.q_heads if keep.q_heads is not None else torch.arange(geo.n_q)
        if len(q_heads) == 0:
            o = attn.o_proj
            bias = _plus(o.bias if o.bias is not None else None, keep.o_bias, o.weight)
            layer.self_attn = NoAttention(geo.hidden, d, attn.layer_idx, bias)
        else:
            kv_heads = keep.kv_heads if keep.kv_heads is not None else torch.arange(geo.n_kv)
            qr = _rows(q_heads.to(attn.q_proj.weight.device), d)
            kvr = _rows(kv_heads.to(attn.k_proj.weight.device), d)
            for lin, idx in ((attn.q_proj, qr), (attn.k_proj, kvr), (attn.v_proj, kvr)):
                b = None if lin.bias is None else lin.bias[idx]
                _set(lin, lin.weight[idx], b)
            o = attn.o_proj
            ow = o.weight if keep.o_weight is None else keep.o_weight.to(o.weight)
            _set(o, ow[:, qr.to(o.weight.device)], _plus(o.bias, keep.o_bias, o.weight))
            attn.num_key_value_groups = len(q_heads) // len(kv_heads)
        ch = keep.channels if keep.channels is not None else torch.arange(geo.inter)
        for lin in (mlp.gate_proj, mlp.up_proj):
            idx = ch.to(lin.weight.device)
            _set(lin, lin.weight[idx], None if lin.bias is None else lin.bias[idx])
        dn = mlp.down_proj
        dw = dn.weight if keep.down_weight is None else keep.down_weight.to(dn.weight)
        _set(dn, dw[:, ch.to(dn.weight.device)], _plus(dn.bias, keep.down_bias, dn.weight))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(ch)


def remove_layers(model: nn.Module, drop: list[int]) -> None:
    """Delete decoder layers, renumber ``layer_idx`` (the KV cache's slot of each attention), and
    set ``num_hidden_layers`` and ``layer_types`` in the config, so caches built from it match."""
    if not drop:
        return
    stack, layers = decoder_stack(model)
    gone = set(drop)
    kept = [layer for i, layer in enumerate(layers) if i not in gone]
    cfg = getattr(stack, "config", None)
    types = list(getattr(cfg, "layer_types", None) or [])
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_idx
    layers_new = nn.ModuleList(kept)
    stack.layers = layers_new
    if cfg is not None:
        if types:
            cfg.layer_types = [t for i, t in enumerate(types) if i not in gone]
        cfg.num_hidden_layers = len(kept)


# ------------------------------------------------------------------ checkpoints
def record(model: nn.Module) -> list[dict]:
    """Each decoder layer's widths and bias flags: what :func:`resize` needs to rebuild it."""
    _, layers = decoder_stack(model)
    out = []
    for layer in layers:
        geo = geometry(layer)
        attn, mlp = layer.self_attn, layer.mlp
        no_attn = isinstance(attn, NoAttention)
        out.append({
            "num_attention_heads": geo.n_q,
            "num_key_value_heads": geo.n_kv,
            "intermediate_size": geo.inter,
            "attention": not no_attn,
            "o_proj_bias": (attn.bias is not None) if no_attn else attn.o_proj.bias is not None,
            "down_proj_bias": mlp.down_proj.bias is not None,
        })  # fmt: skip
    return out


def _fresh(lin: nn.Linear, out_f: int, in_f: int, bias: bool) -> nn.Linear:
    import warnings

    w = lin.weight
    with warnings.catch_warnings():  # a removed MLP is a zero-width Linear: nothing to initialise
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(in_f, out_f, bias=bias, device=w.device, dtype=w.dtype)


def resize(model: nn.Module, layers_spec: list[dict]) -> None:
    """Give a freshly built model (weights about to be loaded) the recorded per-layer widths."""
    _, layers = decoder_stack(model)
    if len(layers_spec) != len(layers):
        raise ValueError(
            f"prunekit_structure describes {len(layers_spec)} layers; the config builds {len(layers)}"
        )
    for i, (layer, spec) in enumerate(zip(layers, layers_spec, strict=True)):
        geo = geometry(layer)
        attn, mlp = layer.self_attn, layer.mlp
        d, H = geo.head_dim, geo.hidden
        nq, nkv, inter = spec["num_attention_heads"], spec["num_key_value_heads"], spec["intermediate_size"]
        if not spec.get("attention", True):
            w = attn.o_proj.weight
            bias = torch.empty(H, device=w.device, dtype=w.dtype) if spec["o_proj_bias"] else None
            layer.self_attn = NoAttention(H, d, attn.layer_idx, bias)
        else:
            if nkv < 1 or nq % nkv:
                raise ValueError(f"layer {i}: {nq} query heads cannot share {nkv} KV heads evenly")
            attn.q_proj = _fresh(attn.q_proj, nq * d, H, attn.q_proj.bias is not None)
            attn.k_proj = _fresh(attn.k_proj, nkv * d, H, attn.k_proj.bias is not None)
            attn.v_proj = _fresh(attn.v_proj, nkv * d, H, attn.v_proj.bias is not None)
            attn.o_proj = _fresh(attn.o_proj, H, nq * d, spec["o_proj_bias"])
            attn.num_key_value_groups = nq // nkv
        mlp.gate_proj = _fresh(mlp.gate_proj, inter, H, mlp.gate_proj.bias is not None)
        mlp.up_proj = _fresh(mlp.up_proj, inter, H, mlp.up_proj.bias is not None)
        mlp.down_proj = _fresh(mlp.down_proj, H, inter, spec["down_proj_bias"])
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter


def set_uniform_config(config, layers_spec: list[dict], head_dim: int) -> bool:
    """When every layer has the same widths and no added bias, write them into the global config
    fields (so plain ``from_pretrained`` loads the checkpoint); returns whether it could. It
    cannot when widths differ, a bias was added, attention was removed, ``head_dim`` is not an
    explicit config field, or the config refuses the head count (transformers checks
    ``hidden_size % num_attention_heads == 0`` even with ``head_dim`` set)."""
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    if not layers_spec or any(s != layers_spec[0] for s in layers_spec):
        return False
    spec = layers_spec[0]
    native_o = bool(getattr(config, "attention_bias", False))
    native_down = bool(getattr(config, "mlp_bias", False))
    if not spec["attention"] or spec["o_proj_bias"] != native_o or spec["down_proj_bias"] != native_down:
        return False
    if getattr(config, "head_dim", None) != head_dim:
        return False
    if config.hidden_size % spec["num_attention_heads"]:
        return False
    old = {k: getattr(config, k) for k in keys}
    try:
        for k in keys:
            setattr(config, k, spec[k])
        if hasattr(config, "validate"):
            config.validate()
    except Exception:
        for k, v in old.items():
            object.__setattr__(config, k, v)
        return False
    return True
