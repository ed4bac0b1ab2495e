"""Stage (c) ``encoder``: token cut or merge inside ViT / DeiT / DINOv2 / CLIP-vision / BERT blocks.

Two modes, chosen by what the method offers:
- **cut** (score/select methods such as FasterVLM, DivPrune, random): candidates are cut from the
  input of block ``K`` (``method.layer``, default 4). The CLS token (and DeiT's distillation
  token) is protected and stays first. The ``cls_attention`` signal is the head-mean [CLS] row of
  block ``K-1``, recomputed from that block's q/k, so the model stays on SDPA.
- **progressive cut** (a :class:`~prunekit.tokens.context.ProgressiveMethod` such as Zero-TPrune):
  cuts before each of the method's blocks ``K_1 < K_2 < ...``, fewer candidates at each. The
  signals of cut ``i`` come from block ``K_i - 1`` on its own input (the survivors of the earlier
  cuts), recomputed from its q/k as for one cut. Since the MLP is token-wise, cutting before block
  ``K`` on block ``K-1``'s attention gives the kept tokens exactly what a cut *inside* block
  ``K-1`` (between attention and MLP, where ToMe and EViT act) gives them; only block
  ``K-1``'s MLP still runs on every token. ``keep`` is the mean number of candidates per block
  (see :mod:`prunekit.tokens.schedule`); ``session.stats`` records each cut (``kept_masks`` in the
  input's coordinates, ``cut_layers``) and, per call, that mean.
- **cumulative signals** (SpAtten): ``cumulative_attention`` sums the attention every block before
  the last cut gives each token (over real queries and heads, each block on the tokens alive
  there), and a method with ``head_counts`` (cascade head pruning) gets the heads' output
  magnitudes accumulated and the pruned heads zeroed before each block's output projection
  (:class:`~prunekit.models.heads.HeadCascade`, shared with the decoder).
- **merge** (ToMe): every block's forward is replaced, for the duration of the ``with`` block, by
  one that merges tokens between attention and MLP and applies proportional attention.

Position embeddings are added before the first block in these families, so dropping or merging
tokens inside the encoder needs no position bookkeeping. The full ``CLIPModel`` (and
``CLIPForImageClassification``) prunes its vision tower only; the text tower is untouched.
BERT supports cut mode only (ToMe is refused with a clear error: its post-norm block and padding
masks are not handled by the merging forward). BERT with padding: the padding mask is read where
the base ``BertModel`` receives it (so task heads that reshape it, e.g. multiple choice, work);
padding is never a candidate, kept tokens are packed first and the rest masked as keys;
``session.output_mask`` then holds the ``(B, T')`` mask of the output. ``session.attention_mask``
is that mask for every forward (all ones without padding): the mask to pool the shorter output
with; after ToMe, ``session.token_sizes`` counts the input tokens each output token stands for.
Right padding only: a left-padded row moves [CLS] off index 0, so it is refused with a clear error.

Heads that need every patch token back in its grid (``*ForMaskedImageModeling``) and BERT used as
a causal decoder (``is_decoder=True``) are refused with a clear error.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import PrunekitError, SignalUnavailableError, UnsupportedModelError
from ..tokens.context import TokenMethod
from ..tokens.merge import bipartite_soft_matching, merge_wavg
from ..tokens.schedule import group_counts, mean_tokens
from .attention import cls_query_attention, encoder_attention, score_dtype
from .base import Adapter, Session, Timer, block_cuts, required_signals
from .heads import HeadCascade
from .sequence import (
    Groups,
    call_arg,
    call_with,
    gather_square,
    gather_tokens,
    key_mask,
    right_pack,
    select_in_groups,
    signal_gatherers,
)


@dataclass(frozen=True)
class BlockNames:
    """Where a family keeps the parts of a pre-norm block (attribute paths inside one layer)."""

    norm1: str
    attn: str
    post_attn: tuple[str, ...]
    norm2: str
    mlp: str
    post_mlp: tuple[str, ...]
    q: str
    k: str
    heads: str
    scale: str
    o: str  # the attention's output projection (its input holds the heads' outputs side by side)


def _get(obj: nn.Module, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


#: signals of the encoder stage (a cut before block K), and how they are had; a progressive method
#: gets them at each of its cuts, from block K_i - 1 on that cut's input
ENCODER_SIGNALS: dict[str, str] = {
    "cls_attention": "head-mean [CLS] row of block K-1, recomputed from q/k",
    "attention_map": "per-head map of block K-1, recomputed from q/k",
    "attention_graph": "per-head map of block K-1 over the protected tokens (first) and the "
    "candidates, recomputed from q/k; rows sum to 1 (G, H, P+N, P+N)",
    "keys": "per-head keys of block K-1 at the candidates, its k projection of its input (G, N, H, hd)",
    "cumulative_attention": "attention each candidate received, summed over real queries, heads and every "
    "block before the cut, recomputed from q/k (SpAtten) (G, N)",
}
_MAP_KINDS = ("attention_map", "attention_graph")


class EncoderAdapter(Adapter):
    stages = ("encoder",)
    stage_signals: ClassVar[Mapping[str, Mapping[str, str]]] = {
        "encoder": {
            **ENCODER_SIGNALS,
            "keys": "per-head keys: of block K-1 at a cut (G, N, H, hd); every block's in merge mode (ToMe)",
        }
    }
    missing_stage_reason: ClassVar[Mapping[str, str]] = {
        "vision": "an encoder alone has no visual tokens between a tower and an LLM",
        "llm": "an encoder has no decoder layers",
    }
    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[tuple[str, ...]] = ()  # candidate paths from the model to the block list
    names: ClassVar[BlockNames | None] = None
    pre_norm: ClassVar[bool] = True
    protected: ClassVar[int] = 1
    #: whether inputs carry a padding mask (text); image families never read one, so a text mask
    #: passed to a full CLIPModel cannot be mistaken for the vision tower's
    reads_padding: ClassVar[bool] = False

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        return mt in cls.model_types and cls._find_layers(model) is not None

    @classmethod
    def _find_layers(cls, model: nn.Module) -> nn.ModuleList | None:
        for path in cls.layers_path:
            try:
                layers = _get(model, path)
            except AttributeError:
                continue
            if isinstance(layers, nn.ModuleList):
                return layers
        return None

    @property
    def layers(self) -> nn.ModuleList:
        return self._find_layers(self.model)

    def attention_parts(self, layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, int, float]:
        """(module whose pre-hook sees the attention input, q_proj, k_proj, heads, scale)."""
        n = self.names
        attn = _get(layer, n.attn)
        return attn, _get(layer, n.q), _get(layer, n.k), _get(layer, n.heads), _get(layer, n.scale)

    def output_projection(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.names.o)

    # ------------------------------------------------------------------ attach
    def attach(self, session: Session) -> None:
        self.check_stage(session.stage)
        if type(self.model).__name__.endswith("ForMaskedImageModeling"):
            raise UnsupportedModelError(
                f"{self.family}: {type(self.model).__name__} reshapes every patch token back into the "
                "image grid; cutting or merging tokens inside the encoder would break it"
            )
        self.session = session
        self.am2d: torch.Tensor | None = None
        self.slot_valid: torch.Tensor | None = None  # (B, T') real slots after this call's last cut
        session.output_mask = None
        if self.reads_padding:
            self._watch_padding(session)
        if hasattr(session.method, "merge_schedule"):
            self._attach_merge(session)
        else:
            self._attach_cut(session)

    def _watch_padding(self, session: Session) -> None:
        """Capture the 2-D padding mask where the base model (e.g. ``BertModel``) receives it."""
        base = getattr(self.model, "base_model", self.model)
        params = list(inspect.signature(base.forward).parameters)
        at = params.index("attention_mask") if "attention_mask" in params else None

        def on_base(module: nn.Module, args: tuple, kw: dict) -> None:
            am = kw.get("attention_mask")
            if am is None and at is not None and len(args) > at:
                am = args[at]  # BertModel(input_ids, attention_mask)
            self.am2d = am if isinstance(am, torch.Tensor) and am.dim() == 2 else None
            if self.am2d is not None and not bool(self.am2d[:, : self.protected].all()):
                # left padding moves [CLS] off index 0: it would be a candidate, and the pooler
                # would read whatever token is packed first
                raise PrunekitError(
                    f"{self.family}: token pruning needs right padding ([CLS] at index 0 of every row); "
                    "a row starts with padding; set tokenizer.padding_side = 'right'"
                )

        session.hooks.pre(base, on_base)

    # ------------------------------------------------------------------ cut
    def _attach_cut(self, session: Session) -> None:
        method = session.method
        self.progressive, self.cuts = block_cuts(method, len(self.layers))
        self.K, self.maps = self.cuts[0], {}
        offered = ENCODER_SIGNALS
        needs = required_signals(method, "encoder", self.family, offered)
        self.signal_kinds = [kind for kind in offered if kind in needs]
        for kind in self.signal_kinds:
            layer = needs[kind].layer
            if self.progressive and layer is not None:
                raise SignalUnavailableError(
                    f"signal {needs[kind]}: a progressive method gets it at each cut, from the block "
                    "before the cut on the cut's input; ask for it without a layer"
                )
            if layer is not None and layer != self.K:
                raise SignalUnavailableError(
                    f"signal {needs[kind]}: at the encoder stage it comes from block K-1 = {self.K - 1}"
                )
        session.hooks.pre(self.layers[0], self._on_first_layer)
        if set(self.signal_kinds) - {"cumulative_attention"}:
            for K in self.cuts:
                attn, *_ = self.attention_parts(self.layers[K - 1])
                session.hooks.pre(attn, self._signal_hook(K))
        self.cum: torch.Tensor | None = None
        if "cumulative_attention" in self.signal_kinds:
            for i in range(self.cuts[-1]):
                attn, *_ = self.attention_parts(self.layers[i])
                session.hooks.pre(attn, self._accumulate_hook(i))
        heads = self.attention_parts(self.layers[0])[3]
        counts = method.head_counts(heads, len(self.cuts)) if hasattr(method, "head_counts") else None
        self.heads = None if counts is None else HeadCascade(heads, counts, self.cuts, session)
        if self.heads is not None:
            for i, layer in enumerate(self.layers):
                session.hooks.pre(self.output_projection(layer), self._heads_hook(i), with_kwargs=False)
        for layer in self.layers[self.K :]:
            session.hooks.pre(layer, self._on_layer)
        self.index = {id(m): i for i, m in enumerate(self.layers)}

    def _valid(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` real tokens of ``x``: the slots left by the last cut of this call, else the
        input's padding mask, else all."""
        B, T = x.shape[:2]
        if self.slot_valid is not None and self.slot_valid.shape == (B, T):
            return self.slot_valid
        if self.am2d is not None and self.am2d.shape == (B, T):
            return self.am2d.bool()
        return torch.ones(B, T, dtype=torch.bool, device=x.device)

    def _on_first_layer(self, layer: nn.Module, args: tuple, kw: dict) -> None:
        """A new forward: nothing cut yet."""
        self.slot_valid = self.kidx = self.mask = None
        self.kept_counts: list[torch.Tensor] = []  # per cut, (B,) candidates kept
        self.select_seconds = 0.0
        self.cum = None
        if self.heads is not None:
            self.heads.reset()

    def _accumulate_hook(self, i: int):
        """Pre-hook on block ``i``'s attention: SpAtten's cumulative token importance, the attention
        each token received over real queries and heads, added up over the blocks."""

        def hook(attn: nn.Module, args: tuple, kw: dict) -> None:
            h = call_arg(args, kw, 0, "hidden_states")
            _, q, k, heads, scale = self.attention_parts(self.layers[i])
            valid = self._valid(h)
            A = encoder_attention(q, k, h, heads, scale, key_valid=valid)  # (B, H, T, T)
            got = (A.float() * valid[:, None, :, None]).sum(dim=(1, 2))  # (B, T)
            self.cum = got if self.cum is None else self.cum + got

        return hook

    def _heads_hook(self, i: int):
        def hook(o_proj: nn.Module, args: tuple):
            x = args[0]  # (B, T, H * hd)
            out = self.heads.apply(i, x, self._valid(x), accumulate=True)
            return None if out is None else (out,)

        return hook

    def _signal_hook(self, K: int):
        """Pre-hook on block ``K-1``'s attention: the signals of the cut before block ``K``."""

        def hook(attn: nn.Module, args: tuple, kw: dict) -> None:
            h = call_arg(args, kw, 0, "hidden_states")  # the attention's input (normed in pre-norm blocks)
            _, q, k, heads, scale = self.attention_parts(self.layers[K - 1])
            valid = self._valid(h)
            dt = score_dtype(self.session.score_dtype, h)
            if any(kind in self.signal_kinds for kind in _MAP_KINDS):
                A = encoder_attention(q, k, h, heads, scale, key_valid=valid, dtype=dt).float()  # (B,H,T,T)
                for kind in _MAP_KINDS:
                    if kind in self.signal_kinds:
                        self.maps[kind] = A
            if "cls_attention" in self.signal_kinds:
                cls_row = cls_query_attention(q, k, h, heads, scale, key_valid=valid, dtype=dt)  # (B, T)
                self.maps["cls_attention"] = cls_row
            if "keys" in self.signal_kinds:
                B, T, _ = h.shape
                self.maps["keys"] = k(h).view(B, T, heads, -1)  # (B, T, H, hd)

        return hook

    def _gatherers(self) -> dict:
        """Signal functions ``(sample_idx (S,), pos (S, n), ids) -> tensor`` for the current maps."""
        rows_and_maps = {k: v for k, v in self.maps.items() if k in ("cls_attention", "attention_map")}
        fns = signal_gatherers(rows_and_maps)
        p = self.protected
        if "attention_graph" in self.maps:
            A = self.maps["attention_graph"]

            def graph(b: torch.Tensor, pos: torch.Tensor, ids: list[int]) -> torch.Tensor:
                first = torch.arange(p, device=pos.device).expand(pos.shape[0], p)  # protected slots
                return gather_square(A, b, torch.cat([first, pos], dim=1))  # (S, H, p+n, p+n)

            fns["attention_graph"] = graph
        if "keys" in self.maps:
            keys = self.maps["keys"]
            fns["keys"] = lambda b, pos, ids: keys[b[:, None], pos]  # (S, n, H, hd)
        if self.cum is not None:
            cum = self.cum
            fns["cumulative_attention"] = lambda b, pos, ids: cum[b[:, None], pos]  # (S, n)
        return fns

    def _budgets(self, cut: int) -> list[int] | None:
        """Candidates kept per row at the ``cut``-th cut; ``None``: the budget itself (one cut)."""
        if not self.progressive:
            return None
        depth, keep, method = len(self.layers), self.session.keep, self.session.method
        schedule = {n: group_counts(method, n, keep, depth) for n in set(self.n0) if n}  # per size
        return [schedule[n][cut] if n else 0 for n in self.n0]

    def _cut(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        """Select at the ``cut``-th cut and drop the rest: kept tokens packed first (CLS stays at 0)."""
        valid = self._valid(x)
        keep_mask = valid.clone()
        p = self.protected
        B = x.shape[0]
        positions = [valid[b, p:].nonzero().flatten() + p for b in range(B)]
        if cut == 0:
            self.n0 = [len(pos) for pos in positions]
        budgets = self._budgets(cut)
        groups = Groups(sample=list(range(B)), positions=positions, ids=list(range(B)), budgets=budgets)
        self.select_seconds += select_in_groups(
            self.session, keep_mask, groups, tokens=lambda b, pos: x[b[:, None], pos],
            signals=self._gatherers(), family=self.family,
            layer=self.cuts[cut] if self.progressive else None, record=not self.progressive,
        )  # fmt: skip
        local, slot_valid = right_pack(keep_mask)  # (B, T'), (B, T')
        if self.kidx is None:
            kept, self.kidx, self.n_input = keep_mask, local, x.shape[1]
        else:  # in the coordinates of this call's input
            self.kidx = self.kidx.gather(1, local)  # (B, T') slot -> input position
            kept = torch.zeros(B, self.n_input, dtype=torch.bool, device=x.device)
            kept.scatter_(1, self.kidx, slot_valid)
        stats = self.session.stats
        stats.kept_masks.append(kept.cpu())
        stats.cut_layers.append(self.cuts[cut])
        self.kept_counts.append(slot_valid.sum(dim=1) - p)
        self.slot_valid = slot_valid
        x = gather_tokens(x, local, 1)
        if self.cum is not None:
            self.cum = self.cum.gather(1, local)
        if self.heads is not None:
            self.heads.cut(cut)
        self.mask = key_mask(slot_valid, x.dtype)  # ragged rows: the unused slots hidden as keys
        self.session.output_mask = None if self.mask is None else slot_valid.long()
        self.session.attention_mask = slot_valid.long()  # the output's mask, padding slots 0
        if self.progressive and cut == len(self.cuts) - 1:
            self._record_progressive()
        return x

    def _record_progressive(self) -> None:
        """One record per call: candidates seen, and the mean kept per block achieved."""
        depth = len(self.layers)
        counts = torch.stack(self.kept_counts, dim=1).tolist()  # (B, cuts)
        mean = sum(mean_tokens(self.cuts, c, n, depth) for c, n in zip(counts, self.n0, strict=True))
        self.session.stats.record(sum(self.n0), mean, self.select_seconds)

    def _on_layer(self, layer: nn.Module, args: tuple, kw: dict):
        x = call_arg(args, kw, 0, "hidden_states")
        i = self.index[id(layer)]
        if i in self.cuts:
            x = self._cut(x, self.cuts.index(i))
        return call_with(args, kw, x, self.mask, mask_pos=1)

    # ------------------------------------------------------------------ merge (ToMe)
    def _attach_merge(self, session: Session) -> None:
        if not self.pre_norm or self.names is None:
            raise UnsupportedModelError(
                f"{self.family}: ToMe merging is implemented for pre-norm ViT blocks (ViT, DeiT, DINOv2, "
                "CLIP vision), not for this post-norm text encoder; use a cut method (divprune, random)"
            )
        self.schedule: list[int] = []
        self.size: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            # the matching metric is the block's own keys: keep k_proj's output instead of recomputing it
            session.hooks.post(self.attention_parts(layer)[2], self._on_keys)
            session.hooks.setattr(layer, "forward", self._merge_forward(layer, i))

    def _on_keys(self, k_proj: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self.keys = out  # (B, T, H * hd)

    def _merge_forward(self, layer: nn.Module, i: int):
        """Block ``i``'s forward with a ToMe merge between attention and MLP (pre-norm blocks)."""
        n = self.names
        attn, _, _, heads, _ = self.attention_parts(layer)
        norm1, norm2, mlp = _get(layer, n.norm1), _get(layer, n.norm2), _get(layer, n.mlp)
        post_attn = [_get(layer, p) for p in n.post_attn]
        post_mlp = [_get(layer, p) for p in n.post_mlp]
        method, session, p, last = self.session.method, self.session, self.protected, len(self.layers) - 1

        def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
            x = hidden_states
            B, T = x.shape[:2]
            if attention_mask is not None:
                raise PrunekitError(f"{self.family}: ToMe with an attention mask (padding) is not supported")
            if i == 0:  # a new forward: sizes start at 1, the schedule follows the token count
                self.size = torch.ones(B, T, 1, dtype=x.dtype, device=x.device)
                self.schedule = method.merge_schedule(T - p, len(self.layers), session.keep)
                self.tokens_in, self.seconds = T - p, 0.0
            bias = None
            if method.prop_attn and i > 0:
                bias = self.size.log().transpose(1, 2)[:, None]  # (B, 1, 1, T) added to every key's logit
            out = attn(norm1(x), attention_mask=bias)[0]
            for mod in post_attn:
                out = mod(out)
            x = x + out
            r = self.schedule[i]
            if r > 0:
                with Timer() as t:
                    metric = self.keys.view(B, T, heads, -1).mean(dim=2)  # (B, T, hd) keys, mean over heads
                    plan = bipartite_soft_matching(metric, r, protected=p)
                    x, self.size = merge_wavg(plan, x, self.size)
                self.seconds += t.seconds
            h = mlp(norm2(x))
            for mod in post_mlp:
                h = mod(h)
            x = x + h
            self.keys = None  # used: do not hold it past the block
            if i == last:
                session.stats.record(B * self.tokens_in, B * (x.shape[1] - p), self.seconds)
                session.attention_mask = torch.ones(B, x.shape[1], dtype=torch.long, device=x.device)
                session.token_sizes = self.size[..., 0].detach()
            return x

        return forward


PRE_NORM_VIT = BlockNames(
    norm1="layernorm_before", attn="attention", post_attn=("dropout",), norm2="layernorm_after", mlp="mlp",
    post_mlp=("dropout",), q="attention.q_proj", k="attention.k_proj", heads="attention.num_attention_heads",
    scale="attention.scaling", o="attention.o_proj",
)  # fmt: skip


class ViTAdapter(EncoderAdapter):
    family = "vit"
    model_types = ("vit",)
    layers_path = ("vit.layers", "layers", "encoder.layers")
    names = PRE_NORM_VIT


class DeiTAdapter(EncoderAdapter):
    """DeiT: the [CLS] and distillation tokens (indices 0 and 1) are both protected."""

    family = "deit"
    model_types = ("deit",)
    layers_path = ("deit.layers", "layers", "encoder.layers")
    names = PRE_NORM_VIT
    protected = 2


class Dinov2Adapter(EncoderAdapter):
    family = "dinov2"
    model_types = ("dinov2",)
    layers_path = ("encoder.layer", "dinov2.encoder.layer")
    names = BlockNames(
        norm1="norm1", attn="attention", post_attn=("layer_scale1", "drop_path"), norm2="norm2", mlp="mlp",
        post_mlp=("layer_scale2", "drop_path"), q="attention.q_proj", k="attention.k_proj",
        heads="attention.num_attention_heads", scale="attention.scaling", o="attention.o_proj",
    )  # fmt: skip


class CLIPVisionAdapter(EncoderAdapter):
    """CLIP's vision tower: CLIPVisionModel(WithProjection), and the full CLIPModel /
    CLIPForImageClassification, whose vision tower alone is pruned (the text tower is untouched)."""

    family = "clip_vision"
    model_types = ("clip_vision_model", "clip")
    layers_path = ("vision_model.encoder.layers", "encoder.layers")
    names = BlockNames(
        norm1="layer_norm1", attn="self_attn", post_attn=(), norm2="layer_norm2", mlp="mlp", post_mlp=(),
        q="self_attn.q_proj", k="self_attn.k_proj", heads="self_attn.num_heads", scale="self_attn.scale",
        o="self_attn.out_proj",
    )  # fmt: skip


class BertAdapter(EncoderAdapter):
    """BERT encoders (e.g. all-MiniLM-L6-v2): cut mode; [CLS] protected; padding dropped."""

    family = "bert"
    model_types = ("bert",)
    layers_path = ("encoder.layer", "bert.encoder.layer")
    pre_norm = False
    reads_padding = True
    stage_signals: ClassVar[Mapping[str, Mapping[str, str]]] = {"encoder": ENCODER_SIGNALS}  # cut only

    def attach(self, session: Session) -> None:
        if getattr(self.model.config, "is_decoder", False):
            raise UnsupportedModelError(
                "bert: this model is configured as a causal decoder (is_decoder=True); the encoder stage "
                "cuts tokens of a bidirectional encoder and does not keep a KV cache consistent"
            )
        super().attach(session)

    @classmethod
    def support(cls, method: TokenMethod, stages: tuple[str, ...]) -> tuple[str | None, str]:
        if hasattr(method, "merge_schedule"):
            return None, "the encoder stage of bert cuts only (merging needs pre-norm ViT blocks)"
        return super().support(method, stages)

    def attention_parts(self, layer: nn.Module):
        attn = layer.attention.self
        return attn, attn.query, attn.key, attn.num_attention_heads, attn.scaling

    def output_projection(self, layer: nn.Module) -> nn.Module:
        return layer.attention.output.dense


ENCODER_ADAPTERS: list[type[Adapter]] = [
    ViTAdapter,
    DeiTAdapter,
    Dinov2Adapter,
    CLIPVisionAdapter,
    BertAdapter,
]
