"""Q-Tuning: dynamic sample-and-token pruning of each fine-tuning mini-batch (Wang et al., *Winning
the Pruning Gamble: A Unified Approach to Joint Sample and Token Pruning for Efficient Supervised
Fine-Tuning*, arXiv 2509.23873; no official code: the repository ``gszfwsb/Q-tuning`` holds only the
project page). Implemented from the v2 paper text, Algorithm 1 (App. D).

At every step, one no-grad forward of the *current* model gives each sample its perplexity (error)
and mean predictive entropy (uncertainty) over its answer tokens (``labels != -100``; the logits at
position ``i-1`` predict token ``i``; fp32 ``log_softmax``; the NLL is clamped at 50 before ``exp``).
A bisection on two quantile levels ``(α, β)`` (``K_max = 10`` steps, brackets ``[0, 0.49]``,
inverted-CDF quantiles) splits the batch into four quadrants of the error-uncertainty plane:

- Q1 harmful noise (high PPL, high Ent): dropped;
- Q2 valuable misconception (high PPL, low Ent): kept, its answer tokens pruned;
- Q3 redundant knowledge (low PPL, low Ent): dropped;
- Q4 calibration data (low PPL, high Ent): kept whole.

The kept set ``Q2 ∪ Q4`` is topped up from ``Q1 ∪ Q3`` by ``supp = |P̂PL − Ênt|`` (min-max over the
batch) up to ``⌊r_sample·|B|⌋`` samples (at least 1). In a kept Q2 sample, each answer token gets
``s_i = (1−λ)·PPL_i + λ·(PPL_{i−1} + PPL_{i+1})`` (no /2, as eq. 7 and Algorithm 1 write it) and the
``⌊r_token·|T(x)|⌋`` (at least 1) LOWEST scores are kept: "tokens with high local PPL are removed".

Choices of ours where the paper is silent or ambiguous (each labelled *ours*):

- Partition [ours, the reading that matches the bisection's direction]: with ``ppl_hi = Q_{1−α}(PPL)``,
  ``ppl_lo = Q_α(PPL)``, ``ent_lo = Q_β(Ent)``, ``ent_hi = Q_{1−β}(Ent)``: Q2 = {PPL ≥ ppl_hi, Ent ≤
  ent_lo}, Q4 = {PPL ≤ ppl_lo, Ent ≥ ent_hi}, Q1 = {PPL ≥ ppl_hi, Ent ≥ ent_hi}, Q3 = {PPL ≤ ppl_lo,
  Ent ≤ ent_lo}; a sample in several (ties, tiny batches) takes the first of Q2, Q4, Q1, Q3; the middle
  band (in none) is dropped. The partition of the last bisection step is used (Algorithm 1).
- Bisection tie [Algorithm 1 as the spec gives it]: ``r < r_sample`` raises the lower brackets,
  otherwise the upper ones (the paper's eq. 6 sends ``r == r_sample`` the other way; the top-up and
  cap make the kept count exact either way).
- Cap [ours]: the bisection can end with more than ``⌊r_sample·|B|⌋`` samples in Q2 ∪ Q4; the ones
  with the highest ``supp`` are kept. Top-up [ours beyond the paper]: if Q1 ∪ Q3 cannot fill the
  budget, middle-band samples follow, also by ``supp``; ties in ``supp`` go to the lower index.
  ``supp`` is 0 on an axis whose values are all equal. Topped-up samples keep all their answer
  tokens (the paper prunes tokens in Q2 only) [ours]; ``topup_tokens="by_side"`` [ours, an
  extension] prunes the tokens of a topped-up sample on Q2's side of the diagonal (``P̂PL > Ênt``).
  On real batches of 8 the bisection often cannot fill ``r_sample`` from Q2 ∪ Q4 (PPL and entropy
  are correlated), so top-ups are common: the log's ``kept_histogram`` shows how many.
- Token neighbours [ours]: neighbours are the adjacent *answer* tokens of the same sample (in
  sequence order); a missing neighbour at either end of the answer is replaced by the token's own PPL.
  Ties in ``s_i`` keep the earlier token.
- Median test [ours, off by default]: the paper's prose calls a token detrimental when both its PPL
  and its neighbours' mean PPL exceed a percentile (e.g. the median), but Algorithm 1 does not use it.
  With ``median_test=True`` only such tokens (median over the sample's answer tokens) may be pruned,
  highest ``s_i`` first, so a sample can keep more than ``⌊r_token·|T(x)|⌋`` tokens.
- ``token_mode`` [ours; the paper is ambiguous]: the mask notation ``m(x) ⊙ x`` can mean removing
  pruned tokens from the loss (``"loss_mask"``, default: ``labels = -100``, the context stays intact)
  or deleting them from the input (``"drop"``: removed from ``input_ids``, ``attention_mask``,
  ``labels`` and any other per-token tensor, rows re-padded on their padding side). Dropped samples
  are always removed from the batch.
- Statistics are over the per-step mini-batch, as in the paper (8 samples per device by default).
  ``score_window`` is not implemented.

Not copied from the third-party port ``fy1214/slime`` (``slime/utils/q_tuning_pruner.py``), which
departs from the paper: it divides the neighbour sum by 2, assigns "mid" bands to quadrants ad hoc,
ranks kept samples by ``norm_ppl − norm_ent`` and defaults to a token keep ratio of 0.7.

Integration with the transformers ``Trainer`` / TRL ``SFTTrainer``: :class:`QTuningCollator` wraps the
data collator (the ``Trainer`` itself is unchanged) and :class:`QTuningCallback` logs the quadrant
histogram and the fraction of answer tokens that received gradient. Why a collator and not a hook
on ``training_step`` / ``compute_loss`` or on the model's forward: the ``Trainer`` counts the
loss-normalising tokens (``num_items_in_batch``, over all accumulated micro-batches and processes)
from the collated labels before the forward, so pruning later would scale the loss by the kept
fraction; and a hook on ``training_step`` needs a ``Trainer`` subclass. The price [ours, documented]:
accelerate's data loader fetches one batch ahead, so under the ``Trainer`` a batch is scored by the
model as it was one optimizer step earlier (the paper scores with the current model; at fine-tuning
learning rates the difference is one small step). :func:`step_filter` in a hand-written loop scores
with the current model exactly. The collator must run in the training process
(``dataloader_num_workers=0``: a worker would hold a stale copy of the model), and it needs the
model's parameters whole (DDP: yes, each process filters its own per-device batch, as the paper's
per-device batch does; FSDP / DeepSpeed ZeRO-3 sharded parameters: not supported).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..registry import register
from .scores import IGNORE, answer_tokens, eval_mode

NLL_CLAMP = 50.0
TOKEN_MODES = ("loss_mask", "drop")
TOPUP_TOKENS = ("keep", "by_side")
#: quadrant codes in :attr:`QTuningInfo.quadrant`: 0 = in no quadrant (the middle band)
QUADRANTS = {0: "none", 1: "Q1", 2: "Q2", 3: "Q3", 4: "Q4"}


# ------------------------------------------------------------------ options
def _ratio(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1) or math.isnan(v):
        raise ValueError(f"{name} must be a number in (0, 1] (the kept fraction); got {v!r}")
    return float(v)


def check_options(r_sample, r_token, lam, token_mode="loss_mask", max_iter=10, topup_tokens="keep") -> None:
    """Raise ``ValueError`` naming the bad value and its range."""
    _ratio("r_sample", r_sample)
    _ratio("r_token", r_token)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0 <= lam <= 1):
        raise ValueError(f"lam must be a number in [0, 1] (the neighbours' weight λ); got {lam!r}")
    if token_mode not in TOKEN_MODES:
        raise ValueError(f"token_mode must be one of {TOKEN_MODES}; got {token_mode!r}")
    if topup_tokens not in TOPUP_TOKENS:
        raise ValueError(f"topup_tokens must be one of {TOPUP_TOKENS}; got {topup_tokens!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1 (bisection steps, K_max); got {max_iter!r}")


# ------------------------------------------------------------------ statistics
@dataclass
class AnswerStats:
    """Per-sample and per-token statistics over answer tokens. ``ppl``, ``entropy``: ``(B,)`` fp32;
    ``token_ppl``: ``(B, T)`` aligned with ``labels`` (``PPL_i`` at answer position ``i``, 1 elsewhere);
    ``answer``: ``(B, T)`` bool, the positions that are trained (``i >= 1`` and ``labels[i] != -100``)."""

    ppl: torch.Tensor
    entropy: torch.Tensor
    token_ppl: torch.Tensor
    answer: torch.Tensor

    @property
    def n_answer(self) -> torch.Tensor:
        return self.answer.sum(1)


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: positions whose token is trained (a label, predicted by the previous position)."""
    mask = labels != IGNORE
    mask[:, 0] = False  # no logit predicts the first token
    return mask


def answer_statistics(
    logits: torch.Tensor, labels: torch.Tensor, nll_clamp: float = NLL_CLAMP
) -> AnswerStats:
    """PPL, mean entropy (nats) and per-token PPL over the answer tokens of each row, from a forward's
    ``logits`` ``(B, T, V)`` and ``labels`` ``(B, T)`` (``-100`` = not trained). Only the answer
    positions' logits are converted to fp32. A row without an answer token raises ``ValueError``."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    labels = labels.to(logits.device)
    ans = answer_mask(labels)
    n = ans.sum(1)
    if bool((n == 0).any()):
        rows = torch.nonzero(n == 0).flatten().tolist()
        raise ValueError(
            f"Q-Tuning needs answer tokens (labels != -100 after the first position) in every sample; "
            f"batch rows {rows} have none"
        )
    z, tgt, _, _, pos = answer_tokens(logits, labels)  # pos (B, T-1): logits at t predict label t+1
    lp = z.float().log_softmax(-1)  # (N, V), answer positions only
    nll = -lp.gather(-1, tgt[:, None])[:, 0]
    ent = -(lp.exp() * lp).sum(-1)
    B, T = labels.shape
    nll_full = torch.zeros(B, T - 1, dtype=torch.float32, device=logits.device)
    ent_full = torch.zeros_like(nll_full)
    nll_full[pos] = nll
    ent_full[pos] = ent
    nf = n.float()
    ppl = torch.exp((nll_full.sum(1) / nf).clamp_max(nll_clamp))
    entropy = ent_full.sum(1) / nf
    tok = torch.ones(B, T, dtype=torch.float32, device=logits.device)
    tok[:, 1:] = torch.where(pos, torch.exp(nll_full.clamp_max(nll_clamp)), tok[:, 1:])
    return AnswerStats(ppl, entropy, tok, ans)


# ------------------------------------------------------------------ sample selection (Algorithm 1)
def inverted_cdf_quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """``Q_q(x)`` of a 1-D tensor: the smallest value with at least a fraction ``q`` of ``x`` at or
    below it (``numpy.quantile(x, q, method="inverted_cdf")``)."""
    n = x.numel()
    v = n * float(q) - 1.0  # numpy's virtual index for inverted_cdf, in the same float64 arithmetic
    k = math.floor(v)
    k = k + 1 if v - k > 0 else k
    k = min(max(k, 0), n - 1)
    return torch.sort(x).values[k]


def partition(ppl: torch.Tensor, ent: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Quadrant code (0 = none, 1..4 = Q1..Q4) of each sample at quantile levels ``(α, β)``."""
    ppl_hi, ppl_lo = inverted_cdf_quantile(ppl, 1.0 - alpha), inverted_cdf_quantile(ppl, alpha)
    ent_lo, ent_hi = inverted_cdf_quantile(ent, beta), inverted_cdf_quantile(ent, 1.0 - beta)
    hp, lp, le, he = ppl >= ppl_hi, ppl <= ppl_lo, ent <= ent_lo, ent >= ent_hi
    q = torch.zeros(ppl.shape, dtype=torch.long, device=ppl.device)
    for code, m in ((3, lp & le), (1, hp & he), (4, lp & he), (2, hp & le)):  # last write wins: Q2 first
        q = torch.where(m, torch.full_like(q, code), q)
    return q


def _minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def support(ppl: torch.Tensor, ent: torch.Tensor) -> torch.Tensor:
    """``supp = |P̂PL − Ênt|`` with min-max normalisation over the batch (0 on a constant axis)."""
    return (_minmax(ppl.double()) - _minmax(ent.double())).abs()


def _by_supp(cands: torch.Tensor, supp: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` candidates (bool mask) with the highest support, ties to the lower index."""
    idx = torch.nonzero(cands).flatten()
    order = torch.sort(-supp[idx], stable=True).indices
    return idx[order[:k]]


@dataclass
class SampleSelection:
    """Result of :func:`select_samples`. ``kept``: sorted row indices; ``quadrant``: ``(B,)`` codes
    (0..4) of the final bisection step; ``r``: fraction in Q2 ∪ Q4 after the bisection."""

    kept: torch.Tensor
    quadrant: torch.Tensor
    alpha: float
    beta: float
    r: float
    topped_up: int
    capped: int


def select_samples(
    ppl: torch.Tensor, ent: torch.Tensor, r_sample: float, max_iter: int = 10, hi: float = 0.49
) -> SampleSelection:
    """Algorithm 1's bisection on ``(α, β)`` (both brackets ``[0, hi]``), then top-up / cap to exactly
    ``max(1, ⌊r_sample·|B|⌋)`` samples (see the module docstring for the choices)."""
    _ratio("r_sample", r_sample)
    B = ppl.numel()
    a_lo = b_lo = 0.0
    a_hi = b_hi = float(hi)
    alpha = beta = 0.0
    quad = torch.zeros(B, dtype=torch.long, device=ppl.device)
    r = 0.0
    for _ in range(max_iter):
        alpha, beta = (a_lo + a_hi) / 2, (b_lo + b_hi) / 2
        quad = partition(ppl, ent, alpha, beta)
        r = float(((quad == 2) | (quad == 4)).sum()) / B
        if r < r_sample:
            a_lo, b_lo = alpha, beta
        else:
            a_hi, b_hi = alpha, beta
    target = max(1, math.floor(r_sample * B))
    supp = support(ppl, ent)
    keep = (quad == 2) | (quad == 4)
    n = int(keep.sum())
    topped = capped = 0
    if n > target:
        kept = _by_supp(keep, supp, target)
        capped = n - target
    else:
        extra = _by_supp((quad == 1) | (quad == 3), supp, target - n)
        if n + extra.numel() < target:
            extra = torch.cat([extra, _by_supp(quad == 0, supp, target - n - extra.numel())])
        kept = torch.cat([torch.nonzero(keep).flatten(), extra])
        topped = extra.numel()
    return SampleSelection(torch.sort(kept).values, quad, alpha, beta, r, topped, capped)


# ------------------------------------------------------------------ token selection
def _compact(answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each row's answer tokens first, in order: ``(order (B, T), counts (B,))``."""
    order = torch.sort((~answer).to(torch.int8), dim=1, stable=True).indices
    return order, answer.sum(1)


def token_scores(ppl: torch.Tensor, n: torch.Tensor, lam: float) -> torch.Tensor:
    """``s_i = (1−λ)·PPL_i + λ·(PPL_{i−1} + PPL_{i+1})`` (no /2) over compacted rows ``ppl`` ``(B, L)``
    whose first ``n[b]`` entries are the answer tokens; a missing neighbour at either end is the
    token's own PPL [ours]. Entries past ``n[b]`` are ``+inf``."""
    L = ppl.shape[1]
    j = torch.arange(L, device=ppl.device)[None]
    valid = j < n[:, None]
    left = torch.cat([ppl[:, :1], ppl[:, :-1]], 1)
    right = torch.cat([ppl[:, 1:], ppl[:, -1:]], 1)
    right = torch.where(j + 1 < n[:, None], right, ppl)
    s = (1 - lam) * ppl + lam * (left + right)
    return s.masked_fill(~valid, math.inf)


def select_tokens(
    token_ppl: torch.Tensor, answer: torch.Tensor, r_token: float, lam: float, median_test: bool = False
) -> torch.Tensor:
    """``(B, T)`` bool: the answer tokens kept in each row (Q2 rule): the ``max(1, ⌊r_token·|T(x)|⌋)``
    lowest ``s_i`` (with ``median_test``: only tokens whose PPL and neighbours' mean PPL both exceed
    the row's median answer PPL may be pruned, highest ``s_i`` first)."""
    order, n = _compact(answer)
    ppl = token_ppl.gather(1, order).double()
    s = token_scores(ppl, n, lam)
    k = torch.clamp(torch.floor(r_token * n.double()).long(), min=1)
    rank = torch.empty_like(order)
    rank.scatter_(
        1, torch.sort(s, dim=1, stable=True).indices, torch.arange(s.shape[1], device=s.device).expand_as(s)
    )
    L = s.shape[1]
    valid = torch.arange(L, device=s.device)[None] < n[:, None]
    keep = (rank < k[:, None]) & valid
    if median_test:
        nan = torch.where(valid, ppl, torch.full_like(ppl, math.nan))
        med = torch.nanquantile(nan, 0.5, dim=1, interpolation="lower", keepdim=True)
        left = torch.cat([ppl[:, :1], ppl[:, :-1]], 1)
        right = torch.where(torch.arange(L, device=s.device)[None] + 1 < n[:, None],
                            torch.cat([ppl[:, 1:], ppl[:, -1:]], 1), ppl)  # fmt: skip
        bad = (ppl > med) & ((left + right) / 2 > med) & valid
        keep = keep | (valid & ~bad)
    out = torch.zeros_like(answer)
    out.scatter_(1, order, keep)
    return out & answer


# ------------------------------------------------------------------ one batch
@dataclass
class QTuningInfo:
    """What :func:`step_filter` did to one batch. ``kept``: the kept rows (original indices);
    ``quadrant``: every row's code (0 none, 1..4 = Q1..Q4); ``histogram``: rows per quadrant;
    ``kept_histogram``: kept rows per quadrant (top-ups included); ``answer_tokens``: answer tokens
    in the batch; ``grad_tokens``: answer tokens left with a label (they receive gradient)."""

    kept: list[int]
    quadrant: list[int]
    histogram: dict[str, int]
    kept_histogram: dict[str, int]
    alpha: float
    beta: float
    r_bisect: float
    topped_up: int
    capped: int
    answer_tokens: int
    grad_tokens: int
    ppl: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)

    @property
    def grad_fraction(self) -> float:
        return self.grad_tokens / self.answer_tokens

    def to_dict(self) -> dict:
        return asdict(self)


def _hist(codes: torch.Tensor) -> dict[str, int]:
    c = torch.bincount(codes.cpu(), minlength=5).tolist()
    return {QUADRANTS[i]: int(c[i]) for i in (1, 2, 3, 4, 0)}


def _padding_side(attention_mask: torch.Tensor | None) -> str:
    if attention_mask is None:
        return "right"
    left = bool((attention_mask[:, 0] == 0).any()) and bool((attention_mask[:, -1] != 0).all())
    return "left" if left else "right"


def _drop_tokens(batch: dict, keep_pos: torch.Tensor, pad_token_id: int, side: str) -> dict:
    """Keep the positions where ``keep_pos`` is True in every ``(B, T)`` tensor, re-padding on
    ``side`` to the longest row."""
    T = keep_pos.shape[1]
    n = keep_pos.sum(1)
    W = int(n.max())
    if side == "right":
        order = torch.sort((~keep_pos).to(torch.int8), dim=1, stable=True).indices[:, :W]
        slot = torch.arange(W, device=keep_pos.device)[None] < n[:, None]
    else:
        order = torch.sort(keep_pos.to(torch.int8), dim=1, stable=True).indices[:, T - W :]
        slot = torch.arange(W, device=keep_pos.device)[None] >= (W - n)[:, None]
    fill = {"labels": IGNORE, "attention_mask": 0, "input_ids": pad_token_id}
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == tuple(keep_pos.shape):
            g = v.gather(1, order.view(*order.shape, *([1] * (v.dim() - 2))).expand(-1, -1, *v.shape[2:]))
            pad = torch.full_like(g, fill.get(k, 0))
            out[k] = torch.where(slot.view(*slot.shape, *([1] * (v.dim() - 2))), g, pad)
        else:
            out[k] = v
    return out


def _forward_keys(model: nn.Module) -> set[str] | None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


_SCORING_KEYS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "pixel_values",
                 "image_grid_thw", "inputs_embeds")  # fmt: skip


@torch.no_grad()
def score_batch(model: nn.Module, batch: Mapping) -> AnswerStats:
    """One no-grad forward of ``model`` over ``batch`` (dropout off: every module in eval mode for the
    forward, each module's own train/eval flag restored afterwards, also after an exception)."""
    if "labels" not in batch:
        raise ValueError("Q-Tuning needs 'labels' in the batch (-100 marks tokens that are not trained)")
    dev = next(model.parameters()).device
    allowed = _forward_keys(model)
    keys = [k for k in _SCORING_KEYS if allowed is None or k in allowed]
    kw = {k: v.to(dev) for k, v in batch.items() if k in keys and isinstance(v, torch.Tensor)}
    with eval_mode(model):
        logits = model(**kw, use_cache=False).logits
    return answer_statistics(logits, batch["labels"].to(dev))


def filter_batch(
    batch: Mapping,
    stats: AnswerStats,
    r_sample: float = 0.25,
    r_token: float = 0.5,
    lam: float = 0.5,
    token_mode: str = "loss_mask",
    max_iter: int = 10,
    median_test: bool = False,
    pad_token_id: int = 0,
    topup_tokens: str = "keep",
) -> tuple[dict, QTuningInfo]:
    """Apply Q-Tuning's selection to ``batch`` given its statistics (:func:`answer_statistics`)."""
    check_options(r_sample, r_token, lam, token_mode, max_iter, topup_tokens)
    sel = select_samples(stats.ppl, stats.entropy, r_sample, max_iter)
    kept = sel.kept
    tok_keep = select_tokens(stats.token_ppl[kept], stats.answer[kept], r_token, lam, median_test)
    qk = sel.quadrant[kept]
    q2 = qk == 2
    if topup_tokens == "by_side":
        side = _minmax(stats.ppl.double()) > _minmax(stats.entropy.double())
        q2 = q2 | ((qk != 4) & side[kept])
    q2 = q2[:, None]
    tok_keep = torch.where(q2, tok_keep, stats.answer[kept])  # Q4 (and top-ups) keep every token
    pruned = (stats.answer[kept] & ~tok_keep).cpu()
    k_cpu = kept.cpu()
    B = stats.ppl.numel()
    out = {}
    for k, v in batch.items():
        out[k] = (
            v[k_cpu.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B else v
        )
    labels = out["labels"].clone()
    labels[pruned.to(labels.device)] = IGNORE
    if labels[:, 0].ne(IGNORE).any():  # the first position is never trained: keep it out of the count
        labels[:, 0] = IGNORE
    out["labels"] = labels
    if token_mode == "drop":
        keep_pos = ~pruned.to(labels.device)
        if "attention_mask" in out:
            keep_pos &= out["attention_mask"].to(labels.device) != 0
        out = _drop_tokens(out, keep_pos, pad_token_id, _padding_side(batch.get("attention_mask")))
    info = QTuningInfo(
        kept=k_cpu.tolist(), quadrant=sel.quadrant.cpu().tolist(), histogram=_hist(sel.quadrant),
        kept_histogram=_hist(sel.quadrant[kept]), alpha=sel.alpha, beta=sel.beta, r_bisect=sel.r,
        topped_up=sel.topped_up, capped=sel.capped, answer_tokens=int(stats.answer.sum()),
        grad_tokens=int(tok_keep.sum()), ppl=stats.ppl.cpu().tolist(), entropy=stats.entropy.cpu().tolist(),
    )  # fmt: skip
    return out, info


def _pad_id(model: nn.Module, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    cfg = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(cfg, name, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def step_filter(
    batch: Mapping,
    model: nn.Module,
    r_sample: float = 0.25,
    r_token: float = 0.5,
    lam: float = 0.5,
    token_mode: str = "loss_mask",
    max_iter: int = 10,
    median_test: bool = False,
    pad_token_id: int | None = None,
    topup_tokens: str = "keep",
) -> tuple[dict, QTuningInfo]:
    """Q-Tuning on one batch for a hand-written loop: score ``batch`` (``input_ids``, ``labels`` with
    -100 on prompt and padding, optional ``attention_mask``...) with one no-grad forward of ``model``
    as it is now, keep ``⌊r_sample·|B|⌋`` rows and, in the Q2 rows, ``⌊r_token·|T(x)|⌋`` answer tokens
    (``token_mode``). Returns the kept batch (tensors on the devices they came on) and a
    :class:`QTuningInfo`. Every rule and choice: the module docstring."""
    check_options(r_sample, r_token, lam, token_mode, max_iter, topup_tokens)
    stats = score_batch(model, batch)
    return filter_batch(batch, stats, r_sample, r_token, lam, token_mode, max_iter, median_test,
                        _pad_id(model, pad_token_id), topup_tokens)  # fmt: skip


# ------------------------------------------------------------------ Trainer integration
@dataclass
class QTuningStats:
    """Running totals over the batches a :class:`QTuningCollator` filtered."""

    batches: int = 0
    samples: int = 0
    kept_samples: int = 0
    answer_tokens: int = 0
    grad_tokens: int = 0
    histogram: dict = field(default_factory=lambda: {v: 0 for v in ("Q1", "Q2", "Q3", "Q4", "none")})
    kept_histogram: dict = field(default_factory=lambda: {v: 0 for v in ("Q1", "Q2", "Q3", "Q4", "none")})

    def add(self, info: QTuningInfo) -> None:
        self.batches += 1
        self.samples += len(info.quadrant)
        self.kept_samples += len(info.kept)
        self.answer_tokens += info.answer_tokens
        self.grad_tokens += info.grad_tokens
        for k, v in info.histogram.items():
            self.histogram[k] += v
        for k, v in info.kept_histogram.items():
            self.kept_histogram[k] += v

    @property
    def grad_fraction(self) -> float:
        """Fraction of the answer tokens seen that kept a label (received gradient)."""
        return self.grad_tokens / self.answer_tokens if self.answer_tokens else 0.0

    def as_logs(self, prefix: str = "qtuning/") -> dict[str, float]:
        out = {
            f"{prefix}grad_token_fraction": self.grad_fraction,
            f"{prefix}sample_fraction": self.kept_samples / self.samples if self.samples else 0.0,
        }
        out.update({f"{prefix}{k}": float(v) for k, v in self.histogram.items()})
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "grad_fraction": self.grad_fraction}


def _default_collate(features: list[dict], pad_token_id: int) -> dict:
    """Right-pad ``input_ids`` (``pad_token_id``), ``labels`` (-100) and ``attention_mask`` (0)."""
    L = max(len(f["input_ids"]) for f in features)
    out = {}
    for key, fill in (("input_ids", pad_token_id), ("labels", IGNORE), ("attention_mask", 0)):
        if key == "attention_mask" and key not in features[0]:
            rows = [[1] * len(f["input_ids"]) for f in features]
        elif key not in features[0]:
            raise ValueError(f"Q-Tuning features need {key!r}; got keys {sorted(features[0])}")
        else:
            rows = [list(torch.as_tensor(f[key]).tolist()) for f in features]
        out[key] = torch.tensor([r + [fill] * (L - len(r)) for r in rows], dtype=torch.long)
    return out


class QTuningCollator:
    """A data collator for the transformers ``Trainer`` (and TRL's ``SFTTrainer``) that applies
    Q-Tuning to every batch: ``base_collator(features)`` builds the batch (it must give ``labels`` with
    -100 on prompt and padding tokens; default: right padding of ``input_ids`` / ``labels`` /
    ``attention_mask`` features), one no-grad forward of ``model`` scores it on the model's device, and
    the filtered batch is returned (tensors where the base collator put them). Pass it as
    ``data_collator=`` and keep ``dataloader_num_workers=0``; ``remove_unused_columns`` may stay on
    (the ``Trainer`` strips the columns before this collator sees them). ``stats`` keeps running totals
    and ``last`` the last batch's :class:`QTuningInfo`; log them with :class:`QTuningCallback`.
    ``enabled=False`` passes batches through (for evaluation loaders)."""

    def __init__(
        self,
        model: nn.Module,
        base_collator: Callable | None = None,
        r_sample: float = 0.25,
        r_token: float = 0.5,
        lam: float = 0.5,
        token_mode: str = "loss_mask",
        max_iter: int = 10,
        median_test: bool = False,
        pad_token_id: int | None = None,
        enabled: bool = True,
        topup_tokens: str = "keep",
    ) -> None:
        check_options(r_sample, r_token, lam, token_mode, max_iter, topup_tokens)
        self.model = model
        self.base_collator = base_collator
        self.options = dict(r_sample=r_sample, r_token=r_token, lam=lam, token_mode=token_mode,
                            max_iter=max_iter, median_test=median_test,
                            topup_tokens=topup_tokens)  # fmt: skip
        self.pad_token_id = _pad_id(model, pad_token_id)
        self.enabled = enabled
        self.stats = QTuningStats()
        self.last: QTuningInfo | None = None

    def __call__(self, features):
        batch = (self.base_collator or (lambda f: _default_collate(f, self.pad_token_id)))(features)
        if not self.enabled:
            return batch
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "QTuningCollator runs a forward of the training model and must run in the training "
                "process: set dataloader_num_workers=0 (a worker process holds a stale copy of the model)"
            )
        if any(hasattr(p, "ds_id") for p in self.model.parameters()):
            raise NotImplementedError("QTuningCollator needs whole parameters; DeepSpeed ZeRO-3 shards them")
        out, info = step_filter(dict(batch), self.model, pad_token_id=self.pad_token_id, **self.options)
        self.last = info
        self.stats.add(info)
        return type(batch)(out) if not isinstance(batch, dict) else out


try:
    from transformers import TrainerCallback as _CallbackBase
except ImportError:  # pragma: no cover - transformers is a core dependency
    _CallbackBase = object


class QTuningCallback(_CallbackBase):
    """Adds the collator's running totals to the ``Trainer``'s logs (``state.log_history`` and the
    ``logs`` dict every logging step): ``qtuning/grad_token_fraction`` (answer tokens that received
    gradient / answer tokens seen, cumulative), ``qtuning/sample_fraction`` and the quadrant
    histogram ``qtuning/Q1``..``qtuning/Q4``, ``qtuning/none`` (rows per quadrant, cumulative). At the
    end of training one entry with the totals is appended to ``state.log_history``. The totals count
    every batch collated, which under accelerate's one-batch look-ahead may include one batch that
    was not trained on."""

    def __init__(self, collator: QTuningCollator) -> None:
        self.collator = collator

    def on_log(self, args, state, control, logs=None, **kw):
        extra = self.collator.stats.as_logs()
        if logs is not None:
            logs.update(extra)
        if state.log_history:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kw):
        state.log_history.append({"step": state.global_step, "qtuning": self.collator.stats.to_dict()})


# ------------------------------------------------------------------ registry
@register(
    "q_tuning",
    family="data",
    paper="Winning the Pruning Gamble: A Unified Approach to Joint Sample and Token Pruning for Efficient "
    "Supervised Fine-Tuning",
    stages=("fine-tuning",),
    signals=("answer_ppl (no-grad forward, per batch)", "answer_entropy", "token_ppl"),
    trains=False,
    summary="per mini-batch: keep the high-error/low-uncertainty and low-error/high-uncertainty samples "
    "(quantile bisection), prune the high-PPL answer tokens of the former",
)
@dataclass
class QTuning:
    """Q-Tuning's options as a registry method. ``QTuning(r_sample=0.25, r_token=0.5)(batch, model)``
    is :func:`step_filter`; ``.collator(model, base_collator)`` gives a :class:`QTuningCollator` and
    ``.callback(collator)`` its :class:`QTuningCallback` for the ``Trainer``."""

    docs_from: ClassVar[str] = "prunekit.data.qtuning"
    usage: ClassVar[str] = (
        "qt = prunekit.data.qtuning.QTuning(r_sample=0.25, r_token=0.5, lam=0.5{opts})\n"
        "collator = qt.collator(model, base_collator)  # labels: -100 on prompt and padding\n"
        "trainer = transformers.Trainer(model, args, train_dataset=ds, data_collator=collator,\n"
        "                               callbacks=[qt.callback(collator)])  # dataloader_num_workers=0\n"
        "trainer.train()  # logs qtuning/grad_token_fraction and the quadrant histogram"
    )
    r_sample: float = 0.25
    r_token: float = 0.5
    lam: float = 0.5
    token_mode: str = "loss_mask"
    max_iter: int = 10
    median_test: bool = False
    topup_tokens: str = "keep"

    def __post_init__(self) -> None:
        check_options(
            self.r_sample, self.r_token, self.lam, self.token_mode, self.max_iter, self.topup_tokens
        )

    def __call__(self, batch: Mapping, model: nn.Module, **kw) -> tuple[dict, QTuningInfo]:
        return step_filter(batch, model, **asdict(self), **kw)

    def collator(self, model: nn.Module, base_collator: Callable | None = None, **kw) -> QTuningCollator:
        return QTuningCollator(model, base_collator, **asdict(self), **kw)

    @staticmethod
    def callback(collator: QTuningCollator) -> QTuningCallback:
        return QTuningCallback(collator)
