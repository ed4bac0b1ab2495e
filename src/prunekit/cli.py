"""``prunekit`` command line: ``prunekit methods``, ``prunekit demo``."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def cmd_methods(args: argparse.Namespace) -> int:
    from .registry import methods

    infos = methods(args.family)
    if args.json:
        for m in infos:
            print(json.dumps(m.row()))
        return 0
    rows = [
        [
            m.name,
            m.family,
            ",".join(m.stages),
            ",".join(m.signals) or "-",
            "yes" if m.trains else "no",
            m.paper,
        ]
        for m in infos
    ]
    print(_table(rows, ["name", "family", "stages", "signals", "trains", "paper"]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .registry import get

    m = get(args.method)
    for key, value in m.row().items():
        print(f"{key:8} {', '.join(value) if isinstance(value, list) else value}")
    if m.summary:
        print(f"{'summary':8} {m.summary}")
    doc = (m.factory.__module__ and __import__(m.factory.__module__, fromlist=["_"]).__doc__) or ""
    print("\n" + doc.strip())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    run(out=args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prunekit", description="Pruning for transformers without retraining.")
    p.add_argument("--version", action="version", version=f"prunekit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="list every method of the registry")
    m.add_argument("--family", help="only this family (tokens, kv, weights, data, decode)")
    m.add_argument("--json", action="store_true", help="one JSON line per method")
    m.set_defaults(fn=cmd_methods)
    i = sub.add_parser("info", help="one method: its paper, stages, signals and docstring")
    i.add_argument("method")
    i.set_defaults(fn=cmd_info)
    d = sub.add_parser("demo", help="the methods so far on real packaged models, side by side with dense")
    d.add_argument(
        "--out", default="results/demo.jsonl", help="JSON-lines results file (default: %(default)s)"
    )
    d.add_argument("--quick", action="store_true", help="fewer inputs and repeats (a smoke run)")
    d.set_defaults(fn=cmd_demo)
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
