"""Weight pruning: criterion x structure x allocation x compensation, calibrated layer by layer.

>>> pruned = prunekit.prune_weights(model, "sparsegpt", 0.5, pattern="2:4", tokenizer=tok)
>>> pruned.report.layer_sparsity; pruned.restore()  # or pruned.finalize() to make it permanent

Structured methods (``flap``, ``cfsp``, ``llm_pruner``, ``shortgpt``, ``wanda_sp``,
``magnitude_sp``, ``random_sp``, and ``slicegpt``, which slices the hidden size) go through the
same call and make the model physically smaller at ``finalize()``; ``prunekit.load_pruned``
reloads the saved checkpoint.
"""

from .engine import LinearReport, WeightPruning, WeightReport, prune_weights
from .method import WeightMethod
from .structured_engine import StructuredPruning, StructuredReport
from .structures import Pattern, keep_mask, parse_pattern

__all__ = [
    "LinearReport",
    "Pattern",
    "StructuredPruning",
    "StructuredReport",
    "WeightMethod",
    "WeightPruning",
    "WeightReport",
    "keep_mask",
    "parse_pattern",
    "prune_weights",
]
