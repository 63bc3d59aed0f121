"""ops -> Triton kernels wiring, run by the Triton interpreter on CPU (TRITON_INTERPRET=1, .ci/run's second
pytest process). The kernels' own accuracy tests are the kernel files' tests; this checks the autograd
Functions and the backend dispatch end to end."""

from __future__ import annotations

import pytest
import torch

from vlmsparse import ops
from vlmsparse.sparse24 import pack24
from vlmsparse.sparsity import mask_nm

pytestmark = pytest.mark.interpret


def _problem(out=32, inp=64, r=4, tokens=16):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out, inp, generator=g)
    mask = mask_nm(weight.abs(), 2, 4)
    weight = weight * mask
    A = torch.randn(r, inp, generator=g).requires_grad_(True)
    B = torch.randn(out, r, generator=g).requires_grad_(True)
    x = torch.randn(2, tokens // 2, inp, generator=g).requires_grad_(True)
    bias = torch.randn(out, generator=g).requires_grad_(True)
    return x, weight, mask, A, B, bias


def _run(fn, x, A, B, bias):
    y = fn()
    grad = torch.ones_like(y)
    return (y, *torch.autograd.grad(y, (x, A, B, bias), grad))


def test_env_selects_triton_on_cpu_under_interpreter(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    assert ops.resolve_backend("cpu") == "triton"


def test_sparse_lora_linear_triton_matches_reference():
    x, weight, mask, A, B, bias = _problem()
    got = _run(lambda: ops.sparse_lora_linear(x, weight, mask, A, B, 2.0, bias, backend="triton"), x, A, B, bias)
    want = _run(lambda: ops.sparse_lora_linear(x, weight, mask, A, B, 2.0, bias, backend="reference"), x, A, B, bias)
    for g, w, name in zip(got, want, ("y", "x", "A", "B", "bias")):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)


def test_packed24_lora_linear_triton_matches_reference():
    x, weight, mask, A, B, bias = _problem()
    packed = pack24(weight, mask)
    fn = lambda backend: ops.packed24_lora_linear(  # noqa: E731
        x, packed.values, packed.meta, A, B, 2.0, bias, backend=backend)
    got = _run(lambda: fn("triton"), x, A, B, bias)
    want = _run(lambda: fn("reference"), x, A, B, bias)
    for g, w, name in zip(got, want, ("y", "x", "A", "B", "bias")):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)
    y = ops.packed24_linear(x.detach(), packed.values, packed.meta, bias.detach(), backend="triton")
    torch.testing.assert_close(y, x.detach() @ weight.T + bias.detach(), rtol=1e-4, atol=1e-4)


def test_triton_custom_ops_opcheck():
    """The custom ops with the Triton backend: fake implementations agree with the kernels' outputs (shapes,
    dtypes, strides), autograd registration, AOT dispatch."""
    x, weight, mask, A, B, bias = _problem(tokens=8)
    packed = pack24(weight, mask)
    dy = torch.randn(2, 4, 32)
    cases = [
        (torch.ops.vlmsparse.sparse_lora_linear.default, (x, weight, mask, A, B, 2.0, bias, "triton")),
        (torch.ops.vlmsparse.packed24_lora_linear.default, (x, packed.values, packed.meta, A, B, 2.0, None, "triton")),
        (torch.ops.vlmsparse.packed24_linear.default, (x, packed.values, packed.meta, bias, "triton")),
        (torch.ops.vlmsparse.sparse_lora_backward.default,
         (dy, x.detach(), weight, mask, A.detach(), B.detach(), 2.0, True, "triton")),
        (torch.ops.vlmsparse.packed24_lora_backward.default,
         (dy, x.detach(), packed.values, packed.meta, A.detach(), B.detach(), 2.0, False, "triton")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
