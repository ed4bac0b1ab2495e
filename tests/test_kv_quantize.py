"""SpAtten's progressive quantisation: hand-worked codes and bytes, the two passes against plain
attention, and the model restored after the context manager."""

from __future__ import annotations

import pytest
import torch

from prunekit.kv import progressive_quantization
from prunekit.kv.quantize import PQStats, msb_dequantize, progressive_attention, quantize
from tiny import DECODERS


def test_msb_codes_by_hand():
    codes, scale = torch.tensor([5.0, -5.0, 12.0]), torch.tensor(1.0)
    # lsb_bits=2: floor(c / 4) * 4, read at the middle of the dropped range (+1.5)
    assert msb_dequantize(codes, scale, 2).tolist() == [5.5, -6.5, 13.5]
    c, s = quantize(torch.tensor([[0.6, -1.0, 0.25]]), 4)  # qmax 7, scale 1/7: 4.2, -7, 1.75
    assert c.tolist() == [[4.0, -7.0, 2.0]] and s.item() == pytest.approx(1 / 7)


def plain(q, k, v, valid, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    return s.masked_fill(~valid, float("-inf")).softmax(-1) @ v


def case(seed=0, Lq=3, Lk=5, D=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, L, D, generator=g) for L in (Lq, Lk, Lk))
    valid = torch.ones(2, 1, Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    return q, k, v, valid


def test_two_passes_against_plain_attention():
    q, k, v, valid = case()
    exact = plain(q, k, v, valid, 0.35)
    # threshold 1: every row refetches -> full 16-bit precision, close to float attention
    st = PQStats()
    full = progressive_attention(q, k, v, valid, 0.35, total_bits=16, msb_bits=8, threshold=1.0, stats=st)
    assert st.refetch_fraction == 1.0
    assert (full - exact).abs().max() < 1e-3
    # threshold 0: nobody refetches -> the 4 MSBs only, visibly coarser than 12 bits
    st0 = PQStats()
    coarse = progressive_attention(q, k, v, valid, 0.35, total_bits=12, msb_bits=4, threshold=0.0, stats=st0)
    fine = progressive_attention(q, k, v, valid, 0.35, total_bits=12, msb_bits=4, threshold=1.0)
    assert st0.refetched == 0 and st0.lsb_bytes == 0
    assert (coarse - exact).abs().max() > 5 * (fine - exact).abs().max()
    # in between: exactly the unconfident rows take the fine result
    mid = progressive_attention(q, k, v, valid, 0.35, total_bits=12, msb_bits=4, threshold=0.5)
    kc, ks = quantize(k, 12)
    p = (
        (q @ msb_dequantize(kc, ks, 8).transpose(-1, -2) * 0.35)
        .masked_fill(~valid, float("-inf"))
        .softmax(-1)
    )
    low = p.amax(-1) < 0.5
    assert torch.equal(mid[low], fine[low]) and torch.equal(mid[~low], coarse[~low])


def test_bytes_by_hand():
    q, k, v, _ = case(Lq=1, Lk=4, D=2)
    valid = torch.ones(2, 1, 1, 4, dtype=torch.bool)
    st = PQStats()
    progressive_attention(q, k, v, valid, 1.0, total_bits=12, msb_bits=6, threshold=1.0, stats=st)
    # 2 x 2 rows, each 4 keys x (keys + values: 2 x 2 dims) x 6 bits = 4 * 4 * 6 / 8 = 12 bytes of MSBs
    assert st.rows == 4 and st.msb_bytes == 48 and st.lsb_bytes == 48 and st.fp16_bytes == 128
    assert st.full_bytes == 96


def test_model_runs_and_is_restored():
    model = DECODERS["llama"]("sdpa").eval()
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    dense = model(input_ids=ids).logits
    with progressive_quantization(model, total_bits=16, msb_bits=8, threshold=1.0) as st:
        out = model(input_ids=ids).logits
        gen = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert (out - dense).abs().max() < 1e-2
    # every row refetches but the first token's (it sees only itself, p = 1): 2 samples x 4 heads x
    # 4 layers, in the plain forward and in generate's prefill
    assert st.rows > 0 and st.rows - st.refetched == 2 * (2 * 4 * 4)
    assert gen.shape == (2, 15)
    assert model.config._attn_implementation == "sdpa"
    assert not any("_prunekit_pq" in vars(m) for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"), progressive_quantization(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(model(input_ids=ids).logits, dense)
    with pytest.raises(ValueError, match="msb_bits"):
        progressive_quantization(model, msb_bits=12).__enter__()
