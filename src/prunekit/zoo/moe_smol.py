"""A real mixture-of-experts model from packaged parts: SmolLM2-135M MoEfied into a
``transformers.MixtralForCausalLM``.

MoEfication (Zhang et al., "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts",
ACL Findings 2022) splits each dense feed-forward layer into experts without training its weights:

1. **Partition** (:func:`partition_channels`). Each layer's ``I`` MLP channels (SmolLM2: 1536) are split
   into ``E`` experts of ``I / E`` channels by balanced k-means over the channels' co-activation on
   calibration text: channel ``j``'s feature is ``|h_j|`` over the calibration tokens, ``h_j =
   silu(gate_j . x) * (up_j . x)`` (the input of ``down_proj``), each channel's vector scaled to unit
   norm, so k-means groups channels that fire on the same tokens. The paper's co-activation variant
   partitions a co-activation graph with METIS; we cluster the activation profiles with balanced
   k-means instead (*ours*; the paper also uses balanced k-means, but on the weight vectors).
2. **Router** (:func:`fit_router`). One ``(E, H)`` linear router per layer on the MoE block's input
   (the post-attention-RMSNorm hidden state, which Mixtral's router reads) predicts each expert's
   importance on a token, ``||down[:, ch_e] h_{ch_e}(x)||``, the norm of its contribution to the MLP
   output (the paper trains its MLP router on which experts hold the largest activations; this target
   and the linear router are *ours*, the linear router being what Mixtral holds): closed-form ridge
   regression of the token-centred log importance on ``x``, refined by Adam on a loss that rewards
   the true top-k set (cross-entropy of the router's softmax against the top-k experts). The ridge fit
   alone is the default: 300 such Adam steps lowered the held-out recall (layer 15: top-1 0.66 ->
   0.42, top-8 0.845 -> 0.838), so ``MoERecipe.router_steps`` is 0.
3. **Weighting** (:func:`assemble_moe`). Mixtral's router takes a softmax over all logits, keeps the
   top-k and renormalises their weights to sum 1; the block outputs ``sum_{e in top-k} w_e
   expert_e(x)``. The dense MLP is the plain *sum* of all experts, so each expert's ``down_proj`` is
   multiplied by ``k`` and the router logits are scaled by a small ``beta``: the ``k`` weights are then
   about ``1/k`` and, at ``k = E``, the MoE reproduces the dense model (exactly so with a zero
   router). :func:`set_top_k` changes ``k`` and rescales ``down_proj`` to match.

Quality (``benchmarks/moe_build.py``, ``benchmarks/results/smollm2_moe.md``; Wikipedia perplexity,
dense SmolLM2 20.55): 20.44 at k = 16 of 16, 153 at k = 8, 3268 at k = 4. Without training the MoE
is far from dense SmolLM2 below ``k = E``: SwiGLU activations are dense and cluster weakly. Even an
oracle that keeps each token's 8 most important of 16 experts (by the router's target) leaves a
middle layer's MLP output with a relative error of about 0.5 (a per-channel top-half oracle: 0.13)
and gives ppl 75.6 instead of the router's 153 (k = 4: 1424 vs 3268); no channel feature we tried
for the clustering (``|h|``, signed ``h``, ``|h| ||down_j||``, top-10 % co-activation, the weight
rows) did much better than a random partition in the middle layers (oracle top-8 relative error at
layer 10: 0.51 vs 0.56 random), only in the late ones (layer 20: 0.37-0.39 vs 0.55). Also tried and
not adopted: 32 experts of 48 at k = 16 (ppl 132; Mixtral's eager path loops over twice as many
experts), a larger ``beta`` (0.3: 765 at k = 8), and a ridge refit of every expert's ``down_proj``
towards the dense residual stream (lower calibration error, yet ppl 165 at k = 8). The default
``top_k = 8`` of 16 is the largest k that still fits after half of a layer's experts are pruned: a
real, routed MoE to prune and measure, not a faithful stand-in for dense SmolLM2's quality.

The result is a standard ``MixtralForCausalLM`` (attention, norms and embeddings copied unchanged;
Mixtral's attention with ``sliding_window=None`` is Llama's), so every Mixtral code path of
transformers and of prunekit's MoE pruning is exercised. :func:`smollm2_moe` builds it once (about
80 s on 2 CPU cores, deterministic under the seed) and caches it under
``$PRUNEKIT_CACHE/smollm2-moe/<recipe hash>`` (safetensors, the tokenizer and ``build-log.json``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..assets import cache_dir


@dataclass(frozen=True)
class MoERecipe:
    """Everything that determines the MoEfied SmolLM2 (its hash names the cache folder).

    ``n_experts`` experts per layer, ``top_k`` of them per token; calibration: ``n_windows`` random
    windows of ``seq_len`` tokens of the packaged LAMBADA passages, the last ``heldout`` fraction of
    the windows kept out of the fits to measure the router's top-k recall. ``beta`` scales the
    router's logits (in units of the spread of its predictions across experts): near 0 every chosen
    expert weighs about ``1/k`` (the dense sum); larger, the weights follow the router's confidence.
    """

    n_experts: int = 16
    top_k: int = 8
    n_windows: int = 48
    seq_len: int = 256
    heldout: float = 0.125
    kmeans_iters: int = 25
    ridge: float = 1e-2  # relative to the mean diagonal of X^T X
    router_steps: int = 0  # Adam refinement after the ridge fit (0: ridge alone; 300 lowered recall)
    router_lr: float = 1e-2
    beta: float = 0.01
    seed: int = 0
    version: int = 2

    def __post_init__(self) -> None:
        if self.n_experts < 1 or not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"need n_experts >= 1 and 1 <= top_k <= n_experts; got n_experts={self.n_experts}, "
                f"top_k={self.top_k}"
            )
        if not 0 <= self.heldout < 1 or self.n_windows < 2 or self.seq_len < 2:
            raise ValueError(
                f"need 0 <= heldout < 1, n_windows >= 2, seq_len >= 2; got heldout={self.heldout}, "
                f"n_windows={self.n_windows}, seq_len={self.seq_len}"
            )
        if self.beta < 0 or self.ridge < 0 or self.router_steps < 0 or self.kmeans_iters < 1:
            raise ValueError(
                f"need beta >= 0, ridge >= 0, router_steps >= 0, kmeans_iters >= 1; got beta={self.beta}, "
                f"ridge={self.ridge}, router_steps={self.router_steps}, kmeans_iters={self.kmeans_iters}"
            )

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


# ------------------------------------------------------------------ partition
def balanced_assign(scores: torch.Tensor) -> torch.Tensor:
    """``(n, E)`` affinities -> ``(n,)`` cluster ids, each cluster holding exactly ``n / E`` rows.

    Greedy by rounds of proposals: every unassigned row proposes to its best cluster that still has
    room, and each cluster accepts its best proposers up to its remaining room (vectorised: one sort
    per round). A round fills at least one cluster or places every proposer, so it ends within ``E``
    rounds.
    """
    n, E = scores.shape
    if n % E:
        raise ValueError(f"{n} rows cannot split into {E} equal clusters ({n} % {E} != 0)")
    room = torch.full((E,), n // E, dtype=torch.long)
    out = torch.full((n,), -1, dtype=torch.long)
    arange = torch.arange(n)
    while (free := out < 0).any():
        rows = arange[free]
        s = scores[rows].masked_fill(room[None] == 0, float("-inf"))
        best = s.argmax(1)
        by_score = torch.argsort(s.gather(1, best[:, None])[:, 0], descending=True, stable=True)
        order = by_score[torch.argsort(best[by_score], stable=True)]  # grouped by cluster, best first
        counts = torch.bincount(best, minlength=E)
        rank = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[best[order]]
        take = rank < room[best[order]]
        out[rows[order[take]]] = best[order[take]]
        room -= torch.bincount(best[order[take]], minlength=E)
    return out


def partition_channels(
    features: torch.Tensor, n_experts: int, iters: int = 25, seed: int = 0
) -> torch.Tensor:
    """Balanced k-means of ``(I, T)`` channel features into ``n_experts`` clusters of ``I / n_experts``:
    ``(n_experts, I / n_experts)`` channel ids, each row sorted ascending.

    Rows are scaled to unit norm (cosine similarity: channels that fire on the same tokens group);
    initial centroids are a channel drawn under ``seed``, then by farthest-point seeding each channel least
    similar to all centroids so far (random seeds can start two centroids in one group); each iteration
    assigns by :func:`balanced_assign` on the similarity to the centroids and moves each centroid to
    its members' (normalised) mean. Ends early when the assignment stops changing.
    """
    n = features.shape[0]
    if n % n_experts:
        raise ValueError(f"{n} channels cannot split into {n_experts} equal experts ({n} % {n_experts} != 0)")
    f = F.normalize(features.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, n, (1,), generator=g)
    picked, closest = [first], f @ f[first].T  # farthest-point seeding: each next centroid is the channel
    for _ in range(n_experts - 1):  # least similar to every centroid so far (a loop over experts only)
        nxt = closest[:, 0].argmin(0, keepdim=True)
        picked.append(nxt)
        closest = torch.maximum(closest, f @ f[nxt].T)
    cent = f[torch.cat(picked)]
    assign = None
    for _ in range(iters):
        new = balanced_assign(f @ cent.T)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        cent = F.normalize(torch.zeros_like(cent).index_add_(0, assign, f), dim=1)
    return torch.argsort(assign, stable=True).reshape(n_experts, n // n_experts)


# ------------------------------------------------------------------ router
@torch.no_grad()
def expert_importance(
    h: torch.Tensor, down: torch.Tensor, groups: torch.Tensor, chunk: int = 2048
) -> torch.Tensor:
    """``(T, E)``: ``||down[:, ch_e] h_{ch_e}||`` per token and expert, from ``h (T, I)`` (the input of
    ``down_proj``), ``down (H, I)`` and ``groups (E, I/E)`` channel ids."""
    hg = h[:, groups]  # (T, E, I/E)
    dg = down[:, groups]  # (H, E, I/E)
    return torch.cat([torch.einsum("tei,hei->teh", hg[s : s + chunk], dg).norm(dim=-1)
                      for s in range(0, h.shape[0], chunk)])  # fmt: skip


def topk_recall(logits: torch.Tensor, importance: torch.Tensor, k: int) -> float:
    """Mean fraction of each token's ``k`` most important experts that the router's top-k holds."""
    pred = torch.zeros_like(importance, dtype=torch.bool).scatter_(1, logits.topk(k, dim=1).indices, True)
    true = torch.zeros_like(importance, dtype=torch.bool).scatter_(1, importance.topk(k, dim=1).indices, True)
    return ((pred & true).sum(1).float() / k).mean().item()


def _target(importance: torch.Tensor) -> torch.Tensor:
    y = importance.clamp_min(1e-12).log()
    return y - y.mean(1, keepdim=True)


def fit_router(
    x: torch.Tensor, importance: torch.Tensor, k: int, *, ridge: float = 1e-2, steps: int = 0,
    lr: float = 1e-2, seed: int = 0,
) -> torch.Tensor:  # fmt: skip
    """A linear router ``(E, H)`` (no bias, as Mixtral's) from inputs ``x (T, H)`` and expert
    importances ``(T, E)``, scaled so its logits spread with unit standard deviation across experts
    (mean over tokens).

    Ridge regression of the token-centred log importance on ``x`` (``ridge`` relative to the mean
    diagonal of ``x^T x``), then (``steps > 0``, off by default: it lowered the held-out recall on
    SmolLM2) ``steps`` Adam steps (full batch) on the cross-entropy of the router's softmax against
    the uniform distribution over each token's true top-``k`` experts plus the regression loss
    (scaled by 0.1) to keep the other logits in order.
    """
    x, y = x.detach().float(), _target(importance.detach().float())
    gram = x.T @ x
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(x.shape[1]), x.T @ y).T.contiguous()  # (E, H)
    if steps:
        torch.manual_seed(seed)
        sc = (x @ w.T).std(1).mean().clamp_min(1e-6)
        w = nn.Parameter(w / sc)
        top = torch.zeros_like(y).scatter_(1, y.topk(k, dim=1).indices, 1.0 / k)
        ys = y / sc
        opt = torch.optim.Adam([w], lr=lr)
        for _ in range(steps):
            z = x @ w.T
            loss = -(top * z.log_softmax(1)).sum(1).mean() + 0.1 * (z - ys).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        w = w.detach()
    return w / (x @ w.T).std(1).mean().clamp_min(1e-6)


# ------------------------------------------------------------------ assembling the MoE
def mixtral_config(llama_config, n_experts: int, top_k: int):
    """A ``MixtralConfig`` with a Llama config's sizes, ``n_experts`` experts of ``I / n_experts``."""
    from transformers import MixtralConfig

    c = llama_config
    if c.intermediate_size % n_experts:
        raise ValueError(
            f"intermediate_size {c.intermediate_size} does not split into {n_experts} equal experts"
        )
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False) or c.hidden_act != "silu":
        raise ValueError(
            "MoEfication into Mixtral needs a Llama without biases and with SiLU (Mixtral has none)"
        )
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size // n_experts, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=getattr(c, "head_dim", None),
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters),
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, sliding_window=None,
        attention_dropout=c.attention_dropout, num_local_experts=n_experts, num_experts_per_tok=top_k,
        router_jitter_noise=0.0, output_router_logits=False,
    )  # fmt: skip


def assemble_moe(llama, groups: list[torch.Tensor], routers: list[torch.Tensor] | None, top_k: int,
                 beta: float = 1.0):  # fmt: skip
    """``MixtralForCausalLM`` (eval mode, the Llama's dtype) from a ``LlamaForCausalLM``, per layer
    ``groups (E, I/E)`` channel ids and a router ``(E, H)`` (None: zero routers, exactly uniform
    weights). Expert ``e`` holds channels ``groups[e]``: ``gate_up_proj[e] = [gate[ch]; up[ch]]`` and
    ``down_proj[e] = top_k * down[:, ch]`` (so ``top_k`` weights of ``1/top_k`` sum the experts as the
    dense MLP does); the router weight is ``beta * router``."""
    from transformers import MixtralForCausalLM

    E = groups[0].shape[0]
    cfg = mixtral_config(llama.config, E, top_k)
    dtype = next(llama.parameters()).dtype
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    src = llama.state_dict()
    state = {k: v for k, v in src.items() if ".mlp." not in k}
    for i, layer in enumerate(llama.model.layers):
        mlp, ch, p = layer.mlp, groups[i], f"model.layers.{i}.mlp."
        state[p + "experts.gate_up_proj"] = torch.cat([mlp.gate_proj.weight[ch], mlp.up_proj.weight[ch]], 1)
        state[p + "experts.down_proj"] = top_k * mlp.down_proj.weight[:, ch].permute(1, 0, 2)
        r = torch.zeros(E, cfg.hidden_size) if routers is None else beta * routers[i]
        state[p + "gate.weight"] = r.to(dtype)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"assembling the MoE: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    bufs = dict(llama.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            if name not in bufs:
                raise RuntimeError(f"assembling the MoE: buffer {name} has no source")
            model.get_submodule(owner).register_buffer(attr, bufs[name].clone(), persistent=False)
    model.config._attn_implementation = llama.config._attn_implementation
    return model.eval()


def set_top_k(model, k: int) -> None:
    """Route each token of a MoEfied model to ``k`` experts: sets ``num_experts_per_tok`` and every
    router's ``top_k``, and rescales each ``down_proj`` by ``k / k_old`` (weights near ``1/k``)."""
    old = model.config.num_experts_per_tok
    layers = model.model.layers
    n = min(layer.mlp.gate.num_experts for layer in layers)
    if not 1 <= k <= n:
        raise ValueError(f"top_k must be in 1..{n} (the fewest experts of a layer); got {k}")
    with torch.no_grad():
        for layer in layers:
            layer.mlp.top_k = layer.mlp.gate.top_k = k
            layer.mlp.experts.down_proj.mul_(k / old)
    model.config.num_experts_per_tok = k


# ------------------------------------------------------------------ calibration
@torch.no_grad()
def mlp_inputs(llama, ids: torch.Tensor, batch: int = 8, progress: bool = False) -> list[torch.Tensor]:
    """Per decoder layer, the ``(N * L, H)`` float32 inputs of its MLP (the post-attention-RMSNorm
    hidden states) on token ids ``(N, L)``, from the dense model."""
    layers = llama.model.layers
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda m, a, i=i: store[i].append(a[0].reshape(-1, a[0].shape[-1]).float())
        )
        for i, layer in enumerate(layers)
    ]
    try:
        for s in tqdm(range(0, ids.shape[0], batch), desc="calibration forward", disable=not progress):
            llama.model(input_ids=ids[s : s + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in store]


@torch.no_grad()
def channel_activations(mlp, x: torch.Tensor) -> torch.Tensor:
    """``(T, I)``: ``silu(gate x) * (up x)``, the input of the Llama MLP's ``down_proj``."""
    w = mlp.gate_proj.weight.float(), mlp.up_proj.weight.float()
    return F.silu(x @ w[0].T) * (x @ w[1].T)


def moefy(llama, ids: torch.Tensor, recipe: MoERecipe, progress: bool = False):
    """``(groups, routers, log)`` for a ``LlamaForCausalLM`` from calibration ids ``(N, L)``: per layer
    the :func:`partition_channels` of ``|h|`` and the :func:`fit_router` router, fitted on the first
    windows; ``log`` holds each layer's top-k recall on the held-out windows (at every power-of-two k
    up to E/2 and at ``recipe.top_k``) next to a random router's ``k / E``."""
    n_fit = ids.shape[0] - max(1, round(recipe.heldout * ids.shape[0])) if recipe.heldout else ids.shape[0]
    t0 = time.perf_counter()
    xs = mlp_inputs(llama, ids, progress=progress)
    t_fwd = time.perf_counter() - t0
    n_tok = n_fit * ids.shape[1]
    E = recipe.n_experts
    ks = sorted({recipe.top_k, *(2**j for j in range(8) if 2**j <= max(1, E // 2))})
    groups, routers, recall = [], [], {k: [] for k in ks}
    for i, layer in enumerate(tqdm(llama.model.layers, desc="MoEfying layers", disable=not progress)):
        x = xs[i]
        h = channel_activations(layer.mlp, x)
        g = partition_channels(h[:n_tok].abs().T, E, recipe.kmeans_iters, recipe.seed + i)
        imp = expert_importance(h, layer.mlp.down_proj.weight.float(), g)
        with torch.enable_grad():
            w = fit_router(x[:n_tok], imp[:n_tok], recipe.top_k, ridge=recipe.ridge,
                           steps=recipe.router_steps, lr=recipe.router_lr, seed=recipe.seed + i)  # fmt: skip
        held = slice(n_tok, None) if n_tok < x.shape[0] else slice(None)
        for k in ks:
            recall[k].append(topk_recall(x[held] @ w.T, imp[held], k))
        groups.append(g)
        routers.append(w)
        xs[i] = None  # free as we go
    log = {
        "recall_heldout": {str(k): sum(v) / len(v) for k, v in recall.items()},
        "recall_random": {str(k): k / E for k in ks},
        "recall_per_layer": {str(k): v for k, v in recall.items()},
        "calibration_tokens": int(ids.numel()),
        "fit_tokens": int(n_tok),
        "seconds_forward": t_fwd,
        "seconds_total": time.perf_counter() - t0,
    }
    return groups, routers, log


def build(recipe: MoERecipe = MoERecipe(), progress: bool = True, llama=None, tok=None):
    """``(MixtralForCausalLM float32, tokenizer, log)``: MoEfy the real SmolLM2-135M (no cache)."""
    from ..weights.calibration import calibration_ids
    from .packaged import smollm2

    if llama is None:
        llama, tok = smollm2(torch.float32)
    torch.manual_seed(recipe.seed)
    ids = calibration_ids(tok, None, n_samples=recipe.n_windows, seq_len=recipe.seq_len, seed=recipe.seed)
    groups, routers, log = moefy(llama, ids, recipe, progress)
    model = assemble_moe(llama, groups, routers, recipe.top_k, recipe.beta)
    return model, tok, log


def smollm2_moe(dtype: torch.dtype = torch.bfloat16, recipe: MoERecipe = MoERecipe(), progress: bool = True,
                rebuild: bool = False):  # fmt: skip
    """``(MixtralForCausalLM in eval mode, tokenizer)``: SmolLM2-135M MoEfied into ``recipe.n_experts``
    experts per layer (default 16 of 96 channels), ``recipe.top_k`` per token (default 8).

    The first call builds it (calibration forward, balanced k-means and router fits: about 80 s on 2
    CPU cores, with progress bars) and saves it to ``$PRUNEKIT_CACHE/smollm2-moe/<recipe.key()>``;
    later calls load it. ``rebuild=True`` builds again. :func:`build_log` returns the build's log
    (router recall, seconds).
    """

    def make():
        model, tok, log = build(recipe, progress)
        return model, tok, log | {"recipe": asdict(recipe)}

    return load_or_build(cache_dir("smollm2-moe") / recipe.key(), make, dtype, rebuild)


def load_or_build(folder, make, dtype: torch.dtype = torch.float32, rebuild: bool = False):
    """``(MixtralForCausalLM in eval mode, tokenizer)`` loaded from ``folder``; when it holds no model
    (or ``rebuild``), first ``make() -> (model, tokenizer, log)`` is called and saved there
    (``save_pretrained``: safetensors and config; the tokenizer; ``build-log.json`` with the log and
    ``seconds_build``)."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    from .packaged import _quiet_transformers

    _quiet_transformers()
    if rebuild or not (folder / "model.safetensors").exists():
        t = time.perf_counter()
        model, tok, log = make()
        log = dict(log, seconds_build=time.perf_counter() - t)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        (folder / "build-log.json").write_text(json.dumps(log, indent=1))
    model = MixtralForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def build_log(recipe: MoERecipe = MoERecipe()) -> dict | None:
    """The log written when the cached MoE of ``recipe`` was built (router recall, seconds), if any."""
    p = cache_dir("smollm2-moe") / recipe.key() / "build-log.json"
    return json.loads(p.read_text()) if p.exists() else None
