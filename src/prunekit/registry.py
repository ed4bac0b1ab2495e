"""One registry of every method: the CLI, the docs table, the bench and the test matrix read it."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .errors import UnknownMethodError

# Modules whose import registers methods. Adding a method = adding one file and one line here.
_METHOD_MODULES = (
    "prunekit.tokens.methods.fastv",
    "prunekit.tokens.methods.fastervlm",
    "prunekit.tokens.methods.divprune",
    "prunekit.tokens.methods.tome",
    "prunekit.tokens.methods.random",
    "prunekit.tokens.methods.hiprune",
    "prunekit.tokens.methods.fopru",
    "prunekit.tokens.methods.holov",
    "prunekit.tokens.methods.visionzip",
    "prunekit.tokens.methods.todre",
    "prunekit.tokens.methods.recoverable",
    "prunekit.tokens.methods.safewatch",
    "prunekit.tokens.methods.catp",
    "prunekit.tokens.methods.lvlm_csp",
    "prunekit.tokens.methods.pyramiddrop",
    "prunekit.tokens.methods.transprune",
    "prunekit.tokens.methods.sparsevlm",
    "prunekit.tokens.methods.atp_llava",
    "prunekit.tokens.methods.vflowopt",
    "prunekit.tokens.methods.flowcut",
    "prunekit.tokens.methods.holitom",
    "prunekit.tokens.methods.spatten",
    "prunekit.tokens.methods.zero_tprune",
    "prunekit.tokens.methods.top_ssm",
    "prunekit.kv.methods.streamingllm",
    "prunekit.kv.methods.snapkv",
    "prunekit.kv.methods.pyramidkv",
    "prunekit.kv.methods.h2o",
    "prunekit.kv.methods.kvcrush",
    "prunekit.kv.methods.lazyllm",
    "prunekit.weights.methods.magnitude",
    "prunekit.weights.methods.wanda",
    "prunekit.weights.methods.sparsegpt",
    "prunekit.weights.methods.gblm",
    "prunekit.weights.methods.structured",
    "prunekit.weights.methods.slicegpt",
    "prunekit.weights.methods.tyr",
    "prunekit.weights.methods.experts",
    "prunekit.speculative.recycling",
    "prunekit.speculative.rasd",
    "prunekit.training.pat_tuning",
    "prunekit.training.ftp_routing",
    "prunekit.training.journey",
    "prunekit.training.precrop",
    "prunekit.training.layer_lottery",
    "prunekit.training.sap",
    "prunekit.training.polarization",
    "prunekit.training.lrp_pruning",
    "prunekit.training.meta_pruning",
    "prunekit.data.methods",
    "prunekit.data.qtuning",
    "prunekit.data.kd",
)


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows of one method."""

    name: str
    family: str  # "tokens" | "kv" | "weights" | "data" | "decode" | "training"
    paper: str  # the paper's title
    stages: tuple[
        str, ...
    ]  # tokens: "vision", "llm", "encoder"; kv: "after-prefill", "decode"; weights: "after-training"
    signals: tuple[str, ...]  # e.g. "cls_attention@vision-layer", "last_token_attention@llm-layer"
    trains: bool
    factory: Callable[..., object]
    summary: str = ""

    def row(self) -> dict[str, object]:
        """A plain dict for tables and JSON (no factory)."""
        return {
            "name": self.name,
            "family": self.family,
            "paper": self.paper,
            "stages": list(self.stages),
            "signals": list(self.signals),
            "trains": self.trains,
        }


_REGISTRY: dict[str, MethodInfo] = {}
_loaded = False


def register(
    name: str,
    *,
    family: str,
    paper: str,
    stages: tuple[str, ...],
    signals: tuple[str, ...],
    trains: bool = False,
    summary: str = "",
) -> Callable[[type], type]:
    """Class decorator adding a method to the registry under ``name``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].factory is not cls:
            raise ValueError(f"method name {name!r} registered twice")
        _REGISTRY[name] = MethodInfo(name, family, paper, stages, signals, trains, cls, summary)
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return deco


def _load() -> None:
    global _loaded
    if not _loaded:
        for mod in _METHOD_MODULES:
            importlib.import_module(mod)
        _loaded = True


FAMILIES = ("tokens", "kv", "weights", "data", "decode", "training")


def methods(family: str | None = None) -> list[MethodInfo]:
    """Every registered method, sorted by family then name; ``family`` filters."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}; allowed: {list(FAMILIES)}")
    _load()
    rows = sorted(_REGISTRY.values(), key=lambda m: (m.family, m.name))
    return [m for m in rows if family is None or m.family == family]


def get(name: str, family: str | None = None) -> MethodInfo:
    """The method registered as ``name`` (case-insensitive). An unknown name raises
    :class:`UnknownMethodError` with the close matches among ``family``'s methods (all methods when
    ``family`` is ``None``) and lists those methods. A known name of another family is returned:
    :func:`instantiate` says which family it is."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown method family {family!r}; allowed: {list(FAMILIES)}")
    _load()
    key = name.strip().lower() if isinstance(name, str) else name
    if key in _REGISTRY:
        return _REGISTRY[key]
    pool = sorted(m.name for m in _REGISTRY.values() if family is None or m.family == family)
    what = "method" if family is None else f"{family} method"
    close = difflib.get_close_matches(str(key), pool, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    known = f"Known {what}s: {', '.join(pool)}." if pool else f"There are no {what}s yet."
    raise UnknownMethodError(f"unknown {what} {name!r}.{hint} {known}")


def instantiate(name: str, family: str, options: dict, caller: str) -> object:
    """A method object from its registry name and options: the name must be of ``family``
    (``caller`` names the API in the error) and every option one of the method's fields."""
    import dataclasses

    info = get(name, family)
    if info.family != family:
        names = ", ".join(m.name for m in methods(family)) or "none yet"
        raise ValueError(
            f"method {info.name!r} is a {info.family} method; {caller} takes {family} methods: {names}"
        )
    cls = info.factory
    allowed = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {info.name!r}; allowed: {allowed}")
    return cls(**options)


def option_fields(cls: type) -> list[tuple[str, str, str]]:
    """``(name, default, type)`` of each option of a method class: its dataclass ``__init__``
    fields, the default as its ``repr`` (``"(required)"`` without one)."""
    import dataclasses

    if not dataclasses.is_dataclass(cls):
        return []
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append((f.name, default, str(kind)))
    return out
