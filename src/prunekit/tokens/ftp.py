"""FTP: Fine-grained Token-wise Pruner (arXiv 2412.11494), a **reconstruction**.

No official code exists (spec: training-aware.md §3). What is known from the abstract and three
third-party reviews: a learned router decides, per token and per decoder block, whether the token
is computed or skipped (its hidden state passes unchanged); the LLM is frozen; the router is a
2-layer MLP with hidden size 64, **one router shared by all blocks**, fed 4 scalars per token
(position, absolute attention score, relative rank of that score, the block's sparsity target);
per-block sparsities come from a genetic-algorithm search scored with a *static* router of fixed
priority {x0, x_{T-1}, x_{T-2}, ..., x1}; the router is trained with a decayed guide loss, an
asymmetric sparsity loss and distillation at the final block; decoding skips the last token only
when the router's probability is below 0.5.

**Everything else here is ours (unconfirmed)**, in particular:

- the exact features: ``pos = j / (T-1)``; ``att`` = attention received by token ``j`` at the
  previous block (mean over heads, averaged over the causal queries that could see ``j``; at a
  block where ``j`` was skipped under ``kv="drop"`` it received nothing, so 0);
  ``rank = rank(att) / (T-1)`` (0 = least attended; ties by index); ``s_l``;
- hard top-k training with ``k = ceil((1 - s_l) T)``, token 0 always kept, kept tokens updated as
  ``h + (p / sg(p)) * (f(h) - h)`` (Mixture-of-Depths style straight-through; sg = stop-gradient);
- block 0 is always dense (``s_0`` must be 0: there is no previous block's attention to route on),
  which also keeps layer 0's KV cache at the full length that ``generate()`` reads positions from;
- the three loss forms and weights (:func:`ftp_loss`), the GA's selection scheme (elitism and
  truncation selection), renormalisation and pinning (first and last blocks pinned to 0);
- whether a skipped token still gives K/V to the others in that block: both are implemented,
  ``kv="drop"`` (neither query nor K/V: Mixture-of-Depths style, the cheapest) and ``kv="keep"``
  (K/V projected for every token; only its query, attention output and MLP are skipped);
- decoding features (one new token): ``pos = 1``; ``att`` = the new token's attention to itself
  at the previous block (the only query that sees it); ``rank`` = the rank of that value within
  its own attention row; 0 and 0 when it was skipped there.

Skipping is real: the kept tokens are gathered, the block (norms, q/k/v/o, attention, MLP) runs on
them only, and the results are scattered back, so prefill time falls with sparsity. The block's
math is recomputed here from the layer's own modules (Llama-style decoder layers: input and
post-attention RMSNorm, q/k/v/o projections with RoPE and GQA, gated MLP); the attention is an
explicit softmax (its probabilities are the router's features), so FTP with every ``s_l = 0``
equals the dense model to float precision (tested), not bit-exactly.

Use (the three stages)::

    from prunekit.tokens import ftp
    sched, _ = ftp.ga_schedule(model, calib_ids, 0.3, tail=32)           # 1. GA, static router
    router = ftp.FTPRouter()
    ftp.train_router(model, router, train_ids, sched, steps=300, tail=32)   # 2. router, LLM frozen
    sched, _ = ftp.ga_schedule(model, calib_ids, 0.3, router=router)      # 3. (optional) re-tune
    with ftp.token_skipping(model, router, sched, kv="drop"):
        model.generate(...)

Module choice: FTP removes token computation, not tokens, so it is a context manager on the
model (like the KV-cache methods), not a :class:`~prunekit.tokens.TokenMethod` of the token
engine (which shortens the sequence for all later layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..models.attention import _heads, _rope
from ..models.compat import cache_of

KV_MODES = ("drop", "keep")
MAX_SPARSITY = 0.9
DECODE_THRESHOLD = 0.5


# --------------------------------------------------------------------------- features and routers


def received_attention(probs: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Attention each key receives: ``probs (B, H, Tq, Tk)`` (causal, masked entries 0), query
    positions ``q_pos (B, Tq)`` and key positions ``k_pos (B, Tk)`` -> ``(B, Tk)``: the head mean,
    summed over queries and divided by the number of queries that may see the key (``q >= k``;
    at least 1). [ours: FTP's "absolute attention score" is not defined in any source we read.]"""
    total = probs.float().mean(dim=1).sum(dim=1)  # (B, Tk)
    seen = (q_pos[:, :, None] >= k_pos[:, None, :]).sum(dim=1).clamp(min=1)
    return total / seen


def router_features(
    att: torch.Tensor, sparsity: float, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """The 4 router inputs ``(B, T, 4)`` in [0, 1]: ``pos = j/(T-1)``, ``att``, ``rank(att)/(T-1)``
    (0 = least attended; equal values ranked by index), and the block target ``s_l``.
    ``att (B, T)``; ``positions`` overrides ``j`` (default ``0..T-1``). [ours, unconfirmed]"""
    B, T = att.shape
    den = max(T - 1, 1)
    pos = (torch.arange(T, device=att.device) if positions is None else positions).float() / den
    pos = pos.expand(B, T)
    order = att.argsort(dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(T, device=att.device).expand(B, T))
    s = torch.full_like(pos, float(sparsity))
    return torch.stack([pos, att.float(), rank.float() / den, s], dim=-1)


class FTPRouter(nn.Module):
    """FTP's global router: ``MLP(4 -> hidden, ReLU, hidden -> 1)`` + sigmoid = probability that
    a token is computed in a block; one instance serves every block [3rd-party: 2 layers, hidden
    64, shared]. Input: :func:`router_features`."""

    def __init__(self, hidden: int = 64, seed: int = 0) -> None:
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be an int >= 1; got {hidden!r}")
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(features).squeeze(-1))


def static_scores(T: int, device=None) -> torch.Tensor:
    """The static router's priority {x0, x_{T-1}, x_{T-2}, ..., x1} as scores ``(T,)`` (higher =
    kept first) [3rd-party]."""
    s = torch.arange(T, device=device, dtype=torch.float32)
    s[0] = float("inf")
    return s


def keep_count(T: int, s: float) -> int:
    """Tokens computed in a block of target sparsity ``s``: ``ceil((1 - s) T)``, at least 1."""
    return max(1, min(T, math.ceil((1.0 - s) * T - 1e-9)))


def static_keep(T: int, s: float, device=None) -> torch.Tensor:
    """The static router's decisions ``(T,)`` (1 = computed): token 0 and the last ``k - 1``."""
    keep = torch.zeros(T, device=device)
    keep[static_scores(T, device).topk(keep_count(T, s)).indices] = 1.0
    return keep


# ------------------------------------------------------------------------------------ schedules


def check_schedule(schedule: Sequence[float], n_layers: int) -> list[float]:
    s = [float(v) for v in schedule]
    if len(s) != n_layers:
        raise ValueError(f"the schedule has {len(s)} entries; the model has {n_layers} decoder layers")
    for i, v in enumerate(s):
        if not 0.0 <= v <= MAX_SPARSITY:
            raise ValueError(f"schedule[{i}] = {v!r}: block sparsities must be in [0, {MAX_SPARSITY}]")
    if s[0] != 0.0:
        raise ValueError(
            f"schedule[0] = {s[0]!r}: block 0 must be dense (0.0); it has no previous block's attention "
            "to route on"
        )
    return s


def uniform_schedule(n_layers: int, target: float) -> list[float]:
    """The same sparsity in every block but block 0 (always dense), mean ``target`` over all."""
    if n_layers < 2:
        raise ValueError(f"FTP needs at least 2 decoder layers; got {n_layers}")
    v = target * n_layers / (n_layers - 1)
    if not 0.0 <= v <= MAX_SPARSITY:
        raise ValueError(f"target={target!r} needs {v:.3f} per block; allowed [0, {MAX_SPARSITY}]")
    return [0.0] + [v] * (n_layers - 1)


def renormalise(genome: torch.Tensor, target: float, pinned: torch.Tensor) -> torch.Tensor:
    """Scale the free entries so the mean over all blocks is ``target``, within [0, 0.9]; pinned
    blocks are 0. [ours: the sources say only "renormalised" and "pinned low"]"""
    s = genome.clone().double().clamp(0.0, MAX_SPARSITY)
    s[pinned] = 0.0
    free = ~pinned
    need = target * s.numel()
    for _ in range(100):
        capped = free & (s >= MAX_SPARSITY)
        loose = free & ~capped
        rem = need - float(s[capped].sum())
        if not bool(loose.any()) or abs(float(s[loose].sum()) - rem) < 1e-12:
            break
        tot = float(s[loose].sum())
        if tot > 0:  # scale the uncapped entries (their proportions kept) ...
            s[loose] = s[loose] * (rem / tot)
        else:  # ... or share the remainder equally when they are all 0
            s[loose] = rem / int(loose.sum())
        s.clamp_(0.0, MAX_SPARSITY)
    return s


# ------------------------------------------------------------------------------ the FTP session


class _Skip:
    """Per-model state of one FTP session: routes and runs every decoder layer."""

    def __init__(self, model, router, schedule, kv, threshold, seed) -> None:
        self.model, self.router, self.kv, self.threshold = model, router, kv, threshold
        self.schedule = schedule
        self.gen = torch.Generator().manual_seed(seed)
        self.bypass = False
        self.records: list[tuple[int, torch.Tensor, float]] = []  # (layer, p_keep (B, T), s_l)
        self.kept: list[float] = []  # fraction of tokens computed per routed block, last forward
        self.prev_att: torch.Tensor | None = None
        self.prev_rank: torch.Tensor | None = None

    def needs_attention(self, idx: int) -> bool:
        """Does block ``idx + 1`` route with the learned router (so it needs block idx's attention)."""
        nxt = idx + 1
        return isinstance(self.router, nn.Module) and nxt < len(self.schedule) and self.schedule[nxt] > 0

    # --- routing
    def scores(self, layer: int, B: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores ``(B, T)`` (higher = kept first) and the router's ``p_keep`` (or None)."""
        s = self.schedule[layer]
        if isinstance(self.router, nn.Module):
            feats = router_features(self.prev_att, s).to(device)
            p = self.router(feats.to(next(self.router.parameters()).dtype))
            self.records.append((layer, p, s))
            return p.detach().float(), p
        if self.router == "static":
            return static_scores(T, device).expand(B, T), None
        r = torch.rand(B, T, generator=self.gen).to(device)  # "random"
        return r, None

    def decode_keep(self, layer: int, B: int, device) -> torch.Tensor:
        """(B,) bool: does the new (last) token get computed in this block."""
        s = self.schedule[layer]
        if isinstance(self.router, nn.Module):
            feats = torch.stack(
                [
                    torch.ones(B),
                    self.prev_att.float().cpu(),
                    self.prev_rank.float().cpu(),
                    torch.full((B,), s),
                ],
                dim=-1,
            ).to(device)
            with torch.no_grad():
                p = self.router(feats.to(next(self.router.parameters()).dtype))
            return p >= self.threshold
        if self.router == "static":
            return torch.ones(B, dtype=torch.bool, device=device)  # x_{T-1} is second in priority
        return (torch.rand(B, generator=self.gen) >= s).to(device)

    # --- the block
    def forward(self, layer_mod, idx, hidden, position_embeddings, past_key_values):
        B, T, _ = hidden.shape
        s = self.schedule[idx]
        past = past_key_values is not None and past_key_values.get_seq_length(idx) > 0
        if idx == 0:
            self.records, self.kept = [], []
        if past and T != 1:
            raise NotImplementedError(
                f"FTP decodes one token at a time after the prefill; got {T} new tokens with a filled cache"
            )
        dev = hidden.device
        if past:  # decoding one token
            if s == 0.0:
                keep_mask = torch.ones(B, dtype=torch.bool, device=dev)
            else:
                keep_mask = self.decode_keep(idx, B, dev)
            if bool(keep_mask.all()):
                return self.run(layer_mod, hidden, None, position_embeddings, past_key_values, idx, None)
            if self.kv == "keep" and B == 1:  # K/V of the new token only; no query, no MLP
                self.kv_only(layer_mod, hidden, position_embeddings, past_key_values, idx)
                self.prev_att, self.prev_rank = torch.zeros(B), torch.zeros(B)
                return hidden
            if B > 1 or self.kv == "keep":
                if self.kv == "drop":
                    raise NotImplementedError(
                        "kv='drop' decodes batch size 1 only (per-row cache lengths would differ); "
                        "use kv='keep'"
                    )
                out = self.run(layer_mod, hidden, None, position_embeddings, past_key_values, idx, None)
                if self.needs_attention(idx):  # a skipped row received nothing here
                    self.prev_att = torch.where(keep_mask.cpu(), self.prev_att, 0.0)
                    self.prev_rank = torch.where(keep_mask.cpu(), self.prev_rank, 0.0)
                return torch.where(keep_mask[:, None, None], out, hidden)
            self.prev_att = torch.zeros(B)  # skipped: received nothing here
            self.prev_rank = torch.zeros(B)
            return hidden  # kv="drop": no query, no K/V, no MLP
        # prefill
        if s == 0.0:
            return self.run(layer_mod, hidden, None, position_embeddings, past_key_values, idx, None)
        k = keep_count(T, s)
        score, p = self.scores(idx, B, T, dev)
        score = score.clone()
        score[:, 0] = float("inf")  # token 0 always computed
        keep = score.topk(k, dim=1).indices.sort(dim=1).values  # (B, k)
        scale = None
        if p is not None and torch.is_grad_enabled():
            pk = p.gather(1, keep)
            scale = pk / pk.detach()  # 1 in value; the router's gradient path
        self.kept.append(k / T)
        return self.run(layer_mod, hidden, keep, position_embeddings, past_key_values, idx, scale)

    def kv_only(self, layer, hidden, position_embeddings, cache, idx):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        kk, v = _heads(attn.k_proj(x), attn.head_dim), _heads(attn.v_proj(x), attn.head_dim)
        cos, sin = position_embeddings
        kk = _rope(attn)(kk, kk, cos, sin)[0]
        cache.update(kk, v, idx)

    def run(self, layer, hidden, keep, position_embeddings, cache, idx, scale):
        """The decoder layer on the kept tokens ``keep (B, k)`` (None: all), the others unchanged."""
        B, T, D = hidden.shape
        attn = layer.self_attn
        cos, sin = position_embeddings
        cos, sin = cos.expand(B, *cos.shape[1:]), sin.expand(B, *sin.shape[1:])
        decoding = cache is not None and cache.get_seq_length(idx) > 0
        pos_all = torch.arange(T, device=hidden.device).expand(B, T)

        def take(x, ix):
            return x if ix is None else x.gather(1, ix[..., None].expand(*ix.shape, x.shape[-1]))

        q_ix = keep
        kv_ix = keep if self.kv == "drop" else None
        h_q = take(hidden, q_ix)
        x_all = None
        if kv_ix is None and q_ix is not None:
            x_all = layer.input_layernorm(hidden)
            x_q = take(x_all, q_ix)
        else:
            x_q = layer.input_layernorm(h_q)
        x_kv = x_q if kv_ix is q_ix else (x_all if x_all is not None else x_q)
        rope = _rope(attn)
        hd = attn.head_dim
        q = _heads(attn.q_proj(x_q), hd)
        kk = _heads(attn.k_proj(x_kv), hd)
        v = _heads(attn.v_proj(x_kv), hd)
        q = rope(q, q, take(cos, q_ix), take(sin, q_ix))[0]
        kk = rope(kk, kk, take(cos, kv_ix), take(sin, kv_ix))[0]
        q_pos = take(pos_all[..., None], q_ix)[..., 0]
        k_pos = take(pos_all[..., None], kv_ix)[..., 0]
        if cache is not None:
            kk, v = cache.update(kk, v, idx)
        rep = q.shape[1] // kk.shape[1]
        kk, v = kk.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if decoding:  # one new query sees every cached key
            mask, causal = None, False
        elif q_ix is kv_ix:  # the same (sorted) tokens as queries and keys: plain causal
            mask, causal = None, True
        else:  # kv="keep": kept queries over all keys, by original position
            mask, causal = (q_pos[:, None, :, None] >= k_pos[:, None, None, :]), False
        o = nn.functional.scaled_dot_product_attention(
            q, kk, v, attn_mask=mask, is_causal=causal, scale=attn.scaling
        )
        o = o.transpose(1, 2).reshape(B, q.shape[2], -1)
        h1 = h_q + attn.o_proj(o)
        h2 = h1 + layer.mlp(layer.post_attention_layernorm(h1))
        if self.needs_attention(idx):  # the next block's router features
            with torch.no_grad():
                logits = (q.float() @ kk.float().transpose(-1, -2)) * attn.scaling  # (B, H, Tq, Tk)
                if not decoding:
                    allowed = q_pos[:, None, :, None] >= k_pos[:, None, None, :]
                    logits = logits.masked_fill(~allowed, float("-inf"))
                probs = logits.softmax(-1)
            if decoding:
                row = probs.mean(1)[:, 0]  # (B, Tk): the new token's row; it is the last key
                self.prev_att = row[:, -1].float().cpu()
                self.prev_rank = (row < row[:, -1:]).sum(1).float().cpu() / max(row.shape[1] - 1, 1)
            else:
                att_k = received_attention(probs, q_pos, k_pos)
                att = (
                    att_k
                    if kv_ix is None
                    else torch.zeros(B, T, device=hidden.device).scatter(1, kv_ix, att_k)
                )
                self.prev_att = att
        if q_ix is None:
            return h2
        delta = h2 - h_q
        if scale is not None:
            delta = delta * scale[..., None].to(delta.dtype)
        return hidden.scatter(1, q_ix[..., None].expand(-1, -1, D), h_q + delta)


def _layers(model) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(
        hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj") and hasattr(layer, "mlp")
        for layer in layers
    ):
        raise NotImplementedError(
            f"FTP supports Llama-style causal LMs (model.model.layers with self_attn.q_proj and mlp); "
            f"got {type(model).__name__}"
        )
    return layers


@contextmanager
def token_skipping(
    model: nn.Module,
    router: FTPRouter | str,
    schedule: Sequence[float],
    *,
    kv: str = "drop",
    threshold: float = DECODE_THRESHOLD,
    seed: int = 0,
):
    """Run ``model`` with FTP token skipping inside the ``with`` block; restored exactly on exit
    (also after an exception).

    Args:
        router: a trained :class:`FTPRouter`, ``"static"`` (FTP's fixed priority) or ``"random"``
            (random tokens per block, seeded; a baseline).
        schedule: per-block sparsity ``s_l`` in [0, 0.9] (fraction of tokens skipped), ``s_0 = 0``.
        kv: ``"drop"`` (a skipped token gives no K/V in that block) or ``"keep"`` (it does; only
            its query and MLP are skipped) [ours: the sources do not say which].
        threshold: decoding computes the new token in a block iff ``p_keep >= threshold``
            [3rd-party: 0.5].

    Yields the session (``.kept``: the fraction of tokens computed in each routed block during
    the last forward; ``.records``: the router's ``p_keep`` per routed block, for training).
    Padded batches are refused (top-k would count padding); ``kv="drop"`` decodes batch size 1.
    """
    layers = _layers(model)
    if kv not in KV_MODES:
        raise ValueError(f"kv must be one of {KV_MODES}; got {kv!r}")
    if not (isinstance(router, nn.Module) or router in ("static", "random")):
        raise ValueError(f"router must be an FTPRouter, 'static' or 'random'; got {router!r}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1); got {threshold!r}")
    sched = check_schedule(schedule, len(layers))
    for layer in layers:
        if "forward" in vars(layer):
            raise RuntimeError("a decoder layer's forward is already patched (nested FTP sessions?)")
    state = _Skip(model, router, sched, kv, threshold, seed)

    def patched(idx, layer):
        original = type(layer).forward

        def forward(hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                    position_embeddings=None, **kw):  # fmt: skip
            # the cache keyword is `past_key_values` before transformers 5.24, `cache` from 5.24 on
            if state.bypass:
                return original(layer, hidden_states, attention_mask=attention_mask,
                                position_ids=position_ids, use_cache=use_cache,
                                position_embeddings=position_embeddings, **kw)  # fmt: skip
            return state.forward(layer, idx, hidden_states, position_embeddings, cache_of(kw))

        return forward

    def pre_hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError("FTP token skipping does not support padded batches (attention_mask has zeros)")

    handle = model.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i, layer in enumerate(layers):
            layer.forward = patched(i, layer)
        yield state
    finally:
        handle.remove()
        for layer in layers:
            vars(layer).pop("forward", None)


# ---------------------------------------------------------------------------------- GA search


def _check_tail(tail, T: int | None = None) -> None:
    if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 1):
        raise ValueError(f"tail must be None (every position) or an int >= 1; got {tail!r}")
    if tail is not None and T is not None and tail > T - 1:
        raise ValueError(f"tail={tail} exceeds the {T - 1} predicted positions of a {T}-token window")


def lm_loss(model, ids: torch.Tensor, tail: int | None = None) -> float:
    """Mean next-token cross-entropy of ``model`` on ``ids (N, T)``, one window at a time; with
    ``tail``, only the last ``tail`` predictions of each window count (the whole window is context).
    """
    _check_tail(tail, ids.shape[1])
    tot, n = 0.0, 0
    with torch.no_grad():
        for x in ids.split(1):
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
            y = x[:, 1:]
            if tail is not None:
                logits, y = logits[:, -tail:], y[:, -tail:]
            tot += float(nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            n += y.numel()
    return tot / n


def ga_schedule(
    model: nn.Module,
    calibration: torch.Tensor,
    target: float,
    *,
    population: int = 16,
    generations: int = 10,
    sigma: float = 0.05,
    elite: int = 2,
    kv: str = "drop",
    tail: int | None = None,
    router: FTPRouter | str = "static",
    seed: int = 0,
) -> tuple[list[float], list[float]]:
    """FTP's genetic search of per-block sparsity [3rd-party: GA, static router, pop. 16, 10
    generations, uniform crossover, Gaussian mutation 0.05; fitness = -loss on a few calibration
    sequences; ``tail``: only the last ``tail`` predictions count, see :func:`lm_loss`].
    Genome ``s in [0, 0.9]^L``, renormalised to mean ``target``; blocks 0 and L-1
    pinned to 0 [ours: "pinned low"]. Selection [ours]: the ``elite`` best survive; children of two
    parents drawn uniformly from the better half. Generation 0 = the uniform schedule (over the
    free blocks) + ``population - 1`` Gaussian perturbations of it. Deterministic under ``seed``
    (its own generator; fitness ties broken by index).

    ``router``: the static router (stage 1); a trained :class:`FTPRouter` fine-tunes the schedule
    with it (FTP's stage 3, repeatable).

    Returns ``(best schedule, best fitness per generation)``.
    """
    L = len(_layers(model))
    for name, v, lo in (("population", population, 2), ("generations", generations, 1), ("elite", elite, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
    if elite >= population:
        raise ValueError(f"elite={elite} must be < population={population}")
    if L < 3:
        raise ValueError(f"the GA needs at least 3 decoder layers (first and last are pinned); got {L}")
    if not 0.0 < target <= MAX_SPARSITY * (L - 2) / L:
        raise ValueError(
            f"target must be in (0, {MAX_SPARSITY * (L - 2) / L:.3f}] for {L} blocks; got {target!r}"
        )
    _check_tail(tail, calibration.shape[1])
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0; got {sigma!r}")
    g = torch.Generator().manual_seed(seed)
    pinned = torch.zeros(L, dtype=torch.bool)
    pinned[0] = pinned[-1] = True
    base = renormalise(torch.full((L,), target, dtype=torch.float64), target, pinned)
    pop = [base] + [
        renormalise(base + sigma * torch.randn(L, generator=g, dtype=torch.float64), target, pinned)
        for _ in range(population - 1)
    ]

    def fitness(s):
        with token_skipping(model, router, s.tolist(), kv=kv):
            return -lm_loss(model, calibration, tail)

    history = []
    fit = torch.tensor([fitness(s) for s in pop], dtype=torch.float64)
    for gen in range(generations):
        order = torch.argsort(-fit, stable=True)
        history.append(float(fit[order[0]]))
        if gen == generations - 1:
            break
        parents = [pop[i] for i in order[: max(2, population // 2)].tolist()]
        nxt = [pop[i] for i in order[:elite].tolist()]
        nfit = [float(fit[i]) for i in order[:elite].tolist()]
        while len(nxt) < population:
            a, b = torch.randint(len(parents), (2,), generator=g).tolist()
            take = torch.rand(L, generator=g) < 0.5
            child = torch.where(take, parents[a], parents[b])
            child = renormalise(
                child + sigma * torch.randn(L, generator=g, dtype=torch.float64), target, pinned
            )
            nxt.append(child)
            nfit.append(fitness(child))
        pop, fit = nxt, torch.tensor(nfit, dtype=torch.float64)
    best = pop[int(torch.argsort(-fit, stable=True)[0])]
    return [float(v) for v in best], history


# ----------------------------------------------------------------------------- router training


def ftp_loss(
    session: _Skip,
    routed_logits: torch.Tensor,
    dense_logits: torch.Tensor,
    step: int,
    max_steps: int,
    *,
    distill: float = 1.0,
    sparsity: float = 1.0,
    guide: float = 1.0,
    guide_until: float = 0.5,
    tail: int | None = None,
) -> dict[str, torch.Tensor]:
    """The three FTP losses [3rd-party names; forms and weights ours]:

    - ``distill``: ``KL(p_dense || p_routed)`` of the final logits, mean per token (the last
      ``tail`` positions only, when given [ours]: the positions a prefill is used for);
    - ``sparsity`` (asymmetric: only under-pruning is penalised): ``sum_l max(0, s_l - ŝ_l)`` with
      the soft achieved sparsity ``ŝ_l = 1 - mean_j p_keep``;
    - ``guide``: mean BCE of ``p_keep`` to the static router's decisions, weight decayed linearly
      from ``guide`` to 0 at ``guide_until * max_steps``.
    """
    _check_tail(tail)
    if tail is not None:
        routed_logits, dense_logits = routed_logits[:, -tail:], dense_logits[:, -tail:]
    logp = routed_logits.float().log_softmax(-1)
    logq = dense_logits.float().log_softmax(-1)
    kl = (logq.exp() * (logq - logp)).sum(-1).mean()
    sp = routed_logits.new_zeros((), dtype=torch.float32)
    gd = routed_logits.new_zeros((), dtype=torch.float32)
    for _, p, s in session.records:
        sp = sp + torch.relu(s - (1.0 - p.float().mean()))
        target = static_keep(p.shape[1], s, p.device).expand_as(p)
        gd = gd + nn.functional.binary_cross_entropy(p.float().clamp(1e-6, 1 - 1e-6), target)
    n = max(len(session.records), 1)
    w_g = guide * max(0.0, 1.0 - step / max(guide_until * max_steps, 1e-9))
    return {"distill": distill * kl, "sparsity": sparsity * sp, "guide": w_g * gd / n}


def train_router(
    model: nn.Module,
    router: FTPRouter,
    windows: torch.Tensor,
    schedule: Sequence[float],
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 1,
    seed: int = 0,
    kv: str = "drop",
    progress: bool = False,
    **loss_weights,
):
    """Train ``router`` (the LLM frozen) with :func:`ftp_loss` on
    :func:`~prunekit.training.train_causal_lm` (``lm_loss=False``): the router is attached as the
    submodule ``model.ftp_router`` for the ``Trainer``'s optimiser and removed after; every
    ``requires_grad`` flag of the model is restored. [3rd-party: batch size 1; Alpaca here LAMBADA.]
    Returns the harness's ``TrainResult`` (terms: distill / sparsity / guide per step)."""
    from ..training import train_causal_lm

    if not isinstance(router, FTPRouter):
        raise ValueError(f"router must be an FTPRouter; got {type(router).__name__}")
    if hasattr(model, "ftp_router"):
        raise RuntimeError("the model already has an ftp_router attribute")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in router.parameters():
        p.requires_grad_(True)
    model.add_module("ftp_router", router)
    try:
        with token_skipping(model, router, schedule, kv=kv) as sess:

            def loss_fn(m, inputs, outputs, step):
                records = sess.records
                sess.bypass = True
                try:
                    with torch.no_grad():
                        dense = m(input_ids=inputs["input_ids"], use_cache=False).logits
                finally:
                    sess.bypass = False
                sess.records = records
                return ftp_loss(sess, outputs.logits, dense, step, steps, **loss_weights)

            result = train_causal_lm(
                model, windows, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                loss_fn=loss_fn, lm_loss=False, progress=progress,
            )  # fmt: skip
    finally:
        del model._modules["ftp_router"]
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    router.eval()
    return result
