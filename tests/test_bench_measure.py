"""The bench's cost measures against hand formulas: FLOPs, KV-cache bytes, memory, interleaving."""

from __future__ import annotations

import torch

from prunekit.bench import measure
from prunekit.models.compat import output_cache
from tiny import TXT, llama


def _linear_flops_per_token(cfg) -> int:
    d, f, H, Hkv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = d // H
    attn = d * H * hd + 2 * d * Hkv * hd + H * hd * d
    mlp = 3 * d * f
    return 2 * (cfg.num_hidden_layers * (attn + mlp) + d * cfg.vocab_size)


def test_flops_equal_the_hand_formula_for_a_llama_forward():
    model = llama("sdpa")
    cfg = model.config
    B, L = 2, 12
    x = torch.randint(3, 200, (B, L))
    with torch.inference_mode():
        got = measure.count_flops(lambda: model(x))
    H, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    attention = cfg.num_hidden_layers * 2 * (2 * B * H * L * L * hd)  # QK^T and AV, full square
    assert got == B * L * _linear_flops_per_token(cfg) + attention


def test_flops_count_the_same_attention_in_eager_and_sdpa():
    x = torch.randint(3, 200, (1, 9))
    with torch.inference_mode():
        a = measure.count_flops(lambda: llama("sdpa")(x))
        b = measure.count_flops(lambda: llama("eager")(x))
    assert a == b


def test_cache_bytes_of_a_prefill():
    model = llama("sdpa")
    cfg = model.config
    with torch.inference_mode():
        out = model(torch.randint(3, 200, (3, 7)), use_cache=True)
    hd = cfg.hidden_size // cfg.num_attention_heads
    assert (
        measure.cache_bytes(output_cache(out))
        == cfg.num_hidden_layers * 2 * 3 * cfg.num_key_value_heads * 7 * hd * 4
    )
    assert measure.cache_bytes(None) == 0


def test_peak_memory_sees_a_large_temporary_allocation():
    def work():
        t = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched, then freed
        return float(t[-1])

    peak, how = measure.peak_memory(work)
    assert how == "rss_sampled"
    assert peak > 200 * 2**20

    small, _ = measure.peak_memory(lambda: torch.ones(10))
    assert small < 50 * 2**20


def test_peak_memory_sees_a_warmed_up_forward():
    """A repeated forward reuses the heap pages its last call freed, so RSS would barely move (seen:
    ~0 MB for a DINOv2 prefill); the allocator's free pages are handed back first, so it is seen."""
    from prunekit.bench.models import load

    vit = load("tiny-vit").model
    x = torch.randn(16, 3, 224, 224)

    def forward():
        with torch.inference_mode():
            vit(pixel_values=x)

    forward()
    peak, _ = measure.peak_memory(forward)
    assert peak > 4 * 2**20  # attention maps alone: 16 x 2 heads x 257^2 floats = 8.5 MB


def test_latency_calls_are_interleaved_after_warmup():
    calls = []
    times = measure.interleaved_latency({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                        repeats=3, warmup=1)  # fmt: skip
    assert calls == ["a", "b"] * 4
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}


def test_params_kept_counts_zeros_of_linear_weights():
    model = llama("sdpa")
    nz, total = measure.params_kept(model)
    assert nz == total
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, : TXT["hidden_size"] // 2] = 0
    nz2, _ = measure.params_kept(model)
    assert total - nz2 == TXT["intermediate_size"] * (TXT["hidden_size"] // 2)
