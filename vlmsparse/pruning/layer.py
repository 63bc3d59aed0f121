"""The stable per-layer entry point: ``prune_layer(weight, stats, method, pattern)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sparsity import SparsityPattern, parse_pattern
from .algorithms import magnitude_prune, sparsegpt_prune, wanda_prune
from .stats import InputStats

__all__ = ["METHODS", "LayerPruneResult", "prune_layer"]

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class LayerPruneResult:
    """``weight``: the pruned weight (input dtype, +0.0 where pruned); ``mask``: bool keep-mask ``[out, in]``;
    ``error``: ``||XW^T - XW'^T|| / ||XW^T||`` on the calibration inputs when the stats hold ``X^T X``."""

    weight: torch.Tensor
    mask: torch.Tensor
    pattern: SparsityPattern
    method: str
    error: float | None = None


def prune_layer(
    weight: torch.Tensor,
    stats: InputStats | None,
    method: str,
    pattern: str | float | SparsityPattern,
    scope: str = "row",
    blocksize: int = 128,
    dampening: float = 0.01,
    segments: list[int] | None = None,
) -> LayerPruneResult:
    """Prune one weight ``[out, in]`` (does not modify it; returns a new one).

    ``method``: ``magnitude`` (``stats`` may be None), ``wanda`` (needs ``stats``), ``sparsegpt`` (needs stats
    built with ``hessian=True``). ``scope`` (``row`` / ``matrix``) applies to magnitude and Wanda unstructured
    patterns; SparseGPT selects per column block. ``segments``: see :func:`sparsegpt_prune`.
    """
    if method not in METHODS:
        raise ValueError(f"prune_layer: unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if scope not in ("row", "matrix"):
        raise ValueError(f"prune_layer: scope must be 'row' or 'matrix', got {scope!r}")
    pattern = parse_pattern(pattern)
    if method != "magnitude" and stats is None:
        raise ValueError(f"prune_layer: {method} needs calibration statistics (an InputStats), got None")
    if stats is not None and stats.in_features != weight.shape[-1]:
        raise ValueError(f"prune_layer: stats have {stats.in_features} features, weight has {weight.shape[-1]}")
    with torch.no_grad():
        if method == "magnitude":
            new, mask = magnitude_prune(weight, pattern, scope)
        elif method == "wanda":
            new, mask = wanda_prune(weight, stats.norm, pattern, scope)
        else:
            new, mask = sparsegpt_prune(weight, stats.hessian(), pattern, blocksize, dampening, segments)
        error = stats.reconstruction_error(weight, new) if stats is not None else None
    return LayerPruneResult(new, mask, pattern, method, error)
