"""Pure-torch twins of the Triton kernels (same signatures), used on CPU and as the test oracle.

Notation: ``x [T, in]`` (any leading dims are flattened to T), frozen weight ``W [out, in]``, keep-mask
``M [out, in]`` (bool), ``lora_A [r, in]``, ``lora_B [out, r]``, ``s = scaling = lora_alpha / r``.

Forward:   ``y = x @ (W*M + s*(B@A)*M).T + b``
Backward (``G = dY.T @ X``, ``[out, in]``, the only full-size product):

- ``dX = dY @ (W*M + s*(B@A)*M)``
- ``dB = s * (G*M) @ A.T``       ``[out, r]``
- ``dA = s * B.T @ (G*M)``       ``[r, in]``

The packed 2:4 variants take ``values [out, in/2]`` and ``meta [out, ceil(in/8)]`` (see
:mod:`vlmsparse.sparse24`) in place of ``W`` and ``M``; the mask is the packed pattern.

These functions materialise full-size temporaries (the effective weight, G) inside one call; they keep
nothing alive between calls. Arithmetic runs in the input dtype, as the torch reference of a kernel should.
"""

from __future__ import annotations

import torch

from ..sparse24 import Packed24, unpack24, unpack24_mask

__all__ = [
    "effective_weight_ref",
    "sparse_lora_forward_ref",
    "sparse_lora_backward_ref",
    "packed24_matmul_ref",
    "packed24_lora_forward_ref",
    "packed24_lora_backward_ref",
]


def effective_weight_ref(
    weight: torch.Tensor, mask: torch.Tensor, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """``W*M + s*(B@A)*M`` as a dense ``[out, in]`` tensor (``W*M`` when there is no adapter)."""
    if lora_A is None or lora_B is None:
        return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    merged = torch.addmm(weight, lora_B.to(weight.dtype), lora_A.to(weight.dtype), alpha=scaling)
    return torch.where(mask, merged, torch.zeros((), dtype=weight.dtype, device=weight.device))


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def sparse_lora_forward_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [..., out] = x @ (W*M + s*(B@A)*M).T + b`` for ``x [..., in]``."""
    w_eff = effective_weight_ref(weight, mask, lora_A, lora_B, scaling)
    return torch.nn.functional.linear(x, w_eff, bias)


def sparse_lora_backward_ref(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    need_input_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dX [..., in] or None, dA [r, in], dB [out, r])`` for ``grad_out [..., out]`` and ``x [..., in]``."""
    dy, x2 = _flatten(grad_out), _flatten(x)
    grad_x = None
    if need_input_grad:
        w_eff = effective_weight_ref(weight, mask, lora_A, lora_B, scaling)
        grad_x = (dy @ w_eff.to(dy.dtype)).reshape(*grad_out.shape[:-1], weight.shape[1])
    g = (dy.T @ x2.to(dy.dtype)).masked_fill_(~mask, 0)  # G*M, [out, in]
    grad_B = (g @ lora_A.to(g.dtype).T).mul_(scaling)
    grad_A = (lora_B.to(g.dtype).T @ g).mul_(scaling)
    return grad_x, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)


def packed24_matmul_ref(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ unpack24(values, meta).T + b``."""
    weight = unpack24(Packed24(values, meta, x.shape[-1]))
    return torch.nn.functional.linear(x, weight, bias)


def packed24_lora_forward_ref(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ (unpack24(Wp) + s*(B@A)*M24).T + b``, ``M24`` the packed 2:4 pattern."""
    packed = Packed24(values, meta, x.shape[-1])
    return sparse_lora_forward_ref(x, unpack24(packed), unpack24_mask(packed), lora_A, lora_B, scaling, bias)


def packed24_lora_backward_ref(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    need_input_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dX, dA, dB)`` of :func:`packed24_lora_forward_ref`."""
    packed = Packed24(values, meta, x.shape[-1])
    return sparse_lora_backward_ref(
        grad_out, x, unpack24(packed), unpack24_mask(packed), lora_A, lora_B, scaling, need_input_grad
    )
