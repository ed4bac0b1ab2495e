"""Run one bench run, or a sweep of them in-process or on a Ray cluster, into one JSONL file.

A run evaluates dense and pruned on the same inputs in one process (agreement needs both), then
times them interleaved. Models, prepared data and dense outputs are cached per process, so a
sweep pays for them once per worker. A weight treatment's pruned model is a finalized copy
(:meth:`Treatment.pruned_copy`), made once per (model, method, keep, options, seed) and cached for
the sweep (the last ``PRUNED_CACHE`` copies; an evicted one is pruned again, identically).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import platform
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import contextmanager, nullcontext

import torch
from tqdm import tqdm

from .. import __version__
from ..errors import PrunekitError
from ..models.compat import output_cache
from . import measure
from .models import Loaded, load, resolve_dtype
from .spec import RunSpec
from .tasks import NotApplicableError, Task, TaskOutput, make_task

#: where token methods act per model kind (VLMs: the method's own first stage, vision or llm)
STAGE = {"lm": "llm", "vit": "encoder", "text-encoder": "encoder", "vlm": None}

_models: dict[tuple, Loaded] = {}
_tasks: dict[tuple, Task] = {}
_dense: dict[tuple, TaskOutput] = {}
_pruned: OrderedDict[tuple, Loaded] = OrderedDict()
PRUNED_CACHE = 4  # pruned model copies kept in memory (weight treatments)


def _model(spec: RunSpec) -> Loaded:
    k = (spec.model, spec.dtype, spec.device)
    if k not in _models:
        _models.clear()  # one model in memory at a time
        _tasks.clear()
        _dense.clear()
        _pruned.clear()
        _models[k] = load(spec.model, spec.dtype, spec.device)
    return _models[k]


def _task(spec: RunSpec, loaded: Loaded) -> Task:
    k = (spec.model, spec.task, spec.limit, spec.seed)
    if k not in _tasks:
        task = make_task(spec.task, spec.limit, spec.seed)
        if task.kind != loaded.kind:
            raise NotApplicableError(
                f"task {spec.task!r} is for {task.kind} models; {spec.model} is {loaded.kind}"
            )
        _tasks[k] = task
    return _tasks[k]


def _pruned_model(spec: RunSpec, loaded: Loaded) -> Loaded:
    """The weight treatment's pruned, finalized copy of ``loaded`` (cached)."""
    k = (spec.model, spec.dtype, spec.device, spec.method, spec.keep,
         json.dumps(spec.options, sort_keys=True, default=str), spec.seed)  # fmt: skip
    if k in _pruned:
        _pruned.move_to_end(k)
    else:
        _pruned[k] = spec.treatment().pruned_copy(loaded, seed=spec.seed)
        while len(_pruned) > PRUNED_CACHE:
            _pruned.popitem(last=False)
    return _pruned[k]


def environment(device: str) -> dict:
    import transformers

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
        except OSError:
            pass
    return {
        "prunekit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "device_name": name, "threads": torch.get_num_threads(),
        "host": platform.node(),
    }  # fmt: skip


def _finite(x: float) -> float | None:
    return x if isinstance(x, float | int) and math.isfinite(x) else None


def run_one(spec: RunSpec) -> dict:
    """One run as a JSON-ready dict; ``status`` is ``ok``, ``n/a`` (with ``reason``) or ``error``."""
    t0 = time.perf_counter()
    row = {"key": spec.key(), "config": repr(spec), **{k: v for k, v in spec.__dict__.items()},
           "label": spec.label, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    try:
        row.update(_measure(spec))
        row["status"] = "ok"
    except (NotApplicableError, PrunekitError, NotImplementedError) as e:
        row.update(status="n/a", reason=f"{type(e).__name__}: {e}")
    except Exception as e:  # a sweep records the failure and goes on; the CLI exits non-zero
        row.update(status="error", reason=f"{type(e).__name__}: {e}",
                   traceback=traceback.format_exc(limit=-6))  # fmt: skip
    row["wall_s"] = time.perf_counter() - t0
    row["env"] = environment(spec.device)
    with contextlib.suppress(ValueError):  # what "auto" became on this machine
        row["env"]["dtype"] = resolve_dtype(spec.model, spec.dtype, spec.device)
    return row


def _measure(spec: RunSpec) -> dict:
    torch.manual_seed(spec.seed)
    treatment = spec.treatment()
    treatment.validate()
    loaded = _model(spec)
    task = _task(spec, loaded)
    task.check(treatment.family)
    task.prepare(loaded)
    dense_open = nullcontext
    pruned_open = treatment.opener(loaded.model, STAGE[loaded.kind])
    # the model the treatment's side runs on: the same one (token, kv) or a pruned copy (weights)
    treated = _pruned_model(spec, loaded) if treatment.family == "weights" else loaded

    dkey = (spec.model, spec.task, spec.limit, spec.seed, spec.dtype, spec.device)
    if dkey not in _dense:
        _dense[dkey] = task.evaluate(loaded, dense_open)
    dense = _dense[dkey]
    out = dense if spec.method == "dense" else task.evaluate(treated, pruned_open)
    agreement = task.agreement(dense, out)
    quality = {**out.metrics, **agreement}
    dense_quality = {**dense.metrics, **task.agreement(dense, dense)}
    p, d = quality.get(task.primary), dense_quality.get(task.primary)
    if spec.method == "dense" or p == d:
        retention = 1.0
    elif task.higher_is_better:
        retention = p / d if d else None
    else:  # lower is better (perplexity, bits per byte): dense / pruned
        retention = d / p if p else None

    # ---- cost, on the task's timing batch
    work = task.timing(loaded)
    pwork = work if treated is loaded else task.timing(treated)
    selects: list[float] = []

    @contextmanager
    def tracked():
        with pruned_open() as s:
            yield s
        if s is not None:
            selects.append(s.stats.select_seconds)

    prefill, pprefill = work["prefill"], pwork["prefill"]
    is_dense = spec.method == "dense"
    fns = {"dense": lambda: prefill(dense_open)}
    if not is_dense:
        fns["pruned"] = lambda: pprefill(tracked)
    times = measure.interleaved_latency(fns, repeats=spec.repeats, device=spec.device)
    lat = {k: measure.median(v) for k, v in times.items()}
    lat.setdefault("pruned", lat["dense"])
    cost = {
        "prefill_s": lat["pruned"], "dense_prefill_s": lat["dense"],
        "prefill_ratio": lat["pruned"] / lat["dense"],
        "select_s": measure.median(selects) if selects else 0.0,
        "saved_s": lat["dense"] - lat["pruned"],
    }  # fmt: skip
    if "generate_long" in work:
        short, long_ = work["generate_short"], work["generate_long"]
        pshort, plong = pwork["generate_short"], pwork["generate_long"]
        fns = {"dense_short": lambda: short(dense_open), "dense_long": lambda: long_(dense_open)}
        if not is_dense:
            fns |= {"pruned_short": lambda: pshort(pruned_open), "pruned_long": lambda: plong(pruned_open)}
        reps = max(2, spec.repeats // 2) if spec.repeats > 1 else 1
        g = measure.interleaved_latency(fns, repeats=reps, device=spec.device)
        m = {k: measure.median(v) for k, v in g.items()}
        if is_dense:
            m |= {"pruned_short": m["dense_short"], "pruned_long": m["dense_long"]}
        new = getattr(task, "timed_batch", task.timing_batch) * task.decode_tokens  # sequences really timed
        for who in ("dense", "pruned"):
            dt = m[f"{who}_long"] - m[f"{who}_short"]
            cost[f"{'' if who == 'pruned' else 'dense_'}decode_tps"] = _finite(new / dt) if dt > 0 else None

    mem, flops = {}, {}
    variants = [("dense", dense_open, prefill)]
    if not is_dense:
        variants.append(("pruned", pruned_open, pprefill))
    for who, opener, run in variants:
        peak, how = measure.peak_memory(lambda o=opener, r=run: r(o), spec.device)
        mem[f"{who}_peak_bytes"], mem["how"] = peak, how
        result = run(opener)
        mem[f"{who}_kv_bytes"] = measure.cache_bytes(output_cache(result))
        flops[who] = measure.count_flops(lambda o=opener, r=run: r(o))
    if is_dense:  # the dense run's "pruned" side is dense itself: measured once
        mem |= {"pruned_peak_bytes": mem["dense_peak_bytes"], "pruned_kv_bytes": mem["dense_kv_bytes"]}
        flops["pruned"] = flops["dense"]
    # non-zero Linear weights of the treated model over the dense model's Linear weights: a
    # physically smaller model counts what it lost
    nz, _ = measure.params_kept(treated.model)
    _, total = measure.params_kept(loaded.model)
    return {
        "metric": task.primary,
        "higher_is_better": task.higher_is_better,
        "quality": quality,
        "dense_quality": dense_quality,
        "retention": retention,
        "n_examples": out.n,
        "tokens_kept": 1.0 if out.tokens_kept is None else out.tokens_kept,
        "params_kept": nz / total if total else 1.0,
        "latency": cost,
        "memory": {
            "peak_bytes": mem["pruned_peak_bytes"],
            "dense_peak_bytes": mem["dense_peak_bytes"],
            "how": mem["how"],
            "kv_bytes": mem["pruned_kv_bytes"],
            "dense_kv_bytes": mem["dense_kv_bytes"],
        },
        "flops": {
            "prefill": flops["pruned"],
            "dense_prefill": flops["dense"],
            "ratio": flops["pruned"] / flops["dense"] if flops["dense"] else None,
        },
    }


# ------------------------------------------------------------------ results file
def read_results(path: str | os.PathLike) -> list[dict]:
    p = pathlib.Path(path)
    if not p.exists():
        return []
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:  # a run killed mid-write leaves a partial last line
                if n != len(p.read_text().splitlines()):
                    raise ValueError(f"{p}:{n}: not a JSON line ({e})") from e
    return rows


def done_keys(path: str | os.PathLike) -> set[str]:
    """Keys of runs already in the file with a final status (``ok`` or ``n/a``); errors are retried."""
    return {r["key"] for r in read_results(path) if r.get("status") in ("ok", "n/a")}


def _append(path: pathlib.Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()


def run_sweep(
    specs: Iterable[RunSpec],
    results: str | os.PathLike,
    *,
    ray_address: str | None = None,
    ray_cpus_per_run: float = 1,
    progress: bool = True,
) -> list[dict]:
    """Run every spec not already in ``results`` (resume); append one JSON line per run.

    ``ray_address``: ``None`` runs in this process; ``"local"`` starts a local Ray instance;
    any other value is passed to ``ray.init(address=...)`` (e.g. ``"auto"``, ``"ray://host:10001"``).
    Each run is one Ray task; the driver alone writes the file, so resume works the same.
    Returns the rows run now (skipped ones are not repeated).
    """
    path = pathlib.Path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    specs = list(specs)
    done = done_keys(path)
    todo = [s for s in specs if s.key() not in done]
    skipped = len(specs) - len(todo)
    bar = tqdm(total=len(todo), desc="prunekit bench", unit="run", disable=not progress)
    if skipped:
        bar.write(f"resume: {skipped} of {len(specs)} runs already in {path}")
    rows = []
    if ray_address is None:
        for s in todo:
            bar.set_postfix_str(f"{s.model} {s.task} {s.label} keep={s.keep}")
            row = run_one(s)
            _append(path, row)
            rows.append(row)
            bar.update(1)
    else:
        for row in _ray_map(todo, ray_address, ray_cpus_per_run):
            _append(path, row)
            rows.append(row)
            bar.set_postfix_str(f"{row['model']} {row['task']} {row['label']} keep={row['keep']}")
            bar.update(1)
    bar.close()
    return rows


def _ray_map(specs: list[RunSpec], address: str, cpus: float):
    try:
        import ray
    except ImportError as e:
        raise ImportError("a Ray sweep needs ray: pip install 'prunekit[ray]'") from e
    if not ray.is_initialized():
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    remote = ray.remote(num_cpus=cpus)(run_one)
    pending = [remote.remote(s) for s in specs]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield ray.get(ready[0])
