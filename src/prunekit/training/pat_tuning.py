"""PAT: Pruning-Aware Tuning (Liu et al., AAAI 2025, arXiv 2408.14721), hidden-size pruning that
trains, then folds everything into a physically narrower Llama-style model.

Read from the official code (kriskrisliu/PAT_Pruning-Aware-Tuning at bc54095; spec
``training-aware.md`` §2). What is pruned is the hidden (residual-stream) dimension d: heads and FFN
width stay.

- **HSM** (Hybrid Sparsification Module, ``DimDownLayer``): ``y = s ⊙ g(m) ⊙ (x + B(A x))``, with
  ``A: d→r`` (kaiming-uniform, a=√5), ``B: r→d`` (zeros), so ``I + BA`` is the identity at
  initialisation, and ``s`` a per-channel scale (init 1). One HSM after ``embed_tokens``, and in
  every decoder layer one on the ``self_attn`` output and one on the ``mlp`` output, both **before**
  the residual add: 1 + 2L modules. Here they are **forward hooks** on those modules (no copied
  modeling file); :func:`attach` puts them on, :meth:`PATModules.remove` takes them off and leaves
  the model as it was, bit for bit.
- **USM** (the one mask ``m`` over d, shared by all HSMs; its gate is computed once per forward):
  at optimiser step t of T, ``τ(t) = 1/(1 − ln(max(1,t))/ln T + 1e-6)``, ``b(t) = max(0.5 − t/T, 0)``,
  ``σc(z) = 1/(1 + exp(min(−z, 10)))``; ``g = σc(τ(t)·m) + b(t)`` for ``t < 0.8T``, then
  ``g = σc(τ(0.8T)·m.detach()) + b(t)`` (mask frozen in the gate). In eval mode the gate is hard:
  1 on the kept channels, 0 elsewhere. At t = 0 the gate is exactly 1.
- **Losses**, added to the next-token loss: ``L_mask = 10·|Σ_j H(m_j) − D|/D + mean_{m>0}(m − 0.5)² +
  mean_{m≤0}(m + 0.5)²`` (H: a straight-through Heaviside) and, per HSM, ``L_id = ‖A Aᵀ − I_r‖²_F/r²``.
- **Merge** (:func:`merge`): LoRA merged first; then ``E ← (E·Mᵀ·diag(s))[:, keep]``,
  ``W_o ← (diag(s)·M·W_o)[keep, :]``, ``W_down`` likewise, q/k/v/gate/up/lm_head ← ``W[:, keep]``,
  every RMSNorm ``γ ← γ[keep]·√(d/d′)``, ``config.hidden_size = d′`` (``head_dim`` is kept).
- **LoRA** as the official recipe: r=20, α=4, dropout 0.05 on q/k/v/o/gate/up/down (peft).

Quirks of the official code and what prunekit does (``faithful=True`` keeps the official behaviour,
the default fixes it):

1. Only the **last** decoder layer's two identity losses (and the embedding HSM's) reach the loss
   (the per-layer loss is overwritten in the layer loop). Default: every HSM's L_id, summed.
2. ``mean`` over an empty set is NaN (at t = 0 every m = 0, so the logged loss is NaN). Guarded in
   **both** modes (sum / max(count, 1)); gradients are the same as the official ones.
3. H counts m = 0 as kept (``m ≥ 0``) while inference keeps ``m > 0``. Faithful: both as official,
   so the merged width is whatever the threshold gives. Default: H is ``1[m > 0]`` and the kept set
   is exactly the ``D`` largest m (ties to the lower index), so the merged model has exactly the
   asked width; the hooked model in eval mode uses the same set, so merged ≡ hooked.
4. The official merge **ignores s** (merged ≠ trained unless s ≈ 1). Default folds s in;
   faithful drops it.
5. Norm ε: the official merge keeps ``rms_norm_eps``, so the √(d/d′) rescale is exact only up to ε.
   Default (*ours*) sets ``rms_norm_eps ← ε·d/d′``, which makes the rescaled narrow norm equal the
   wide one exactly; faithful keeps ε.

Choices that are **ours** (not in the official code):

- **Tied embeddings** (SmolLM2, Gemma): the official merge writes different matrices into E and
  ``lm_head``, which are one tensor when tied. ``tied="mask"`` (default) makes the embedding HSM a
  pure mask (no ``I + BA``, no s), so E and ``lm_head`` both become ``E[:, keep]`` and stay tied;
  ``tied="untie"`` keeps the full embedding HSM and unties ``lm_head`` at the merge (+V·d′ params).
  An untied model always gets the full embedding HSM.
- ``mask_lr``: the mask is stored as ``m = (mask_lr/lr)·θ`` so that Adam moves it at about
  ``mask_lr`` per step while LoRA and the HSMs train at ``lr``. The official run trains 10 000
  steps at one lr of 5e-5, so m can travel about 0.5 over the (decaying) schedule; the default
  ``mask_lr = 1/steps`` keeps that travel budget for CPU-sized runs of ~100 steps.
- HSM rank r: official 200 (hard-coded, for 4096-wide Llama-2); default 32 here (d = 576).
- The step t is the ``Trainer``'s ``global_step`` set by a :class:`~prunekit.training.StepSchedule`
  callback (the official code patches the ``Trainer``); T is the number of training steps.
- HSM parameters are kept in float32 (as official) and the HSMs compute in float32.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import TrainerCallback

from ..errors import PrunekitError, UnsupportedModelError
from ..registry import register
from .hooks import StepSchedule, straight_through
from .loop import train_causal_lm
from .recover import DEFAULT_TARGETS, _windows, lora_targets

TIED = ("mask", "untie")
_ATTR = "prunekit_pat"  # the submodule holding the HSMs while they are attached


# --------------------------------------------------------------------------- schedule


def tau(t: float, total: int) -> float:
    """PAT's temperature ``τ(t) = 1 / (1 − ln(max(1, t)) / ln T + 1e-6)``."""
    return 1.0 / (1.0 - math.log(max(1.0, t)) / math.log(total) + 1e-6)


def bias(t: float, total: int) -> float:
    """PAT's gate bias ``b(t) = max(0.5 − t/T, 0)``."""
    return max(0.5 - t / total, 0.0)


def clipped_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(min(−z, 10)))``: floor ≈ 4.5e-5, zero gradient where ``−z > 10``."""
    return 1.0 / (1.0 + torch.exp(torch.clamp(-z, max=10.0)))


# --------------------------------------------------------------------------- modules


class USM(nn.Module):
    """The unified mask ``m`` over the d hidden channels, with its gate schedule and loss."""

    def __init__(self, d: int, keep: int, mask_scale: float = 1.0, faithful: bool = False) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d, dtype=torch.float32))
        self.keep, self.mask_scale, self.faithful = keep, float(mask_scale), faithful
        self.step, self.total = 0, 2
        self._g: torch.Tensor | None = None

    @property
    def m(self) -> torch.Tensor:
        return self.theta * self.mask_scale

    def set_step(self, step: int, total: int) -> None:
        self.step, self.total = int(step), int(total)

    def kept(self) -> torch.Tensor:
        """Sorted indices of the kept channels (see quirk 3)."""
        m = self.m.detach()
        if self.faithful:
            return torch.nonzero(m > 0).flatten()
        order = torch.argsort(-m, stable=True)  # ties: lower index first
        return torch.sort(order[: self.keep]).values

    def hard_gate(self) -> torch.Tensor:
        g = torch.zeros_like(self.theta)
        g[self.kept()] = 1.0
        return g

    def gate(self) -> torch.Tensor:
        if not self.training:
            return self.hard_gate()
        t, total = self.step, self.total
        m = self.m
        if t < 0.8 * total:
            return clipped_sigmoid(tau(t, total) * m) + bias(t, total)
        return clipped_sigmoid(tau(0.8 * total, total) * m.detach()) + bias(t, total)

    def loss(self) -> torch.Tensor:
        m = self.m
        hard = (m >= 0) if self.faithful else (m > 0)
        h = straight_through(hard.to(m.dtype), m)
        count = 10.0 * (h.sum() - self.keep).abs() / self.keep
        pos, neg = m > 0, m <= 0
        # quirk 2: an empty mean is NaN in the official code; sum / max(count, 1) instead
        p = ((m - 0.5) ** 2 * pos).sum() / pos.sum().clamp(min=1)
        n = ((m + 0.5) ** 2 * neg).sum() / neg.sum().clamp(min=1)
        return count + p + n


class HSM(nn.Module):
    """``y = s ⊙ g ⊙ (x + B(A x))``; ``identity=False``: a pure mask ``y = g ⊙ x``."""

    def __init__(self, d: int, rank: int, identity: bool = True) -> None:
        super().__init__()
        self.identity = identity
        if identity:
            self.A = nn.Linear(d, rank, bias=False, dtype=torch.float32)  # kaiming_uniform(a=√5)
            self.B = nn.Linear(rank, d, bias=False, dtype=torch.float32)
            nn.init.zeros_(self.B.weight)
            self.s = nn.Parameter(torch.ones(d, dtype=torch.float32))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if not self.identity:
            return (g * xf).to(x.dtype)
        return (self.s * g * (xf + self.B(self.A(xf)))).to(x.dtype)

    def matrix(self) -> torch.Tensor:
        """``M = I + B A`` (d, d)."""
        w = self.B.weight @ self.A.weight
        return w + torch.eye(w.shape[0], dtype=w.dtype, device=w.device)

    def id_loss(self) -> torch.Tensor:
        a = self.A.weight
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        return ((a @ a.T - eye) ** 2).mean()


class PATModules(nn.Module):
    """The HSMs and the mask attached to a model (see :func:`attach`)."""

    def __init__(
        self, d: int, n_layers: int, keep: int, rank: int, embed_identity: bool, mask_scale, faithful
    ):
        super().__init__()
        self.mask = USM(d, keep, mask_scale, faithful)
        self.embed = HSM(d, rank, identity=embed_identity)
        self.attn = nn.ModuleList(HSM(d, rank) for _ in range(n_layers))
        self.mlp = nn.ModuleList(HSM(d, rank) for _ in range(n_layers))
        self.faithful = faithful
        self._handles: list = []
        self._owner: nn.Module | None = None
        self._grads: dict = {}

    def hsms(self) -> list[HSM]:
        return [self.embed, *self.attn, *self.mlp]

    def losses(self) -> dict[str, torch.Tensor]:
        """``{"mask": L_mask, "identity": Σ L_id}`` (quirk 1: faithful sums only the embedding HSM's
        and the last layer's two)."""
        used = [self.embed, self.attn[-1], self.mlp[-1]] if self.faithful else self.hsms()
        ids = [h.id_loss() for h in used if h.identity]
        return {"mask": self.mask.loss(), "identity": torch.stack(ids).sum()}

    def remove(self) -> None:
        """Take the hooks and the HSMs off; the model is as it was before :func:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        owner = self._owner
        if owner is not None and owner._modules.get(_ATTR) is self:
            del owner._modules[_ATTR]
        if owner is not None:
            for n, p in owner.named_parameters():
                if n in self._grads:
                    p.requires_grad_(self._grads[n])
        self.__dict__["_owner"] = None

    def __enter__(self) -> PATModules:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _stack(model: nn.Module):
    from ..models.structure import decoder_stack

    try:
        inner, layers = decoder_stack(model)
    except Exception as e:
        raise UnsupportedModelError(
            f"PAT needs a Llama-style decoder (embed_tokens, layers with self_attn/mlp, norm); "
            f"{type(model).__name__}: {e}"
        ) from e
    for what in ("embed_tokens", "norm"):
        if not hasattr(inner, what):
            raise UnsupportedModelError(f"PAT: {type(inner).__name__} has no {what}")
    for i, layer in enumerate(layers):
        for what in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
            if not hasattr(layer, what):
                raise UnsupportedModelError(
                    f"PAT: decoder layer {i} ({type(layer).__name__}) has no {what}; only Llama-style "
                    "pre-norm layers (Llama, Mistral, Qwen2, SmolLM2) are supported"
                )
    return inner, layers


def _tied(model: nn.Module) -> bool:
    inner, _ = _stack(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight is inner.embed_tokens.weight


def _keep_count(keep, d: int) -> int:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(
            f"keep must be a fraction in (0, 1) or a channel count in [1, {d - 1}]; got {keep!r}"
        )
    if isinstance(keep, float):
        if not 0 < keep < 1:
            raise ValueError(f"keep as a fraction must be in (0, 1) (of hidden size {d}); got {keep!r}")
        n = round(keep * d)
    else:
        n = keep
    if not 1 <= n <= d - 1:
        raise ValueError(
            f"keep must leave between 1 and {d - 1} of the {d} hidden channels; got {keep!r} -> {n}"
        )
    return n


def attach(
    model: nn.Module,
    keep: float | int = 0.75,
    *,
    rank: int = 32,
    tied: str = "mask",
    faithful: bool = False,
    mask_scale: float = 1.0,
    seed: int | None = 0,
) -> PATModules:
    """Put PAT's HSMs on ``model`` by forward hooks (embedding output, each layer's ``self_attn`` and
    ``mlp`` outputs) and return them (also a context manager: removed on exit, also after an
    exception). The HSMs live in a submodule ``model.prunekit_pat`` while attached, so the
    ``Trainer`` trains them; the model's own parameters are untouched. In train mode the gate follows
    the schedule (``modules.mask.set_step``); in eval mode it is hard (1 on the kept channels)."""
    if tied not in TIED:
        raise ValueError(f"tied must be one of {TIED}; got {tied!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1 (the HSMs' low rank r); got {rank!r}")
    if not mask_scale > 0:
        raise ValueError(f"mask_scale must be > 0; got {mask_scale!r}")
    if _ATTR in model._modules:
        raise PrunekitError("PAT modules are already attached to this model (remove() them first)")
    inner, layers = _stack(model)
    d = inner.embed_tokens.weight.shape[1]
    n_keep = _keep_count(keep, d)
    device = inner.embed_tokens.weight.device
    embed_identity = not (_tied(model) and tied == "mask")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mods = PATModules(d, len(layers), n_keep, rank, embed_identity, mask_scale, faithful)
    else:
        mods = PATModules(d, len(layers), n_keep, rank, embed_identity, mask_scale, faithful)
    mods.to(device)
    mods.train(model.training)
    mods._grads = {n: p.requires_grad for n, p in model.named_parameters()}
    mask = mods.mask

    def set_gate(module, args, kwargs=None):
        mask._g = mask.gate()

    def on_embed(module, args, out):
        if mask._g is None:
            mask._g = mask.gate()
        return mods.embed(out, mask._g)

    def hook(hsm):
        def on_out(module, args, out):
            g = mask._g if mask._g is not None else mask.gate()
            if isinstance(out, tuple):
                return (hsm(out[0], g), *out[1:])
            return hsm(out, g)

        return on_out

    try:
        mods._handles.append(inner.register_forward_pre_hook(set_gate))
        mods._handles.append(inner.embed_tokens.register_forward_hook(on_embed))
        for layer, ha, hm in zip(layers, mods.attn, mods.mlp, strict=True):
            mods._handles.append(layer.self_attn.register_forward_hook(hook(ha)))
            mods._handles.append(layer.mlp.register_forward_hook(hook(hm)))
        model._modules[_ATTR] = mods
        mods.__dict__["_owner"] = model  # not a submodule: that would be a cycle
    except BaseException:
        mods.remove()
        raise
    return mods


# --------------------------------------------------------------------------- merge


def _set_linear(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=lin.weight.requires_grad)
    lin.out_features, lin.in_features = weight.shape
    if lin.bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=lin.bias.requires_grad)


@torch.no_grad()
def merge(model: nn.Module, mods: PATModules, *, tied: str = "mask") -> dict:
    """Fold the HSMs into ``model`` and shrink its hidden size to the kept channels, in place; the
    HSMs are removed. Merge LoRA adapters first. Returns ``{"hidden": (d, d'), "kept": [...]}``.
    See the module docstring for the formulas and quirks 4 and 5 (``mods.faithful``)."""
    if mods._owner is not model:
        raise PrunekitError("these PAT modules are not attached to this model")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PrunekitError("the model holds reversible masks (parametrizations): finalize() them first")
    inner, layers = _stack(model)
    emb = inner.embed_tokens
    d = emb.weight.shape[1]
    keep = mods.mask.kept().to(emb.weight.device)
    d2 = int(keep.numel())
    if d2 == 0 or d2 == d:
        raise PrunekitError(
            f"the mask keeps {d2} of {d} hidden channels; nothing to merge into a narrower model"
        )
    faithful = mods.faithful
    tied_before = _tied(model)
    head = model.get_output_embeddings()
    rescale = math.sqrt(d / d2)

    def fold(hsm: HSM, w: torch.Tensor) -> torch.Tensor:  # rows of a writer (d, in) -> (d2, in)
        wf = w.float()
        if hsm.identity:
            wf = hsm.matrix().to(wf.device) @ wf
            if not faithful:  # quirk 4: the official merge ignores s
                wf = hsm.s[:, None] * wf
        return wf[keep].to(w.dtype)

    def reader(lin: nn.Linear) -> None:
        _set_linear(lin, lin.weight[:, keep], lin.bias)

    def writer(lin: nn.Linear, hsm: HSM) -> None:
        b = None if lin.bias is None else fold(hsm, lin.bias[:, None])[:, 0]
        _set_linear(lin, fold(hsm, lin.weight), b)

    def norm(n: nn.Module) -> None:
        n.weight = nn.Parameter((n.weight[keep] * rescale).contiguous(), requires_grad=n.weight.requires_grad)
        if not faithful and hasattr(n, "variance_epsilon"):  # quirk 5 (ours): exact rescale
            n.variance_epsilon = n.variance_epsilon * d / d2
        for a in ("hidden_size", "normalized_shape"):
            if isinstance(getattr(n, a, None), int):
                setattr(n, a, d2)

    e_old = emb.weight
    e_new = fold(mods.embed, e_old.T).T  # E' = (E Mᵀ diag(s))[:, keep]
    emb.weight = nn.Parameter(e_new.contiguous(), requires_grad=e_old.requires_grad)
    emb.embedding_dim = d2
    for layer, ha, hm in zip(layers, mods.attn, mods.mlp, strict=True):
        norm(layer.input_layernorm)
        norm(layer.post_attention_layernorm)
        for n in ("q_proj", "k_proj", "v_proj"):
            reader(getattr(layer.self_attn, n))
        writer(layer.self_attn.o_proj, ha)
        for n in ("gate_proj", "up_proj"):
            reader(getattr(layer.mlp, n))
        writer(layer.mlp.down_proj, hm)
    norm(inner.norm)
    cfg = model.config
    if tied_before and tied == "mask" and not mods.embed.identity:
        head.weight = emb.weight  # E' = E[:, keep] = lm_head'
        head.in_features = d2
    else:
        w = (e_old if tied_before else head.weight)[:, keep]
        head.weight = nn.Parameter(w.clone().contiguous(), requires_grad=head.weight.requires_grad)
        head.in_features = d2
        if tied_before:
            cfg.tie_word_embeddings = False
            if hasattr(cfg, "get_text_config"):
                cfg.get_text_config().tie_word_embeddings = False
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cfg.head_dim = head_dim
    cfg.hidden_size = d2
    if not faithful and getattr(cfg, "rms_norm_eps", None) is not None:
        cfg.rms_norm_eps = cfg.rms_norm_eps * d / d2
    mods.remove()
    return {"hidden": (d, d2), "kept": keep.tolist()}


# --------------------------------------------------------------------------- the one call


@dataclass
class PATReport:
    """What :func:`pat` did; ``to_dict``/``to_json`` give one JSON line."""

    hidden_before: int
    hidden_after: int
    keep: int  # D, the asked width
    above_threshold: int  # channels with m > 0 at the end (the official kept set)
    steps: int
    seconds: float  # training wall time
    merge_seconds: float
    merge_error: float  # max |logit| difference, merged vs hooked (eval gate), one window of 64 tokens
    params_before: int
    params_after: int
    loss_first: float
    loss_last: float
    terms_last: dict = field(default_factory=dict)
    faithful: bool = False
    tied: str = "mask"
    hsm_rank: int = 32
    lora_rank: int = 20
    lora_alpha: float = 4.0
    lr: float = 2e-4
    mask_lr: float = 0.0
    batch_size: int = 2
    seq_len: int = 256
    seed: int = 0
    kept: list = field(default_factory=list)
    losses: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        return (
            f"PAT: hidden {self.hidden_before} -> {self.hidden_after}, params {self.params_before} -> "
            f"{self.params_after}, {self.steps} steps in {self.seconds:.1f} s, loss {self.loss_first:.3f} -> "
            f"{self.loss_last:.3f}"
        )


MODULES_FILE = "prunekit_pat.safetensors"  # PAT's HSMs and mask, in each Trainer checkpoint


def _resume_path(resume: bool | str, checkpoint_dir: str | None) -> str | None:
    """The checkpoint folder a PAT run resumes from (``None``: a fresh run)."""
    if resume is False or resume is None:
        return None
    if resume is True:
        if checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir= (the folder the interrupted run saved to)")
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(checkpoint_dir) if Path(checkpoint_dir).is_dir() else None
        if last is None:
            raise FileNotFoundError(f"resume=True: no checkpoint-N folder in {checkpoint_dir!r}")
        resume = last
    if not isinstance(resume, (str, Path)):
        raise ValueError(f"resume must be False, True or a checkpoint folder; got {resume!r}")
    if not (Path(resume) / MODULES_FILE).is_file():
        raise FileNotFoundError(
            f"{resume!r} has no {MODULES_FILE}: it was not saved by prunekit.training.pat (or by an older "
            "prunekit, whose checkpoints held the LoRA adapters only)"
        )
    return str(resume)


def _load_modules(mods: PATModules, folder: str) -> None:
    from safetensors.torch import load_file

    state = load_file(str(Path(folder) / MODULES_FILE))
    own = mods.state_dict()
    bad = sorted(k for k in own.keys() | state.keys() if k not in state or k not in own)
    bad += sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if bad:
        raise ValueError(
            f"{folder}/{MODULES_FILE} does not match this run's PAT modules (keep, rank, tied or model "
            f"differ): mismatched entries {bad[:5]}{' ...' if len(bad) > 5 else ''}"
        )
    mods.load_state_dict(state)


class _SaveModules(TrainerCallback):
    """A ``Trainer`` callback: after each checkpoint, write the HSMs and the mask into it (the
    ``Trainer`` saves a PEFT model's adapters only)."""

    def __init__(self, mods: PATModules) -> None:
        self.mods = mods

    def on_save(self, args, state, control, **kw):
        from safetensors.torch import save_file

        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            state_dict = {k: v.detach().contiguous().cpu() for k, v in self.mods.state_dict().items()}
            save_file(state_dict, str(folder / MODULES_FILE))
        return control


def pat(
    model: nn.Module,
    texts: Sequence[str] | torch.Tensor | Sequence[torch.Tensor],
    *,
    tokenizer=None,
    keep: float | int = 0.75,
    steps: int = 150,
    rank: int = 32,
    lora_rank: int = 20,
    lora_alpha: float = 4.0,
    lora_dropout: float = 0.05,
    lr: float = 2e-4,
    mask_lr: float | None = None,
    batch_size: int = 2,
    seq_len: int = 256,
    warmup_steps: int = 0,
    seed: int = 0,
    faithful: bool = False,
    tied: str = "mask",
    callbacks: Sequence = (),
    checkpoint_dir: str | None = None,
    save_steps: int | None = None,
    resume: bool | str = False,
    progress: bool = True,
) -> PATReport:
    """Prune ``model``'s hidden size with PAT, in place: attach the HSMs and the shared mask, train
    them with LoRA (peft, on q/k/v/o/gate/up/down) for ``steps`` steps on ``texts``
    (:func:`~prunekit.training.train_causal_lm`: the transformers ``Trainer``, CPU or
    ``accelerate launch``), merge LoRA, then fold the HSMs into a model whose ``hidden_size`` is
    ``keep`` (a fraction of d, or a channel count). Returns a :class:`PATReport`.

    The merged model is a plain transformers model of the same class (``config.hidden_size`` and
    ``head_dim`` set): ``save_pretrained`` and ``prunekit.load_pruned`` / ``from_pretrained`` reload
    it, and it generates. ``texts`` and ``tokenizer`` as in :func:`~prunekit.training.recover`.
    ``lr``: LoRA and HSMs; ``mask_lr``: the mask (see the module docstring for every choice that is
    ours and the quirks ``faithful=True`` keeps). T (of the schedule) = ``steps``.

    ``checkpoint_dir``, ``save_steps``, ``resume``: as in :func:`~prunekit.training.train_causal_lm`.
    The ``Trainer`` saves a PEFT model's LoRA adapters (and the optimiser, scheduler and RNG states);
    PAT adds its HSMs and mask to each checkpoint as ``prunekit_pat.safetensors``, and
    ``resume=True`` (the latest checkpoint in ``checkpoint_dir``) or a checkpoint path loads them
    back, so a resumed run ends where an uninterrupted one would (tested).

    In the method registry as ``"pat"`` (family ``training``): :class:`PAT` holds these options and
    is called like this function.

    If anything fails before the merge, the LoRA adapters and HSMs are removed unmerged and the
    model is restored exactly (parameters, dtypes, ``requires_grad``). Comes back in eval mode.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("pat() trains LoRA adapters with peft: pip install 'prunekit[train]'") from e

    for name, v, lo in (("steps", steps, 2), ("lora_rank", lora_rank, 1), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
    if mask_lr is None:
        mask_lr = 1.0 / steps if isinstance(steps, int) and steps > 0 else 1.0
    if not lr > 0 or not mask_lr > 0:
        raise ValueError(f"lr and mask_lr must be > 0; got lr={lr!r}, mask_lr={mask_lr!r}")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1); got {lora_dropout!r}")
    if tied not in TIED:
        raise ValueError(f"tied must be one of {TIED}; got {tied!r}")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PrunekitError(
            "the model holds prunekit's reversible masks (parametrizations): finalize() first"
        )
    inner, _ = _stack(model)
    d = inner.embed_tokens.weight.shape[1]
    n_keep = _keep_count(keep, d)
    windows = _windows(texts, tokenizer, seq_len)
    resume_from = _resume_path(resume, checkpoint_dir)
    names = lora_targets(model, DEFAULT_TARGETS)
    if not names:
        raise UnsupportedModelError(f"no q/k/v/o/gate/up/down Linear in {type(model).__name__} for LoRA")
    params_before = sum(p.numel() for p in model.parameters())
    device = inner.embed_tokens.weight.device
    train_dtype = torch.float32 if device.type == "cpu" else next(model.parameters()).dtype
    dtypes = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    had_peft_config = "peft_config" in model.__dict__
    was_training = model.training

    model.to(train_dtype)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=names,
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    mods = None
    peft_model = None
    merged = False
    try:
        peft_model = get_peft_model(model, config)
        mods = attach(
            model, n_keep, rank=rank, tied=tied, faithful=faithful, mask_scale=mask_lr / lr, seed=seed
        )
        mods._grads = grads
        for p in mods.parameters():
            p.requires_grad_(True)
        if resume_from is not None:
            _load_modules(mods, resume_from)
        schedule = StepSchedule(mods.mask.set_step)

        def loss_fn(m, inputs, outputs, step):
            return mods.losses()

        result = train_causal_lm(
            peft_model, windows, steps=steps, lr=lr, batch_size=batch_size, warmup_steps=warmup_steps,
            seed=seed, callbacks=[schedule, _SaveModules(mods), *callbacks], checkpoint_dir=checkpoint_dir,
            save_steps=save_steps, resume=resume_from or False, progress=progress, loss_fn=loss_fn,
        )  # fmt: skip
        above = int((mods.mask.m > 0).sum())
        with torch.no_grad():
            base = peft_model.merge_and_unload()
        peft_model = None
        if base is not model:
            raise PrunekitError("peft returned a different module than the model it wrapped")
        model.eval()  # the hard gate
        probe = windows[:1, :64].to(device)
        with torch.inference_mode():
            hooked = model(input_ids=probe).logits.float()
        t0 = time.perf_counter()
        info = merge(model, mods, tied=tied)
        merge_s = time.perf_counter() - t0
        with torch.inference_mode():
            merge_error = float((model(input_ids=probe).logits.float() - hooked).abs().max())
        merged = True
    finally:
        if not merged:
            if mods is not None:
                mods.remove()
            if peft_model is not None:
                peft_model.unload()
            with torch.no_grad():
                for n, t in [*model.named_parameters(), *model.named_buffers()]:
                    if n in dtypes and t.dtype != dtypes[n]:
                        t.data = t.data.to(dtypes[n])
            model.train(was_training)
        if not had_peft_config:
            model.__dict__.pop("peft_config", None)
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, p.requires_grad))
    with torch.no_grad():
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            if n in dtypes and t.dtype != dtypes[n] and t.is_floating_point():
                t.data = t.data.to(dtypes[n])
    model.eval()
    last = result.terms[-1] if result.terms else {}
    return PATReport(
        hidden_before=d, hidden_after=info["hidden"][1], keep=n_keep, above_threshold=above,
        steps=result.steps, seconds=result.seconds, merge_seconds=merge_s, merge_error=merge_error,
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()), loss_first=result.losses[0],
        loss_last=result.losses[-1], terms_last=last, faithful=faithful, tied=tied, hsm_rank=rank,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lr=lr, mask_lr=mask_lr, batch_size=batch_size,
        seq_len=windows.shape[1], seed=seed, kept=info["kept"], losses=result.losses,
    )  # fmt: skip


@register(
    "pat",
    family="training",
    paper="PAT: Pruning-Aware Tuning for Large Language Models",
    stages=("fine-tuning",),
    signals=("hidden_mask (trained, shared)", "lora"),
    trains=True,
    summary="one trained mask over the hidden size during LoRA tuning, folded into a narrower model",
)
@dataclass
class PAT:
    """PAT's options as a registry method: ``PAT(keep=0.75)(model, texts, tokenizer=tok)`` is
    :func:`pat` (every option and the model's handling are documented there)."""

    taxonomy: ClassVar[dict] = {
        "which": "weights: hidden size (structured)",
        "speedup": "universal (smaller dense tensors)",
        "how": "learned (a mask trained jointly with LoRA tuning)",
    }
    keep: float | int = 0.75
    steps: int = 150
    rank: int = 32
    lora_rank: int = 20
    lora_alpha: float = 4.0
    lr: float = 2e-4
    mask_lr: float | None = None
    batch_size: int = 2
    seq_len: int = 256
    faithful: bool = False
    tied: str = "mask"

    def __call__(self, model: nn.Module, texts, **kw) -> PATReport:
        return pat(model, texts, **asdict(self), **kw)
