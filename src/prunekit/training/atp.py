"""Training ATP-LLaVA's threshold modules on a frozen VLM (see
:mod:`prunekit.tokens.methods.atp_llava`).

The hard keep rule is relaxed to a soft mask ``m`` per visual token and module; from a module's
layer on, the product of the masks so far enters every decoder layer's attention as a bias on that
token's key (``m = 1``: untouched, ``m -> 0``: the key is hidden, which is what dropping the token
does to every later query): ``log(m)`` for the spec's soft relaxation, or, straight-through (the
default), the hard rule's 0 / 1 forward with the soft mask's gradient and a bias linear in ``m``.
The signals are recomputed from each cut layer's own q/k as the inference path does (pre-softmax
logits; post-softmax instruction attention under the mask), detached; only the modules learn.
The model is restored afterwards (hooks, ``requires_grad``, train/eval mode), also after an
exception.

The loop is the transformers ``Trainer`` (:func:`prunekit.training.train_batches`): Adam (AdamW
without weight decay), a constant learning rate, no gradient clipping, the batches in order, as the
hand-written loop this replaces; so it also runs under ``accelerate launch``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import PrunekitError, UnsupportedModelError
from ..models.attention import causal_allowed, decoder_logits
from ..models.base import HookSet
from ..models.sequence import attention_mask_4d, gather_square
from ..tokens.methods.atp_llava import (
    ATPLLaVA,
    ATPModule,
    hard_keep,
    redundancy_and_features,
    self_importance,
    soft_keep,
    spatial_score,
)
from ..tokens.schedule import mean_tokens
from .loop import train_batches

LOG_FLOOR = 1e-6  # log(mask) is clamped here: a fully dropped key gets -13.8, not -inf


class SoftATP:
    """Hooks that apply ATP's soft masks to one forward call of a VLM (one module, fixed cuts).

    After a call, ``masks`` holds the cumulative soft mask ``(B, N)`` after each cut.
    """

    def __init__(
        self, model: nn.Module, module: ATPModule, temperature: float, r_s: float, lam: float,
        straight_through: bool = False,
    ):  # fmt: skip
        adapter = _vlm_adapter(model)
        impl = model.config.get_text_config()._attn_implementation
        if impl not in ("eager", "sdpa"):
            raise UnsupportedModelError(
                f"training ATP modules adds a float bias to the attention mask, which needs eager or sdpa "
                f"attention; the model uses {impl!r} (model.set_attn_implementation('sdpa'))"
            )
        self.model, self.module, self.adapter = model, module, adapter
        self.layers = adapter.text_model.layers
        self.cuts = module.cuts
        self.temperature, self.r_s, self.lam = temperature, r_s, lam
        self.straight_through = straight_through
        self.index = {id(m): i for i, m in enumerate(self.layers)}
        self.hooks = HookSet()

    def __enter__(self) -> SoftATP:
        for layer in self.layers[self.cuts[0] :]:
            self.hooks.pre(layer, self._on_layer)
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.remove()

    def prepare(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None
    ) -> None:
        """Per call: the visual positions, and the instruction rows (real prompt tokens after the image)."""
        media = torch.tensor(self.adapter.media_token_ids(), device=input_ids.device)
        vis = torch.isin(input_ids, media)
        counts = vis.sum(dim=1)
        if int(counts.min()) == 0 or bool((counts != counts[0]).any()):
            raise PrunekitError(
                f"ATP training needs the same number of visual tokens in every row; got {counts.tolist()}"
            )
        B, L = input_ids.shape
        self.valid = attention_mask.bool()
        self.vpos = vis.nonzero()[:, 1].view(B, -1)  # (B, N) ascending
        after = torch.arange(L, device=vis.device)[None] > self.vpos[:, -1:]
        prompt = labels == -100 if labels is not None else torch.ones_like(vis)
        self.instr = self.valid & after & prompt  # answer tokens are not instruction
        self.masks: list[torch.Tensor] = []
        self.bias = torch.zeros(B, L, device=vis.device)
        self.base: torch.Tensor | None = None

    def _on_layer(self, layer: nn.Module, args: tuple, kw: dict):
        h = args[0] if args else kw["hidden_states"]
        i = self.index[id(layer)]
        if self.base is None:
            self.base = attention_mask_4d(self.valid, self.valid.shape[1], h.dtype, additive=True)
        if i in self.cuts:
            self._cut(self.cuts.index(i), layer, h, kw["position_embeddings"])
        kw["attention_mask"] = self.base + self.bias[:, None, None, :].to(h.dtype)
        if args:
            return (h, *args[1:]), kw
        kw["hidden_states"] = h
        return args, kw

    def _cut(self, c: int, layer: nn.Module, h: torch.Tensor, pe) -> None:
        B, L = self.valid.shape
        vpos, N = self.vpos, self.vpos.shape[1]
        b = torch.arange(B, device=h.device)
        prev = self.masks[-1] if self.masks else torch.ones(B, N, device=h.device)
        alive = prev.detach() > 0.5  # the tokens the hard rule would still have
        with torch.no_grad():
            logits = decoder_logits(layer.self_attn, layer.input_layernorm(h), pe)  # (B, H, L, L)
            logits = logits.masked_fill(~causal_allowed(L, L, self.valid, h.device), float("-inf"))
            vv = gather_square(logits.mean(dim=1, keepdim=True), b, vpos)[:, 0]  # (B, N, N)
            s_self = self_importance(vv.masked_fill(~alive[:, :, None], float("-inf")))  # alive queries
            probs = (logits + self.bias.detach()[:, None, None, :]).softmax(dim=-1).mean(dim=1)  # (B, L, L)
            cols = probs.gather(2, vpos[:, None, :].expand(B, L, N))  # (B, L, N)
            w = self.instr.float()
            s_cross = (cols * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1)
        red, feats = redundancy_and_features(s_self, s_cross, alive)
        index = torch.arange(N, device=h.device).expand(B, N)
        spat = spatial_score(index, torch.full((B,), N, device=h.device), self.r_s, self.lam)
        theta_r, theta_s = self.module.thresholds(c, feats)
        soft = soft_keep(red, spat, theta_r, theta_s, self.temperature)
        if self.straight_through:  # forward: the hard rule (top token included); backward: the soft mask
            hard = hard_keep(red, spat, theta_r.detach(), theta_s.detach()).float()
            mask = prev * (hard + soft - soft.detach())
            bias = (mask - 1) * -math.log(LOG_FLOOR)  # 0 kept, -13.8 dropped; gradient everywhere
        else:
            mask = prev * soft
            bias = mask.clamp_min(LOG_FLOOR).log()
        self.masks.append(mask)
        self.bias = self.bias.index_put((b[:, None].expand(B, N), vpos), bias)


def train_atp(
    model: nn.Module,
    batches: Sequence[dict],
    keep: int | Sequence[int],
    *,
    layers: tuple[int, ...] | None = None,
    steps: int = 60,
    lr: float = 0.05,
    hidden: int = 64,
    temperature: float = 10.0,
    straight_through: bool = True,
    lambda_atp: float = 0.05,
    lambda_target: float = 0.2,
    r_s: float = 0.25,
    lam: float = 3.0,
    seed: int = 0,
    progress: bool = True,
) -> list[ATPModule]:
    """Train one ATP-LLaVA module per budget in ``keep`` on a frozen VLM; returns them.

    Args:
        model: a VLM of a supported family (eager or sdpa attention). Left unchanged.
        batches: model inputs with answers: dicts of ``input_ids``, ``attention_mask`` (left padding),
            ``pixel_values`` (and any other keyword the model takes) and ``labels`` (-100 except
            the answer tokens); cycled for ``steps`` steps.
        keep: target mean number of visual tokens per decoder layer (one module each).
        layers: the cut layers (default: 4/14/24 of 32 scaled to the depth).
        steps, lr: Adam steps and learning rate per module.
        hidden, temperature, lambda_atp, lambda_target, r_s, lam: see the method's docstring.
        straight_through: the forward pass drops exactly what inference drops (the hard rule),
            gradients come from the soft mask (default). ``False``: the spec's soft relaxation
            in the forward pass too, whose hard counts can miss the target (see the method's notes).

    The ``log`` of the per-step losses is on each module as ``module.log``.
    """
    if not batches:
        raise ValueError("train_atp needs at least one batch of training inputs; got none")
    if steps < 1:
        raise ValueError(f"train_atp: steps must be >= 1; got {steps}")
    targets = [keep] if isinstance(keep, int) else list(keep)
    method = ATPLLaVA(layers=layers, r_s=r_s, lam=lam)
    n_layers = len(_vlm_adapter(model).text_model.layers)
    cuts = method.cuts(n_layers)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    out = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        for k in targets:
            out.append(_train_one(model, batches, k, cuts, n_layers, steps, lr, hidden, temperature,
                                  lambda_atp, lambda_target, r_s, lam, seed, progress,
                                  straight_through))  # fmt: skip
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return out


def _train_one(model, batches, k, cuts, n_layers, steps, lr, hidden, temperature, lambda_atp,
               lambda_target, r_s, lam, seed, progress, straight_through) -> ATPModule:  # fmt: skip
    torch.manual_seed(seed)
    first = batches[0]
    N = int(torch.isin(first["input_ids"][0], torch.tensor(_media(model))).sum())
    if not 1 <= k < N:
        raise ValueError(f"train_atp: keep must be in [1, {N - 1}] visual tokens; got {k}")
    lowest = mean_tokens(cuts, [1] * len(cuts), N, n_layers)
    if k < lowest:
        raise ValueError(
            f"train_atp: keep={k} is below what cuts at layers {list(cuts)} allow ({lowest:.1f}: every "
            "layer before the first cut sees all visual tokens); give earlier layers"
        )
    device = next(model.parameters()).device
    module = ATPModule(cuts, k / N, hidden, n_layers).to(device)
    log = []
    with SoftATP(model, module, temperature, r_s, lam, straight_through) as soft:
        wrapped = _Training(model, module, soft)

        def terms(_, inputs, outputs, step):
            kept = [m.sum(dim=-1) for m in soft.masks]  # (B,) soft counts after each cut
            mean = mean_tokens(cuts, kept, N, n_layers)  # (B,) mean visual tokens per layer
            layer_cost = sum((i + 1) * c.mean() / N for i, c in enumerate(kept))
            out = {"layer_cost": lambda_atp * layer_cost, "target": lambda_target * (mean - k).abs().mean()}
            ntp = outputs.loss.detach()
            log.append({"step": step, "loss": float(ntp + sum(v.detach() for v in out.values())),
                        "ntp": float(ntp), "mean_kept": float(mean.mean().detach())})  # fmt: skip
            return out

        train_batches(wrapped, batches, steps=steps, lr=lr, seed=seed, loss_fn=terms, progress=progress,
                      lr_scheduler_type="constant", max_grad_norm=0.0)  # fmt: skip
    module.log = log
    return module.eval()


class _Training(nn.Module):
    """What the ``Trainer`` trains: the ATP module (the only parameters it sees) driving the frozen
    VLM through the soft-mask hooks. ``train()`` switches the module only; the VLM stays in eval."""

    def __init__(self, vlm: nn.Module, module: ATPModule, soft: SoftATP) -> None:
        super().__init__()
        self.atp = module
        self.soft = soft
        object.__setattr__(self, "vlm", vlm)  # not a submodule: its weights stay out of the optimiser

    def forward(self, **batch):
        self.soft.prepare(batch["input_ids"], batch["attention_mask"], batch.get("labels"))
        return self.vlm(**batch)

    def train(self, mode: bool = True):
        self.training = mode
        self.atp.train(mode)
        return self


def _vlm_adapter(model: nn.Module):
    from ..models import get_adapter
    from ..models.vlm import VLMAdapter

    adapter = get_adapter(model)
    if not isinstance(adapter, VLMAdapter):
        raise UnsupportedModelError(
            f"ATP-LLaVA prunes visual tokens inside a VLM's LLM; {type(model).__name__} is a "
            f"{adapter.family} model"
        )
    return adapter


def _media(model: nn.Module) -> list[int]:
    return _vlm_adapter(model).media_token_ids()
