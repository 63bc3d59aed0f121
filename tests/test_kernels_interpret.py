"""Triton kernels under TRITON_INTERPRET=1 (CPU) against the pure-torch reference twins.

Tolerance rule (tests/tolerances.py): error against float64 <= 2 x the torch reference's error in the same
dtype + atol. Every kernel-filled buffer is poisoned with NaN first, so an unwritten element fails.
Shapes are small and awkward (M = 1, 7, 33; in-features multiples of 16 and of 64; one with an odd number
of 2:4 groups) and the interpreter is slow, so the cases are few.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close_to_reference

from vlmsparse.kernels import reference as ref
from vlmsparse.sparse24 import pack24
from vlmsparse.sparsity import mask_nm

pytestmark = pytest.mark.interpret

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    from vlmsparse.kernels import _fused

    def poisoned(*shape, dtype=None, device=None):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_fused, "_empty", poisoned)


def _case(m: int, n: int, k: int, rank: int, dtype: torch.dtype, seed: int = 0, lora_dtype=None):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, k, generator=g)
    mask24 = mask_nm(dense.abs(), 2, 4)
    w24 = torch.where(mask24, dense, torch.zeros(())).to(dtype)
    lora_dtype = lora_dtype or dtype
    return dict(
        x=torch.randn(m, k, generator=g).to(dtype),
        dy=torch.randn(m, n, generator=g).to(dtype),
        w24=w24,
        packed=pack24(w24),
        weight=torch.randn(n, k, generator=g).to(dtype),
        mask=torch.rand(n, k, generator=g) > 0.4,
        A=(0.2 * torch.randn(rank, k, generator=g)).to(lora_dtype),
        B=(0.2 * torch.randn(n, rank, generator=g)).to(lora_dtype),
        bias=torch.randn(n, generator=g).to(dtype),
    )


def _check(result, fn_ref, args, scaling=None):
    """Compare ``result`` (tensor or tuple) with ``fn_ref`` run in float64 (exact) and in the input dtype."""
    low = fn_ref(*args)
    exact = fn_ref(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    if isinstance(result, torch.Tensor):
        result, low, exact = (result,), (low,), (exact,)
    for got, lo, ex in zip(result, low, exact):
        assert got.shape == lo.shape and got.dtype == lo.dtype
        assert_close_to_reference(got, lo, ex)


# ---------------------------------------------------------------------------------------------- packed 2:4
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 48, 64), (7, 80, 144), (33, 32, 128)])
def test_packed24_matmul(dtype, m, n, k):
    from vlmsparse.kernels.packed24 import packed24_matmul

    c = _case(m, n, k, 4, dtype)
    p = c["packed"]
    _check(packed24_matmul(c["x"], p.values, p.meta, c["bias"]), ref.packed24_matmul_ref,
           (c["x"], p.values, p.meta, c["bias"]))
    # Exactness of the decompression: with fp32 and an identity input the kernel returns W itself.
    if dtype == torch.float32 and m == 33:
        eye = torch.eye(k)
        assert torch.equal(packed24_matmul(eye, p.values, p.meta).T, c["w24"])


def test_packed24_matmul_old_triton_select(monkeypatch):
    """The select the forward adds for Triton < 3.7 (``OLD_TRITON_TRANS_FIX``) changes no bit of the result
    (partial N and K tiles, fp32 and fp16), whichever Triton is installed."""
    import triton.language as tl

    from vlmsparse.kernels import _fused
    from vlmsparse.kernels.packed24 import packed24_matmul

    for dtype in (torch.float32, torch.float16):
        c = _case(7, 80, 144, 4, dtype)
        p = c["packed"]
        results = []
        for flag in (False, True):
            monkeypatch.setattr(_fused, "OLD_TRITON_TRANS_FIX", tl.constexpr(flag))
            results.append(packed24_matmul(c["x"], p.values, p.meta, c["bias"]))
        assert torch.equal(results[0], results[1])
        _check(results[1], ref.packed24_matmul_ref, (c["x"], p.values, p.meta, c["bias"]))
    eye = torch.eye(144)
    assert torch.equal(packed24_matmul(eye, p.values.float(), p.meta).T, c["w24"].float())


@pytest.mark.parametrize("split_k", [3, 4])
def test_packed24_matmul_split_k(split_k):
    """Decode-shaped launch: split along K into fp32 partial sums (4 splits of 2 tiles: some splits are empty)."""
    from vlmsparse.kernels._fused import TileConfig
    from vlmsparse.kernels.packed24 import packed24_matmul

    k = 208 if split_k == 3 else 64
    c = _case(3, 48, k, 4, torch.float16)
    p = c["packed"]
    cfg = TileConfig(16, 32, 32, split_k=split_k)
    _check(packed24_matmul(c["x"], p.values, p.meta, c["bias"], config=cfg), ref.packed24_matmul_ref,
           (c["x"], p.values, p.meta, c["bias"]))


def test_strided_bias():
    """A bias that is a strided view (every other entry of a longer vector) gives the reference's result."""
    from vlmsparse.kernels.sparse_lora import sparse_lora_forward

    c = _case(7, 16, 64, 4, torch.float32)
    bias = torch.randn(32, generator=torch.Generator().manual_seed(5))[::2]
    assert not bias.is_contiguous()
    args = (c["x"], c["weight"], c["mask"], c["A"], c["B"], 2.0, bias)
    _check(sparse_lora_forward(*args), ref.sparse_lora_forward_ref, args)


def test_packed24_odd_groups_and_leading_dims():
    """in = 36 (9 groups: the last meta byte is half used), x [2, 3, in] and non-contiguous."""
    from vlmsparse.kernels.packed24 import packed24_lora_backward, packed24_lora_forward

    c = _case(6, 24, 36, 3, torch.float32)
    p = c["packed"]
    x = c["x"].T.contiguous().T.reshape(2, 3, 36)  # column-major storage
    assert not x.is_contiguous()
    args = (x, p.values, p.meta, c["A"], c["B"], 0.5, None)
    _check(packed24_lora_forward(*args), ref.packed24_lora_forward_ref, args)
    dy = c["dy"].reshape(2, 3, 24)
    bargs = (dy, x, p.values, p.meta, c["A"], c["B"], 0.5, True)
    _check(packed24_lora_backward(*bargs), ref.packed24_lora_backward_ref, bargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,rank", [(1, 48, 64, 4), (7, 32, 144, 8), (33, 40, 128, 16)])
def test_packed24_lora_forward(dtype, m, n, k, rank):
    from vlmsparse.kernels.packed24 import packed24_lora_forward

    c = _case(m, n, k, rank, dtype)
    p = c["packed"]
    args = (c["x"], p.values, p.meta, c["A"], c["B"], 2.0, c["bias"] if m != 7 else None)
    _check(packed24_lora_forward(*args), ref.packed24_lora_forward_ref, args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,rank", [(1, 48, 64, 4), (7, 32, 144, 8), (33, 40, 128, 5)])
def test_packed24_lora_backward(dtype, m, n, k, rank):
    from vlmsparse.kernels.packed24 import packed24_lora_backward

    c = _case(m, n, k, rank, dtype, lora_dtype=torch.float32 if m == 33 else None)
    p = c["packed"]
    args = (c["dy"], c["x"], p.values, p.meta, c["A"], c["B"], 1.5, True)
    _check(packed24_lora_backward(*args), ref.packed24_lora_backward_ref, args)


def test_packed24_backward_without_input_grad():
    from vlmsparse.kernels.packed24 import packed24_lora_backward

    c = _case(5, 32, 64, 4, torch.float32)
    p = c["packed"]
    args = (c["dy"], c["x"], p.values, p.meta, c["A"], c["B"], 1.0, False)
    dx, dA, dB = packed24_lora_backward(*args)
    assert dx is None
    _, rA, rB = ref.packed24_lora_backward_ref(*args)
    torch.testing.assert_close(dA, rA, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dB, rB, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- dense + mask
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,rank", [(1, 48, 64, 4), (7, 32, 144, 8), (33, 40, 128, 16)])
def test_sparse_lora_forward(dtype, m, n, k, rank):
    from vlmsparse.kernels.sparse_lora import sparse_lora_forward

    c = _case(m, n, k, rank, dtype)
    args = (c["x"], c["weight"], c["mask"], c["A"], c["B"], 2.0, c["bias"])
    _check(sparse_lora_forward(*args), ref.sparse_lora_forward_ref, args)


def test_sparse_lora_forward_without_adapter_and_zero_weight():
    """No adapter: ``x @ (W*M).T``; a stride-0 zero weight gives the adapter-only term ``s*x@((B@A)*M).T``."""
    from vlmsparse.kernels.sparse_lora import sparse_lora_backward, sparse_lora_forward
    from vlmsparse.ops import zero_weight

    c = _case(7, 32, 64, 4, torch.float32)
    args = (c["x"], c["weight"], c["mask"], None, None, 1.0, None)
    _check(sparse_lora_forward(*args), ref.sparse_lora_forward_ref, args)
    zero = zero_weight(32, 64, c["x"])
    assert zero.stride() == (0, 0)
    args = (c["x"], zero, c["mask"], c["A"], c["B"], 3.0, None)
    _check(sparse_lora_forward(*args), ref.sparse_lora_forward_ref, args)
    bargs = (c["dy"], c["x"], zero, c["mask"], c["A"], c["B"], 3.0, True)
    _check(sparse_lora_backward(*bargs), ref.sparse_lora_backward_ref, bargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,rank", [(1, 48, 64, 4), (7, 32, 144, 8), (33, 40, 128, 5)])
def test_sparse_lora_backward(dtype, m, n, k, rank):
    from vlmsparse.kernels.sparse_lora import sparse_lora_backward

    c = _case(m, n, k, rank, dtype, lora_dtype=torch.float32 if m == 7 else None)
    args = (c["dy"], c["x"], c["weight"], c["mask"], c["A"], c["B"], 0.75, True)
    _check(sparse_lora_backward(*args), ref.sparse_lora_backward_ref, args)


def test_bad_inputs_raise():
    from vlmsparse.kernels.packed24 import packed24_lora_forward, packed24_matmul
    from vlmsparse.kernels.sparse_lora import sparse_lora_forward

    c = _case(2, 16, 32, 2, torch.float32)
    p = c["packed"]
    with pytest.raises(ValueError, match=r"^packed24_matmul: meta must be uint8 of shape \(16, 4\)"):
        packed24_matmul(c["x"], p.values, p.meta[:, :1])
    with pytest.raises(ValueError, match=r"^packed24_matmul: values must be \[out, in/2\]"):
        packed24_matmul(c["x"][:, :30], p.values[:, :15], p.meta)
    with pytest.raises(ValueError, match="^packed24_matmul: input dtype torch.float16 differs from the weight dtype"):
        packed24_matmul(c["x"].half(), p.values, p.meta)
    with pytest.raises(ValueError, match=r"^packed24_lora_forward: lora_A must be \[r, 32\] and lora_B \[16, r\]"):
        packed24_lora_forward(c["x"], p.values, p.meta, c["A"].T, c["B"], 1.0)
    with pytest.raises(ValueError, match="^sparse_lora_forward: mask must be bool"):
        sparse_lora_forward(c["x"], c["weight"], c["mask"].float(), c["A"], c["B"], 1.0)
    with pytest.raises(ValueError, match=r"^sparse_lora_forward: input has shape \(2, 16\), the weight expects 32"):
        sparse_lora_forward(c["x"][:, :16], c["weight"], c["mask"], c["A"], c["B"], 1.0)
    with pytest.raises(ValueError, match=r"^sparse_lora_forward: give both lora_A and lora_B, or neither"):
        sparse_lora_forward(c["x"], c["weight"], c["mask"], c["A"], None, 1.0)
    with pytest.raises(ValueError, match=r"^sparse_lora_forward: bias must be None or of shape \(16,\)"):
        sparse_lora_forward(c["x"], c["weight"], c["mask"], c["A"], c["B"], 1.0, c["bias"][:8])
    with pytest.raises(ValueError, match="^sparse_lora_forward: all tensors must be on one device, .*bias on meta"):
        sparse_lora_forward(c["x"], c["weight"], c["mask"], c["A"], c["B"], 1.0, c["bias"].to("meta"))
    with pytest.raises(ValueError, match=r"^packed24_matmul: dtype torch.float64 is not supported \(allowed"):
        packed24_matmul(c["x"].double(), p.values.double(), p.meta)


def test_bad_backward_inputs_raise():
    from vlmsparse.kernels.packed24 import packed24_lora_backward
    from vlmsparse.kernels.sparse_lora import sparse_lora_backward

    c = _case(2, 16, 32, 2, torch.float32)
    p = c["packed"]
    with pytest.raises(ValueError, match=r"^packed24_lora_backward: grad_out has shape \(2, 8\), must be \(2, 16\)"):
        packed24_lora_backward(c["dy"][:, :8], c["x"], p.values, p.meta, c["A"], c["B"], 1.0)
    with pytest.raises(ValueError, match="^packed24_lora_backward: grad_out dtype torch.float16 differs"):
        packed24_lora_backward(c["dy"].half(), c["x"], p.values, p.meta, c["A"], c["B"], 1.0)
    with pytest.raises(ValueError, match="^sparse_lora_backward: give both lora_A and lora_B; got lora_A None"):
        sparse_lora_backward(c["dy"], c["x"], c["weight"], c["mask"], None, None, 1.0)
    with pytest.raises(ValueError, match="^sparse_lora_backward: rank mismatch, lora_A has r=2, lora_B has r=1"):
        sparse_lora_backward(c["dy"], c["x"], c["weight"], c["mask"], c["A"], c["B"][:, :1], 1.0)


# ---------------------------------------------------------------------------------------------- through ops
@pytest.mark.parametrize("packed", [False, True])
def test_triton_backend_through_ops_autograd(packed):
    """``vlmsparse.ops`` dispatches backend "triton" to these kernels; gradients match the reference backend."""
    from vlmsparse import ops

    c = _case(9, 32, 64, 4, torch.float32)
    p = c["packed"]

    def run(backend):
        x = c["x"].clone().requires_grad_(True)
        A = c["A"].clone().requires_grad_(True)
        B = c["B"].clone().requires_grad_(True)
        bias = c["bias"].clone().requires_grad_(True)
        with ops.use_backend(backend):
            if packed:
                y = ops.packed24_lora_linear(x, p.values, p.meta, A, B, 2.0, bias)
            else:
                y = ops.sparse_lora_linear(x, c["weight"], c["mask"], A, B, 2.0, bias)
        (y * c["dy"]).sum().backward()
        return y.detach(), x.grad, A.grad, B.grad, bias.grad

    for got, want in zip(run("triton"), run("reference")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with ops.use_backend("triton"):
        y = ops.packed24_linear(c["x"], p.values, p.meta, c["bias"])
    torch.testing.assert_close(y, ref.packed24_matmul_ref(c["x"], p.values, p.meta, c["bias"]), rtol=1e-5, atol=1e-5)


def test_sparse_linear_packed24_through_triton():
    """SparseLinear's packed 2:4 path runs the Triton kernel when the triton backend is selected."""
    from torch import nn

    from vlmsparse import ops
    from vlmsparse.modules.sparse_linear import SparseLinear

    c = _case(7, 48, 64, 4, torch.float16)
    lin = nn.Linear(64, 48, dtype=torch.float16)
    with torch.no_grad():
        lin.weight.copy_(c["w24"])
        lin.bias.copy_(c["bias"])
    sparse = SparseLinear.from_linear(lin, backend="packed24")
    with ops.use_backend("triton"):
        got = sparse(c["x"])
    _check(got, ref.packed24_matmul_ref, (c["x"], c["packed"].values, c["packed"].meta, c["bias"]))


def test_bench_linear_triton_providers_run(tmp_path):
    """The GPU-only providers of benchmarks/bench_linear.py, run on CPU through the interpreter (tiny shape)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_linear.py"
    spec = importlib.util.spec_from_file_location("bench_linear_interp", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.jsonl"
    assert bench.main(["--out", str(out), "--shapes", "64:32", "--tokens", "3", "--dtypes", "fp16"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ran = {(r["case"], r["provider"]) for r in rows}
    for case in ("fwd", "lora_fwd", "lora_fwd_bwd"):
        assert {(case, p) for p in bench.CASES[case] if p not in ("torch24", "cslt")} <= ran  # those two: CUDA only
    assert all(r["error"] is None and r["ms"] > 0 for r in rows)
