"""peft integration: get_peft_model builds SparseLoRA layers; save / load round trip; merge_and_unload."""

from __future__ import annotations

import peft
import pytest
import torch
from factories import tiny_llama
from peft.tuners.lora.layer import Linear as PeftLinear

from vlmsparse.integrations.peft import (
    load_sparse_lora,
    peft_sparse_masks,
    save_sparse_lora,
    sparse_lora_config,
)
from vlmsparse.masks import MASKS_FILENAME, MaskSet
from vlmsparse.modules.sparse_lora import SparseLoRALinear
from vlmsparse.sparsity import build_mask, satisfies_nm

TARGETS = ("q_proj", "v_proj", "up_proj")


pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned(seed=0, pattern="2:4"):
    model = tiny_llama(seed)
    masks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(TARGETS[:2]):  # up_proj stays dense: targeted without a mask
                masks[name] = build_mask(module.weight.abs(), pattern)
                module.weight.masked_fill_(~masks[name], 0)
    return model, MaskSet(masks=masks, patterns={n: pattern for n in masks})


def _peft_model(model, masks):
    config = sparse_lora_config(masks, r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _ids():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def _naive_layer(layer: SparseLoRALinear, x):
    base, M = layer.get_base_layer(), layer.sparsity_mask
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    return torch.nn.functional.linear(x, base.weight * M + s * (B @ A) * M, base.bias)


def test_get_peft_model_builds_sparse_layers_and_trains_only_adapters():
    model, masks = _pruned()
    pm = _peft_model(model, masks)
    sparse = {n: m for n, m in pm.get_base_model().named_modules() if isinstance(m, SparseLoRALinear)}
    plain = [n for n, m in pm.get_base_model().named_modules()
             if type(m) is PeftLinear and n.endswith("up_proj")]
    assert set(sparse) == set(masks) and len(plain) == 2
    layer = next(iter(sparse.values()))
    x = torch.randn(3, layer.in_features, requires_grad=True)
    torch.testing.assert_close(layer(x), _naive_layer(layer, x))
    grads = torch.autograd.grad(layer(x).sum(), (x, layer.lora_A["default"].weight))
    want = torch.autograd.grad(_naive_layer(layer, x).sum(), (x, layer.lora_A["default"].weight))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = pm(input_ids=_ids()).logits.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, mask in masks.items():
        assert torch.all(sparse[name].get_base_layer().weight[~mask] == 0)


def test_save_load_round_trip_and_merge_and_unload_keeps_sparsity(tmp_path):
    model, masks = _pruned()
    pm = _peft_model(model, masks)
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=_ids()).logits
    path = save_sparse_lora(pm, tmp_path / "adapter")
    assert (path / MASKS_FILENAME).exists() and (path / "adapter_model.safetensors").exists()
    saved = MaskSet.load(path)
    assert set(saved.masks) == set(masks) and all(torch.equal(saved[n], masks[n]) for n in masks)
    assert set(peft_sparse_masks(pm).masks) == set(masks)

    base, base_masks = _pruned()
    loaded = load_sparse_lora(base, path, masks=base_masks)
    loaded.eval()
    assert sum(isinstance(m, SparseLoRALinear) for m in loaded.modules()) == len(masks)
    with torch.no_grad():
        got = loaded(input_ids=_ids()).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    merged = loaded.merge_and_unload()
    assert not any(isinstance(m, PeftLinear) for m in merged.modules())
    for name, mask in masks.items():
        weight = merged.get_submodule(name).weight
        assert torch.all(weight[~mask] == 0) and satisfies_nm(weight, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=_ids()).logits, want, rtol=1e-5, atol=1e-5)


def test_loading_onto_different_masks_is_an_error(tmp_path):
    model, masks = _pruned()
    path = save_sparse_lora(_peft_model(model, masks), tmp_path / "adapter")
    other, other_masks = _pruned(pattern="0.5")  # same weights, other pruning
    with pytest.raises(ValueError, match="non-zeros outside the saved mask"):
        load_sparse_lora(other, path)
    base, base_masks = _pruned()
    name = next(iter(base_masks))
    flipped = dict(base_masks.masks)
    flipped[name] = ~flipped[name]
    with pytest.raises(ValueError, match="trained on different masks"):
        load_sparse_lora(base, path, masks=flipped)


def test_bad_masks_in_peft_layer():
    model, masks = _pruned()
    dense = tiny_llama()
    with pytest.raises(ValueError, match="non-zeros outside the mask"):
        _peft_model(dense, masks)
    with pytest.raises(ValueError, match="shape"):
        _peft_model(model, {n: m[:, :-1] for n, m in masks.items()})


def test_dropout_and_two_adapters_use_the_masked_update():
    model, masks = _pruned()
    config = sparse_lora_config(masks, r=2, lora_alpha=4, lora_dropout=0.5, init_lora_weights=False)
    pm = peft.get_peft_model(model, config)
    layer = next(m for m in pm.modules() if isinstance(m, SparseLoRALinear))
    x = torch.randn(3, layer.in_features)
    layer.eval()
    torch.testing.assert_close(layer(x), _naive_layer(layer, x))
    layer.train()
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)
    base, M = layer.get_base_layer(), layer.sparsity_mask
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    torch.testing.assert_close(y, base(x) + s * xd @ ((B @ A) * M).T)
    # a second adapter, both active: base + both masked updates
    pm.add_adapter("second", sparse_lora_config(masks, r=2, lora_alpha=4, init_lora_weights=False))
    layer.eval()
    layer.set_adapter(["default", "second"])
    A2, B2, s2 = layer.lora_A["second"].weight, layer.lora_B["second"].weight, layer.scaling["second"]
    want = base(x) + s * x @ ((B @ A) * M).T + s2 * x @ ((B2 @ A2) * M).T
    torch.testing.assert_close(layer(x), want)


def test_load_trainable_adapter(tmp_path):
    model, masks = _pruned()
    path = save_sparse_lora(_peft_model(model, masks), tmp_path / "adapter")
    loaded = load_sparse_lora(_pruned()[0], path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    loss = loaded(input_ids=_ids()).logits.pow(2).mean()
    loss.backward()
    layer = next(m for m in loaded.modules() if isinstance(m, SparseLoRALinear))
    assert layer.lora_A["default"].weight.grad is not None


def test_saved_adapter_files_follow_the_umask(tmp_path):
    """peft writes the adapter weights through safetensors (0600 since 0.8): save_sparse_lora gives every file
    it creates the mode open() gives (umask 022: 0644), and leaves the modes of other files in the folder."""
    import os
    import stat

    model, masks = _pruned()
    pm = _peft_model(model, masks)
    path = tmp_path / "adapter"
    path.mkdir()
    private = path / "secret.txt"
    private.write_text("keep me private")
    private.chmod(0o600)
    old = os.umask(0o022)
    try:
        save_sparse_lora(pm, path)
    finally:
        os.umask(old)
    written = sorted(p.name for p in path.iterdir() if p != private)
    assert {"adapter_model.safetensors", "adapter_config.json", MASKS_FILENAME} <= set(written)
    for name in written:
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_in_place_adapter_round_trips_through_peft(tmp_path):
    """Adapters from add_sparse_lora (no PeftModel; two ranks) save as peft's files + masks; peft's own
    PeftModel.from_pretrained (config registered) and load_sparse_lora give identical logits; peft's
    merge_and_unload keeps every pruned entry +0.0 and equals merge_sparse_lora bit for bit."""
    from vlmsparse.integrations.peft import adapter_config, register_sparse_lora
    from vlmsparse.pipeline.lora import add_sparse_lora, merge_sparse_lora

    model, masks = _pruned()
    ranks = {n: 2 if n.endswith("q_proj") else 4 for n in masks}
    add_sparse_lora(model, masks, r=ranks, lora_alpha=8)
    with torch.no_grad():  # a trained adapter: B no longer zero
        for _, layer in model.named_modules():
            if isinstance(layer, SparseLoRALinear):
                layer.lora_B["default"].weight.normal_(0, 0.05)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=_ids()).logits
    config = adapter_config(model)
    assert config.r == 2 and sorted(config.target_modules) == sorted(masks)
    assert {k.replace("\\", "") for k in config.rank_pattern} == {n for n in masks if n.endswith("v_proj")}
    path = save_sparse_lora(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", MASKS_FILENAME} <= {p.name for p in path.iterdir()}

    loaded_config = peft.LoraConfig.from_pretrained(str(path))
    register_sparse_lora(loaded_config, MaskSet.load(path))
    by_peft = peft.PeftModel.from_pretrained(_pruned()[0], str(path), config=loaded_config)
    by_peft.eval()
    layers = {n: m for n, m in by_peft.get_base_model().named_modules() if isinstance(m, SparseLoRALinear)}
    assert {n: m.r["default"] for n, m in layers.items()} == ranks
    with torch.no_grad():
        torch.testing.assert_close(by_peft(input_ids=_ids()).logits, want, rtol=0, atol=0)
    by_ours = load_sparse_lora(_pruned()[0], path, masks=masks)
    by_ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(by_ours(input_ids=_ids()).logits, want, rtol=0, atol=0)

    peft_merged = by_peft.merge_and_unload()
    ours_merged = merge_sparse_lora(model)
    for name, mask in masks.items():
        weight = peft_merged.get_submodule(name).weight
        assert type(peft_merged.get_submodule(name)) is torch.nn.Linear
        assert torch.all(weight[~mask] == 0) and not torch.any(torch.signbit(weight[~mask]))
        assert torch.equal(weight, ours_merged.get_submodule(name).weight), name


def test_baseline_methods_do_not_save_as_sparse_lora(tmp_path):
    from vlmsparse.pipeline.lora import add_sparse_lora

    model, masks = _pruned()
    add_sparse_lora(model, masks, method="lora-remask")
    with pytest.raises(ValueError, match="use method 'lora-remask'"):
        save_sparse_lora(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="no SparseLoRA layers"):
        save_sparse_lora(_pruned()[0], tmp_path / "adapter")
