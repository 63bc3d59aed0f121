"""The packed 2:4 format and torch semi-structured interop (layer 0 of docs/ARCHITECTURE.md: torch only).

Packed 2:4 format of a weight ``W [out, in]`` (``in`` divisible by 4) in which every group of 4 consecutive
inputs of a row holds at most 2 non-zeros:

- ``values  [out, in/2]``, same dtype as ``W``: the two kept entries of group ``g`` at ``2g, 2g+1``;
- ``meta    [out, ceil(in/8)]`` uint8: two 2-bit column indices per group, ``i0 < i1`` within the group,
  as a nibble ``i0 | i1 << 2``; group ``g`` sits in byte ``g // 2``, low nibble when ``g`` is even.

So ``W[r, 4g + i0] = values[r, 2g]`` and ``W[r, 4g + i1] = values[r, 2g + 1]``, all else zero.
An fp16 weight packs to ``in/2 * 2 + in/8`` bytes per row: 9/16 of the dense bytes.

Which two positions a group keeps: the positions of a given keep-mask, or else the non-zeros, then
(when a group has fewer than 2 non-zeros) its ``-0.0`` entries, then the lowest-index zeros. This makes
``unpack(pack(W)) == W`` bit for bit, for fp32, fp16 and bf16, with one exception: a ``-0.0`` that does
not fit among a group's two stored entries comes back as ``+0.0`` (equal as a value). The package's
pruning writes ``+0.0`` at pruned positions, so its weights round-trip bit for bit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

__all__ = [
    "Packed24",
    "pack24",
    "unpack24",
    "unpack24_mask",
    "unpack24_with_mask",
    "kept_columns",
    "kept_pairs_table",
    "group_counts",
    "semi_structured_support",
    "to_semi_structured",
    "SEMI_STRUCTURED_DTYPES",
]


@dataclass(frozen=True)
class Packed24:
    """A 2:4 weight in the packed format: ``values [out, in/2]``, ``meta [out, ceil(in/8)]`` uint8."""

    values: torch.Tensor
    meta: torch.Tensor
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.in_features)

    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.meta.numel()


def _check_packable(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"pack24 needs a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if weight.shape[1] % 4:
        raise ValueError(
            f"pack24 needs in-features divisible by 4 (groups of 4 inputs), got {weight.shape[1]}"
        )


def _group_words(flags: torch.Tensor) -> torch.Tensor:
    """The 4 one-byte entries of each group of 4 consecutive inputs of ``flags [out, in]`` (bool or int8, entries
    0-3, ``in % 4 == 0``) as one int32 word ``[out, in/4]``, entry ``j`` in byte ``j`` (little endian) or ``3 - j``;
    one elementwise pass where a sum over the last dimension of size 4 was 3-5x slower."""
    return flags.contiguous().view(torch.uint8).view(torch.int32)


def group_counts(flags: torch.Tensor) -> torch.Tensor:
    """How many of each group of 4 consecutive entries of the bool ``flags [out, in]`` (``in % 4 == 0``) are True:
    int32 ``[out, in/4]`` (the byte sum lands in the top byte of the word times 0x01010101, whatever the
    endianness)."""
    return (_group_words(flags) * 0x01010101) >> 24


def _kept_pair_table() -> list[list[int]]:
    """Index ``p0 | p1 << 2 | p2 << 4 | p3 << 6`` (the priorities of a group's 4 entries) -> its kept positions
    ``[i0, i1]`` (``i0 < i1``): the two highest priorities, the lower index first among equals (a stable
    descending sort)."""
    table = []
    for index in range(256):
        priority = [(index >> (2 * j)) & 3 for j in range(4)]
        order = sorted(range(4), key=lambda j: -priority[j])  # sorted() is stable
        table.append(sorted(order[:2]))
    return table


_KEPT_PAIRS = _kept_pair_table()


def kept_pairs_table() -> torch.Tensor:
    """uint8 ``[256, 2]``: the kept positions ``(i0, i1)`` of a group by the index ``p0 | p1 << 2 | p2 << 4 |
    p3 << 6`` of its entries' priorities (2 a non-zero, 1 a ``-0.0``, 0 a ``+0.0``): :func:`pack24`'s rule, for
    other implementations of it (the native CPU one)."""
    return torch.tensor(_KEPT_PAIRS, dtype=torch.uint8)
_ENTRY_SHIFTS = (0, 8, 16, 24) if sys.byteorder == "little" else (24, 16, 8, 0)  # entry j's byte in a group word


def pack24(weight: torch.Tensor, mask: torch.Tensor | None = None) -> Packed24:
    """Pack a 2:4 weight ``[out, in]``. With ``mask`` (bool, exactly 2 ``True`` per group of 4) the mask's
    positions are stored, even where the weight happens to be zero; the weight must be zero outside it.

    Raises ``ValueError`` for shapes that cannot be packed or groups with more than 2 non-zeros.
    """
    _check_packable(weight)
    out_features, in_features = weight.shape
    groups = in_features // 4
    nonzero = weight != 0
    if mask is not None:
        if mask.shape != weight.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"pack24 mask must be bool of shape {tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        per_group = group_counts(mask)
        if not bool((per_group == 2).all()):
            bad = int((per_group != 2).sum())
            raise ValueError(f"pack24 mask is not 2:4: {bad} groups of 4 do not keep exactly 2")
        outside = int((nonzero & ~mask.to(weight.device)).sum())
        if outside:
            raise ValueError(f"pack24: the weight has {outside} non-zeros outside the mask")
        priority = mask.to(device=weight.device, dtype=torch.int8)
    else:
        counts = group_counts(nonzero)
        if bool((counts > 2).any()):
            bad = int((counts > 2).sum())
            raise ValueError(
                f"pack24: {bad} groups of 4 consecutive inputs hold more than 2 non-zeros; the weight is not 2:4"
            )
        # Non-zeros first, then -0.0 (so it survives the round trip), then the lowest-index zeros.
        negative_zero = (weight == 0) & torch.signbit(weight)
        priority = nonzero.to(torch.int8) * 2 + negative_zero.to(torch.int8)
    # each group's 4 priorities (0-2) as one byte index into _KEPT_PAIRS: the two kept positions of a stable
    # descending sort, looked up instead of sorted (two torch.sort calls did this; 5632x2048 bf16: 237 -> 74 ms)
    word = _group_words(priority)
    index = sum(((word >> shift) & 3) << (2 * j) for j, shift in enumerate(_ENTRY_SHIFTS))
    table = kept_pairs_table().to(device=weight.device, dtype=torch.long)
    kept = torch.nn.functional.embedding(index.long(), table)  # [out, groups, 2], i0 < i1
    values = torch.gather(weight.reshape(out_features, groups, 4), -1, kept).reshape(out_features, in_features // 2)
    nibbles = (kept[..., 0] | (kept[..., 1] << 2)).to(torch.uint8)  # [out, groups]
    if groups % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    pairs = nibbles.reshape(out_features, -1, 2)
    meta = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    return Packed24(values.contiguous(), meta, in_features)


# byte of meta (two groups of 4 inputs) -> the 4 kept columns it names, counted from the byte's first input (a list:
# the tensor is made per call, so that the function also traces under fake tensors / torch.compile)
_META_COLUMNS = [[b & 3, (b >> 2) & 3, 4 + ((b >> 4) & 3), 4 + (b >> 6)] for b in range(256)]


def kept_columns(meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The column of every stored value: int64 ``[out, in/2]`` from ``meta [out, ceil(in/8)]``, so that
    ``W[r, kept_columns[r, c]] = values[r, c]``."""
    table = torch.tensor(_META_COLUMNS, device=meta.device)
    columns = torch.nn.functional.embedding(meta.long(), table)  # one table lookup per meta byte
    columns += 8 * torch.arange(meta.shape[1], device=meta.device).view(1, -1, 1)
    return columns.reshape(meta.shape[0], -1)[:, : in_features // 2]


def _unpack(packed: Packed24, columns: torch.Tensor) -> torch.Tensor:
    values = packed.values
    dense = torch.zeros(values.shape[0], packed.in_features, dtype=values.dtype, device=values.device)
    return dense.scatter_(1, columns, values)


def _unpack_mask(packed: Packed24, columns: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(packed.values.shape[0], packed.in_features, dtype=torch.bool, device=packed.values.device)
    return mask.scatter_(1, columns, True)


def unpack24(packed: Packed24) -> torch.Tensor:
    """Dense ``[out, in]`` weight from a :class:`Packed24` (exact inverse of :func:`pack24`)."""
    return _unpack(packed, kept_columns(packed.meta, packed.in_features))


def unpack24_mask(packed: Packed24) -> torch.Tensor:
    """The keep-mask ``[out, in]`` (bool) the packed indices describe."""
    return _unpack_mask(packed, kept_columns(packed.meta, packed.in_features))


def unpack24_with_mask(packed: Packed24) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unpack24(packed), unpack24_mask(packed))``, the kept columns found once."""
    columns = kept_columns(packed.meta, packed.in_features)
    return _unpack(packed, columns), _unpack_mask(packed, columns)


# torch.sparse semi-structured: sparse-operand minimum shape (rows, cols), which must also divide the shape.
# Read off torch 2.13's SparseSemiStructuredTensorCUSPARSELT / ...CUTLASS._DTYPE_SHAPE_CONSTRAINTS; torch 2.11 has
# the same tables, names (to_sparse_semi_structured, _FORCE_CUTLASS, torch.backends.cusparselt.is_available) and
# dtypes (cuSPARSELt also lists float8_e4m3fn, without a matmul). tests/test_sparse24.py checks the installed torch.
_CUSPARSELT_MIN = {torch.float16: (16, 16), torch.bfloat16: (16, 16), torch.int8: (32, 32)}
_CUTLASS_MIN = {torch.float16: (32, 64), torch.bfloat16: (32, 64), torch.int8: (16, 128), torch.float32: (32, 32)}
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16, torch.int8)


def _cusparselt_available() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except (AttributeError, RuntimeError):
        return False


def semi_structured_support(
    weight: torch.Tensor,
    capability: tuple[int, int] | None = None,
    backend: str | None = None,
) -> tuple[bool, str]:
    """Whether ``weight`` ``[out, in]`` can go to ``torch.sparse.to_sparse_semi_structured``, and why not.

    Rules: a CUDA tensor on a GPU of compute capability >= 8.0 (Ampere or newer), 2-D, contiguous-able,
    dtype fp16 / bf16 / int8 (fp32 only through CUTLASS), both dims multiples of the backend's minimum
    (cuSPARSELt fp16/bf16: 16 x 16; CUTLASS fp16/bf16: 32 x 64), and 2:4 along the input dimension.
    ``capability`` and ``backend`` (``cusparselt`` / ``cutlass``) can be given to ask about another device.
    Returns ``(True, "ok (backend)")`` or ``(False, reason)``.
    """
    from .sparsity import satisfies_nm

    if weight.dim() != 2:
        return False, f"needs a 2-D weight, got {weight.dim()}-D"
    if capability is None:
        if weight.device.type != "cuda":
            return False, f"needs a CUDA tensor, got device {weight.device.type} (no CPU path in torch)"
        capability = torch.cuda.get_device_capability(weight.device)
    if tuple(capability) < (8, 0):
        return False, f"needs compute capability >= 8.0 (Ampere or newer), got {capability[0]}.{capability[1]}"
    if backend is None:
        backend = "cusparselt" if _cusparselt_available() else "cutlass"
    if backend not in ("cusparselt", "cutlass"):
        raise ValueError(f"backend must be 'cusparselt' or 'cutlass', got {backend!r}")
    table = _CUSPARSELT_MIN if backend == "cusparselt" else _CUTLASS_MIN
    if weight.dtype not in table:
        allowed = ", ".join(str(d).replace("torch.", "") for d in table)
        return False, f"dtype {str(weight.dtype).replace('torch.', '')} is not supported by {backend} ({allowed})"
    rows, cols = weight.shape
    min_rows, min_cols = table[weight.dtype]
    if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
        return False, (
            f"shape {rows}x{cols} is not a multiple of {min_rows}x{min_cols} ({backend}, "
            f"{str(weight.dtype).replace('torch.', '')})"
        )
    if not satisfies_nm(weight, 2, 4):
        return False, "the weight is not 2:4 along the input dimension"
    return True, f"ok ({backend})"


def to_semi_structured(weight: torch.Tensor) -> torch.Tensor:
    """Convert a 2:4 CUDA weight to a ``torch.sparse`` semi-structured tensor, or raise ``ValueError``
    with the reason from :func:`semi_structured_support`."""
    ok, reason = semi_structured_support(weight)
    if not ok:
        raise ValueError(f"cannot convert to torch semi-structured sparse: {reason}")
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = not _cusparselt_available()
    return to_sparse_semi_structured(weight.contiguous())
