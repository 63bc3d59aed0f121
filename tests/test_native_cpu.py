"""The native CPU kernels (csrc/sparse_cpu through vlmsparse.kernels.cpu): every ISA tier this CPU has, against
float64, in both formats; the torch.library ops under opcheck and torch.compile; dispatch in SparseLinear and
compress; the pure-torch fallback when the extension is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from tolerances import assert_close_to_reference
from torch import nn

from vlmsparse import ops
from vlmsparse.bitmask import PADDING, pack_bitmask_weight, unpack_bitmask_weight
from vlmsparse.modules.sparse_linear import SparseLinear, choose_backend
from vlmsparse.sparse24 import pack24
from vlmsparse.sparsity import mask_nm

ISAS = ("scalar", "avx2", "avx512", "avx512bf16", "amx")


def _weight24(out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    w = torch.randn(out_features, in_features)
    return torch.where(mask_nm(w.abs(), 2, 4), w, 0.0).to(dtype)


def _weight_unstructured(out_features: int, in_features: int, dtype: torch.dtype, density: float = 0.3):
    keep = torch.rand(out_features, in_features) < density
    return torch.where(keep, torch.randn(out_features, in_features), 0.0).to(dtype)


@pytest.fixture
def isa(native, request):
    """Runs the test with the native kernels forced to one tier (skipped when this CPU lacks it)."""
    name = request.param
    if name not in native.supported_isas():
        pytest.skip(f"this CPU has no {name} tier ({', '.join(native.supported_isas())})")
    previous = native.set_isa(name)
    yield name
    native.set_isa(previous)


def _check(result, x, weight, bias):
    exact = nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    low = nn.functional.linear(x, weight, bias)
    assert result.dtype == x.dtype and result.shape == low.shape
    assert_close_to_reference(result, low, exact)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [4, 100, 148, 256])  # tails of every vector width, and none
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 17])  # blocks of 4 rows of x and their remainders
def test_packed24_matches_float64(isa, native, dtype, in_features, rows):
    weight = _weight24(41, in_features, dtype)  # odd: weight rows in pairs and one alone
    packed = pack24(weight)
    bias = torch.randn(41).to(dtype) if rows % 2 else None
    x = torch.randn(rows, in_features).to(dtype)
    _check(native.packed24_matmul(x, packed.values, packed.meta, bias), x, weight, bias)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [3, 100, 150, 256])
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 9, 17])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])  # empty rows, 70% sparse, every entry stored
def test_bitmask_matches_float64(isa, native, dtype, in_features, rows, density):
    weight = _weight_unstructured(41, in_features, dtype, density)
    packed = pack_bitmask_weight(weight)
    bias = torch.randn(41).to(dtype) if rows % 2 else None
    x = torch.randn(rows, in_features).to(dtype)
    _check(native.bitmask_matmul(x, packed.values, packed.bitmask, packed.row_offsets, bias), x, weight, bias)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 6, 8, 16, 17, 33])  # the AVX2 column pass: blocks of 8 and 16 rows of x
def test_long_rows_in_several_column_chunks(isa, native, dtype, rows):
    """Rows longer than the column pass's chunk of 256 inputs (chunk starts from the bitmask's popcounts), in
    lengths that are not a multiple of a chunk, a mask word or a vector; 19 weight rows (panels of 8 and a rest)."""
    weight24, weight_bm = _weight24(19, 1000, dtype), _weight_unstructured(19, 1003, dtype)
    packed, bm = pack24(weight24), pack_bitmask_weight(weight_bm)
    bias = torch.randn(19).to(dtype) if rows % 2 else None
    x24, x_bm = torch.randn(rows, 1000).to(dtype), torch.randn(rows, 1003).to(dtype)
    _check(native.packed24_matmul(x24, packed.values, packed.meta, bias), x24, weight24, bias)
    _check(native.bitmask_matmul(x_bm, bm.values, bm.bitmask, bm.row_offsets, bias), x_bm, weight_bm, bias)


@pytest.mark.parametrize("isa", ["avx512", "avx512bf16"], indirect=True)  # (the scalar tier's one long sum of 4100
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])     # fp32 products can exceed the bound)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_bitmask_decode_in_several_pieces(isa, native, dtype, density):
    """One row of x, bitmask: the AVX-512 tiers compress x by each row's mask 1024 (fp32) or 2048 (bf16) inputs
    at a time; rows of 4100 inputs run several pieces and a tail that is not a whole vector."""
    weight = _weight_unstructured(7, 4100, dtype, density)
    bm = pack_bitmask_weight(weight)
    bias = torch.randn(7).to(dtype)
    x = torch.randn(1, 4100).to(dtype)
    _check(native.bitmask_matmul(x, bm.values, bm.bitmask, bm.row_offsets, bias), x, weight, bias)


@pytest.mark.parametrize("isa", ["avx512bf16"], indirect=True)
@pytest.mark.parametrize("in_features", [4, 60, 64, 68, 1000])  # tables of 64 inputs: less, a part, one, and a rest
@pytest.mark.parametrize("rows", [11, 12, 16, 17, 31, 32, 33, 50])  # 32 rows of x a pass, then 16 (and padding)
def test_packed24_token_lanes(isa, native, in_features, rows):
    """From 12 rows of x, packed 2:4 bf16 on the AVX-512 BF16 tier puts the rows of x in the vector lanes
    (p24_token_rows); 133 weight rows: a panel of 128, a group of 4 and one alone."""
    weight = _weight24(133, in_features, torch.bfloat16)
    packed = pack24(weight)
    bias = torch.randn(133).bfloat16() if rows % 2 else None
    x = torch.randn(rows, in_features).bfloat16()
    _check(native.packed24_matmul(x, packed.values, packed.meta, bias), x, weight, bias)


@pytest.mark.parametrize("isa", ["avx512bf16"], indirect=True)
@pytest.mark.parametrize("in_features", [4, 31, 32, 33, 512, 600, 1100])  # partial vectors, chunks of 512 inputs
@pytest.mark.parametrize("rows", [8, 9, 15, 16, 17, 33])  # token groups of 16 in blocks of 4, and their rests
def test_bitmask_expanded_tiles(isa, native, in_features, rows):
    """From 8 rows of x, bitmask bf16 on the AVX-512 BF16 tier expands panels of 8 weight rows into a dense tile
    (bitmask_tile_rows); 21 weight rows: two panels and one of 5 (a block of 4 and one row), among them an empty
    row and a full one, and the last row's values end at the padding."""
    weight = _weight_unstructured(21, in_features, torch.bfloat16)
    weight[3] = 0  # an empty row
    for full in (12, 20):  # full rows; 20 is the last, its values end where the padding starts
        row = torch.randn(in_features).bfloat16()
        weight[full] = torch.where(row == 0, 1.0, row)
    bm = pack_bitmask_weight(weight)
    bias = torch.randn(21).bfloat16() if rows % 2 else None
    x = torch.randn(rows, in_features).bfloat16()
    _check(native.bitmask_matmul(x, bm.values, bm.bitmask, bm.row_offsets, bias), x, weight, bias)


@pytest.mark.parametrize("isa", ["amx"], indirect=True)
@pytest.mark.parametrize("fmt", ["packed24", "bitmask"])
@pytest.mark.parametrize("in_features", [4, 28, 32, 36, 260, 1000])  # a part of a tile, one, a rest; chunks of 256
@pytest.mark.parametrize("rows", [3, 4, 7, 8, 16, 17, 48, 49, 100])  # below and at the thresholds (8 packed, 4
def test_amx_tiles(isa, native, fmt, in_features, rows):                # bitmask), blocks of 16, passes of 48
    """bf16 weights on AMX tiles: 37 weight rows (two panels of 16 and one of 5); bitmask with an empty row and a
    full one (the last: its values end where the padding starts)."""
    if fmt == "packed24":
        weight = _weight24(37, in_features, torch.bfloat16)
        packed = pack24(weight)
        run = lambda x, b: native.packed24_matmul(x, packed.values, packed.meta, b)  # noqa: E731
    else:
        weight = _weight_unstructured(37, in_features, torch.bfloat16)
        weight[5] = 0
        row = torch.randn(in_features).bfloat16()
        weight[36] = torch.where(row == 0, 1.0, row)
        bm = pack_bitmask_weight(weight)
        run = lambda x, b: native.bitmask_matmul(x, bm.values, bm.bitmask, bm.row_offsets, b)  # noqa: E731
    bias = torch.randn(37).bfloat16() if rows % 2 else None
    x = torch.randn(rows, in_features).bfloat16()
    _check(run(x, bias), x, weight, bias)


@pytest.fixture
def l2_bytes(native):
    """Sets the L2 size that the chunks of x assume (the ``set_l2_bytes`` test hook); this CPU's restored after."""
    ops = native._ops()
    yield ops.set_l2_bytes
    ops.set_l2_bytes(0)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("fmt", ["packed24", "bitmask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [15, 16, 17, 32, 47, 100])  # one chunk, one and a short rest, two, three, seven
def test_rows_of_x_in_chunks(isa, native, l2_bytes, fmt, dtype, rows):
    """Rows of x in chunks of 16 (an L2 of 1 byte: the smallest chunks), the last one shorter: every chunk's rows of
    y come from its own rows of x, on every tier and path (AMX tiles, column passes, token lanes)."""
    l2_bytes(1)
    if fmt == "packed24":
        weight = _weight24(37, 260, dtype)
        packed = pack24(weight)
        run = lambda x, b: native.packed24_matmul(x, packed.values, packed.meta, b)  # noqa: E731
    else:
        weight = _weight_unstructured(37, 260, dtype)
        bm = pack_bitmask_weight(weight)
        run = lambda x, b: native.bitmask_matmul(x, bm.values, bm.bitmask, bm.row_offsets, b)  # noqa: E731
    bias = torch.randn(37).to(dtype)
    x = torch.randn(rows, 260).to(dtype)
    _check(run(x, bias), x, weight, bias)


# (assumed L2 in KiB, kernel calls) for 108 rows of 1 KiB of x
CHUNKS = [(0, 1),      # this CPU's L2 (>= 144 KiB anywhere): all 108 rows fit 3/4 of it
          (144, 1),    # 3/4 of it: 108 rows
          (140, 2),    # 105: chunks of at most 70 rows (half of L2), 2 of 54 -> 64 and 44
          (100, 3),    # 50 rows, 3 of 36 -> 48, 48 and 12
          (64, 4),     # 32 rows, 4 of 27 -> 32, 32, 32 and 12
          (0.001, 7)]  # 1 byte: chunks of 1 row -> 16, six of them and 12


@pytest.mark.parametrize("isa", ["avx512"], indirect=True)
@pytest.mark.parametrize("l2_kib,calls", CHUNKS)
def test_chunks_of_rows_of_x_follow_the_l2_size(isa, native, l2_bytes, one_thread, l2_kib, calls):
    """108 rows of fp32 x with 256 inputs (1 KiB a row): one kernel call while x fills at most 3/4 of L2, else as
    few chunks of at most half of L2 as that takes, of equal rows rounded up to a multiple of 16. Counted through
    the avx512 bitmask column pass, which asks for 4 buffers per call from 12 rows of x on (refused here: the row
    pass then computes the rows)."""
    ops = native._ops()
    weight = _weight_unstructured(37, 256, torch.float32)
    bm = pack_bitmask_weight(weight)
    x = torch.randn(108, 256)
    l2_bytes(int(l2_kib * 1024))
    ops.refuse_buffers(False)
    ops.refuse_buffers(True)
    try:
        result = native.bitmask_matmul(x, bm.values, bm.bitmask, bm.row_offsets)
    finally:
        refused = ops.refuse_buffers(False)
    assert refused == 4 * calls
    _check(result, x, weight, None)


def test_l2_hook_refuses_negative_bytes(native, l2_bytes):
    with pytest.raises(RuntimeError, match="bytes must be >= 0"):
        l2_bytes(-1)


def _packed_pairs_product(x, values, meta):
    """``y[t, r] = sum_g values[r, 2g] * x[t, 4g + i0] + values[r, 2g + 1] * x[t, 4g + i1]`` in float64 for any
    nibbles (also i0 >= i1, which no packing writes)."""
    rows, groups = values.shape[0], values.shape[1] // 2
    nibbles = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(rows, -1)[:, :groups].long()
    columns = 4 * torch.arange(groups)
    x64, v64 = x.double(), values.double()
    y = torch.zeros(x.shape[0], rows, dtype=torch.float64)
    for r in range(rows):
        y[:, r] = x64[:, columns + (nibbles[r] & 3)] @ v64[r, 0::2] + x64[:, columns + (nibbles[r] >> 2)] @ v64[r, 1::2]
    return y


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("rows", [1, 5, 16, 33])
def test_packed24_any_nibble(isa, native, rows):
    """Meta nibbles with i0 >= i1 (not written by pack24; files from elsewhere may hold them) give the sum of the
    two stored products on every tier, as ordered ones do: the token-lanes path's table holds only i0 < i1 and sums
    the chunks of such rows another way. Rows mix ordered and unordered chunks."""
    generator = torch.Generator().manual_seed(3)
    out_features, in_features = 37, 200
    values = torch.randn(out_features, in_features // 2, generator=generator).bfloat16()
    ordered = torch.tensor([4, 8, 12, 9, 13, 14], dtype=torch.uint8)
    nibbles = ordered[torch.randint(0, 6, (out_features, in_features // 4), generator=generator)]
    unordered = torch.rand(out_features, 1, generator=generator) < 0.5  # rows with some unordered groups
    anything = torch.randint(0, 16, nibbles.shape, generator=generator, dtype=torch.uint8)
    nibbles = torch.where(unordered & (torch.rand(nibbles.shape, generator=generator) < 0.1), anything, nibbles)
    meta = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    exact = _packed_pairs_product(x, values, meta)
    low = _packed_pairs_product(x.float(), values.float(), meta).to(torch.bfloat16)
    result = native.packed24_matmul(x, values, meta)
    assert_close_to_reference(result, low, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_go_through_the_dense_expansion(native, dtype, monkeypatch):
    """From DENSE_FROM_ROWS rows of x on (per format) the weight is expanded (bit for bit) and F.linear runs."""
    weight24, weight_bm = _weight24(24, 64, dtype), _weight_unstructured(24, 64, dtype)
    packed, bm = pack24(weight24), pack_bitmask_weight(weight_bm)
    assert torch.equal(torch.ops.vlmsparse_native.packed24_to_dense(packed.values, packed.meta), weight24)
    assert torch.equal(torch.ops.vlmsparse_native.bitmask_to_dense(bm.values, bm.bitmask, bm.row_offsets, 64),
                       weight_bm)
    x24 = torch.randn(native.dense_from_rows("packed24", dtype), 64).to(dtype)
    x_bm = torch.randn(native.dense_from_rows("bitmask", dtype), 64).to(dtype)
    assert torch.equal(native.packed24_matmul(x24, packed.values, packed.meta), nn.functional.linear(x24, weight24))
    assert torch.equal(native.bitmask_matmul(x_bm, bm.values, bm.bitmask, bm.row_offsets),
                       nn.functional.linear(x_bm, weight_bm))
    kernel_rows = native.dense_from_rows("packed24", dtype) - 1  # the row kernels, up to the threshold
    _check(native.packed24_matmul(x24[:kernel_rows], packed.values, packed.meta), x24[:kernel_rows], weight24, None)
    monkeypatch.setitem(native._dense_from, ("bitmask", dtype), 1 << 30)  # the row kernels for every size
    _check(native.bitmask_matmul(x_bm, bm.values, bm.bitmask, bm.row_offsets), x_bm, weight_bm, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_row_count_across_the_thresholds(native, dtype, monkeypatch):
    """M = 1 .. 40 rows of x (decode, the row kernels' blocks, DENSE_FROM_ROWS moved to 24 and the dense GEMM
    path) against float64; 67 weight rows (groups of 4 and remainders)."""
    for fmt in native.FORMATS:
        monkeypatch.setitem(native._dense_from, (fmt, dtype), 24)
    weight24, weight_bm = _weight24(67, 136, dtype), _weight_unstructured(67, 136, dtype)
    packed, bm = pack24(weight24), pack_bitmask_weight(weight_bm)
    bias = torch.randn(67).to(dtype)
    for rows in range(1, 41):
        x = torch.randn(rows, 136).to(dtype)
        _check(native.packed24_matmul(x, packed.values, packed.meta, bias), x, weight24, bias)
        _check(native.bitmask_matmul(x, bm.values, bm.bitmask, bm.row_offsets, None), x, weight_bm, None)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_dense_path_threshold_follows_the_tier_and_format(isa, native, op_spy, monkeypatch):
    """fp32 prefill goes to dense GEMMs from 1024 rows of x (packed 2:4; 256 on amx) / 2048 (bitmask) on every tier;
    bf16 from 256 on avx512bf16, 512 / 1024 on amx, 4096 elsewhere (torch's bf16 GEMMs are slow there). Each format's
    operation reads its own threshold: one row below it the row kernel runs, at it the dense path."""
    bf16 = {"avx512bf16": {"packed24": 256, "bitmask": 256}, "amx": {"packed24": 512, "bitmask": 1024}}.get(
        isa, dict.fromkeys(native.FORMATS, native.DENSE_FROM_ROWS_BF16_WITHOUT_AVX512BF16))
    for fmt in native.FORMATS:
        assert native.dense_from_rows(fmt, torch.bfloat16) == bf16[fmt]
    assert native.dense_from_rows("packed24", torch.float32) == (256 if isa == "amx" else 1024)
    assert native.dense_from_rows("bitmask", torch.float32) == 2048
    with pytest.raises(ValueError, match="format must be one of"):
        native.dense_from_rows("csr", torch.float32)
    with pytest.raises(ValueError, match="dtype one of"):
        native.dense_from_rows("packed24", torch.float16)
    monkeypatch.setattr(native, "_ops", lambda: op_spy)
    monkeypatch.setitem(native._dense_from, ("packed24", torch.float32), 20)
    monkeypatch.setitem(native._dense_from, ("bitmask", torch.float32), 30)
    packed, bm = pack24(_weight24(8, 16, torch.float32)), pack_bitmask_weight(_weight_unstructured(8, 16, torch.float32))
    for rows in (19, 20, 29, 30):
        x = torch.randn(rows, 16)
        native.packed24_matmul(x, packed.values, packed.meta)
        native.bitmask_matmul(x, bm.values, bm.bitmask, bm.row_offsets)
    assert op_spy.names == ["packed24_linear", "bitmask_linear", "packed24_linear_dense", "bitmask_linear",
                     "packed24_linear_dense", "bitmask_linear", "packed24_linear_dense", "bitmask_linear_dense"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_rows", [0, 32, 45, 1000])  # one block; blocks of 32-33, 45-46 rows; one block
@pytest.mark.parametrize("with_bias", [False, True])
def test_dense_gemm_path_is_flinear_bit_for_bit(native, dtype, block_rows, with_bias):
    """The prefill path (weight rows expanded block by block into one reused buffer, one addmm per block) gives
    exactly F.linear(x, dense W, b) from 12 rows of x on (below that torch's fp32 GEMM picks kernels by the
    number of output columns, so blocks could differ in the last bit; the path starts at DENSE_FROM_ROWS)."""
    assert min(*native.DENSE_FROM_ROWS.values(), *native.DENSE_FROM_ROWS_AMX.values(),
               native.DENSE_FROM_ROWS_BF16_WITHOUT_AVX512BF16) >= 12
    ops_ = torch.ops.vlmsparse_native
    weight24, weight_bm = _weight24(197, 264, dtype), _weight_unstructured(197, 264, dtype)
    packed, bm = pack24(weight24), pack_bitmask_weight(weight_bm)
    bias = torch.randn(197).to(dtype) if with_bias else None
    for rows in (6, 16, 20, 37):  # 12, 32, 40, 74 rows of x
        x = torch.randn(2, rows, 264).to(dtype)
        got24 = ops_.packed24_linear_dense(x, packed.values, packed.meta, bias, block_rows)
        got_bm = ops_.bitmask_linear_dense(x, bm.values, bm.bitmask, bm.row_offsets, bias, block_rows)
        assert got24.shape == (2, rows, 197) and got24.dtype == got_bm.dtype == dtype
        assert torch.equal(got24, nn.functional.linear(x, weight24, bias))
        assert torch.equal(got_bm, nn.functional.linear(x, weight_bm, bias))
    assert ops_.packed24_linear_dense(torch.randn(0, 264).to(dtype), packed.values, packed.meta, bias).shape == (0, 197)
    with pytest.raises(RuntimeError, match="block_rows must be >= 0"):
        ops_.packed24_linear_dense(x, packed.values, packed.meta, bias, -1)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_leading_dims_and_empty_input(isa, native):
    weight = _weight24(24, 64, torch.float32)
    packed = pack24(weight)
    x = torch.randn(2, 3, 64)
    _check(native.packed24_matmul(x, packed.values, packed.meta), x, weight, None)
    assert native.packed24_matmul(torch.randn(0, 64), packed.values, packed.meta).shape == (0, 24)


def test_bitmask_format_round_trip():
    weight = _weight_unstructured(8, 20, torch.float32)
    packed = pack_bitmask_weight(weight)
    assert packed.values.numel() == int(packed.row_offsets[-1]) + PADDING
    assert torch.equal(unpack_bitmask_weight(packed).view(torch.int32), weight.view(torch.int32))  # bit for bit
    assert packed.nbytes() == int((weight != 0).sum()) * 4 + 8 * 3
    # w * mask leaves -0.0 at pruned negative entries: zeros, not stored, back as +0.0
    masked = torch.randn(8, 20) * (torch.rand(8, 20) < 0.3)
    assert bool(torch.signbit(masked[masked == 0]).any())
    packed = pack_bitmask_weight(masked)
    assert int(packed.row_offsets[-1]) == int((masked != 0).sum())
    assert torch.equal(unpack_bitmask_weight(packed), masked)


def test_bitmask_weight_from_the_stored_parts():
    """What a compressed checkpoint stores (entries without padding, bitmask) gives back the packed weight: row
    offsets from the bitmask's popcounts (bits past in_features in a row's last byte not counted)."""
    from vlmsparse.bitmask import bitmask_weight, row_counts

    weight = _weight_unstructured(9, 20, torch.float32)
    packed = pack_bitmask_weight(weight)
    count = int(packed.row_offsets[-1])
    rebuilt = bitmask_weight(packed.values[:count], packed.bitmask, 20)
    for part in ("values", "bitmask", "row_offsets"):
        assert torch.equal(getattr(rebuilt, part), getattr(packed, part)), part
    stray = packed.bitmask.clone()
    stray[:, -1] |= 0xF0  # columns 20-23 of a 20-wide row
    assert torch.equal(row_counts(stray, 20), (weight != 0).sum(1))
    with pytest.raises(ValueError, match=f"the bitmask sets {count} entries, values hold {count - 1}"):
        bitmask_weight(packed.values[: count - 1], packed.bitmask, 20)
    with pytest.raises(ValueError, match="bitmask must be uint8 \\[out, 3\\] for 20 input features"):
        bitmask_weight(packed.values[:count], packed.bitmask[:, :2], 20)


def test_nibble_and_row_counts_of_every_byte():
    """nibble_counts gives each nibble's set bits for all 256 bytes; row_counts sums them per row."""
    from vlmsparse.bitmask import nibble_counts, row_counts

    every = torch.arange(256, dtype=torch.uint8).reshape(8, 32)
    nibbles = nibble_counts(every)
    for byte in range(256):
        want = bin(byte & 15).count("1") | bin(byte >> 4).count("1") << 4
        assert int(nibbles.reshape(-1)[byte]) == want, byte
    assert row_counts(every, 256).tolist() == [sum(bin(b).count("1") for b in range(32 * r, 32 * r + 32))
                                               for r in range(8)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unpack_weight_native_equals_torch(native, dtype, op_spy, monkeypatch):
    """ops.unpack_weight gives bit for bit unpack24 / unpack_bitmask_weight (a stored -0.0 included); the native
    ops do it for float32 / bfloat16, torch for the rest."""
    from vlmsparse import ops
    from vlmsparse.sparse24 import unpack24

    weight24 = _weight24(24, 64, dtype)
    weight24[0, int(weight24[0, :4].nonzero()[0])] = -0.0  # a stored -0.0
    packed, bm = pack24(weight24), pack_bitmask_weight(_weight_unstructured(24, 64, dtype))
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    assert torch.equal(ops.unpack_weight(packed).view(bits), unpack24(packed).view(bits))
    assert torch.equal(ops.unpack_weight(bm).view(bits), unpack_bitmask_weight(bm).view(bits))
    monkeypatch.setattr(native, "_ops", lambda: op_spy)
    for stored in (packed, bm):
        ops.unpack_weight(stored)
    assert op_spy.names == (["packed24_to_dense", "bitmask_to_dense"] if dtype in native.NATIVE_DTYPES else [])
    with pytest.raises(ValueError, match="needs a Packed24 or BitmaskWeight, got Tensor"):
        ops.unpack_weight(weight24)


SELECTION_SCORES = {  # the kinds of rows a selection must get right
    "ties": lambda g, shape: torch.randint(0, 5, shape, generator=g).float(),
    "uniform": lambda g, shape: torch.rand(shape, generator=g),
    "signs and scales": lambda g, shape: torch.randn(shape, generator=g) * torch.logspace(-30, 30, shape[1]),
    "signed zeros": lambda g, shape: torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 0.0),
    "infinities": lambda g, shape: torch.where(torch.rand(shape, generator=g) < 0.3, torch.inf,
                                               torch.where(torch.rand(shape, generator=g) < 0.3, -torch.inf, 1.0)),
}


@pytest.mark.parametrize("kind", list(SELECTION_SCORES))
@pytest.mark.parametrize("shape", [(7, 33), (5, 1), (3, 8), (40, 600), (300, 4), (9, 6)])
def test_keep_top_rows_equals_the_torch_selection(native, kind, shape):
    """For every keep from 0 to the row length: the same mask as sparsity's kthvalue path (ties at the threshold
    kept from the lowest index; -0.0 equals +0.0); rows of up to 8 entries (N:M groups) take the rank path in C++
    and its pairwise counterpart in torch."""
    from vlmsparse.sparsity import _keep_top

    scores = SELECTION_SCORES[kind](torch.Generator().manual_seed(shape[1]), shape)
    keeps = range(shape[1] + 1) if shape[1] <= 33 else [0, 1, 2, 299, 300, 301, 599, 600]
    for keep in keeps:
        got = native.keep_top_rows(scores, keep)
        assert got.dtype == torch.bool and torch.equal(got, _keep_top(scores, keep)), keep
        assert bool((got.sum(1) == keep).all())


def test_keep_top_rows_refuses_bad_input(native):
    scores = torch.rand(3, 9)
    scores[1, 4] = float("nan")
    with pytest.raises(RuntimeError, match="row 1 holds NaN"):
        native.keep_top_rows(scores, 4)
    with pytest.raises(RuntimeError, match="keep must be in \\[0, 9\\], got 10"):
        native.keep_top_rows(torch.rand(3, 9), 10)
    with pytest.raises(RuntimeError, match="2-D float32 CPU tensor"):
        torch.ops.vlmsparse_native.keep_top_rows(torch.rand(9), 4)
    assert torch.equal(native.keep_top_rows(torch.tensor([[1.0, 3.0, 2.0]]).bfloat16(), 2),
                       torch.tensor([[False, True, True]]))  # other float dtypes converted
    groups = torch.rand(5000, 4)  # the rank path (rows of <= 8), threads over rows: the first NaN row is named
    groups[3170, 2] = groups[4000, 0] = float("nan")
    with pytest.raises(RuntimeError, match="row 3170 holds NaN"):
        native.keep_top_rows(groups, 2)


@pytest.mark.parametrize("pattern,scope", [("0.5", "row"), ("0.7", "row"), ("0.5", "matrix"), ("2:4", "row"),
                                           ("4:8", "row")])
def test_masks_take_the_native_selection(native, op_spy, monkeypatch, pattern, scope):
    """Wanda and magnitude on a CPU select through keep_top_rows (N:M: one group per row), with the masks of the
    torch path."""
    from vlmsparse.pruning import magnitude_prune, wanda_prune

    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)).bfloat16()
    weight[0, :8] = 0.0  # ties among the lowest scores
    weight[1, 8:16] = weight[1, 16]  # ties among equal scores of a group (Wanda: the same norm in each column)
    norm = torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.1
    norm[8:16] = norm[16]
    native_masks = [wanda_prune(weight, norm, pattern, scope)[1], magnitude_prune(weight, pattern, scope)[1]]
    monkeypatch.setattr(native, "_ops", lambda: op_spy)
    wanda_prune(weight, norm, pattern, scope)
    assert op_spy.names == ["keep_top_rows"]
    monkeypatch.setattr(native, "_LOAD_RESULT", "not built (simulated by the test)")
    torch_masks = [wanda_prune(weight, norm, pattern, scope)[1], magnitude_prune(weight, pattern, scope)[1]]
    assert op_spy.names == ["keep_top_rows"]
    for got, want in zip(native_masks, torch_masks):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 5), (64, 256), (200, 600), (0, 7)])
def test_column_square_sums(native, dtype, shape):
    """float64 column sums of squares within a few float32 roundings of the exact ones (blocks of 64 rows and 256
    columns cut through), the same with one thread as with two, of a non-contiguous x too."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, shape[1])).to(dtype)
    want = x.double().square().sum(0)
    got = native.column_square_sums(x)
    assert got.dtype == torch.float64 and got.shape == (shape[1],)
    assert torch.allclose(got, want, rtol=1e-6, atol=0), float(((got - want).abs() / want).max())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.column_square_sums(x), got)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(native.column_square_sums(x.T.contiguous().T), got)


def test_column_square_sums_refuses_bad_input(native):
    with pytest.raises(RuntimeError, match="2-D float32 or bfloat16 CPU tensor, got Half"):
        native.column_square_sums(torch.randn(4, 4).half())
    with pytest.raises(RuntimeError, match="2-D float32 or bfloat16 CPU tensor"):
        native.column_square_sums(torch.randn(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_stats_take_the_native_square_sums(native, op_spy, monkeypatch, dtype):
    """Wanda's statistics on a CPU sum through column_square_sums for float32 / bfloat16 inputs (torch for float16),
    padding dropped first; the norms equal the torch path's within float32 roundings, NaN is refused either way."""
    from vlmsparse.pruning import InputStats

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(3, 50, 96, generator=g) * 4).to(dtype) for _ in range(3)]
    token_mask = torch.ones(3, 50, dtype=torch.bool)
    token_mask[1, 30:] = False

    def norms():
        stats = InputStats(96)
        for x in batches:
            stats.add_batch(x, token_mask)
        return stats

    monkeypatch.setattr(native, "_ops", lambda: op_spy)
    fast = norms()
    assert op_spy.names == (["column_square_sums"] * 3 if dtype in native.NATIVE_DTYPES else [])
    assert fast.count == 3 * 130
    monkeypatch.setattr(native, "_LOAD_RESULT", "not built (simulated by the test)")
    slow = norms()
    assert len(op_spy.names) == (3 if dtype in native.NATIVE_DTYPES else 0)
    want = torch.cat([x[token_mask] for x in batches]).double().square().mean(0).sqrt().float()
    assert torch.allclose(fast.norm, want, rtol=1e-6, atol=0) and torch.allclose(slow.norm, want, rtol=1e-6, atol=0)
    monkeypatch.undo()
    bad = batches[0].clone()
    bad[2, 7, 5] = float("nan")
    with pytest.raises(ValueError, match="hold 1 NaN/inf values"):
        InputStats(96).add_batch(bad, token_mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_features", [4, 12, 64])
def test_pack24_weight_native_equals_torch(native, dtype, in_features, op_spy, monkeypatch):
    """ops.pack24_weight gives sparse24.pack24's values and meta bit for bit (groups with 0-2 non-zeros, -0.0 and
    +0.0 among kept and pruned entries, a NaN, an odd number of groups) through the native op for float32 /
    bfloat16, and refuses a weight that is not 2:4 with pack24's message."""
    from vlmsparse import ops
    from vlmsparse.sparse24 import pack24

    g = torch.Generator().manual_seed(in_features)
    weight = torch.randn(40, in_features, generator=g)
    weight = torch.where(mask_nm(weight.abs(), 2, 4), weight, 0.0)
    pick = torch.rand(weight.shape, generator=g)
    weight = torch.where(pick < 0.15, -0.0, torch.where(pick < 0.25, 0.0, weight))  # kept or pruned, signed zeros
    weight[3, 0], weight[3, 1:4] = float("nan"), 0.0
    weight = weight.to(dtype)
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    monkeypatch.setattr(native, "_ops", lambda: op_spy)
    got, want = ops.pack24_weight(weight), pack24(weight)
    assert op_spy.names == (["dense_to_packed24"] if dtype in native.NATIVE_DTYPES else [])
    assert torch.equal(got.values.view(bits), want.values.view(bits)) and torch.equal(got.meta, want.meta)
    assert got.in_features == in_features
    weight[5, :3] = 1.0  # three non-zeros in one group
    weight[7, :4] = 2.0
    with pytest.raises(ValueError, match="pack24: 2 groups of 4 consecutive inputs hold more than 2 non-zeros"):
        ops.pack24_weight(weight)
    with pytest.raises(ValueError, match="divisible by 4"):
        ops.pack24_weight(torch.zeros(2, 6, dtype=dtype))


def test_isa_selection(native):
    assert native.isa() in native.supported_isas() and native.supported_isas()[0] == "scalar"
    with pytest.raises(RuntimeError, match="unknown ISA level 'sse9'.*allowed: scalar, avx2, avx512, avx512bf16, amx"):
        native.set_isa("sse9")
    code = "from vlmsparse.kernels import cpu; print(cpu.isa())"
    env = {**os.environ, "VLMSPARSE_CPU_ISA": "scalar"}
    forced = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert forced.stdout.strip() == "scalar"
    env["VLMSPARSE_CPU_ISA"] = "sse9"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown ISA level 'sse9'" in bad.stderr


def test_ops_refuse_bad_input(native):
    weight = _weight24(16, 32, torch.float32)
    packed = pack24(weight)
    with pytest.raises(ValueError, match="both be float32 or both bfloat16"):
        native.packed24_matmul(torch.randn(2, 32).bfloat16(), packed.values, packed.meta)
    with pytest.raises(ValueError, match="features"):
        native.packed24_matmul(torch.randn(2, 36), packed.values, packed.meta)
    bm = pack_bitmask_weight(_weight_unstructured(16, 32, torch.float32))
    x = torch.randn(2, 32)
    decreasing = bm.row_offsets.clone()
    decreasing[3] = decreasing[4] + 1
    with pytest.raises(RuntimeError, match=r"row_offsets must not decrease \(row 3\)"):
        native.bitmask_matmul(x, bm.values, bm.bitmask, decreasing)
    with pytest.raises(RuntimeError, match="32 of padding"):
        native.bitmask_matmul(x, bm.values[: int(bm.row_offsets[-1])], bm.bitmask, bm.row_offsets)
    with pytest.raises(ValueError, match="bitmask must be uint8"):
        native.bitmask_matmul(x, bm.values, bm.bitmask[:, :2], bm.row_offsets)


def test_opcheck_both_ops(native):
    packed = pack24(_weight24(16, 32, torch.float32))
    bm = pack_bitmask_weight(_weight_unstructured(16, 32, torch.float32))
    x, bias = torch.randn(3, 32), torch.randn(16)
    torch.library.opcheck(torch.ops.vlmsparse_native.packed24_linear, (x, packed.values, packed.meta, bias))
    torch.library.opcheck(torch.ops.vlmsparse_native.bitmask_linear,
                          (x, bm.values, bm.bitmask, bm.row_offsets, None))
    torch.library.opcheck(torch.ops.vlmsparse_native.packed24_to_dense, (packed.values, packed.meta))
    torch.library.opcheck(torch.ops.vlmsparse_native.bitmask_to_dense, (bm.values, bm.bitmask, bm.row_offsets, 32))
    torch.library.opcheck(torch.ops.vlmsparse_native.packed24_linear_dense, (x, packed.values, packed.meta, bias))
    torch.library.opcheck(torch.ops.vlmsparse_native.bitmask_linear_dense,
                          (x, bm.values, bm.bitmask, bm.row_offsets, None, 32))
    torch.library.opcheck(torch.ops.vlmsparse_native.keep_top_rows, (torch.rand(16, 32), 12))
    torch.library.opcheck(torch.ops.vlmsparse_native.keep_top_rows, (torch.rand(16, 4), 2))
    torch.library.opcheck(torch.ops.vlmsparse_native.column_square_sums, (torch.randn(70, 300),))
    from vlmsparse.sparse24 import kept_pairs_table

    torch.library.opcheck(torch.ops.vlmsparse_native.dense_to_packed24,
                          (_weight24(16, 32, torch.float32), kept_pairs_table()))


@pytest.mark.parametrize("isa", ["amx"], indirect=True)
def test_opcheck_where_the_amx_tiles_run(isa, native):
    """bf16 with 16 rows of x: the ops under opcheck on the path that runs AMX tiles (test_opcheck_both_ops uses
    fp32 and 3 rows of x, which never reach them)."""
    packed = pack24(_weight24(16, 64, torch.bfloat16))
    bm = pack_bitmask_weight(_weight_unstructured(16, 64, torch.bfloat16))
    x, bias = torch.randn(16, 64).bfloat16(), torch.randn(16).bfloat16()
    torch.library.opcheck(torch.ops.vlmsparse_native.packed24_linear, (x, packed.values, packed.meta, bias))
    torch.library.opcheck(torch.ops.vlmsparse_native.bitmask_linear, (x, bm.values, bm.bitmask, bm.row_offsets, None))


@pytest.mark.parametrize("backend", ["packed24", "bitmask"])
def test_sparse_linear_compiles_fullgraph(native, backend):
    weight = _weight24(32, 64, torch.float32)
    layer = SparseLinear(weight, torch.randn(32), backend=backend)
    model = nn.Sequential(layer, nn.ReLU())
    x = torch.randn(5, 64)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_tiny_llama_with_sparse_linears_compiles_inductor_fullgraph(native, one_thread, monkeypatch):
    """A tiny Llama whose decoder linears are SparseLinear on the native kernels (packed 2:4 and bitmask) compiles
    with inductor in one graph and gives eager's logits, on the row kernels (2 tokens) and on the dense-GEMM path
    (18 tokens, DENSE_FROM_ROWS moved to 16: the custom op reads it when it runs)."""
    for fmt in native.FORMATS:
        monkeypatch.setitem(native._dense_from, (fmt, torch.float32), 16)
        monkeypatch.setitem(native._dense_from, (fmt, torch.bfloat16), 16)
    from factories import tiny_llama

    from vlmsparse.pipeline.compress import compress

    torch._dynamo.reset()
    model = tiny_llama(0).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for i, name in enumerate(names):  # alternately 2:4 and 60% unstructured
            weight = model.get_submodule(name).weight
            keep = mask_nm(weight.abs(), 2, 4) if i % 2 == 0 else torch.rand(weight.shape) >= 0.6
            weight.masked_fill_(~keep, 0)
    report = compress(model, progress=False)
    assert report.counts() == {"packed24": (len(names) + 1) // 2, "bitmask": len(names) // 2}
    compiled = torch.compile(model, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 1), (2, 9)):
        ids = torch.randint(0, model.config.vocab_size, shape, generator=g)
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits
            got = compiled(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_auto_dispatch_on_cpu(native):
    assert choose_backend(_weight24(16, 32, torch.float32))[0] == "packed24"
    assert choose_backend(_weight_unstructured(16, 32, torch.bfloat16, 0.3))[0] == "bitmask"
    assert choose_backend(_weight_unstructured(16, 32, torch.float32, 0.9))[0] == "dense"  # 10% sparse
    backend, reason = choose_backend(_weight24(16, 32, torch.float16))
    assert backend == "dense" and "float32 / bfloat16" in reason
    layer = SparseLinear(_weight24(16, 32, torch.float32))
    x = torch.randn(3, 32)
    with ops.use_backend("reference"):
        want = layer(x)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)  # default CPU backend: native


def test_auto_without_native_stays_dense(without_native):
    backend, reason = choose_backend(_weight24(16, 32, torch.float32))
    assert backend == "dense" and "simulated" in reason
    assert choose_backend(_weight_unstructured(16, 32, torch.float32))[0] == "dense"
    # an explicit packed24 / bitmask layer still runs, through the reference twins
    weight = _weight_unstructured(16, 32, torch.float32)
    layer = SparseLinear(weight, backend="bitmask")
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), nn.functional.linear(x, weight))
    with pytest.raises(RuntimeError, match="not built"):
        ops.bitmask_linear(x, layer.values, layer.bitmask, layer.row_offsets, backend="native")


def test_compress_and_load_unstructured_as_bitmask(native, tmp_path):
    from factories import tiny_llama

    from vlmsparse.pipeline.compress import compress, load_compressed, save_compressed

    model = tiny_llama(0).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    with torch.no_grad():
        for name in names:
            weight = model.get_submodule(name).weight
            weight.mul_(torch.rand_like(weight) < 0.3)
    ids = torch.randint(3, 100, (2, 9))
    want = model(ids).logits
    save_compressed(model, tmp_path / "ckpt")
    report = compress(model, progress=False)
    assert report.counts() == {"bitmask": len(names)}
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    loaded = load_compressed(tmp_path / "ckpt", as_sparse=True)
    swapped = {n for n, m in loaded.named_modules() if isinstance(m, SparseLinear)}
    assert swapped == set(names) and {loaded.get_submodule(n).backend for n in swapped} == {"bitmask"}
    torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-4, atol=1e-4)


# (tier, format, dtype, rows of x): each path that needs a scratch buffer on this tier
PATHS_WITH_BUFFERS = [
    ("avx2", "packed24", torch.float32, 1), ("avx2", "packed24", torch.bfloat16, 1),  # decode passes
    ("avx2", "bitmask", torch.float32, 1), ("avx2", "bitmask", torch.bfloat16, 1),
    ("avx2", "packed24", torch.float32, 9), ("avx2", "bitmask", torch.bfloat16, 20),  # column passes
    ("avx512", "bitmask", torch.float32, 1),  # x compressed by the row's mask
    ("avx512", "bitmask", torch.float32, 20),  # column pass (bitmask fp32)
    ("avx512bf16", "bitmask", torch.bfloat16, 1), ("avx512bf16", "packed24", torch.bfloat16, 12),  # token lanes
    ("avx512bf16", "bitmask", torch.bfloat16, 8),  # expanded tiles
    ("amx", "packed24", torch.bfloat16, 8), ("amx", "bitmask", torch.bfloat16, 4),  # AMX tiles (avx512bf16 asks
]                                                                                   # no buffer for these)


@pytest.mark.parametrize("isa,fmt,dtype,rows", PATHS_WITH_BUFFERS, indirect=["isa"])
def test_without_scratch_memory_every_path_falls_back_to_the_row_pass(isa, native, fmt, dtype, rows):
    """A kernel whose scratch buffer cannot be allocated writes nothing and the row pass computes the rows instead
    (refuse_buffers: the test hook that makes every buffer request fail). The count of refused requests shows that
    the path asked for one; the result must still be right."""
    ops = native._ops()
    weight = _weight24(37, 300, dtype) if fmt == "packed24" else _weight_unstructured(37, 300, dtype)
    bias = torch.randn(37).to(dtype)
    x = torch.randn(rows, 300).to(dtype)
    if fmt == "packed24":
        packed = pack24(weight)
        run = lambda: native.packed24_matmul(x, packed.values, packed.meta, bias)  # noqa: E731
    else:
        bm = pack_bitmask_weight(weight)
        run = lambda: native.bitmask_matmul(x, bm.values, bm.bitmask, bm.row_offsets, bias)  # noqa: E731
    ops.refuse_buffers(False)
    assert ops.refuse_buffers(False) == 0
    _check(run(), x, weight, bias)
    assert ops.refuse_buffers(True) == 0  # the path has its buffer when memory is there
    try:
        result = run()
    finally:
        refused = ops.refuse_buffers(False)
    assert refused >= 1
    _check(result, x, weight, bias)


@pytest.mark.parametrize("isa", ["avx512bf16"], indirect=True)
def test_the_row_pass_asks_for_no_buffer(isa, native):
    """The counterpart of the test above: 4 rows of x, bitmask bf16, take the row pass, which needs no buffer."""
    ops = native._ops()
    weight = _weight_unstructured(37, 300, torch.bfloat16)
    bm = pack_bitmask_weight(weight)
    x = torch.randn(4, 300).bfloat16()
    ops.refuse_buffers(True)
    try:
        result = native.bitmask_matmul(x, bm.values, bm.bitmask, bm.row_offsets)
    finally:
        refused = ops.refuse_buffers(False)
    assert refused == 0
    _check(result, x, weight, None)
