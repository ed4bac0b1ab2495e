"""Model adapters: the only code in prunekit that imports transformers.

``get_adapter(model)`` finds the adapter of a model's family. Adding a family = adding one
adapter class to ``ADAPTERS``.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import Adapter, HookSet, PruneStats, Session


def _adapters() -> list[type[Adapter]]:
    from .compat import check_transformers
    from .decoder import DecoderAdapter
    from .encoder import ENCODER_ADAPTERS
    from .ssm import MambaAdapter
    from .vlm import VLM_ADAPTERS

    check_transformers()  # warns once outside the tested range
    # VLMs first: they contain a decoder and must not be taken for a plain one.
    return [*VLM_ADAPTERS, DecoderAdapter, *ENCODER_ADAPTERS, MambaAdapter]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``; :class:`UnsupportedModelError` names the supported families."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"expected a torch.nn.Module (a Hugging Face model); got {type(model).__name__}"
        )
    adapters = _adapters()
    for cls in adapters:
        if cls.matches(model):
            return cls(model)
    names = ", ".join(sorted({a.family for a in adapters}))
    raise UnsupportedModelError(
        f"no prunekit adapter for {type(model).__name__} (model_type="
        f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}); supported families: {names}"
    )


def support_matrix(names: list[str] | None = None) -> dict[str, dict[str, tuple[str | None, str]]]:
    """For each token method (default: all), each model family -> ``(stage, "")`` where the method
    runs there, or ``(None, why)``; read from the adapters' declared stages and signals."""
    from .. import registry

    infos = [registry.get(n) for n in names] if names else registry.methods("tokens")
    out: dict[str, dict[str, tuple[str | None, str]]] = {}
    for info in infos:
        method = info.factory()
        out[info.name] = {cls.family: cls.support(method, info.stages) for cls in _adapters()}
    return out


__all__ = ["Adapter", "HookSet", "PruneStats", "Session", "get_adapter", "support_matrix"]
