"""Saving pruned models: a standard Hugging Face checkpoint (safetensors) that ``from_pretrained``
loads, plus ``prunekit_report.json``; N:M results also describe their structure for GPU servers.

2:4 on a GPU: the checkpoint holds dense tensors whose zeros follow the 2:4 pattern exactly, and
``sparsity_config.json`` says so in the fields of compressed-tensors' ``sparsity_config``
(``format: dense``, ``sparsity_structure: 2:4``, targets). :func:`semi_structured` turns the
Linear weights of a loaded model into PyTorch's ``SparseSemiStructuredTensor`` (cuSPARSELt /
CUTLASS 2:4 kernels, CUDA with fp16/bf16 only) — the route for serving in plain PyTorch.
"""

from __future__ import annotations

import json
import pathlib

from torch import nn
from torch.nn.utils import parametrize

from ..errors import PrunekitError
from .engine import WeightReport


def save_pruned(
    model: nn.Module, out: str | pathlib.Path, report: WeightReport, tokenizer=None
) -> pathlib.Path:
    """Write a finalized pruned model as a Hugging Face checkpoint with its report."""
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise PrunekitError("the model still holds reversible masks; call finalize() before saving")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "prunekit_report.json").write_text(json.dumps(report.to_dict(), indent=1))
    if ":" in report.pattern:  # N:M
        (out / "sparsity_config.json").write_text(json.dumps({
            "format": "dense",
            "sparsity_structure": report.pattern,
            "global_sparsity": report.to_dict()["actual_sparsity"],
            "targets": sorted({r.name.rsplit(".", 1)[-1] for r in report.linears}),
            "ignore": ["lm_head"],
        }, indent=1))  # fmt: skip
    return out


def semi_structured(model: nn.Module) -> int:
    """Swap every 2:4-sparse Linear weight of ``model`` (on CUDA, fp16/bf16) to PyTorch's
    semi-structured sparse layout; returns how many were swapped. Weights that are not exactly 2:4
    are left dense."""
    from torch.sparse import to_sparse_semi_structured

    n = 0
    for mod in model.modules():
        if not isinstance(mod, nn.Linear) or mod.weight.device.type != "cuda":
            continue
        W = mod.weight.detach()
        if W.shape[1] % 4 or not bool(((W != 0).view(W.shape[0], -1, 4).sum(-1) <= 2).all()):
            continue
        mod.weight = nn.Parameter(to_sparse_semi_structured(W), requires_grad=False)
        n += 1
    if n == 0:
        raise PrunekitError(
            "no 2:4-sparse Linear on a CUDA device; prune with pattern='2:4' and move the model to CUDA"
        )
    return n


def load_pruned(path: str | pathlib.Path, dtype=None, device_map=None, **kwargs) -> nn.Module:
    """Load a checkpoint saved after a structured ``finalize()`` (per-layer widths in
    ``config.prunekit_structure``; SliceGPT's residual widths in ``config.prunekit_slicing``:
    sliced embedding and Linears, shortcut matrices, weightless norms, untied ``lm_head``, see
    ``prunekit.models.slicing.resize``; each MoE layer's expert count after expert pruning in
    ``config.prunekit_experts``, see ``prunekit.models.moe.resize``), or any plain checkpoint.

    The model class comes from the config (``AutoModelForCausalLM``'s mapping); a subclass of it
    resizes each decoder layer's q/k/v/o and gate/up/down to the recorded widths (and creates the
    recorded ``o_proj``/``down_proj`` biases, FLAP's compensation) right after it is built, then
    transformers' ``from_pretrained`` loads the safetensors as usual (``dtype``, ``device_map``,
    sharding). No pickle, no ``trust_remote_code``, no ``ignore_mismatched_sizes``: a tensor whose
    shape differs from the record is an error.

    Encoders (ViT, DeiT, DINOv2, CLIP, BERT; widths in ``prunekit_encoder_structure`` of the config
    or of its ``vision_config`` / ``text_config``) are built from the class the config's
    ``architectures`` names (e.g. ``Dinov2Model``, ``CLIPModel``), each recorded tower resized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import moe, slicing
    from ..models.structure import resize

    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; give the folder a pruned model was saved to")
    config = AutoConfig.from_pretrained(path)
    if _encoder_record(config):
        return _load_encoder(path, config, dtype=dtype, device_map=device_map, **kwargs)
    spec = getattr(config, "prunekit_structure", None)
    sliced = getattr(config, "prunekit_slicing", None)
    experts = getattr(config, moe.RECORD, None)
    if spec is None and sliced is None and experts is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, **kwargs)
    mapping = AutoModelForCausalLM._model_mapping
    if type(config) not in mapping:
        raise PrunekitError(
            f"{path}: config type {type(config).__name__} has no causal-LM class in transformers"
        )
    base = mapping[type(config)]

    def __init__(self, cfg, *args, **kw):
        base.__init__(self, cfg, *args, **kw)
        if getattr(cfg, "prunekit_structure", None) is not None:
            resize(self, cfg.prunekit_structure)
        if getattr(cfg, "prunekit_slicing", None) is not None:  # SliceGPT: sliced layers, untied head
            slicing.resize(self, cfg.prunekit_slicing)
        if getattr(cfg, moe.RECORD, None) is not None:  # expert pruning: experts per MoE layer
            moe.resize(self, getattr(cfg, moe.RECORD))

    # same name and module as the base: transformers applies its checkpoint key conversions only to
    # classes of its own modules (a renamed subclass would be treated as custom code)
    cls = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
    model = cls.from_pretrained(path, config=config, dtype=dtype, device_map=device_map, **kwargs)
    model.__class__ = base  # the plain transformers class once the widths are in place
    return model


def _encoder_record(config) -> bool:
    """Whether the config (or its vision / text sub-config) holds encoder widths."""
    from ..models.encoder_structure import RECORD

    subs = (config, getattr(config, "vision_config", None), getattr(config, "text_config", None))
    return any(getattr(c, RECORD, None) is not None for c in subs if c is not None)


def _load_encoder(path: pathlib.Path, config, **kwargs) -> nn.Module:
    """An encoder saved after a structured ``finalize()``: the class named by the config's
    ``architectures`` (a transformers class whose ``config_class`` is the config's), each recorded
    tower resized (:func:`prunekit.models.encoder_structure.resize_encoders`) as it is built."""
    import transformers
    from transformers import PreTrainedModel

    from ..models.encoder_structure import resize_encoders

    arch = (getattr(config, "architectures", None) or [None])[0]
    base = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if not (isinstance(base, type) and issubclass(base, PreTrainedModel)) or not isinstance(
        config, base.config_class
    ):
        raise PrunekitError(
            f"{path}: config.architectures names {arch!r}, not a transformers model class for "
            f"{type(config).__name__}; save the pruned encoder with save_pretrained"
        )

    def __init__(self, cfg, *args, **kw):
        base.__init__(self, cfg, *args, **kw)
        resize_encoders(self)

    # same name and module as the base: transformers applies its checkpoint key conversions (the
    # legacy ViT/DINOv2 names save_pretrained writes) only to classes of its own modules
    cls = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
    model = cls.from_pretrained(path, config=config, **kwargs)
    model.__class__ = base
    return model
