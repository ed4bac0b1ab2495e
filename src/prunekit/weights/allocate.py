"""How the global sparsity is shared among decoder layers: the *allocation* part of a weight method."""

from __future__ import annotations

import torch


def uniform(n_layers: int, sparsity: float) -> list[float]:
    """Every layer at the target sparsity."""
    return [sparsity] * n_layers


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """OWL's layer-wise outlier distribution D_l: the fraction of a layer's Wanda scores (all its
    Linears together) greater than ``m`` times their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def owl(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """OWL (Yin et al., "Outlier Weighed Layerwise Sparsity"): layer densities are the outlier
    ratios min-max normalised to ``[0, 2*lam]``, shifted so their mean is ``1 - sparsity``; layers
    with more outliers are pruned less and the mean sparsity stays at the target. As the official
    code (``prune_wanda_outlier``), the normalisation uses the min and max over layers."""
    if not 0.0 <= lam < 0.5:
        raise ValueError(f"OWL's lam must be in [0, 0.5); got {lam}")
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0.0:
        return uniform(len(ratios), sparsity)
    density = (r - r.min()) / spread * (2 * lam)
    density = density - density.mean() + (1.0 - sparsity)
    out = (1.0 - density).tolist()
    if min(out) < 0.0 or max(out) >= 1.0:
        raise ValueError(
            f"OWL with lam={lam} at sparsity {sparsity} gives layer sparsities outside [0, 1) "
            f"({min(out):.3f}..{max(out):.3f}); lower lam"
        )
    return out
