"""Residual-width slicing (SliceGPT): the model surgery, for Llama, Qwen2 and Mistral decoders.

SliceGPT (Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and
Columns", ICLR 2024; official code microsoft/TransformerCompression @ 6b12cde) rotates the
residual stream of a pre-norm transformer by an orthogonal matrix ``Q`` per position and keeps
only its first ``d'`` coordinates. What this module does to a model (the method, with the PCA that
chooses each ``Q``, is ``prunekit.weights.methods.slicegpt``):

- **Norm fusion**: every RMSNorm's weight ``gamma`` is folded into the Linears that read it
  (``input_layernorm`` into q/k/v, ``post_attention_layernorm`` into gate/up, the final norm into
  ``lm_head``); the norms become :class:`RMSN`, weightless, dividing ``sum x^2`` by the
  **original** hidden size ``H`` even after slicing (the official ``RMSN(mean_dim=H)``), so a
  rotated and sliced vector is normalised as the full one was.
- **Rotation**: Linears reading the residual stream get ``W <- W Q[:, :d']`` (q/k/v, gate/up,
  ``lm_head``), Linears writing it get ``W <- Q[:, :d']^T W`` (o_proj, down_proj, and their
  biases ``b <- b Q[:, :d']``), the embedding ``E <- E Q[:, :d']``.
- **Shortcuts**: the two residual additions of a layer change basis (``Q_prev`` -> ``Q_mid`` ->
  ``Q_out``), so :class:`SlicedLayer` computes ``h <- h @ attn_shortcut_Q + attn(RMSN(h))`` and
  ``h <- h @ mlp_shortcut_Q + mlp(RMSN(h))`` with ``(d', d')`` shortcut matrices.

At ``d' = H`` this is the computational invariance: the model computes the same function (to
float rounding). Gemma-3 is refused: its **post-norms** (``post_attention_layernorm`` and
``post_feedforward_layernorm`` normalise a branch's output *before* the residual addition, with a
per-channel weight) do not commute with a rotation of the residual stream, so no ``Q`` can be
folded through them; the official code has no Gemma adapter either.

Reversibility: every change goes through an :class:`Undo` log (the original parameters, modules
and attributes are kept and set back), so ``restore()`` gives back the very same objects.

Checkpoints: :func:`record` describes the sliced widths for ``config.prunekit_slicing``;
:func:`resize` gives a freshly built model those widths before ``from_pretrained`` loads the
safetensors (``prunekit.load_pruned``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .structure import decoder_stack

#: the parameters of a sliced layer that are not in the dense model
SHORTCUTS = ("attn_shortcut_Q", "mlp_shortcut_Q")


class RMSN(nn.Module):
    """A weightless RMSNorm: ``x / sqrt(sum(x^2) / mean_dim + eps)``, ``mean_dim`` the model's
    original hidden size (SliceGPT's ``RMSN``). Computed in fp32 and cast back to the input dtype,
    as transformers' RMSNorms (the official one upcasts fp16 only)."""

    def __init__(self, mean_dim: int, eps: float) -> None:
        super().__init__()
        self.mean_dim, self.eps = int(mean_dim), float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        var = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x * torch.rsqrt(var + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"mean_dim={self.mean_dim}, eps={self.eps}"


class SlicedLayer(nn.Module):
    """Mixed into a decoder layer's own class (so ``isinstance(layer, LlamaDecoderLayer)`` still
    holds, and transformers' output capture finds it): the pre-norm layer with the residual
    stream in a rotated, sliced basis and the shortcut matrices on the residual path."""

    attn_shortcut_Q: nn.Parameter
    mlp_shortcut_Q: nn.Parameter

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        h = self.input_layernorm(hidden_states)
        h, _ = self.self_attn(hidden_states=h, **kwargs)
        hidden_states = hidden_states @ self.attn_shortcut_Q.to(h.dtype) + h
        h = self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states @ self.mlp_shortcut_Q.to(h.dtype) + h


_CLASSES: dict[type, type] = {}


def sliced_class(base: type) -> type:
    """``Sliced<Base>``: :class:`SlicedLayer`'s forward over the decoder layer class ``base``."""
    if issubclass(base, SlicedLayer):
        return base
    if base not in _CLASSES:
        _CLASSES[base] = type(f"Sliced{base.__name__}", (SlicedLayer, base), {})
    return _CLASSES[base]


def sliced_layer(old: nn.Module, mean_dim: int, eps: float, attn_q: torch.Tensor, mlp_q: torch.Tensor):
    """A sliced layer sharing ``old``'s attention and MLP modules (not copies: their Linears are
    changed through the undo log), with weightless norms and the given shortcut matrices."""
    cls = sliced_class(type(old))
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in old.__dict__.items():  # plain attributes (hidden_size, attention_type, ...)
        if not k.startswith("_") and k != "training":
            new.__dict__[k] = v
    new.train(old.training)
    new.self_attn, new.mlp = old.self_attn, old.mlp
    new.input_layernorm = RMSN(mean_dim, eps)
    new.post_attention_layernorm = RMSN(mean_dim, eps)
    new.attn_shortcut_Q = nn.Parameter(attn_q)
    new.mlp_shortcut_Q = nn.Parameter(mlp_q)
    return new


class Undo:
    """A log of ``setattr`` calls that :meth:`rollback` reverts, newest first."""

    def __init__(self) -> None:
        self._log: list[tuple[object, str, object]] = []

    def set(self, obj: object, name: str, value: object) -> None:
        self._log.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def rollback(self) -> None:
        while self._log:
            obj, name, old = self._log.pop()
            setattr(obj, name, old)

    def clear(self) -> None:
        self._log.clear()


# ------------------------------------------------------------------ support
_SANDWICH = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def norm_eps(norm: nn.Module, where: str) -> float:
    """The eps of a Llama/Qwen2/Mistral RMSNorm (``weight * x / sqrt(mean x^2 + eps)``)."""
    eps = getattr(norm, "variance_epsilon", None)
    w = getattr(norm, "weight", None)
    if (
        not isinstance(eps, float)
        or not isinstance(w, torch.Tensor)
        or getattr(norm, "bias", None) is not None
    ):
        raise UnsupportedModelError(
            f"{where} is a {type(norm).__name__}: SliceGPT here supports the RMSNorm of Llama, Qwen2 and "
            "Mistral (weight * x / sqrt(mean(x^2) + eps), attribute variance_epsilon)"
        )
    return eps


def check_supported(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """``(decoder stack, layers)`` of a model SliceGPT can slice; UnsupportedModelError naming
    why otherwise (Gemma-3's post-norms, MoE MLPs, LayerNorm models, a model already sliced)."""
    stack, layers = decoder_stack(model)
    for i, layer in enumerate(layers):
        if isinstance(layer, SlicedLayer):
            raise UnsupportedModelError(f"layer {i} is already sliced (SliceGPT); finalize() made it final")
        if any(hasattr(layer, n) for n in _SANDWICH):
            raise UnsupportedModelError(
                f"{type(layer).__name__} has post-norms (post_attention_layernorm on the attention output "
                "and post_feedforward_layernorm on the MLP output, before the residual additions; "
                "Gemma-2/3): a weighted RMSNorm inside a branch does not commute with a rotation of the "
                "residual stream, so SliceGPT's computational invariance does not hold. SliceGPT supports "
                "Llama, Qwen2 and Mistral"
            )
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for mod, names in (
            (attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (mlp, ("gate_proj", "up_proj", "down_proj")),
        ):
            if mod is None or not all(isinstance(getattr(mod, n, None), nn.Linear) for n in names):
                raise UnsupportedModelError(
                    f"layer {i} ({type(layer).__name__}) lacks self_attn.q/k/v/o_proj or "
                    "mlp.gate/up/down_proj Linears: SliceGPT supports dense Llama, Qwen2 and Mistral "
                    "decoder layers"
                )
        for n in ("input_layernorm", "post_attention_layernorm"):
            norm_eps(getattr(layer, n, None), f"layer {i}.{n}")
    norm_eps(getattr(stack, "norm", None), "the final norm")
    if not isinstance(getattr(stack, "embed_tokens", None), nn.Embedding):
        raise UnsupportedModelError("SliceGPT needs an nn.Embedding embed_tokens")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no nn.Linear lm_head: SliceGPT slices causal LMs (…ForCausalLM)"
        )
    return stack, layers


# ------------------------------------------------------------------ tensor surgery (fp64 math)
def set_linear(undo: Undo, lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give ``lin`` a new weight (and bias, when ``bias`` is given), in its dtype and device."""
    w = lin.weight
    undo.set(
        lin, "weight", nn.Parameter(weight.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
    )
    if bias is not None:
        undo.set(
            lin, "bias", nn.Parameter(bias.to(device=w.device, dtype=w.dtype), requires_grad=w.requires_grad)
        )
    undo.set(lin, "out_features", weight.shape[0])
    undo.set(lin, "in_features", weight.shape[1])


def reads(undo: Undo, lin: nn.Linear, gamma: torch.Tensor | None, Q: torch.Tensor) -> None:
    """A Linear reading the residual stream: ``W <- (W diag(gamma)) Q`` (``Q`` ``(H, d)``)."""
    W = lin.weight.detach().double()
    if gamma is not None:
        W = W * gamma.detach().double().to(W.device)
    set_linear(undo, lin, W @ Q.to(W.device))


def writes(undo: Undo, lin: nn.Linear, Q: torch.Tensor) -> None:
    """A Linear writing the residual stream: ``W <- Q^T W``, ``b <- b Q`` (``Q`` ``(H, d)``)."""
    W = lin.weight.detach().double()
    Q = Q.to(W.device)
    b = None if lin.bias is None else lin.bias.detach().double() @ Q
    set_linear(undo, lin, Q.T @ W, b)


# ------------------------------------------------------------------ checkpoints
def record(model: nn.Module) -> dict:
    """What :func:`resize` needs to rebuild a sliced model: the residual widths of each layer
    (its input ``hidden`` and its output ``hidden_out``), the original ``H`` and the norms' eps."""
    stack, layers = decoder_stack(model)
    spec = []
    for layer in layers:
        spec.append({"hidden": layer.attn_shortcut_Q.shape[0], "hidden_out": layer.mlp_shortcut_Q.shape[1]})
    return {
        "hidden_original": stack.norm.mean_dim,
        "eps": stack.norm.eps,
        "embedding": stack.embed_tokens.embedding_dim,
        "head": model.get_output_embeddings().in_features,
        "layers": spec,
    }


def _linear(lin: nn.Linear, out_f: int, in_f: int) -> nn.Linear:
    w = lin.weight
    return nn.Linear(in_f, out_f, bias=lin.bias is not None, device=w.device, dtype=w.dtype)


def resize(model: nn.Module, spec: dict) -> None:
    """Give a freshly built model (its weights about to be loaded) the sliced widths of ``spec``
    (:func:`record`'s dict): embedding, each layer's q/k/v/o and gate/up/down input or output
    widths, the shortcut matrices, weightless norms, and an untied ``lm_head``."""
    stack, layers = decoder_stack(model)
    if len(spec["layers"]) != len(layers):
        raise ValueError(
            f"prunekit_slicing describes {len(spec['layers'])} layers; the config builds {len(layers)}"
        )
    H, eps = spec["hidden_original"], spec["eps"]
    emb = stack.embed_tokens
    w = emb.weight
    emb.weight = nn.Parameter(torch.empty(w.shape[0], spec["embedding"], device=w.device, dtype=w.dtype))
    emb.embedding_dim = spec["embedding"]
    for i, s in enumerate(spec["layers"]):
        layer = layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        d, d_out = s["hidden"], s["hidden_out"]
        for n in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, n, _linear(getattr(attn, n), getattr(attn, n).out_features, d))
        attn.o_proj = _linear(attn.o_proj, d, attn.o_proj.in_features)
        for n in ("gate_proj", "up_proj"):
            setattr(mlp, n, _linear(getattr(mlp, n), getattr(mlp, n).out_features, d))
        mlp.down_proj = _linear(mlp.down_proj, d_out, mlp.down_proj.in_features)
        dev, dt = attn.o_proj.weight.device, attn.o_proj.weight.dtype
        layers[i] = sliced_layer(
            layer,
            H,
            eps,
            torch.empty(d, d, device=dev, dtype=dt),
            torch.empty(d, d_out, device=dev, dtype=dt),
        )
    stack.norm = RMSN(H, eps)
    head = model.get_output_embeddings()
    model.set_output_embeddings(_linear(head, head.out_features, spec["head"]))
