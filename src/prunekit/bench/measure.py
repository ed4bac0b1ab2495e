"""What a run measures besides quality: latency, memory, KV-cache bytes, FLOPs, parameters kept.

- Latency: dense and pruned callables run in turn (A B A B ...) after a warm-up, medians; on CUDA
  with CUDA events around each call.
- Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the level before the call; on CPU
  the peak of the process's resident memory above its level before the call, sampled every
  millisecond from ``/proc/self/statm`` (large tensors are mmap-ed and returned on free, so the
  peak tracks the forward's working set; approximate, noted as ``rss_sampled``).
- FLOPs: counted from the shapes of every matmul the forward really runs
  (``torch.utils.flop_counter``), plus attention (QK^T and AV, the full square, as the paper
  tables count it), which the counter misses for the CPU SDPA kernel.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_latency(
    fns: dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds of every call of each callable, the variants interleaved after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    cuda = device.startswith("cuda")
    for _ in range(repeats):
        for k, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[k].append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _trim() -> None:
    """glibc's ``malloc_trim(0)``: return the allocator's free pages to the OS (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> tuple[float, str]:
    """``(bytes, how)``: the peak memory ``fn`` needs above what was allocated before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base), "cuda_max_memory_allocated"
    if not os.path.exists("/proc/self/statm"):
        return float("nan"), "unavailable"
    _trim()  # hand freed heap pages back to the OS, else a repeated call reuses them unseen by RSS
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak[0] = max(peak[0], _rss())
    return float(max(peak[0] - base, 0)), "rss_sampled"


def cache_bytes(cache: object) -> int:
    """Bytes held by a transformers ``Cache`` (keys and values of every layer), 0 for ``None``."""
    if cache is None:
        return 0
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _attention_flops(q: torch.Size, k: torch.Size, v: torch.Size) -> int:
    """QK^T and AV of scaled dot-product attention, ``q (B, Hq, Lq, D)``, ``k/v (B, Hkv, Lk, D)``."""
    B, Hq, Lq, D = q
    Lk, Dv = k[-2], v[-1]
    return 2 * B * Hq * Lq * Lk * D + 2 * B * Hq * Lq * Lk * Dv


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matmuls and attention ``fn`` runs (multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    extra = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(aten, name, None)
        if op is not None:
            extra[op] = _sdpa_cpu_flops
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return int(counter.get_total_flops())


def params_kept(model: nn.Module) -> tuple[int, int]:
    """``(nonzero, total)`` weights of the model's ``nn.Linear`` layers (what weight pruning removes)."""
    nz = total = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nz += int(torch.count_nonzero(m.weight))
                total += m.weight.numel()
    return nz, total
