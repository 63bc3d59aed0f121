"""SparseLinear: backend choice, bit-exact outputs on the CPU paths, the inverse swap; GPU paths (gpu marker)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmsparse import ops
from vlmsparse.modules.sparse_linear import SparseLinear, choose_backend, is_24
from vlmsparse.sparsity import mask_nm


def _linear24(out: int = 32, inp: int = 64, dtype=torch.float32, bias: bool = True, device="cpu") -> nn.Linear:
    lin = nn.Linear(inp, out, bias=bias, dtype=dtype, device=device)
    with torch.no_grad():
        mask = mask_nm(lin.weight.abs().float(), 2, 4)
        lin.weight.masked_fill_(~mask.to(device), 0)
    return lin


def test_is_24_counts_values_and_negative_zero_is_zero():
    w = _linear24().weight.detach()
    assert is_24(w)
    assert not is_24(torch.randn(8, 16))
    assert not is_24(torch.zeros(4, 6))  # in-features not divisible by 4
    w2 = w.clone()
    w2[0, :4] = torch.tensor([1.0, 2.0, -0.0, -0.0])  # -0.0 is zero: still 2 non-zeros in the group
    assert is_24(w2)
    w2[0, :4] = torch.tensor([1.0, 2.0, float("nan"), 0.0])  # NaN is not zero
    assert not is_24(w2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_pruned_by_multiplying_with_mask_packs(dtype):
    """``w * mask`` leaves -0.0 where w < 0: SparseLinear takes it, values and outputs come back equal."""
    torch.manual_seed(0)
    weight = torch.randn(32, 64).to(dtype)
    pruned = weight * mask_nm(weight.abs().float(), 2, 4).to(dtype)
    assert bool(torch.signbit(pruned[pruned == 0]).any())  # the case of the issue: -0.0 at pruned positions
    assert choose_backend(pruned)[1] != "not 2:4"
    sparse = SparseLinear(pruned, backend="packed24")
    assert sparse.backend == "packed24"
    assert torch.equal(sparse.dense_weight(), pruned)  # equal values (a -0.0 may come back +0.0)
    x = torch.randn(3, 64).to(dtype)
    with ops.use_backend("reference"):  # bit for bit through the reference twin (the native kernel sums in its order)
        assert torch.equal(sparse(x), nn.functional.linear(x, pruned))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed24_backend_cpu_is_bit_exact(dtype):
    """Through the reference twin the packed layer computes exactly what nn.Linear computes."""
    lin = _linear24(dtype=dtype)
    sparse = SparseLinear.from_linear(lin, backend="packed24")
    assert sparse.backend == "packed24" and sparse.values.shape == (32, 32) and sparse.meta.dtype == torch.uint8
    x = torch.randn(3, 5, 64, dtype=dtype)
    with ops.use_backend("reference"):
        assert torch.equal(sparse(x), lin(x))
    back = sparse.to_linear()
    assert torch.equal(back.weight, lin.weight) and torch.equal(back.bias, lin.bias)
    assert "backend=packed24" in repr(sparse)


def test_weight_bytes_and_state_dict():
    sparse = SparseLinear.from_linear(_linear24(dtype=torch.float16, bias=False), backend="packed24")
    assert sparse.weight_bytes() == 32 * 64 * 2 * 9 // 16
    assert set(sparse.state_dict()) == {"values", "meta"}


def test_auto_on_cpu_stays_dense_and_non24_is_dense(without_native):
    lin = _linear24()
    sparse = SparseLinear.from_linear(lin)
    assert sparse.backend == "dense" and "CUDA" in sparse.reason
    dense_lin = nn.Linear(16, 8)
    assert choose_backend(dense_lin.weight)[0] == "dense"
    x = torch.randn(4, 64)
    assert torch.equal(sparse(x), lin(x))


def test_bad_backend_requests_raise():
    with pytest.raises(ValueError, match="one of"):
        choose_backend(torch.zeros(4, 8), "fast")
    with pytest.raises(ValueError, match="needs a 2:4 weight"):
        SparseLinear(torch.randn(8, 16), backend="packed24")
    with pytest.raises(ValueError, match="CUDA"):
        SparseLinear(_linear24().weight, backend="torch24")
    with pytest.raises(ValueError, match="nn.Linear"):
        SparseLinear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch24", "packed24"])
def test_gpu_backends_match_dense(dtype, backend):
    lin = _linear24(256, 512, dtype=dtype, device="cuda")
    sparse = SparseLinear.from_linear(lin, backend=backend)
    assert sparse.backend == backend
    for tokens in (1, 7, 128):
        x = torch.randn(tokens, 512, dtype=dtype, device="cuda")
        torch.testing.assert_close(sparse(x), lin(x), rtol=2e-2, atol=2e-2)
    assert torch.equal(sparse.to_linear().weight, lin.weight)


@pytest.mark.gpu
def test_gpu_auto_follows_the_shipped_measurements_and_dense_below():
    lin = _linear24(256, 512, dtype=torch.float16, device="cuda")
    sparse = SparseLinear.from_linear(lin)
    assert sparse.backend == "dense" and "shipped H200" in sparse.reason, sparse.reason
    hybrid = SparseLinear.from_linear(lin, backend="torch24", dense_below=64)
    for tokens in (1, 63, 64, 256):
        x = torch.randn(tokens, 512, dtype=torch.float16, device="cuda")
        torch.testing.assert_close(hybrid(x), lin(x), rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------ dispatch on M
from vlmsparse.modules import sparse_linear as sl  # noqa: E402


def test_plan_backend_names_a_path_faster_only_for_short_inputs():
    """A path faster at decode but slower at prefill: a dense copy (sparse from a threshold up) cannot help; a
    shorter list of token counts would pick it."""
    dense, bitmask = {1: 1.0, 512: 10.0}, {1: 0.5, 512: 12.0}
    for dense_copy in (False, True):
        name, below, reason = sl.plan_backend({"dense": dense, "bitmask": bitmask}, dense_copy=dense_copy)
        assert (name, below) == ("dense", 0)
        assert "bitmask is faster at 1 tokens but slower at 512 (tokens=(1,) would pick it)" in reason
        assert "dense_copy" not in reason


def test_plan_backend_never_slower_than_dense_at_a_measured_count():
    dense = {1: 1.0, 128: 2.0, 8192: 100.0}
    torch24 = {1: 14.0, 128: 28.0, 8192: 70.0}  # the H200 shape of the numbers: only long inputs win
    assert sl.plan_backend({"dense": dense, "torch24": torch24})[:2] == ("dense", 0)
    reason = sl.plan_backend({"dense": dense, "torch24": torch24})[2]
    assert "torch24 is faster from 8192 tokens" in reason and "dense_copy=True" in reason
    name, below, reason = sl.plan_backend({"dense": dense, "torch24": torch24}, dense_copy=True)
    assert (name, below) == ("torch24", 8192) and "dense below 8192 tokens" in reason
    # faster everywhere: no dense copy needed, even when dense_copy is allowed
    packed = {1: 0.5, 128: 1.5, 8192: 99.0}
    assert sl.plan_backend({"dense": dense, "packed24": packed}, dense_copy=True)[:2] == ("packed24", 0)
    # the lowest sum among the eligible: torch24 from 8192 beats packed24 everywhere, with a dense copy
    both = {"dense": dense, "packed24": packed, "torch24": torch24}
    assert sl.plan_backend(both)[:2] == ("packed24", 0)
    assert sl.plan_backend(both, dense_copy=True)[:2] == ("torch24", 8192)
    # slower at one count by a hair: not eligible; a tie keeps dense
    assert sl.plan_backend({"dense": dense, "packed24": {1: 0.5, 128: 2.01, 8192: 50.0}})[0] == "dense"
    assert sl.plan_backend({"dense": dense, "packed24": dict(dense)})[0] == "dense"
    with pytest.raises(ValueError, match="they must agree"):
        sl.plan_backend({"dense": dense, "packed24": {1: 0.5}})


def test_auto_follows_the_shipped_measurements(monkeypatch):
    """Where both compressed paths exist (a GPU), auto without a measurement of its own keeps dense: the H200
    numbers show neither as fast as dense at every token count."""
    monkeypatch.setattr(sl, "sparse_candidates", lambda w: {"torch24": "supported", "packed24": "kernel"})
    monkeypatch.setattr(sl, "native_cpu_support", lambda w: (False, "not a CPU weight (cuda)"))
    name, reason = choose_backend(_linear24().weight.detach())
    assert name == "dense" and "shipped H200" in reason and "torch24 is faster from 8192 tokens" in reason
    shipped = {"torch24": {1: 0.5, 8192: 2.0}, "packed24": {1: 2.0, 2048: 1.1, 8192: 1.3}}
    monkeypatch.setattr(sl, "SHIPPED_SPEEDUPS", shipped)  # a faster kernel shipped: auto takes it
    assert choose_backend(_linear24().weight.detach())[0] == "packed24"


def test_dense_below_dispatches_per_call_on_tokens(monkeypatch):
    from vlmsparse import ops

    lin = _linear24(16, 32)
    calls = []
    real = ops._packed24_linear
    monkeypatch.setattr(ops, "_packed24_linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    layer = SparseLinear.from_linear(lin, backend="packed24", dense_below=8)
    assert set(layer.state_dict()) == {"weight", "values", "meta", "bias"} and "dense_below=8" in repr(layer)
    assert layer.weight_bytes() == 16 * 32 * 4 + SparseLinear.from_linear(lin, backend="packed24").weight_bytes()
    for shape, sparse in (((7, 32), False), ((2, 3, 32), False), ((8, 32), True), ((3, 4, 32), True)):
        calls.clear()
        x = torch.randn(*shape)
        torch.testing.assert_close(layer(x), lin(x))
        assert (calls == [x.shape]) == sparse, shape
    assert torch.equal(layer.to_linear().weight, lin.weight)
    with pytest.raises(ValueError, match="dense_below needs a sparse backend"):
        SparseLinear.from_linear(lin, backend="dense", dense_below=8)
    with pytest.raises(ValueError, match="dense_below must be an int >= 0"):
        SparseLinear.from_linear(lin, backend="packed24", dense_below=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_from_stored_parts_equals_from_the_dense_weight(dtype):
    """A Packed24 / BitmaskWeight given to SparseLinear becomes its buffers as they are (no copy): the same buffers
    and outputs as the module built from the dense weight; with dense_below the dense copy is the unpacked weight."""
    from vlmsparse.bitmask import pack_bitmask_weight
    from vlmsparse.sparse24 import pack24

    torch.manual_seed(0)
    lin = _linear24(dtype=dtype)
    x = torch.randn(3, 64).to(dtype)
    sparse70 = lin.weight.detach() * (torch.rand(32, 64) < 0.3)
    for weight, stored, backend in ((lin.weight.detach(), pack24(lin.weight.detach()), "packed24"),
                                    (sparse70, pack_bitmask_weight(sparse70), "bitmask")):
        for below in (0, 4):
            from_dense = SparseLinear(weight, lin.bias, backend, dense_below=below)
            from_stored = SparseLinear(stored, lin.bias, dense_below=below)
            assert (from_stored.backend, from_stored.reason) == (backend, "stored compressed")
            assert from_stored.values is stored.values  # used as given
            assert from_dense.state_dict().keys() == from_stored.state_dict().keys()
            for key, value in from_stored.state_dict().items():
                assert torch.equal(value, from_dense.state_dict()[key]), key
            with torch.no_grad():
                assert torch.equal(from_stored(x), from_dense(x))
                assert torch.equal(from_stored(x[:1]), from_dense(x[:1]))  # below dense_below: the dense copy


def test_from_stored_parts_refuses_another_backend_and_bad_parts():
    from vlmsparse.bitmask import BitmaskWeight, pack_bitmask_weight
    from vlmsparse.sparse24 import Packed24, pack24

    weight = _linear24().weight.detach()
    packed, bitmask = pack24(weight), pack_bitmask_weight(weight)
    with pytest.raises(ValueError, match="runs on backend 'packed24'.*got 'bitmask'"):
        SparseLinear(packed, backend="bitmask")
    with pytest.raises(ValueError, match="runs on backend 'bitmask'.*got 'dense'"):
        SparseLinear(bitmask, backend="dense")
    with pytest.raises(ValueError, match="meta must be uint8"):
        SparseLinear(Packed24(packed.values, packed.meta[:, :-1], 64))
    offsets = bitmask.row_offsets.clone()
    offsets[1] += 1  # row 0 said to hold one entry more than its bits set
    with pytest.raises(ValueError, match="row_offsets do not match"):
        SparseLinear(BitmaskWeight(bitmask.values, bitmask.bitmask, offsets, 64))
    with pytest.raises(ValueError, match="need .* padding"):
        SparseLinear(BitmaskWeight(bitmask.values[:-1], bitmask.bitmask, bitmask.row_offsets, 64))
    with pytest.raises(ValueError, match="a Packed24 or a BitmaskWeight"):
        SparseLinear([[1.0]])
