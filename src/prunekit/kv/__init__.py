"""KV-cache compression: ``compress_kv`` and one file per method under ``methods/``."""

from .context import KVContext, KVMethod
from .engine import KVSession, compress_kv

__all__ = ["KVContext", "KVMethod", "KVSession", "compress_kv"]
