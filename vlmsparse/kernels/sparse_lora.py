"""Triton SparseLoRA kernels for a dense-stored frozen weight with an unstructured bool keep-mask.

Math (``x [..., K]``, ``W [N, K]`` frozen, ``M [N, K]`` bool, ``A [r, K]``, ``B [N, r]``, ``s = scaling``):

- :func:`sparse_lora_forward`:  ``y = x @ (W*M + s*(B@A)*M).T + b``
- :func:`sparse_lora_backward`: ``dX = dY @ (W*M + s*(B@A)*M)``; with ``G = dY.T @ X``:
  ``dB = s * (G*M) @ A.T``, ``dA = s * B.T @ (G*M)``.

Neither the effective weight nor ``G`` is ever written to memory: each ``[BLOCK_N, BLOCK_K]`` tile of
``W``, ``M`` is loaded, the matching ``B@A`` tile is a rank-``r`` dot in registers, masked and used at once;
``G`` is formed tile by tile (a loop over the tokens) and contracted with ``A`` and ``B`` in the same program.
So a training step keeps no full-size tensor alive besides the frozen ``W`` and ``M`` themselves. ``W`` may
have any strides (a stride-0 zero weight gives the adapter-only term). The ``@triton.jit`` kernels are shared
with the packed 2:4 variant and live in :mod:`vlmsparse.kernels._fused` (constexpr ``PACKED=False``).
Pure-torch twins: ``sparse_lora_*_ref`` in :mod:`vlmsparse.kernels.reference`.
"""

from __future__ import annotations

import torch

from ._fused import TileConfig, fused_backward, fused_forward
from .checks import check_kernel_inputs, check_mask

__all__ = ["sparse_lora_forward", "sparse_lora_backward"]


def sparse_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """``y [..., N] = x @ (W*M + s*(B@A)*M).T + b`` for ``x [..., K]`` (``W*M`` when there is no adapter)."""
    n, k = check_mask(weight, mask, "sparse_lora_forward")
    check_kernel_inputs("sparse_lora_forward", x, weight, mask, n, k, lora_A, lora_B, bias)
    return fused_forward(x, weight, mask.view(torch.uint8), n, False, lora_A, lora_B, scaling, bias, config)


def sparse_lora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    need_input_grad: bool = True,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dX [..., K] or None, dA [r, K], dB [N, r])`` for ``grad_out [..., N]`` and ``x [..., K]``."""
    n, k = check_mask(weight, mask, "sparse_lora_backward")
    check_kernel_inputs("sparse_lora_backward", x, weight, mask, n, k, lora_A, lora_B, grad_out=grad_out,
                        lora_optional=False)
    return fused_backward(grad_out, x, weight, mask.view(torch.uint8), False, lora_A, lora_B, scaling,
                          need_input_grad, config)
