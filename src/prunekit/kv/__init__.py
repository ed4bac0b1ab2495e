"""KV-cache compression: ``compress_kv`` and one file per method under ``methods/``; SpAtten's
progressive quantisation of the attention (``progressive_quantization``)."""

from .context import KVContext, KVMethod
from .engine import KVSession, compress_kv
from .quantize import PQStats


def progressive_quantization(
    model, total_bits: int = 12, msb_bits: int = 6, threshold: float = 0.1, stats: PQStats | None = None
):
    """SpAtten's progressive quantisation around a model (a context manager yielding
    :class:`PQStats`): see :mod:`prunekit.kv.quantize`."""
    from ..models.pq_attention import progressive_quantization as pq

    return pq(model, total_bits, msb_bits, threshold, stats)


__all__ = ["KVContext", "KVMethod", "KVSession", "PQStats", "compress_kv", "progressive_quantization"]
