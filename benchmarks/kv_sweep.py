"""Issue 6's sweep: prompt and KV-cache methods on SmolLM2-135M (packaged weights), quality
retention against the fraction of the prompt's KV cache kept, and, with ``--role timing``, each
method's time to first token, decode speed and own overhead against dense, side by side in one
process.

Quality (``--role quality``, the default): the bench's long-context tasks (needle in a haystack at
1k-8k tokens, SQuAD reading comprehension), each method at each budget, through the same
``Treatment`` openers as ``prunekit bench``. Timing and memory are not measured here (the bench's
cost measurement would prefill 8 x 8k tokens several times per run on a CPU); ``--role timing``
measures them on one prompt at a time.

Run:
    PYTHONPATH=src python benchmarks/kv_sweep.py --out benchmarks/results/kv_sweep.jsonl
    PYTHONPATH=src python benchmarks/kv_sweep.py --role timing --out benchmarks/results/kv_timing.jsonl
    PYTHONPATH=src python benchmarks/kv_sweep.py --role table        # markdown from both files

Rows are JSON lines written as they go; a rerun skips the rows its output already holds.

Issue 21, item 7 (SnapKV on grouped-query models: grouped vs per-query-head selection, the paper's
LongBench settings), on the needles only; ``benchmarks/snapkv_gqa.sh`` runs it, then:
    PYTHONPATH=src python benchmarks/kv_sweep.py --role needles --quality benchmarks/results/snapkv_gqa.jsonl
``--model gemma3-270m`` runs the optional Gemma-3 asset (its full-attention layers are compressed,
its sliding-window layers keep their 512-token window; LazyLLM refuses the mixed layer types).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from prunekit import registry
from prunekit.bench.models import load
from prunekit.bench.tasks import make_task
from prunekit.bench.treatments import Treatment
from prunekit.errors import PrunekitError

METHODS = ["streamingllm", "h2o", "snapkv", "pyramidkv", "kvcrush", "spatten", "lazyllm"]
KEEPS = [0.5, 0.25, 0.1]
TASKS = {"needle-1k": 10, "needle-2k": 10, "needle-4k": 6, "needle-8k": 4, "squad": 40}


def _method(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,key=value`` (e.g. ``kvcrush:bits=query_heads``)."""
    name, _, opts = spec.partition(":")
    options = {}
    for kv in filter(None, opts.split(",")):
        k, _, v = kv.partition("=")
        options[k] = int(v) if v.lstrip("-").isdigit() else float(v) if v.replace(".", "", 1).isdigit() else v
    return name, options


def _per_query_head(spec: str) -> bool:
    """Whether the method selects per query head (its cache then holds one KV head per query head)."""
    name, options = _method(spec)
    if name == "dense":
        return False
    return bool(getattr(registry.get(name).factory(**options), "per_query_head", False))


def _rows(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["id"]: r for r in rows}


def _write(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def quality(a: argparse.Namespace) -> None:
    out = Path(a.out)
    done = _rows(out)
    loaded = load(a.model)
    cfg = loaded.model.config.get_text_config()
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    for name in a.tasks:
        task = make_task(name, limit=a.limit or TASKS[name])
        rid = f"{name}|dense"
        if rid in done:
            dense = done[rid]
        else:
            t0 = time.perf_counter()
            res = task.evaluate(loaded, nullcontext)
            dense = {"id": rid, "task": name, "method": "dense", "keep": 1.0, **res.metrics, "n": res.n,
                     "metric": task.primary, "wall_s": time.perf_counter() - t0}  # fmt: skip
            _write(out, dense)
        for method in a.methods:
            for keep in a.keeps:
                rid = f"{name}|{method}|{keep}"
                if rid in done:
                    continue
                tr = Treatment(_method(method)[0], keep, _method(method)[1])
                tr.validate()
                t0 = time.perf_counter()
                try:
                    res = task.evaluate(loaded, tr.opener(loaded.model, "llm"))
                except (ValueError, PrunekitError) as e:  # e.g. a budget the method's layers cannot reach
                    _write(out, {"id": rid, "task": name, "method": method, "keep": keep, "status": "n/a",
                                 "reason": str(e).split(";")[0]})  # fmt: skip
                    continue
                p, d = res.metrics[task.primary], dense[task.primary]
                retention = (p / d if d else None) if task.higher_is_better else (d / p if p else None)
                # cache entries held vs the dense cache: a per-query-head selection stores Hq heads
                per_q = _per_query_head(method)
                share = None if res.tokens_kept is None else res.tokens_kept * (groups if per_q else 1)
                wall = time.perf_counter() - t0
                _write(out, {"id": rid, "task": name, "method": method, "keep": keep, **res.metrics,
                             "retention": retention, "kept": res.tokens_kept, "cache_vs_dense": share,
                             "n": res.n, "metric": task.primary, "wall_s": wall})  # fmt: skip


def _median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def timing(a: argparse.Namespace) -> None:
    """TTFT (the prefill forward that yields the first token), decode tokens/s over ``--decode``
    greedy tokens of ``generate()``, and the method's own time, per method and budget, on one
    needle prompt of ``--length`` tokens; dense and pruned runs alternate."""
    out = Path(a.out)
    done = _rows(out)
    loaded = load(a.model)
    model, tok = loaded.model, loaded.tokenizer
    task = make_task(f"needle-{a.length // 1024}k", limit=1)
    task.prepare(loaded)
    ids = torch.tensor([task.pairs[0].ctx])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def prefill(opener):
        with torch.inference_mode(), opener() as s:
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return s

    def generate(opener, n):
        with torch.inference_mode(), opener():
            model.generate(
                input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad
            )

    def measure(opener) -> dict:
        prefill(opener)  # warm-up
        ttft = _median_time(lambda: prefill(opener), a.repeats)
        short = _median_time(lambda: generate(opener, 1), a.repeats)
        long_ = _median_time(lambda: generate(opener, 1 + a.decode), a.repeats)
        s = prefill(opener)
        own = None if s is None else s.stats.select_seconds
        return {"ttft_s": ttft, "decode_tps": a.decode / (long_ - short), "own_s": own}

    for method in ["dense", *a.methods]:
        todo = [
            k for k in ([1.0] if method == "dense" else a.keeps) if f"{a.length}|{method}|{k}" not in done
        ]
        if not todo:
            continue
        dense = measure(nullcontext)  # dense measured next to each method's runs: drifts cancel
        for keep in todo:
            rid = f"{a.length}|{method}|{keep}"
            tr = Treatment(_method(method)[0], keep, _method(method)[1])
            tr.validate()
            try:
                m = dense if method == "dense" else measure(tr.opener(model, "llm"))
            except (ValueError, PrunekitError) as e:
                _write(
                    out, {"id": rid, "method": method, "keep": keep, "status": "n/a", "reason": str(e)[:200]}
                )
                continue
            row = {"id": rid, "length": ids.shape[1], "method": method, "keep": keep, **m,
                   "dense_ttft_s": dense["ttft_s"], "dense_decode_tps": dense["decode_tps"],
                   "ttft_ratio": m["ttft_s"] / dense["ttft_s"],
                   "decode_ratio": m["decode_tps"] / dense["decode_tps"],
                   "overhead_of_prefill": None if m["own_s"] is None else m["own_s"] / dense["ttft_s"],
                   "threads": torch.get_num_threads()}  # fmt: skip
            _write(out, row)


def table(a: argparse.Namespace) -> None:
    rows = [json.loads(x) for x in Path(a.quality).read_text().splitlines() if x.strip()]
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    by = {(r["task"], r["method"], r["keep"]): r for r in rows}
    print("| method | " + " | ".join(f"{t} ({by[t, 'dense', 1.0]['metric']})" for t in tasks) + " |")
    print("|---|" + "---|" * len(tasks))
    cells = []
    for t in tasks:
        d = by[t, "dense", 1.0]
        cells.append(f"{d[d['metric']]:.2f}")
    print("| dense | " + " | ".join(cells) + " |")
    for m in methods:
        cells = []
        for t in tasks:
            vals = [by.get((t, m, k)) for k in KEEPS]
            shown = ("-" if v is None else "n/a" if "status" in v else f"{v[v['metric']]:.2f}" for v in vals)
            cells.append(" / ".join(shown))
        print(f"| {m} (50 / 25 / 10 %) | " + " | ".join(cells) + " |")
    tpath = Path(a.timing)
    if not tpath.exists():
        return
    trows = [json.loads(x) for x in tpath.read_text().splitlines() if x.strip()]
    print("\n| method | keep | TTFT ms | TTFT vs dense | decode tok/s | decode vs dense | own ms | "
          "own / dense TTFT |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in trows:
        if "status" in r:
            print(f"| {r['method']} | {r['keep']} | n/a | | | | | |")
            continue
        own = "-" if r["own_s"] is None else f"{r['own_s'] * 1e3:.1f}"
        ovh = "-" if r["overhead_of_prefill"] is None else f"{r['overhead_of_prefill']:.1%}"
        print(f"| {r['method']} | {r['keep']} | {r['ttft_s'] * 1e3:.0f} | {r['ttft_ratio']:.2f}x | "
              f"{r['decode_tps']:.1f} | {r['decode_ratio']:.2f}x | {own} | {ovh} |")  # fmt: skip


def needles(a: argparse.Namespace) -> None:
    """Markdown: method x variant x keep -> needle accuracy per length (issue 21, item 7). Rows of
    ``--quality``; the ``--baseline-methods`` rows it lacks come from ``--baseline``, marked †."""
    rows = [json.loads(x) for x in Path(a.quality).read_text().splitlines() if x.strip()]
    base = Path(a.baseline)
    own = {(r["task"], r["method"], r["keep"]) for r in rows}
    if base.exists():
        extra = [json.loads(x) for x in base.read_text().splitlines() if x.strip()]
        rows += [dict(r, baseline=True) for r in extra if r["method"] in a.baseline_methods
                 and r["task"].startswith("needle")
                 and (r["task"], r["method"], r["keep"]) not in own]  # fmt: skip
    tasks = [t for t in TASKS if t.startswith("needle") and any(r["task"] == t for r in rows)]
    by = {(r["task"], r["method"], r["keep"]): r for r in rows}
    keys = list(dict.fromkeys((r["method"], r["keep"]) for r in rows))
    keys.sort(key=lambda mk: (mk[0] != "dense", _method(mk[0])[0], mk[0], -mk[1]))
    cols = [f"{t} (acc, n={next(r['n'] for r in rows if r['task'] == t)})" for t in tasks]
    print("| method | heads | window, kernel, pooling | keep | cache vs dense | " + " | ".join(cols) + " |")
    print("|---|---|---|---|---|" + "---|" * len(tasks))
    for method, keep in keys:
        name, opts = _method(method)
        if name == "dense":
            heads, settings = "-", "-"
        else:
            m = registry.get(name).factory(**opts)
            heads = getattr(m, "heads", "-")
            settings = f"{m.window}, {m.kernel}, {m.pooling}" if hasattr(m, "kernel") else "-"
        cells, share = [], None
        for t in tasks:
            r = by.get((t, method, keep))
            if r is None:
                cells.append("-")
                continue
            dagger = "†" if r.get("baseline") else ""
            cells.append("n/a" if "status" in r else f"{r[r['metric']]:.2f}{dagger}")
            share = r.get("cache_vs_dense", share if share is not None else r.get("kept", 1.0))
        shown = "-" if share is None else f"{share:.2f}"
        print(f"| {name} | {heads} | {settings} | {keep:g} | {shown} | " + " | ".join(cells) + " |")


def needle_kept(a: argparse.Namespace) -> None:
    """Where the key goes: per needle prompt and method, after the compressed prefill, the share of
    (layer, query head) pairs whose visible cache still holds every token of a mention of the key
    (a grouped selection serves its KV head's query heads), and the layers where no query head does.
    One prompt at a time, no decoding."""
    from prunekit.kv.engine import compress_kv

    out = Path(a.out)
    done = _rows(out)
    loaded = load(a.model)
    model = loaded.model
    cfg = model.config.get_text_config()
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    for name in a.tasks:
        task = make_task(name, limit=a.limit or TASKS[name])
        task.prepare(loaded)
        for method in a.methods:
            for keep in a.keeps:
                rid = f"kept|{name}|{method}|{keep}"
                if rid in done:
                    continue
                m, opts = _method(method)
                seen, dead = [], []
                for p in task.pairs:
                    ids, key = p.ctx, p.cont
                    spans = [s for s in range(len(ids) - len(key) + 1) if ids[s : s + len(key)] == key]
                    if not spans:  # the key's leading space merged differently inside the text
                        key = key[1:]
                        spans = [s for s in range(len(ids) - len(key) + 1) if ids[s : s + len(key)] == key]
                    with torch.inference_mode(), compress_kv(model, m, keep, **opts) as sess:
                        model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
                    per_layer = []
                    for pos, ok in sess.stats.kept[0]:
                        vis = torch.zeros(pos.shape[1], len(ids), dtype=torch.bool)
                        vis.scatter_(1, pos[0], ok[0])
                        if vis.shape[0] != cfg.num_attention_heads:  # grouped: a KV head serves its group
                            vis = vis.repeat_interleave(groups, dim=0)
                        has = torch.stack([vis[:, s : s + len(key)].all(dim=1) for s in spans]).any(dim=0)
                        per_layer.append(has.float().mean().item())
                    seen.append(statistics.mean(per_layer))
                    dead.append(sum(x == 0 for x in per_layer))
                _write(out, {"id": rid, "task": name, "method": method, "keep": keep, "n": len(seen),
                             "heads_seeing_key": statistics.mean(seen), "layers_blind": statistics.mean(dead),
                             "layers": len(model.model.layers)})  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    roles = {
        "quality": quality,
        "timing": timing,
        "table": table,
        "needles": needles,
        "needle-kept": needle_kept,
    }
    p.add_argument("--role", choices=list(roles), default="quality")
    p.add_argument("--model", default="smollm2", help="a bench model: smollm2 (default) or gemma3-270m")
    p.add_argument("--methods", nargs="*", default=METHODS)
    p.add_argument("--keeps", nargs="*", type=float, default=KEEPS)
    p.add_argument("--tasks", nargs="*", default=list(TASKS))
    p.add_argument("--limit", type=int, help="examples per task (default: per task, see TASKS)")
    p.add_argument("--length", type=int, default=4096, help="timing: prompt tokens (a needle prompt)")
    p.add_argument("--decode", type=int, default=32, help="timing: greedy tokens decoded")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", default="runs/kv_sweep.jsonl")
    p.add_argument("--quality", default="benchmarks/results/kv_sweep.jsonl", help="table: quality rows")
    p.add_argument("--timing", default="benchmarks/results/kv_timing.jsonl", help="table: timing rows")
    p.add_argument("--baseline", default="benchmarks/results/kv_sweep.jsonl", help="needles: other rows")
    p.add_argument("--baseline-methods", nargs="*", default=["h2o", "snapkv", "pyramidkv"])
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    roles[a.role](a)


if __name__ == "__main__":
    main()
