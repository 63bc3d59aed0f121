"""The one-pass effective-weight Triton kernel (kernels/effective_weight.py) in the Triton interpreter on CPU,
against float64 within the tolerance table; and the dense_gemm backend running it (as it does on CUDA)."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close_to_reference

from vlmsparse.kernels import reference as ref

pytestmark = pytest.mark.interpret


def _case(n, k, r, dtype, lora_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, k, generator=g) > 0.4
    lora_dtype = lora_dtype or dtype
    return ((torch.randn(n, k, generator=g) * mask).to(dtype), mask,
            (0.3 * torch.randn(r, k, generator=g)).to(lora_dtype), (0.3 * torch.randn(n, r, generator=g)).to(lora_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, r", [(33, 72, 3), (64, 128, 16), (16, 64, 20)])
def test_effective_weight_matches_float64(n, k, r, dtype):
    from vlmsparse.kernels.effective_weight import effective_weight

    weight, mask, A, B = _case(n, k, r, dtype)
    got = effective_weight(weight, mask, A, B, 1.7)
    assert got.dtype == dtype and got.shape == (n, k) and got.is_contiguous()
    exact = ref.effective_weight_ref(weight.double(), mask, A.double(), B.double(), 1.7)
    assert_close_to_reference(got, ref.effective_weight_ref(weight, mask, A, B, 1.7), exact)
    outside = got[~mask]
    assert torch.all(outside == 0) and not torch.any(torch.signbit(outside))  # exactly +0.0 where pruned


def test_effective_weight_fp32_adapters_and_stride0_weight():
    from vlmsparse.kernels.effective_weight import effective_weight
    from vlmsparse.ops import zero_weight

    weight, mask, A, B = _case(40, 48, 4, torch.bfloat16, lora_dtype=torch.float32)
    exact = ref.effective_weight_ref(weight.double(), mask, A.double(), B.double(), 2.0)
    assert_close_to_reference(effective_weight(weight, mask, A, B, 2.0),
                              ref.effective_weight_ref(weight, mask, A, B, 2.0), exact)
    zero = zero_weight(40, 48, torch.zeros((), dtype=torch.float32))  # the adapter-only path: stride 0
    got = effective_weight(zero, mask, A, B, 2.0)
    torch.testing.assert_close(got, 2.0 * (B @ A) * mask, rtol=1e-6, atol=1e-6)


def test_dense_gemm_with_the_one_pass_kernel(monkeypatch):
    """The CUDA code path of the dense_gemm backend (forced here on CPU tensors): same results as the torch one."""
    from vlmsparse.kernels import dense_gemm

    weight, mask, A, B = _case(32, 64, 4, torch.float32)
    g = torch.Generator().manual_seed(1)
    x, dy = torch.randn(5, 64, generator=g), torch.randn(5, 32, generator=g)
    want_y = dense_gemm.sparse_lora_forward(x, weight, mask, A, B, 2.0)
    want = dense_gemm.sparse_lora_backward(dy, x, weight, mask, A, B, 2.0)
    monkeypatch.setattr(dense_gemm, "_one_pass_kernel", lambda w: True)
    torch.testing.assert_close(dense_gemm.sparse_lora_forward(x, weight, mask, A, B, 2.0), want_y)
    for got, w in zip(dense_gemm.sparse_lora_backward(dy, x, weight, mask, A, B, 2.0), want):
        torch.testing.assert_close(got, w)
