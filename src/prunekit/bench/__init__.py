"""``prunekit.bench``: quality, latency, memory and FLOPs of pruning methods, side by side with dense.

    import prunekit
    rows = prunekit.bench(models=["smollm2"], tasks=["arc_easy"], methods=["fastv", "random"],
                          keep=[0.5, 0.25], limit=100, out="results/bench")

writes ``results/bench/results.jsonl`` (one JSON line per run; runs already there are skipped),
``report.md`` and ``pareto_<model>_<task>.png``. See ``prunekit bench --help`` for the CLI and
``Sweep`` for the YAML fields.

``prunekit.bench`` is both this package (``prunekit.bench.Sweep``, ``from prunekit.bench import
DEFAULT``) and the function :func:`bench`: calling the module calls the function. ``import prunekit``
alone is enough; the package is imported on first use of ``prunekit.bench``.
"""

from __future__ import annotations

import inspect
import pathlib
import sys
import types

from .report import write_report
from .runner import read_results, run_one, run_sweep
from .spec import RunSpec, Sweep, load_config
from .tasks import TASKS, make_task, task_table

#: the README's main job: every token method so far on the real packaged models
DEFAULT = Sweep(
    models=["smollm2", "dinov2-s", "minilm"],
    tasks=["arc_easy", "fashion", "sst2"],
    methods=["fastv", "random", "tome", "fastervlm", "divprune"],
    keep=[0.5, 0.25],
    limits={"arc_easy": 100, "fashion": 256},
    repeats=3,
)

#: the same on tiny random models: a smoke run of the whole pipeline in seconds
QUICK = Sweep(
    models=["tiny-llama", "tiny-vit", "tiny-bert"],
    tasks=["arc_easy", "fashion", "sst2"],
    methods=["fastv", "random", "tome"],
    keep=[0.5],
    limit=8,
    repeats=2,
)


def bench(
    models: list[str] | str | None = None,
    tasks: list[str] | str | None = None,
    methods: list | str | None = None,
    keep: list | float | int = 0.5,
    *,
    config: str | Sweep | None = None,
    options: dict | None = None,
    limit: int | None = None,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "cpu",
    repeats: int | None = None,
    out: str = "results/bench",
    ray_address: str | None = None,
    progress: bool = True,
    report: bool = True,
) -> list[dict]:
    """Run a sweep (models x tasks x methods x budgets, plus dense) and write results, report, plots.

    Either give ``config`` (a YAML/JSON path or a :class:`Sweep`), or the lists themselves.
    Returns every ``ok`` row of the results file that belongs to this sweep (resumed ones included).
    ``repeats``: timed repeats per variant after a warm-up; ``None`` is 5, or ``limit // 10`` (at
    least 1) for a ``limit`` under 50 (:func:`~prunekit.bench.spec.auto_repeats`).
    """
    if config is not None:
        sweep = config if isinstance(config, Sweep) else load_config(config)
    else:
        if models is None or tasks is None:
            raise ValueError("give models and tasks (or config=...)")
        listify = lambda x: [x] if isinstance(x, str | int | float) else list(x or [])  # noqa: E731
        sweep = Sweep(
            models=listify(models), tasks=listify(tasks), methods=listify(methods), keep=listify(keep),
            options=dict(options or {}), limit=limit, seed=seed, dtype=dtype, device=device, repeats=repeats,
        )  # fmt: skip
    specs = sweep.runs()
    outdir = pathlib.Path(out)
    results = outdir / "results.jsonl"
    run_sweep(specs, results, ray_address=ray_address, progress=progress)
    if report:
        write_report(results, outdir)
    keys = {s.key() for s in specs}
    return [r for r in read_results(results) if r["key"] in keys and r.get("status") == "ok"]


__all__ = [
    "DEFAULT", "QUICK", "TASKS", "RunSpec", "Sweep", "bench", "load_config", "make_task", "read_results",
    "run_one", "run_sweep", "task_table", "write_report",
]  # fmt: skip


class _CallableModule(types.ModuleType):
    """The type of the ``prunekit.bench`` module: a module that is also :func:`bench`."""

    def __call__(self, *args, **kwargs) -> list[dict]:
        return bench(*args, **kwargs)


__signature__ = inspect.signature(bench)  # what help() and IDEs show for ``prunekit.bench(...)``
sys.modules[__name__].__class__ = _CallableModule
