"""``SparseLinear``: an inference linear ``y = x @ W.T + b`` whose merged 2:4 weight runs compressed.

Backends (attribute ``backend``), chosen once at construction:

- ``"torch24"``: ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or CUTLASS); needs a CUDA weight on
  an Ampere+ GPU, fp16 / bf16 (int8), shape multiples (see :func:`vlmsparse.sparse24.semi_structured_support`).
  The semi-structured tensor is not a buffer: such a module is tied to its device (move it before converting).
- ``"packed24"``: the package's packed 2:4 format (``values [out, in/2]`` + ``meta [out, ceil(in/8)]`` uint8
  buffers, 9/16 of the dense fp16 bytes) through the packed op of :mod:`vlmsparse.ops` (its CUDA default, the
  Triton kernel; the native C++ kernel on CPU, :mod:`vlmsparse.kernels.cpu`; else the reference twin).
- ``"bitmask"``: unstructured sparsity, the bitmask format of :mod:`vlmsparse.bitmask` (stored entries +
  1 bit per weight: a 70% sparse fp32 weight in 0.33 of its bytes) through :func:`vlmsparse.ops.bitmask_linear`
  (the native C++ kernel on CPU, the reference twin elsewhere).
- ``"dense"``: the weight kept as a dense buffer (``F.linear``).

Per-call dispatch on the token count ``M`` (all leading dims of ``x``): with ``dense_below = T > 0`` a sparse
module also keeps the dense weight and runs ``F.linear`` for ``M < T``, the sparse path for ``M >= T``. That is
the fastest layer where the sparse path only pays for large ``M`` (torch semi-structured on an H200: 0.03-0.07x
of dense at ``M <= 128``, 1.2-1.5x at 8192), at the price of both copies: 25/16 of the dense fp16 bytes.

``backend="auto"`` on a GPU never picks a path that measurements show slower than dense at some token count, nor
one that holds more than the dense bytes: :func:`plan_backend` over :data:`SHIPPED_SPEEDUPS` (issue 13's H200
numbers), which today gives ``dense`` for every 2:4 weight (no compressed path is as fast as dense at every
``M``). On a CPU with the native kernels built and a float32 / bfloat16 weight it picks ``packed24`` for a 2:4
weight and ``bitmask`` for one at least ``BITMASK_MIN_SPARSITY`` sparse: there the compressed weight takes fewer
bytes and decodes faster (``benchmarks/bench_cpu.py``: 2:4 bf16 at 1.6-3.7x of the faster dense at one token,
1.3-1.5x at 16; a 70% bitmask at 16 tokens 0.9-1.0x), and from ``kernels.cpu.dense_from_rows`` tokens on the kernel
expands the weight block by block for dense GEMMs (slower than dense by the expansion).
:func:`vlmsparse.pipeline.compress.compress` with ``auto=True`` measures on the actual device instead, per layer
shape, and may keep both copies (``dense_below``) when asked to (``dense_copy=True``).
The swap is an instance swap with an inverse: :meth:`SparseLinear.from_linear` / :meth:`SparseLinear.to_linear`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from .. import ops
from ..bitmask import BitmaskWeight, check_row_offsets, pack_bitmask_weight
from ..kernels.checks import check_bitmask, check_packed
from ..sparse24 import Packed24, group_counts, semi_structured_support, to_semi_structured

__all__ = ["SparseLinear", "SPARSE_LINEAR_BACKENDS", "SHIPPED_SPEEDUPS", "BITMASK_MIN_SPARSITY", "is_24",
           "sparsity_of", "choose_backend", "plan_backend", "sparse_candidates", "native_cpu_support"]

logger = logging.getLogger(__name__)

SPARSE_LINEAR_BACKENDS = ("auto", "torch24", "packed24", "bitmask", "dense")

# ``auto`` stores a non-2:4 weight as a bitmask from this sparsity on: at 50% an fp32 weight takes 0.53 of its
# dense bytes (bf16: 0.56), and the native kernel's work per 16 inputs does not depend on the density.
BITMASK_MIN_SPARSITY = 0.5

# Dense time / sparse time by token count M, measured on an NVIDIA H200 (torch 2.11 + cu130, triton 3.6, fp16 and
# bf16, 4096 -> 11008; issue 13): the best value of each measured range. What "auto" follows without a
# measurement of its own.
SHIPPED_SPEEDUPS: dict[str, dict[int, float]] = {
    "torch24": {1: 0.07, 16: 0.07, 128: 0.07, 2048: 0.5, 8192: 1.5},
    "packed24": {1: 0.27, 16: 0.27, 2048: 0.37},
}


def native_cpu_support(weight: torch.Tensor) -> tuple[bool, str]:
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
    return bool((group_counts(weight != 0) <= 2).all())


def sparse_candidates(weight: torch.Tensor) -> dict[str, str]:
    """``{backend: reason}`` of the compressed backends with a fast path for this weight here: for a 2:4 weight
    ``torch24`` where torch semi-structured supports it and ``packed24`` on CUDA with triton; on a CPU with the
    native kernels, ``packed24`` for a 2:4 weight and ``bitmask`` for one at least ``BITMASK_MIN_SPARSITY``
    sparse."""
    out = {}
    two_four = is_24(weight)
    if two_four:
        ok, reason = semi_structured_support(weight)
        if ok:
            out["torch24"] = reason
        if weight.device.type == "cuda" and ops.triton_available():
            out["packed24"] = "packed Triton kernel"
    native, reason = native_cpu_support(weight)
    if native:
        if two_four:
            out["packed24"] = reason
        if weight.is_floating_point() and sparsity_of(weight) >= BITMASK_MIN_SPARSITY:
            out["bitmask"] = reason
    return out


def plan_backend(times: Mapping[str, Mapping[int, float]], dense_copy: bool = False) -> tuple[str, int, str]:
    """``(backend, dense_below, reason)`` from ``times[backend][M]`` (ms, or any cost: lower is faster; the key
    ``"dense"`` is required and every candidate must cover its token counts).

    A candidate is eligible only if it is no slower than dense at every measured ``M``; among the eligible the
    lowest summed time wins (dense on ties). With ``dense_copy`` a sparse backend may also run from a threshold
    ``T`` (one of the measured ``M``) up, dense below it (``dense_below = T``, both copies kept).
    """
    dense = times["dense"]
    tokens = sorted(dense)
    if not tokens:
        raise ValueError("plan_backend: no token counts measured for 'dense'")
    best = ("dense", 0, sum(dense.values()))
    missed = []
    for name, cost in times.items():
        if name == "dense":
            continue
        if set(cost) != set(tokens):
            raise ValueError(f"plan_backend: {name!r} measured at {sorted(cost)}, dense at {tokens}; they must agree")
        thresholds = tokens if dense_copy else tokens[:1]
        for threshold in thresholds:
            used = [t for t in tokens if t >= threshold]
            if any(cost[t] > dense[t] for t in used):
                continue
            total = sum(dense[t] for t in tokens if t < threshold) + sum(cost[t] for t in used)
            below = threshold if threshold > tokens[0] else 0
            if total < best[2]:
                best = (name, below, total)
        wins = [t for t in tokens if cost[t] < dense[t]]
        if wins and len(wins) < len(tokens):
            slower = [t for t in tokens if cost[t] > dense[t]]
            if not dense_copy and all(t < wins[0] for t in slower):  # slower only below: a dense copy helps
                missed.append(f"{name} is faster from {wins[0]} tokens (dense_copy=True would keep both copies "
                              "and dispatch per call)")
            elif slower:
                missed.append(f"{name} is faster at {_counts(wins)} tokens but slower at {_counts(slower)} "
                              f"(tokens={tuple(wins)} would pick it)")
    name, below, total = best
    speed = sum(dense.values()) / total if total else 1.0
    if name == "dense":
        reason = "no compressed path is as fast as dense at every measured token count"
        if missed:
            reason += f" ({'; '.join(missed)})"
        return "dense", 0, reason
    where = f"dense below {below} tokens, {name} from {below}" if below else f"{name} at every measured token count"
    return name, below, f"{where}: {speed:.2f}x dense over the measured token counts {tokens}"


def _counts(tokens: list[int]) -> str:
    return " / ".join(str(t) for t in tokens)


def choose_backend(weight: torch.Tensor, backend: str = "auto") -> tuple[str, str]:
    """``(backend, reason)`` for a weight: validates an explicit choice, resolves ``"auto"`` by
    :func:`plan_backend` over :data:`SHIPPED_SPEEDUPS` for the backends available here (no dense copy)."""
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
    if backend == "bitmask" and not weight.is_floating_point():
        raise ValueError(f"SparseLinear backend 'bitmask' needs a float weight, got {weight.dtype}")
    if backend != "auto":
        return backend, "requested"
    native, native_reason = native_cpu_support(weight)
    if native:  # CPU: fewer bytes and faster decode (module docstring); prefill expands the weight in the kernel
        if two_four:
            return "packed24", native_reason
        if weight.is_floating_point() and sparsity_of(weight) >= BITMASK_MIN_SPARSITY:
            return "bitmask", native_reason
        return "dense", f"not 2:4 and under {BITMASK_MIN_SPARSITY:.0%} sparse"
    if not two_four:
        return "dense", f"not 2:4 (no bitmask kernel: {native_reason})"
    candidates = sparse_candidates(weight)
    if not candidates:
        ok, reason = semi_structured_support(weight)
        return "dense", f"no fast 2:4 path here ({reason}; {native_reason})"
    times = {"dense": {t: 1.0 for t in SHIPPED_SPEEDUPS["torch24"]}}
    for name in candidates:
        shipped = SHIPPED_SPEEDUPS[name]
        times[name] = {t: 1.0 / shipped[min(shipped, key=lambda m: abs(m - t))] for t in times["dense"]}
    name, _, reason = plan_backend(times)
    return name, f"shipped H200 measurements: {reason}"


def _stored_backend(stored: Packed24 | BitmaskWeight, backend: str) -> tuple[str, str]:
    """``(backend, reason)`` for an already compressed weight: it keeps its format (``"auto"`` or that format's
    name; anything else is refused). Shapes, dtypes and a bitmask's row offsets are checked here."""
    fmt = "packed24" if isinstance(stored, Packed24) else "bitmask"
    if backend not in ("auto", fmt):
        raise ValueError(f"SparseLinear: a {type(stored).__name__} weight runs on backend {fmt!r} ('auto' picks it), "
                         f"got {backend!r}; unpack it (ops.unpack_weight) for another backend")
    if fmt == "packed24":
        check_packed(stored.values, stored.meta, stored.in_features, "SparseLinear")
    else:
        check_bitmask(stored.values, stored.bitmask, stored.row_offsets, stored.in_features, "SparseLinear")
        check_row_offsets(stored)
    if not stored.values.is_floating_point():
        raise ValueError(f"SparseLinear: stored values must be float, got {stored.values.dtype}")
    return fmt, "stored compressed"


class SparseLinear(nn.Module):
    """Inference-only linear ``y [..., out] = x [..., in] @ W.T + b`` with ``W`` stored per ``backend``.

    ``dense_below`` (sparse backends only): inputs of fewer tokens run on a dense copy of the weight, kept
    beside the compressed one (see the module docstring). ``weight`` may come compressed already, a
    :class:`~vlmsparse.sparse24.Packed24` or :class:`~vlmsparse.bitmask.BitmaskWeight` (its buffers are used as
    they are, no dense copy made): it keeps its format, so ``backend`` must be ``"auto"`` or that format.
    Shapes and backend are checked here, once; ``forward`` calls the unchecked op.
    """

    def __init__(self, weight: torch.Tensor | Packed24 | BitmaskWeight, bias: torch.Tensor | None = None,
                 backend: str = "auto", dense_below: int = 0) -> None:
        super().__init__()
        stored = weight if isinstance(weight, (Packed24, BitmaskWeight)) else None
        if stored is None and (not isinstance(weight, torch.Tensor) or weight.dim() != 2):
            got = f"shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"SparseLinear needs a 2-D [out, in] weight, a Packed24 or a BitmaskWeight, got {got}")
        if isinstance(dense_below, bool) or not isinstance(dense_below, int) or dense_below < 0:
            raise ValueError(f"SparseLinear: dense_below must be an int >= 0 (tokens), got {dense_below!r}")
        self.out_features, self.in_features = stored.shape if stored is not None else weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"SparseLinear: bias must be None or of shape ({self.out_features},), got "
                             f"{tuple(bias.shape)}")
        if stored is not None:
            self.backend, self.reason = _stored_backend(stored, backend)
        else:
            weight = weight.detach()
            self.backend, self.reason = choose_backend(weight, backend)
        if dense_below and self.backend == "dense":
            raise ValueError("SparseLinear: dense_below needs a sparse backend (torch24, packed24 or bitmask); "
                             f"this one is dense ({self.reason})")
        self.dense_below = dense_below
        self._semi: torch.Tensor | None = None
        if self.backend == "torch24":
            self._semi = to_semi_structured(weight)
        elif self.backend == "packed24":
            packed = stored if stored is not None else ops.pack24_weight(weight)
            self.register_buffer("values", packed.values)
            self.register_buffer("meta", packed.meta)
        elif self.backend == "bitmask":
            packed = stored if stored is not None else pack_bitmask_weight(weight)
            self.register_buffer("values", packed.values)
            self.register_buffer("bitmask", packed.bitmask)
            self.register_buffer("row_offsets", packed.row_offsets)
        if self.backend == "dense" or dense_below:
            self.register_buffer("weight", ops.unpack_weight(stored) if stored is not None else weight.clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str = "auto", dense_below: int = 0) -> SparseLinear:
        """A ``SparseLinear`` computing what ``linear`` computes (its weight must be 2:4 for ``torch24`` /
        ``packed24``)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"SparseLinear.from_linear needs an nn.Linear, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias, backend, dense_below)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense ``[out, in]`` tensor (bit for bit the weight it was built from)."""
        if self.backend == "dense" or self.dense_below:
            return self.weight
        if self.backend == "torch24":
            return self._semi.to_dense()
        return ops.unpack_weight(self.stored_weight())

    def stored_weight(self) -> Packed24 | BitmaskWeight | None:
        """The compressed weight this module computes with, over its own buffers (no copy): a ``Packed24`` for
        ``packed24``, a ``BitmaskWeight`` for ``bitmask``; None for the other backends."""
        if self.backend == "packed24":
            return Packed24(self.values, self.meta, self.in_features)
        if self.backend == "bitmask":
            return self._bitmask_weight()
        return None

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
        """``y [..., out]`` for ``x [..., in]``: dense for fewer than ``dense_below`` tokens, else the backend."""
        # The buffers from their dict: nn.Module.__getattr__ costs ~1 us per buffer and call (a third of the
        # host time of a small packed layer's call), a dict lookup ~0.03 us.
        buffers = self._buffers
        if self.backend == "dense" or x.numel() < self.dense_below * self.in_features:
            return nn.functional.linear(x, buffers["weight"], buffers["bias"])
        if self.backend == "torch24":
            return ops.torch24_linear(x, self._semi, buffers["bias"])
        if self.backend == "bitmask":
            return ops._bitmask_linear(x, buffers["values"], buffers["bitmask"], buffers["row_offsets"],
                                       buffers["bias"])
        return ops._packed24_linear(x, buffers["values"], buffers["meta"], buffers["bias"])

    def weight_bytes(self) -> int:
        """Bytes the weight takes in this module's storage (both copies with ``dense_below``)."""
        dense = self.out_features * self.in_features * self._element_size()
        if self.backend == "dense":
            return dense
        if self.backend == "packed24":
            sparse = self.values.numel() * self.values.element_size() + self.meta.numel()
        elif self.backend == "bitmask":
            sparse = self._bitmask_weight().nbytes()
        else:
            sparse = dense * 9 // 16
        return sparse + (dense if self.dense_below else 0)

    def _bitmask_weight(self) -> BitmaskWeight:
        return BitmaskWeight(self.values, self.bitmask, self.row_offsets, self.in_features)

    def _element_size(self) -> int:
        if self.backend == "torch24":
            return torch.empty(0, dtype=self._semi.dtype).element_size()
        return (self.values if self.backend in ("packed24", "bitmask") else self.weight).element_size()

    def extra_repr(self) -> str:
        below = f", dense_below={self.dense_below}" if self.dense_below else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"backend={self.backend}{below}")
