"""``SparseLinear``: an inference linear ``y = x @ W.T + b`` whose merged 2:4 weight runs compressed.

Backends (attribute ``backend``), chosen once at construction:

- ``"torch24"``: ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or CUTLASS); needs a CUDA weight on
  an Ampere+ GPU, fp16 / bf16 (int8), shape multiples (see :func:`vlmsparse.sparse24.semi_structured_support`).
  The semi-structured tensor is not a buffer: such a module is tied to its device (move it before converting).
- ``"packed24"``: the package's packed 2:4 format (``values [out, in/2]`` + ``meta [out, ceil(in/8)]`` uint8
  buffers, 9/16 of the dense fp16 bytes) through :func:`vlmsparse.ops.packed24_linear` (the Triton kernel on
  CUDA, the reference twin on CPU).
- ``"bitmask"``: unstructured sparsity, the bitmask format of :mod:`vlmsparse.bitmask` (stored entries +
  1 bit per weight: a 70% sparse fp32 weight in 0.33 of its bytes) through :func:`vlmsparse.ops.bitmask_linear`
  (the native C++ kernel on CPU, the reference twin elsewhere).
- ``"dense"``: the weight kept as a dense buffer (``F.linear``).

``backend="auto"``: ``torch24`` when supported, else ``packed24`` on CUDA with triton; on a CPU with the native
kernels built (:mod:`vlmsparse.kernels.cpu`) and a float32 / bfloat16 weight, ``packed24`` for a 2:4 weight and
``bitmask`` for one at least ``BITMASK_MIN_SPARSITY`` sparse; else ``dense``.
The swap is an instance swap with an inverse: :meth:`SparseLinear.from_linear` / :meth:`SparseLinear.to_linear`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import ops
from ..bitmask import BitmaskWeight, pack_bitmask_weight, unpack_bitmask_weight
from ..sparse24 import Packed24, pack24, semi_structured_support, to_semi_structured, unpack24

__all__ = ["SparseLinear", "SPARSE_LINEAR_BACKENDS", "BITMASK_MIN_SPARSITY", "is_24", "choose_backend"]

logger = logging.getLogger(__name__)

SPARSE_LINEAR_BACKENDS = ("auto", "torch24", "packed24", "bitmask", "dense")

# ``auto`` stores a non-2:4 weight as a bitmask from this sparsity on: at 50% an fp32 weight takes 0.53 of its
# dense bytes (bf16: 0.56), and the native kernel's work per 16 inputs does not depend on the density.
BITMASK_MIN_SPARSITY = 0.5


def _native_cpu(weight: torch.Tensor) -> tuple[bool, str]:
    """Whether the native CPU kernels can run this weight, and why not."""
    if weight.device.type != "cpu":
        return False, f"not a CPU weight ({weight.device.type})"
    from ..kernels import cpu

    if not cpu.native_available():
        return False, cpu.unavailable_reason()
    if weight.dtype not in cpu.NATIVE_DTYPES:
        return False, f"native CPU kernels take float32 / bfloat16, not {str(weight.dtype).replace('torch.', '')}"
    return True, f"native CPU kernel ({cpu.isa()})"


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of zero entries (``-0.0`` included): what the bitmask format does not store."""
    return 1.0 - (weight != 0).sum().item() / max(weight.numel(), 1)


def is_24(weight: torch.Tensor) -> bool:
    """Whether ``weight [out, in]`` is 2:4: ``in % 4 == 0`` and every group of 4 consecutive inputs has at most
    2 non-zero values. ``-0.0`` is zero (``w * mask`` writes it where ``w < 0``); NaN counts as a non-zero.
    Packing such a weight gives back equal values; a ``-0.0`` that does not fit among a group's two stored
    entries comes back as ``+0.0`` (see :mod:`vlmsparse.sparse24`)."""
    if weight.dim() != 2 or weight.shape[1] % 4 or not weight.is_floating_point():
        return False
    nonzero = weight != 0
    return bool((nonzero.reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def choose_backend(weight: torch.Tensor, backend: str = "auto") -> tuple[str, str]:
    """``(backend, reason)`` for a weight: validates an explicit choice, resolves ``"auto"``."""
    if backend not in SPARSE_LINEAR_BACKENDS:
        raise ValueError(f"SparseLinear backend must be one of {', '.join(SPARSE_LINEAR_BACKENDS)}, got {backend!r}")
    two_four = is_24(weight)
    if backend == "bitmask":
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"SparseLinear backend 'bitmask' needs a 2-D float weight, got {weight.dtype} "
                             f"{tuple(weight.shape)}")
        return backend, "requested"
    if backend in ("torch24", "packed24") and not two_four:
        raise ValueError(f"SparseLinear backend {backend!r} needs a 2:4 weight (in % 4 == 0, at most 2 non-zeros "
                         f"per group of 4 inputs); this weight {tuple(weight.shape)} is not")
    if backend == "torch24":
        ok, reason = semi_structured_support(weight)
        if not ok:
            raise ValueError(f"SparseLinear backend 'torch24' cannot take this weight: {reason}")
        return backend, reason
    if backend != "auto":
        return backend, "requested"
    native, native_reason = _native_cpu(weight)
    if not two_four:
        if native and weight.is_floating_point() and sparsity_of(weight) >= BITMASK_MIN_SPARSITY:
            return "bitmask", native_reason
        return "dense", "not 2:4" + ("" if native else f" (no bitmask kernel: {native_reason})")
    ok, reason = semi_structured_support(weight)
    if ok:
        return "torch24", reason
    if weight.device.type == "cuda" and ops.triton_available():
        return "packed24", f"packed Triton kernel (torch semi-structured: {reason})"
    if native:
        return "packed24", native_reason
    return "dense", f"no fast 2:4 path here ({reason}; {native_reason})"


class SparseLinear(nn.Module):
    """Inference-only linear ``y [..., out] = x [..., in] @ W.T + b`` with ``W`` stored per ``backend``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "auto") -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
        weight = weight.detach()
        self.out_features, self.in_features = weight.shape
        self.backend, self.reason = choose_backend(weight, backend)
        self._semi: torch.Tensor | None = None
        if self.backend == "torch24":
            self._semi = to_semi_structured(weight)
        elif self.backend == "packed24":
            packed = pack24(weight)
            self.register_buffer("values", packed.values)
            self.register_buffer("meta", packed.meta)
        elif self.backend == "bitmask":
            packed = pack_bitmask_weight(weight)
            self.register_buffer("values", packed.values)
            self.register_buffer("bitmask", packed.bitmask)
            self.register_buffer("row_offsets", packed.row_offsets)
        else:
            self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto") -> SparseLinear:
        """A ``SparseLinear`` computing what ``linear`` computes (its weight must be 2:4 for a sparse backend)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"SparseLinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, backend)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense ``[out, in]`` tensor (bit for bit the weight it was built from)."""
        if self.backend == "torch24":
            return self._semi.to_dense()
        if self.backend == "packed24":
            return unpack24(Packed24(self.values, self.meta, self.in_features))
        if self.backend == "bitmask":
            return unpack_bitmask_weight(BitmaskWeight(self.values, self.bitmask, self.row_offsets, self.in_features))
        return self.weight

    def to_linear(self) -> nn.Linear:
        """The inverse swap: an ``nn.Linear`` with the same (dense) weight and bias."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "torch24":
            return ops.torch24_linear(x, self._semi, self.bias)
        if self.backend == "packed24":
            return ops.packed24_linear(x, self.values, self.meta, self.bias)
        if self.backend == "bitmask":
            return ops.bitmask_linear(x, self.values, self.bitmask, self.row_offsets, self.bias)
        return nn.functional.linear(x, self.weight, self.bias)

    def weight_bytes(self) -> int:
        """Bytes the weight takes in this module's storage."""
        if self.backend == "packed24":
            return self.values.numel() * self.values.element_size() + self.meta.numel()
        if self.backend == "bitmask":
            return BitmaskWeight(self.values, self.bitmask, self.row_offsets, self.in_features).nbytes()
        dtype = self._semi.dtype if self.backend == "torch24" else self.weight.dtype
        dense = self.out_features * self.in_features * torch.empty(0, dtype=dtype).element_size()
        return dense * 9 // 16 if self.backend == "torch24" else dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend}")
