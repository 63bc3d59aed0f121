"""The dense_gemm backend (SparseLoRA decomposed onto full-size GEMMs, the CUDA default): numerics against
float64 within the tolerance table, nothing full-size saved for backward, the packed 2:4 variant."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close_to_reference

from vlmsparse import ops
from vlmsparse.kernels import dense_gemm
from vlmsparse.kernels import reference as ref
from vlmsparse.sparse24 import pack24
from vlmsparse.sparsity import mask_nm


def _case(m=33, n=24, k=64, r=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, k, generator=g) > 0.5
    return dict(
        x=torch.randn(m, k, generator=g).to(dtype),
        dy=torch.randn(m, n, generator=g).to(dtype),
        weight=(torch.randn(n, k, generator=g) * mask).to(dtype),
        mask=mask,
        A=(0.3 * torch.randn(r, k, generator=g)).to(dtype),
        B=(0.3 * torch.randn(n, r, generator=g)).to(dtype),
        bias=torch.randn(n, generator=g).to(dtype),
    )


def _double(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_backward_within_tolerance_of_float64(dtype, one_thread):
    c = _case(dtype=dtype)
    fwd_args = [c["x"], c["weight"], c["mask"], c["A"], c["B"], 1.5, c["bias"]]
    got = dense_gemm.sparse_lora_forward(*fwd_args)
    assert got.dtype == dtype
    assert_close_to_reference(got, ref.sparse_lora_forward_ref(*fwd_args),
                              ref.sparse_lora_forward_ref(*_double(fwd_args)))
    bwd_args = [c["dy"], c["x"], c["weight"], c["mask"], c["A"], c["B"], 1.5, True]
    got = dense_gemm.sparse_lora_backward(*bwd_args)
    low = ref.sparse_lora_backward_ref(*bwd_args)
    exact = ref.sparse_lora_backward_ref(*_double(bwd_args))
    for name, g, lo, ex in zip(("dX", "dA", "dB"), got, low, exact):
        assert g.shape == lo.shape and g.dtype == lo.dtype, name
        assert_close_to_reference(g, lo, ex)
    grad_x, grad_A, grad_B = dense_gemm.sparse_lora_backward(*bwd_args[:-1], False)
    assert grad_x is None and torch.equal(grad_A, got[1]) and torch.equal(grad_B, got[2])


def test_fp32_adapters_on_a_half_precision_base(one_thread):
    """SparseLoRALinear keeps fp32 adapters on a bf16 base: gradients come back in the adapters' dtype."""
    c = _case(dtype=torch.bfloat16)
    A, B = c["A"].float(), c["B"].float()
    grad_x, grad_A, grad_B = dense_gemm.sparse_lora_backward(c["dy"], c["x"], c["weight"], c["mask"], A, B, 2.0)
    assert grad_x.dtype == torch.bfloat16 and grad_A.dtype == grad_B.dtype == torch.float32
    exact = ref.sparse_lora_backward_ref(*_double([c["dy"], c["x"], c["weight"], c["mask"], A, B, 2.0]))
    low = ref.sparse_lora_backward_ref(c["dy"], c["x"], c["weight"], c["mask"], A, B, 2.0)
    for g, lo, ex in zip((grad_x, grad_A, grad_B), low, exact):
        assert_close_to_reference(g, lo, ex)


def test_autograd_matches_naive_float64_and_gradcheck():
    c = _case(m=5, n=6, k=8, r=2, dtype=torch.float64)
    x, A, B, bias = (c[k].clone().requires_grad_(True) for k in ("x", "A", "B", "bias"))
    y = ops.sparse_lora_linear(x, c["weight"], c["mask"], A, B, 0.7, bias, backend="dense_gemm")
    naive = torch.nn.functional.linear(x, c["weight"] * c["mask"] + 0.7 * (B @ A) * c["mask"], bias)
    torch.testing.assert_close(y, naive, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, A, B, b: ops.sparse_lora_linear(x, c["weight"], c["mask"], A, B, 0.7, b, backend="dense_gemm"),
        (x, A, B, bias))
    zero = ops.zero_weight(6, 8, A)  # the adapter-only path of LoRA dropout
    assert torch.autograd.gradcheck(
        lambda x, A, B: ops.sparse_lora_linear(x, zero, c["mask"], A, B, 0.7, backend="dense_gemm"), (x, A, B))


def test_packed24_variant_matches_reference():
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(8, 32, generator=g, dtype=torch.float64)
    packed = pack24(dense * mask_nm(dense.abs(), 2, 4))
    x = torch.randn(2, 3, 32, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 32, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(8, 2, generator=g, dtype=torch.float64, requires_grad=True)
    outs = {}
    for backend in ("dense_gemm", "reference"):
        y = ops.packed24_lora_linear(x, packed.values, packed.meta, A, B, 2.0, backend=backend)
        outs[backend] = (y, *torch.autograd.grad(y.pow(2).sum(), (x, A, B)))
    for a, b in zip(outs["dense_gemm"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["sparse_lora", "packed24_lora"])
def test_nothing_full_size_is_saved_for_backward(op):
    """Saved for backward: x, A, B and the frozen weight / mask themselves (their storage), nothing newly made."""
    c = _case(m=4, n=16, k=32, r=2)
    x, A, B = (c[k].clone().requires_grad_(True) for k in ("x", "A", "B"))
    w24 = c["weight"] * mask_nm(c["weight"].abs(), 2, 4)
    packed = pack24(w24)
    frozen = (c["weight"], c["mask"]) if op == "sparse_lora" else (packed.values, packed.meta)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        if op == "sparse_lora":
            y = ops.sparse_lora_linear(x, *frozen, A, B, 1.0, c["bias"], backend="dense_gemm")
        else:
            y = ops.packed24_lora_linear(x, *frozen, A, B, 1.0, c["bias"], backend="dense_gemm")
    frozen_ptrs = {t.untyped_storage().data_ptr() for t in frozen}
    new = [t for t in saved if t.untyped_storage().data_ptr() not in frozen_ptrs]
    assert new and all(t.numel() < c["weight"].numel() for t in new), [tuple(t.shape) for t in new]
    assert max(t.numel() for t in new) == x.numel()  # x (4 x 32) is the largest
    y.sum().backward()
    assert A.grad is not None and B.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, n, k", [(2048, 11008, 4096), (33, 4096, 1024)])
def test_gpu_dense_gemm_within_tolerance(m, n, k, dtype):
    """The CUDA default at real sizes: forward and backward against float64 within the table's bound."""
    c = {key: v.cuda() if isinstance(v, torch.Tensor) else v for key, v in _case(m, n, k, 16, dtype).items()}
    fwd = [c["x"], c["weight"], c["mask"], c["A"], c["B"], 2.0, c["bias"]]
    assert_close_to_reference(dense_gemm.sparse_lora_forward(*fwd), ref.sparse_lora_forward_ref(*fwd),
                              ref.sparse_lora_forward_ref(*_double(fwd)))
    bwd = [c["dy"], c["x"], c["weight"], c["mask"], c["A"], c["B"], 2.0, True]
    for g, lo, ex in zip(dense_gemm.sparse_lora_backward(*bwd), ref.sparse_lora_backward_ref(*bwd),
                         ref.sparse_lora_backward_ref(*_double(bwd))):
        assert_close_to_reference(g, lo, ex)
    assert ops.resolve_backend(c["x"].device, op="sparse_lora") == "dense_gemm"
