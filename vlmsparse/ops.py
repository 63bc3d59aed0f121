"""The ONE place that chooses a compute backend, and the autograd Functions (layer 2).

Backends:

- ``"reference"``: the pure-torch twins in :mod:`vlmsparse.kernels.reference` (default on CPU);
- ``"triton"``: the Triton kernels in :mod:`vlmsparse.kernels.sparse_lora` and
  :mod:`vlmsparse.kernels.packed24` (default for CUDA inputs when triton imports; on CPU only under
  ``TRITON_INTERPRET=1``);
- ``"torch24"``: torch semi-structured sparse (cuSPARSELt / CUTLASS), inference only, for merged 2:4
  weights (:func:`packed24_linear`, :func:`torch24_linear`);
- ``"native"``: the C++ CPU kernels in :mod:`vlmsparse.kernels.cpu` (built by ``pip install`` from ``csrc/``),
  inference only, float32 / bfloat16: :func:`packed24_linear` and :func:`bitmask_linear`; the default for those
  ops on CPU tensors of those dtypes when the extension is built.

Selection order: the ``backend`` argument > the innermost :func:`use_backend` context > the environment
variable ``VLMSPARSE_BACKEND`` > the device default. Kernel modules are imported lazily, on first use,
so ``import vlmsparse.ops`` needs neither triton nor a GPU.

The SparseLoRA math (``s = scaling = lora_alpha / r``, ``W`` the frozen pruned weight, ``M`` the keep-mask):

- forward ``y = x @ (W*M + s*(B@A)*M).T + b``
- backward, with ``G = dY.T @ X`` (the only full-size product):
  ``dX = dY @ (W*M + s*(B@A)*M)``, ``dB = s * (G*M) @ A.T``, ``dA = s * B.T @ (G*M)``.

The autograd Functions save only ``x``, ``A``, ``B`` and references to the frozen weight and mask (which
exist anyway); the effective weight and ``G`` are formed inside backward and freed there, so no full-size
tensor stays alive between forward and backward.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from types import ModuleType

import torch

from .kernels import reference as _ref
from .kernels.checks import (
    check_bias,
    check_bitmask,
    check_features,
    check_lora,
    check_mask,
    check_packed,
    check_scaling,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "resolve_backend",
    "use_backend",
    "current_backend",
    "triton_available",
    "sparse_lora_linear",
    "packed24_lora_linear",
    "packed24_linear",
    "torch24_linear",
    "bitmask_linear",
    "zero_weight",
]

BACKENDS = ("reference", "triton", "torch24", "native")
ENV_VAR = "VLMSPARSE_BACKEND"

# Which backends implement which op. torch24 is inference-only and covers the plain 2:4 matmul.
_OPS = {
    "sparse_lora": ("reference", "triton"),
    "packed24_lora": ("reference", "triton"),
    "packed24_matmul": ("reference", "triton", "torch24", "native"),
    "bitmask_matmul": ("reference", "native"),
}

_local = threading.local()


# ---------------------------------------------------------------------------------------------- selection
def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    return name


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the ``triton`` package can be found (does not import it)."""
    return importlib.util.find_spec("triton") is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, ops without an explicit ``backend`` argument use ``name`` (``None``: no override).

    Nests; thread-local. Example: ``with vlmsparse.ops.use_backend("reference"): model(x)``.
    """
    if name is not None:
        _check_name(name, "use_backend")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def current_backend() -> tuple[str | None, str]:
    """``(name, source)`` of the backend override in effect: source is ``"context"``, ``"env"`` or ``"default"``
    (then name is ``None``: the device decides)."""
    stack = getattr(_local, "stack", None) or []
    for name in reversed(stack):
        if name is not None:
            return name, "context"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}"), "env"
    return None, "default"


def _check_runnable(name: str, device: torch.device, source: str) -> None:
    if name == "triton":
        if not triton_available():
            raise RuntimeError(f"backend 'triton' ({source}) requested but triton is not installed; use 'reference'")
        if device.type != "cuda" and not _interpret():
            raise RuntimeError(
                f"backend 'triton' ({source}) cannot run on a {device.type} tensor: Triton needs a CUDA device, "
                "or TRITON_INTERPRET=1 set before the kernels are imported to run them on CPU (slow, for tests); "
                "use the 'reference' backend on CPU"
            )
    elif name == "native":
        from .kernels import cpu

        if not cpu.native_available():
            raise RuntimeError(f"backend 'native' ({source}) requested but {cpu.unavailable_reason()}; use 'reference'")
        if device.type != "cpu":
            raise RuntimeError(f"backend 'native' ({source}) runs on CPU tensors, got a {device.type} tensor")
    elif name == "torch24":
        if device.type != "cuda":
            raise RuntimeError(
                f"backend 'torch24' ({source}) needs a CUDA tensor (torch semi-structured sparse has no "
                f"{device.type} path); use 'reference' or 'triton'"
            )


def _native_default(op: str | None, dtype: torch.dtype | None) -> bool:
    if op not in ("packed24_matmul", "bitmask_matmul"):
        return False
    from .kernels import cpu

    return cpu.native_available() and dtype in cpu.NATIVE_DTYPES


def resolve_backend(device: torch.device | str, backend: str | None = None, *, op: str | None = None,
                    dtype: torch.dtype | None = None) -> str:
    """The backend to use for a tensor on ``device`` (of ``dtype``, when it matters for the default).

    Order: ``backend`` argument > :func:`use_backend` context > ``$VLMSPARSE_BACKEND`` > device default
    (``"triton"`` on CUDA when triton can be imported; on CPU ``"native"`` for the inference matmuls on float32 /
    bfloat16 when the extension is built; else ``"reference"``). ``op`` (``"sparse_lora"``,
    ``"packed24_lora"``, ``"packed24_matmul"``, ``"bitmask_matmul"``) checks that the backend implements it.
    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when the backend cannot run here.
    """
    device = torch.device(device)
    if backend is not None:
        name, source = _check_name(backend, "backend argument"), "argument"
    else:
        name, source = current_backend()
        if name is None:
            if device.type == "cuda" and triton_available():
                name = "triton"
            elif device.type == "cpu" and _native_default(op, dtype):
                name = "native"
            else:
                name = "reference"
            source = "device default"
    if op is not None:
        if op not in _OPS:
            raise ValueError(f"resolve_backend: unknown op {op!r}; allowed: {', '.join(_OPS)}")
        if name not in _OPS[op]:
            if source in ("context", "env") and name in ("torch24", "native"):
                # A model-wide inference-backend choice still trains/evaluates its SparseLoRA layers: fall back.
                name = "triton" if device.type == "cuda" and triton_available() else "reference"
            else:
                raise ValueError(
                    f"backend {name!r} ({source}) does not implement {op}; allowed: {', '.join(_OPS[op])}"
                )
    _check_runnable(name, device, source)
    return name


def _kernel_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"vlmsparse.kernels.{name}")
    except ImportError as error:
        raise RuntimeError(
            f"backend 'triton': cannot import vlmsparse.kernels.{name} ({error}); use the 'reference' backend"
        ) from error


def _impl(backend: str, kernel_module: str, name: str):
    """The function ``name`` of a backend (reference twin ``name + '_ref'``)."""
    if backend == "reference":
        return getattr(_ref, f"{name}_ref")
    if backend == "native":
        from .kernels import cpu  # a plain import (not importlib): torch.compile traces it

        return getattr(cpu, name)
    return getattr(_kernel_module(kernel_module), name)


def zero_weight(out_features: int, in_features: int, like: torch.Tensor) -> torch.Tensor:
    """A ``[out, in]`` zero weight that takes no memory (a stride-0 view of one scalar); used for the
    adapter-only path ``s * x @ ((B@A)*M).T`` when LoRA dropout separates it from the base matmul."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(out_features, in_features)


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


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """The Functions compute in the weight's dtype (x is cast to it, as autocast would cast the weight): under
    autocast they run with it off, so no full-size cast copy of the weight is made or saved."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- autograd
class _LoRAFunction(torch.autograd.Function):
    """Shared autograd for the fused SparseLoRA ops: ``forward(ctx, x, w0, w1, lora_A, lora_B, bias, scaling,
    backend)`` where ``(w0, w1)`` is the frozen weight in the op's format (``weight, mask`` or ``values, meta``).
    Saves x, A, B and the frozen weight, which exists anyway: nothing full-size is kept for backward."""

    KERNEL_MODULE: str
    FORWARD: str
    BACKWARD: str

    @classmethod
    def forward(cls, ctx, x, w0, w1, lora_A, lora_B, bias, scaling, backend):
        y = _impl(backend, cls.KERNEL_MODULE, cls.FORWARD)(x, w0, w1, lora_A, lora_B, scaling, bias)
        ctx.save_for_backward(x, w0, w1, lora_A, lora_B)
        ctx.scaling, ctx.backend, ctx.has_bias = scaling, backend, bias is not None
        return y

    @classmethod
    def backward(cls, ctx, grad_out):
        x, w0, w1, lora_A, lora_B = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        backward = _impl(ctx.backend, cls.KERNEL_MODULE, cls.BACKWARD)
        grad_x, grad_A, grad_B = backward(grad_out.contiguous(), x, w0, w1, lora_A, lora_B, ctx.scaling, need_x)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        grad_bias = None
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return (
            grad_x if need_x else None,
            None,
            None,
            grad_A if ctx.needs_input_grad[3] else None,
            grad_B if ctx.needs_input_grad[4] else None,
            grad_bias,
            None,
            None,
        )


class _SparseLoRAFunction(_LoRAFunction):
    """``y = x @ (W*M + s*(B@A)*M).T + b`` with ``(w0, w1) = (W, M)``."""

    KERNEL_MODULE, FORWARD, BACKWARD = "sparse_lora", "sparse_lora_forward", "sparse_lora_backward"


class _Packed24LoRAFunction(_LoRAFunction):
    """``y = x @ (unpack24(Wp) + s*(B@A)*M24).T + b`` with ``(w0, w1) = (values, meta)``."""

    KERNEL_MODULE, FORWARD, BACKWARD = "packed24", "packed24_lora_forward", "packed24_lora_backward"


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
    name = resolve_backend(x.device, backend, op="sparse_lora")
    with _no_autocast(x):
        return _SparseLoRAFunction.apply(x.to(weight.dtype), weight, mask, lora_A, lora_B, bias, float(scaling), name)


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
    name = resolve_backend(x.device, backend, op="packed24_lora")
    with _no_autocast(x):
        return _Packed24LoRAFunction.apply(x.to(values.dtype), values, meta, lora_A, lora_B, bias, float(scaling),
                                           name)


def torch24_linear(x: torch.Tensor, weight_semi_structured: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + b`` with ``W`` a torch semi-structured sparse tensor (from
    :func:`vlmsparse.sparse24.to_semi_structured`); leading dims of ``x`` are flattened as torch requires."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.nn.functional.linear(x2, weight_semi_structured, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def packed24_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``y = x @ unpack24(values, meta).T + b`` (inference; no gradient w.r.t. the packed weight).

    With ``torch24`` the weight is unpacked and converted to torch semi-structured on every call; a module
    should convert once and call :func:`torch24_linear` instead.
    """
    out_features = check_packed(values, meta, x.shape[-1], "packed24_linear")
    check_bias(bias, out_features, "packed24_linear")
    name = resolve_backend(x.device, backend, op="packed24_matmul", dtype=x.dtype)
    if name == "torch24":
        from .sparse24 import Packed24, to_semi_structured, unpack24

        weight = to_semi_structured(unpack24(Packed24(values, meta, x.shape[-1])))
        return torch24_linear(x, weight, bias)
    return _impl(name, "packed24", "packed24_matmul")(x, values, meta, bias)


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
    name = resolve_backend(x.device, backend, op="bitmask_matmul", dtype=x.dtype)
    return _impl(name, "cpu", "bitmask_matmul")(x, values, bitmask, row_offsets, bias)
