"""Pure-torch twins of the Triton kernels (same signatures), used on CPU and as the test oracle.

Notation: ``x [T, in]`` (any leading dims are flattened to T), frozen weight ``W [out, in]``, keep-mask
``M [out, in]`` (bool), ``lora_A [r, in]``, ``lora_B [out, r]``, ``s = scaling = lora_alpha / r``.

Forward:   ``y = x @ (W*M + s*(B@A)*M).T + b``
Backward (``G = dY.T @ X``, ``[out, in]``, the only full-size product):

- ``dX = dY @ (W*M + s*(B@A)*M)``
- ``dB = s * (G*M) @ A.T``       ``[out, r]``
- ``dA = s * B.T @ (G*M)``       ``[r, in]``

The packed 2:4 variants take ``values [out, in/2]`` and ``meta [out, ceil(in/8)]`` (see
:mod:`vlmsparse.sparse24`) in place of ``W`` and ``M``; the mask is the packed pattern.

The SparseLoRA twins work in blocks of output rows (``BLOCK_ELEMENTS`` entries of ``W`` each), so neither
the effective weight nor G exists full-size, even inside a call; the packed 2:4 twins unpack the weight and its
pattern one block at a time, so they hold no full-size tensor either. Nothing is kept alive between calls. Arithmetic runs in the input dtype, as the torch reference of a kernel should.
"""

from __future__ import annotations

import torch

from ..bitmask import BitmaskWeight, unpack_bitmask_weight
from ..sparse24 import Packed24, kept_columns, unpack24
from .checks import check_bitmask, check_packed

__all__ = [
    "effective_weight_ref",
    "sparse_lora_forward_ref",
    "sparse_lora_backward_ref",
    "packed24_matmul_ref",
    "bitmask_matmul_ref",
    "packed24_lora_forward_ref",
    "packed24_lora_backward_ref",
]


def effective_weight_ref(
    weight: torch.Tensor, mask: torch.Tensor, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """``W*M + s*(B@A)*M`` as a dense ``[out, in]`` tensor (``W*M`` when there is no adapter)."""
    zero = torch.zeros((), dtype=weight.dtype, device=weight.device)
    if lora_A is None or lora_B is None:
        return torch.where(mask, weight, zero)
    merged = torch.addmm(weight, lora_B.to(weight.dtype), lora_A.to(weight.dtype), alpha=scaling)
    if merged.requires_grad:  # autograd through this function (tests): no out=
        return torch.where(mask, merged, zero)
    return torch.where(mask, merged, zero, out=merged)  # in place: one full-size temporary, no ~mask


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


# Rows of W per block: the effective weight and G are formed block by block (about 1M entries each), so no
# full-size temporary exists even inside a call; one block reproduces the unblocked computation exactly.
BLOCK_ELEMENTS = 1 << 20


def _row_blocks(out_features: int, in_features: int) -> list[tuple[int, int]]:
    rows = max(1, BLOCK_ELEMENTS // max(1, in_features))
    return [(i, min(i + rows, out_features)) for i in range(0, out_features, rows)]


def _keep(mask_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Mask rows as 0/1 in ``dtype`` (multiplying is much faster on CPU than a bool where)."""
    return mask_rows.view(torch.uint8).to(dtype)


class _DenseBlock:
    """Rows ``i:j`` of a dense-stored weight ``W`` and its bool mask ``M``."""

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, i: int, j: int) -> None:
        self.weight, self.mask, self._keeps = weight[i:j], mask[i:j], {}

    def keep(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._keeps:
            self._keeps[dtype] = _keep(self.mask, dtype)
        return self._keeps[dtype]

    def effective(self, lora_A, lora_B_rows, scaling) -> torch.Tensor:
        """``(W + s*B@A) * M`` of the rows, in ``W``'s dtype (pruned entries +-0; :func:`effective_weight_ref`
        gives exact +0)."""
        keep = self.keep(self.weight.dtype)
        if lora_A is None or lora_B_rows is None:
            return self.weight * keep
        w = torch.addmm(self.weight, lora_B_rows.to(self.weight.dtype), lora_A.to(self.weight.dtype), alpha=scaling)
        return w.mul_(keep)

    def mask_(self, g: torch.Tensor) -> torch.Tensor:
        """``G * M`` of the rows, in place."""
        return g.mul_(self.keep(g.dtype))


class _PackedBlock:
    """Rows ``i:j`` of a packed 2:4 weight, its pattern the mask. Works on the stored entries: the update is
    gathered at the kept columns and the result scattered into a zero block, about twice as fast on a CPU as
    unpacking the weight and its mask and masking (2048x5504 fp32 blocks, 1 thread)."""

    def __init__(self, packed: Packed24, i: int, j: int) -> None:
        self.values = packed.values[i:j]
        self.columns = kept_columns(packed.meta[i:j], packed.in_features)
        self.in_features = packed.in_features

    def _scatter(self, stored: torch.Tensor) -> torch.Tensor:
        dense = torch.zeros(stored.shape[0], self.in_features, dtype=stored.dtype, device=stored.device)
        return dense.scatter_(1, self.columns, stored)

    def effective(self, lora_A, lora_B_rows, scaling) -> torch.Tensor:
        """``unpack(values + s*(B@A)[kept])``: the rows of ``(W + s*B@A) * M`` (pruned entries exact +0)."""
        if lora_A is None or lora_B_rows is None:
            return self._scatter(self.values)
        dtype = self.values.dtype
        update = torch.mm(lora_B_rows.to(dtype), lora_A.to(dtype))
        return self._scatter(torch.gather(update, 1, self.columns).mul_(scaling).add_(self.values))

    def mask_(self, g: torch.Tensor) -> torch.Tensor:
        """``G * M`` of the rows (a new block)."""
        return self._scatter(torch.gather(g, 1, self.columns))


def _lora_forward_blocks(x, block, out_features: int, in_features: int, lora_A, lora_B, scaling, bias):
    """``y = x @ W_eff.T + b`` in blocks of output rows; ``block(i, j)`` gives rows ``i:j`` of the weight
    (:class:`_DenseBlock` / :class:`_PackedBlock`)."""
    blocks = _row_blocks(out_features, in_features)

    def effective(i: int, j: int) -> torch.Tensor:
        return block(i, j).effective(lora_A, None if lora_B is None else lora_B[i:j], scaling)

    if len(blocks) == 1:
        return torch.nn.functional.linear(x, effective(0, out_features), bias)
    x2 = _flatten(x)
    parts = []
    for i, j in blocks:
        w = effective(i, j)
        parts.append(torch.nn.functional.linear(x2, w, None if bias is None else bias[i:j]))
        del w
    return torch.cat(parts, dim=-1).reshape(*x.shape[:-1], out_features)


def _lora_backward_blocks(grad_out, x, block, out_features: int, in_features: int, lora_A, lora_B, scaling,
                          need_input_grad: bool):
    """``(dX, dA, dB)`` in blocks of output rows ``b``: ``dX += dY[:, b] @ W_eff[b]``, ``G_b = dY[:, b].T @ X``
    masked, ``dB[b] = s * G_b @ A.T``, ``dA += s * B[b].T @ G_b``."""
    dy, x2 = _flatten(grad_out), _flatten(x)
    x2 = x2.to(dy.dtype)
    A, B = lora_A.to(dy.dtype), lora_B.to(dy.dtype)
    grad_x = torch.zeros(dy.shape[0], in_features, dtype=dy.dtype, device=dy.device) if need_input_grad else None
    grad_A = torch.zeros(A.shape, dtype=dy.dtype, device=dy.device)
    grad_B = torch.empty(B.shape, dtype=dy.dtype, device=dy.device)
    for i, j in _row_blocks(out_features, in_features):
        rows = block(i, j)
        dy_b = dy[:, i:j]
        if grad_x is not None:
            w = rows.effective(lora_A, lora_B[i:j], scaling)
            grad_x.addmm_(dy_b, w.to(dy.dtype))
            del w
        g = rows.mask_(dy_b.T @ x2)  # (G*M)[i:j]
        torch.mm(g, A.T, out=grad_B[i:j])
        grad_A.addmm_(B[i:j].T, g)
        del g
    grad_A.mul_(scaling)
    grad_B.mul_(scaling)
    if grad_x is not None:
        grad_x = grad_x.reshape(*grad_out.shape[:-1], in_features)
    return grad_x, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)


def sparse_lora_forward_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [..., out] = x @ (W*M + s*(B@A)*M).T + b`` for ``x [..., in]``, in blocks of output rows."""
    out_features, in_features = weight.shape
    return _lora_forward_blocks(x, lambda i, j: _DenseBlock(weight, mask, i, j), out_features, in_features, lora_A,
                                lora_B, scaling, bias)


def sparse_lora_backward_ref(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    need_input_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dX [..., in] or None, dA [r, in], dB [out, r])`` for ``grad_out [..., out]`` and ``x [..., in]`` (in
    blocks of output rows, see :func:`_lora_backward_blocks`)."""
    out_features, in_features = weight.shape
    return _lora_backward_blocks(grad_out, x, lambda i, j: _DenseBlock(weight, mask, i, j), out_features,
                                 in_features, lora_A, lora_B, scaling, need_input_grad)


def _packed(values: torch.Tensor, meta: torch.Tensor, in_features: int, what: str) -> Packed24:
    """The checked :class:`Packed24` of ``values [out, in/2]``, ``meta [out, ceil(in/8)]``."""
    check_packed(values, meta, in_features, what)
    return Packed24(values, meta, in_features)


def packed24_matmul_ref(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ unpack24(values, meta).T + b``."""
    weight = unpack24(_packed(values, meta, x.shape[-1], "packed24_matmul_ref"))
    return torch.nn.functional.linear(x, weight, bias)


def bitmask_matmul_ref(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W.T + b`` with ``W`` in the bitmask format (:mod:`vlmsparse.bitmask`), unpacked inside the call."""
    check_bitmask(values, bitmask, row_offsets, x.shape[-1], "bitmask_matmul_ref")
    weight = unpack_bitmask_weight(BitmaskWeight(values, bitmask, row_offsets, x.shape[-1]))
    return torch.nn.functional.linear(x, weight, bias)


def packed24_lora_forward_ref(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ (unpack24(Wp) + s*(B@A)*M24).T + b``, ``M24`` the packed 2:4 pattern (unpacked block by block)."""
    packed = _packed(values, meta, x.shape[-1], "packed24_lora_forward_ref")
    return _lora_forward_blocks(x, lambda i, j: _PackedBlock(packed, i, j), values.shape[0], x.shape[-1], lora_A,
                                lora_B, scaling, bias)


def packed24_lora_backward_ref(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    need_input_grad: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dX, dA, dB)`` of :func:`packed24_lora_forward_ref`."""
    packed = _packed(values, meta, x.shape[-1], "packed24_lora_backward_ref")
    return _lora_backward_blocks(grad_out, x, lambda i, j: _PackedBlock(packed, i, j), values.shape[0],
                                 x.shape[-1], lora_A, lora_B, scaling, need_input_grad)
