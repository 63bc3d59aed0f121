"""vlmsparse.ops: backend selection and the SparseLoRA autograd Functions (reference backend, CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vlmsparse import ops
from vlmsparse.sparse24 import pack24, unpack24_mask
from vlmsparse.sparsity import mask_nm


def _problem(out=6, inp=8, r=3, dtype=torch.float64, batch=(2, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out, inp, generator=g) > 0.4
    weight = (torch.randn(out, inp, generator=g, dtype=dtype) * mask).requires_grad_(False)
    A = torch.randn(r, inp, generator=g, dtype=dtype).requires_grad_(True)
    B = torch.randn(out, r, generator=g, dtype=dtype).requires_grad_(True)  # non-zero: nothing passes trivially
    x = torch.randn(*batch, inp, generator=g, dtype=dtype).requires_grad_(True)
    bias = torch.randn(out, generator=g, dtype=dtype).requires_grad_(True)
    return x, weight, mask, A, B, bias


def _naive(x, weight, mask, A, B, scaling, bias):
    """Autograd over a materialised (B@A)*M: the formula every path must match."""
    return torch.nn.functional.linear(x, weight * mask + scaling * (B @ A) * mask, bias)


def test_forward_and_all_gradients_match_naive_float64():
    x, weight, mask, A, B, bias = _problem()
    s = 1.7
    y = ops.sparse_lora_linear(x, weight, mask, A, B, s, bias, backend="reference")
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B, bias), grad)
    y_naive = _naive(x, weight, mask, A, B, s, bias)
    want = torch.autograd.grad(y_naive, (x, A, B, bias), grad)
    torch.testing.assert_close(y, y_naive, rtol=0, atol=1e-12)
    for g, w, name in zip(got, want, ("x", "A", "B", "bias")):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")
    # the pruned directions get no gradient signal into A, B: dB, dA use G*M, not G
    g_full = grad.reshape(-1, 6).T @ x.detach().reshape(-1, 8)
    wrong_dB = s * g_full @ A.detach().T
    assert not torch.allclose(got[2], wrong_dB)


def test_gradcheck_small_shapes():
    x, weight, mask, A, B, bias = _problem(out=4, inp=5, r=2, batch=(3,))
    assert torch.autograd.gradcheck(
        lambda x, A, B, b: ops.sparse_lora_linear(x, weight, mask, A, B, 0.5, b, backend="reference"), (x, A, B, bias)
    )


def test_zero_weight_adapter_only_path():
    x, _, mask, A, B, _ = _problem()
    zero = ops.zero_weight(6, 8, A)
    assert zero.stride() == (0, 0)
    y = ops.sparse_lora_linear(x, zero, mask, A, B, 2.0)
    torch.testing.assert_close(y, x @ (2.0 * (B @ A) * mask).T)
    assert torch.autograd.gradcheck(lambda x, A, B: ops.sparse_lora_linear(x, zero, mask, A, B, 2.0), (x, A, B))


def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, saved


def test_saves_no_full_size_temporary_between_forward_and_backward():
    x, weight, mask, A, B, bias = _problem(out=16, inp=24, r=2, batch=(4,))
    full = weight.numel()
    _, saved = _saved_tensors(lambda: ops.sparse_lora_linear(x, weight, mask, A, B, 1.0, bias))
    big = [t for t in saved if t.numel() >= full]
    # only the frozen weight and the mask themselves (same storage), nothing newly allocated
    assert big and all(t.data_ptr() in (weight.data_ptr(), mask.data_ptr()) for t in big), [t.shape for t in big]
    # the naive formula does keep a full-size temporary alive: the check can fail
    _, saved_naive = _saved_tensors(lambda: _naive(x, weight, mask, A, B, 1.0, bias))
    assert any(t.numel() >= full and t.data_ptr() not in (weight.data_ptr(), mask.data_ptr()) for t in saved_naive)


def test_frozen_weight_required():
    x, weight, mask, A, B, _ = _problem()
    with pytest.raises(ValueError, match="frozen"):
        ops.sparse_lora_linear(x, weight.clone().requires_grad_(True), mask, A, B, 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask": torch.ones(6, 7, dtype=torch.bool)}, r"mask must be bool of shape \(6, 8\)"),
        ({"mask": torch.ones(6, 8)}, r"mask must be bool .*got torch.float32"),
        ({"weight": torch.zeros(8, dtype=torch.float64)}, r"weight must be 2-D \[out, in\], got shape \(8,\)"),
        ({"A": torch.randn(3, 7, dtype=torch.float64)}, r"lora_A must be \[r, 8\] and lora_B \[6, r\]"),
        ({"A": None}, "give both lora_A and lora_B; got lora_A None"),
        ({"B": torch.randn(6, 2, dtype=torch.float64)}, "rank mismatch, lora_A has r=3, lora_B has r=2"),
        ({"x": torch.randn(2, 7, dtype=torch.float64)}, r"input has shape \(2, 7\), the weight expects 8 features"),
        ({"scaling": torch.tensor(1.0)}, "scaling must be a python number .*got Tensor"),
        ({"bias": torch.zeros(5, dtype=torch.float64)}, r"bias must be None or of shape \(6,\), got \(5,\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    x, weight, mask, A, B, _ = _problem()
    args = {"x": x, "weight": weight, "mask": mask, "A": A, "B": B, "scaling": 1.0, "bias": None} | kwargs
    with pytest.raises(ValueError, match="^sparse_lora_linear: " + match):
        ops.sparse_lora_linear(args["x"], args["weight"], args["mask"], args["A"], args["B"], args["scaling"],
                               args["bias"])


def _packed_problem():
    g = torch.Generator().manual_seed(2)
    dense = torch.randn(4, 16, generator=g, dtype=torch.float64)
    packed = pack24(dense * mask_nm(dense.abs(), 2, 4))
    A = torch.randn(2, 16, generator=g, dtype=torch.float64)
    B = torch.randn(4, 2, generator=g, dtype=torch.float64)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    return x, packed.values, packed.meta, A, B


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"values": torch.zeros(4, 7, dtype=torch.float64)},
         r"values must be \[out, in/2\] with in divisible by 4; got values \(4, 7\) for inputs of 16 features"),
        ({"x": torch.zeros(3, 14, dtype=torch.float64), "values": torch.zeros(4, 7, dtype=torch.float64)},
         r"values must be \[out, in/2\] with in divisible by 4; got values \(4, 7\) for inputs of 14 features"),
        ({"meta": torch.zeros(4, 2, dtype=torch.int8)}, r"meta must be uint8 of shape \(4, 2\), got torch.int8"),
        ({"meta": torch.zeros(4, 3, dtype=torch.uint8)}, r"meta must be uint8 of shape \(4, 2\), got .* \(4, 3\)"),
        ({"A": torch.zeros(2, 8, dtype=torch.float64)}, r"lora_A must be \[r, 16\] and lora_B \[4, r\]"),
        ({"B": torch.zeros(4, 3, dtype=torch.float64)}, "rank mismatch, lora_A has r=2, lora_B has r=3"),
        ({"bias": torch.zeros(16, dtype=torch.float64)}, r"bias must be None or of shape \(4,\), got \(16,\)"),
    ],
)
def test_packed24_bad_arguments(kwargs, match):
    """The packed ops refuse a bad packed weight / adapter / bias with the shared checks' messages; the reference
    twins check the packed weight themselves."""
    x, values, meta, A, B = _packed_problem()
    a = {"x": x, "values": values, "meta": meta, "A": A, "B": B, "bias": None} | kwargs
    with pytest.raises(ValueError, match="^packed24_lora_linear: " + match):
        ops.packed24_lora_linear(a["x"], a["values"], a["meta"], a["A"], a["B"], 1.0, a["bias"])
    if "A" not in kwargs and "B" not in kwargs:
        with pytest.raises(ValueError, match="^packed24_linear: " + match):
            ops.packed24_linear(a["x"], a["values"], a["meta"], a["bias"], backend="reference")
    if "values" in kwargs or "meta" in kwargs:
        from vlmsparse.kernels import reference

        with pytest.raises(ValueError, match="^packed24_matmul_ref: " + match):
            reference.packed24_matmul_ref(a["x"], a["values"], a["meta"])
        with pytest.raises(ValueError, match="^packed24_lora_forward_ref: " + match):
            reference.packed24_lora_forward_ref(a["x"], a["values"], a["meta"], A, B, 1.0)
        with pytest.raises(ValueError, match="^packed24_lora_backward_ref: " + match):
            reference.packed24_lora_backward_ref(x @ torch.zeros(16, 4, dtype=x.dtype), a["x"], a["values"],
                                                 a["meta"], A, B, 1.0)


# ------------------------------------------------------------------------------------------ shared checks
def test_checks_return_the_sizes_of_valid_arguments():
    from vlmsparse.kernels import checks

    x, weight, mask, A, B, bias = _problem()
    assert checks.check_mask(weight, mask, "f") == (6, 8)
    assert checks.check_lora(A, B, 6, 8, "f") == 3
    assert checks.check_lora(None, None, 6, 8, "f", optional=True) == 0
    _, values, meta, _, _ = _packed_problem()
    assert checks.check_packed(values, meta, 16, "f") == 4
    for check in (checks.check_features(x, 8, "f"), checks.check_bias(bias, 6, "f"), checks.check_bias(None, 6, "f"),
                  checks.check_scaling(2, "f"), checks.check_kernel_dtype(x.float(), torch.float32, "f"),
                  checks.check_grad_out(torch.zeros(2, 5, 6), x.float(), 6, "f"),
                  checks.check_same_device("f", x=x, weight=weight, bias=None)):
        assert check is None


def _kernel_inputs(**kwargs):
    """Arguments of ``check_kernel_inputs`` for a valid float32 problem, with ``kwargs`` replaced."""
    x, weight, mask, A, B, bias = _problem(dtype=torch.float32)
    args = dict(x=x, weight=weight, mask=mask, out_features=6, in_features=8, lora_A=A, lora_B=B, bias=bias,
                grad_out=torch.zeros(2, 5, 6), lora_optional=True) | kwargs
    return args


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"x": torch.zeros(2, 5, 8, dtype=torch.float64), "grad_out": None},
         r"dtype torch.float64 is not supported \(allowed: float32, float16, bfloat16\)"),
        ({"x": torch.zeros(2, 5, 8, dtype=torch.float16), "grad_out": None},
         "input dtype torch.float16 differs from the weight dtype torch.float32; they must match"),
        ({"x": torch.zeros(2, 5, 7)}, r"input has shape \(2, 5, 7\), the weight expects 8 features"),
        ({"lora_A": None}, r"give both lora_A and lora_B, or neither; got lora_A None and lora_B \(6, 3\)"),
        ({"lora_A": None, "lora_B": None, "lora_optional": False}, "give both lora_A and lora_B; got lora_A None"),
        ({"lora_B": torch.zeros(6, 2)}, "rank mismatch"),
        ({"bias": torch.zeros(1, 6)}, r"bias must be None or of shape \(6,\), got \(1, 6\)"),
        ({"grad_out": torch.zeros(2, 5, 6, dtype=torch.float16)},
         "grad_out dtype torch.float16 differs from the input dtype torch.float32; they must match"),
        ({"grad_out": torch.zeros(10, 6)}, r"grad_out has shape \(10, 6\), must be \(2, 5, 6\)"),
        ({"grad_out": torch.zeros(2, 5, 7)}, r"grad_out has shape \(2, 5, 7\), must be \(2, 5, 6\)"),
        ({"bias": torch.zeros(6, device="meta")}, "all tensors must be on one device, got x on cpu, .*bias on meta"),
    ],
)
def test_kernel_input_checks(kwargs, match):
    """The checks every Triton launcher makes (the launchers themselves run in the interpreter tier)."""
    from vlmsparse.kernels.checks import check_kernel_inputs

    check_kernel_inputs("launcher", **_kernel_inputs())  # the valid problem passes
    with pytest.raises(ValueError, match="^launcher: " + match):
        check_kernel_inputs("launcher", **_kernel_inputs(**kwargs))


def test_packed24_lora_matches_naive_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(4, 8, generator=g, dtype=torch.float64)
    mask = mask_nm(dense.abs(), 2, 4)
    packed = pack24(dense * mask, mask)
    assert torch.equal(unpack24_mask(packed), mask)
    A = torch.randn(2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = ops.packed24_lora_linear(x, packed.values, packed.meta, A, B, 1.5)
    torch.testing.assert_close(y, _naive(x, dense * mask, mask, A, B, 1.5, None))
    assert torch.autograd.gradcheck(
        lambda x, A, B: ops.packed24_lora_linear(x, packed.values, packed.meta, A, B, 1.5), (x, A, B)
    )
    y2 = ops.packed24_linear(x.detach(), packed.values, packed.meta, backend="reference")
    torch.testing.assert_close(y2, x.detach() @ (dense * mask).T)


# ------------------------------------------------------------------------------------------ selection
def test_resolution_order(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.resolve_backend("cpu") == "reference"
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):  # env-selected on CPU: says why
        ops.resolve_backend("cpu")
    with ops.use_backend("reference"):  # context beats env
        assert ops.resolve_backend("cpu") == "reference"
        assert ops.current_backend() == ("reference", "context")
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    with ops.use_backend("triton"):
        with pytest.raises(RuntimeError, match="triton"):
            ops.resolve_backend("cpu")
        assert ops.resolve_backend("cpu", "reference") == "reference"  # argument beats context
    monkeypatch.setenv(ops.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="VLMSPARSE_BACKEND"):
        ops.resolve_backend("cpu")


def test_unknown_and_unsupported_backends(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="allowed: reference, triton, torch24, dense_gemm"):
        ops.resolve_backend("cpu", "cuda")
    with pytest.raises(ValueError, match="allowed"):
        with ops.use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="does not implement sparse_lora"):
        ops.resolve_backend("cpu", "torch24", op="sparse_lora")
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.resolve_backend("cpu", "torch24", op="packed24_matmul")
    with ops.use_backend("torch24"):  # a model-wide torch24 choice: SparseLoRA layers fall back
        assert ops.resolve_backend("cpu", op="sparse_lora") == "reference"


def test_triton_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        ops.resolve_backend("cpu", "triton")


def test_import_loads_no_triton_and_no_kernels():
    """The package, the dispatcher and the checks import neither triton nor a kernel module. The SparseLoRA layer
    is a peft layer, and ``import peft`` reaches ``torch._dynamo``, which imports triton when it is installed: the
    layer and the pipeline import nothing of triton beyond that, and no kernel module."""
    code = (
        "import sys\n"
        "def bad(names):\n"
        "    return [m for m in names if m == 'triton' or m.startswith('triton.') or "
        "m in ('vlmsparse.kernels.sparse_lora', 'vlmsparse.kernels.packed24')]\n"
        "import vlmsparse, vlmsparse.ops, vlmsparse.kernels.checks\n"
        "assert not bad(sys.modules), bad(sys.modules)\n"
        "import peft\n"
        "before = set(sys.modules)\n"
        "import vlmsparse.modules.sparse_lora, vlmsparse.pipeline.lora\n"
        "assert not bad(set(sys.modules) - before), bad(set(sys.modules) - before)\n"
        "assert not [m for m in sys.modules if m.startswith('vlmsparse.kernels.') and m != 'vlmsparse.kernels.checks' "
        "and m != 'vlmsparse.kernels.reference']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_blocked_reference_matches_naive(monkeypatch):
    """Large layers are processed in blocks of output rows: same values and gradients as one block."""
    from vlmsparse.kernels import reference

    x, weight, mask, A, B, bias = _problem(out=10, inp=8, r=2, batch=(7,))
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 24)  # 3 rows per block -> 4 blocks, the last short
    assert len(reference._row_blocks(10, 8)) == 4
    y = ops.sparse_lora_linear(x, weight, mask, A, B, 1.3, bias)
    torch.testing.assert_close(y, _naive(x, weight, mask, A, B, 1.3, bias), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, A, B, b: ops.sparse_lora_linear(x, weight, mask, A, B, 1.3, b), (x, A, B, bias)
    )


def test_public_lazy_names():
    """Every public name of ``vlmsparse`` resolves after a plain ``import vlmsparse`` (the README uses them so)."""
    import vlmsparse

    for name in vlmsparse.__all__:
        assert getattr(vlmsparse, name) is not None, name
    assert vlmsparse.generate_answers.__module__.startswith("vlmsparse.eval.vqa")

    for name in ("SparseLoRALinear", "add_sparse_lora", "merge_sparse_lora", "remove_sparse_lora",
                 "mask_gradients", "teacher_mode", "sparse_lora_config", "save_sparse_lora", "load_sparse_lora"):
        assert callable(getattr(vlmsparse, name)), name


def native_built() -> bool:
    from vlmsparse.kernels import cpu

    return cpu.native_available()


def test_device_defaults_per_op(monkeypatch):
    """The table DEVICE_DEFAULTS: dense GEMMs train SparseLoRA on CUDA, the packed matmul prefers Triton there;
    the CPU trains on the reference twins and runs the inference matmuls on the native kernels for float32 /
    bfloat16 (reference for other dtypes). Resolution needs no GPU (device objects only)."""
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.resolve_backend("cuda", op="sparse_lora") == "dense_gemm"
    assert ops.resolve_backend("cuda", op="packed24_lora") == "dense_gemm"
    assert ops.resolve_backend("cuda", op="packed24_matmul") == "triton"
    assert ops.resolve_backend("cuda", op="bitmask_matmul") == "reference"
    for op in ("sparse_lora", "packed24_lora"):
        assert ops.resolve_backend("cpu", op=op) == "reference"
    for op in ("packed24_matmul", "bitmask_matmul"):
        assert ops.resolve_backend("cpu", op=op, dtype=torch.float16) == "reference"
        for dtype in (torch.float32, torch.bfloat16):
            assert ops.resolve_backend("cpu", op=op, dtype=dtype) == ("native" if native_built() else "reference")
    with ops.use_backend("torch24"):  # not a SparseLoRA backend: that op's device default
        assert ops.resolve_backend("cuda", op="sparse_lora") == "dense_gemm"
    with ops.use_backend("triton"):  # the fused kernels stay selectable
        assert ops.resolve_backend("cuda", op="sparse_lora") == "triton"
    monkeypatch.setattr(ops, "triton_available", lambda: False)  # first runnable preference wins
    ops.clear_backend_cache()  # what decides runnability changed: cached resolutions are stale
    assert ops.resolve_backend("cuda", op="packed24_matmul") == "dense_gemm"


def test_a_new_backend_is_rows_in_the_tables(monkeypatch):
    """How a backend plugs in (e.g. a native CPU one): a name, its implementations, optionally a runnable check
    and a device preference; dispatch, the custom ops and the autograd need nothing else."""
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    calls = []

    def forward(x, values, meta, bias=None):
        calls.append(x.shape)
        return ops._function("packed24_matmul", "reference", "forward")(x, values, meta, bias)

    import vlmsparse.kernels.reference as reference

    monkeypatch.setattr(reference, "plugin_packed24_matmul", forward, raising=False)
    monkeypatch.setattr(ops, "BACKENDS", (*ops.BACKENDS, "plugin"))
    monkeypatch.setitem(ops.IMPLEMENTATIONS, "packed24_matmul",
                        {**ops.IMPLEMENTATIONS["packed24_matmul"], "plugin": ops.Impl("reference", "plugin_packed24_matmul")})
    monkeypatch.setitem(ops.DEVICE_DEFAULTS, "packed24_matmul", {"cpu": ("plugin",), "cuda": ("triton",)})
    x, values, meta, _, _ = _packed_problem()
    assert ops.resolve_backend("cpu", op="packed24_matmul") == "plugin"
    y = ops.packed24_linear(x, values, meta)
    assert calls == [x.shape]
    torch.testing.assert_close(y, ops.packed24_linear(x, values, meta, backend="reference"))
    with pytest.raises(ValueError, match="does not implement sparse_lora"):
        ops.resolve_backend("cpu", "plugin", op="sparse_lora")
    ops._function.cache_clear()
