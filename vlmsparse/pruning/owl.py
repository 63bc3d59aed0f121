"""OWL (outlier-weighted layer-wise sparsity) on tensors (layer 3: depends on nothing but torch).

For block ``l`` with Wanda scores ``A = |W_ij| * ||X_j||_2`` of all its linears taken together:

- outlier ratio ``D_l = #{A > M * mean(A)} / #A``  (one mean over the whole block, not one per linear);
- spread ``S_l = (D_l - min D) / (max D - min D) * 2 lambda``  (in ``[0, 2 lambda]``);
- sparsity ``s_l = s - (S_l - mean S)``: more outliers -> denser, and the mean over blocks is the target ``s``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["outlier_ratio", "owl_sparsities"]


@torch.no_grad()
def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """Fraction of the entries of ``scores`` (the Wanda scores of one block's linears, any shapes) above
    ``threshold`` x their joint mean. Empty input gives 0."""
    if threshold <= 0:
        raise ValueError(f"outlier_ratio: threshold (OWL's M) must be > 0, got {threshold}")
    total = sum(s.numel() for s in scores)
    if total == 0:
        return 0.0
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    above = sum(int((s > threshold * mean).sum()) for s in scores)
    return above / total


def owl_sparsities(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """Per-block sparsities from the blocks' outlier ratios; mean ``target``, spread ``2 lam`` wide.

    All blocks get ``target`` when there are fewer than two or all ratios are equal (the reference divides by
    zero there). Results are clamped to ``[0, 0.99]`` (the reference sets <= 0 to 0.01); only a ``target``
    below ``2 lam`` or above ``0.99 - 2 lam`` can reach the clamp, and then the mean is no longer ``target``.
    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"owl_sparsities: target sparsity must be in [0, 1), got {target}")
    if not 0.0 <= lam < 0.5:
        raise ValueError(f"owl_sparsities: lambda must be in [0, 0.5), got {lam}")
    values = torch.tensor([float(r) for r in ratios], dtype=torch.float64)
    if len(values) < 2 or float(values.max() - values.min()) == 0:
        return [float(target)] * len(values)
    spread = (values - values.min()) / (values.max() - values.min()) * (2 * lam)
    sparsity = target - (spread - spread.mean())
    return [float(min(max(s, 0.0), 0.99)) for s in sparsity]
