"""SparseGPT's mask selection and weight update (Frantar & Alistarh, "SparseGPT: Massive Language
Models Can Be Accurately Pruned in One-Shot") — the *compensation* part of a weight method.

Follows the official ``SparseGPT.fasterprune``: dampened Hessian ``H + 0.01 * mean(diag H) * I``,
the upper Cholesky factor of ``H^-1``, blocks of 128 columns, adaptive mask selection per block by
the OBS saliency ``w^2 / [H^-1]_jj^2`` (every saliency up to the block's ``int(numel * sparsity)``-th
smallest, over all rows, so rows may differ and a block loses one weight more than the exact
fraction, as in the official code and llm-compressor) or N:M per group, and lazy batched error
propagation to later blocks.

The loop over the columns of a block is the algorithm itself (each column's error updates the
next); every step is vectorised over the rows.
"""

from __future__ import annotations

import torch

from .structures import Pattern


def sparsegpt(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    pattern: Pattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(updated W, keep mask)`` of one Linear ``W (out, in)``, given ``H (in, in)`` proportional
    to ``X^T X`` of its calibration inputs."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    n_in = W.shape[1]
    dead = torch.diag(H) == 0  # inputs never active: no information, prune them for free
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.diag(H).mean()
    H.diagonal().add_(damp)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, n_in, blocksize):
        i2 = min(i1 + blocksize, n_in)
        W1 = W[:, i1:i2].clone()  # (out, b)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if pattern.unstructured and sparsity > 0:
            saliency = W1**2 / d[None, :] ** 2
            # the official rule: prune every saliency <= the value at index int(numel * sparsity) of
            # the sorted block, i.e. one weight (and ties) beyond the exact fraction
            thresh = saliency.flatten().sort().values[int(saliency.numel() * sparsity)]
            mask1 = saliency <= thresh
        for i in range(i2 - i1):
            w = W1[:, i]
            if not pattern.unstructured and i % pattern.m == 0:
                sal = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m][None, :] ** 2
                low = sal.topk(pattern.m - pattern.n, dim=1, largest=False).indices
                mask1.scatter_(1, i + low, True)
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)  # in place: no (out, b) temporary
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, ~pruned
