"""Stage (b): a token cut at decoder layer K, for Llama / Qwen2 / Mistral decoders and the
language model inside a VLM.

How it stays consistent through ``generate()`` (transformers 5, see the notes on v5):
- the model passes the same full-length ``position_embeddings``, ``position_ids`` and mask to
  every layer, so a pre-hook on **every** layer >= K gathers them to the kept positions (original
  position ids are kept, as FastV does);
- layers < K keep the full KV cache, layers >= K cache only the kept tokens; decode positions come
  from layer 0's cache length or ``generate``'s own tracking, both full length, hence right;
- when samples keep different counts (ratio budgets on ragged prompts, left padding), kept
  positions are left-packed and the unused slots masked like padding, with a 4-D mask built here
  (bool for SDPA, additive for eager) in prefill and in every decode step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import nn

from ..errors import PrunekitError, SignalUnavailableError, UnsupportedModelError
from ..tokens.schedule import group_counts, mean_tokens
from .attention import (
    causal_allowed,
    decoder_attention,
    decoder_logits,
    last_query_attention,
    probabilities,
    score_dtype,
)
from .base import Adapter, Session, check_cut_layer, required_signals
from .compat import cache_of
from .heads import HeadCascade
from .sequence import (
    Groups,
    attention_mask_4d,
    decoder_call,
    gather_tokens,
    left_pack,
    real_tokens,
    select_in_groups,
    signal_gatherers,
)

DECODER_TYPES = ("llama", "qwen2", "mistral", "mixtral", "qwen3")

#: candidates(valid (B, L) bool, L) -> groups of candidate positions
CandidateFn = Callable[[torch.Tensor], Groups]


def _arg(args: tuple, kw: dict, name: str) -> torch.Tensor:
    return args[0] if args else kw[name]


#: signals of the llm stage, and how they are had. Single-cut methods (FastV) get them from layer
#: ``K-1`` (or the layer they name); progressive methods from each cut layer's own q/k on its input.
LLM_SIGNALS: dict[str, str] = {
    "last_token_attention": "head mean of the last prompt token's row, recomputed from q/k",
    "attention_map": "per-head causal map of one layer, recomputed from q/k",
    "attention_logits": "head mean of one layer's pre-softmax logits q k^T * scaling, recomputed from "
    "q/k; entries a query cannot see (later keys, padding) are -inf (G, N, N)",
    "instruction_attention": "head-mean rows of the instruction (the real tokens after the group) "
    "over the candidates, recomputed from q/k, zero-padded (G, T, N)",
    "instruction_mask": "which instruction rows are real (G, T)",
    "instruction_embeddings": "the instruction tokens' input embeddings (decoder layer 0 input) (G, T, D)",
    "input_embeddings": "the candidates' input embeddings (decoder layer 0 input) (G, N, D)",
    "transition": "TransPrune's token transition variation summed over layers [layer, cut); layer "
    "defaults to the one before the first cut (G, N)",
    "cumulative_attention": "attention each candidate received, summed over real queries, heads and "
    "every layer before the cut (SpAtten) (G, N)",
    "vision_importance": "the score an enclosing vision-stage session's method gave each surviving "
    "visual token (VFlowOpt's importance map) (G, N)",
    "value_attention": "head mean of the softmax, over the group's candidates, of the last prompt "
    "token's value against theirs (v_t . v_j / sqrt(d), FlowCut's semantic flow), recomputed from "
    "v_proj (G, N)",
    "value_norm": "L1 norm of each candidate's head-mean value vector, recomputed from v_proj (G, N)",
}
#: llm-stage signals only a VLM gives (the candidates are an image's patches)
VLM_LLM_SIGNALS: dict[str, str] = {
    "patch_index": "each visual token's index among its image's visual tokens before the first cut "
    "(its raster index in the patch grid) (G, N) long",
    "patch_count": "the image's number of visual tokens before the first cut (G,) long",
}
_ATTENTION_KINDS = (
    "last_token_attention",
    "attention_map",
    "instruction_attention",
    "attention_logits",
    "value_attention",
    "value_norm",
)
_INDEX_KINDS = ("patch_index", "patch_count")
_INSTRUCTION_KINDS = ("instruction_attention", "instruction_mask", "instruction_embeddings")
_EMBEDDING_KINDS = ("instruction_embeddings", "input_embeddings")


class LLMCut:
    """Hooks that drop candidate tokens from the input of decoder layer ``K`` onward, or, for a
    progressive method, at each of its cut layers ``K_1 < K_2 < ...`` (fewer at each)."""

    def __init__(
        self,
        session: Session,
        text_model: nn.Module,
        layer: int,
        candidates: CandidateFn,
        family: str,
        vision_scores: Callable[[], torch.Tensor | None] | None = None,
        offered: Mapping[str, str] = LLM_SIGNALS,
        protect: torch.Tensor | None = None,
    ) -> None:
        self.session, self.text_model = session, text_model
        #: token ids that are never candidates but count against the budget (``prune_tokens(protect=)``)
        self.protect = protect
        self.vision_scores = vision_scores
        self.layers = text_model.layers
        self.candidates, self.family = candidates, family
        n = len(self.layers)
        method = session.method
        cuts = method.cuts(n)
        self.progressive = cuts is not None
        self.cuts = tuple(check_cut_layer(K, n, "LLM") for K in (cuts if self.progressive else (layer,)))
        self.K = self.cuts[0]
        if protect is not None and self.progressive:
            raise UnsupportedModelError(
                f"protect= is supported for single-cut llm methods (e.g. fastv); {method.name!r} cuts at "
                f"several layers {list(self.cuts)}"
            )
        needs = required_signals(method, "llm", family, offered)
        self.kinds = set(needs) - {"tokens", "hidden"}
        self.signal_layers: dict[int, list[str]] = {}  # single cut: layer -> attention kinds there
        self.ttv_start: int | None = None
        self.cumulative = "cumulative_attention" in self.kinds
        if "vision_importance" in self.kinds and vision_scores is None:
            raise SignalUnavailableError(
                f"{method.name}: signal 'vision_importance' comes from a vision-stage session around "
                f"this one; {family} has no vision stage"
            )
        #: cascade head pruning (SpAtten): heads kept at each cut, or None
        heads = text_model.config.num_attention_heads
        counts = method.head_counts(heads, len(self.cuts)) if hasattr(method, "head_counts") else None
        self.heads = None if counts is None else HeadCascade(heads, counts, self.cuts, session)
        for sig in needs.values():
            if sig.kind == "cumulative_attention":
                continue
            if sig.kind == "transition":
                start = self.K - 1 if sig.layer is None else sig.layer
                if not 0 <= start < self.K:
                    raise SignalUnavailableError(
                        f"signal {sig}: accumulation must start in [0, first cut - 1 = {self.K - 1}]; "
                        f"got {start}"
                    )
                self.ttv_start = start
            elif sig.kind in _ATTENTION_KINDS:
                if self.progressive:
                    if sig.layer is not None:
                        raise SignalUnavailableError(
                            f"signal {sig}: a progressive method gets attention at each cut layer; "
                            "ask for it without a layer"
                        )
                    continue
                l = self.K - 1 if sig.layer is None else sig.layer
                if not 0 <= l < self.K:
                    raise SignalUnavailableError(
                        f"signal {sig}: the layer must be in [0, K-1={self.K - 1}]; got {l}"
                    )
                self.signal_layers.setdefault(l, []).append(sig.kind)
        self.index = {id(m): i for i, m in enumerate(self.layers)}
        self.o_proj_index = {id(m.self_attn.o_proj): i for i, m in enumerate(self.layers)}
        self.window = getattr(getattr(text_model, "config", None), "sliding_window", None)
        self._reset(0)

    def install(self) -> None:
        hooks = self.session.hooks
        hooks.pre(self.text_model, self._on_model)
        if self.kinds & set(_EMBEDDING_KINDS):
            hooks.pre(self.layers[0], self._on_first_layer)
        for l, kinds in self.signal_layers.items():
            hooks.pre(self.layers[l].self_attn, self._signal_hook(kinds))
        if self.ttv_start is not None:
            for layer in self.layers[self.ttv_start : self.cuts[-1]]:
                for norm, sub in (
                    (layer.input_layernorm, layer.self_attn),
                    (layer.post_attention_layernorm, layer.mlp),
                ):
                    hooks.post(norm, self._ttv_input)
                    hooks.post(sub, self._ttv_output)
        if self.cumulative:
            for layer in self.layers[: self.cuts[-1]]:
                hooks.pre(layer.self_attn, self._accumulate_attention)
        if self.heads is not None:
            for layer in self.layers:
                hooks.pre(layer.self_attn.o_proj, self._on_heads, with_kwargs=False)
        for layer in self.layers[self.K :]:
            hooks.pre(layer, self._on_layer)

    # --------------------------------------------------------------- per call state
    def _reset(self, L: int) -> None:
        self.L, self.kidx, self.slot_valid, self.rows = L, None, None, {}
        self.segments: list[tuple[int, torch.Tensor, bool]] = []  # (cut layer, slot validity, custom mask)
        self.pe = self.pid = self.mask = None
        self.gid = self.emb = self.ttv = self._x = self.cum = None
        if self.heads is not None:
            self.heads.reset()
        self.n0: list[int] = []
        self.n_protected: list[int] | None = None  # per group: protected tokens among its prompt
        self.protected: torch.Tensor | None = None  # (B, L) bool: the prompt's protected tokens
        self.select_seconds = 0.0

    @property
    def cur_valid(self) -> torch.Tensor:
        return self.valid if self.slot_valid is None else self.slot_valid

    def _on_model(self, module: nn.Module, args: tuple, kw: dict) -> None:
        x, past, self.am2d = decoder_call(args, kw)
        self.prefill = past == 0
        if self.prefill:
            B, L = x.shape[:2]
            self._reset(L)
            valid = real_tokens(self.am2d, x, "token pruning in a decoder")
            if self.window is not None and self.window < L:
                raise PrunekitError(
                    f"prompt of {L} tokens exceeds the sliding window {self.window}: not supported"
                )
            self.valid = valid
            if self.protect is not None:
                if x.dim() != 2 or x.is_floating_point():
                    raise PrunekitError(
                        "protect= needs the prompt's input_ids to find the protected tokens; this call "
                        "passed inputs_embeds"
                    )
                self.protected = torch.isin(x, self.protect.to(x.device)) & valid
            if self.ttv_start is not None:
                self.ttv = torch.zeros(B, L, device=x.device)
            if self.cumulative:
                self.cum = torch.zeros(B, L, device=x.device)

    def _on_first_layer(self, layer: nn.Module, args: tuple, kw: dict) -> None:
        if self.prefill:
            self.emb = _arg(args, kw, "hidden_states")  # (B, L, D) input embeddings

    # --------------------------------------------------------------- signals
    def _signal_hook(self, kinds: list[str]):
        def hook(attn: nn.Module, args: tuple, kw: dict) -> None:
            if self.prefill:
                self._attention_signals(
                    kinds, attn, _arg(args, kw, "hidden_states"), kw["position_embeddings"]
                )

        return hook

    def _attention_signals(
        self, kinds: list[str], attn: nn.Module, h: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Attention signals from ``attn``'s q/k on ``h`` (its normed input) over the current sequence."""
        valid = self.cur_valid
        dt = score_dtype(self.session.score_dtype, h)  # None: float32
        if {"attention_map", "instruction_attention", "attention_logits"} & set(kinds):
            logits = decoder_logits(attn, h, pe, dtype=dt)  # (B, H, L, L)
            L = logits.shape[-1]
            logits = logits.masked_fill(~causal_allowed(L, L, valid, h.device), float("-inf"))
            if "attention_logits" in kinds:
                self.rows["attention_logits"] = logits.mean(dim=1).float()  # (B, L, L); hidden stays -inf
            A = probabilities(logits, dt)
            if "attention_map" in kinds:
                self.rows["attention_map"] = A.float()
            if "instruction_attention" in kinds:
                self.rows["instruction_attention"] = A.mean(dim=1).float()  # (B, L, L)
        if "last_token_attention" in kinds:
            self.rows["last_token_attention"] = last_query_attention(attn, h, pe, valid, dt)  # (B, L)
        if {"value_attention", "value_norm"} & set(kinds):
            B, L = h.shape[:2]
            hd = attn.head_dim
            v = attn.v_proj(h).float().view(B, L, -1, hd).transpose(1, 2)  # (B, H_kv, L, hd)
            # the last prompt token's value logits over every position; softmax per group later
            self.rows["value_logits"] = (v @ v[:, :, -1, :, None])[..., 0] / math.sqrt(hd)  # (B, H_kv, L)
            self.rows["value_norm"] = v.mean(dim=1).abs().sum(dim=-1)  # (B, L)

    def _accumulate_attention(self, attn: nn.Module, args: tuple, kw: dict) -> None:
        """SpAtten's cumulative token importance: attention received, over real queries and heads."""
        if not self.prefill:
            return
        h, pe = _arg(args, kw, "hidden_states"), kw["position_embeddings"]
        A = decoder_attention(attn, h, pe, self.cur_valid)  # (B, H, L, L)
        self.cum = self.cum + (A * self.cur_valid[:, None, :, None]).sum(dim=(1, 2))

    def _on_heads(self, o_proj: nn.Module, args: tuple):
        """Before each layer's output projection: accumulate each head's output magnitude (prefill,
        layers before the last cut) and zero the heads the cascade pruned (prefill and decode)."""
        x = args[0]  # (B, q, H * hd)
        i = self.o_proj_index[id(o_proj)]
        out = self.heads.apply(i, x, self.cur_valid if self.prefill else None, accumulate=self.prefill)
        return None if out is None else (out,)

    def _ttv_input(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self.prefill:
            self._x = out

    def _ttv_output(self, module: nn.Module, args: tuple, out) -> None:
        """TransPrune's token transition of one sub-layer: ``|y|/|x| * softmax_seq(1 - cos(x, y))``."""
        if not self.prefill or self._x is None:
            return
        y = (out[0] if isinstance(out, tuple) else out).float()
        x = self._x.float()
        ratio = y.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)
        d = 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
        nec = d.masked_fill(~self.cur_valid, float("-inf")).softmax(dim=-1)  # over this sequence's tokens
        self.ttv = self.ttv + ratio * nec
        self._x = None

    # --------------------------------------------------------------- the cut
    def _groups_now(self) -> tuple[Groups, list[torch.Tensor], torch.Tensor]:
        """Candidate groups in the current sequence, each group's instruction positions, and the
        per-slot group id (-1: not a candidate)."""
        if self.gid is None:  # first cut: candidates of the full sequence
            if self.protected is None:
                groups = self.candidates(self.valid)
            else:  # protected tokens are no candidates; each group's count of them lowers its budget
                groups = self.candidates(self.valid & ~self.protected)
                every = self.candidates(self.valid)
                self.n_protected = [
                    int(self.protected[b, pos].sum())
                    for b, pos in zip(every.sample, every.positions, strict=True)
                ]
            self.gid = torch.full(self.valid.shape, -1, dtype=torch.long, device=self.valid.device)
            self.rank0 = torch.full_like(self.gid, -1)  # each candidate's index within its group
            for g, (b, pos) in enumerate(zip(groups.sample, groups.positions, strict=True)):
                pos = pos.to(self.gid.device)
                self.gid[b, pos] = g
                self.rank0[b, pos] = torch.arange(len(pos), device=pos.device)
            self.group_sample, self.group_ids = list(groups.sample), list(groups.ids)
            self.n0 = [len(p) for p in groups.positions]
        gid = (
            self.gid if self.kidx is None else self.gid.gather(1, self.kidx).masked_fill(~self.slot_valid, -1)
        )
        valid = self.cur_valid
        Lc = gid.shape[1]
        ar = torch.arange(Lc, device=gid.device)
        positions, instr = [], []
        for g, b in enumerate(self.group_sample):
            pos = (gid[b] == g).nonzero().flatten()
            positions.append(pos)
            last = int(pos[-1]) if len(pos) else Lc
            instr.append((valid[b] & (gid[b] < 0) & (ar > last)).nonzero().flatten())
        return (
            Groups(sample=self.group_sample, positions=positions, ids=list(range(len(positions)))),
            instr,
            gid,
        )

    def _budgets(self, groups: Groups, cut: int) -> list[int]:
        keep = self.session.keep
        if not self.progressive:
            count = self.session.method.keep_count
            if self.n_protected is not None:  # the budget of the whole prompt, protected tokens first
                return [
                    max(0, count(keep, len(p) + q) - q)
                    for p, q in zip(groups.positions, self.n_protected, strict=True)
                ]
            return [count(keep, len(p)) for p in groups.positions]
        n_layers = len(self.layers)
        return [group_counts(self.session.method, n0, keep, n_layers)[cut] if n0 else 0 for n0 in self.n0]

    def _select(self, h: torch.Tensor, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Select at the ``cut``-th cut; returns the local slot indices kept (left-packed) and the
        hidden states, with a merging method's new vectors written into their slots."""
        groups, instr, _ = self._groups_now()
        groups.budgets = self._budgets(groups, cut)
        keep_mask = self.cur_valid.clone()  # padding is dropped too: it becomes masked slots
        signals = signal_gatherers(
            {
                k: v
                for k, v in self.rows.items()
                if k in ("last_token_attention", "attention_map", "attention_logits", "value_norm")
            }
        )
        if "value_logits" in self.rows:  # softmax over each group's candidates, then head mean
            vl = self.rows["value_logits"]
            signals["value_attention"] = lambda b, pos, ids: (
                vl[b[:, None], :, pos].softmax(dim=1).mean(dim=-1)  # (S, n, H_kv) -> (S, n)
            )
        signals.update(self._index_gatherers())
        signals.update(self._instruction_gatherers(instr, groups))
        if self.ttv is not None:
            ttv = self.ttv
            signals["transition"] = lambda b, pos, ids: ttv[b[:, None], pos]
        if self.cum is not None:
            cum = self.cum
            signals["cumulative_attention"] = lambda b, pos, ids: cum[b[:, None], pos]
        if "vision_importance" in self.kinds:
            signals["vision_importance"] = self._vision_importance()
        out = {"h": h}

        def write(b: torch.Tensor, kept_pos: torch.Tensor, values: torch.Tensor) -> None:
            if out["h"] is h:  # the layer input is the previous layer's output: write into a copy
                out["h"] = h.clone()
            out["h"][b[:, None], kept_pos] = values.to(h.dtype)

        self.select_seconds += select_in_groups(
            self.session,
            keep_mask,
            groups,
            tokens=lambda b, pos: h[b[:, None], pos],
            signals=signals,
            family=self.family,
            write=write,
            layer=self.cuts[cut],
            record=not self.progressive,
        )
        if self.n_protected is not None:  # protected tokens are seen and kept: the stats count them
            self.session.stats.tokens_in += sum(self.n_protected)
            self.session.stats.tokens_kept += sum(self.n_protected)
        local, slot_valid = left_pack(keep_mask)  # (B, L'), (B, L')
        self.kidx = local if self.kidx is None else self.kidx.gather(1, local)
        self.slot_valid = slot_valid
        self.session.attention_mask = slot_valid.long()  # the output's (logits') sequence
        kept = torch.zeros_like(self.valid).scatter_(1, self.kidx, slot_valid)  # original coordinates
        stats = self.session.stats
        stats.kept_masks.append(kept.cpu())
        stats.cut_layers.append(self.cuts[cut])
        if self.ttv is not None:
            self.ttv = self.ttv.gather(1, local)
        if self.cum is not None:
            self.cum = self.cum.gather(1, local)
        if self.heads is not None:
            self.heads.cut(cut)
        if self.progressive and cut == len(self.cuts) - 1:
            self._record_progressive(groups)
        return local, out["h"]

    def _index_gatherers(self) -> dict:
        """``patch_index`` / ``patch_count``: where each surviving candidate sat in its group
        before the first cut, and the group's size then (ATP-LLaVA's spatial grid)."""
        if not self.kinds & set(_INDEX_KINDS):
            return {}
        rank = self.rank0 if self.kidx is None else self.rank0.gather(1, self.kidx)  # read at candidates only
        n0 = torch.tensor(self.n0, dtype=torch.long, device=rank.device)
        return {
            "patch_index": lambda b, pos, ids: rank[b[:, None], pos],
            "patch_count": lambda b, pos, ids: n0[ids],
        }

    def _vision_importance(self):
        scores = None if self.vision_scores is None else self.vision_scores()
        if scores is None:
            raise SignalUnavailableError(
                f"{self.session.method.name}: signal 'vision_importance' needs a vision-stage session of "
                "the same method around this llm-stage one (it ranks by the vision stage's scores); "
                f"{self.family} got none"
            )
        now = scores if self.kidx is None else scores.gather(1, self.kidx)
        return lambda b, pos, ids: now[b[:, None], pos]

    def _instruction_gatherers(self, instr: list[torch.Tensor], groups: Groups) -> dict:
        if not self.kinds & {*_INSTRUCTION_KINDS, *_EMBEDDING_KINDS}:
            return {}
        T = max([len(p) for p in instr] + [1])
        dev = self.valid.device
        ipos = torch.zeros(len(instr), T, dtype=torch.long, device=dev)
        imask = torch.zeros(len(instr), T, dtype=torch.bool, device=dev)
        for g, p in enumerate(instr):
            ipos[g, : len(p)], imask[g, : len(p)] = p, True
        fns = {}
        if "instruction_mask" in self.kinds:
            fns["instruction_mask"] = lambda b, pos, ids: imask[ids]
        if "instruction_attention" in self.kinds:
            A = self.rows["instruction_attention"]  # (B, L, L) head mean

            def attention(b, pos, ids):
                rows = A[b[:, None], ipos[ids]]  # (S, T, L)
                cols = rows.gather(2, pos[:, None, :].expand(-1, T, -1))  # (S, T, n)
                return cols * imask[ids][..., None]

            fns["instruction_attention"] = attention
        emb = None
        if self.kinds & set(_EMBEDDING_KINDS):
            emb = self.emb if self.kidx is None else gather_tokens(self.emb, self.kidx, 1)
        if "input_embeddings" in self.kinds:
            fns["input_embeddings"] = lambda b, pos, ids: emb[b[:, None], pos]
        if "instruction_embeddings" in self.kinds:

            def embeddings(b, pos, ids):
                return emb[b[:, None], ipos[ids]] * imask[ids][..., None]

            fns["instruction_embeddings"] = embeddings
        return fns

    def _record_progressive(self, groups: Groups) -> None:
        """One record per call: candidates seen, and the mean kept per decoder layer achieved."""
        n_layers = len(self.layers)
        kept = torch.stack(
            [m.to(self.valid.device) for m in self.session.stats.kept_masks[-len(self.cuts) :]]
        )
        per_cut = [
            [int(kept[c, b, self.gid[b] == g].sum()) for c in range(len(self.cuts))]
            for g, b in enumerate(self.group_sample)
        ]
        mean = sum(mean_tokens(self.cuts, cs, n0, n_layers) for cs, n0 in zip(per_cut, self.n0, strict=True))
        self.session.stats.record(sum(self.n0), mean, self.select_seconds)

    def _on_layer(self, layer: nn.Module, args: tuple, kw: dict):
        h = _arg(args, kw, "hidden_states")
        i = self.index[id(layer)]
        am = kw.get("attention_mask")
        additive = layer.self_attn.config._attn_implementation == "eager"
        if self.prefill:
            if i in self.cuts:
                cut = self.cuts.index(i)
                pe = kw["position_embeddings"] if self.pe is None else self.pe
                if self.progressive:
                    kinds = [k for k in _ATTENTION_KINDS if k in self.kinds]
                    if kinds:
                        self._attention_signals(kinds, layer.self_attn, layer.input_layernorm(h), pe)
                local, h = self._select(h, cut)
                self.pe = (gather_tokens(pe[0], local, 1), gather_tokens(pe[1], local, 1))
                pid = kw.get("position_ids") if self.pid is None else self.pid
                self.pid = None if pid is None else gather_tokens(pid, local, pid.dim() - 1)
                custom = am is not None or not bool(self.slot_valid.all())
                self.mask = (
                    attention_mask_4d(self.slot_valid, self.slot_valid.shape[1], h.dtype, additive)
                    if custom
                    else None
                )
                self.segments.append((i, self.slot_valid, custom))
                h = gather_tokens(h, local, 1)
            kw["position_embeddings"] = self.pe
            if "position_ids" in kw:
                kw["position_ids"] = self.pid
            kw["attention_mask"] = self.mask
        elif self.kidx is not None:
            _, slot_valid, custom = next(s for s in reversed(self.segments) if s[0] <= i)
            if custom or am is not None:
                # decode (or a multi-token continuation, for which the model builds a full-length
                # causal mask): columns = this layer's kept slots + new tokens
                B = h.shape[0]
                new = (
                    self.am2d[:, self.L :].bool()
                    if self.am2d is not None
                    else torch.ones(B, 0, dtype=torch.bool, device=h.device)
                )
                key_valid = torch.cat([slot_valid, new], dim=1)
                n_keys = cache_of(kw).get_seq_length(i) + h.shape[1]  # this layer's cache + new
                if key_valid.shape[1] != n_keys:  # no 2-D mask given: new tokens are all real
                    pad = torch.ones(B, n_keys - key_valid.shape[1], dtype=torch.bool, device=h.device)
                    key_valid = torch.cat([key_valid, pad], dim=1)
                kw["attention_mask"] = attention_mask_4d(key_valid, h.shape[1], h.dtype, additive)
        if args:
            return (h, *args[1:]), kw
        kw["hidden_states"] = h
        return args, kw


def text_candidates(valid: torch.Tensor) -> Groups:
    """A plain LLM's candidates: every real prompt token but the last (it makes the next token)."""
    cand = valid.clone()
    cand[:, -1] = False
    B = valid.shape[0]
    return Groups(
        sample=list(range(B)), positions=[cand[b].nonzero().flatten() for b in range(B)], ids=list(range(B))
    )


def _text_model(model: nn.Module) -> nn.Module | None:
    if hasattr(model, "layers") and hasattr(model, "embed_tokens"):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers") and hasattr(inner, "embed_tokens"):
        return inner
    return None


class DecoderAdapter(Adapter):
    """Llama / Qwen2 / Mistral (and Mixtral, Qwen3) decoders: stage ``llm``.

    On a text-only model the candidates are the prompt tokens before the last one, less any
    protected tokens (``prune_tokens(..., protect=...)``).
    """

    family = "decoder (Llama/Qwen2/Mistral)"
    protects = True
    stages = ("llm",)
    stage_signals: ClassVar[Mapping[str, Mapping[str, str]]] = {"llm": LLM_SIGNALS}
    missing_stage_reason: ClassVar[Mapping[str, str]] = {
        "vision": "a text-only decoder has no visual tokens",
        "encoder": "a decoder has no ViT/encoder blocks",
    }

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        return mt in DECODER_TYPES and _text_model(model) is not None

    def attach(self, session: Session) -> None:
        self.check_stage(session.stage)
        tm = _text_model(self.model)
        if tm is None:
            raise UnsupportedModelError(f"{type(self.model).__name__}: no decoder layers found")
        m = session.method
        K = m.default_cut(len(tm.layers)) if m.layer is None else m.layer
        session.hooks.setattr(self.model, "_prunekit_llm_cut", True)
        LLMCut(session, tm, K, text_candidates, self.family, protect=session.protect).install()


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, layers)`` of the decoder stack of a causal LM, or of the language model
    inside a VLM: the first module with ``embed_tokens`` and a ``layers`` ModuleList.

    :class:`UnsupportedModelError` (naming the supported families) for any other model."""
    if isinstance(model, nn.Module):
        for name, module in model.named_modules():
            layers = getattr(module, "layers", None)
            if isinstance(layers, nn.ModuleList) and hasattr(module, "embed_tokens"):
                return (f"{name}.layers" if name else "layers"), layers
    from .vlm import VLM_ADAPTERS

    what = (
        f"{type(model).__name__} (model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r})"
        if isinstance(model, nn.Module)
        else f"a {type(model).__name__}, not a torch.nn.Module"
    )
    raise UnsupportedModelError(
        f"weight pruning supports causal LMs ({', '.join(WEIGHT_DECODER_TYPES)}) and the language model "
        f"inside a VLM ({', '.join(sorted({a.family for a in VLM_ADAPTERS}))}); got {what}"
    )


#: the causal-LM families weight pruning is tested on (any decoder stack with ``embed_tokens``
#: and a ``layers`` ModuleList is found the same way)
WEIGHT_DECODER_TYPES = (*DECODER_TYPES, "gemma3_text")
