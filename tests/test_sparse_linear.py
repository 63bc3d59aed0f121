"""SparseLinear: backend choice, bit-exact outputs on the CPU paths, the inverse swap; GPU paths (gpu marker)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmsparse import ops
from vlmsparse.modules.sparse_linear import SparseLinear, choose_backend, is_24
from vlmsparse.sparsity import mask_nm


def _linear24(out: int = 32, inp: int = 64, dtype=torch.float32, bias: bool = True, device="cpu") -> nn.Linear:
    lin = nn.Linear(inp, out, bias=bias, dtype=dtype, device=device)
    with torch.no_grad():
        mask = mask_nm(lin.weight.abs().float(), 2, 4)
        lin.weight.masked_fill_(~mask.to(device), 0)
    return lin


def test_is_24_counts_values_and_negative_zero_is_zero():
    w = _linear24().weight.detach()
    assert is_24(w)
    assert not is_24(torch.randn(8, 16))
    assert not is_24(torch.zeros(4, 6))  # in-features not divisible by 4
    w2 = w.clone()
    w2[0, :4] = torch.tensor([1.0, 2.0, -0.0, -0.0])  # -0.0 is zero: still 2 non-zeros in the group
    assert is_24(w2)
    w2[0, :4] = torch.tensor([1.0, 2.0, float("nan"), 0.0])  # NaN is not zero
    assert not is_24(w2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_pruned_by_multiplying_with_mask_packs(dtype):
    """``w * mask`` leaves -0.0 where w < 0: SparseLinear takes it, values and outputs come back equal."""
    torch.manual_seed(0)
    weight = torch.randn(32, 64).to(dtype)
    pruned = weight * mask_nm(weight.abs().float(), 2, 4).to(dtype)
    assert bool(torch.signbit(pruned[pruned == 0]).any())  # the case of the issue: -0.0 at pruned positions
    assert choose_backend(pruned)[1] != "not 2:4"
    sparse = SparseLinear(pruned, backend="packed24")
    assert sparse.backend == "packed24"
    assert torch.equal(sparse.dense_weight(), pruned)  # equal values (a -0.0 may come back +0.0)
    x = torch.randn(3, 64).to(dtype)
    with ops.use_backend("reference"):  # bit for bit through the reference twin (the native kernel sums in its order)
        assert torch.equal(sparse(x), nn.functional.linear(x, pruned))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed24_backend_cpu_is_bit_exact(dtype):
    """Through the reference twin the packed layer computes exactly what nn.Linear computes."""
    lin = _linear24(dtype=dtype)
    sparse = SparseLinear.from_linear(lin, backend="packed24")
    assert sparse.backend == "packed24" and sparse.values.shape == (32, 32) and sparse.meta.dtype == torch.uint8
    x = torch.randn(3, 5, 64, dtype=dtype)
    with ops.use_backend("reference"):
        assert torch.equal(sparse(x), lin(x))
    back = sparse.to_linear()
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)
    assert "backend=packed24" in repr(sparse)


def test_weight_bytes_and_state_dict():
    sparse = SparseLinear.from_linear(_linear24(dtype=torch.float16, bias=False), backend="packed24")
    assert sparse.weight_bytes() == 32 * 64 * 2 * 9 // 16
    assert set(sparse.state_dict()) == {"values", "meta"}


def test_auto_on_cpu_stays_dense_and_non24_is_dense(without_native):
    lin = _linear24()
    sparse = SparseLinear.from_linear(lin)
    assert sparse.backend == "dense" and "CUDA" in sparse.reason
    dense_lin = nn.Linear(16, 8)
    assert choose_backend(dense_lin.weight)[0] == "dense"
    x = torch.randn(4, 64)
    assert torch.equal(sparse(x), lin(x))


def test_bad_backend_requests_raise():
    with pytest.raises(ValueError, match="one of"):
        choose_backend(torch.zeros(4, 8), "fast")
    with pytest.raises(ValueError, match="needs a 2:4 weight"):
        SparseLinear(torch.randn(8, 16), backend="packed24")
    with pytest.raises(ValueError, match="CUDA"):
        SparseLinear(_linear24().weight, backend="torch24")
    with pytest.raises(ValueError, match="nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch24", "packed24"])
def test_gpu_backends_match_dense(dtype, backend):
    lin = _linear24(256, 512, dtype=dtype, device="cuda")
    sparse = SparseLinear.from_linear(lin, backend=backend)
    assert sparse.backend == backend
    for tokens in (1, 7, 128):
        x = torch.randn(tokens, 512, dtype=dtype, device="cuda")
        torch.testing.assert_close(sparse(x), lin(x), rtol=2e-2, atol=2e-2)
    assert torch.equal(sparse.to_linear().weight, lin.weight)


@pytest.mark.gpu
def test_gpu_auto_prefers_torch24():
    sparse = SparseLinear.from_linear(_linear24(256, 512, dtype=torch.float16, device="cuda"))
    assert sparse.backend in ("torch24", "packed24"), sparse.reason
