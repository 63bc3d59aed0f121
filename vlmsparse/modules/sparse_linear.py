"""``SparseLinear``: an inference linear ``y = x @ W.T + b`` whose merged 2:4 weight runs compressed.

Backends (attribute ``backend``), chosen once at construction:

- ``"torch24"``: ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or CUTLASS); needs a CUDA weight on
  an Ampere+ GPU, fp16 / bf16 (int8), shape multiples (see :func:`vlmsparse.sparse24.semi_structured_support`).
  The semi-structured tensor is not a buffer: such a module is tied to its device (move it before converting).
- ``"packed24"``: the package's packed 2:4 format (``values [out, in/2]`` + ``meta [out, ceil(in/8)]`` uint8
  buffers, 9/16 of the dense fp16 bytes) through :func:`vlmsparse.ops.packed24_linear` (the Triton kernel on
  CUDA, the reference twin on CPU).
- ``"dense"``: the weight kept as a dense buffer (``F.linear``); what a non-2:4 weight, or a CPU run, gets.

``backend="auto"``: ``torch24`` when supported, else ``packed24`` on CUDA with triton, else ``dense``.
The swap is an instance swap with an inverse: :meth:`SparseLinear.from_linear` / :meth:`SparseLinear.to_linear`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import ops
from ..sparse24 import Packed24, pack24, semi_structured_support, to_semi_structured, unpack24

__all__ = ["SparseLinear", "SPARSE_LINEAR_BACKENDS", "is_24", "choose_backend"]

logger = logging.getLogger(__name__)

SPARSE_LINEAR_BACKENDS = ("auto", "torch24", "packed24", "dense")


def is_24(weight: torch.Tensor) -> bool:
    """Whether ``weight [out, in]`` is 2:4 bit for bit: ``in % 4 == 0`` and every group of 4 consecutive
    inputs has at most 2 entries whose bits are not ``+0.0`` (so packing loses nothing, ``-0.0`` included)."""
    if weight.dim() != 2 or weight.shape[1] % 4 or not weight.is_floating_point():
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    set_bits = weight.contiguous().view(ints) != 0
    return bool((set_bits.reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def choose_backend(weight: torch.Tensor, backend: str = "auto") -> tuple[str, str]:
    """``(backend, reason)`` for a weight: validates an explicit choice, resolves ``"auto"``."""
    if backend not in SPARSE_LINEAR_BACKENDS:
        raise ValueError(f"SparseLinear backend must be one of {', '.join(SPARSE_LINEAR_BACKENDS)}, got {backend!r}")
    two_four = is_24(weight)
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
    if not two_four:
        return "dense", "not 2:4"
    ok, reason = semi_structured_support(weight)
    if ok:
        return "torch24", reason
    if weight.device.type == "cuda" and ops.triton_available():
        return "packed24", f"packed Triton kernel (torch semi-structured: {reason})"
    return "dense", f"no fast 2:4 path here ({reason})"


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
            return ops._packed24_linear(x, self.values, self.meta, self.bias)
        return nn.functional.linear(x, self.weight, self.bias)

    def weight_bytes(self) -> int:
        """Bytes the weight takes in this module's storage."""
        if self.backend == "packed24":
            return self.values.numel() * self.values.element_size() + self.meta.numel()
        dtype = self._semi.dtype if self.backend == "torch24" else self.weight.dtype
        dense = self.out_features * self.in_features * torch.empty(0, dtype=dtype).element_size()
        return dense * 9 // 16 if self.backend == "torch24" else dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend}")
