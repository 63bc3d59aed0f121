"""The Triton kernels on a CUDA GPU at real sizes (skipped without one; run by benchmarks/run_gpu.sh).

Same checks as tests/test_kernels_interpret.py: error vs float64 within 2x the torch reference's error in the
same dtype + atol (TF32 atol for fp32, since tl.dot uses TF32 on the GPU), outputs poisoned with NaN first.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close_to_reference

from vlmsparse.kernels import reference as ref
from vlmsparse.sparse24 import pack24
from vlmsparse.sparsity import mask_nm

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (tokens, out, in): decode and prefill shapes of LLaVA-1.5-7B / CLIP ViT-L, plus awkward ones.
SHAPES = [(1, 11008, 4096), (16, 4096, 11008), (7, 1024, 4096), (33, 4096, 1024), (577, 1024, 1024), (2048, 4096, 4096)]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    from vlmsparse.kernels import _fused

    def poisoned(*shape, dtype=None, device=None):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_fused, "_empty", poisoned)


def _case(m, n, k, rank, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    dense = torch.randn(n, k, generator=g, device="cuda")
    w24 = torch.where(mask_nm(dense.abs(), 2, 4), dense, torch.zeros((), device="cuda")).to(dtype)
    return dict(
        x=torch.randn(m, k, generator=g, device="cuda").to(dtype),
        dy=torch.randn(m, n, generator=g, device="cuda").to(dtype),
        packed=pack24(w24),
        weight=torch.randn(n, k, generator=g, device="cuda").to(dtype),
        mask=torch.rand(n, k, generator=g, device="cuda") > 0.5,
        A=(0.05 * torch.randn(rank, k, generator=g, device="cuda")).to(dtype),
        B=(0.05 * torch.randn(n, rank, generator=g, device="cuda")).to(dtype),
        bias=torch.randn(n, generator=g, device="cuda").to(dtype),
    )


def _check(result, fn_ref, args):
    low = fn_ref(*args)
    exact = fn_ref(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    if isinstance(result, torch.Tensor):
        result, low, exact = (result,), (low,), (exact,)
    for got, lo, ex in zip(result, low, exact):
        assert got.shape == lo.shape and got.dtype == lo.dtype
        assert_close_to_reference(got, lo, ex, tf32=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_packed24_matmul_gpu(dtype, m, n, k):
    from vlmsparse.kernels.packed24 import packed24_matmul

    c = _case(m, n, k, 16, dtype)
    p = c["packed"]
    _check(packed24_matmul(c["x"], p.values, p.meta, c["bias"]), ref.packed24_matmul_ref,
           (c["x"], p.values, p.meta, c["bias"]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", SHAPES[:4])
def test_packed24_lora_gpu(dtype, m, n, k):
    from vlmsparse.kernels.packed24 import packed24_lora_backward, packed24_lora_forward

    c = _case(m, n, k, 16, dtype)
    p = c["packed"]
    args = (c["x"], p.values, p.meta, c["A"], c["B"], 2.0, c["bias"])
    _check(packed24_lora_forward(*args), ref.packed24_lora_forward_ref, args)
    bargs = (c["dy"], c["x"], p.values, p.meta, c["A"], c["B"], 2.0, True)
    _check(packed24_lora_backward(*bargs), ref.packed24_lora_backward_ref, bargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(7, 1024, 4096), (512, 4096, 1024)])
def test_sparse_lora_gpu(dtype, m, n, k):
    from vlmsparse.kernels.sparse_lora import sparse_lora_backward, sparse_lora_forward

    c = _case(m, n, k, 8, dtype)
    args = (c["x"], c["weight"], c["mask"], c["A"], c["B"], 2.0, c["bias"])
    _check(sparse_lora_forward(*args), ref.sparse_lora_forward_ref, args)
    bargs = (c["dy"], c["x"], c["weight"], c["mask"], c["A"], c["B"], 2.0, True)
    _check(sparse_lora_backward(*bargs), ref.sparse_lora_backward_ref, bargs)


def test_fused_backward_has_no_full_size_temporary():
    """Peak extra memory of the fused backward stays well below one full-size [out, in] fp16 tensor."""
    from vlmsparse.kernels.sparse_lora import sparse_lora_backward

    c = _case(1024, 4096, 4096, 16, torch.float16)
    args = (c["dy"], c["x"], c["weight"], c["mask"], c["A"], c["B"], 2.0, True)
    sparse_lora_backward(*args)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sparse_lora_backward(*args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full = 4096 * 4096 * 2
    assert extra < full / 2, f"fused backward allocated {extra} bytes, a full-size tensor is {full}"
