"""A causal LM held on disk: built on the meta device, its modules loaded from the checkpoint's
safetensors one at a time and released after use, so a model larger than memory can be walked
layer by layer (weight pruning with a memory bound of about one decoder layer)."""

from __future__ import annotations

import json
import pathlib

import torch
from safetensors import safe_open
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
            with safe_open(self.folder / "model.safetensors", "pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")
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
            with safe_open(self.folder / self.weight_map[name], "pt") as f:
                sl = f.get_slice(name)
                total += int(torch.tensor(sl.get_shape()).prod()) * _dtype_size(sl.get_dtype())
        return total

    def names(self, prefix: str) -> list[str]:
        return [n for n in self.weight_map if n == prefix or n.startswith(prefix + ".")]

    def tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        out, by_file = {}, {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        for file, ns in by_file.items():
            with safe_open(self.folder / file, "pt") as f:
                for n in ns:
                    out[n] = f.get_tensor(n)
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


def _dtype_size(name: str) -> int:
    return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}.get(
        name, 4
    )
