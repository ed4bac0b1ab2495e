"""Pruning a model larger than the memory it is given: SmolLM2-135M (fp32, 538 MB of weights) is
pruned by streaming its decoder layers from disk under an address-space cap far below the model's
size, while loading the same model in memory under the same cap fails.

Each part runs in a fresh process that imports everything (including the model class's modules,
by building it on the meta device, without weights) and starts torch's threads, then caps its own
address space (``RLIMIT_AS``) at what it holds then plus ``--cap-mb``. The source checkpoint is
saved in shards (safetensors memory-maps the file it reads, and a mapping counts against the cap);
the calibration token ids are made once by the parent (the tokenizer's thread pool reserves
address space of its own), and the children run with ``MALLOC_ARENA_MAX=2`` (every glibc arena
reserves 64 MB of address space) and a fixed ``MALLOC_MMAP_THRESHOLD_`` of 1 MB (glibc otherwise
raises it after large frees and then serves layer-sized blocks from fragmented arenas: the same
run then needed 55 to 290 MB of address space from one try to the next).

Run: PYTHONPATH=src python benchmarks/weights_stream.py [--cap-mb 350] [--method wanda]
Prints one JSON line per part and checks that the streamed result equals in-memory pruning.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path("runs/weights/stream")


def child(part: str, cap_mb: int, method: str, samples: int) -> None:
    import resource
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from prunekit.bench.measure import _rss
    from prunekit.models.streaming import DiskModel
    from prunekit.weights.stream import prune_checkpoint

    DiskModel(ROOT / "src")  # imports the model's modules (transformers imports them lazily), no weights
    torch.ones(256, 256) @ torch.ones(256, 256)  # starts torch's thread pool
    with open("/proc/self/status") as f:
        vm = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize"))
    limit = vm + cap_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    row = {"part": part, "cap_mb": cap_mb, "address_space_after_imports_mb": vm / 2**20}
    rss0 = _rss()
    t0 = time.perf_counter()
    try:
        if part == "stream":
            from safetensors.torch import load_file

            ids = load_file(ROOT / "calibration.safetensors")["ids"]
            rep = prune_checkpoint(ROOT / "src", ROOT / "out", method, 0.5, calibration=ids, progress=False)
            row |= {"ok": True, "report": str(rep), "peak_rss_above_start_mb": rep.peak_memory_bytes / 2**20}
        else:
            model = AutoModelForCausalLM.from_pretrained(ROOT / "src", dtype=torch.float32)
            row |= {"ok": True, "params": sum(p.numel() for p in model.parameters())}
    except MemoryError as e:
        row |= {"ok": False, "error": f"MemoryError: {e}"[:200]}
    except RuntimeError as e:  # torch reports a failed allocation as RuntimeError
        row |= {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}
    with open("/proc/self/status") as f:
        vm_end = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmSize"))
    row |= {"seconds": time.perf_counter() - t0, "rss_growth_mb": (_rss() - rss0) / 2**20,
            "address_space_growth_mb": (vm_end - vm) / 2**20}  # fmt: skip
    print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cap-mb", type=int, default=350)
    p.add_argument("--method", default="wanda")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a.child, a.cap_mb, a.method, a.samples)
    import torch

    import prunekit
    from prunekit.bench.models import _smollm2

    loaded = _smollm2(torch.float32)
    src = ROOT / "src"
    if not (src / "model.safetensors.index.json").exists():
        loaded.model.save_pretrained(src, max_shard_size="40MB")
        loaded.tokenizer.save_pretrained(src)
    from safetensors.torch import save_file

    from prunekit.weights.calibration import calibration_ids

    ids = calibration_ids(loaded.tokenizer, None, a.samples, 512)
    save_file({"ids": ids}, ROOT / "calibration.safetensors")
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(
        json.dumps({"model": "smollm2-135m fp32", "weights_mb": size / 2**20, "cap_mb": a.cap_mb}), flush=True
    )
    for part in ("in-memory load", "stream"):
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": str(2**20),
               "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        subprocess.run([sys.executable, __file__, "--child", part, "--cap-mb", str(a.cap_mb),
                        "--method", a.method, "--samples", str(a.samples)], check=True, env=env)  # fmt: skip
    # the streamed checkpoint equals pruning in memory, bit for bit
    from transformers import AutoModelForCausalLM

    pr = prunekit.prune_weights(loaded.model, a.method, 0.5, calibration=ids, progress=False)
    pr.finalize()
    streamed = AutoModelForCausalLM.from_pretrained(ROOT / "out", dtype=torch.float32).state_dict()
    mine = loaded.model.state_dict()
    same = all(torch.equal(streamed[k], v) for k, v in mine.items())
    differ = sum(int((streamed[k] != v).sum()) for k, v in mine.items())
    zeros = sum(int(((streamed[k] == 0) != (v == 0)).sum()) for k, v in mine.items())
    total = sum(v.numel() for v in mine.values())
    # the child and this process may round differently (buffer alignment changes the kernels'
    # summation order), which can flip a mask where two scores tie to the last bit
    print(json.dumps({"streamed_equals_in_memory": same, "tensors": len(mine), "weights_differing": differ,
                      "masks_differing": zeros, "weights": total}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
