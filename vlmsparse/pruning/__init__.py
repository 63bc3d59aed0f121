"""Per-layer pruning algorithms on tensors (layer 3): calibration statistics, magnitude, Wanda, SparseGPT.

Protocol: ``stats = InputStats(in_features, hessian=...)``; ``stats.add_batch(x, token_mask)`` for every
calibration batch; ``prune_layer(weight, stats, method, pattern)`` -> ``.weight``, ``.mask``.
OWL's layer-wise sparsities: ``outlier_ratio`` per block, then ``owl_sparsities``.
"""

from .algorithms import check_weight, magnitude_prune, sparsegpt_prune, wanda_prune
from .layer import METHODS, LayerPruneResult, prune_layer
from .owl import outlier_ratio, owl_sparsities
from .stats import InputStats

__all__ = [
    "METHODS",
    "InputStats",
    "LayerPruneResult",
    "check_weight",
    "magnitude_prune",
    "outlier_ratio",
    "owl_sparsities",
    "prune_layer",
    "sparsegpt_prune",
    "wanda_prune",
]
