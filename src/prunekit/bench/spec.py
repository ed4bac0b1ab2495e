"""A sweep is a list of independent runs; a :class:`RunSpec` names one and keys it for resume."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from ..budget import validate_keep
from .models import BUILTIN, DTYPES
from .tasks import TASKS
from .treatments import Treatment, options_for

#: model kind of the built-in models, known without loading them
BUILTIN_KIND = {"smollm2": "lm", "tiny-llama": "lm", "dinov2-s": "vit", "tiny-vit": "vit",
                "minilm": "text-encoder", "tiny-bert": "text-encoder", "llava-dino-smol": "vlm",
                "tiny-llava": "vlm"}  # fmt: skip


def auto_repeats(limit: int | None) -> int:
    """Timed repeats per variant (after one warm-up) when a sweep gives none: 5, or ``limit // 10``
    (at least 1) for a ``limit`` under 50, so that a few-example look at a model stays quick."""
    return 5 if limit is None or limit >= 50 else max(1, limit // 10)


@dataclass(frozen=True)
class RunSpec:
    """One (model, task, method, budget) run. Everything that changes its numbers is a field."""

    model: str
    task: str
    method: str = "dense"
    keep: int | float = 1.0
    options: dict = field(default_factory=dict, hash=False)
    limit: int | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "cpu"
    repeats: int = 5

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        """The method as the report names it: ``fastv``, or ``fastv(layer=3)`` with options."""
        if not self.options:
            return self.method
        return f"{self.method}({','.join(f'{k}={v}' for k, v in sorted(self.options.items()))})"

    def treatment(self) -> Treatment:
        return Treatment(self.method, self.keep, dict(self.options))


@dataclass
class Sweep:
    """models x tasks x methods x budgets, plus one dense run per (model, task).

    ``methods`` entries are registry names or ``{"name": ..., "options": {...}}``; ``options``
    applies to every method that accepts each option (``layer`` goes to FastV, not to ToMe).
    """

    models: list[str]
    tasks: list[str]
    methods: list = field(default_factory=list)
    keep: list = field(default_factory=lambda: [0.5])
    options: dict = field(default_factory=dict)
    limit: int | None = None
    seed: int = 0
    dtype: str = "auto"
    device: str = "cpu"
    repeats: int | None = None  # None: auto_repeats(limit) per task (5, fewer for limits under 50)
    limits: dict = field(default_factory=dict)  # per-task limit, overriding ``limit``

    def validate(self) -> None:
        for name, items in (("models", self.models), ("tasks", self.tasks)):
            if not items:
                raise ValueError(f"a sweep needs at least one of {name}")
        for t in self.tasks:
            if t not in TASKS:
                from .tasks import make_task

                make_task(t)  # raises with the known names
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; allowed: {['auto', *DTYPES]}")
        unknown = sorted(set(self.limits) - set(self.tasks))
        if unknown:
            raise ValueError(f"limits given for task(s) {unknown} not in the sweep's tasks {self.tasks}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]'; got {self.device!r}")
        r = self.repeats
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"repeats must be an int >= 1 (or None: 5, fewer for small limits); got {r!r}")
        for m in self.models:
            if m not in BUILTIN and "/" not in m:
                raise ValueError(f"unknown model {m!r}; built-in: {sorted(BUILTIN)}, or a hub id 'org/name'")
        for k in self.keep:
            validate_keep(k)
        accepted = set()
        for name, opts in self._methods():
            if name != "dense":
                Treatment(name, self.keep[0] if self.keep else 1.0, opts).validate()
                accepted |= set(options_for(name, self.options))
        unused = sorted(set(self.options) - accepted)
        if unused and self.methods:
            raise ValueError(f"option(s) {unused} are accepted by none of the methods {self.methods}")

    def _methods(self) -> list[tuple[str, dict]]:
        out = []
        for m in self.methods:
            if isinstance(m, str):
                out.append((m, options_for(m, self.options)))
            elif isinstance(m, dict) and "name" in m:
                out.append((m["name"], {**options_for(m["name"], self.options), **m.get("options", {})}))
            else:
                raise ValueError(f"a method is a name or {{'name': ..., 'options': {{...}}}}; got {m!r}")
        return out

    def runs(self) -> list[RunSpec]:
        """Every run; a model is paired only with the tasks of its kind (hub models: all)."""
        self.validate()
        out = []
        for model in self.models:
            kind = BUILTIN_KIND.get(model)
            for task in self.tasks:
                if kind is not None and TASKS[task].kind != kind:
                    continue
                limit = self.limits.get(task, self.limit)
                repeats = auto_repeats(limit) if self.repeats is None else self.repeats
                common = dict(
                    limit=limit, seed=self.seed, dtype=self.dtype, device=self.device, repeats=repeats
                )
                out.append(RunSpec(model, task, **common))
                for name, opts in self._methods():
                    if name == "dense":
                        continue
                    for k in self.keep:
                        out.append(RunSpec(model, task, name, k, opts, **common))
        if not out:
            raise ValueError(
                f"no task in {self.tasks} fits the models {self.models} (see `prunekit bench --list`)"
            )
        return out


def load_config(path: str) -> Sweep:
    """A sweep from a YAML (or JSON) file with the fields of :class:`Sweep`."""
    import pathlib

    text = pathlib.Path(path).read_text()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        try:
            import yaml
        except ImportError as e:
            raise ImportError("YAML configs need pyyaml: pip install 'prunekit[bench]'") from e
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with keys models, tasks, methods, keep, ...")
    known = set(Sweep.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    for k in ("models", "tasks", "methods", "keep"):
        if isinstance(data.get(k), str | int | float) and not isinstance(data.get(k), bool):
            data[k] = [data[k]]
    return Sweep(**data)
