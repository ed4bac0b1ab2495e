"""Sequence plumbing shared by the adapters: apply one Selection to every tensor that must agree.

Everything here is vectorised over the batch: ragged results (samples keeping different numbers
of tokens) are left-packed into ``(B, L')`` index tensors whose unused leading slots are masked,
exactly like left padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import PrunekitError
from ..tokens.context import TokenContext
from .base import Session, Timer
from .compat import cache_of


def left_pack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, L)`` bool -> ``idx (B, L')`` ascending kept positions, left-padded, and ``valid (B, L')``.

    Padding slots point at dropped positions and are ``False`` in ``valid``; ``L'`` is the largest
    kept count in the batch.
    """
    B, L = keep.shape
    width = int(keep.sum(dim=1).max()) if B else 0
    order = torch.sort(
        keep.to(torch.int8), dim=1, stable=True
    ).indices  # dropped first, then kept, each ascending
    idx = order[:, L - width :]  # (B, L')
    return idx, keep.gather(1, idx)


def right_pack(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`left_pack` but kept positions first and the unused slots at the end.

    For bidirectional encoders whose heads read fixed leading positions (CLS at index 0).
    """
    width = int(keep.sum(dim=1).max()) if keep.shape[0] else 0
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices  # kept first, each ascending
    idx = order[:, :width]
    return idx, keep.gather(1, idx)


def decoder_call(args: tuple, kw: dict) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """What a pre-hook on a decoder model sees: ``(input ids or embeddings (B, L, ...), tokens
    already cached, the 2-D attention mask or None)``."""
    x = kw.get("inputs_embeds")
    if x is None:
        x = kw.get("input_ids", args[0] if args else None)
    pkv = cache_of(kw)
    am = kw.get("attention_mask")
    am2d = am if isinstance(am, torch.Tensor) and am.dim() == 2 else None
    return x, (pkv.get_seq_length() if pkv is not None else 0), am2d


def real_tokens(am2d: torch.Tensor | None, x: torch.Tensor, what: str) -> torch.Tensor:
    """``(B, L)`` bool: the prompt's real tokens; refuses right padding (``what`` names the API)."""
    B, L = x.shape[:2]
    valid = torch.ones(B, L, dtype=torch.bool, device=x.device) if am2d is None else am2d.bool()
    if not bool(valid[:, -1].all()):
        raise PrunekitError(
            f"{what} needs left padding (the last position must be a real token in every row); "
            "set tokenizer.padding_side = 'left'"
        )
    return valid


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather positions ``idx (B, L')`` along ``dim`` of ``x`` whose batch dim is ``dim - 1``.

    Works for hidden states ``(B, L, D)`` (dim 1), RoPE tables ``(B|1, L, hd)`` (dim 1) and
    M-RoPE position ids ``(R, B, L)`` (dim 2); a batch dim of 1 is broadcast.
    """
    B = idx.shape[0]
    shape = list(x.shape)
    shape[dim - 1] = B
    x = x.expand(*shape)
    view = [1] * x.dim()
    view[dim - 1], view[dim] = B, idx.shape[1]
    full = list(x.shape)
    full[dim] = idx.shape[1]
    return x.gather(dim, idx.view(view).expand(full))


def call_arg(args: tuple, kw: dict, i: int, name: str):
    """Argument ``name`` of a layer call, passed at position ``i`` or by keyword (else ``None``)."""
    return args[i] if len(args) > i else kw.get(name)


def key_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``(B, 1, 1, T)`` additive mask hiding the unused slots of ragged rows as keys (bidirectional
    blocks), or ``None`` when every slot is in use."""
    if bool(valid.all()):
        return None
    mask = torch.zeros(valid.shape[0], 1, 1, valid.shape[1], dtype=dtype, device=valid.device)
    return mask.masked_fill_(~valid[:, None, None, :], torch.finfo(dtype).min)


def call_with(args: tuple, kw: dict, hidden: torch.Tensor, mask, mask_pos: int | None = None):
    """A layer's call arguments with ``hidden_states`` replaced by ``hidden`` and ``attention_mask``
    by ``mask`` (at position ``mask_pos`` when the call passed it positionally there)."""
    args = list(args)
    if args:
        args[0] = hidden
    else:
        kw["hidden_states"] = hidden
    if mask_pos is not None and len(args) > mask_pos:
        args[mask_pos] = mask
    else:
        kw["attention_mask"] = mask
    return tuple(args), kw


def attention_mask_4d(
    key_valid: torch.Tensor, q_len: int, dtype: torch.dtype, additive: bool
) -> torch.Tensor:
    """``(B, 1, q_len, Kv)`` causal mask over ``key_valid (B, Kv)``; queries are the last ``q_len`` keys.

    Every query may attend to itself, so padded rows never become all-masked (NaN-free).
    ``additive``: float mask with the dtype's minimum (eager attention); else bool, True = attend.
    """
    Kv = key_valid.shape[1]
    q_pos = torch.arange(Kv - q_len, Kv, device=key_valid.device)[:, None]  # (q, 1)
    k_pos = torch.arange(Kv, device=key_valid.device)[None, :]  # (1, Kv)
    allowed = (key_valid[:, None, :] & (k_pos <= q_pos)[None]) | (k_pos == q_pos)[None]  # (B, q, Kv)
    allowed = allowed[:, None]  # (B, 1, q, Kv)
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


@dataclass
class Groups:
    """Candidate groups (an image's visual tokens, a prompt): sample index and positions of each."""

    sample: list[int]
    positions: list[torch.Tensor]  # each (n_g,) long, positions in the sequence of sample[g]
    ids: list[int]  # an id per group (e.g. the image index), handed to signal functions
    #: tokens kept per group; ``None``: the session's budget resolved on the group's size
    budgets: list[int] | None = None
    #: ``(rows, cols)`` patch grid of each group (``ctx.grid``), where the adapter knows it
    grids: list[tuple[int, int] | None] | None = None


SignalFn = Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor]


def gather_square(A: torch.Tensor, b: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows and columns ``pos (S, n)`` of per-head maps ``A[b]``: ``(B, H, L, L) -> (S, H, n, n)``."""
    A = A[b]  # (S, H, L, L)
    S, H, L, _ = A.shape
    n = pos.shape[1]
    rows = A.gather(2, pos[:, None, :, None].expand(S, H, n, L))  # (S, H, n, L)
    return rows.gather(3, pos[:, None, None, :].expand(S, H, n, n))  # (S, H, n, n)


def signal_gatherers(per_sequence: dict[str, torch.Tensor]) -> dict[str, SignalFn]:
    """Signal functions for signals computed over whole sequences: ``(B, L)`` rows are gathered at
    the group's positions, ``(B, L, L)`` and ``(B, H, L, L)`` maps at its rows and columns."""
    fns: dict[str, SignalFn] = {}
    for kind, t in per_sequence.items():
        if t.dim() == 2:
            fns[kind] = lambda b, pos, ids, t=t: t[b[:, None], pos]  # (S, n)
        elif t.dim() == 3:  # head-mean maps (B, L, L)
            fns[kind] = lambda b, pos, ids, t=t: gather_square(t[:, None], b, pos)[:, 0]  # (S, n, n)
        else:
            fns[kind] = lambda b, pos, ids, t=t: gather_square(t, b, pos)  # (S, H, n, n)
    return fns


def select_in_groups(
    session: Session,
    keep_mask: torch.Tensor,
    groups: Groups,
    tokens: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    signals: dict[str, SignalFn],
    family: str,
    write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    layer: int | None = None,
    record: bool = True,
    publish: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> float:
    """Run the session's method on every group and clear the dropped positions in ``keep_mask``.

    Groups of equal size are stacked and handed to the method together (vectorised); the loop is
    over distinct group sizes only. ``tokens(sample_idx (S,), pos (S, n)) -> (S, n, D)``;
    each signal function takes ``(sample_idx, pos, group_ids)`` and returns ``(S, n)``.
    A merging method's new token vectors go to ``write(sample_idx (S,), kept_pos (S, k), values
    (S, k, D))``; a stage without ``write`` refuses them. Groups of one size but different
    ``groups.budgets`` or ``groups.grids`` (``ctx.grid``) are stacked separately. ``layer``: the
    decoder layer being cut (llm stage).
    ``record=False`` leaves the statistics to the caller. A selection's ``scores`` (for a later
    stage) go to ``publish(sample_idx, kept_pos, scores (S, k))``. A selection with ``valid``
    (per-group counts, ATP-LLaVA) drops the tokens of its unused slots. Returns the seconds spent
    selecting.
    """
    method = session.method
    sizes = [len(p) for p in groups.positions]
    budgets = groups.budgets or [method.keep_count(session.keep, n) for n in sizes]
    grids = groups.grids or [None] * len(sizes)
    seconds = 0.0
    for n, k, grid in sorted(
        set(zip(sizes, budgets, grids, strict=True)), key=lambda t: (t[0], t[1], str(t[2]))
    ):
        if n == 0:
            continue
        members = [g for g in range(len(sizes)) if (sizes[g], budgets[g], grids[g]) == (n, k, grid)]
        b = torch.tensor([groups.sample[g] for g in members], device=keep_mask.device)
        pos = torch.stack([groups.positions[g] for g in members]).to(keep_mask.device)  # (S, n)
        if k <= 0:  # a budget the protected tokens used up: every candidate goes, the method is not run
            keep_mask[b[:, None].expand_as(pos), pos] = False
            if record:
                session.stats.record(len(members) * n, 0, 0.0)
            continue
        ids = [groups.ids[g] for g in members]
        with Timer() as t:
            ctx = TokenContext(
                stage=session.stage,
                tokens=tokens(b, pos),
                signals={kind: fn(b, pos, ids) for kind, fn in signals.items()},
                model=family,
                layer=layer,
                grid=grid,
                score_dtype=getattr(session, "score_dtype", "float32"),
            )
            sel = method.select(ctx, k)
        keep = sel.keep.to(pos.device)
        kept_pos = pos.gather(1, keep)  # (S, k)
        if sel.valid is not None and sel.values is not None:
            raise PrunekitError(f"{method.name!r}: a selection with unused slots cannot merge values")
        if sel.values is not None:
            if write is None:
                raise PrunekitError(
                    f"{method.name!r} merges tokens, but the {session.stage} stage of {family} "
                    "can only drop them"
                )
            write(b, kept_pos, sel.values)
        if sel.scores is not None and publish is not None:
            publish(b, kept_pos, sel.scores)
        if sel.valid is None:
            dropped = torch.ones_like(pos, dtype=torch.bool).scatter_(1, keep, False)
            n_kept = kept_pos.numel()
        else:  # instance-adaptive counts: only the slots in use keep their token
            used = sel.valid.to(pos.device)
            hit = torch.zeros_like(pos).scatter_reduce_(1, keep, used.long(), "amax")
            dropped, n_kept = hit == 0, int(used.sum())
        rows = b[:, None].expand_as(pos)
        keep_mask[rows[dropped], pos[dropped]] = False
        seconds += t.seconds
        if record:
            session.stats.record(len(members) * n, n_kept, t.seconds)
    return seconds
