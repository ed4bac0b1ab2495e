"""Pruning a model larger than memory: ``prune_checkpoint`` streams decoder layers from the
checkpoint's safetensors, prunes each with the in-memory engine's sequential pass, writes it to
the output checkpoint and frees it, so the weights in memory at any time are about one decoder
layer (plus the embedding table while the calibration inputs are made)."""

from __future__ import annotations

import json
import pathlib
import shutil
import time
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from safetensors.torch import save_file

from ..errors import PrunekitError
from ..models.decoder import decoder_layers
from ..models.streaming import DiskModel
from .calibration import calibration_ids, layer0_inputs
from .engine import (
    WeightPruning,
    WeightReport,
    _method,
    _select,
    check_allocation,
    new_report,
    prune_linears,
    sequential,
)
from .structures import parse_pattern, resolve_sparsity


def prune_checkpoint(
    src: str | pathlib.Path,
    out: str | pathlib.Path,
    method: str,
    sparsity: float | None = None,
    *,
    pattern: str = "unstructured",
    calibration: Iterable[str] | torch.Tensor | None = None,
    tokenizer=None,
    n_samples: int = 16,
    seq_len: int = 512,
    batch_size: int = 4,
    seed: int = 0,
    max_layer_bytes: int | None = None,
    progress: bool = True,
    **options,
) -> WeightReport:
    """Prune the checkpoint folder ``src`` layer by layer into the checkpoint folder ``out``
    (permanent: ``out`` holds the pruned weights; ``src`` is only read). Same methods, options and
    results as :func:`prune_weights` (bit for bit), except GBLM, whose gradients need the whole
    model. ``max_layer_bytes`` refuses a decoder layer larger than that many bytes before loading it.
    The tokenizer defaults to the one saved in ``src``."""
    from ..bench.measure import peak_memory

    src, out = pathlib.Path(src), pathlib.Path(out)
    if out.resolve() == src.resolve():
        raise ValueError(
            "out must differ from src: the source checkpoint is read while the output is written"
        )
    m = _method(method, options)
    if getattr(m, "structured", False):
        raise PrunekitError(
            f"{m.name} is a structured method: prune in memory with prune_weights, then finalize() and "
            "save_pretrained (streaming supports unstructured and N:M methods)"
        )
    if "grad" in m.calibration_needs:
        raise PrunekitError(f"{m.name} needs gradients through the whole model; use prune_weights in memory")
    pat = parse_pattern(pattern)
    s = resolve_sparsity(sparsity, pat)
    check_allocation(m, pat, s)
    disk = DiskModel(src)
    model = disk.model
    prefix, layers = decoder_layers(model)
    per_layer = _select(layers, prefix, None)
    needs = m.calibration_needs
    if needs and tokenizer is None and not isinstance(calibration, torch.Tensor):
        tokenizer = disk.tokenizer()
    ids = calibration_ids(tokenizer, calibration, n_samples, seq_len, seed) if needs else None
    report = new_report(model, m, s, pat, ids)
    handle = WeightPruning(model, report)
    out.mkdir(parents=True, exist_ok=True)
    n = len(layers)
    weight_map: dict[str, str] = {}
    total = [0]
    layer_names = {f"{prefix}.{i}" for i in range(n)}

    def shard(i: int) -> str:
        return f"model-layer-{i + 1:05d}-of-{n:05d}.safetensors"

    @contextmanager
    def open_layer(i: int, final: bool):
        name = f"{prefix}.{i}"
        if max_layer_bytes is not None and (size := disk.nbytes(name)) > max_layer_bytes:
            raise PrunekitError(
                f"decoder layer {i} holds {size:,} bytes, over max_layer_bytes={max_layer_bytes:,}"
            )
        disk.load(name, layers[i])
        try:
            yield
            if final:
                handle._commit(list(per_layer[i]))
                write({f"{name}.{k}": v for k, v in layers[i].state_dict().items()}, shard(i))
        finally:
            disk.release(layers[i])

    def write(tensors: dict[str, torch.Tensor], file: str) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total[0] += sum(v.numel() * v.element_size() for v in tensors.values())

    def work() -> None:
        rest = [k for k in disk.weight_map if not any(k.startswith(p + ".") for p in layer_names)]
        for j, name in enumerate(rest):  # one at a time (the embedding table may be the largest tensor)
            write(disk.tensors([name]), f"model-rest-{j + 1:05d}.safetensors")
        with torch.no_grad():
            inputs = None
            if needs:
                embed = model.get_input_embeddings()
                embed_name = next(k for k, mod in model.named_modules() if mod is embed)
                disk.load(embed_name, embed)
                try:
                    inputs = layer0_inputs(model, layers, ids, batch_size)
                finally:
                    disk.release(embed)
                sequential(m, layers, per_layer, inputs, s, pat,
                           lambda i, st, t: prune_linears(m, handle, pat, i, per_layer[i], st, t),
                           progress=progress, open_layer=open_layer)  # fmt: skip
            else:
                from tqdm.auto import tqdm

                for i in tqdm(range(n), desc=f"{m.name} {pat}", disable=not progress, leave=False):
                    with open_layer(i, True):
                        prune_linears(m, handle, pat, i, per_layer[i], {}, s)

    t0 = time.perf_counter()
    report.peak_memory_bytes, report.memory_how = peak_memory(work, "cpu")
    report.seconds = time.perf_counter() - t0
    (out / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {"total_size": total[0]}, "weight_map": dict(sorted(weight_map.items()))}, indent=1
        )
    )
    for f in src.iterdir():  # config, generation config, tokenizer files
        if f.is_file() and not f.name.startswith("model") and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    (out / "prunekit_report.json").write_text(json.dumps(report.to_dict(), indent=1))
    return report
