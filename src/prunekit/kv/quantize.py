"""SpAtten's progressive quantisation in software (Wang et al., "SpAtten: Efficient Sparse Attention
Architecture with Cascade Token and Head Pruning", HPCA 2021, Sec. on progressive quantisation).

Keys and values are stored as ``total_bits`` integers (symmetric, one scale per token and head).
Attention is first computed from the ``msb_bits`` most significant bits only; a query row whose
largest attention probability is below ``threshold`` (a flat, unconfident distribution, where
rounding errors matter most) fetches the remaining ``total_bits - msb_bits`` bits and is
recomputed at full precision. Confident rows keep the MSB-only result. The bytes each row would
move from memory (MSBs for every row, LSBs for the refetched ones) are counted, next to what a
``total_bits`` fetch and an fp16 fetch would move.

The paper's exact bit split and threshold per task are not reproduced (**unconfirmed**): the
defaults here are 12 bits with 6 MSBs, threshold 0.1. The MSB-only values are dequantised at the
middle of the truncated range (truncating alone would bias every value towards -inf).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PQStats:
    rows: int = 0  # query rows x heads attended
    refetched: int = 0  # of them, rows that fetched the LSBs
    msb_bytes: float = 0.0
    lsb_bytes: float = 0.0
    full_bytes: float = 0.0  # a plain total_bits fetch of the same keys and values
    fp16_bytes: float = 0.0

    @property
    def moved_bytes(self) -> float:
        return self.msb_bytes + self.lsb_bytes

    @property
    def refetch_fraction(self) -> float:
        return self.refetched / self.rows if self.rows else 0.0

    def to_dict(self) -> dict:
        return {
            "rows": self.rows, "refetched": self.refetched, "refetch_fraction": self.refetch_fraction,
            "moved_bytes": self.moved_bytes, "full_bytes": self.full_bytes, "fp16_bytes": self.fp16_bytes,
            "moved_vs_fp16": self.moved_bytes / self.fp16_bytes if self.fp16_bytes else None,
        }  # fmt: skip


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer codes of ``x`` with one scale per vector (last dim): ``(codes, scale)``."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    return torch.round(x / scale).clamp(-qmax, qmax), scale


def msb_dequantize(codes: torch.Tensor, scale: torch.Tensor, lsb_bits: int) -> torch.Tensor:
    """The value the MSBs alone give: the codes with their ``lsb_bits`` low bits dropped, read at
    the middle of the dropped range."""
    step = 2**lsb_bits
    high = torch.div(codes, step, rounding_mode="floor") * step
    return (high + (step - 1) / 2) * scale


def progressive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor,
    scale: float,
    total_bits: int = 12,
    msb_bits: int = 6,
    threshold: float = 0.1,
    stats: PQStats | None = None,
) -> torch.Tensor:
    """Two-pass attention. ``q (B, H, Lq, D)``, ``k, v (B, H, Lk, D)`` (KV heads already repeated
    for GQA), ``key_valid (B, 1|H, Lq, Lk)`` bool (causal and padding). Returns ``(B, H, Lq, D)``."""
    if not 0 < msb_bits < total_bits:
        raise ValueError(f"msb_bits must be in (0, total_bits={total_bits}); got {msb_bits}")
    lsb_bits = total_bits - msb_bits
    kc, ks = quantize(k.float(), total_bits)
    vc, vs = quantize(v.float(), total_bits)
    qf = q.float()

    def attend(kd: torch.Tensor, vd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = (qf @ kd.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
        p = s.masked_fill(~key_valid, float("-inf")).softmax(-1).nan_to_num(0.0)
        return p @ vd, p

    out_msb, p = attend(msb_dequantize(kc, ks, lsb_bits), msb_dequantize(vc, vs, lsb_bits))
    low = p.amax(-1) < threshold  # (B, H, Lq): not confident
    out_full, _ = attend(kc * ks, vc * vs)
    out = torch.where(low[..., None], out_full, out_msb)
    if stats is not None:
        n_keys = key_valid.expand(*low.shape, key_valid.shape[-1]).sum(-1).double()  # (B, H, Lq)
        per_bit = 2 * k.shape[-1] / 8  # keys and values, bytes per bit of width
        stats.rows += low.numel()
        stats.refetched += int(low.sum())
        stats.msb_bytes += float(n_keys.sum()) * per_bit * msb_bits
        stats.lsb_bytes += float(n_keys[low].sum()) * per_bit * lsb_bits
        stats.full_bytes += float(n_keys.sum()) * per_bit * total_bits
        stats.fp16_bytes += float(n_keys.sum()) * per_bit * 16
    return out.to(q.dtype)
