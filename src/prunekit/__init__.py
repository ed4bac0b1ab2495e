"""prunekit: pruning for transformers without retraining — tokens, KV cache, weights — measured
side by side for quality, latency and memory.

>>> import prunekit
>>> with prunekit.prune_tokens(model, "fastv", keep=0.5, layer=2) as session:
...     out = model.generate(**inputs)

``prunekit.bench(...)`` (the bench, callable and a module) and ``prunekit.zoo`` (the packaged
models) are imported on first use, so ``import prunekit`` does not load them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .budget import resolve_keep, validate_keep
from .data.prune import DataPruneReport, prune_data
from .errors import PrunekitError, SignalUnavailableError, UnknownMethodError, UnsupportedModelError
from .kv.engine import compress_kv
from .registry import MethodInfo, methods
from .tokens.compose import Compose
from .tokens.engine import prune_tokens
from .training import recover
from .weights.engine import WeightPruning, prune_weights
from .weights.export import load_pruned

__all__ = [
    "Compose",
    "DataPruneReport",
    "MethodInfo",
    "PrunekitError",
    "SignalUnavailableError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "WeightPruning",
    "__version__",
    "compress_kv",
    "load_pruned",
    "methods",
    "prune_data",
    "prune_tokens",
    "prune_weights",
    "recover",
    "resolve_keep",
    "validate_keep",
]

_LAZY = ("bench", "zoo")  # submodules imported on first attribute access (PEP 562)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)  # also sets it as this package's attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
