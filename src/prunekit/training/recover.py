"""LoRA recovery after structured pruning, merged back into the weights.

LLM-Pruner (Ma et al., NeurIPS 2023, "LLM-Pruner: On the Structural Pruning of Large Language
Models") recovers a pruned model with LoRA on every q/k/v/o/gate/up/down projection (rank 8,
alpha 16, dropout 0.05, lr 1e-4, AdamW, linear schedule; its scripts train 2 epochs of
alpaca-cleaned at batch 64 with 100 warm-up steps) and merges the adapters. CFSP (COLING'25)
names a recovery fine-tuning whose allocation is not in its released code (spec §2.2:
*unconfirmed*); :func:`recover` is the plain LLM-Pruner recipe, and makes no claim to be CFSP's.

Departures from LLM-Pruner's code, all *ours*: the training data are whatever the caller passes
(packed language-model windows, loss on every token, no instruction prompt template); the number
of steps, batch size and window length are arguments (CPU-sized defaults), not 2 epochs of
batch 64; warm-up defaults to 0 steps because the default runs are short.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import PrunekitError, UnsupportedModelError
from .loop import token_windows, train_causal_lm

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class RecoveryReport:
    """What :func:`recover` did; ``to_dict``/``to_json`` give one JSON line."""

    steps: int
    loss_first: float  # training loss of the first step's batch
    loss_last: float  # training loss of the last step's batch
    seconds: float  # training wall time (the merge and dtype casts excluded)
    lora_rank: int
    lora_alpha: float
    lr: float
    batch_size: int
    seq_len: int
    windows: int  # training windows available (one pass = windows / batch_size steps)
    seed: int
    train_dtype: str
    modules: list[str] = field(default_factory=list)  # the Linears that got an adapter
    trainable_params: int = 0  # LoRA parameters trained
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __str__(self) -> str:
        return (
            f"LoRA r={self.lora_rank} on {len(self.modules)} Linears, {self.steps} steps of "
            f"{self.batch_size}x{self.seq_len} tokens: loss {self.loss_first:.3f} -> {self.loss_last:.3f} "
            f"in {self.seconds:.1f} s"
        )


def _int(name: str, v: object, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")


def lora_targets(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules LoRA adapts: those whose last name component is
    in ``targets``, skipping zero-width Linears (a pruned-away MLP) and anything inside prunekit's
    ``NoAttention`` stub (a layer whose every head was removed)."""
    from ..models.structure import NoAttention

    stubs = [n for n, m in model.named_modules() if isinstance(m, NoAttention)]
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        if mod.weight.numel() == 0 or any(name.startswith(s + ".") for s in stubs):
            continue
        names.append(name)
    return names


def _windows(texts, tokenizer, seq_len: int) -> torch.Tensor:
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings (or token ids), not one string")
    if isinstance(texts, torch.Tensor):
        if texts.numel() == 0:
            raise ValueError("texts is an empty tensor: give token ids to train on")
        return token_windows(texts, texts.shape[1] if texts.dim() == 2 else seq_len)
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: give a list of strings (with tokenizer=) or token-id tensors")
    if all(isinstance(t, torch.Tensor) for t in texts):
        return token_windows(texts, seq_len)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be all strings or all token-id tensors")
    if tokenizer is None:
        raise ValueError("texts are strings: pass tokenizer= to tokenize them (or pass token ids)")
    text = "\n\n".join(t for t in texts if t.strip())
    if not text:
        raise ValueError("texts hold no non-blank string")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return token_windows(ids, seq_len)


def recover(
    model: nn.Module,
    texts: Sequence[str] | torch.Tensor | Sequence[torch.Tensor],
    *,
    tokenizer=None,
    steps: int = 100,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    lr: float = 1e-4,
    batch_size: int = 4,
    seq_len: int = 256,
    warmup_steps: int = 0,
    seed: int = 0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    train_dtype: torch.dtype | None = None,
    callbacks: Sequence = (),
    checkpoint_dir: str | None = None,
    progress: bool = True,
) -> RecoveryReport:
    """Fine-tune ``model`` in place with LoRA (PEFT) for ``steps`` steps and merge the adapters into
    its weights (``merge_and_unload``); returns a :class:`RecoveryReport`.

    - ``texts``: a list of strings with ``tokenizer=`` (joined by blank lines, tokenized once and
      cut into packed windows of ``seq_len`` tokens), 1-D token-id tensors (packed the same way),
      or a 2-D ``(windows, seq_len)`` tensor used as is. Batches of ``batch_size`` windows are drawn
      in a seeded random order, reshuffled every pass.
    - ``targets``: last name components of the Linears to adapt (default: q/k/v/o and gate/up/down
      in every decoder layer). Zero-width Linears and the ``NoAttention`` stub of a layer whose
      heads were all removed are skipped; per-layer widths may differ.
    - ``train_dtype``: the dtype the model is trained in (default: float32 on CPU, where bf16
      backward is very slow; the model's own dtype on an accelerator). The model is cast to it,
      trained, merged, and every tensor cast back to its own dtype; the device is unchanged.
    - The model must be finalized: prunekit's reversible masks (parametrizations) are refused, since
      a LoRA update is dense and, merged, would bring pruned units back (call
      ``prune_weights(...).finalize()`` first). Biases (FLAP's compensation on ``o_proj`` and
      ``down_proj``, Qwen2's q/k/v) are kept and not trained.
    - Deterministic under ``seed`` (adapter init, dropout and data order) on a given machine and
      thread count. Training runs on the transformers ``Trainer`` (:func:`train_causal_lm`):
      progress bar, ``callbacks``, and checkpoints of the adapters in ``checkpoint_dir``; the same
      call runs under ``accelerate launch`` on several GPUs.

    The model comes back in eval mode with each parameter's ``requires_grad`` as it was. If
    training fails, the adapters are removed unmerged and the model is cast back unchanged.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("recover() trains LoRA adapters with peft: pip install 'prunekit[train]'") from e

    _int("steps", steps, 1)
    _int("lora_rank", lora_rank, 1)
    _int("batch_size", batch_size, 1)
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1); got {lora_dropout!r}")
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PrunekitError(
            "the model still holds prunekit's reversible masks (parametrizations): call finalize() on "
            "the pruning before recover(), so that LoRA trains and merges into the pruned tensors"
        )
    windows = _windows(texts, tokenizer, seq_len)
    names = lora_targets(model, tuple(targets))
    if not names:
        raise UnsupportedModelError(
            f"no nn.Linear named {tuple(targets)} with nonzero width in {type(model).__name__}: "
            "nothing for LoRA to adapt (give targets=, the last name components of Linear modules)"
        )
    params = list(model.parameters())
    device = params[0].device
    if train_dtype is None:
        train_dtype = torch.float32 if device.type == "cpu" else params[0].dtype
    dtypes = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    had_peft_config = "peft_config" in model.__dict__

    model.to(train_dtype)
    torch.manual_seed(seed)  # the adapters' initialisation (lora_A; lora_B starts at zero)
    config = LoraConfig(
        r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=names,
        bias="none", task_type="CAUSAL_LM",
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    merged = False
    try:
        result = train_causal_lm(
            peft_model, windows, steps=steps, lr=lr, batch_size=batch_size, warmup_steps=warmup_steps,
            seed=seed, callbacks=callbacks, checkpoint_dir=checkpoint_dir, progress=progress,
        )  # fmt: skip
        with torch.no_grad():
            base = peft_model.merge_and_unload()
        merged = True
    finally:
        if not merged:
            base = peft_model.unload()
        if base is not model:  # peft unwraps in place; anything else would be a peft change
            raise PrunekitError("peft returned a different module than the model it wrapped")
        if not had_peft_config:
            model.__dict__.pop("peft_config", None)
        with torch.no_grad():
            for n, t in [*model.named_parameters(), *model.named_buffers()]:
                if n in dtypes and t.dtype != dtypes[n]:
                    t.data = t.data.to(dtypes[n])
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, p.requires_grad))
    model.eval()
    return RecoveryReport(
        steps=result.steps, loss_first=result.losses[0], loss_last=result.losses[-1],
        seconds=result.seconds, lora_rank=lora_rank, lora_alpha=lora_alpha, lr=lr, batch_size=batch_size,
        seq_len=windows.shape[1], windows=windows.shape[0], seed=seed, train_dtype=str(train_dtype),
        modules=names, trainable_params=trainable, losses=result.losses,
    )  # fmt: skip
