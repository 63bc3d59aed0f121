"""torch semi-structured sparse (cuSPARSELt / CUTLASS) as a backend (``"torch24"``): inference only, CUDA only.

- :func:`semi_structured_linear`: ``y = x @ W.T + b`` with ``W`` a torch semi-structured tensor (from
  :func:`vlmsparse.sparse24.to_semi_structured`); leading dims of ``x`` are flattened, as torch requires.
- :func:`packed24_matmul`: the same for a packed 2:4 weight (``values [N, K/2]``, ``meta [N, ceil(K/8)]``),
  unpacked and converted on every call (slow: a module converts once and calls :func:`semi_structured_linear`).
"""

from __future__ import annotations

import torch

from ..sparse24 import Packed24, to_semi_structured, unpack24

__all__ = ["semi_structured_linear", "packed24_matmul"]


def semi_structured_linear(x: torch.Tensor, weight_semi_structured: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y [..., N] = x [..., K] @ W.T + b`` for a semi-structured ``W``."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.nn.functional.linear(x2, weight_semi_structured, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def packed24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ unpack24(values, meta).T + b`` through torch semi-structured (converted per call)."""
    weight = to_semi_structured(unpack24(Packed24(values, meta, x.shape[-1])))
    return semi_structured_linear(x, weight, bias)
