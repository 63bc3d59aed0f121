"""The ``torch.library`` custom ops of vlmsparse.ops (CPU: reference and dense_gemm backends): registration
(``opcheck``: schema, fake tensors, autograd registration, AOT dispatch), the eager path equal to the op path, and
``torch.compile(fullgraph=True)`` of models with SparseLinear / SparseLoRALinear layers matching eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmsparse import ops
from vlmsparse.modules.sparse_linear import SparseLinear
from vlmsparse.modules.sparse_lora import SparseLoRALinear
from vlmsparse.sparse24 import pack24
from vlmsparse.sparsity import mask_nm

CPU_BACKENDS = ["reference", "dense_gemm"]


def _problem(out=8, inp=16, r=2, batch=(2, 3), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(out, inp, generator=g, dtype=dtype)
    mask = mask_nm(dense.abs(), 2, 4)
    weight = torch.where(mask, dense, torch.zeros((), dtype=dtype))
    A = torch.randn(r, inp, generator=g, dtype=dtype).requires_grad_(True)
    B = torch.randn(out, r, generator=g, dtype=dtype).requires_grad_(True)
    x = torch.randn(*batch, inp, generator=g, dtype=dtype).requires_grad_(True)
    bias = torch.randn(out, generator=g, dtype=dtype).requires_grad_(True)
    return x, weight, mask, A, B, bias


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_lora_ops(backend):
    x, weight, mask, A, B, bias = _problem()
    packed = pack24(weight)
    dy = torch.randn(2, 3, 8)
    zero = ops.zero_weight(8, 16, weight)  # the adapter-only path: a stride-0 weight
    cases = [
        (torch.ops.vlmsparse.sparse_lora_linear.default, (x, weight, mask, A, B, 2.0, bias, backend)),
        (torch.ops.vlmsparse.sparse_lora_linear.default, (x, weight, mask, A, B, 2.0, None, backend)),
        (torch.ops.vlmsparse.sparse_lora_linear.default, (x, zero, mask, A, B, 2.0, None, backend)),
        (torch.ops.vlmsparse.packed24_lora_linear.default, (x, packed.values, packed.meta, A, B, 2.0, bias, backend)),
    ]
    for need_x in (True, False):
        cases += [
            (torch.ops.vlmsparse.sparse_lora_backward.default,
             (dy, x.detach(), weight, mask, A.detach(), B.detach(), 2.0, need_x, backend)),
            (torch.ops.vlmsparse.packed24_lora_backward.default,
             (dy, x.detach(), packed.values, packed.meta, A.detach(), B.detach(), 2.0, need_x, backend)),
        ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_packed24_linear(backend):
    x, weight, _, _, _, bias = _problem()
    packed = pack24(weight)
    for args in ((x, packed.values, packed.meta, bias, backend), (x.detach(), packed.values, packed.meta, None, backend)):
        torch.library.opcheck(torch.ops.vlmsparse.packed24_linear.default, args)


def _grads(y, inputs):
    grad = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    return (y, *torch.autograd.grad(y, inputs, grad))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_eager_path_equals_the_custom_op(backend):
    """Eager calls bypass the dispatcher (an autograd Function over the same implementation): same values and
    gradients, bit for bit, as the registered op with its registered autograd."""
    x, weight, mask, A, B, bias = _problem()
    inputs = (x, A, B, bias)
    eager = _grads(ops.sparse_lora_linear(x, weight, mask, A, B, 2.0, bias, backend=backend), inputs)
    op = _grads(torch.ops.vlmsparse.sparse_lora_linear(x, weight, mask, A, B, 2.0, bias, backend), inputs)
    for e, o in zip(eager, op):
        assert torch.equal(e, o)
    packed = pack24(weight)
    eager = _grads(ops.packed24_lora_linear(x, packed.values, packed.meta, A, B, 2.0, bias, backend=backend), inputs)
    op = _grads(torch.ops.vlmsparse.packed24_lora_linear(x, packed.values, packed.meta, A, B, 2.0, bias, backend),
                inputs)
    for e, o in zip(eager, op):
        assert torch.equal(e, o)
    eager = _grads(ops.packed24_linear(x, packed.values, packed.meta, bias, backend=backend), (x, bias))
    op = _grads(torch.ops.vlmsparse.packed24_linear(x, packed.values, packed.meta, bias, backend), (x, bias))
    want = _grads(nn.functional.linear(x, weight, bias), (x, bias))
    for e, o, w in zip(eager, op, want):
        assert torch.equal(e, o)
        torch.testing.assert_close(e, w)


def test_no_gradient_needed_runs_the_implementation_without_autograd():
    x, weight, mask, A, B, bias = _problem()
    with torch.no_grad():
        y = ops.sparse_lora_linear(x, weight, mask, A, B, 2.0, bias)
    assert y.grad_fn is None
    torch.testing.assert_close(y, ops.sparse_lora_linear(x, weight, mask, A, B, 2.0, bias).detach())


# ------------------------------------------------------------------------------------------ torch.compile
class _Block(nn.Module):
    """SparseLinear (packed 2:4) -> SparseLoRALinear -> SparseLinear (dense storage)."""

    def __init__(self) -> None:
        super().__init__()
        _, w1, _, _, _, b1 = _problem(out=16, inp=16, seed=1)
        self.first = SparseLinear(w1, b1.detach(), backend="packed24")
        _, w2, m2, _, _, _ = _problem(out=12, inp=16, seed=2)
        base = nn.Linear(16, 12)
        with torch.no_grad():
            base.weight.copy_(w2)
        self.lora = SparseLoRALinear(base, m2, r=4, lora_alpha=8, init_lora_weights=False)
        _, w3, _, _, _, _ = _problem(out=4, inp=12, seed=3)
        self.last = SparseLinear(w3, None, backend="dense")

    def forward(self, x):
        return self.last(torch.relu(self.lora(torch.relu(self.first(x)))))


def _train_outputs(model, x):
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    return (y, *torch.autograd.grad(y.pow(2).sum(), (x, *params)))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_matches_eager(backend, one_thread):
    torch._dynamo.reset()
    model = _Block()
    x = torch.randn(2, 5, 16)
    with ops.use_backend(backend):
        want = _train_outputs(model, x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        got = _train_outputs(compiled, x)
    assert len(got) == 5  # y, dx, and the SparseLoRA layer's bias, A, B
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_compile_inductor_fullgraph_matches_eager(one_thread):
    """Inductor (the default compiler) around the opaque custom ops."""
    torch._dynamo.reset()
    model = _Block()
    x = torch.randn(3, 16)
    want = _train_outputs(model, x)
    got = _train_outputs(torch.compile(model, fullgraph=True), x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_tiny_llama_with_sparse_lora(one_thread):
    from factories import tiny_llama

    from vlmsparse.pipeline.lora import add_sparse_lora
    from vlmsparse.sparsity import build_mask

    torch._dynamo.reset()
    model = tiny_llama(0).eval()
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            masks[name] = build_mask(module.weight.detach().abs(), "2:4")
            with torch.no_grad():
                module.weight.masked_fill_(~masks[name], 0)
    add_sparse_lora(model, masks, r=4, init_lora_weights=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))

    def run(m):
        logits = m(input_ids=ids).logits
        params = [p for p in model.parameters() if p.requires_grad]
        return (logits, *torch.autograd.grad(logits.pow(2).mean(), params))

    want = run(model)
    got = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert len(got) == 1 + 2 * len(masks)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_opcheck_inference_ops_on_cpu(backend, native):
    """``vlmsparse::packed24_linear`` and ``vlmsparse::bitmask_linear`` over the reference twins and the native
    CPU kernels (the CPU default for float32 / bfloat16), and the public functions equal to the op."""
    from vlmsparse.bitmask import pack_bitmask_weight

    x, weight, _, _, _, bias = _problem()
    packed, stored = pack24(weight), pack_bitmask_weight(weight)
    x, bias = x.detach(), bias.detach()
    for args in ((x, packed.values, packed.meta, bias, backend), (x, packed.values, packed.meta, None, backend)):
        torch.library.opcheck(torch.ops.vlmsparse.packed24_linear.default, args)
    for b in (bias, None):
        args = (x, stored.values, stored.bitmask, stored.row_offsets, b, backend)
        torch.library.opcheck(torch.ops.vlmsparse.bitmask_linear.default, args)
        torch.testing.assert_close(ops.bitmask_linear(*args[:5], backend=backend),
                                   torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)
        assert torch.equal(ops.bitmask_linear(*args[:5], backend=backend), torch.ops.vlmsparse.bitmask_linear(*args))


def test_bitmask_backend_choice_and_errors(monkeypatch, native):
    """bitmask_matmul: native by default for float32 / bfloat16 CPU inputs, reference for other dtypes; no
    backend but those two implements it; native refuses what it cannot run with what is allowed."""
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.resolve_backend("cpu", op="bitmask_matmul", dtype=torch.bfloat16) == "native"
    assert ops.resolve_backend("cpu", op="bitmask_matmul", dtype=torch.float64) == "reference"
    with pytest.raises(ValueError, match="does not implement bitmask_matmul; allowed: reference, native"):
        ops.resolve_backend("cpu", "triton", op="bitmask_matmul")
    with pytest.raises(RuntimeError, match=r"backend 'native' \(argument\) takes torch.float32, torch.bfloat16"):
        ops.resolve_backend("cpu", "native", op="bitmask_matmul", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="runs on CPU tensors, got a cuda tensor"):
        ops.resolve_backend("cuda", "native", op="packed24_matmul")
    with ops.use_backend("native"):  # a model-wide choice still trains SparseLoRA layers (device default)
        assert ops.resolve_backend("cpu", op="sparse_lora") == "reference"
