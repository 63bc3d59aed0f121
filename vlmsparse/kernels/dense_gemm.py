"""SparseLoRA decomposed onto dense GEMMs (backend ``"dense_gemm"``, the default for CUDA tensors).

Math (``x [..., K]``, ``W [N, K]`` frozen, ``M [N, K]`` bool, ``A [r, K]``, ``B [N, r]``, ``s = scaling``):

- :func:`sparse_lora_forward`: ``W_eff = (W + s*B@A)*M`` formed in one full-size tensor (for CUDA tensors in one
  pass by the Triton kernel of :mod:`vlmsparse.kernels.effective_weight`; elsewhere an ``addmm`` and an in-place
  masked ``where``), then ``y = F.linear(x, W_eff, b)`` (cuBLAS on a GPU); ``W_eff`` is freed on return.
- :func:`sparse_lora_backward`: ``W_eff`` recomputed, ``dX = dY @ W_eff`` and freed; ``G = dY.T @ X``
  (``[N, K]``), masked in place (``G*M``), ``dA = s * B.T @ (G*M)``, ``dB = s * (G*M) @ A.T``; ``G`` freed.

So between forward and backward nothing full-size is kept (the autograd layer saves ``x``, ``A``, ``B`` and the
frozen ``W``, ``M``, which exist anyway); inside a call there is one full-size temporary at a time (``W_eff``
or ``G``), as full finetuning has its weight gradient. Unlike the blocked reference twins
(:mod:`vlmsparse.kernels.reference`) the GEMMs run at full size, which is what a GPU needs. Arithmetic runs in
the input dtype (cuBLAS accumulates in fp32). The packed 2:4 variants unpack the weight and its pattern first
(:func:`vlmsparse.sparse24.unpack24`) and then run the same code.
"""

from __future__ import annotations

import importlib.util

import torch

from ..sparse24 import Packed24, unpack24_with_mask
from .reference import effective_weight_ref

__all__ = ["sparse_lora_forward", "sparse_lora_backward", "packed24_lora_forward", "packed24_lora_backward",
           "effective_weight"]

_TRITON: dict[str, bool] = {}


def _one_pass_kernel(weight: torch.Tensor) -> bool:
    """Whether ``W_eff`` is made by the one-pass Triton kernel: CUDA tensors, triton installed."""
    if "found" not in _TRITON:
        _TRITON["found"] = importlib.util.find_spec("triton") is not None
    return weight.is_cuda and _TRITON["found"]


def effective_weight(weight: torch.Tensor, mask: torch.Tensor, lora_A: torch.Tensor | None,
                     lora_B: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """``(W + s*B@A) * M`` (``W*M`` without adapters) as one new ``[N, K]`` tensor in ``W``'s dtype."""
    if lora_A is not None and lora_B is not None and _one_pass_kernel(weight):
        from .effective_weight import effective_weight as one_pass

        return one_pass(weight, mask, lora_A, lora_B, scaling)
    return effective_weight_ref(weight, mask, lora_A, lora_B, scaling)


def sparse_lora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [..., N] = x @ (W*M + s*(B@A)*M).T + b`` for ``x [..., K]``: one ``W_eff``, one GEMM."""
    return torch.nn.functional.linear(x, effective_weight(weight, mask, lora_A, lora_B, scaling), bias)


def sparse_lora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    need_input_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dX [..., K] or None, dA [r, K], dB [N, r])`` for ``grad_out [..., N]``, ``x [..., K]``."""
    n, k = weight.shape
    dy = grad_out.reshape(-1, n)
    x2 = x.reshape(-1, k).to(dy.dtype)
    grad_x = None
    if need_input_grad:
        w_eff = effective_weight(weight, mask, lora_A, lora_B, scaling).to(dy.dtype)
        grad_x = (dy @ w_eff).reshape(*grad_out.shape[:-1], k)
        del w_eff
    g = dy.T @ x2  # G [N, K]
    torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device), out=g)  # G*M in place
    A, B = lora_A.to(g.dtype), lora_B.to(g.dtype)
    grad_A = torch.mm(B.T, g).mul_(scaling)
    grad_B = torch.mm(g, A.T).mul_(scaling)
    del g
    return grad_x, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)


def _unpacked(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    return unpack24_with_mask(Packed24(values, meta, in_features))


def packed24_lora_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ (unpack24(Wp) + s*(B@A)*M24).T + b`` (the weight unpacked, then :func:`sparse_lora_forward`)."""
    weight, mask = _unpacked(values, meta, x.shape[-1])
    return sparse_lora_forward(x, weight, mask, lora_A, lora_B, scaling, bias)


def packed24_lora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    need_input_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dX, dA, dB)`` of :func:`packed24_lora_forward`."""
    weight, mask = _unpacked(values, meta, x.shape[-1])
    return sparse_lora_backward(grad_out, x, weight, mask, lora_A, lora_B, scaling, need_input_grad)
