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


# ---------------------------------------------------------------- ToMe as the official code runs it
def tome_official_plan(metric: torch.Tensor, r: int, cls: bool, dist: bool):
    """The official ToMe matching, written from its algorithm: the *whole* sequence (special tokens
    included) alternates A (even positions) / B (odd); CLS is A's first row and gets -inf scores,
    the distillation token is B's first column and gets -inf; ``r`` is capped at
    ``(T - protected) // 2``; the ``r`` best edges merge; unmerged A rows are sorted by index when
    there is a CLS. Returns ``merge(x, mode)`` for ``(B, T, C)`` tensors."""
    T = metric.shape[1]
    r = min(r, (T - int(cls) - int(dist)) // 2)
    if r <= 0:
        return lambda x, mode="sum": x
    m = metric / metric.norm(dim=-1, keepdim=True)
    sim = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # (B, |A|, |B|)
    if cls:
        sim[:, 0, :] = float("-inf")
    if dist:
        sim[:, :, 0] = float("-inf")
    best, partner = sim.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    merged_rows, kept_rows = ranked[:, :r], ranked[:, r:]
    if cls:
        kept_rows = kept_rows.sort(dim=-1).values
    targets = partner.gather(1, merged_rows)

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        a, b = x[:, 0::2], x[:, 1::2]
        C = x.shape[-1]
        kept = a.gather(1, kept_rows[..., None].expand(-1, -1, C))
        moved = a.gather(1, merged_rows[..., None].expand(-1, -1, C))
        b = b.scatter_reduce(1, targets[..., None].expand(-1, -1, C), moved, reduce=mode)
        if dist:  # CLS, then the distillation token (B's first), then the rest
            return torch.cat([kept[:, :1], b[:, :1], kept[:, 1:], b[:, 1:]], dim=1)
        return torch.cat([kept, b], dim=1)

    return merge


@torch.no_grad()
def tome_official_forward(encoder, embeddings: torch.Tensor, r: int, dist: bool = False):
    """A HF ViT / DeiT encoder (``layers``: ``layernorm_before``, ``attention.{q,k,v,o}_proj``,
    ``layernorm_after``, ``mlp``) run block by block as the official ToMe timm patch runs it: eager
    attention with ``log(size)`` on every key (proportional attention, from the second block), a
    constant ``r`` merged per block between attention and MLP on the keys averaged over heads,
    size-weighted average. Returns the final hidden states (before the last norm) and the token
    count after each block."""
    x, size, counts = embeddings, None, [embeddings.shape[1]]
    for layer in encoder.layers:
        att = layer.attention
        B, T, D = x.shape
        H = att.config.num_attention_heads
        h = layer.layernorm_before(x)
        q, k, v = (p(h).view(B, T, H, -1).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        if size is not None:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, D)
        x = x + att.o_proj(out)
        merge = tome_official_plan(k.mean(dim=1), r, cls=True, dist=dist)
        size = torch.ones(B, T, 1) if size is None else size
        x, size = merge(x * size, "sum"), merge(size, "sum")
        x = x / size
        x = x + layer.mlp(layer.layernorm_after(x))
        counts.append(x.shape[1])
    return x, counts
