"""The bitmask weight format for unstructured sparsity (layer 0 of docs/ARCHITECTURE.md: torch only).

A weight ``W [out, in]`` is stored as:

- ``bitmask [out, ceil(in/8)]`` uint8: bit ``j`` of byte ``b`` of row ``r`` says whether ``W[r, 8b + j]`` is stored
  (:func:`vlmsparse.masks.pack_bitmask`, the layout of the mask file and of compressed checkpoints);
- ``values`` 1-D, same dtype as ``W``: the stored entries in row-major order, then ``PADDING`` zeros (vector
  kernels load up to 32 entries at a time and may read past the last stored one);
- ``row_offsets [out + 1]`` int64: row ``r``'s entries are ``values[row_offsets[r]:row_offsets[r + 1]]``.

Stored: the non-zero entries; a ``-0.0`` (what ``w * mask`` leaves at pruned negative entries) is a zero and
comes back as ``+0.0``, equal as a value. A 70% sparse fp32 weight takes ``0.3 * 4 + 1/8`` bytes per entry,
0.33 of dense; bf16, 0.36.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import pack_bitmask, unpack_bitmask

__all__ = ["BitmaskWeight", "PADDING", "pack_bitmask_weight", "unpack_bitmask_weight", "bitmask_weight",
           "row_counts", "nibble_counts", "check_row_offsets"]

PADDING = 32  # kBitmaskPadding in csrc/sparse_cpu/kernels.h


@dataclass(frozen=True)
class BitmaskWeight:
    """``values`` (stored entries + ``PADDING``), ``bitmask [out, ceil(in/8)]`` uint8, ``row_offsets [out+1]``."""

    values: torch.Tensor
    bitmask: torch.Tensor
    row_offsets: torch.Tensor
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.bitmask.shape[0], self.in_features)

    def nbytes(self) -> int:
        """Bytes of the stored entries and the bitmask (padding and row offsets not counted)."""
        stored = int(self.row_offsets[-1])
        return stored * self.values.element_size() + self.bitmask.numel()


def pack_bitmask_weight(weight: torch.Tensor) -> BitmaskWeight:
    """Pack ``weight [out, in]`` into the bitmask format (its non-zero entries are stored)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"pack_bitmask_weight needs a 2-D float [out, in] weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    stored = weight != 0
    values = torch.cat([weight[stored], weight.new_zeros(PADDING)])
    row_offsets = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
    torch.cumsum(stored.sum(1), 0, out=row_offsets[1:])
    return BitmaskWeight(values, pack_bitmask(stored), row_offsets, weight.shape[1])


def row_counts(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """Stored entries per row, int64 ``[out]``, of a ``bitmask [out, ceil(in/8)]`` uint8 (bits past ``in_features``
    in a row's last byte are not counted): a popcount table per byte, no ``[out, in]`` mask made."""
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 2 or bitmask.shape[1] != (in_features + 7) // 8:
        raise ValueError(f"bitmask must be uint8 [out, {(in_features + 7) // 8}] for {in_features} input features, "
                         f"got {bitmask.dtype} {tuple(bitmask.shape)}")
    if in_features % 8 and bitmask.shape[1]:
        bitmask = bitmask.clone()
        bitmask[:, -1] &= (1 << (in_features % 8)) - 1
    nibbles = nibble_counts(bitmask)
    return ((nibbles & 0x0F) + (nibbles >> 4)).sum(1, dtype=torch.int64)


def nibble_counts(bitmask: torch.Tensor) -> torch.Tensor:
    """Each nibble of a uint8 ``bitmask`` replaced by its count of set bits (0-4): the set inputs of each group of 4.
    Bit arithmetic on the bytes themselves (a byte table needs an int64 index copy: 35 -> 22 ms for the bitmask of
    an 11008 x 4096 weight, 2 threads)."""
    pairs = bitmask - ((bitmask >> 1) & 0x55)  # each 2-bit field: its count
    return (pairs & 0x33) + ((pairs >> 2) & 0x33)


def bitmask_weight(values: torch.Tensor, bitmask: torch.Tensor, in_features: int) -> BitmaskWeight:
    """The :class:`BitmaskWeight` of stored parts, as a compressed checkpoint holds them: ``values`` 1-D, the
    entries alone (no padding), and ``bitmask [out, ceil(in/8)]`` uint8. Row offsets come from the bitmask's
    popcounts; ``ValueError`` when it sets another number of entries than ``values`` holds."""
    if values.dim() != 1 or not values.is_floating_point():
        raise ValueError(f"bitmask weight: values must be a 1-D float tensor, got {values.dtype} "
                         f"{tuple(values.shape)}")
    counts = row_counts(bitmask, in_features)
    row_offsets = torch.zeros(bitmask.shape[0] + 1, dtype=torch.int64, device=bitmask.device)
    torch.cumsum(counts, 0, out=row_offsets[1:])
    if int(row_offsets[-1]) != values.numel():
        raise ValueError(f"bitmask weight: the bitmask sets {int(row_offsets[-1])} entries, values hold "
                         f"{values.numel()}")
    return BitmaskWeight(torch.cat([values, values.new_zeros(PADDING)]), bitmask, row_offsets, in_features)


def check_row_offsets(packed: BitmaskWeight) -> None:
    """``ValueError`` unless ``packed.row_offsets`` are the bitmask's running row counts (what the kernels read
    by) and ``values`` hold them plus ``PADDING``."""
    counts = row_counts(packed.bitmask, packed.in_features)
    offsets = packed.row_offsets
    if offsets.shape != (counts.numel() + 1,) or int(offsets[0]) != 0 or not torch.equal(
            offsets[1:] - offsets[:-1], counts.to(offsets.device)):
        raise ValueError("bitmask weight: row_offsets do not match the bitmask's entries per row")
    if packed.values.numel() < int(offsets[-1]) + PADDING:
        raise ValueError(f"bitmask weight: values hold {packed.values.numel()} entries, need {int(offsets[-1])} "
                         f"stored + {PADDING} padding")


def unpack_bitmask_weight(packed: BitmaskWeight) -> torch.Tensor:
    """Dense ``[out, in]`` weight from a :class:`BitmaskWeight` (the inverse of :func:`pack_bitmask_weight`,
    bit for bit but for ``-0.0``, which comes back ``+0.0``)."""
    stored = unpack_bitmask(packed.bitmask, packed.in_features)
    count = int(packed.row_offsets[-1])
    if int(stored.sum()) != count or packed.values.numel() < count:
        raise ValueError(f"bitmask weight: the bitmask sets {int(stored.sum())} entries, row_offsets say {count}, "
                         f"values hold {packed.values.numel()}")
    dense = torch.zeros(stored.shape, dtype=packed.values.dtype, device=packed.values.device)
    dense[stored] = packed.values[:count]
    return dense
