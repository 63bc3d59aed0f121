"""Triton: the masked effective weight ``W_eff = (W + s*B@A) * M`` in one pass over ``W`` and ``M``.

Math (``W [N, K]`` any strides (a stride-0 zero weight too), ``M [N, K]`` bool, ``A [R, K]``, ``B [N, R]``,
``s = scaling``): each program loads one ``[BLOCK_N, BLOCK_K]`` tile of ``W`` and ``M``, forms the matching tile
of ``B@A`` as one ``tl.dot`` over the rank (in fp32: ``R`` padded to 16, TF32 for half-precision weights, IEEE
for fp32 ones), adds, masks (pruned entries are exactly ``+0.0``) and stores: ``W`` and ``M`` are read once and
``W_eff`` written once (the torch twin, :func:`vlmsparse.kernels.reference.effective_weight_ref`, makes two
passes: ``addmm`` then an in-place masked ``where``). Used by the ``dense_gemm`` backend for CUDA tensors
(:mod:`vlmsparse.kernels.dense_gemm`), where it is formed in the forward and again in the backward.

Interpreter (``TRITON_INTERPRET=1``): tiles are converted to fp32 on load, and bf16 results are stored as fp32
and rounded in torch (the interpreter's fp32 -> bf16 conversion truncates).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["effective_weight", "BLOCK_N", "BLOCK_K"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_N, BLOCK_K = 64, 64


def effective_weight(weight: torch.Tensor, mask: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """``(W + s*B@A) * M`` as a new contiguous ``[N, K]`` tensor in ``W``'s dtype."""
    n, k = weight.shape
    rank = lora_A.shape[0]
    upcast = _INTERPRET and weight.dtype == torch.bfloat16
    out = torch.empty(n, k, dtype=torch.float32 if upcast else weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out.to(weight.dtype)
    m = mask.view(torch.uint8)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))
    _effective_weight_kernel[grid](
        weight, m, lora_A, lora_B, out, n, k, rank, float(scaling),
        weight.stride(0), weight.stride(1), m.stride(0), m.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), out.stride(0), out.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=max(16, triton.next_power_of_2(rank)),
        PRECISION="ieee" if weight.dtype == torch.float32 else "tf32", num_warps=4,
    )
    return out.to(weight.dtype) if upcast else out


def compile_for_target(dtype: str, target=None):
    """Compile the kernel ahead of time for a GPU target (default sm_90) without a GPU (tests): ``dtype`` of the
    weight and the output is ``fp32`` / ``fp16`` / ``bf16``, the adapters fp32."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"w_ptr": f"*{dtype}", "m_ptr": "*u8", "a_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": f"*{dtype}",
                 "N": "i32", "K": "i32", "R": "i32", "scaling": "fp32"}
    for name in ("s_wn", "s_wk", "s_mn", "s_mk", "s_ar", "s_ak", "s_bn", "s_br", "s_on", "s_ok"):
        signature[name] = "i32"
    constexprs = {"BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K, "BLOCK_R": 16,
                  "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    signature.update({name: "constexpr" for name in constexprs})
    return triton.compile(ASTSource(fn=_effective_weight_kernel, signature=signature, constexprs=constexprs),
                          target=target or GPUTarget("cuda", 90, 32), options={"num_warps": 4})


@triton.jit
def _effective_weight_kernel(
    w_ptr, m_ptr, a_ptr, b_ptr, out_ptr, N, K, R, scaling,
    s_wn, s_wk, s_mn, s_mk, s_ar, s_ak, s_bn, s_br, s_on, s_ok,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    inside = (rn[:, None] < N) & (rk[None, :] < K)
    b = tl.load(b_ptr + rn[:, None] * s_bn + rr[None, :] * s_br, mask=(rn[:, None] < N) & (rr[None, :] < R),
                other=0.0).to(tl.float32)
    a = tl.load(a_ptr + rr[:, None] * s_ar + rk[None, :] * s_ak, mask=(rr[:, None] < R) & (rk[None, :] < K),
                other=0.0).to(tl.float32)
    delta = tl.dot(b, a, input_precision=PRECISION)
    w = tl.load(w_ptr + rn[:, None] * s_wn + rk[None, :] * s_wk, mask=inside, other=0.0).to(tl.float32)
    keep = tl.load(m_ptr + rn[:, None] * s_mn + rk[None, :] * s_mk, mask=inside, other=0)
    out = tl.where(keep != 0, w + scaling * delta, 0.0)
    tl.store(out_ptr + rn[:, None] * s_on + rk[None, :] * s_ok, out.to(out_ptr.dtype.element_ty), mask=inside)
