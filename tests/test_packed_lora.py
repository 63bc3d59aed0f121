"""SparseLoRA over a packed 2:4 base (a SparseLinear): the fused ``ops.packed24_lora_linear`` in a module.

The packed module must compute what the dense-base SparseLoRALinear computes (forward, gradients, dropout, several
adapters, merge / unmerge), keep the base packed through merging, and work through ``add_sparse_lora``, peft's
``get_peft_model`` / ``merge_and_unload`` / adapter files and ``torch.compile``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from factories import pruned_tiny, tiny_llama
from peft import get_peft_model
from torch import nn

from vlmsparse import compress
from vlmsparse.integrations.peft import load_sparse_lora, save_sparse_lora, sparse_lora_config
from vlmsparse.modules.sparse_linear import SparseLinear
from vlmsparse.modules.sparse_lora import SparseLoRALinear, teacher_mode
from vlmsparse.pipeline.lora import add_sparse_lora, merge_sparse_lora, remove_sparse_lora
from vlmsparse.sparse24 import unpack24_mask
from vlmsparse.sparsity import mask_nm


def _pruned_linear(out=12, inp=16, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(inp, out, dtype=dtype)
    mask = mask_nm(linear.weight.abs(), 2, 4)
    with torch.no_grad():
        linear.weight.mul_(mask)
    return linear, mask


def _pair(r=4, alpha=8, dropout=0.0, **kw):
    """(dense-base module, packed-base module) with the same weight, bias and adapter."""
    linear, mask = _pruned_linear(**kw)
    dense = SparseLoRALinear(copy.deepcopy(linear), mask, r=r, lora_alpha=alpha, lora_dropout=dropout,
                             init_lora_weights=False)
    packed = SparseLoRALinear(SparseLinear.from_linear(linear, backend="packed24"), None, r=r, lora_alpha=alpha,
                              lora_dropout=dropout, init_lora_weights=False)
    packed.lora_A.load_state_dict(dense.lora_A.state_dict())
    packed.lora_B.load_state_dict(dense.lora_B.state_dict())
    return dense, packed, mask


def _grads(m, x, grad):
    y = m(x)
    params = (x, m.lora_A["default"].weight, m.lora_B["default"].weight)
    return (y, *torch.autograd.grad(y, params, grad))


def test_packed_base_computes_the_dense_base_function_and_stores_less():
    dense, packed, mask = _pair()
    assert packed.packed_base and not dense.packed_base
    assert torch.equal(packed.keep_mask(), mask)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 12, dtype=torch.float64)
    for got, want in zip(_grads(packed, x, grad), _grads(dense, x, grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert set(packed.state_dict()) == {"base_layer.values", "base_layer.meta", "base_layer.bias",
                                        "lora_A.default.weight", "lora_B.default.weight"}
    frozen = sum(t.numel() * t.element_size() for t in (packed.base_layer.values, packed.base_layer.meta))
    dense_frozen = sum(t.numel() * t.element_size() for t in (dense.base_layer.weight, dense.sparsity_mask))
    assert frozen * 2 < dense_frozen  # 9/16 of the weight, and no bool mask
    assert [p for p in packed.parameters() if p.requires_grad] == [packed.lora_A["default"].weight,
                                                                   packed.lora_B["default"].weight]


def test_the_module_calls_the_fused_packed_op(monkeypatch):
    from vlmsparse import ops

    calls = []
    real = ops._packed24_lora_linear
    monkeypatch.setattr(ops, "_packed24_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, packed, _ = _pair()
    packed(torch.randn(2, 16, dtype=torch.float64))
    assert calls == [1]


def test_dropout_and_two_adapters_match_the_dense_base():
    dense, packed, _ = _pair(dropout=0.5)
    for m in (dense, packed):
        m.train()
    x = torch.randn(4, 16, dtype=torch.float64)
    torch.manual_seed(1)
    want = dense(x)
    torch.manual_seed(1)
    got = packed(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, packed.eval()(x))  # dropout did act in training
    for m in (dense, packed):
        m.update_layer("b", 2, lora_alpha=4, config=_config(2, 4))
    packed.lora_A["b"].load_state_dict(dense.lora_A["b"].state_dict())
    packed.lora_B["b"].load_state_dict(dense.lora_B["b"].state_dict())
    for m in (dense, packed):
        m.eval()
        m.set_adapter(["default", "b"])
    torch.testing.assert_close(packed(x), dense(x), rtol=1e-12, atol=1e-12)


def _config(r, alpha):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False)


def test_merge_keeps_the_packed_pattern_and_unmerge_restores_it():
    dense, packed, mask = _pair()
    x = torch.randn(6, 16, dtype=torch.float64)
    unmerged = packed(x)
    meta, values = packed.base_layer.meta.clone(), packed.base_layer.values.clone()
    packed.merge()
    assert packed.merged and torch.equal(packed.base_layer.meta, meta)
    assert not torch.equal(packed.base_layer.values, values)
    torch.testing.assert_close(packed(x), unmerged, rtol=1e-12, atol=1e-12)
    dense.merge()
    assert torch.equal(packed.base_layer.dense_weight(), dense.base_layer.weight)  # the same merged weight
    packed.merge()  # merged already: nothing changes
    assert torch.equal(packed.base_layer.dense_weight(), dense.base_layer.weight)
    packed.unmerge()
    assert torch.equal(packed.base_layer.values, values) and not packed.merged
    packed.merge(keep_original=False)
    packed.unmerge()  # subtracts the update: zeros stay zeros, the rest up to rounding
    torch.testing.assert_close(packed.base_layer.values, values, rtol=1e-12, atol=1e-12)
    assert torch.equal(unpack24_mask(packed._packed()), mask)


def test_merged_module_is_packed_and_to_linear_is_dense():
    _, packed, mask = _pair()
    x = torch.randn(6, 16, dtype=torch.float64)
    merged = packed.merged_base()
    assert isinstance(merged, SparseLinear) and merged.backend == "packed24"
    torch.testing.assert_close(merged(x), packed(x), rtol=1e-12, atol=1e-12)
    linear = packed.to_linear()
    assert type(linear) is nn.Linear and not bool(((linear.weight != 0) & ~mask).any())
    torch.testing.assert_close(linear(x), packed(x), rtol=1e-12, atol=1e-12)
    assert packed.to_base_linear() is packed.base_layer


@pytest.mark.parametrize("packed_base", [False, True])
def test_kept_pre_merge_weight_moves_with_the_module(packed_base):
    dense, packed, _ = _pair()
    m = packed if packed_base else dense
    before = m._base_tensor().clone()
    m.merge()
    m.to(torch.float32)
    m.unmerge()
    assert m._base_tensor().dtype == torch.float32
    assert torch.equal(m._base_tensor(), before.float())


def test_a_mask_that_fits_repacks_the_base_and_one_that_does_not_is_refused():
    linear, mask = _pruned_linear()
    groups = mask.reshape(12, 4, 4)
    row, group = torch.nonzero(~groups[:, :, 0])[0].tolist()  # a group that does not keep its first input
    col = 4 * group + int(torch.nonzero(groups[row, group])[0])
    with torch.no_grad():  # a kept entry exactly zero: packing by non-zeros stores the group's first input instead
        linear.weight[row, col] = 0.0
    base = SparseLinear.from_linear(linear, backend="packed24")
    assert not torch.equal(unpack24_mask(_packed_of(base)), mask)
    module = SparseLoRALinear(base, mask, r=2)
    assert torch.equal(module.keep_mask(), mask)
    torch.testing.assert_close(module.base_layer.dense_weight(), linear.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit the packed 2:4 base"):
        SparseLoRALinear(SparseLinear.from_linear(linear, backend="packed24"), torch.ones_like(mask), r=2)


def _packed_of(base: SparseLinear):
    from vlmsparse.sparse24 import Packed24

    return Packed24(base.values, base.meta, base.in_features)


def test_bases_and_methods_a_packed_base_cannot_take():
    linear, mask = _pruned_linear(dtype=torch.float32)
    with pytest.raises(ValueError, match="backend 'packed24'"):
        SparseLoRALinear(SparseLinear.from_linear(linear, backend="bitmask"), None)
    with pytest.raises(ValueError, match="dense_below"):
        SparseLoRALinear(SparseLinear.from_linear(linear, backend="packed24", dense_below=4), None)
    packed = SparseLinear.from_linear(linear, backend="packed24")
    for kwargs in ({"method": "lora"}, {"method": "lora-remask"}, {"keep_dense": True}):
        with pytest.raises(ValueError, match="method='sparselora' without keep_dense"):
            SparseLoRALinear(packed, None, **kwargs)
    with pytest.raises(ValueError, match="needs its bool keep-mask"):
        SparseLoRALinear(linear, None)
    with pytest.raises(ValueError, match="nn.Linear or a packed 2:4 SparseLinear"):
        SparseLoRALinear(nn.Conv1d(4, 4, 1), None)


def _compressed_llama(seed=0):
    model = tiny_llama(seed)
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.startswith("model.layers"):
                masks[name] = mask_nm(module.weight.abs(), 2, 4)
                module.weight.mul_(masks[name])
    dense = copy.deepcopy(model)
    compress(model, masks, backend="packed24", progress=False)
    return model, dense, masks


def _ids(seed=0):
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(seed))


def test_add_sparse_lora_on_a_compressed_model_trains_and_merges_packed():
    model, dense, masks = _compressed_llama()
    add_sparse_lora(model, None, r=4, lora_alpha=8, init_lora_weights=False)
    add_sparse_lora(dense, masks, r=4, lora_alpha=8, init_lora_weights=False)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)}
    assert set(wrapped) == set(masks) and all(m.packed_base for m in wrapped.values())
    dense.load_state_dict(model.state_dict(), strict=False)  # same adapters (the bases differ in format)
    for name, m in dense.named_modules():
        if isinstance(m, SparseLoRALinear):
            wrapped[name].lora_A.load_state_dict(m.lora_A.state_dict())
            wrapped[name].lora_B.load_state_dict(m.lora_B.state_dict())
    ids = _ids()
    torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(masks)
    optimizer = torch.optim.SGD(trainable, lr=0.05)
    values = {n: m.base_layer.values.clone() for n, m in wrapped.items()}
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(m.base_layer.values, values[n]) for n, m in wrapped.items())  # the base stays frozen
    trained = model(ids).logits
    merge_sparse_lora(model)
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in masks)
    for name, mask in masks.items():
        merged = model.get_submodule(name).dense_weight()
        assert not bool(((merged != 0) & ~mask).any())
    torch.testing.assert_close(model(ids).logits, trained, rtol=1e-4, atol=1e-4)


def test_add_sparse_lora_errors_and_adapter_names():
    model, _, masks = _compressed_llama()
    with pytest.raises(ValueError, match="has none"):
        add_sparse_lora(tiny_llama(), None)
    with pytest.raises(ValueError, match="method='full'"):
        add_sparse_lora(model, None, method="full")
    with pytest.raises(ValueError, match="adapter_name"):
        add_sparse_lora(model, None, adapter_name="")
    add_sparse_lora(model, None, r=2, adapter_name="task")
    name = next(iter(masks))
    module = model.get_submodule(name)
    assert list(module.lora_A) == ["task"] and module.active_adapters == ["task"]
    add_sparse_lora(model, None, r=3, adapter_name="second")  # one more adapter on the wrapped modules
    assert sorted(module.lora_A) == ["second", "task"] and module.active_adapters == ["task"]
    assert module.r["second"] == 3
    assert all(p.requires_grad for p in (module.lora_A["second"].weight, module.lora_A["task"].weight))
    remove_sparse_lora(model)
    assert isinstance(model.get_submodule(name), SparseLinear)


def test_adapter_files_round_trip_onto_compressed_and_dense_models(tmp_path):
    model, dense, masks = _compressed_llama()
    fresh_packed, _, _ = _compressed_llama()
    add_sparse_lora(model, None, r=4, lora_alpha=8, init_lora_weights=False)
    ids = _ids(1)
    want = model(ids).logits
    save_sparse_lora(model, tmp_path / "adapter")
    loaded = load_sparse_lora(fresh_packed, tmp_path / "adapter")
    assert loaded is fresh_packed and all(fresh_packed.get_submodule(n).packed_base for n in masks)
    assert not any(p.requires_grad for p in fresh_packed.parameters())
    torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
    on_dense = load_sparse_lora(dense, tmp_path / "adapter")  # the same adapter on the nn.Linear model: peft
    torch.testing.assert_close(on_dense(ids).logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on_dense.merge_and_unload()(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_get_peft_model_refuses_a_packed_target_with_the_route_to_take():
    model, _, masks = _compressed_llama()
    config = sparse_lora_config({}, r=4, target_modules=sorted(masks))
    with pytest.raises(ValueError, match="add_sparse_lora"):
        get_peft_model(model, config)


def test_peft_factory_keep_dense_builds_teacher_capable_layers():
    model, masks = pruned_tiny("llava", "2:4", keep_dense=True)
    names = sorted(masks.masks)[:4]
    peft_model = get_peft_model(model, sparse_lora_config({n: masks.masks[n] for n in names}, keep_dense=True,
                                                          r=2, target_modules=names))
    layer = peft_model.get_base_model().get_submodule(names[0])
    assert isinstance(layer, SparseLoRALinear) and layer.keep_dense
    x = torch.randn(3, layer.in_features)
    with torch.no_grad(), teacher_mode(peft_model.get_base_model(), strict=False):
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)  # the dense weight
    with pytest.raises(ValueError, match="non-zeros outside the mask"):
        get_peft_model(pruned_tiny("llava", "2:4", keep_dense=True)[0],
                       sparse_lora_config({n: masks.masks[n] for n in names}, r=2, target_modules=names))


def test_compiled_packed_module_matches_eager():
    _, packed, _ = _pair(dtype=torch.float32)
    x = torch.randn(5, 16, requires_grad=True)
    compiled = torch.compile(packed, fullgraph=True, backend="eager")
    got = compiled(x)
    want = packed(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g_got = torch.autograd.grad(got.square().sum(), packed.lora_A["default"].weight)
    g_want = torch.autograd.grad(want.square().sum(), packed.lora_A["default"].weight)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_base_on_cuda_matches_the_dense_base(dtype):
    """On a GPU both layers run their CUDA default backend (dense_gemm): the same effective weight, so the same
    values and gradients up to the summation order."""
    dense, packed, _ = _pair(out=256, inp=512, dtype=torch.float32)
    dense, packed = dense.to("cuda", dtype), packed.to("cuda", dtype)
    x = torch.randn(8, 512, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(8, 256, device="cuda", dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(_grads(packed, x, grad), _grads(dense, x, grad)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    packed.merge()
    assert isinstance(packed.base_layer, SparseLinear) and packed.base_layer.values.device.type == "cuda"


def test_blocked_packed_reference_matches_one_block(monkeypatch):
    """The packed twins unpack one block of output rows at a time: the same values and gradients as one block."""
    from vlmsparse import ops
    from vlmsparse.kernels import reference

    dense, packed, _ = _pair(out=10, inp=16)
    values, meta = packed.base_layer.values, packed.base_layer.meta
    A, B, bias = packed.lora_A["default"].weight, packed.lora_B["default"].weight, packed.base_layer.bias
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)

    def run():
        y = ops.packed24_lora_linear(x, values, meta, A, B, 2.0, bias, backend="reference")
        return (y, *torch.autograd.grad(y.square().sum(), (x, A, B)))

    whole = run()
    monkeypatch.setattr(reference, "BLOCK_ELEMENTS", 48)  # 3 rows per block -> 4 blocks, the last short
    assert len(reference._row_blocks(10, 16)) == 4
    for got, want in zip(run(), whole):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _largest_output_bytes(run) -> int:
    """The largest tensor any torch op inside ``run()`` returns (a dispatch mode sees every op's outputs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.bytes = max(Largest.bytes, t.numel() * t.element_size())  # views: their own size
            return out

    with Largest():
        run()
    return Largest.bytes


def test_packed_reference_makes_no_full_size_tensor():
    """Forward and backward of the packed twin on a 2048 x 4096 fp32 weight: no op makes a tensor of more than a
    quarter of the dense weight's bytes (the whole-weight unpacking it replaced made the dense weight, its mask and
    the effective weight, each full-size); the dense-stored twin takes the weight as input, so it is the control."""
    from vlmsparse.kernels import reference

    out_features, in_features, tokens = 2048, 4096, 16
    linear, mask = _pruned_linear(out=out_features, inp=in_features, dtype=torch.float32)
    base = SparseLinear.from_linear(linear, backend="packed24")
    A, B = torch.randn(8, in_features) * 0.01, torch.randn(out_features, 8) * 0.01
    x, dy = torch.randn(tokens, in_features), torch.randn(tokens, out_features)
    full = out_features * in_features * 4
    forward = _largest_output_bytes(lambda: reference.packed24_lora_forward_ref(x, base.values, base.meta, A, B, 2.0))
    backward = _largest_output_bytes(
        lambda: reference.packed24_lora_backward_ref(dy, x, base.values, base.meta, A, B, 2.0))
    assert 0 < forward <= full / 4 and 0 < backward <= full / 4, (forward, backward, full)
    whole = _largest_output_bytes(lambda: reference.sparse_lora_forward_ref(
        x, reference.unpack24(reference.Packed24(base.values, base.meta, in_features)), mask, A, B, 2.0))
    assert whole >= full  # the measurement sees a full-size tensor when one is made
