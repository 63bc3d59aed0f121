"""Argument checks of the SparseLoRA / packed 2:4 ops, one function per check (torch only, no triton).

Used by :mod:`vlmsparse.ops` (before a backend is chosen), by the Triton launchers
(:mod:`vlmsparse.kernels.sparse_lora`, :mod:`vlmsparse.kernels.packed24`) and by the packed reference twins
(:mod:`vlmsparse.kernels.reference`), so that every path refuses a bad argument with the same message.

Shapes (``K`` input features, ``N`` output features, ``r`` the LoRA rank):
``x [..., K]``, ``weight [N, K]`` with bool ``mask [N, K]``, or packed 2:4 ``values [N, K/2]`` with uint8
``meta [N, ceil(K/8)]``; ``lora_A [r, K]``, ``lora_B [N, r]``, ``bias [N]``, ``grad_out [..., N]``.

Every check raises ``ValueError("<what>: <what was wrong>, <what is allowed>")``, ``what`` naming the caller.
"""

from __future__ import annotations

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "check_features",
    "check_mask",
    "check_packed",
    "check_bitmask",
    "check_lora",
    "check_scaling",
    "check_bias",
    "check_kernel_dtype",
    "check_grad_out",
    "check_same_device",
    "check_kernel_inputs",
]

# Input / weight dtypes of the Triton kernels.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _shape(t: torch.Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def check_features(x: torch.Tensor, in_features: int, what: str) -> None:
    """``x [..., K]`` with ``K == in_features``."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{what}: input has shape {tuple(x.shape)}, the weight expects {in_features} features in its last dim"
        )


def check_mask(weight: torch.Tensor, mask: torch.Tensor, what: str) -> tuple[int, int]:
    """A 2-D ``weight [N, K]`` and a bool ``mask`` of the same shape; returns ``(N, K)``."""
    if weight.dim() != 2:
        raise ValueError(f"{what}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"{what}: mask must be bool of shape {tuple(weight.shape)} (the weight's), got {mask.dtype} "
            f"{tuple(mask.shape)}"
        )
    return weight.shape[0], weight.shape[1]


def check_packed(values: torch.Tensor, meta: torch.Tensor, in_features: int, what: str) -> int:
    """Packed 2:4 ``values [N, K/2]`` and uint8 ``meta [N, ceil(K/8)]`` for ``K = in_features`` (a multiple
    of 4); returns ``N``."""
    if values.dim() != 2 or in_features % 4 or values.shape[1] * 2 != in_features:
        raise ValueError(
            f"{what}: values must be [out, in/2] with in divisible by 4; got values {tuple(values.shape)} "
            f"for inputs of {in_features} features"
        )
    n = values.shape[0]
    want = (n, (in_features + 7) // 8)
    if meta.dtype != torch.uint8 or tuple(meta.shape) != want:
        raise ValueError(f"{what}: meta must be uint8 of shape {want}, got {meta.dtype} {tuple(meta.shape)}")
    return n


def check_bitmask(values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, in_features: int,
                  what: str) -> int:
    """A bitmask weight (:mod:`vlmsparse.bitmask`): 1-D ``values``, uint8 ``bitmask [N, ceil(K/8)]``, int64
    ``row_offsets [N + 1]``; returns ``N``. Shapes only (no data reads, so it traces under torch.compile): the
    native kernel checks the offsets against ``values``' length, the reference unpacking checks the counts."""
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 2 or bitmask.shape[1] != (in_features + 7) // 8:
        raise ValueError(f"{what}: bitmask must be uint8 [out, {(in_features + 7) // 8}] for {in_features} input "
                         f"features, got {bitmask.dtype} {_shape(bitmask)}")
    out_features = bitmask.shape[0]
    if row_offsets.dtype != torch.int64 or row_offsets.shape != (out_features + 1,):
        raise ValueError(f"{what}: row_offsets must be int64 [{out_features + 1}], got {row_offsets.dtype} "
                         f"{_shape(row_offsets)}")
    if values.dim() != 1:
        raise ValueError(f"{what}: values must be 1-D (the stored entries, then padding), got {_shape(values)}")
    return out_features


def check_lora(
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    out_features: int,
    in_features: int,
    what: str,
    optional: bool = False,
) -> int:
    """``lora_A [r, K]`` and ``lora_B [N, r]`` with one rank ``r``; returns ``r`` (0 when ``optional`` and
    both are ``None``)."""
    if lora_A is None or lora_B is None:
        if optional and lora_A is None and lora_B is None:
            return 0
        allowed = "both lora_A and lora_B, or neither" if optional else "both lora_A and lora_B"
        raise ValueError(f"{what}: give {allowed}; got lora_A {_shape(lora_A)} and lora_B {_shape(lora_B)}")
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != in_features or lora_B.shape[0] != out_features:
        raise ValueError(
            f"{what}: lora_A must be [r, {in_features}] and lora_B [{out_features}, r], got {tuple(lora_A.shape)} "
            f"and {tuple(lora_B.shape)}"
        )
    if lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(
            f"{what}: rank mismatch, lora_A has r={lora_A.shape[0]}, lora_B has r={lora_B.shape[1]}; "
            "they must be equal"
        )
    return lora_A.shape[0]


def check_scaling(scaling: object, what: str) -> None:
    """The LoRA scaling ``s`` is a Python number (``int`` or ``float``)."""
    if not isinstance(scaling, (int, float)):
        raise ValueError(f"{what}: scaling must be a python number (int or float), got {type(scaling).__name__}")


def check_bias(bias: torch.Tensor | None, out_features: int, what: str) -> None:
    """``bias`` is ``None`` or ``[N]``."""
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{what}: bias must be None or of shape ({out_features},), got {tuple(bias.shape)}")


def check_kernel_dtype(x: torch.Tensor, weight_dtype: torch.dtype, what: str) -> None:
    """``x`` in a dtype of :data:`SUPPORTED_DTYPES`, equal to the weight's (the kernels do not cast)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{what}: dtype {x.dtype} is not supported (allowed: float32, float16, bfloat16)")
    if weight_dtype != x.dtype:
        raise ValueError(f"{what}: input dtype {x.dtype} differs from the weight dtype {weight_dtype}; they must match")


def check_grad_out(grad_out: torch.Tensor, x: torch.Tensor, out_features: int, what: str) -> None:
    """``grad_out [..., N]`` with the dtype and leading dims of ``x [..., K]``."""
    if grad_out.dtype != x.dtype:
        raise ValueError(f"{what}: grad_out dtype {grad_out.dtype} differs from the input dtype {x.dtype}; "
                         "they must match")
    if grad_out.dim() == 0 or grad_out.shape[-1] != out_features or grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"{what}: grad_out has shape {tuple(grad_out.shape)}, must be {(*x.shape[:-1], out_features)} "
            f"(the leading dims of x {tuple(x.shape)} and {out_features} outputs)"
        )


def check_same_device(what: str, **tensors: torch.Tensor | None) -> None:
    """All given tensors (``None`` skipped) on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{what}: all tensors must be on one device, got {listed}")


def check_kernel_inputs(what: str, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, out_features: int,
                        in_features: int, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                        bias: torch.Tensor | None = None, grad_out: torch.Tensor | None = None,
                        lora_optional: bool = True) -> None:
    """The checks every Triton launcher makes after its weight-format check (:func:`check_mask` /
    :func:`check_packed`): features of ``x``, dtypes, LoRA shapes, bias, ``grad_out`` (backward) and devices.
    ``weight`` / ``mask`` are ``W, M`` or ``values, meta``; ``lora_optional=False`` (backward) needs both
    adapters."""
    check_features(x, in_features, what)
    check_kernel_dtype(x, weight.dtype, what)
    check_lora(lora_A, lora_B, out_features, in_features, what, optional=lora_optional)
    check_bias(bias, out_features, what)
    if grad_out is not None:
        check_grad_out(grad_out, x, out_features, what)
    check_same_device(what, x=x, weight=weight, mask=mask, lora_A=lora_A, lora_B=lora_B, bias=bias,
                      grad_out=grad_out)
