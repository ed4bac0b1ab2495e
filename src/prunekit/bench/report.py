"""``report.md`` (a table per model and task) and Pareto plots (PNG) from a results file."""

from __future__ import annotations

import pathlib
from collections import defaultdict

from .runner import read_results


def latest_ok(rows: list[dict]) -> list[dict]:
    """The last row of each run key whose status is ``ok``, in file order."""
    last: dict[str, dict] = {}
    for r in rows:
        if r.get("status") == "ok":
            last[r["key"]] = r
    return list(last.values())


def _fmt(x, spec: str = ".3f", scale: float = 1.0, none: str = "-") -> str:
    if x is None:
        return none
    try:
        return format(x * scale, spec)
    except (TypeError, ValueError):
        return str(x)


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    g: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        g[(r["model"], r["task"])].append(r)
    for v in g.values():
        v.sort(key=lambda r: (r["method"] != "dense", r["label"], -float(r["keep"])))
    return g


def _overhead(lat: dict) -> str:
    """Selection time as a share of the prefill time the pruning saved ("-" if it saved none)."""
    saved = lat.get("saved_s")
    return "-" if not saved or saved <= 0 else _fmt(lat["select_s"] / saved, ".1%")


def table(rows: list[dict]) -> str:
    """A markdown table of one (model, task): the primary metric first, then cost vs dense."""
    metric = rows[0]["metric"]
    lm = any(r["latency"].get("decode_tps") is not None for r in rows)
    agree = "KL / top-1" if "kl" in rows[0]["quality"] else "cosine / top-1"
    head = ["method", "keep", metric, "retention", agree, "tokens kept", "params kept", "prefill ms",
            "vs dense", "FLOPs vs dense", "GFLOPs", "peak MB", "select ms", "select / saved"]  # fmt: skip
    if lm:
        head[10:10] = ["decode tok/s", "KV MB"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        q, lat, mem = r["quality"], r["latency"], r["memory"]
        a = (f"{_fmt(q.get('kl'))} / {_fmt(q.get('top1_agree'), '.2f')}" if "kl" in q
             else f"{_fmt(q.get('cosine'), '.4f')} / {_fmt(q.get('top1_agree'), '.2f')}")  # fmt: skip
        cells = [
            r["label"], "-" if r["method"] == "dense" else str(r["keep"]), _fmt(q.get(metric)),
            _fmt(r.get("retention"), ".1%"), a, _fmt(r["tokens_kept"], ".0%"), _fmt(r["params_kept"], ".0%"),
            _fmt(lat["prefill_s"], ".1f", 1e3), _fmt(lat["prefill_ratio"], ".2f") + "x",
            _fmt(r["flops"].get("ratio"), ".2f") + "x",
            _fmt(r["flops"]["prefill"], ".2f", 1e-9), _fmt(mem["peak_bytes"], ".0f", 2**-20),
            _fmt(lat["select_s"], ".2f", 1e3), _overhead(lat),
        ]  # fmt: skip
        if lm:
            cells[10:10] = [_fmt(lat.get("decode_tps"), ".1f"), _fmt(mem["kv_bytes"], ".1f", 2**-20)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(rows: list[dict], path: pathlib.Path) -> pathlib.Path | None:
    """Two panels: the task metric vs prefill latency (x dense) and vs the fraction kept."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric = rows[0]["metric"]
    # weight methods change the non-zero count between runs; a dense checkpoint may hold exact zeros
    kept = [r["params_kept"] for r in rows]
    weights = max(kept) - min(kept) > 1e-3
    xkey, xlabel = ("params_kept", "parameters kept") if weights else ("tokens_kept", "tokens kept")
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["label"]].append(r)
    many = len(by_method) > 9  # beyond one colour cycle: a legend outside, markers and dashes vary
    fig, axes = plt.subplots(1, 2, figsize=(13 if many else 10, 4.5 if many else 4), constrained_layout=True)
    markers, dashes = "os^vDP*Xh<>", ("-", "--", ":", "-.")
    for j, (label, rs) in enumerate(by_method.items()):
        pts = sorted(rs, key=lambda r: r[xkey])
        ys = [r["quality"][metric] for r in pts]
        if label == "dense":
            for ax, x in zip(axes, (1.0, 1.0), strict=True):
                ax.scatter([x], ys[:1], marker="*", s=180, color="black", zorder=5, label="dense")
            continue
        style = {"marker": markers[j % len(markers)], "linestyle": dashes[(j // 10) % len(dashes)]}
        axes[0].plot([r["latency"]["prefill_ratio"] for r in pts], ys, label=label, **style)
        axes[1].plot([r[xkey] for r in pts], ys, label=label, **style)
    better = "higher is better" if rows[0]["higher_is_better"] else "lower is better"
    axes[0].set_xlabel("prefill latency (x dense, median of interleaved runs)")
    axes[1].set_xlabel(xlabel)
    for ax in axes:
        ax.set_ylabel(f"{metric} ({better})")
        ax.grid(alpha=0.3)
    if many:
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        axes[1].legend(fontsize=8)
    fig.suptitle(f"{rows[0]['model']} · {rows[0]['task']} (n={rows[0]['n_examples']})")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: str | pathlib.Path, out_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Write ``report.md`` and ``pareto_<model>_<task>.png`` next to the results file."""
    results = pathlib.Path(results)
    out = pathlib.Path(out_dir) if out_dir else results.parent
    out.mkdir(parents=True, exist_ok=True)
    all_rows = read_results(results)
    rows = latest_ok(all_rows)
    lines = ["# prunekit bench report", ""]
    if rows:
        env = rows[-1]["env"]
        lines += [
            f"prunekit {env['prunekit']}, torch {env['torch']}, transformers {env['transformers']}; "
            f"{env['device_name']}, {env['threads']} threads; device `{rows[-1]['device']}`, "
            f"dtype `{rows[-1]['dtype']}`.",
            "",
            f"Results: `{results.name}` ({len(rows)} runs). Latency: median of interleaved dense/pruned "
            "calls after a warm-up on the task's timing batch; decode tok/s from `generate()`; "
            "peak memory above the level before the call "
            f"({rows[-1]['memory']['how']}); FLOPs counted from the shapes of the matmuls and attention "
            "actually run; select ms = the method's own selection time per call.",
            "",
        ]
    for (model, task), rs in _groups(rows).items():
        safe = f"{model}_{task}".replace("/", "--")
        png = plot(rs, out / f"pareto_{safe}.png")
        lines += [f"## {model} · {task}", "", table(rs), ""]
        if png is not None:
            lines += [f"![{model} {task}]({png.name})", ""]
    ok = {r["key"] for r in rows}
    na = {r["key"]: r for r in all_rows if r.get("status") in ("n/a", "error") and r["key"] not in ok}
    if na:
        lines += ["## Not run", ""]
        for r in na.values():
            lines.append(
                f"- {r['model']} · {r['task']} · {r['label']} keep={r['keep']}: {r['status']}: {r['reason']}"
            )
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
