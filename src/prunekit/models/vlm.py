"""Vision-language models: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL.

Stage (a) ``vision``: the visual tokens are pruned where they enter the language model. A
pre-hook on the top model remembers the prompt's ``input_ids`` (where the image placeholders
are); the image-feature call is wrapped to learn how many tokens each image has; a pre-hook on
the language model then selects per image and gathers ``inputs_embeds``, the 2-D attention mask
and the position ids (M-RoPE rows included) — original positions are kept, and ``generate()``'s
own full-length position tracking stays right for decoding. During decode the hook keeps
replacing ``generate``'s full-length 2-D mask by the pruned one plus the new columns.

Stage (b) ``llm``: :class:`~prunekit.models.decoder.LLMCut` on the language model, candidates =
the visual tokens of each image.

Signals: ``tokens`` = the projected visual tokens (the LLM's input embeddings);
``cls_attention`` = the [CLS] row of a CLIP vision layer, recomputed from its q/k (SDPA stays
on). Qwen2-VL's vision tower has no [CLS] token, so that signal is refused with an explanation.
``attention_map`` = per-head patch-to-patch map of a vision layer (LLaVA-1.5), or, on Qwen2-VL /
Qwen2.5-VL, the map between each image's merged tokens (see :class:`Qwen2VLAdapter`), whose
groups also carry the image's ``(rows, cols)`` grid.
Videos (Qwen ``video_token_id``) are not candidates yet: their tokens are always kept.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from ..budget import resolve_keep
from ..errors import PrunekitError, SignalUnavailableError
from .attention import cls_query_attention, encoder_attention, score_dtype
from .base import Adapter, Session, required_signals
from .compat import cache_of
from .decoder import LLMCut
from .sequence import Groups, gather_tokens, left_pack, right_pack, select_in_groups


def split_budget(k: int, sizes: torch.Tensor) -> torch.Tensor:
    """``k`` kept tokens split over parts of ``sizes`` candidates in proportion to their sizes:
    floors, then one more to the largest remainders (ties to the earlier part), each <= its size."""
    sizes = sizes.long()
    exact = k * sizes.double() / max(int(sizes.sum()), 1)
    share = exact.floor().long()
    left = k - int(share.sum())
    order = torch.sort(-(exact - share), stable=True).indices[:left]
    share[order] += 1
    return share.minimum(sizes)


class VLMAdapter(Adapter):
    stages = ("vision", "llm")
    #: signals the vision stage computes (beyond the candidate tokens), and how
    vision_signals: ClassVar[Mapping[str, str]] = {
        "cls_attention": "the [CLS] row of a vision layer, recomputed from q/k",
        "attention_map": "per-head patch-to-patch map of a vision layer, recomputed from q/k",
        "text_embeddings": "the prompt's text-token input embeddings, zero-padded",
        "tower_keep": "the patches an in-tower method (FlowCut) kept inside the vision tower, per image",
    }
    model_types: tuple[str, ...] = ()

    @classmethod
    def offered(cls, stage: str) -> Mapping[str, str]:
        from .decoder import LLM_SIGNALS, VLM_LLM_SIGNALS

        return {"vision": cls.vision_signals, "llm": {**LLM_SIGNALS, **VLM_LLM_SIGNALS}}.get(stage, {})

    missing_stage_reason: ClassVar[Mapping[str, str]] = {
        "encoder": "prune inside the vision tower is not offered for VLMs yet; use 'vision'"
    }

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        cfg = getattr(model, "config", None)
        return getattr(cfg, "model_type", None) in cls.model_types and hasattr(
            getattr(model, "model", None), "language_model"
        )

    # ------------------------------------------------------------------ parts
    @property
    def core(self) -> nn.Module:
        return self.model.model

    @property
    def text_model(self) -> nn.Module:
        return self.core.language_model

    def vision_layers(self) -> nn.ModuleList:
        tower = self.core.vision_tower
        tower = getattr(tower, "vision_model", tower)  # CLIPVisionModel wraps a CLIPVisionTransformer
        enc = tower.encoder
        return enc.layers if hasattr(enc, "layers") else enc.layer  # CLIP: layers; DINOv2 / ViT: layer

    @staticmethod
    def attention_parts(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, int, float]:
        """(module receiving the normed hidden states, q_proj, k_proj, heads, scale) of a vision layer:
        CLIP / SigLIP (``self_attn``) or DINOv2 / ViT (``attention``, transformers 5 names)."""
        if hasattr(layer, "self_attn"):
            a = layer.self_attn
            return a, a.q_proj, a.k_proj, a.num_heads, a.scale
        a = layer.attention
        return a, a.q_proj, a.k_proj, a.num_attention_heads, a.scaling

    def feature_attention_layer(self, pairing: str = "output") -> int:
        """The vision layer whose attention goes with the VLM's features (``vision_feature_layer`` p).

        ``"output"``: the layer whose output the VLM takes (``hidden_states[p]`` is the output of
        layer ``p - 1``). ``"official"``: ``attentions[p]``, as FasterVLM's official code indexes it:
        the same layer for a negative p (LLaVA's -2), the next one (whose input the features are)
        for a positive p.
        """
        vfl = self.model.config.vision_feature_layer
        vfl = vfl[-1] if isinstance(vfl, (list, tuple)) else vfl
        n = len(self.vision_layers())
        if pairing == "official":
            if not -n <= vfl < n:
                raise SignalUnavailableError(
                    f"{self.family}: attentions[vision_feature_layer={vfl}] does not exist for a {n}-layer "
                    f"vision tower (allowed: {-n} to {n - 1}); use pairing='output'"
                )
            return vfl % n
        index = vfl % (n + 1)  # into hidden_states: the embeddings, then each layer's output
        if index == 0:
            raise SignalUnavailableError(
                f"{self.family}: vision_feature_layer={vfl} takes the embeddings, which no attention layer "
                "outputs; use pairing='official' (layer 0's attention, as the official code) or give layer"
            )
        return index - 1

    # ------------------------------------------------------------------ attach
    def attach(self, session: Session) -> None:
        self.check_stage(session.stage)
        self.session = session
        self.ids: torch.Tensor | None = None
        self.counts: list[int] = []
        self.cls_rows: dict[str, list] = {}  # signal key -> per-call rows (then per-image scores)
        self.maps: dict[str, list[torch.Tensor]] = {}  # signal key -> per-call maps
        self.candidate_valid: list[torch.Tensor] | None = None
        self.grids: list[tuple[int, int] | None] | None = None  # per image, where the family knows it
        self.in_image_features = False
        self.tower = None
        hooks = session.hooks
        hooks.pre(self.model, self._on_top)
        core = self.core
        original = core.get_image_features

        @functools.wraps(original)  # generate() inspects its signature
        def get_image_features(*args, **kw):
            self.counts, self.cls_rows, self.maps, self.candidate_valid = [], {}, {}, None
            self.grids = None
            if self.tower is not None:
                self.tower.reset()
            self._before_image_features(args, kw)
            self.in_image_features = True
            try:
                out = original(*args, **kw)
            finally:
                self.in_image_features = False
            if self.tower is not None:
                self._scatter_tower_features(out)
            self._on_image_features(out, args, kw)
            return out

        hooks.setattr(core, "get_image_features", get_image_features)
        self.want_text, self.vision_asked = False, {}
        if session.stage == "vision":
            if getattr(self.model, "_prunekit_llm_cut", False):
                raise PrunekitError(
                    f"{self.family}: a vision-stage session cannot open inside an llm-stage one (the "
                    "llm cut would see the prompt before the visual tokens are pruned); open the "
                    "vision-stage prune_tokens first (outer), then the llm-stage one inside it"
                )
            # the kept positions of each call, for an llm-stage session opened inside this one
            self.published: dict = {}
            hooks.setattr(self.model, "_prunekit_vision_index", self.published)
            signals = session.method.needs("vision")
            if any(s.kind == "cls_attention" for s in signals) and not self.has_cls:
                raise SignalUnavailableError(
                    f"{self.family}: signal 'cls_attention' cannot be had: this vision tower has no "
                    "[CLS] token (its patches are merged and fed to the LLM without one)"
                )
            needs = required_signals(
                session.method, "vision", self.family, self.vision_signals, several_layers=True
            )
            self.want_text = "text_embeddings" in needs
            if getattr(session.method, "in_tower", False):
                self.tower = self._make_tower(session)
                self.tower.install()
            # every (kind, layer) asked, keyed as the method reads it: "attention_map", "attention_map@8"
            n = len(self.vision_layers())
            by_layer: dict[int, list] = {}
            for sig in (s for s in signals if s.kind in ("cls_attention", "attention_map")):
                if sig.layer is not None and not -n <= sig.layer < n:
                    raise ValueError(
                        f"{session.method.name}: vision layer {sig.layer} is out of range for this "
                        f"{n}-layer vision tower; allowed: {-n} to {n - 1}"
                    )
                pairing = getattr(session.method, "pairing", "output")
                layer = self.feature_attention_layer(pairing) if sig.layer is None else sig.layer % n
                by_layer.setdefault(layer, []).append(sig)
            self.vision_asked = by_layer
            for layer, sigs in by_layer.items():
                self._hook_vision_attention(layer, sigs)
            hooks.pre(self.text_model, self._on_language_model)
        else:
            m = session.method
            K = m.default_cut(len(self.text_model.layers)) if m.layer is None else m.layer
            hooks.setattr(self.model, "_prunekit_llm_cut", True)  # a vision session must not open inside
            cut = LLMCut(session, self.text_model, K, self._groups, self.family, self._vision_scores,
                         self.offered("llm"))  # fmt: skip
            cut.install()

    def _hook_vision_attention(self, layer: int, sigs: list) -> None:
        """Hook vision layer ``layer`` to record the signals ``sigs`` (CLS rows, attention maps)."""
        attn, *qk = self.attention_parts(self.vision_layers()[layer])
        self.session.hooks.pre(attn, functools.partial(self._on_vision_attention, sigs=sigs, qk=qk))

    def _before_image_features(self, args: tuple, kw: dict) -> None:
        """Called with the image-feature call's arguments before the tower runs."""

    def tower_target(self, keep: float | int, n: int) -> int:
        """Patches an in-tower method (FlowCut) keeps of each of the tower's ``n``-patch inputs."""
        return resolve_keep(keep, n)

    def _make_tower(self, session: Session):
        from .tower import TowerCut

        return TowerCut(self, session)

    # ------------------------------------------------------------------ hooks
    def _on_top(self, module: nn.Module, args: tuple, kw: dict) -> None:
        ids = kw.get("input_ids", args[0] if args else None)
        pkv = cache_of(kw)
        if pkv is None or pkv.get_seq_length() == 0:
            if ids is None:
                raise PrunekitError(
                    f"{self.family}: token pruning needs input_ids to locate the image tokens"
                )
            self.ids = ids  # image features may come before this call (generate() encodes them first)
            mm = kw.get("mm_encoder_outputs") or {}
            if mm.get("image") is not None and not self.counts:
                self._on_image_features(mm["image"], (), {})

    def _on_vision_attention(self, attn: nn.Module, args: tuple, kw: dict, sigs: list, qk: list) -> None:
        h = args[0] if args else kw["hidden_states"]
        q, k, heads, scale = qk
        kinds = {s.kind for s in sigs}
        keys = [str(s) for s in sigs]
        dt = score_dtype(self.session.score_dtype, h)
        if "cls_attention" in kinds:
            row = cls_query_attention(q, k, h, heads, scale, dtype=dt)  # (n_crops, 1+N)
            for key in keys:
                if key.startswith("cls_attention"):
                    self.cls_rows.setdefault(key, []).append(row)
        if "attention_map" in kinds:
            A = encoder_attention(q, k, h, heads, scale, dtype=dt).float()  # (n_img, H, 1+N, 1+N)
            skip = 1 if self.model.config.vision_feature_select_strategy == "default" else 0
            A = A[:, :, skip:, skip:]
            for key in keys:
                if key.startswith("attention_map"):
                    self.maps.setdefault(key, []).append(A)

    def _on_image_features(self, out, args: tuple, kw: dict) -> None:
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, torch.Tensor):
            self.counts += [feats.shape[1]] * feats.shape[0] if feats.dim() == 3 else [feats.shape[0]]
        else:
            self.counts += [f.shape[0] for f in feats]
        self.cls_rows = {key: self._image_scores(torch.cat(r), args, kw) for key, r in self.cls_rows.items()}

    def _scatter_tower_features(self, out) -> None:
        """The tower kept ``K`` patches per image: put each image's projected features back into
        its ``N`` slots (zeros elsewhere), so the placeholders match; the selection then keeps
        exactly those slots (signal ``tower_keep``)."""
        kept = torch.cat(self.tower.kept)  # (n_img, K)
        feats = out.pooler_output
        full = []
        for j, f in enumerate(feats):
            slots = f.new_zeros(self.tower.n_patches, f.shape[-1])
            slots[kept[j].to(f.device)] = f
            full.append(slots)
        out.pooler_output = full if isinstance(feats, (list, tuple)) else torch.stack(full)
        self.tower_idx = list(kept)  # per image: the kept patch indices (the signal tower_keep)

    def _image_scores(self, rows: torch.Tensor, args: tuple, kw: dict) -> torch.Tensor:
        """CLS rows ``(n_images, 1+N)`` -> scores aligned with each image's visual tokens."""
        strategy = self.model.config.vision_feature_select_strategy
        return rows[:, 1:] if strategy == "default" else rows

    def _groups(self, valid: torch.Tensor) -> Groups:
        """One group per image: the positions of its visual tokens (and the sample holding it).

        In an llm-stage session nested inside a vision-stage one, the language model sees the
        vision stage's survivors: positions are mapped through its kept index."""
        groups = self._prompt_groups()
        if self.session.stage == "vision" and getattr(self.session.method, "group_by", "image") == "sample":
            groups = self._sample_groups(groups)
        vis = getattr(self.model, "_prunekit_vision_index", None)
        if self.session.stage != "llm" or not vis or valid.shape[1] == self.ids.shape[1]:
            return groups
        kidx, ok = vis["kidx"].to(valid.device), vis["slot_valid"].to(valid.device)
        gid = torch.full(self.ids.shape, -1, dtype=torch.long, device=valid.device)
        for g, (b, pos) in enumerate(zip(groups.sample, groups.positions, strict=True)):
            gid[b, pos.to(valid.device)] = g
        now = gid.gather(1, kidx).masked_fill(~ok, -1)  # (B, L') group of each surviving position
        positions = [(now[b] == g).nonzero().flatten() for g, b in enumerate(groups.sample)]
        return Groups(sample=groups.sample, positions=positions, ids=groups.ids)

    def _vision_scores(self) -> torch.Tensor | None:
        """``(B, L')`` scores an enclosing vision-stage session published for its survivors (NaN
        elsewhere), or None."""
        vis = getattr(self.model, "_prunekit_vision_index", None)
        return None if not vis else vis.get("scores")

    def _sample_groups(self, groups: Groups) -> Groups:
        """One group per sample: its images, in order, as the frames of one video (HoliTom);
        ``self.frames[g]`` lists the image ids of group ``g``."""
        samples = list(dict.fromkeys(groups.sample))
        self.frames = [[i for i, b in enumerate(groups.sample) if b == s] for s in samples]
        for f in self.frames:
            sizes = {len(groups.positions[i]) for i in f}
            if len(sizes) > 1:
                raise PrunekitError(
                    f"{self.session.method.name}: the frames of one video must have equal token counts; "
                    f"got {sorted(sizes)}"
                )
        positions = [torch.cat([groups.positions[i] for i in f]) for f in self.frames]
        return Groups(sample=samples, positions=positions, ids=list(range(len(samples))))  # no 2-D grid

    def _prompt_groups(self) -> Groups:
        ids = self.ids
        if ids is None:
            raise PrunekitError(f"{self.family}: no prompt seen; call the model with input_ids")
        flat = (ids == self.model.config.image_token_id).nonzero()  # (n_tokens, 2) row-major (b, l)
        counts = self.counts or ([flat.shape[0]] if flat.shape[0] else [])
        if sum(counts) != flat.shape[0]:
            raise PrunekitError(
                f"{self.family}: {flat.shape[0]} image placeholder tokens, "
                f"but the images gave {sum(counts)} features"
            )
        chunks = torch.split(flat, counts)
        positions = [c[:, 1] for c in chunks]
        if self.candidate_valid is not None:  # e.g. LLaVA-NeXT newline tokens are always kept
            positions = [p[v] for p, v in zip(positions, self.candidate_valid, strict=True)]
        return Groups(
            sample=[int(c[0, 0]) for c in chunks],
            positions=positions,
            ids=list(range(len(chunks))),
            grids=self.grids,
        )

    def _signal_fns(self, x: torch.Tensor, valid: torch.Tensor) -> dict:
        fns = {}
        for key in (str(sig) for sigs in self.vision_asked.values() for sig in sigs):
            if key.startswith("cls_attention"):
                scores = self.cls_rows.get(key)
                if scores is None:
                    raise SignalUnavailableError(f"{self.family}: the vision tower did not run; no {key}")
                per_image = list(torch.split(scores, 1)) if isinstance(scores, torch.Tensor) else scores
                fns[key] = lambda b, pos, ids, p=per_image: torch.stack([p[i].flatten() for i in ids]).to(
                    pos.device
                )
            else:
                if key not in self.maps:
                    raise SignalUnavailableError(f"{self.family}: the vision tower did not run; no {key}")
                maps = [m for call in self.maps[key] for m in call]  # per image: (H, N_i, N_i)
                if getattr(self.session.method, "group_by", "image") == "sample":  # (S, T, H, N, N)
                    fns[key] = lambda b, pos, ids, m=maps, f=self.frames: torch.stack(
                        [torch.stack([m[i] for i in f[g]]) for g in ids]
                    ).to(pos.device)
                else:
                    fns[key] = lambda b, pos, ids, m=maps: torch.stack([m[i] for i in ids]).to(pos.device)
        if self.tower is not None:
            idx = self.tower_idx
            fns["tower_keep"] = lambda b, pos, ids: torch.stack([idx[i] for i in ids]).to(pos.device)
        if self.want_text:  # the prompt's text tokens of each group's sample, zero-padded: (S, T, D)
            media = torch.isin(self.ids, torch.tensor(self.media_token_ids(), device=self.ids.device))
            idx, ok = right_pack(valid & ~media)
            text = gather_tokens(x, idx, 1) * ok[..., None]  # (B, T, D)
            fns["text_embeddings"] = lambda b, pos, ids: text[b]
        return fns

    def media_token_ids(self) -> list[int]:
        cfg = self.model.config
        return [t for t in (cfg.image_token_id, getattr(cfg, "video_token_id", None)) if t is not None]

    def _on_language_model(self, module: nn.Module, args: tuple, kw: dict):
        x = kw.get("inputs_embeds")
        am = kw.get("attention_mask")
        pkv = cache_of(kw)
        past = pkv.get_seq_length() if pkv is not None else 0
        if past == 0:
            if x is None or self.ids is None or x.shape[1] != self.ids.shape[1]:
                return None
            B, L, _ = x.shape
            valid = (
                am.bool()
                if isinstance(am, torch.Tensor) and am.dim() == 2
                else torch.ones(B, L, dtype=torch.bool)
            )
            valid = valid.to(x.device)
            keep_mask = valid.clone()
            merged: list = []  # a merging method's new vectors for kept slots

            def write(b: torch.Tensor, kept_pos: torch.Tensor, values: torch.Tensor) -> None:
                merged.append((b, kept_pos, values))

            scores = torch.full((B, L), float("nan"), device=x.device)

            def publish(b: torch.Tensor, kept_pos: torch.Tensor, s: torch.Tensor) -> None:
                scores[b[:, None], kept_pos] = s.float().to(x.device)

            select_in_groups(
                self.session,
                keep_mask,
                self._groups(valid),
                tokens=lambda b, pos: x[b[:, None], pos],
                signals=self._signal_fns(x, valid),
                family=self.family,
                write=write,
                publish=publish,
            )
            if merged:
                x = x.clone()
                for b, kept_pos, values in merged:
                    x[b[:, None], kept_pos] = values.to(x.dtype)
            self.session.stats.kept_masks.append(keep_mask.cpu())
            kidx, slot_valid = left_pack(keep_mask)
            self.L, self.pruned_mask = (
                L,
                slot_valid.to(am.dtype if isinstance(am, torch.Tensor) else torch.long),
            )
            pid = kw.get("position_ids")
            if pid is None:  # what the language model would compute on the full sequence
                pid = (valid.long().cumsum(-1) - 1).clamp(min=0)
            self.published.update(kidx=kidx, slot_valid=slot_valid, scores=gather_tokens(scores, kidx, 1))
            kw["inputs_embeds"] = gather_tokens(x, kidx, 1)
            kw["position_ids"] = gather_tokens(pid, kidx, pid.dim() - 1)
            kw["attention_mask"] = self.pruned_mask
            self.session.attention_mask = slot_valid.long()  # the output's (logits') sequence
            return args, kw
        if getattr(self, "pruned_mask", None) is None:
            return None
        q = x.shape[1] if x is not None else 1
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            new = am[:, self.L :]
        else:
            n_new = past - self.pruned_mask.shape[1] + q
            new = torch.ones(self.pruned_mask.shape[0], n_new, dtype=self.pruned_mask.dtype)
        kw["attention_mask"] = torch.cat([self.pruned_mask, new.to(self.pruned_mask)], dim=1)
        return args, kw


class LlavaAdapter(VLMAdapter):
    family = "llava"
    model_types = ("llava",)


class LlavaNextAdapter(VLMAdapter):
    """LLaVA-NeXT (anyres): CLS rows are per crop; they are packed exactly like the features
    (``pack_image_features``: unpadding, image-newline column), and the newline tokens are not
    candidates: always kept, as in FasterVLM's official code.

    ``attention_map`` is a crop's own patch map, so a method asking for it must group by crop
    (``group_by = "crop"``: HiPrune, FoPru, VFlowOpt, as HiPrune's official LLaVA-NeXT code, which
    prunes each crop): each crop's candidates (after unpadding, in raster order) are one group with
    the crop's ``(rows, cols)`` grid and map; an image's budget is split over its crops in
    proportion to their candidates (largest remainders, ties to the earlier crop)."""

    family = "llava_next"
    model_types = ("llava_next",)
    vision_signals: ClassVar[Mapping[str, str]] = {
        "cls_attention": "the [CLS] row of each crop, packed like the features",
        "attention_map": "per-head patch map of each crop, for methods that select per crop",
        "text_embeddings": "the prompt's text-token input embeddings, zero-padded",
        "tower_keep": "the patches FlowCut kept inside the vision tower (K/2 per crop), per image",
    }
    per_crop_signals = frozenset({"attention_map"})

    @classmethod
    def support(cls, method, stages: tuple[str, ...]) -> tuple[str | None, str]:
        stage, why = super().support(method, stages)
        if stage == "vision":
            why = cls.per_crop_refusal(method)
            stage = None if why else stage
        return stage, why

    @classmethod
    def per_crop_refusal(cls, method) -> str:
        """Why ``method`` cannot take a per-crop signal (it does not group by crop), or ``""``."""
        kinds = {s.kind for s in method.needs("vision")} & cls.per_crop_signals
        if kinds and getattr(method, "group_by", "image") != "crop":
            return (
                f"the vision stage gives {sorted(kinds)} per crop, and {method.name!r} selects per "
                f"{getattr(method, 'group_by', 'image')}, not per crop"
            )
        return ""

    def attach(self, session: Session) -> None:
        if session.stage == "vision" and (why := self.per_crop_refusal(session.method)):
            raise SignalUnavailableError(f"{self.family}: {why}")
        super().attach(session)
        if self.tower is not None:  # FlowCut: survivors back to their grid slots before the packing
            session.hooks.post(self.core.multi_modal_projector, self._scatter_crops)

    def tower_target(self, keep: float | int, n: int) -> int:
        """FlowCut's anyres variant: half the image's budget in each crop (``int(K / 2)``); keeping
        everything keeps everything."""
        k = resolve_keep(keep, n)
        return n if k >= n else max(1, k // 2)

    def _scatter_crops(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """The projected survivors of each crop ``(n_crops, K, D)`` -> ``(n_crops, N, D)`` with zeros in
        the dropped slots, so that HF's unpadding and newline packing see whole crops."""
        kept = torch.cat(self.tower.kept).to(out.device)  # (n_crops, K)
        full = out.new_zeros(out.shape[0], self.tower.n_patches, out.shape[-1])
        return full.scatter_(1, kept[..., None].expand(-1, -1, out.shape[-1]), out)

    def _scatter_tower_features(self, out) -> None:
        """Scattered per crop already (:meth:`_scatter_crops`); the per-image survivors are found in
        :meth:`_prompt_groups`, after the packing."""

    def _on_image_features(self, out, args: tuple, kw: dict) -> None:
        super()._on_image_features(out, args, kw)
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = kw.get("image_sizes", args[1] if len(args) > 1 else None)
        cfg = self.model.config
        n_crops = [
            image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for s in sizes
        ]
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        # pack a (3+C)-channel "feature": newline flag, crop index (in the tower call), patch index
        # in the crop, then one CLS score per signal key
        keys = list(self.cls_rows)
        per_crop = torch.zeros(sum(n_crops), side * side, 3 + len(keys), dtype=torch.float64)
        per_crop[..., 1] = torch.arange(sum(n_crops), dtype=torch.float64)[:, None]
        per_crop[..., 2] = torch.arange(side * side, dtype=torch.float64)
        for c, key in enumerate(keys):
            per_crop[..., 3 + c] = self.cls_rows[key].double()[:, -side * side :]
        packed, _ = self.core.pack_image_features(
            list(torch.split(per_crop, n_crops)),
            sizes,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            image_newline=torch.tensor([1.0, -1.0, -1.0] + [0.0] * len(keys), dtype=torch.float64),
        )
        packed = packed if isinstance(packed, (list, tuple)) else torch.split(packed, self.counts)
        self.candidate_valid = [p[:, 0] == 0 for p in packed]
        # each image's candidates: (crop index in the tower call, patch index), for per-crop groups
        self.crop_of = [p[v, 1].long() for p, v in zip(packed, self.candidate_valid, strict=True)]
        self.patch_of = [p[v, 2].long() for p, v in zip(packed, self.candidate_valid, strict=True)]
        self.side = side
        self.cls_rows = {
            key: [p[v, 3 + c].float() for p, v in zip(packed, self.candidate_valid, strict=True)]
            for c, key in enumerate(keys)
        }

    def _image_scores(self, rows, args, kw):
        return rows  # packed in _on_image_features

    def _by_crop(self) -> bool:
        return self.session.stage == "vision" and getattr(self.session.method, "group_by", "image") == "crop"

    def _prompt_groups(self) -> Groups:
        groups = super()._prompt_groups()
        if self.session.stage == "vision" and self.tower is not None:
            # each image's candidates whose (crop, patch) the tower kept (and unpadding left)
            kept = torch.cat(self.tower.kept).cpu()  # (n_crops, K)
            table = torch.zeros(kept.shape[0], self.tower.n_patches, dtype=torch.bool)
            table.scatter_(1, kept, True)
            self.tower_idx = [
                table[c, p].nonzero().flatten() for c, p in zip(self.crop_of, self.patch_of, strict=True)
            ]
            groups.budgets = [len(t) for t in self.tower_idx]
            return groups
        if not self._by_crop():
            return groups
        # one group per crop: its candidates in packed (= the crop's raster) order, its grid, a share
        # of the image's budget; self.crop_groups[g] = (image, rows among its candidates, crop, patches)
        sample, positions, budgets, grids, self.crop_groups = [], [], [], [], []
        for i, (b, pos) in enumerate(zip(groups.sample, groups.positions, strict=True)):
            crops, inverse = torch.unique(self.crop_of[i], return_inverse=True)
            sizes = torch.bincount(inverse, minlength=len(crops))
            k = resolve_keep(self.session.keep, len(pos))
            for c, share in zip(crops.tolist(), split_budget(k, sizes).tolist(), strict=True):
                rows = (self.crop_of[i] == c).nonzero().flatten()
                patches = self.patch_of[i][rows]
                r, col = patches // self.side, patches % self.side
                grid = (len(torch.unique(r)), len(torch.unique(col)))
                if grid[0] * grid[1] != len(rows):
                    raise PrunekitError(
                        f"{self.family}: crop {c} of image {i} is not a rectangle after unpadding"
                    )
                sample.append(b)
                positions.append(pos[rows.to(pos.device)])
                budgets.append(share)
                grids.append(grid)
                self.crop_groups.append((i, rows, c, patches))
        return Groups(sample, positions, list(range(len(positions))), budgets=budgets, grids=grids)

    def _signal_fns(self, x: torch.Tensor, valid: torch.Tensor) -> dict:
        fns = super()._signal_fns(x, valid)
        if not self._by_crop():
            return fns
        cg = self.crop_groups
        for key in list(fns):
            if key.startswith("cls_attention"):
                per_image = self.cls_rows[key]
                fns[key] = lambda b, pos, ids, p=per_image: torch.stack(
                    [p[cg[g][0]][cg[g][1]] for g in ids]
                ).to(pos.device)
            elif key.startswith("attention_map"):
                N = self.side * self.side
                maps = [m[:, -N:, -N:] for call in self.maps[key] for m in call]  # per crop (H, N, N)
                fns[key] = lambda b, pos, ids, m=maps: torch.stack(
                    [m[cg[g][2]][:, cg[g][3]][:, :, cg[g][3]] for g in ids]
                ).to(pos.device)
        return fns


class Qwen2VLAdapter(VLMAdapter):
    """Qwen2-VL / Qwen2.5-VL. The vision tower has no [CLS] token. ``attention_map`` is the
    attention between the LLM's visual tokens (2x2-merged patches) in one vision block, over the
    whole image: HiPrune's Qwen2.5-VL code computes ``softmax(q kᵀ / √d)`` on all of an image's
    patches, ignoring the window mask; here each merged query row is the mean of its 4 patch rows
    and each merged key column the sum of its 4 patch columns (rows stay distributions), in the
    LLM's raster order (Qwen2.5-VL's window order undone), with each image's ``(rows, cols)`` as the
    group's grid. Videos are not candidates, and their tower calls record nothing."""

    family = "qwen2_vl"
    model_types = ("qwen2_vl",)
    has_cls = False
    vision_signals: ClassVar[Mapping[str, str]] = {
        "attention_map": "per-head map between merged visual tokens of a vision block, over the whole "
        "image (window mask ignored), in the LLM's token order",
        "text_embeddings": "the prompt's text-token input embeddings, zero-padded",
        "tower_keep": "the merged tokens FlowCut kept inside the vision tower (2K per image), per image",
    }
    #: query rows per softmax chunk (a multiple of the 4 patches of a merged token), bounding memory
    query_chunk: ClassVar[int] = 2048

    def vision_layers(self) -> nn.ModuleList:
        return self.core.visual.blocks

    def feature_attention_layer(self, pairing: str = "output") -> int:
        return len(self.vision_layers()) - 1  # the merger reads the last block

    def tower_target(self, keep: float | int, n: int) -> int:
        """FlowCut's Qwen variant: ``2K`` merged tokens of an image (``visual.target_num = 2K``);
        keeping everything keeps everything."""
        k = resolve_keep(keep, n)
        return n if k >= n else min(n, 2 * k)

    def _make_tower(self, session: Session):
        from .tower import QwenTowerCut

        return QwenTowerCut(self, session)

    def _scatter_tower_features(self, out) -> None:
        self.tower_idx = self.tower.kept  # the merger's output is in its slots already (QwenTowerCut)

    def _prompt_groups(self) -> Groups:
        groups = super()._prompt_groups()
        if self.session.stage == "vision" and self.tower is not None:
            groups.budgets = [len(t) for t in self.tower_idx]
        return groups

    def _before_image_features(self, args: tuple, kw: dict) -> None:
        thw = kw.get("image_grid_thw", args[1] if len(args) > 1 else None)
        if thw is None:
            raise PrunekitError(f"{self.family}: token pruning needs image_grid_thw with pixel_values")
        m = self.core.visual.spatial_merge_size
        self.thw = thw.tolist()
        self.grids = [(h // m, w // m) if t == 1 else None for t, h, w in self.thw]
        self.window_index = self._window_index(thw) if self.vision_asked else None  # maps only

    def _window_index(self, thw: torch.Tensor) -> torch.Tensor | None:
        """Position of each merged token in the blocks' order (None: raster order, Qwen2-VL)."""
        return None

    def _hook_vision_attention(self, layer: int, sigs: list) -> None:
        attn = self.vision_layers()[layer].attn
        self.session.hooks.pre(attn, functools.partial(self._on_qwen_attention, keys=[str(s) for s in sigs]))

    def _on_qwen_attention(self, attn: nn.Module, args: tuple, kw: dict, keys: list[str]) -> None:
        if not self.in_image_features:  # a video's tower call
            return
        h = args[0] if args else kw["hidden_states"]
        cos, sin = kw["position_embeddings"] if "position_embeddings" in kw else args[2]
        maps = qwen_image_attention(
            attn, h, cos, sin, [t * hh * ww for t, hh, ww in self.thw], self.window_index, self.query_chunk
        )
        for key in keys:
            self.maps.setdefault(key, []).append(maps)


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def _window_index(self, thw: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        v = self.core.visual
        window_index, _ = get_vision_window_index(
            thw, spatial_merge_size=v.spatial_merge_size, window_size=v.window_size, patch_size=v.patch_size
        )
        return window_index


def qwen_qkv(
    attn: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Qwen vision attention's ``q, k, v`` ``(H, P, d)`` float32 on its input ``h (P, D)``, rotary
    embeddings applied to ``q`` and ``k`` (as the block's own forward)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

    qkv = attn.qkv(h).reshape(h.shape[0], 3, attn.num_heads, -1).permute(1, 2, 0, 3).float()
    c, s = cos[None].float(), sin[None].float()
    return qkv[0] * c + rotate_half(qkv[0]) * s, qkv[1] * c + rotate_half(qkv[1]) * s, qkv[2]


def qwen_image_attention(
    attn: nn.Module,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    lengths: list[int],
    window_index: torch.Tensor | None,
    query_chunk: int,
) -> list[torch.Tensor]:
    """Per image, the ``(H, N, N)`` attention between its ``N`` merged tokens in a Qwen vision block.

    ``h (P, D)``: the block's normed input over all images' patches (in window order for Qwen2.5-VL:
    ``window_index[j]`` is the merged token at block position ``j``); ``lengths``: patches per image.
    Each image's full softmax (no window mask) is taken over its patches; merged rows are the mean of
    their 4 patch rows, merged columns the sum of their 4 patch columns.
    """
    heads = attn.num_heads
    q, k, _ = qwen_qkv(attn, h, cos, sin)  # (H, P, d)
    unit = 4  # patches per merged token (2x2 merge)
    out, start = [], 0
    for n in lengths:  # per image: a loop over images, not tokens
        qi, ki = q[:, start : start + n], k[:, start : start + n]
        N = n // unit
        rows = []
        for r in range(0, n, query_chunk):  # bounded memory: (H, chunk, n) at a time
            A = ((qi[:, r : r + query_chunk] @ ki.transpose(-1, -2)) * attn.scaling).softmax(dim=-1)
            A = A.view(heads, -1, unit, N, unit).mean(dim=2).sum(dim=-1)  # (H, chunk/4, N)
            rows.append(A)
        A = torch.cat(rows, dim=1)
        if window_index is not None:  # block order -> the LLM's raster order
            first = start // unit
            order = torch.argsort(window_index[first : first + N] - window_index[first : first + N].min())
            A = A[:, order][:, :, order]
        out.append(A)
        start += n
    return out


VLM_ADAPTERS: list[type[Adapter]] = [LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen25VLAdapter]
