"""FTP prefill latency on SmolLM2-135M against dense, interleaved in one process (1 thread by
default): the static router (no attention features needed) and a router (its features cost one
extra q k^T + softmax per routed block), kv="drop" and "keep", at the uniform schedules of
``--sparsities``. Appends JSON lines to ``--out``. Run:
    PYTHONPATH=src python benchmarks/ftp_speed.py
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from ftp_smollm2 import _prefill

from prunekit import zoo
from prunekit.bench.measure import interleaved_latency
from prunekit.tokens import ftp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.22, 0.30])
    p.add_argument("--len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/ftp_smollm2_speed.jsonl")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, _ = zoo.smollm2(torch.float32)
    model.eval()
    x = torch.randint(3, 40000, (1, a.len), generator=torch.Generator().manual_seed(0))
    router = ftp.FTPRouter(seed=0)

    def run(cfg):
        return _prefill(model, x, cfg)

    L = len(model.model.layers)
    for s in a.sparsities:
        sched = ftp.uniform_schedule(L, s)
        fns = {"dense": run(None)}
        for r in ("static", "router"):
            for kv in ("drop", "keep"):
                fns[f"{r}/{kv}"] = run((router if r == "router" else "static", sched, kv))
        t = interleaved_latency(fns, repeats=a.repeats)
        dense = statistics.median(t["dense"])
        row = {"sparsity": s, "len": a.len, "threads": a.threads, "repeats": a.repeats, "dense_s": dense}
        row.update({f"speedup_{k}": dense / statistics.median(v) for k, v in t.items() if k != "dense"})
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
