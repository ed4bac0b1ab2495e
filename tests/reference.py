"""An independent reference for token dropping: keep every token, but hide the dropped ones.

Dropping tokens from the input of layer K on is exactly masking them as *keys* in every layer
>= K (their own query rows no longer matter). This helper adds that mask to an **eager** model's
4-D attention masks through layer pre-hooks, so generate() runs on the full sequence.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def decoder_layers(model):
    inner = model.model
    return inner.language_model.layers if hasattr(inner, "language_model") else inner.layers


@contextmanager
def masked_reference(model, kept: torch.Tensor, K: int, attention_mask: torch.Tensor | None = None):
    """``kept (B, L)`` bool over the prompt: hide dropped real prompt keys in decoder layers >= K.

    Padding (``attention_mask == 0``) is left to the model's own mask.
    """
    with masked_reference_cuts(model, [(K, kept)], attention_mask):
        yield


@contextmanager
def masked_reference_cuts(model, cuts: list, attention_mask: torch.Tensor | None = None):
    """Several cuts ``[(K_i, kept_i (B, L)), ...]`` (ascending K): layer ``l`` hides the prompt keys
    dropped by the last cut with ``K_i <= l``."""
    assert model.config.get_text_config()._attn_implementation == "eager", "reference needs eager masks"
    layers = decoder_layers(model)
    handles = []
    for i, (K, kept) in enumerate(cuts):
        end = cuts[i + 1][0] if i + 1 < len(cuts) else len(layers)
        L = kept.shape[1]
        dropped = ~kept if attention_mask is None else (~kept & attention_mask.bool())

        def hook(layer, args, kw, dropped=dropped, L=L):
            am = kw["attention_mask"]
            hide = torch.zeros(am.shape[0], 1, 1, am.shape[-1], dtype=torch.bool)
            hide[:, 0, 0, :L] = dropped
            kw["attention_mask"] = am.masked_fill(hide, torch.finfo(am.dtype).min)
            return args, kw

        handles += [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers[K:end]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def greedy(model, inputs: dict, steps: int = 5):
    """generate() greedily (no logits processors); returns (new tokens (B, T), logits (B, T, V))."""
    out = model.generate(
        **inputs,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    L = inputs["input_ids"].shape[1]
    return out.sequences[:, L:], torch.stack(out.scores, 1)
