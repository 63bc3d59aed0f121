"""Triton kernels over the packed 2:4 format (values + 2-bit indices), with the LoRA update fused in.

Weight format (:mod:`vlmsparse.sparse24`): ``values [N, K/2]`` (the two kept entries of each group of 4
inputs), ``meta [N, ceil(K/8)]`` uint8 (nibble ``i0 | i1 << 2`` per group, group ``g`` in byte ``g // 2``,
low nibble for even ``g``); ``W[n, 4g + i0] = values[n, 2g]``, ``W[n, 4g + i1] = values[n, 2g + 1]``.
``M24`` is the 2:4 keep-pattern the indices describe.

Math (``x [..., K]``, ``A [r, K]``, ``B [N, r]``, ``s = scaling``):

- :func:`packed24_matmul`:        ``y = x @ unpack24(Wp).T + b``
- :func:`packed24_lora_forward`:  ``y = x @ (unpack24(Wp) + s*(B@A)*M24).T + b``; the ``B@A`` tile is a
  rank-``r`` dot per ``[BLOCK_N, BLOCK_K]`` weight tile, masked with the 2:4 pattern in registers, never
  written to memory.
- :func:`packed24_lora_backward`: ``dX = dY @ W_eff``; ``G = dY.T @ X`` formed tile by tile,
  ``dB = s * (G*M24) @ A.T``, ``dA = s * B.T @ (G*M24)`` without writing ``G``.

The weight is decompressed in registers and multiplied with a dense ``tl.dot`` (Triton has no sparse
tensor-core instruction): the gain is bandwidth (9/16 of the dense fp16 bytes), which is what decode
(``T <= 16`` tokens) is bound by; the launcher splits along N and K for that case. The kernels themselves
(``@triton.jit``) are shared with the dense-stored variant and live in :mod:`vlmsparse.kernels._fused`
(constexpr ``PACKED=True``). Pure-torch twins: ``*_ref`` in :mod:`vlmsparse.kernels.reference`.
"""

from __future__ import annotations

import torch

from ._fused import TileConfig, fused_backward, fused_forward
from .checks import check_kernel_inputs, check_packed

__all__ = ["packed24_matmul", "packed24_lora_forward", "packed24_lora_backward"]


def packed24_matmul(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """``y [..., N] = x @ unpack24(values, meta).T + b`` for ``x [..., K]``. ``config`` overrides the tiles."""
    k = x.shape[-1]
    n = check_packed(values, meta, k, "packed24_matmul")
    check_kernel_inputs("packed24_matmul", x, values, meta, n, k, None, None, bias)
    return fused_forward(x, values, meta, n, True, None, None, 0.0, bias, config)


def packed24_lora_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """``y [..., N] = x @ (unpack24(Wp) + s*(B@A)*M24).T + b`` for ``x [..., K]``, ``A [r, K]``, ``B [N, r]``."""
    k = x.shape[-1]
    n = check_packed(values, meta, k, "packed24_lora_forward")
    check_kernel_inputs("packed24_lora_forward", x, values, meta, n, k, lora_A, lora_B, bias)
    return fused_forward(x, values, meta, n, True, lora_A, lora_B, scaling, bias, config)


def packed24_lora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    need_input_grad: bool = True,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dX [..., K] or None, dA [r, K], dB [N, r])`` of :func:`packed24_lora_forward` for ``grad_out [..., N]``."""
    k = x.shape[-1]
    n = check_packed(values, meta, k, "packed24_lora_backward")
    check_kernel_inputs("packed24_lora_backward", x, values, meta, n, k, lora_A, lora_B, grad_out=grad_out,
                        lora_optional=False)
    return fused_backward(grad_out, x, values, meta, True, lora_A, lora_B, scaling, need_input_grad, config)
