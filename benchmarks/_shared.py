"""Pieces every benchmark script repeats: JSON-lines rows (resumable runs), mean ± sd over seeds,
the markdown table written next to ``--out``, and matplotlib without a display.

The scripts run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and they
``import _shared``.
"""

from __future__ import annotations

import json
import pathlib
import statistics


def rows(path: pathlib.Path) -> list[dict]:
    """The JSON-lines rows already in ``path`` (none when it does not exist); blank lines skipped."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def done_keys(path: pathlib.Path, key: str = "key") -> set:
    """The ``key`` of every row in ``path``: what a resumed run skips."""
    return {r[key] for r in rows(path)}


def append(path: pathlib.Path, row: dict) -> None:
    """Write one row as it is produced, so an interrupted run resumes where it stopped."""
    with pathlib.Path(path).open("a") as f:
        f.write(json.dumps(row) + "\n")


def mean_sd(vals) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) over seeds."""
    vals = list(vals)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def write_table(out: pathlib.Path, lines: list[str]) -> None:
    """Write the markdown ``lines`` next to ``out`` (``.md``) and print them."""
    text = "\n".join(lines)
    pathlib.Path(out).with_suffix(".md").write_text(text + "\n")
    print(text)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (with a hint) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install prunekit[bench])")
        return None
    return plt
