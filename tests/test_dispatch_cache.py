"""The cache of vlmsparse.ops.resolve_backend (eager calls) and the unchecked native path of SparseLinear.

The cache must give what the uncached resolution (``ops._resolve``) gives in every context, for every value of the
environment variables it depends on, per thread, and raise the same errors on every call (errors are not cached).
"""

from __future__ import annotations

import contextlib
import itertools
import threading

import pytest
import torch
from tolerances import assert_close_to_reference
from torch import nn

from vlmsparse import ops
from vlmsparse.modules.sparse_linear import SparseLinear
from vlmsparse.sparse24 import pack24
from vlmsparse.sparsity import mask_nm

DEVICES = ("cpu", torch.device("cpu"), "cuda", torch.device("cuda", 1))
OPS = (None, *ops.IMPLEMENTATIONS)
DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)
ENVS = (None, "reference", "native", " dense_gemm ", "triton", "torch24", "nonsense")


def _outcome(fn, *args, **kwargs):
    """``("ok", name)`` or ``(exception type, message)``."""
    try:
        return "ok", fn(*args, **kwargs)
    except (ValueError, RuntimeError) as error:
        return type(error), str(error)


# use_backend names entered outermost first: none, one, nested with an inner None, nested with an inner name
CONTEXTS = ((), (None,), ("reference",), ("native",), ("torch24",), ("reference", None), ("dense_gemm", "triton"))


def _entered(names: tuple) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for name in names:
        stack.enter_context(ops.use_backend(name))
    return stack


def _grid_outcomes():
    out = []
    for device, backend, op, dtype in itertools.product(DEVICES, (None, *ops.BACKENDS, "cuda"), OPS, DTYPES):
        cached = _outcome(ops.resolve_backend, device, backend, op=op, dtype=dtype)
        uncached = _outcome(ops._resolve, device, backend, op, dtype)
        out.append(((device, backend, op, dtype), cached, uncached))
    return out


@pytest.mark.parametrize("interpret", [None, "1"])
def test_cache_equals_uncached_resolution_everywhere(monkeypatch, interpret):
    """Every (device, backend argument, op, dtype) under every context and value of $VLMSPARSE_BACKEND, twice
    over (the second pass from a warm cache, filled under all the other contexts and values)."""
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    seen = set()
    for _ in range(2):
        for env, names in itertools.product(ENVS, CONTEXTS):
            if env is None:
                monkeypatch.delenv(ops.ENV_VAR, raising=False)
            else:
                monkeypatch.setenv(ops.ENV_VAR, env)
            with _entered(names):
                for args, cached, uncached in _grid_outcomes():
                    assert cached == uncached, (env, names, args)
                    seen.add(cached[0] if cached[0] != "ok" else cached[1])
    # the grid reaches every backend and both kinds of error
    assert {ValueError, RuntimeError, "reference", "triton", "dense_gemm", "torch24"} <= seen


def test_hits_skip_the_resolution_and_errors_are_not_cached(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    calls = []
    uncached = ops._resolve

    def counting(*args):
        calls.append(args)
        return uncached(*args)

    monkeypatch.setattr(ops, "_resolve", counting)
    for _ in range(3):
        assert ops.resolve_backend("cpu", op="sparse_lora") == "reference"
    assert len(calls) == 1
    for _ in range(3):  # an error is raised by the resolution itself on every call
        with pytest.raises(RuntimeError, match=r"backend 'torch24' \(argument\) needs a CUDA tensor"):
            ops.resolve_backend("cpu", "torch24", op="packed24_matmul")
    assert len(calls) == 4
    monkeypatch.setenv(ops.ENV_VAR, "nonsense")
    for _ in range(2):
        with pytest.raises(ValueError, match="environment variable VLMSPARSE_BACKEND: unknown backend 'nonsense'"):
            ops.resolve_backend("cpu", op="sparse_lora")
    assert len(calls) == 6
    assert all(name != "torch24" for name in ops._RESOLVED.values()) and len(ops._RESOLVED) == 1


def test_environment_set_changed_and_unset(monkeypatch):
    """$VLMSPARSE_BACKEND and $TRITON_INTERPRET changed through os.environ between calls, cache warm."""
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ops.resolve_backend("cpu") == "reference"
    monkeypatch.setenv(ops.ENV_VAR, "dense_gemm")
    assert ops.resolve_backend("cpu") == "dense_gemm"
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.resolve_backend("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if ops.triton_available():
        assert ops.resolve_backend("cpu") == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.resolve_backend("cpu")
    monkeypatch.setenv(ops.ENV_VAR, "dense_gemm")
    assert ops.resolve_backend("cpu") == "dense_gemm"
    monkeypatch.delenv(ops.ENV_VAR)
    assert ops.resolve_backend("cpu") == "reference"


def test_nested_contexts_and_the_argument(monkeypatch, native):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)

    def packed(backend=None):
        return ops.resolve_backend("cpu", backend, op="packed24_matmul", dtype=torch.float32)

    assert packed() == "native"
    with ops.use_backend("reference"):
        assert packed() == "reference"
        with ops.use_backend(None):  # no override of its own: the outer one holds
            assert packed() == "reference" and ops.current_backend() == ("reference", "context")
        with ops.use_backend("dense_gemm"):
            assert packed() == "dense_gemm"
            assert packed("native") == "native"  # the argument beats every context
        assert packed() == "reference"
    assert packed() == "native" and ops.current_backend() == (None, "default")
    with pytest.raises(RuntimeError):  # a context left by an error is popped
        with ops.use_backend("reference"):
            raise RuntimeError("inside")
    assert packed() == "native"


def test_contexts_are_per_thread(monkeypatch, native):
    """A use_backend in one thread does not leak into another running at the same time, cache warm in both."""
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def other():
        with ops.use_backend("reference"):
            seen["other before"] = ops.resolve_backend("cpu", op="packed24_matmul", dtype=torch.float32)
            inside.set()
            done.wait(30)
            seen["other after"] = ops.resolve_backend("cpu", op="packed24_matmul", dtype=torch.float32)
        seen["other out"] = ops.resolve_backend("cpu", op="packed24_matmul", dtype=torch.float32)

    thread = threading.Thread(target=other)
    thread.start()
    assert inside.wait(30)
    with ops.use_backend("dense_gemm"):
        seen["main in"] = ops.resolve_backend("cpu", op="packed24_matmul", dtype=torch.float32)
        done.set()
        thread.join(30)
    seen["main out"] = ops.resolve_backend("cpu", op="packed24_matmul", dtype=torch.float32)
    assert seen == {"other before": "reference", "other after": "reference", "other out": "native",
                    "main in": "dense_gemm", "main out": "native"}


def test_compiled_code_follows_the_context(monkeypatch, native):
    """Under torch.compile the resolution is traced (not cached): a context entered after compiling recompiles."""
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    torch._dynamo.reset()

    def name_length(x):
        return x + len(ops.resolve_backend(x.device, op="packed24_matmul", dtype=x.dtype))

    compiled = torch.compile(name_length, fullgraph=True, backend="eager")
    x = torch.zeros(2)
    assert compiled(x).tolist() == [6.0, 6.0]  # native
    with ops.use_backend("reference"):
        assert compiled(x).tolist() == [9.0, 9.0]
    with ops.use_backend("dense_gemm"):
        assert compiled(x).tolist() == [10.0, 10.0]
    assert compiled(x).tolist() == [6.0, 6.0]
    assert not ops._RESOLVED  # compiled code does not fill the cache


# ------------------------------------------------------------------------------------------ SparseLinear
def _weight24(out=24, inp=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    return (w * mask_nm(w.abs(), 2, 4)).to(dtype)


def _refuse(*args, **kwargs):
    raise AssertionError("a per-call Python argument check ran")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["packed24", "bitmask"])
def test_sparse_linear_reaches_the_native_op_without_per_call_checks(native, op_spy, monkeypatch, dtype, backend):
    """Checks ran at construction; forward goes to the native op with none of the Python checks, and keeps the
    switch to the dense-GEMM path from dense_from_rows(backend, dtype) rows of x on (bit for bit F.linear there)."""
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    weight = _weight24(dtype=dtype)
    bias = torch.randn(24).to(dtype)
    layer = SparseLinear(weight, bias, backend=backend)
    spy = op_spy
    monkeypatch.setattr(native, "_ops", lambda: spy)
    for name in ("check_features", "check_packed", "check_bitmask", "check_bias", "_check"):
        monkeypatch.setattr(native, name, _refuse)
    for name in ("check_packed", "check_bitmask", "check_bias"):
        monkeypatch.setattr(ops, name, _refuse)
    op = "packed24_linear" if backend == "packed24" else "bitmask_linear"
    x = torch.randn(3, 64).to(dtype)
    with torch.no_grad():
        y = layer(x)
    assert_close_to_reference(y, nn.functional.linear(x, weight, bias),
                              nn.functional.linear(x.double(), weight.double(), bias.double()))
    assert spy.names == [op]
    x = torch.randn(2, native.dense_from_rows(backend, dtype) // 2, 64).to(dtype)  # dense_from_rows rows in all
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y, nn.functional.linear(x, weight, bias)) and spy.names == [op, f"{op}_dense"]
    with pytest.raises(AssertionError, match="per-call Python argument check"):  # the public entries do check
        if backend == "packed24":
            ops.packed24_linear(x, layer.values, layer.meta)
        else:
            ops.bitmask_linear(x, layer.values, layer.bitmask, layer.row_offsets)


def test_public_functions_still_refuse_bad_input_on_native(native):
    """ops.packed24_linear / bitmask_linear check shapes in Python; a dtype the native op cannot take is refused
    by the C++ op (the unchecked native path), naming both dtypes."""
    weight = _weight24()
    packed = pack24(weight)
    with pytest.raises(ValueError, match=r"packed24_linear: values must be \[out, in/2\]"):
        ops.packed24_linear(torch.randn(2, 60), packed.values, packed.meta, backend="native")
    with pytest.raises(RuntimeError, match="values dtype BFloat16 differs from x dtype Float"):
        ops.packed24_linear(torch.randn(2, 64), packed.values.bfloat16(), packed.meta, backend="native")
    with pytest.raises(ValueError, match="both be float32 or both bfloat16"):  # the checked kernel entry
        native.packed24_matmul(torch.randn(2, 64), packed.values.bfloat16(), packed.meta)
