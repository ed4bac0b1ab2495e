"""Importance of each weight of a Linear ``W (out, in)``: the *criterion* part of a weight method.
Pure tensor functions; higher = more important."""

from __future__ import annotations

import torch


def magnitude(W: torch.Tensor) -> torch.Tensor:
    """``|W|``."""
    return W.abs().float()


def wanda(W: torch.Tensor, x_norm: torch.Tensor) -> torch.Tensor:
    """Wanda: ``|W_ij| * ||X_j||_2``, ``x_norm (in,)`` the norm of input feature j over all
    calibration tokens (Sun et al., "A Simple and Effective Pruning Approach for LLMs")."""
    return W.abs().float() * x_norm.float()[None, :]


def gblm(W: torch.Tensor, x_norm: torch.Tensor | None, grad_norm: torch.Tensor) -> torch.Tensor:
    """GBLM-Pruner: ``|W| * G`` (first-order Taylor term with ``G`` the l2 norm over calibration
    samples of the scaled per-sample gradients), plus Wanda's ``|W| * ||X||`` when ``x_norm`` is
    given (Das et al., "Beyond Size: How Gradients Shape Pruning Decisions in LLMs")."""
    score = W.abs().float() * grad_norm.float()
    if x_norm is not None:
        score = score + wanda(W, x_norm)
    return score
