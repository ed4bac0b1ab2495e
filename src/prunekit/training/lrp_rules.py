"""Layer-wise relevance propagation (LRP) natively, and relevance scores for pruning units.

Two papers (spec ``training-aware.md`` §4):

- **Yeom et al. 2021**, "Pruning by Explaining: A Novel Criterion for Deep Neural Network Pruning"
  (Pattern Recognition; code ``seulkiyeom/LRP_pruning``): LRP-α1β0 on convolutions (bias ignored),
  LRP-ε (ε = 1e-6) on Linears, BatchNorm passed through, ReLU identity, pooling and the residual
  sum with ε; start relevance ``output·T / sum(output·T)``; a filter's score is ``Σ_{n,h,w} |R|``
  at the conv output, normalised per layer (``v / Σv``), pruned globally, iteratively with
  fine-tuning.
- **Hatefi et al. 2024**, "Pruning By Explaining Revisited" ("PXP", ECCV-W; code
  ``erfanhatefi/Pruning-by-eXplaining-in-PyTorch``): one rule per depth group (composites), ε
  everywhere by default, attention heads scored on the softmax output; start relevance the one-hot
  of the target class; a conv channel's score is ``Σ_n |Σ_{h,w} R|`` (abs *after* the spatial sum);
  no per-layer normalisation; relevance computed once and every rate pruned one-shot by masking.

**How relevance is computed.** The network runs once under a :class:`torch.overrides.TorchFunctionMode`
that replaces each operation on a relevance-carrying tensor by a custom autograd function whose
backward maps the relevance at its output to the relevance at its inputs; the quantity that flows
backwards *is* the relevance (as in zennit), so ``grad_output`` of a module is the relevance at its
output and module outputs are read with tensor hooks (the official codes' backward hooks on
``grad_output``). Every rule is the input-times-gradient form over a modified forward ``f``:

    ``R_in = x ⊙ ∂(f(x)·S)/∂x``,  ``S = R_out / (f(x) + ε·sign f(x))``  (``sign 0 = +1``)

- **Linear / Conv2d** (the rule the :class:`Composite` picks for the module):
  ``"epsilon"`` (``f`` the layer itself, bias included in ``z``), ``"zplus"`` (Montavon's z⁺:
  ``f(x) = x·W⁺``, bias ignored; meant for non-negative inputs, where it equals α1β0),
  ``"alpha1beta0"`` / ``"alpha2beta1"`` / :class:`Rule` ``("alphabeta", alpha, beta)``: positive
  contributions ``x⁺W⁺ + x⁻W⁻`` and negative ones ``x⁺W⁻ + x⁻W⁺``, each normalised by its own
  sum, ``R = α·R⁺ − β·R⁻``; the bias is ignored as in Yeom's ``posnegconv``.
- **BatchNorm** (eval statistics): ``"pass"`` (Yeom; identity relevance. *Ours*: this equals
  folding the BN into the preceding conv under a bias-ignoring rule such as α1β0 or z⁺ when the BN
  scale ``γ/σ`` is positive, since a positive per-channel factor cancels in the ratio; with a
  negative scale the positive and negative parts would swap, which we do not do) or ``"epsilon"``
  (the affine map with ε; followed by a conv under ε this equals the folded conv under ε up to the
  conv's own stabiliser).
- **ReLU, GELU**: identity (pass-through), as both codes.
- **Pooling** (max, average, adaptive average), ``mean``/``sum`` (ResNet's global average pool),
  **sums** of tensors (the residual addition, a bias or position-embedding addition): ε; the
  2-input residual sum therefore splits ``R`` in proportion to the addends.
- **Multiplication by a constant** (DINOv2's layer scale, the attention ``scaling``): ε, i.e. the
  identity up to ε. A product of *two* relevance-carrying tensors (``Q·Kᵀ``, an elementwise gate)
  uses the uniform rule (AttnLRP / PXP: each factor gets half of the ε share).
- **LayerNorm**: ``"epsilon"`` (default; *ours*, following AttnLRP's identity rule for the
  normalisation: the standard deviation is treated as a constant so LN is a linear centring map
  plus the affine part, then ε) or ``"identity"`` (``R_in = R_out``).
- **Attention softmax**: ``"cp"`` (default; CP-LRP: the attention probabilities ``A`` are a
  constant, no relevance enters ``Q``, ``K``; the product ``A·V`` is ε on ``V``. *Ours*: the
  relevance recorded *at the softmax output* for head scores is the ε share of ``A·V`` that the
  probabilities carry, ``R_A[i,k] = Σ_j A_ik V_kj R_ij / (Z_ij + ε)``, i.e. what the ε rule on
  ``A·V`` would give ``A`` if it were the input) or ``"epsilon"`` (PXP's default "ε everywhere incl.
  softmax": input times gradient of the softmax, ``R_x = x ⊙ (R − s Σ R)`` (AttnLRP's rule), with
  ``A·V`` under the uniform rule). ``F.scaled_dot_product_attention`` is decomposed into
  ``Q·Kᵀ·scale``, softmax, ``A·V`` under these rules (no dropout, masks added with ε).
- Shape and copy operations (view, reshape, transpose, flatten, cat, indexing, dropout in eval
  mode, ``to``) move relevance as the gradient does.

Any other operation on a relevance-carrying tensor (``tanh``, ``conv1d``, ``group_norm``, ...)
raises :class:`~prunekit.errors.UnsupportedModelError` naming the operation, the module type that
called it and the supported ones. Relevance is computed in eval mode, with the parameters'
``requires_grad`` switched off; the mode, the flags and every hook are restored on return, also
after an exception.

**Scores** (:func:`channel_scores`, :func:`neuron_scores`, :func:`head_scores`,
:func:`lrp_scores` per channel group of prunekit's small CNNs/MLPs, :func:`attention_head_scores`
per attention layer of a ViT such as DINOv2) and **selection** (:func:`prune_order`,
:func:`least_relevant`: global, no per-layer quota, as both codes) return keeps in the form
:func:`prunekit.models.convnets.mask_channels` and :func:`~prunekit.models.convnets.remove_channels`
take (for heads: kept head indices per attention module). PXP masks a head by zeroing its softmax
output; zeroing the head's slice of the output projection's input gives the same output.
:func:`prune_iteratively` is Yeom's schedule (5 % of the original units per step, physical removal,
a fine-tuning callback). Baselines in the same format: :func:`weight_l1_scores`,
:func:`taylor_scores`, :func:`gradient_scores`, :func:`random_scores`.

Cost: one forward and one backward whose steps recompute each layer two to four times (αβ: four
convolutions); e.g. DINOv2-S on two 224 px images takes about 3.5 s on one CPU thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedModelError

EPS = 1e-6
_T = torch.Tensor

__all__ = [
    "EPS", "PXP_EPSILON", "YEOM", "Composite", "Relevance", "Rule", "attention_head_scores", "channel_scores",
    "gradient_scores", "head_scores", "least_relevant", "lrp_scores", "neuron_scores", "prune_iteratively",
    "prune_order", "random_scores", "relevance", "taylor_scores", "weight_l1_scores",
]  # fmt: skip


# ------------------------------------------------------------------ rules and composites
@dataclass(frozen=True)
class Rule:
    """An LRP rule for a Linear or Conv2d: ``kind`` ``"epsilon"`` (with ``eps``), ``"zplus"``, or
    ``"alphabeta"`` (with ``alpha - beta = 1``). Strings: ``"epsilon"``, ``"zplus"``,
    ``"alpha1beta0"``, ``"alpha2beta1"``."""

    kind: str
    eps: float = EPS
    alpha: float = 1.0
    beta: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("epsilon", "zplus", "alphabeta"):
            raise ValueError(f"Rule kind must be 'epsilon', 'zplus' or 'alphabeta'; got {self.kind!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps >= 0 and math.isfinite(self.eps)):
            raise ValueError(f"Rule eps must be a finite number >= 0; got {self.eps!r}")
        if self.kind == "alphabeta" and (self.beta < 0 or abs(self.alpha - self.beta - 1) > 1e-12):
            raise ValueError(
                f"alpha-beta needs beta >= 0 and alpha - beta = 1; got {self.alpha}, {self.beta}"
            )

    @staticmethod
    def of(rule: Rule | str) -> Rule:
        if isinstance(rule, Rule):
            return rule
        table = {
            "epsilon": Rule("epsilon"), "zplus": Rule("zplus"),
            "alpha1beta0": Rule("alphabeta", alpha=1.0, beta=0.0),
            "alpha2beta1": Rule("alphabeta", alpha=2.0, beta=1.0),
        }  # fmt: skip
        if rule not in table:
            raise ValueError(f"unknown LRP rule {rule!r}; use one of {sorted(table)} or a Rule")
        return table[rule]


@dataclass(frozen=True)
class Composite:
    """Which rule each part of the network gets.

    ``layers``: module type (matched along the class hierarchy) or module name (exact; wins over
    types) -> :class:`Rule` or rule string, for every ``nn.Linear`` / ``nn.Conv2d``; unmatched ones
    get ``default``. ``batchnorm`` ``"pass"|"epsilon"``, ``layernorm`` ``"epsilon"|"identity"``,
    ``softmax`` ``"cp"|"epsilon"``; ``eps`` stabilises every ε rule that is not a layer's (sums,
    pooling, norms, products). :meth:`by_depth` builds PXP's per-depth composite."""

    layers: Mapping = field(default_factory=dict)
    default: Rule | str = "epsilon"
    batchnorm: str = "pass"
    layernorm: str = "epsilon"
    softmax: str = "cp"
    eps: float = EPS

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("batchnorm", self.batchnorm, ("pass", "epsilon")),
            ("layernorm", self.layernorm, ("epsilon", "identity")),
            ("softmax", self.softmax, ("cp", "epsilon")),
        ):
            if value not in allowed:
                raise ValueError(f"Composite {name} must be one of {allowed}; got {value!r}")
        Rule.of(self.default)
        for key, r in self.layers.items():
            if not (isinstance(key, str) or (isinstance(key, type) and issubclass(key, nn.Module))):
                raise ValueError(f"Composite layers keys must be module types or names; got {key!r}")
            Rule.of(r)
        if not (isinstance(self.eps, (int, float)) and self.eps >= 0):
            raise ValueError(f"Composite eps must be a number >= 0; got {self.eps!r}")

    def rule_for(self, name: str, module: nn.Module | None) -> Rule:
        if name in self.layers:
            return Rule.of(self.layers[name])
        if module is not None:
            for cls in type(module).__mro__:
                if cls in self.layers:
                    return Rule.of(self.layers[cls])
        return Rule.of(self.default)

    @classmethod
    def by_depth(
        cls,
        model: nn.Module,
        first: Rule | str = "epsilon",
        middle: Rule | str = "epsilon",
        last: Rule | str = "epsilon",
        fc: Rule | str = "epsilon",
        **kw,
    ) -> Composite:
        """PXP's per-depth composite: the Linears/Convs in module order, the last one the classifier
        (``fc``), the first 25 % of the others ``first``, the last 25 % ``last``, the rest
        ``middle`` (25 % rounded down, at least one layer each when there are four or more)."""
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not names:
            raise UnsupportedModelError(f"{type(model).__name__} has no Linear or Conv2d layer to give rules")
        hidden, rules = names[:-1], {names[-1]: fc}
        q = len(hidden) // 4
        for i, n in enumerate(hidden):
            rules[n] = first if i < q else last if i >= len(hidden) - q else middle
        return cls(layers=rules, **kw)


#: Yeom et al.: α1β0 on convolutions, ε on Linears, BN passed through, CP for attention (unused).
YEOM = Composite(layers={nn.Conv2d: "alpha1beta0", nn.Linear: "epsilon"}, batchnorm="pass")
#: PXP's default configuration: ε everywhere, the softmax included.
PXP_EPSILON = Composite(default="epsilon", batchnorm="epsilon", layernorm="epsilon", softmax="epsilon")


# ------------------------------------------------------------------ the propagation machinery
def _stab(z: _T, eps: float) -> _T:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _ixg(fn: Callable, xs: Sequence[_T], R: _T, eps: float, share: float = 1.0) -> list[_T]:
    """``R_i = share · x_i ⊙ ∂(fn(*xs)·S)/∂x_i`` with ``S = R / (fn(*xs) + ε sign)``."""
    leaves = [x.detach().requires_grad_(True) for x in xs]
    with torch.enable_grad():
        z = fn(*leaves)
        S = R / _stab(z.detach(), eps)
        grads = torch.autograd.grad(z, leaves, S, allow_unused=True)
    out = []
    for x, g in zip(leaves, grads, strict=True):
        if g is None:
            out.append(torch.zeros_like(x))
        else:  # a -inf attention-mask entry times its zero gradient carries no relevance (not nan)
            r = x.detach() * g * share
            out.append(torch.where(torch.isfinite(x.detach()), r, torch.zeros((), dtype=r.dtype)))
    return out


class _RuleFn(torch.autograd.Function):
    """Forward: ``call(*xs)``; backward: ``backward(R, *xs)`` -> one relevance per input."""

    @staticmethod
    def forward(ctx, call, backward, *xs):
        ctx.backward = backward
        ctx.save_for_backward(*xs)
        out = call(*xs)
        return out.clone() if any(out is x for x in xs) or out._base is not None else out

    @staticmethod
    def backward(ctx, R):
        rels = ctx.backward(R, *ctx.saved_tensors)
        return (None, None, *rels)


def _is_var(a) -> bool:
    return isinstance(a, torch.Tensor) and a.requires_grad


def _split(args: tuple, kwargs: dict):
    """Positions of the relevance-carrying tensors among the top-level arguments, and a function
    that calls with them substituted."""
    pos = [i for i, a in enumerate(args) if _is_var(a)]
    keys = [k for k, v in kwargs.items() if _is_var(v)]
    xs = [args[i] for i in pos] + [kwargs[k] for k in keys]

    def subst(vs, over_args: dict | None = None, over_kw: dict | None = None):
        a, kw = list(args), dict(kwargs)
        for i, v in zip(pos, vs[: len(pos)], strict=True):
            a[i] = v
        for k, v in zip(keys, vs[len(pos) :], strict=True):
            kw[k] = v
        for i, v in (over_args or {}).items():
            if i < len(a):
                a[i] = v
        for k, v in (over_kw or {}).items():
            kw[k] = v
        return a, kw

    return xs, subst


_LAYER_FUNCS = {F.linear: "Linear", F.conv2d: "Conv2d"}
_PASS_ACT = {F.relu, torch.relu, _T.relu, F.gelu}
_SUMS = {
    torch.add, _T.add, _T.__add__, _T.__radd__, _T.__iadd__, torch.sub, _T.sub, _T.__sub__, _T.__rsub__,
    _T.__isub__, torch.mean, _T.mean, torch.sum, _T.sum, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d, _T.__neg__, torch.neg,
}  # fmt: skip
_PRODUCTS = {
    torch.mul, _T.mul, _T.__mul__, _T.__rmul__, _T.__imul__, torch.matmul, _T.matmul, _T.__matmul__,
    torch.bmm, _T.bmm, torch.div, _T.div, _T.__truediv__, _T.__itruediv__,
}  # fmt: skip
_SOFTMAX = {F.softmax, torch.softmax, _T.softmax}
_PASSTHROUGH = {
    _T.view, _T.view_as, _T.reshape, _T.reshape_as, torch.reshape, _T.flatten, torch.flatten, _T.unflatten,
    _T.transpose, torch.transpose, _T.permute, torch.permute, _T.contiguous, _T.unsqueeze, torch.unsqueeze,
    _T.squeeze, torch.squeeze, _T.expand, _T.expand_as, _T.__getitem__, torch.cat, torch.concat,
    torch.stack, _T.split, torch.split, _T.chunk, torch.chunk, _T.unbind, torch.unbind, _T.narrow,
    _T.select, _T.to, _T.float, _T.type_as, _T.clone, F.dropout, torch.dropout, F.pad, _T.repeat,
    _T.t, _T.T.__get__, _T.mT.__get__, _T.movedim, torch.movedim,
}  # fmt: skip
SUPPORTED_MODULES = (
    "Linear", "Conv2d", "BatchNorm2d", "LayerNorm", "ReLU", "GELU", "MaxPool2d", "AvgPool2d",
    "AdaptiveAvgPool2d", "Flatten", "Dropout (eval)", "Identity", "attention (softmax, matmul, "
    "scaled_dot_product_attention)", "residual additions",
)  # fmt: skip


def _fname(func) -> str:
    mod = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    return f"{mod}.{name}" if mod else name


class _LRPMode(TorchFunctionMode):
    def __init__(self, run: _Run) -> None:
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        run = self.run
        if any(_is_var(a) for a in (*args, *kwargs.values())):
            if func in _LAYER_FUNCS:
                return run.layer(func, args, kwargs)
            if func is F.batch_norm:
                return run.batchnorm(func, args, kwargs)
            if func is F.layer_norm:
                return run.layernorm(func, args, kwargs)
            if func in _PASS_ACT:
                kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
                args = args[:1] if func is F.relu else args
                return _RuleFn.apply(lambda x: func(x, *args[1:], **kwargs), lambda R, x: (R,), args[0])
            if func in _SUMS:
                return run.eps_rule(func, args, kwargs, product=False)
            if func in _PRODUCTS:
                return run.product(func, args, kwargs)
            if func in _SOFTMAX:
                return run.softmax(func, args, kwargs)
            if func is F.scaled_dot_product_attention:
                return run.sdpa(args, kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.requires_grad and out.is_floating_point():
            if func not in _PASSTHROUGH:
                name, module = run.where()
                raise UnsupportedModelError(
                    f"LRP has no rule for {_fname(func)}, called inside {type(module).__name__} "
                    f"{name!r}; supported: {', '.join(SUPPORTED_MODULES)}"
                )
            if any(getattr(a, "_prunekit_attn", None) for a in args if isinstance(a, torch.Tensor)):
                out._prunekit_attn = True
        return out


class _Run:
    """State of one relevance pass: the composite, the module stack, recorded relevances."""

    def __init__(self, model: nn.Module, composite: Composite) -> None:
        self.model, self.c = model, composite
        self.stack: list[tuple[str, nn.Module]] = [("", model)]
        self.attention: dict[str, _T] = {}

    def where(self) -> tuple[str, nn.Module]:
        return self.stack[-1]

    # -- layers
    def layer(self, func, args, kwargs):
        name, module = self.where()
        rule = self.c.rule_for(name, module)
        xs, subst = _split(args, kwargs)
        w_in_kw = "weight" in kwargs
        weight = kwargs["weight"] if w_in_kw else args[1]
        if _is_var(weight) or len(xs) != 1:
            raise UnsupportedModelError(
                f"LRP: {_fname(func)} in {type(module).__name__} {name!r} has a relevance-carrying weight; "
                "only the input may carry relevance"
            )
        weight = weight.detach()

        def call(x, w, bias=True):
            over = {1: w} if not w_in_kw else {}
            okw = {"weight": w} if w_in_kw else {}
            if not bias:
                if "bias" in kwargs:
                    okw["bias"] = None
                else:
                    over[2] = None
            a, kw = subst([x], over, okw)
            return func(*a, **kw)

        def backward(R, x):
            if rule.kind == "epsilon":
                return tuple(_ixg(lambda x_: call(x_, weight), [x], R, rule.eps))
            wp, wn = weight.clamp(min=0), weight.clamp(max=0)
            if rule.kind == "zplus":
                return tuple(_ixg(lambda x_: call(x_, wp, False), [x], R, rule.eps))
            xp, xn = x.clamp(min=0), x.clamp(max=0)
            rp = _ixg(
                lambda a, b: call(a, wp, False) + call(b, wn, False), [xp, xn], R * rule.alpha, rule.eps
            )
            out = rp[0] + rp[1]
            if rule.beta:
                rn = _ixg(
                    lambda a, b: call(a, wn, False) + call(b, wp, False), [xp, xn], R * rule.beta, rule.eps
                )
                out = out - rn[0] - rn[1]
            return (out,)

        return _RuleFn.apply(lambda x: func(*args, **kwargs), backward, xs[0])

    def batchnorm(self, func, args, kwargs):
        if self.c.batchnorm == "pass":
            return _RuleFn.apply(lambda x: func(*args, **kwargs), lambda R, x: (R,), args[0])
        return self.eps_rule(func, args, kwargs, product=False)

    def layernorm(self, func, args, kwargs):
        if self.c.layernorm == "identity":
            return _RuleFn.apply(lambda x: func(*args, **kwargs), lambda R, x: (R,), args[0])
        xs, _ = _split(args, kwargs)
        if len(xs) != 1:
            raise UnsupportedModelError("LRP: a LayerNorm whose weight carries relevance is not supported")
        a = list(args) + [None] * (5 - len(args))
        shape = kwargs.get("normalized_shape", a[1])
        weight, bias = kwargs.get("weight", a[2]), kwargs.get("bias", a[3])
        ln_eps = kwargs.get("eps", a[4] if a[4] is not None else 1e-5)
        dims = tuple(range(-len(shape), 0))
        eps = self.c.eps

        def frozen_std(x):  # AttnLRP's identity rule: the standard deviation is a constant
            centred = x - x.mean(dims, keepdim=True)
            std = (x.detach().var(dims, unbiased=False, keepdim=True) + ln_eps).sqrt()
            y = centred / std
            if weight is not None:
                y = y * weight.detach()
            if bias is not None:
                y = y + bias.detach()
            return y

        return _RuleFn.apply(
            lambda x: func(*args, **kwargs), lambda R, x: tuple(_ixg(frozen_std, [x], R, eps)), xs[0]
        )

    # -- sums, products, attention
    def eps_rule(self, func, args, kwargs, product: bool, share: float | None = None):
        xs, subst = _split(args, kwargs)
        eps = self.c.eps

        def call(*vs):
            a, kw = subst(list(vs))
            return func(*a, **kw)

        if share is None:
            share = 1.0 / len(xs) if product else 1.0
        return _RuleFn.apply(call, lambda R, *vs: tuple(_ixg(call, vs, R, eps, share)), *xs)

    def product(self, func, args, kwargs):
        xs, _ = _split(args, kwargs)
        if func in (torch.div, _T.div, _T.__truediv__, _T.__itruediv__) and (
            (len(args) > 1 and _is_var(args[1])) or _is_var(kwargs.get("other"))
        ):
            name, module = self.where()
            raise UnsupportedModelError(
                f"LRP: division by a relevance-carrying tensor in {type(module).__name__} {name!r} is not "
                "supported"
            )
        first = args[0] if args else None
        if len(xs) == 2 and getattr(first, "_prunekit_attn", None) and self.c.softmax == "cp":
            # CP-LRP: A·V, all relevance to V; A's ε share is recorded (the softmax lets none through)
            return self.eps_rule(func, args, kwargs, product=True, share=1.0)
        return self.eps_rule(func, args, kwargs, product=True)

    def softmax(self, func, args, kwargs):
        name, _ = self.where()
        x = args[0]
        if self.c.softmax == "cp":
            out = _RuleFn.apply(lambda x_: func(*args, **kwargs), lambda R, x_: (None,), x)
        else:
            out = self.eps_rule(func, args, kwargs, product=False)
        out._prunekit_attn = True
        key, n = name or "<model>", 0
        while key in self.attention or f"{key}#{n}" in self.attention:
            n += 1
            key = f"{name or '<model>'}#{n}"
        self.attention[key] = None

        def record(g, key=key):
            self.attention[key] = g.detach()

        out.register_hook(record)
        return out

    def sdpa(self, args, kwargs):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        p = dict(zip(names, args, strict=False)) | kwargs
        q, k, v = p["query"], p["key"], p["value"]
        if p.get("enable_gqa"):
            raise UnsupportedModelError("LRP: scaled_dot_product_attention with enable_gqa is not supported")
        scale = p.get("scale") or q.shape[-1] ** -0.5
        mode = _LRPMode(self)
        with mode:  # re-enter so that the decomposed operations get their rules
            s = torch.matmul(q, k.transpose(-2, -1)) * scale
            mask = p.get("attn_mask")
            if p.get("is_causal"):
                n, m = q.shape[-2], k.shape[-2]
                causal = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
                mask = causal if mask is None else mask & causal
            if mask is not None:
                if mask.dtype == torch.bool:
                    s = s.masked_fill(~mask, float("-inf"))
                else:
                    s = s + mask
            a = torch.softmax(s, dim=-1)
            return torch.matmul(a, v)


_PASSTHROUGH.add(_T.masked_fill)


@dataclass
class Relevance:
    """What :func:`relevance` returns: ``outputs`` (module name -> relevance at its output, the
    module's output shape), ``attention`` (``"<attention module>"`` -> relevance at its softmax
    output ``(B, H, N, N)``, in call order; ``#1``, ``#2`` for repeated calls), ``input`` (at the
    input tensor), ``start`` (the start relevance at the logits) and ``logits``."""

    outputs: dict[str, _T]
    attention: dict[str, _T]
    input: _T
    start: _T
    logits: _T


_STARTS = ("onehot", "logit", "normalized")


def _logits(out) -> _T:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    raise UnsupportedModelError(
        f"relevance: the model returned {type(out).__name__}; it must return logits (a tensor, or an output "
        "with .logits)"
    )


def _start(logits: _T, target, start: str) -> _T:
    if start not in _STARTS:
        raise ValueError(f"start must be one of {_STARTS}; got {start!r}")
    if logits.dim() != 2:
        raise ValueError(f"relevance: logits must be (batch, classes); got shape {tuple(logits.shape)}")
    B, C = logits.shape
    if target is None:
        t = logits.argmax(-1)
    else:
        t = torch.as_tensor(target, device=logits.device).long().reshape(-1)
        if t.numel() == 1 and B > 1:
            t = t.expand(B)
        if t.numel() != B or bool((t < 0).any()) or bool((t >= C).any()):
            raise ValueError(f"target must be one class in [0, {C - 1}] or {B} of them; got {target!r}")
    T = F.one_hot(t, C).to(logits.dtype)
    if start == "onehot":
        return T
    z = logits.detach() * T
    if start == "logit":
        return z
    total = z.sum()
    if float(total) == 0.0:
        raise ValueError("start='normalized': the target logits sum to 0 over the batch; use 'onehot'")
    return z / total


def relevance(
    model: nn.Module,
    inputs,
    target=None,
    composite: Composite = YEOM,
    start: str = "onehot",
    at: Iterable[str] = (),
    input_name: str = "pixel_values",
) -> Relevance:
    """LRP relevance of ``model`` for ``inputs``.

    ``inputs``: a tensor (passed as the first argument) or a dict of keyword arguments whose
    ``input_name`` entry is the input to explain. ``target``: a class or one per sample (default:
    the predicted class). ``start``: ``"onehot"`` (PXP: the one-hot of the target), ``"logit"``
    (Yeom's toy code: ``output ⊙ onehot``), ``"normalized"`` (Yeom: ``output·T / sum(output·T)``;
    *ours*: the sum is over the whole batch as a plain ``torch.sum``; per sample it is ``+1`` at the
    target, i.e. the one-hot). ``at``: module names whose output relevance to return.
    The model runs in eval mode; its mode, its parameters' ``requires_grad`` and its hooks are
    restored on return, also after an exception."""
    if not isinstance(composite, Composite):
        raise ValueError(f"composite must be a Composite; got {type(composite).__name__}")
    if start not in _STARTS:
        raise ValueError(f"start must be one of {_STARTS}; got {start!r}")
    at = [at] if isinstance(at, str) else list(at)
    modules = dict(model.named_modules())
    bad = [n for n in at if n not in modules]
    if bad:
        raise ValueError(f"at names unknown modules {bad}; e.g. {list(modules)[1:6]}")
    if isinstance(inputs, torch.Tensor):
        x = inputs.detach().clone().requires_grad_(True)
        call_args, call_kw = (x,), {}
    elif isinstance(inputs, Mapping) and input_name in inputs:
        x = inputs[input_name].detach().clone().requires_grad_(True)
        call_args, call_kw = (), {**inputs, input_name: x}
        call_kw.pop("labels", None)
    else:
        raise ValueError(
            f"inputs must be a tensor or a dict with {input_name!r}; got {type(inputs).__name__}"
        )
    if not x.is_floating_point():
        raise ValueError(f"the input to explain must be floating point; got {x.dtype}")

    run = _Run(model, composite)
    outputs: dict[str, _T | None] = {}
    handles = []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was = model.training

    def pre(name):
        def hook(mod, args):
            run.stack.append((name, mod))

        return hook

    def post(name):
        def hook(mod, args, out):
            if run.stack and run.stack[-1][1] is mod:
                run.stack.pop()
            if name in at:
                t = out if isinstance(out, torch.Tensor) else next(
                    (o for o in (out.values() if isinstance(out, Mapping) else out)
                     if isinstance(o, torch.Tensor)),
                    None,
                )  # fmt: skip
                if name in outputs:
                    raise UnsupportedModelError(
                        f"relevance: module {name!r} ran twice; pick a module that runs once"
                    )
                outputs[name] = None
                if t is not None and t.requires_grad:

                    def keep(g, name=name):
                        outputs[name] = g.detach()

                    t.register_hook(keep)

        return hook

    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        for name, mod in modules.items():
            if mod is model:
                continue
            handles.append(mod.register_forward_pre_hook(pre(name)))
            handles.append(mod.register_forward_hook(post(name)))
        with _LRPMode(run):
            logits = _logits(model(*call_args, **call_kw))
        R0 = _start(logits, target, start)
        (rin,) = torch.autograd.grad(logits, x, R0, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was)
    rin = torch.zeros_like(x) if rin is None else rin
    outs = {n: (torch.zeros(()) if v is None else v) for n, v in outputs.items()}
    atts = {n: v for n, v in run.attention.items() if v is not None}
    return Relevance(outs, atts, rin.detach(), R0, logits.detach())


# ------------------------------------------------------------------ unit scores
_ABS = ("before_sum", "after_sum")


def channel_scores(rel: _T, abs: str = "before_sum") -> _T:
    """Conv channel scores from relevance ``(B, C, H, W)`` at a conv output: ``"before_sum"``
    (Yeom: ``Σ_{n,h,w} |R|``) or ``"after_sum"`` (PXP: ``Σ_n |Σ_{h,w} R|``). ``(B, C)`` is taken as
    Linear neurons."""
    if abs not in _ABS:
        raise ValueError(f"abs must be one of {_ABS}; got {abs!r}")
    if rel.dim() < 2:
        raise ValueError(f"channel relevance must be (B, C, ...); got shape {tuple(rel.shape)}")
    r = rel.flatten(2) if rel.dim() > 2 else rel.unsqueeze(-1)  # (B, C, HW)
    return r.abs().sum((0, 2)) if abs == "before_sum" else r.sum(2).abs().sum(0)


def neuron_scores(rel: _T) -> _T:
    """Linear neuron scores from relevance ``(B, D)`` or ``(B, N, D)`` at a Linear's output: abs,
    then Σ over batch and tokens (PXP; for ``(B, D)`` also Yeom's)."""
    if rel.dim() < 2:
        raise ValueError(f"neuron relevance must be (B, D) or (B, N, D); got shape {tuple(rel.shape)}")
    return rel.abs().flatten(0, -2).sum(0)


def head_scores(attn_rel: _T, abs: str = "after_sum") -> _T:
    """Attention head scores from relevance ``(B, H, N, N)`` at the softmax output: PXP's
    ``"after_sum"`` Σ over keys, abs, Σ over batch and query tokens -> ``(H,)``; ``"before_sum"``
    takes the abs first."""
    if abs not in _ABS:
        raise ValueError(f"abs must be one of {_ABS}; got {abs!r}")
    if attn_rel.dim() != 4:
        raise ValueError(f"attention relevance must be (B, H, N, N); got shape {tuple(attn_rel.shape)}")
    r = attn_rel.sum(-1).abs() if abs == "after_sum" else attn_rel.abs().sum(-1)  # (B, H, N)
    return r.sum((0, 2))


def _producers(model: nn.Module) -> dict[str, tuple[str, ...]]:
    from ..models.convnets import groups

    return {name: g.producers for name, g in groups(model).items()}


def _batches(batches, key: str = "pixel_values") -> list[dict]:
    if isinstance(batches, Mapping):
        batches = [batches]
    batches = list(batches)
    if not batches or not all(isinstance(b, Mapping) and key in b for b in batches):
        raise ValueError(f"batches must be a non-empty list of dicts with {key!r} (and 'labels')")
    return batches


def _normalize(scores: dict[str, _T], normalize: str | None) -> dict[str, _T]:
    if normalize not in ("layer_l1", None):
        raise ValueError(f"normalize must be 'layer_l1' or None; got {normalize!r}")
    if normalize is None:
        return scores
    return {k: v / v.sum().clamp_min(torch.finfo(v.dtype).tiny) for k, v in scores.items()}


def lrp_scores(
    model: nn.Module,
    batches,
    composite: Composite = YEOM,
    start: str = "normalized",
    abs: str = "before_sum",
    normalize: str | None = "layer_l1",
) -> dict[str, _T]:
    """LRP relevance per channel group of a :class:`~prunekit.models.convnets.MLP`, ``ConvNet`` or
    ``ResNetLite`` (``{group name: (width,)}``, the groups of
    :func:`prunekit.models.convnets.groups`), summed over ``batches`` (dicts with ``pixel_values``
    and ``labels``; the labels are the targets).

    Defaults are Yeom's (α1β0 convs, ε Linears, normalized start, ``Σ|R|``, per-layer ``v/Σv``);
    PXP: ``composite=PXP_EPSILON, start="onehot", abs="after_sum", normalize=None``. A unit's
    relevance is read at its producers' outputs (the conv or Linear output, before BN). *Ours*: a
    residual stream's channel score is the sum of the scores at every conv that adds into it (the
    stem or projection and each block's conv2), normalised as one layer."""
    prod = _producers(model)
    names = sorted({p for ps in prod.values() for p in ps})
    total: dict[str, _T] = {}
    for b in _batches(batches):
        rel = relevance(model, b["pixel_values"], b.get("labels"), composite, start, at=names)
        for g, ps in prod.items():
            s = sum(channel_scores(rel.outputs[p], abs) for p in ps)
            total[g] = total[g] + s if g in total else s
    return _normalize(total, normalize)


def attention_head_scores(
    model: nn.Module,
    batches,
    composite: Composite = PXP_EPSILON,
    start: str = "onehot",
    abs: str = "after_sum",
    normalize: str | None = None,
    input_name: str = "pixel_values",
) -> dict[str, _T]:
    """Head scores ``{attention module name: (H,)}`` of every attention softmax (eager or
    ``scaled_dot_product_attention``) of a classifier, e.g. a DINOv2 backbone under a linear probe,
    summed over ``batches`` (dicts with ``input_name`` and ``labels``, the targets). PXP's defaults:
    ε everywhere, one-hot start, Σ keys -> abs -> Σ batch and tokens, no normalisation. Heads are
    ranked globally over layers with :func:`least_relevant` (keep indices per layer)."""
    total: dict[str, _T] = {}
    for b in _batches(batches, input_name):
        rel = relevance(model, b, b.get("labels"), composite, start, input_name=input_name)
        if not rel.attention:
            raise UnsupportedModelError(f"{type(model).__name__} ran no attention softmax; nothing to score")
        for k, v in rel.attention.items():
            total[k] = total[k] + head_scores(v, abs) if k in total else head_scores(v, abs)
    return _normalize(total, normalize)


def _check_rate(rate) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"rate must be a number in [0, 1); got {rate!r}")
    return float(rate)


def _check_scores(scores: Mapping[str, _T]) -> dict[str, _T]:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty dict group name -> 1-D score tensor")
    out = {}
    for k, v in scores.items():
        v = torch.as_tensor(v).detach().float().cpu()
        if v.dim() != 1 or v.numel() == 0 or not bool(torch.isfinite(v).all()):
            raise ValueError(
                f"scores[{k!r}] must be a non-empty 1-D finite tensor; got shape {tuple(v.shape)}"
            )
        out[k] = v
    return out


def prune_order(scores: Mapping[str, _T]) -> list[tuple[str, int]]:
    """Every unit ``(group, index)``, least relevant first, compared globally across groups (PXP's
    concatenation and ``topk(largest=False)``, Yeom's ``nsmallest``). Ties keep group order, then
    index order (a stable sort)."""
    s = _check_scores(scores)
    keys = list(s)
    flat = torch.cat(list(s.values()))
    gid = torch.cat([torch.full((len(v),), i) for i, v in enumerate(s.values())])
    idx = torch.cat([torch.arange(len(v)) for v in s.values()])
    order = torch.sort(flat, stable=True).indices
    return [(keys[g], i) for g, i in zip(gid[order].tolist(), idx[order].tolist(), strict=True)]


def least_relevant(scores: Mapping[str, _T], rate: float, min_keep: int = 1) -> dict[str, _T]:
    """Remove the ``int(rate · total)`` least relevant units globally (PXP's count) and return the
    keeps ``{group: sorted kept indices}`` for :func:`~prunekit.models.convnets.mask_channels` /
    ``remove_channels`` (or per attention layer for heads). *Ours*: every group keeps at least
    ``min_keep`` units (its most relevant ones), since our surgery cannot empty a group; the units
    this spares are not replaced by others, so slightly fewer units may go than ``int(rate·total)``
    at very high rates."""
    rate = _check_rate(rate)
    s = _check_scores(scores)
    return _drop_least(s, int(rate * sum(len(v) for v in s.values())), min_keep)


def _drop_least(s: dict[str, _T], k: int, min_keep: int) -> dict[str, _T]:
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 0:
        raise ValueError(f"min_keep must be an int >= 0; got {min_keep!r}")
    sizes = [len(v) for v in s.values()]
    total = sum(sizes)
    flat = torch.cat(list(s.values()))
    order = torch.sort(flat, stable=True).indices
    drop = torch.zeros(total, dtype=torch.bool)
    drop[order[:k]] = True
    keeps, start = {}, 0
    for name, v, n in zip(s, s.values(), sizes, strict=True):
        d = drop[start : start + n].clone()
        protect = min(min_keep, n)
        if protect and int((~d).sum()) < protect:
            top = torch.sort(v, descending=True, stable=True).indices[:protect]
            d[top] = False
        keeps[name] = (~d).nonzero().flatten()
        start += n
    return keeps


def prune_iteratively(
    model: nn.Module,
    batches,
    steps: int = 18,
    step_fraction: float = 0.05,
    fine_tune: Callable[[nn.Module, int], None] | None = None,
    composite: Composite = YEOM,
    start: str = "normalized",
    abs: str = "before_sum",
    normalize: str | None = "layer_l1",
) -> list:
    """Yeom et al.'s iterative schedule on a :class:`~prunekit.models.convnets.MLP`, ``ConvNet`` or
    ``ResNetLite``, in place: at each of ``steps`` steps, score with :func:`lrp_scores` on ``batches``,
    physically remove (:func:`~prunekit.models.convnets.remove_channels`) the
    ``int(step_fraction · original unit count)`` least relevant units globally (5 % of the
    **original** count per step, 18 steps ~ 90 %, as ``prune_resnet.py``), then call
    ``fine_tune(model, step)`` (Yeom: 10 epochs of SGD; build a new optimizer inside, the Parameters
    are new after surgery). Returns the :class:`~prunekit.models.convnets.SurgeryReport` of each step.
    *Ours*: every group keeps at least one unit, so the last steps may remove fewer."""
    from ..models.convnets import groups, remove_channels

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")
    if (
        isinstance(step_fraction, bool)
        or not isinstance(step_fraction, (int, float))
        or not 0 < step_fraction < 1
    ):
        raise ValueError(f"step_fraction must be a number in (0, 1); got {step_fraction!r}")
    per_step = int(step_fraction * sum(g.width for g in groups(model).values()))
    if per_step < 1:
        raise ValueError(f"step_fraction={step_fraction} removes no unit of this network per step")
    reports = []
    for step in range(steps):
        scores = _check_scores(lrp_scores(model, batches, composite, start, abs, normalize))
        reports.append(remove_channels(model, _drop_least(scores, per_step, 1)))
        if fine_tune is not None:
            fine_tune(model, step)
    return reports


# ------------------------------------------------------------------ baselines
def weight_l1_scores(model: nn.Module) -> dict[str, _T]:
    """Filter norm: the L1 norm of each unit's outgoing weights (a conv filter ``W[j]`` or a Linear
    row) at its producers, summed over the producers of a residual stream (*ours*)."""
    out = {}
    for g, ps in _producers(model).items():
        out[g] = sum(model.get_submodule(p).weight.detach().abs().flatten(1).sum(1) for p in ps)
    return out


def _acts_grads(model: nn.Module, batches) -> dict[str, list[tuple[_T, _T]]]:
    """Producers' outputs and the cross-entropy loss's gradients there, per batch (eval mode)."""
    prod = _producers(model)
    names = sorted({p for ps in prod.values() for p in ps})
    store: dict[str, list] = {n: [] for n in names}
    was = model.training
    handles = []

    def hook(name):
        def h(mod, args, out):
            store[name].append(out)

        return h

    try:
        model.eval()
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(hook(n)))
        for b in _batches(batches):
            logits = _logits(model(b["pixel_values"].detach().requires_grad_(True)))
            loss = F.cross_entropy(logits, b["labels"], reduction="sum")
            grads = torch.autograd.grad(loss, [store[n][-1] for n in names])
            for n, g in zip(names, grads, strict=True):
                store[n][-1] = (store[n][-1].detach(), g.detach())
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return store


def taylor_scores(model: nn.Module, batches) -> dict[str, _T]:
    """First-order Taylor ``|a·g|`` (Molchanov et al. 2017): per sample ``|Σ_{h,w} a·g|`` at the
    unit's producer output, summed over samples, ``g`` the gradient of the summed cross-entropy;
    residual streams sum over their producers (*ours*)."""
    store = _acts_grads(model, batches)
    return {
        g: sum(channel_scores(a * gr, "after_sum") for p in ps for a, gr in store[p])
        for g, ps in _producers(model).items()
    }


def gradient_scores(model: nn.Module, batches) -> dict[str, _T]:
    """Plain gradient: ``Σ_{n,h,w} |∂L/∂a|`` at the unit's producer output (*ours*: the
    activation gradient of the summed cross-entropy)."""
    store = _acts_grads(model, batches)
    return {
        g: sum(channel_scores(gr, "before_sum") for p in ps for _, gr in store[p])
        for g, ps in _producers(model).items()
    }


def random_scores(model: nn.Module, seed: int = 0) -> dict[str, _T]:
    """Uniform random scores per unit from a seeded generator (the global RNG is untouched)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int; got {seed!r}")
    from ..models.convnets import groups

    gen = torch.Generator().manual_seed(seed)
    return {name: torch.rand(g.width, generator=gen) for name, g in groups(model).items()}
