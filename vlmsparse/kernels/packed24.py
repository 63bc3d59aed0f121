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

from ._fused import TileConfig, check_backward_inputs, check_inputs, fused_backward, fused_forward

__all__ = ["packed24_matmul", "packed24_lora_forward", "packed24_lora_backward"]


def _check_packed(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, what: str) -> tuple[int, int]:
    k = x.shape[-1]
    if values.dim() != 2 or values.shape[1] * 2 != k or k % 4:
        raise ValueError(
            f"{what}: values must be [out, in/2] with in divisible by 4; got values {tuple(values.shape)} "
            f"for inputs of {k} features"
        )
    n = values.shape[0]
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (n, (k // 4 + 1) // 2):
        raise ValueError(
            f"{what}: meta must be uint8 of shape {(n, (k // 4 + 1) // 2)}, got {meta.dtype} {tuple(meta.shape)}"
        )
    if values.device != x.device or meta.device != x.device:
        raise ValueError(f"{what}: x, values and meta must be on one device, got {x.device}, {values.device}, "
                         f"{meta.device}")
    return n, k


def packed24_matmul(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """``y [..., N] = x @ unpack24(values, meta).T + b`` for ``x [..., K]``. ``config`` overrides the tiles."""
    n, k = _check_packed(x, values, meta, "packed24_matmul")
    check_inputs(x, values.dtype, None, None, n, k, "packed24_matmul")
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
    n, k = _check_packed(x, values, meta, "packed24_lora_forward")
    check_inputs(x, values.dtype, lora_A, lora_B, n, k, "packed24_lora_forward")
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
    n, k = _check_packed(x, values, meta, "packed24_lora_backward")
    check_backward_inputs(grad_out, x, values.dtype, lora_A, lora_B, n, k, "packed24_lora_backward")
    return fused_backward(grad_out, x, values, meta, True, lora_A, lora_B, scaling, need_input_grad, config)
