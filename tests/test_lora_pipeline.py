"""Whole-model verbs on a tiny LLaVA: add_sparse_lora, merge_sparse_lora, remove_sparse_lora, mask_gradients."""

from __future__ import annotations

import pytest
import torch
from factories import llava_inputs, tiny_llava
from torch import nn

from vlmsparse.masks import MaskSet
from vlmsparse.models import prunable_linear_names
from vlmsparse.modules.sparse_lora import SparseLoRALinear
from vlmsparse.pipeline.lora import (
    add_sparse_lora,
    lora_parameters,
    mask_gradients,
    merge_sparse_lora,
    remove_sparse_lora,
    teacher_mode,
)
from vlmsparse.sparsity import build_mask, satisfies_nm

pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned(pattern="2:4", keep_dense=False):
    model = tiny_llava()
    masks = {}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in prunable_linear_names(model, ("vision", "language")):
            weight = modules[name].weight
            masks[name] = build_mask(weight.abs(), pattern)
            if not keep_dense:
                weight.masked_fill_(~masks[name], 0)
    return model, MaskSet(masks=masks, patterns={n: pattern for n in masks})


def _loss(model, inputs):
    logits = model(**inputs).logits
    return logits.float().pow(2).mean()


def _randomise_B(model):
    with torch.no_grad():
        for p in (m.lora_B["default"].weight for m in model.modules() if isinstance(m, SparseLoRALinear)):
            p.normal_(0, 0.05)


def test_add_train_merge_keeps_masks_bit_for_bit():
    model, masks = _pruned("2:4")
    inputs = llava_inputs()
    add_sparse_lora(model, masks, r={"language": 8, "vision": 4}, lora_alpha=16)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)}
    assert set(wrapped) == set(masks)
    assert {m.r["default"] for n, m in wrapped.items() if "vision_tower" in n} == {4}
    assert {m.r["default"] for n, m in wrapped.items() if "language_model" in n} == {8}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.default.weight", "lora_B.default.weight")) for n in trainable)
    assert len(trainable) == 2 * len(masks)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = _loss(model, inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in wrapped.values())  # it trained
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
    merged = merge_sparse_lora(model)
    assert merged is model
    assert not any(isinstance(m, SparseLoRALinear) for m in model.modules())
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        linear = modules[name]
        assert type(linear) is nn.Linear
        assert torch.all(linear.weight[~mask] == 0), name
        assert satisfies_nm(linear.weight, 2, 4), name
    with torch.no_grad():
        after = model(**inputs).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_per_part_calls_keep_earlier_adapters_trainable_and_target_filters():
    model, masks = _pruned("0.5")
    part = lambda name: "language" if "language_model" in name else "vision"  # noqa: E731
    add_sparse_lora(model, masks, r=8, target=lambda module, name: part(name) == "language")
    first = len(lora_parameters(model))
    add_sparse_lora(model, masks, r=4, target=lambda module, name: part(name) == "vision")
    params = lora_parameters(model)
    assert len(params) == 2 * len(masks) and first < len(params)
    assert all(p.requires_grad for p in params)
    one = next(iter(masks))
    fresh, fresh_masks = _pruned("0.5")
    add_sparse_lora(fresh, fresh_masks, target=[one])
    assert sum(isinstance(m, SparseLoRALinear) for m in fresh.modules()) == 1
    with pytest.raises(ValueError, match="without a mask"):
        add_sparse_lora(fresh, fresh_masks, target=["model.multi_modal_projector.linear_1"])


def test_r_by_module_name_and_missing_part_key_error():
    model, masks = _pruned("0.5")
    name = next(n for n in masks if "language_model" in n)
    add_sparse_lora(model, masks, r={name: 2, "default": 3}, target=[name, next(n for n in masks if n != name)])
    ranks = sorted(m.r["default"] for m in model.modules() if isinstance(m, SparseLoRALinear))
    assert ranks == [2, 3]
    with pytest.raises(ValueError, match="no entry"):
        add_sparse_lora(_pruned("0.5")[0], masks, r={"language": 8})


def test_remove_is_the_inverse_and_bad_masks_are_named():
    model, masks = _pruned("0.5")
    originals = {n: model.get_submodule(n) for n in masks}
    add_sparse_lora(model, masks, init_lora_weights=False)
    next(m for m in model.modules() if isinstance(m, SparseLoRALinear)).merge()
    remove_sparse_lora(model)
    for name, linear in originals.items():
        assert model.get_submodule(name) is linear
    dense = tiny_llava()
    with pytest.raises(ValueError, match="non-zeros outside the mask"):
        add_sparse_lora(dense, masks)


def test_keep_dense_teacher_and_baseline_methods():
    model, masks = _pruned("0.5", keep_dense=True)
    reference = tiny_llava().eval()
    inputs = llava_inputs()
    add_sparse_lora(model, masks, keep_dense=True, init_lora_weights=False)
    model.eval()
    with torch.no_grad(), teacher_mode(model):
        teacher = model(**inputs).logits
    torch.testing.assert_close(teacher, reference(**inputs).logits)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, teacher)
    for method, keeps in (("lora", False), ("lora-remask", True)):
        m, ms = _pruned("0.5")
        add_sparse_lora(m, ms, method=method, init_lora_weights=False)
        merge_sparse_lora(m)
        outside = sum(int((m.get_submodule(n).weight[~mask] != 0).sum()) for n, mask in ms.items())
        assert (outside == 0) == keeps, method


@pytest.mark.parametrize("via_add", [False, True])
def test_full_finetuning_with_masked_gradients_keeps_zeros(via_add):
    model, masks = _pruned("0.5", keep_dense=True)  # dense weights: mask_gradients zeroes them first
    inputs = llava_inputs()
    if via_add:
        add_sparse_lora(model, masks, method="full")
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for n in masks:
            model.get_submodule(n).weight.requires_grad_(True)
        handles = mask_gradients(model, masks)
        assert len(handles.names) == len(masks)
    weights = [model.get_submodule(n).weight for n in masks]
    start = [w.detach().clone() for w in weights]
    opt = torch.optim.AdamW([w for w in weights], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = _loss(model, inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for w, w0, mask in zip(weights, start, masks.masks.values()):
        assert torch.all(w[~mask] == 0)
        assert not torch.equal(w[mask], w0[mask])
