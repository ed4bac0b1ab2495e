"""Stage (c) ``encoder`` on state-space models: token cuts between the blocks of transformers'
Mamba classes (``MambaModel``, ``MambaForCausalLM``).

transformers has no vision Mamba (ViM, PlainMamba); its Mamba blocks are the same selective-scan
mixer those models stack, so the encoder stage cuts tokens between them as it does between ViT
blocks: before block ``K`` (a single cut, ``method.layer``) or before each of a progressive
method's blocks. A cut keeps the candidates the method selects; how the survivors are laid out
for the later blocks is the method's ``alignment`` (see
:mod:`prunekit.tokens.methods.top_ssm`):

- ``"contract"``: kept tokens in their original order, the sequence shortened (what saves compute;
  the released ToP-ViM code);
- ``"align"``: every position stays; a pruned token's input to every later mixer is zeroed (by the
  mixer's own padding mask), so each kept token's short convolution and state decay still span
  the positions they spanned in the dense model. Same cost as dense in this software form;
- ``"naive"``: kept tokens reordered by importance, as a ViT-style top-k gather leaves them (the
  disruption of the scan the paper starts from).

Candidates are the real tokens except the last (a causal LM predicts from it; it is protected and
stays last). Padding (left, as transformers pads Mamba) is never a candidate: pruned and padding
slots are zero inputs, which leave the scan's state and the convolution untouched. Pruning acts
on the prefill only; decoding then continues from the states the pruned prefill left (a Mamba
cache holds no per-token entries, so nothing else needs bookkeeping).

Signal ``ssm_output``: the gated scan output of block ``K-1`` (the input of its ``out_proj``),
``(G, N, d_inner)``, read by a hook, not recomputed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from ..errors import SignalUnavailableError, UnsupportedModelError
from ..tokens.schedule import group_counts, mean_tokens
from .base import Adapter, Session, block_cuts, required_signals
from .sequence import Groups, call_arg, call_with, gather_tokens, left_pack, select_in_groups

SSM_SIGNALS: dict[str, str] = {
    "ssm_output": "gated scan output of block K-1, the input of its out_proj (G, N, d_inner)",
}
ALIGNMENTS = ("contract", "align", "naive")


class MambaAdapter(Adapter):
    family = "mamba"
    stages = ("encoder",)
    stage_signals: ClassVar[Mapping[str, Mapping[str, str]]] = {"encoder": SSM_SIGNALS}
    missing_stage_reason: ClassVar[Mapping[str, str]] = {
        "vision": "a Mamba model has no vision tower",
        "llm": "a Mamba stack has no attention layers; its token cut is the encoder stage",
    }
    model_types: ClassVar[tuple[str, ...]] = ("mamba",)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        return mt in cls.model_types and cls._backbone(model) is not None

    @staticmethod
    def _backbone(model: nn.Module) -> nn.Module | None:
        for m in (getattr(model, "backbone", None), model):
            if m is not None and isinstance(getattr(m, "layers", None), nn.ModuleList):
                return m
        return None

    @property
    def layers(self) -> nn.ModuleList:
        return self._backbone(self.model).layers

    def attach(self, session: Session) -> None:
        self.check_stage(session.stage)
        self.session = session
        method = session.method
        if hasattr(method, "merge_schedule"):
            raise UnsupportedModelError(
                "mamba: merging methods (ToMe) need attention blocks; use a cut method on a Mamba model"
            )
        depth = len(self.layers)
        self.progressive, self.cuts = block_cuts(method, depth)
        needs = required_signals(method, "encoder", self.family, SSM_SIGNALS)
        for sig in needs.values():
            if sig.layer is not None:
                raise SignalUnavailableError(
                    f"signal {sig}: at the encoder stage of mamba it comes from block K-1 of each cut; "
                    "ask for it without a layer"
                )
        self.alignment = getattr(method, "alignment", "contract")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {list(ALIGNMENTS)}; got {self.alignment!r}")
        self.wants_output = "ssm_output" in needs or self.alignment == "naive"
        backbone = self._backbone(self.model)
        session.hooks.pre(backbone, self._on_model)
        if self.wants_output:
            for K in self.cuts:
                session.hooks.pre(self.layers[K - 1].mixer.out_proj, self._on_scan_output, with_kwargs=False)
        for i in range(self.cuts[0], depth):
            session.hooks.pre(self.layers[i], self._layer_hook(i))

    # --------------------------------------------------------------- per call
    def _on_model(self, module: nn.Module, args: tuple, kw: dict) -> None:
        ids = call_arg(args, kw, 0, "input_ids")
        emb = kw.get("inputs_embeds")
        x = ids if ids is not None else emb
        am = kw.get("attention_mask")
        B, L = x.shape[:2]
        self.prefill = L > 1
        self.scan = None
        self.valid = am.bool() if am is not None else torch.ones(B, L, dtype=torch.bool, device=x.device)
        self.mask = None  # (B, L') the attention mask the later blocks get
        self.kidx = None  # (B, L') slot -> input position
        self.kept_counts: list[torch.Tensor] = []
        self.select_seconds = 0.0

    def _on_scan_output(self, out_proj: nn.Module, args: tuple) -> None:
        if self.prefill:
            self.scan = args[0]  # (B, L', d_inner)

    def _layer_hook(self, i: int):
        def hook(layer: nn.Module, args: tuple, kw: dict):
            if not self.prefill:
                return None
            x = call_arg(args, kw, 0, "hidden_states")
            if i in self.cuts:
                x = self._cut(x, self.cuts.index(i))
            return call_with(args, kw, x, self.mask)  # a Mamba block's 2nd positional is its cache

        return hook

    def _cut(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        valid = self.valid if self.mask is None else self.mask.bool()  # real, alive slots of x
        B, L = valid.shape
        keep_mask = valid.clone()
        positions = [valid[b, :-1].nonzero().flatten() for b in range(B)]  # the last token is protected
        if cut == 0:
            self.n0 = [len(p) for p in positions]
        budgets = None
        if self.progressive:
            depth, method = len(self.layers), self.session.method
            sched = {n: group_counts(method, n, self.session.keep, depth) for n in set(self.n0) if n}
            budgets = [sched[n][cut] if n else 0 for n in self.n0]
        scan = self.scan
        signals = {}
        if scan is not None:
            signals["ssm_output"] = lambda b, pos, ids: scan[b[:, None], pos]  # (S, n, d_inner)
        groups = Groups(sample=list(range(B)), positions=positions, ids=list(range(B)), budgets=budgets)
        self.select_seconds += select_in_groups(
            self.session, keep_mask, groups, tokens=lambda b, pos: x[b[:, None], pos], signals=signals,
            family=self.family, layer=self.cuts[cut], record=not self.progressive,
        )  # fmt: skip
        self.kept_counts.append(keep_mask[:, :-1].sum(dim=1))
        if self.alignment == "align":  # positions stay; pruned slots become zero inputs
            local = torch.arange(L, device=x.device).expand(B, L)
            slot_valid = keep_mask
        else:
            local, slot_valid = left_pack(keep_mask)
            if self.alignment == "naive":
                local, slot_valid = self._naive_order(local, slot_valid)
            x = gather_tokens(x, local, 1)
        self.kidx = local if self.kidx is None else self.kidx.gather(1, local)
        kept = torch.zeros_like(self.valid).scatter_(1, self.kidx, slot_valid)  # input coordinates
        stats = self.session.stats
        stats.kept_masks.append(kept.cpu())
        stats.cut_layers.append(self.cuts[cut])
        self.mask = slot_valid.long()
        self.session.attention_mask = self.mask  # the output's sequence: kept tokens 1
        if self.progressive and cut == len(self.cuts) - 1:
            counts = torch.stack(self.kept_counts, dim=1).tolist()
            depth = len(self.layers)
            mean = sum(mean_tokens(self.cuts, c, n, depth) for c, n in zip(counts, self.n0, strict=True))
            stats.record(sum(self.n0), mean, self.select_seconds)
        return x

    def _naive_order(self, local: torch.Tensor, slot_valid: torch.Tensor):
        """Reorder the kept candidates by importance (descending) as a ViT-style top-k gather does;
        padding stays first and the protected last token last."""
        imp = self.session.method.importance(self.scan).gather(1, local)  # (B, L')
        key = imp.masked_fill(~slot_valid, float("inf"))
        key[:, -1] = float("-inf")
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        return local.gather(1, order), slot_valid.gather(1, order)
