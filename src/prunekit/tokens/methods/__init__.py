"""One file per token-pruning method; each registers itself in ``prunekit.registry``."""
