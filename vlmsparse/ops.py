"""The ONE place that chooses a compute backend, the ``torch.library`` custom ops and their autograd (layer 2).

Backends (:data:`BACKENDS`):

- ``"reference"``: the pure-torch twins in :mod:`vlmsparse.kernels.reference`, blocked so that no full-size
  temporary exists even inside a call (default on CPU);
- ``"triton"``: the fused Triton kernels in :mod:`vlmsparse.kernels.sparse_lora` and
  :mod:`vlmsparse.kernels.packed24` (the CUDA default of the plain packed 2:4 matmul; on CPU only under
  ``TRITON_INTERPRET=1``);
- ``"torch24"``: torch semi-structured sparse (cuSPARSELt / CUTLASS, :mod:`vlmsparse.kernels.torch24`), CUDA
  only, inference only, for merged 2:4 weights (:func:`packed24_linear`, :func:`torch24_linear`);
- ``"dense_gemm"``: the SparseLoRA math decomposed onto full-size dense GEMMs (:mod:`vlmsparse.kernels.dense_gemm`:
  the effective weight formed once per call, cuBLAS for the products; the CUDA default of the SparseLoRA ops,
  measured faster than the fused kernels on an H200); for the plain packed matmul it is unpack + ``F.linear``;
- ``"native"``: the C++ CPU kernels in :mod:`vlmsparse.kernels.cpu` (built by ``pip install`` from ``csrc/``),
  inference only, float32 / bfloat16: :func:`packed24_linear` and :func:`bitmask_linear`; the CPU default of
  those ops for those dtypes when the extension is built.

Which backend implements which op is the table :data:`IMPLEMENTATIONS` (op -> backend -> where the functions
live); :data:`DEVICE_DEFAULTS` gives each op's preference per device type (first runnable wins, else
``"reference"``); :data:`_RUNNABLE` says why a backend cannot run on a device. A new backend is one name in
:data:`BACKENDS`, its rows in :data:`IMPLEMENTATIONS` (functions with the signatures of the reference twins),
optionally a check in :data:`_RUNNABLE` (of the device and, where it matters, the dtype) and a place in
:data:`DEVICE_DEFAULTS`; nothing else changes.

Selection order: the ``backend`` argument > the innermost :func:`use_backend` context > the environment
variable ``VLMSPARSE_BACKEND`` > the device default. A context / environment choice that does not implement an
op (``torch24`` for the SparseLoRA ops) falls back to that op's device default. Eager calls cache each
successful resolution per (device, op, dtype, ``backend`` argument, this thread's context, the raw values of
``VLMSPARSE_BACKEND`` and ``TRITON_INTERPRET``), so their cost per call is two environment reads and a dict lookup
(~2.5 us on a 2-core CPU, was ~6 us); :func:`clear_backend_cache` after changing the tables. Under ``torch.compile`` the resolution is
traced uncached: dynamo guards on the context (entering another one recompiles) but reads the environment
variable once, when it traces. Kernel modules are imported lazily, on first use, so ``import vlmsparse.ops``
needs neither triton nor a GPU.

Custom ops (namespace ``vlmsparse``, each with a fake implementation, so graphs compile without running them):
``torch.ops.vlmsparse.sparse_lora_linear`` / ``sparse_lora_backward``, ``packed24_lora_linear`` /
``packed24_lora_backward``, ``packed24_linear`` and ``bitmask_linear``, the backend passed as a string argument. Compiled code calls
them (autograd through ``register_autograd``); eager calls run the same implementation functions through a
``torch.autograd.Function`` (or directly when no gradient is needed), which costs a fraction of the dispatcher
round trip of a Python custom op (``benchmarks/bench_overhead.py``).

Checked and unchecked entry points: the public functions (:func:`sparse_lora_linear`, ...) check every argument;
the modules validate their tensors once at construction and call the unchecked ``_sparse_lora_linear``,
``_packed24_lora_linear``, ``_packed24_linear``, ``_bitmask_linear``. Both reach the native backend through its
unchecked functions (``kernels/cpu.py`` ``*_unchecked``: no Python checks per call; the C++ ops check again).

The SparseLoRA math (``s = scaling = lora_alpha / r``, ``W`` the frozen pruned weight, ``M`` the keep-mask):

- forward ``y = x @ (W*M + s*(B@A)*M).T + b``
- backward, with ``G = dY.T @ X`` (the only full-size product):
  ``dX = dY @ (W*M + s*(B@A)*M)``, ``dB = s * (G*M) @ A.T``, ``dA = s * B.T @ (G*M)``.

The autograd saves only ``x``, ``A``, ``B`` and references to the frozen weight and mask (which exist anyway);
the effective weight and ``G`` are formed inside backward and freed there, so no full-size tensor stays alive
between forward and backward.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .bitmask import BitmaskWeight, unpack_bitmask_weight
from .kernels.checks import (
    check_bias,
    check_bitmask,
    check_features,
    check_lora,
    check_mask,
    check_packed,
    check_scaling,
)
from .sparse24 import Packed24, kept_pairs_table, pack24, unpack24

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "IMPLEMENTATIONS",
    "DEVICE_DEFAULTS",
    "resolve_backend",
    "clear_backend_cache",
    "use_backend",
    "current_backend",
    "triton_available",
    "sparse_lora_linear",
    "packed24_lora_linear",
    "packed24_linear",
    "torch24_linear",
    "zero_weight",
    "unpack_weight",
    "pack24_weight",
]

BACKENDS = ("reference", "triton", "torch24", "dense_gemm", "native")
ENV_VAR = "VLMSPARSE_BACKEND"


@dataclass(frozen=True)
class Impl:
    """Where one backend implements one op: module ``vlmsparse.kernels.<module>`` (imported on first use) and
    the names of its ``forward`` and (training ops) ``backward`` functions, with the reference twins'
    signatures."""

    module: str
    forward: str
    backward: str | None = None


# op -> backend -> implementation. torch24 is inference-only and covers the plain 2:4 matmul.
IMPLEMENTATIONS: dict[str, dict[str, Impl]] = {
    "sparse_lora": {
        "reference": Impl("reference", "sparse_lora_forward_ref", "sparse_lora_backward_ref"),
        "triton": Impl("sparse_lora", "sparse_lora_forward", "sparse_lora_backward"),
        "dense_gemm": Impl("dense_gemm", "sparse_lora_forward", "sparse_lora_backward"),
    },
    "packed24_lora": {
        "reference": Impl("reference", "packed24_lora_forward_ref", "packed24_lora_backward_ref"),
        "triton": Impl("packed24", "packed24_lora_forward", "packed24_lora_backward"),
        "dense_gemm": Impl("dense_gemm", "packed24_lora_forward", "packed24_lora_backward"),
    },
    "packed24_matmul": {
        "reference": Impl("reference", "packed24_matmul_ref"),
        "triton": Impl("packed24", "packed24_matmul"),
        "torch24": Impl("torch24", "packed24_matmul"),
        "dense_gemm": Impl("reference", "packed24_matmul_ref"),  # unpack + one F.linear: the reference itself
        "native": Impl("cpu", "packed24_matmul_unchecked"),  # the C++ op checks again; ops checked first
    },
    "bitmask_matmul": {
        "reference": Impl("reference", "bitmask_matmul_ref"),
        "native": Impl("cpu", "bitmask_matmul_unchecked"),
    },
}

# op (None: no op named) -> device type -> backends in order of preference; the first that can run wins, else
# "reference". The SparseLoRA ops train fastest on dense GEMMs on a GPU (issue 13's H200 measurements: the fused
# Triton kernels were 5x slower); a fused kernel has to beat dense_gemm to take its place.
DEVICE_DEFAULTS: dict[str | None, dict[str, tuple[str, ...]]] = {
    None: {"cuda": ("triton",)},
    "sparse_lora": {"cuda": ("dense_gemm",)},
    "packed24_lora": {"cuda": ("dense_gemm",)},
    "packed24_matmul": {"cuda": ("triton", "dense_gemm"), "cpu": ("native",)},
    "bitmask_matmul": {"cpu": ("native",)},
}


class _Local(threading.local):
    """Per-thread state: ``stack``, the backend override in effect at each :func:`use_backend` level (``None``:
    none), innermost last. Created per thread with an empty stack (a missing attribute would cost ~1 us per
    lookup)."""

    def __init__(self) -> None:
        self.stack: list[str | None] = []


_local = _Local()


# ---------------------------------------------------------------------------------------------- selection
def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    return name


_TRITON_FOUND: dict[str, bool] = {}  # a plain dict, not lru_cache: torch.compile traces it without a warning


def triton_available() -> bool:
    """Whether the ``triton`` package can be found (does not import it; looked up once)."""
    if "found" not in _TRITON_FOUND:
        _TRITON_FOUND["found"] = importlib.util.find_spec("triton") is not None
    return _TRITON_FOUND["found"]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, ops without an explicit ``backend`` argument use ``name`` (``None``: no override).

    Nests; thread-local. Example: ``with vlmsparse.ops.use_backend("reference"): model(x)``.
    """
    if name is not None:
        _check_name(name, "use_backend")
    stack = _local.stack
    stack.append(name if name is not None else _context_override())
    try:
        yield
    finally:
        stack.pop()


def _context_override() -> str | None:
    """The innermost :func:`use_backend` name of this thread (``None``: no context override)."""
    stack = _local.stack
    return stack[-1] if stack else None


def current_backend() -> tuple[str | None, str]:
    """``(name, source)`` of the backend override in effect: source is ``"context"``, ``"env"`` or ``"default"``
    (then name is ``None``: the device decides)."""
    name = _context_override()
    if name is not None:
        return name, "context"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}"), "env"
    return None, "default"


def _triton_problem(device: torch.device, dtype: torch.dtype | None) -> str | None:
    if not triton_available():
        return "requested but triton is not installed; use 'reference'"
    if device.type != "cuda" and not _interpret():
        return (f"cannot run on a {device.type} tensor: Triton needs a CUDA device, or TRITON_INTERPRET=1 set "
                "before the kernels are imported to run them on CPU (slow, for tests); use the 'reference' "
                "backend on CPU")
    return None


def _torch24_problem(device: torch.device, dtype: torch.dtype | None) -> str | None:
    if device.type != "cuda":
        return (f"needs a CUDA tensor (torch semi-structured sparse has no {device.type} path); use 'reference' "
                "or 'triton'")
    return None


def _native_problem(device: torch.device, dtype: torch.dtype | None) -> str | None:
    from .kernels import cpu  # a plain import (not importlib): torch.compile traces it

    if not cpu.native_available():
        return f"requested but {cpu.unavailable_reason()}; use 'reference'"
    if device.type != "cpu":
        return f"runs on CPU tensors, got a {device.type} tensor"
    if dtype is not None and dtype not in cpu.NATIVE_DTYPES:
        allowed = ", ".join(str(d) for d in cpu.NATIVE_DTYPES)
        return f"takes {allowed} inputs, got {dtype}; use 'reference'"
    return None


# backend -> why it cannot run on a device for inputs of a dtype (None: it can; dtype None: any dtype is
# fine for the question asked); backends not listed run anywhere.
_RUNNABLE: dict[str, Callable[[torch.device, torch.dtype | None], str | None]] = {
    "triton": _triton_problem,
    "torch24": _torch24_problem,
    "native": _native_problem,
}


def _device_default(op: str | None, device: torch.device, dtype: torch.dtype | None) -> str:
    for name in DEVICE_DEFAULTS[op].get(device.type, ()):
        check = _RUNNABLE.get(name)
        if check is None or check(device, dtype) is None:
            return name
    return "reference"


# Successful resolutions of this process: (device, backend, op, dtype, context override, raw $VLMSPARSE_BACKEND,
# raw $TRITON_INTERPRET) -> backend name. Everything else a resolution reads is fixed for the process (the tables,
# triton_available(), whether the native extension loaded); code that changes it calls clear_backend_cache().
_RESOLVED: dict[tuple, str] = {}


def clear_backend_cache() -> None:
    """Forget the resolutions :func:`resolve_backend` cached; needed only after a change of the backend tables
    (:data:`BACKENDS`, :data:`IMPLEMENTATIONS`, :data:`DEVICE_DEFAULTS`) or of what decides whether a backend can
    run (a test simulating a missing triton or native build). Contexts and the environment variables are part of
    the cache key and need no clearing."""
    _RESOLVED.clear()


def resolve_backend(device: torch.device | str, backend: str | None = None, *, op: str | None = None,
                    dtype: torch.dtype | None = None) -> str:
    """The backend to use for a tensor on ``device`` (of ``dtype``, where the default depends on it).

    Order: ``backend`` argument > :func:`use_backend` context > ``$VLMSPARSE_BACKEND`` > device default
    (:data:`DEVICE_DEFAULTS`: on CUDA ``dense_gemm`` for the SparseLoRA ops, ``triton`` for the packed matmul;
    on CPU ``native`` for the inference matmuls on float32 / bfloat16 when the extension is built;
    ``reference`` elsewhere). ``op`` (``"sparse_lora"``, ``"packed24_lora"``, ``"packed24_matmul"``,
    ``"bitmask_matmul"``) checks that the backend implements that op. Raises ``ValueError`` for an unknown name
    and ``RuntimeError`` when the backend cannot run here.

    Eager calls look the answer up in a per-process cache keyed on the arguments, this thread's context override
    and the raw values of ``$VLMSPARSE_BACKEND`` and ``$TRITON_INTERPRET`` (errors are not cached: they are
    raised again on every call). Under ``torch.compile`` the resolution is traced uncached: dynamo guards on the
    context; the environment variables are read when it traces.
    """
    if torch.compiler.is_compiling():
        return _resolve(device, backend, op, dtype)
    key = (device, backend, op, dtype, _context_override(), os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"))
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = _resolve(device, backend, op, dtype)
    return name


def _resolve(device: torch.device | str, backend: str | None, op: str | None, dtype: torch.dtype | None) -> str:
    """:func:`resolve_backend` without the cache."""
    device = torch.device(device)
    if op is not None and op not in IMPLEMENTATIONS:
        raise ValueError(f"resolve_backend: unknown op {op!r}; allowed: {', '.join(IMPLEMENTATIONS)}")
    if backend is not None:
        name, source = _check_name(backend, "backend argument"), "argument"
    else:
        name, source = current_backend()
        if name is None:
            name, source = _device_default(op, device, dtype), "device default"
    if op is not None and name not in IMPLEMENTATIONS[op]:
        if source in ("context", "env"):
            # A model-wide choice (e.g. torch24) still trains / evaluates its SparseLoRA layers: fall back.
            name, source = _device_default(op, device, dtype), "device default"
        else:
            allowed = ", ".join(IMPLEMENTATIONS[op])
            raise ValueError(f"backend {name!r} ({source}) does not implement {op}; allowed: {allowed}")
    check = _RUNNABLE.get(name)
    problem = check(device, dtype) if check is not None else None
    if problem is not None:
        raise RuntimeError(f"backend {name!r} ({source}) {problem}")
    return name


@functools.cache
def _function(op: str, backend: str, which: str) -> Callable:
    """The ``forward`` / ``backward`` function of ``backend`` for ``op`` (its module imported on first use)."""
    impl = IMPLEMENTATIONS[op][backend]
    try:
        module = importlib.import_module(f"vlmsparse.kernels.{impl.module}")
    except ImportError as error:
        raise RuntimeError(
            f"backend {backend!r}: cannot import vlmsparse.kernels.{impl.module} ({error}); use the 'reference' "
            "backend"
        ) from error
    return getattr(module, getattr(impl, which))


def zero_weight(out_features: int, in_features: int, like: torch.Tensor) -> torch.Tensor:
    """A ``[out, in]`` zero weight that takes no memory (a stride-0 view of one scalar); used for the
    adapter-only path ``s * x @ ((B@A)*M).T`` when LoRA dropout separates it from the base matmul."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(out_features, in_features)


# ---------------------------------------------------------------------------------------------- custom ops
# LoRA ops: ``(x, w0, w1, A, B, scaling, bias, backend)`` where ``(w0, w1)`` is the frozen weight in the op's
# format (``weight, mask`` or ``values, meta``); N = w0.shape[0] in both formats. The backward op returns
# ``(dX, dA, dB)``, dX empty ([0]) when it was not asked for (a custom op returns tensors, not None).

_LORA_FORWARD_SCHEMA = ("(Tensor x, Tensor w0, Tensor w1, Tensor lora_A, Tensor lora_B, float scaling, Tensor? bias, "
                        "str backend) -> Tensor")
_LORA_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor x, Tensor w0, Tensor w1, Tensor lora_A, Tensor lora_B, "
                         "float scaling, bool need_input_grad, str backend) -> (Tensor, Tensor, Tensor)")


def _lora_forward_fake(x, w0, w1, lora_A, lora_B, scaling, bias, backend):
    return x.new_empty((*x.shape[:-1], w0.shape[0]))


def _lora_backward_fake(grad_out, x, w0, w1, lora_A, lora_B, scaling, need_input_grad, backend):
    grad_x = grad_out.new_empty(x.shape if need_input_grad else (0,))
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


def _lora_setup_context(ctx, inputs, output) -> None:
    x, w0, w1, lora_A, lora_B, scaling, bias, backend = inputs
    ctx.save_for_backward(x, w0, w1, lora_A, lora_B)
    ctx.scaling, ctx.backend, ctx.has_bias = scaling, backend, bias is not None


def _lora_backward(ctx, grad_out: torch.Tensor, run_backward: Callable, needs: tuple[bool, ...]) -> tuple:
    """The gradients of ``(x, w0, w1, A, B, scaling, bias, backend)``; ``run_backward`` has the backward op's
    signature and returns ``(dX or None / empty, dA, dB)``; ``needs``: which of those inputs need one."""
    x, w0, w1, lora_A, lora_B = ctx.saved_tensors
    need_x = needs[0]
    grad_x, grad_A, grad_B = run_backward(grad_out.contiguous(), x, w0, w1, lora_A, lora_B, ctx.scaling, need_x,
                                          ctx.backend)
    grad_bias = None
    if ctx.has_bias and needs[6]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return (
        grad_x.to(x.dtype) if need_x else None,
        None,
        None,
        grad_A if needs[3] else None,
        grad_B if needs[4] else None,
        None,
        grad_bias,
        None,
    )


def _define_lora_ops(op: str):
    """Register ``vlmsparse::<op>_linear`` and ``vlmsparse::<op>_backward``; returns both op handles."""

    def forward(x, w0, w1, lora_A, lora_B, scaling, bias, backend):
        return _function(op, backend, "forward")(x, w0, w1, lora_A, lora_B, scaling, bias)

    def backward(grad_out, x, w0, w1, lora_A, lora_B, scaling, need_input_grad, backend):
        grad_x, grad_A, grad_B = _function(op, backend, "backward")(grad_out, x, w0, w1, lora_A, lora_B, scaling,
                                                                   need_input_grad)
        return grad_out.new_empty(0) if grad_x is None else grad_x, grad_A, grad_B

    forward_op = torch.library.custom_op(f"vlmsparse::{op}_linear", forward, mutates_args=(),
                                         schema=_LORA_FORWARD_SCHEMA)
    backward_op = torch.library.custom_op(f"vlmsparse::{op}_backward", backward, mutates_args=(),
                                          schema=_LORA_BACKWARD_SCHEMA)
    forward_op.register_fake(_lora_forward_fake)
    backward_op.register_fake(_lora_backward_fake)
    forward_op.register_autograd(lambda ctx, grad: _lora_backward(ctx, grad, backward_op, ctx.needs_input_grad),
                                 setup_context=_lora_setup_context)
    return forward_op, backward_op


_LORA_OPS = {op: _define_lora_ops(op) for op in ("sparse_lora", "packed24_lora")}


def _packed24_forward(x, values, meta, bias, backend):
    return _function("packed24_matmul", backend, "forward")(x, values, meta, bias)


_packed24_op = torch.library.custom_op("vlmsparse::packed24_linear", _packed24_forward, mutates_args=(),
                                       schema="(Tensor x, Tensor values, Tensor meta, Tensor? bias, str backend) "
                                              "-> Tensor")


@_packed24_op.register_fake
def _packed24_fake(x, values, meta, bias, backend):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _packed24_setup_context(ctx, inputs, output) -> None:
    x, values, meta, bias, backend = inputs
    ctx.save_for_backward(values, meta)
    ctx.in_features, ctx.x_dtype = x.shape[-1], x.dtype


def _packed24_backward(ctx, grad_out: torch.Tensor, needs: tuple[bool, ...] | None = None) -> tuple:
    """``dX = dY @ unpack24(Wp)``, ``db = sum dY`` (the packed weight gets no gradient)."""
    from .sparse24 import Packed24, unpack24

    needs = ctx.needs_input_grad if needs is None else needs
    values, meta = ctx.saved_tensors
    grad_x = grad_bias = None
    if needs[0]:
        weight = unpack24(Packed24(values, meta, ctx.in_features))
        grad_x = (grad_out @ weight.to(grad_out.dtype)).to(ctx.x_dtype)
    if needs[3]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, None, None, grad_bias, None


_packed24_op.register_autograd(_packed24_backward, setup_context=_packed24_setup_context)


def _bitmask_forward(x, values, bitmask, row_offsets, bias, backend):
    return _function("bitmask_matmul", backend, "forward")(x, values, bitmask, row_offsets, bias)


_bitmask_op = torch.library.custom_op("vlmsparse::bitmask_linear", _bitmask_forward, mutates_args=(),
                                      schema="(Tensor x, Tensor values, Tensor bitmask, Tensor row_offsets, "
                                             "Tensor? bias, str backend) -> Tensor")


@_bitmask_op.register_fake
def _bitmask_fake(x, values, bitmask, row_offsets, bias, backend):
    return x.new_empty((*x.shape[:-1], bitmask.shape[0]))


# ---------------------------------------------------------------------------------------------- eager autograd
class _LoRAFunction(torch.autograd.Function):
    """Eager twin of the LoRA custom ops: ``apply(op, x, w0, w1, A, B, scaling, bias, backend)``, the same
    implementation functions, saved tensors and backward. (A ``forward(ctx, ...)`` Function: on a CPU it costs
    about half the host time of one with a separate ``setup_context``.)"""

    @staticmethod
    def forward(ctx, op, x, w0, w1, lora_A, lora_B, scaling, bias, backend):
        inputs = (x, w0, w1, lora_A, lora_B, scaling, bias, backend)
        y = _function(op, backend, "forward")(x, w0, w1, lora_A, lora_B, scaling, bias)
        _lora_setup_context(ctx, inputs, y)
        ctx.op = op
        return y

    @staticmethod
    def backward(ctx, grad_out):
        def run(grad_out, x, w0, w1, lora_A, lora_B, scaling, need_x, backend):
            return _function(ctx.op, backend, "backward")(grad_out, x, w0, w1, lora_A, lora_B, scaling, need_x)

        return (None, *_lora_backward(ctx, grad_out, run, ctx.needs_input_grad[1:]))


class _Packed24Function(torch.autograd.Function):
    """Eager twin of ``vlmsparse::packed24_linear`` (gradients w.r.t. x and bias only)."""

    @staticmethod
    def forward(ctx, x, values, meta, bias, backend):
        y = _packed24_forward(x, values, meta, bias, backend)
        _packed24_setup_context(ctx, (x, values, meta, bias, backend), y)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        return _packed24_backward(ctx, grad_out)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The ops compute in the weight's dtype (x is cast to it, as autocast would cast the weight): under
    autocast they run with it off, so no full-size cast copy of the weight is made or saved."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- unchecked
def _lora_linear(op: str, x, w0, w1, lora_A, lora_B, scaling: float, bias, backend: str | None) -> torch.Tensor:
    """The LoRA op ``op`` without argument checks (callers validated them): compiled code calls the custom op,
    eager code the autograd Function (or the implementation itself when nothing needs a gradient)."""
    name = resolve_backend(x.device, backend, op=op)
    with _no_autocast(x):
        x = x.to(w0.dtype)
        if torch.compiler.is_compiling():
            return _LORA_OPS[op][0](x, w0, w1, lora_A, lora_B, scaling, bias, name)
        if _needs_grad(x, lora_A, lora_B, bias):
            return _LoRAFunction.apply(op, x, w0, w1, lora_A, lora_B, scaling, bias, name)
        return _function(op, name, "forward")(x, w0, w1, lora_A, lora_B, scaling, bias)


def _sparse_lora_linear(x, weight, mask, lora_A, lora_B, scaling: float, bias=None, backend=None) -> torch.Tensor:
    """:func:`sparse_lora_linear` without argument checks (for modules that validated them once)."""
    return _lora_linear("sparse_lora", x, weight, mask, lora_A, lora_B, scaling, bias, backend)


def _packed24_lora_linear(x, values, meta, lora_A, lora_B, scaling: float, bias=None, backend=None) -> torch.Tensor:
    """:func:`packed24_lora_linear` without argument checks."""
    return _lora_linear("packed24_lora", x, values, meta, lora_A, lora_B, scaling, bias, backend)


def _packed24_linear(x, values, meta, bias=None, backend=None) -> torch.Tensor:
    """:func:`packed24_linear` without argument checks."""
    name = resolve_backend(x.device, backend, op="packed24_matmul", dtype=x.dtype)
    if torch.compiler.is_compiling():
        return _packed24_op(x, values, meta, bias, name)
    if _needs_grad(x, bias):
        return _Packed24Function.apply(x, values, meta, bias, name)
    return _packed24_forward(x, values, meta, bias, name)


def _bitmask_linear(x, values, bitmask, row_offsets, bias=None, backend=None) -> torch.Tensor:
    """:func:`bitmask_linear` without argument checks (inference: no autograd)."""
    name = resolve_backend(x.device, backend, op="bitmask_matmul", dtype=x.dtype)
    if torch.compiler.is_compiling():
        return _bitmask_op(x, values, bitmask, row_offsets, bias, name)
    return _bitmask_forward(x, values, bitmask, row_offsets, bias, name)


# ---------------------------------------------------------------------------------------------- checks
def _check_lora_args(what: str, x: torch.Tensor, out_features: int, in_features: int, lora_A, lora_B, scaling,
                     bias) -> None:
    """The checks of both fused ops after the weight-format check (see :mod:`vlmsparse.kernels.checks`)."""
    check_features(x, in_features, what)
    check_lora(lora_A, lora_B, out_features, in_features, what)
    check_scaling(scaling, what)
    check_bias(bias, out_features, what)


def _check_frozen(weight: torch.Tensor, what: str) -> None:
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{what}: the base weight must be frozen (requires_grad=False); only lora_A / lora_B receive gradients"
        )


# ---------------------------------------------------------------------------------------------- public ops
def sparse_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """SparseLoRA linear ``y [..., out] = x @ (W*M + s*(B@A)*M).T + b`` with autograd w.r.t. x, A, B, b.

    ``x [..., in]``, ``weight [out, in]`` (frozen), ``mask [out, in]`` bool, ``lora_A [r, in]``,
    ``lora_B [out, r]``, ``scaling = lora_alpha / r``. Backward follows the module docstring.
    """
    out_features, in_features = check_mask(weight, mask, "sparse_lora_linear")
    _check_lora_args("sparse_lora_linear", x, out_features, in_features, lora_A, lora_B, scaling, bias)
    _check_frozen(weight, "sparse_lora_linear")
    return _sparse_lora_linear(x, weight, mask, lora_A, lora_B, float(scaling), bias, backend)


def packed24_lora_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """SparseLoRA over a packed 2:4 weight (``values [out, in/2]``, ``meta [out, ceil(in/8)]`` uint8):
    ``y = x @ (unpack24(Wp) + s*(B@A)*M24).T + b``, autograd w.r.t. x, A, B, b (the packed weight is frozen)."""
    in_features = x.shape[-1]
    out_features = check_packed(values, meta, in_features, "packed24_lora_linear")
    _check_lora_args("packed24_lora_linear", x, out_features, in_features, lora_A, lora_B, scaling, bias)
    _check_frozen(values, "packed24_lora_linear")
    return _packed24_lora_linear(x, values, meta, lora_A, lora_B, float(scaling), bias, backend)


def torch24_linear(x: torch.Tensor, weight_semi_structured: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + b`` with ``W`` a torch semi-structured sparse tensor (from
    :func:`vlmsparse.sparse24.to_semi_structured`); leading dims of ``x`` are flattened as torch requires.

    Not a custom op: the weight is a tensor subclass, which torch's own dispatch (and ``torch.compile``) handles.
    """
    from .kernels.torch24 import semi_structured_linear

    return semi_structured_linear(x, weight_semi_structured, bias)


def packed24_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = x @ unpack24(values, meta).T + b`` (inference: gradients w.r.t. ``x`` and ``bias`` only).

    With ``torch24`` the weight is unpacked and converted to torch semi-structured on every call; a module
    should convert once and call :func:`torch24_linear` instead.
    """
    out_features = check_packed(values, meta, x.shape[-1], "packed24_linear")
    check_bias(bias, out_features, "packed24_linear")
    return _packed24_linear(x, values, meta, bias, backend)


def bitmask_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = x @ W.T + b`` with ``W`` in the bitmask format of :mod:`vlmsparse.bitmask` (``values`` 1-D with
    padding, ``bitmask [out, ceil(in/8)]`` uint8, ``row_offsets [out + 1]`` int64); inference, no gradients."""
    out_features = check_bitmask(values, bitmask, row_offsets, x.shape[-1], "bitmask_linear")
    check_bias(bias, out_features, "bitmask_linear")
    return _bitmask_linear(x, values, bitmask, row_offsets, bias, backend)


def unpack_weight(stored: Packed24 | BitmaskWeight) -> torch.Tensor:
    """The dense ``[out, in]`` weight of a packed 2:4 or bitmask weight, bit for bit what
    :func:`vlmsparse.sparse24.unpack24` / :func:`vlmsparse.bitmask.unpack_bitmask_weight` give: the native CPU kernel
    for float32 / bfloat16 CPU weights where it is built, else those functions (5632 x 2048 bf16, 2 threads:
    packed 2:4 26 -> 2.3 ms, 70% bitmask 51 -> 1.4 ms)."""
    if isinstance(stored, Packed24):
        check_packed(stored.values, stored.meta, stored.in_features, "unpack_weight")
    elif isinstance(stored, BitmaskWeight):
        check_bitmask(stored.values, stored.bitmask, stored.row_offsets, stored.in_features, "unpack_weight")
    else:
        raise ValueError(f"unpack_weight needs a Packed24 or BitmaskWeight, got {type(stored).__name__}")
    if _native_problem(stored.values.device, stored.values.dtype) is None:
        from .kernels import cpu

        return cpu.unpack_weight(stored)
    return unpack24(stored) if isinstance(stored, Packed24) else unpack_bitmask_weight(stored)


def pack24_weight(weight: torch.Tensor) -> Packed24:
    """:func:`vlmsparse.sparse24.pack24` of a weight (no mask), bit for bit: the native CPU kernel for float32 /
    bfloat16 CPU weights where it is built (bf16, 2 threads: 5632 x 2048 86 -> 17 ms, 11008 x 4096 700 -> 65 ms),
    else torch. Raises ``ValueError`` as ``pack24`` does for a shape that cannot be packed or a weight that is not
    2:4."""
    if weight.dim() != 2 or weight.shape[1] % 4 or _native_problem(weight.device, weight.dtype) is not None:
        return pack24(weight)
    from .kernels import cpu

    values, meta, bad = cpu.pack24(weight.detach(), kept_pairs_table())
    if bad:
        raise ValueError(f"pack24: {bad} groups of 4 consecutive inputs hold more than 2 non-zeros; the weight is "
                         "not 2:4")
    return Packed24(values, meta, weight.shape[1])
