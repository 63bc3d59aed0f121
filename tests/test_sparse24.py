"""Packed 2:4 format: round trips bit for bit, error cases, semi-structured support rules."""

from __future__ import annotations

import pytest
import torch

from vlmsparse.sparse24 import (
    Packed24,
    group_counts,
    pack24,
    semi_structured_support,
    to_semi_structured,
    unpack24,
    unpack24_mask,
)
from vlmsparse.sparsity import mask_nm

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _weight24(out: int, inp: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(out, inp, generator=g).to(dtype)
    mask = mask_nm(dense.float().abs(), 2, 4)
    return torch.where(mask, dense, torch.zeros((), dtype=dtype)), mask


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(_INT_VIEW[a.dtype]), b.view(_INT_VIEW[b.dtype]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4), (3, 12), (16, 64), (5, 36)])
def test_round_trip_bit_for_bit(dtype, shape):
    weight, mask = _weight24(*shape, dtype)
    packed = pack24(weight)
    assert packed.values.shape == (shape[0], shape[1] // 2)
    assert packed.meta.dtype == torch.uint8 and packed.meta.shape == (shape[0], (shape[1] // 4 + 1) // 2)
    assert packed.shape == shape
    assert _bits_equal(unpack24(packed), weight)
    assert torch.equal(unpack24_mask(packed), mask)


def test_layout_is_documented_one():
    # Row [0, a, 0, b | c, 0, 0, 0]: group 0 keeps columns 1, 3 -> nibble 1 | 3 << 2 = 13;
    # group 1 has one non-zero at column 0, filled with the lowest zero (column 1) -> nibble 0 | 1 << 2 = 4.
    weight = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0]])
    packed = pack24(weight)
    assert packed.values.tolist() == [[1.5, -2.0, 3.0, 0.0]]
    assert packed.meta.tolist() == [[13 | (4 << 4)]]


def test_negative_zero_survives_when_it_fits():
    weight = torch.tensor([[-0.0, 0.0, 0.0, 1.0]])
    assert _bits_equal(unpack24(pack24(weight)), weight)


def test_all_zero_and_sparser_rows():
    weight = torch.zeros(2, 8)
    weight[1, 5] = 7.0
    assert _bits_equal(unpack24(pack24(weight)), weight)


def test_every_group_keeps_the_stable_sort_choice():
    """Every group a 2:4 weight can hold (each entry a non-zero, -0.0 or +0.0, at most 2 non-zeros: 72 kinds)
    keeps what a stable descending sort of (non-zero 2, -0.0 1, +0.0 0) picks, the lower position first among
    equals: pack24 looks the pair up in a table instead, so this compares it with torch.sort over all of them."""
    import itertools

    kinds = [g for g in itertools.product((0, 1, 2), repeat=4) if sum(p == 2 for p in g) <= 2]
    assert len(kinds) == 72
    entry = {0: 0.0, 1: -0.0, 2: 3.5}
    weight = torch.tensor([[entry[p] for p in g] for g in kinds])  # one group per row
    priority = torch.tensor(kinds, dtype=torch.int8)
    order = torch.sort(priority, dim=-1, descending=True, stable=True).indices
    want = torch.sort(order[:, :2], dim=-1).values
    packed = pack24(weight)
    got = torch.stack([packed.meta[:, 0] & 3, (packed.meta[:, 0] >> 2) & 3], dim=1).long()
    assert torch.equal(got, want)
    assert _bits_equal(packed.values, torch.gather(weight, 1, want))
    mask = torch.zeros(len(kinds), 4, dtype=torch.bool).scatter_(1, want, True)  # the same pairs as a mask
    assert torch.equal(unpack24_mask(pack24(weight * mask, mask)), mask)


def test_group_counts_count_each_group_of_four():
    flags = torch.rand(7, 40, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(group_counts(flags), flags.reshape(7, 10, 4).sum(-1).int())
    assert torch.equal(group_counts(flags.t().contiguous().t()), group_counts(flags))  # any layout


def test_pack_with_mask_keeps_mask_positions_even_for_zero_values():
    weight, mask = _weight24(4, 16, torch.float32)
    weight[0, mask[0].nonzero()[0, 0]] = 0.0  # a kept position whose value is zero
    packed = pack24(weight, mask)
    assert torch.equal(unpack24_mask(packed), mask)
    assert _bits_equal(unpack24(packed), weight)


def test_pack_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        pack24(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="2-D"):
        pack24(torch.zeros(8))
    dense = torch.ones(2, 8)
    dense[1, :4] = 0
    with pytest.raises(ValueError, match="3 groups of 4 consecutive inputs hold more than 2 non-zeros"):
        pack24(dense)
    weight, mask = _weight24(2, 8, torch.float32)
    with pytest.raises(ValueError, match="not 2:4"):
        pack24(weight, torch.ones_like(mask))
    with pytest.raises(ValueError, match="non-zeros outside the mask"):
        pack24(weight, ~mask)
    with pytest.raises(ValueError, match="bool"):
        pack24(weight, mask.float())


def test_packed_bytes_are_9_16_of_fp16_dense():
    weight, _ = _weight24(64, 256, torch.float16)
    packed = pack24(weight)
    assert packed.nbytes() / (weight.numel() * 2) == pytest.approx(9 / 16)


def test_semi_structured_support_rules():
    weight, _ = _weight24(64, 128, torch.float16)
    assert semi_structured_support(weight) == (False, "needs a CUDA tensor, got device cpu (no CPU path in torch)")
    ok, reason = semi_structured_support(weight, capability=(8, 0), backend="cusparselt")
    assert ok and "cusparselt" in reason
    ok, reason = semi_structured_support(weight, capability=(7, 5))
    assert not ok and "compute capability >= 8.0" in reason
    ok, reason = semi_structured_support(weight.float(), capability=(9, 0), backend="cusparselt")
    assert not ok and "dtype float32" in reason
    ok, _ = semi_structured_support(weight.float(), capability=(9, 0), backend="cutlass")
    assert ok
    small, _ = _weight24(16, 48, torch.float16)
    ok, reason = semi_structured_support(small, capability=(8, 0), backend="cutlass")
    assert not ok and "multiple of 32x64" in reason
    ok, reason = semi_structured_support(torch.ones(64, 128, dtype=torch.float16), capability=(8, 0))
    assert not ok and "not 2:4" in reason
    with pytest.raises(ValueError, match="backend"):
        semi_structured_support(weight, capability=(8, 0), backend="cublas")


def test_semi_structured_minima_match_the_installed_torch():
    """The shape minima of semi_structured_support are torch's own (the classes exist on a CPU-only build)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    from vlmsparse import sparse24

    for table, cls in [(sparse24._CUSPARSELT_MIN, SparseSemiStructuredTensorCUSPARSELT),
                       (sparse24._CUTLASS_MIN, SparseSemiStructuredTensorCUTLASS)]:
        for dtype, (rows, cols) in table.items():
            limits = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
            assert (limits.sparse_min_rows, limits.sparse_min_cols) == (rows, cols), (cls.__name__, dtype)
    for dtype in sparse24.SEMI_STRUCTURED_DTYPES:
        assert dtype in SparseSemiStructuredTensorCUTLASS._DTYPE_SHAPE_CONSTRAINTS


def test_to_semi_structured_refuses_cpu_with_reason():
    weight, _ = _weight24(64, 128, torch.float16)
    with pytest.raises(ValueError, match="CUDA tensor"):
        to_semi_structured(weight)


@pytest.mark.gpu
def test_to_semi_structured_matches_dense_matmul_on_gpu():
    weight, _ = _weight24(128, 256, torch.float16)
    weight = weight.cuda()
    sparse = to_semi_structured(weight)
    x = torch.randn(64, 256, dtype=torch.float16, device="cuda")
    torch.testing.assert_close(torch.nn.functional.linear(x, sparse), x @ weight.T, rtol=1e-2, atol=1e-2)


def test_packed24_dataclass_exposes_shape():
    packed = Packed24(torch.zeros(3, 6), torch.zeros(3, 2, dtype=torch.uint8), 12)
    assert packed.shape == (3, 12)
