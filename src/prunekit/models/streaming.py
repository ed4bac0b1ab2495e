"""A causal LM held on disk: built on the meta device, its modules loaded from the checkpoint's
safetensors one at a time and released after use, so a model larger than memory can be walked
layer by layer (weight pruning with a memory bound of about one decoder layer)."""

from __future__ import annotations

import json
import pathlib

import torch
from torch import nn

from ..errors import UnsupportedModelError


class DiskModel:
    """The model class of a local checkpoint folder, on the meta device, with its tensors on disk."""

    def __init__(self, folder: str | pathlib.Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.folder = pathlib.Path(folder)
        if not (self.folder / "config.json").is_file():
            raise UnsupportedModelError(f"{self.folder}: not a checkpoint folder (no config.json)")
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            keys = [k for k in read_header(self.folder / "model.safetensors") if k != "__metadata__"]
            weight_map = dict.fromkeys(keys, "model.safetensors")
        else:
            raise UnsupportedModelError(
                f"{self.folder}: no safetensors weights (model.safetensors or its index)"
            )
        self.weight_map: dict[str, str] = weight_map
        self.config = AutoConfig.from_pretrained(self.folder)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config)
        self.model.eval()
        self._rebuild_buffers()

    def _rebuild_buffers(self) -> None:
        """Non-persistent buffers (RoPE ``inv_freq``) are not in the checkpoint: rebuild their
        modules for real, on the CPU."""
        for name, mod in list(self.model.named_modules()):
            if any(b.is_meta for b in mod.buffers(recurse=False)) and hasattr(mod, "config"):
                parent = self.model.get_submodule(name.rpartition(".")[0]) if "." in name else self.model
                setattr(parent, name.rpartition(".")[2], type(mod)(config=mod.config))

    def nbytes(self, prefix: str) -> int:
        """Bytes on disk of the tensors under ``prefix``."""
        total = 0
        for name in self.names(prefix):
            begin, end = read_header(self.folder / self.weight_map[name])[name]["data_offsets"]
            total += end - begin
        return total

    def names(self, prefix: str) -> list[str]:
        return [n for n in self.weight_map if n == prefix or n.startswith(prefix + ".")]

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, read from their files into fresh memory (no memory map: a mapping of a
        whole shard would count against a memory cap)."""
        out, by_file = {}, {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        for file, ns in by_file.items():
            out.update(read_tensors(self.folder / file, ns))
        return out

    def load(self, prefix: str, module: nn.Module) -> None:
        """Give ``module`` (named ``prefix`` in the model) its tensors from disk."""
        sd = {n[len(prefix) + 1 :]: t for n, t in self.tensors(self.names(prefix)).items()}
        missing = set(module.state_dict()) - set(sd)
        if missing:
            raise UnsupportedModelError(f"{self.folder}: tensors missing for {prefix}: {sorted(missing)[:5]}")
        module.load_state_dict(sd, strict=True, assign=True)

    def tokenizer(self):
        """The tokenizer saved beside the weights."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)

    @staticmethod
    def release(module: nn.Module) -> None:
        """Give the module's memory back (its parameters return to the meta device)."""
        module.to("meta")


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def read_header(path: pathlib.Path) -> dict:
    """A safetensors file's header: an 8-byte little-endian length, then JSON (dtype, shape and
    byte offsets of each tensor, counted from the end of the header)."""
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


def read_tensors(path: pathlib.Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Read tensors of a safetensors file with plain reads into fresh memory."""
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        for name in names:
            meta = header[name]
            begin, end = meta["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(8 + n + begin)
            if f.readinto(buf.numpy()) != end - begin:
                raise UnsupportedModelError(f"{path}: truncated data for {name}")
            out[name] = buf.view(_DTYPES[meta["dtype"]]).reshape(meta["shape"])
    return out
