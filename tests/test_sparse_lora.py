"""SparseLoRALinear: math, merge / unmerge, sparsity kept through training and merging, validation."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig
from torch import nn

from vlmsparse.modules.sparse_lora import SparseLoRALinear, teacher_mode
from vlmsparse.sparsity import mask_nm, satisfies_nm


def _layer(out=12, inp=16, dtype=torch.float64, nm=False, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(inp, out, bias=bias, dtype=dtype)
    mask = mask_nm(linear.weight.abs(), 2, 4) if nm else torch.rand(out, inp) > 0.5
    with torch.no_grad():
        linear.weight.mul_(mask)
    return linear, mask


def _module(r=4, alpha=8, method="sparselora", **kw):
    linear, mask = _layer(**kw)
    # B random (init_lora_weights=False) so no test passes through a zero update
    return SparseLoRALinear(linear, mask, r=r, lora_alpha=alpha, method=method, init_lora_weights=False), mask


def _naive(m: SparseLoRALinear, x):
    W, M, A, B = m.base_layer.weight, m.sparsity_mask, m.lora_A["default"].weight, m.lora_B["default"].weight
    return nn.functional.linear(x, W * M + m.scaling["default"] * (B @ A) * M, m.base_layer.bias)


def test_forward_and_gradients_match_naive_float64():
    m, _ = _module()
    assert m.scaling["default"] == 2.0 and m.lora_B["default"].weight.abs().sum() > 0
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    y = m(x)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, m.lora_A["default"].weight, m.lora_B["default"].weight, m.base_layer.bias), grad)
    want = torch.autograd.grad(_naive(m, x), (x, m.lora_A["default"].weight, m.lora_B["default"].weight, m.base_layer.bias), grad)
    torch.testing.assert_close(y, _naive(m, x), rtol=0, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert m.base_layer.weight.grad is None and not m.base_layer.weight.requires_grad


def test_peft_style_names_and_state_dict():
    m, _ = _module()
    keys = set(m.state_dict())
    assert {"lora_A.default.weight", "lora_B.default.weight", "base_layer.weight", "base_layer.bias",
            "sparsity_mask"} == keys
    assert m.lora_A["default"].weight.shape == (4, 16) and m.lora_B["default"].weight.shape == (12, 4)
    fresh = SparseLoRALinear(*_layer(), r=4, lora_alpha=8)
    assert torch.count_nonzero(fresh.lora_B["default"].weight) == 0 and torch.count_nonzero(fresh.lora_A["default"].weight) > 0


def test_merge_equals_unmerged_unmerge_exact_idempotent(caplog):
    m, mask = _module()
    x = torch.randn(4, 16, dtype=torch.float64)
    before = m.base_layer.weight.detach().clone()
    y_unmerged = m(x)
    m.merge()
    assert m.merged
    assert torch.equal(m(x), y_unmerged)  # same effective weight, bit for bit
    assert torch.equal(m.base_layer.weight == 0, ~mask | (before + m.get_delta_weight() == 0))
    merged = m.base_layer.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        m.merge()
    assert "already merged" in caplog.text
    assert torch.equal(m.base_layer.weight, merged)  # idempotent
    m.unmerge()
    assert not m.merged and torch.equal(m.base_layer.weight, before)  # exact
    torch.testing.assert_close(m(x), y_unmerged, rtol=0, atol=0)


def test_unmerge_without_original_subtracts_delta():
    m, mask = _module()
    before = m.base_layer.weight.detach().clone()
    m.merge(keep_original=False)
    m.unmerge()
    w = m.base_layer.weight
    assert torch.all(w[~mask] == 0)
    torch.testing.assert_close(w, before, rtol=1e-12, atol=1e-12)


def test_merge_keeps_2_4_and_zero_set_bit_for_bit():
    m, mask = _module(nm=True, dtype=torch.float32)
    assert satisfies_nm(m.base_layer.weight, 2, 4)
    m.merge()
    w = m.base_layer.weight
    assert torch.all(w[~mask] == 0) and not torch.any(torch.signbit(w[~mask]))  # +0.0 exactly
    assert satisfies_nm(w, 2, 4)
    assert torch.count_nonzero(w[mask]) > 0.99 * mask.sum()


def test_safe_merge_refuses_nan():
    m, _ = _module()
    with torch.no_grad():
        m.lora_B["default"].weight[0, 0] = float("nan")
    before = m.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        m.merge(safe_merge=True)
    assert not m.merged and torch.equal(m.base_layer.weight, before)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_pruned_entries_stay_zero_after_training_and_merge(weight_decay):
    m, mask = _module(dtype=torch.float32)
    opt = torch.optim.AdamW([m.lora_A["default"].weight, m.lora_B["default"].weight], lr=1e-2, weight_decay=weight_decay)
    x, target = torch.randn(32, 16), torch.randn(32, 12)
    losses = []
    for _ in range(30):
        loss = (m(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9  # it trains
    assert torch.all(m.base_layer.weight[~mask] == 0)
    m.merge()
    assert torch.all(m.base_layer.weight[~mask] == 0)


def test_plain_lora_baselines():
    x = torch.randn(5, 16, dtype=torch.float64)
    lora, mask = _module(method="lora")
    W, A, B = lora.base_layer.weight, lora.lora_A["default"].weight, lora.lora_B["default"].weight
    torch.testing.assert_close(lora(x), x @ (W + lora.scaling["default"] * B @ A).T + lora.base_layer.bias)
    dense = lora.to_linear()
    assert int((dense.weight[~mask] != 0).sum()) > 0  # plain LoRA loses the sparsity
    remask, mask = _module(method="lora-remask")
    y = remask(x)
    torch.testing.assert_close(y, lora(x))  # same training-time function as plain LoRA
    remask.merge()
    assert torch.all(remask.base_layer.weight[~mask] == 0)
    assert not torch.allclose(remask(x), y)  # the re-masking changes the function: that is the baseline's cost


def test_dropout_applies_to_adapter_input_only():
    linear, mask = _layer()
    m = SparseLoRALinear(linear, mask, r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    m.eval()
    torch.testing.assert_close(m(x), _naive(m, x))
    m.train()
    torch.manual_seed(3)
    y = m(x)
    torch.manual_seed(3)
    xd = nn.functional.dropout(x, 0.5, training=True)
    W, A, B = m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight
    want = x @ W.T + m.base_layer.bias + m.scaling["default"] * xd @ ((B @ A) * mask).T
    torch.testing.assert_close(y, want)
    grad = torch.randn_like(y)
    for g, w in zip(torch.autograd.grad(y, (x, A, B), grad), torch.autograd.grad(want, (x, A, B), grad)):
        torch.testing.assert_close(g, w)


def test_keep_dense_teacher_mode():
    torch.manual_seed(0)
    dense = nn.Linear(16, 12, dtype=torch.float64)
    W0 = dense.weight.detach().clone()
    mask = torch.rand(12, 16) > 0.5
    m = SparseLoRALinear(dense, mask, r=2, lora_alpha=4, keep_dense=True, init_lora_weights=False)
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), _naive(m, x))  # student: masked weight + masked update
    with teacher_mode(m):
        torch.testing.assert_close(m(x), x @ W0.T + dense.bias, rtol=0, atol=0)
    assert not m.teacher
    m.merge()
    assert torch.all(m.base_layer.weight[~mask] == 0)
    m.unmerge()
    assert torch.equal(m.base_layer.weight, W0)  # the dense weight comes back
    pruned, pmask = _module()
    with pytest.raises(ValueError, match="keep_dense"):
        with teacher_mode(pruned):
            pass


def test_half_precision_base_keeps_fp32_adapters():
    linear, mask = _layer(dtype=torch.bfloat16)
    m = SparseLoRALinear(linear, mask, r=4, lora_alpha=8, init_lora_weights=False)
    assert m.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.lora_A["default"].weight.grad.dtype == torch.float32 and torch.isfinite(m.lora_B["default"].weight.grad).all()


def test_validation_errors():
    linear, mask = _layer()
    with pytest.raises(ValueError, match=r"shape \(12, 15\)"):
        SparseLoRALinear(linear, mask[:, :15], r=4)
    with pytest.raises(ValueError, match="same device"):
        SparseLoRALinear(linear, mask.to("meta"), r=4)
    with pytest.raises(ValueError, match="bool"):
        SparseLoRALinear(linear, mask.float(), r=4)
    dense = nn.Linear(16, 12)
    outside = int((~mask).sum())
    with pytest.raises(ValueError, match=f"{outside} non-zeros outside the mask"):
        SparseLoRALinear(dense, mask, r=4)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="r must be a positive int"):
            SparseLoRALinear(linear, mask, r=bad)
    with pytest.raises(ValueError, match="method"):
        SparseLoRALinear(linear, mask, method="dora")
    with pytest.raises(ValueError, match="lora_dropout"):
        SparseLoRALinear(linear, mask, lora_dropout=1.0)
    with pytest.raises(ValueError, match="backend"):
        SparseLoRALinear(linear, mask, backend="cuda")


def test_autocast_bf16_activations_with_fp32_weights():
    """Under autocast the previous layer hands over bf16 activations; the op computes in the weight's dtype."""
    m, _ = _module(dtype=torch.float32)
    pre = nn.Linear(16, 16)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = pre(x)
        assert h.dtype == torch.bfloat16
        y = m(h)
    torch.testing.assert_close(y, _naive(m, h.float()))
    y.sum().backward()
    assert m.lora_A["default"].weight.grad is not None and pre.weight.grad is not None


def test_state_dict_round_trip_and_different_mask_refused():
    m, mask = _module()
    other, _ = _module()
    with torch.no_grad():
        other.lora_B["default"].weight.zero_()
    other.load_state_dict(m.state_dict())  # same seed -> same mask: loads
    assert torch.equal(other.lora_B["default"].weight, m.lora_B["default"].weight)
    flipped = dict(m.state_dict())
    flipped["sparsity_mask"] = ~mask
    with pytest.raises(RuntimeError, match=rf"different mask \({mask.numel()} entries differ\)"):
        other.load_state_dict(flipped)


def test_tensors_checked_once_not_per_call(monkeypatch):
    """Construction, .to() and a new mask check the module's tensors; forward calls the unchecked op."""
    from vlmsparse import ops

    m, mask = _module()
    with pytest.raises(ValueError, match=r"mask has shape \(12, 15\)"):
        m.sparsity_mask = torch.ones(12, 15, dtype=torch.bool)
    with pytest.raises(ValueError, match="must be a bool tensor"):
        m.sparsity_mask = mask.double()
    m.sparsity_mask = mask.clone()  # a valid replacement is taken
    with pytest.raises(ValueError, match=r"lora_A must be \[r, 16\]"):
        m.lora_A["default"].weight = nn.Parameter(torch.zeros(4, 15, dtype=torch.float64))
        m.to(torch.float64)  # _apply re-checks the shapes
    m, _ = _module()
    m.lora_A["default"].to("meta")
    m.to(torch.float32)  # tensors passing through meta one by one (as loaders do): no device check here
    assert m.lora_A["default"].weight.dtype == torch.float32
    with pytest.raises(ValueError, match="same device"):  # but at construction
        linear, mask = _layer()
        SparseLoRALinear(linear, mask.to("meta"), r=2)
    m, _ = _module()
    x = torch.randn(3, 16)

    def refuse(*args, **kwargs):
        raise AssertionError("the functional op's checks ran in forward")

    monkeypatch.setattr(ops, "check_mask", refuse)
    monkeypatch.setattr(ops, "_check_lora_args", refuse)
    m(x).sum().backward()  # forward + backward without the per-call checks
    with pytest.raises(ValueError, match=r"input has shape \(3, 15\)"):  # x is new every call: still checked
        m(torch.randn(3, 15))


def _old_layout(m: SparseLoRALinear, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict the earlier own layer wrote: bias-free nn.Linear adapters and the buffer ``mask``."""
    return {prefix + "base_layer.weight": m.base_layer.weight.detach().clone(),
            prefix + "base_layer.bias": m.base_layer.bias.detach().clone(),
            prefix + "lora_A.weight": m.lora_A["default"].weight.detach().clone(),
            prefix + "lora_B.weight": m.lora_B["default"].weight.detach().clone(),
            prefix + "mask": m.sparsity_mask.clone()}


def test_old_layout_state_dict_loads():
    """Checkpoints of the earlier own layer (``lora_A.weight``, ``lora_B.weight``, ``mask``) load strictly into
    the peft-layout module, also nested in a model; a different mask or a module with two adapters refuse them."""
    m, mask = _module()
    x = torch.randn(4, 16, dtype=torch.float64)
    old = _old_layout(m, prefix="0.")
    fresh = nn.Sequential(_module()[0])
    with torch.no_grad():
        fresh[0].lora_A["default"].weight.zero_()
        fresh[0].lora_B["default"].weight.zero_()
    result = fresh.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(old) == {"0.base_layer.weight", "0.base_layer.bias", "0.lora_A.weight", "0.lora_B.weight", "0.mask"}
    assert torch.equal(fresh[0].lora_A["default"].weight, m.lora_A["default"].weight)
    assert torch.equal(fresh(x), m(x))
    flipped = _old_layout(m)
    flipped["mask"] = ~mask
    with pytest.raises(RuntimeError, match=r"sparsity_mask: the state dict was trained on a different mask"):
        _module()[0].load_state_dict(flipped)
    two = _module()[0]
    two.update_layer("second", 2, lora_alpha=4, config=LoraConfig(r=2, lora_alpha=4))
    with pytest.raises(RuntimeError, match=r"loads only into a module with one adapter; this one has \['default', "
                                           r"'second'\]"):
        two.load_state_dict(_old_layout(m))


def test_two_adapters_forward_merge_unmerge():
    """Several active adapters: base + each masked update; merge writes their sum and keeps the zeros exactly;
    unmerge restores the weight bit for bit."""
    m, mask = _module()
    m.update_layer("second", 2, lora_alpha=4, config=LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    m.set_adapter(["default", "second"])
    x = torch.randn(5, 16, dtype=torch.float64)
    W, b = m.base_layer.weight.detach().clone(), m.base_layer.bias
    delta = sum(m.scaling[a] * (m.lora_B[a].weight @ m.lora_A[a].weight) * mask for a in ("default", "second"))
    torch.testing.assert_close(m(x), x @ (W + delta).T + b, rtol=1e-12, atol=1e-12)
    assert m.scaling["second"] == 2.0 and m.lora_A["second"].weight.requires_grad
    m.merge()
    assert m.merged_adapters == ["default", "second"]
    assert torch.all(m.base_layer.weight[~mask] == 0) and not torch.any(torch.signbit(m.base_layer.weight[~mask]))
    torch.testing.assert_close(m(x), x @ (W + delta).T + b, rtol=1e-12, atol=1e-12)
    m.unmerge()
    assert torch.equal(m.base_layer.weight, W)


def test_disable_adapters_runs_the_pruned_base():
    """peft's disable_adapters: the adapters off, the mask on (the pruned base even with keep_dense)."""
    torch.manual_seed(0)
    dense = nn.Linear(16, 12, dtype=torch.float64)
    mask = torch.rand(12, 16) > 0.5
    m = SparseLoRALinear(dense, mask, r=2, lora_alpha=4, keep_dense=True, init_lora_weights=False)
    x = torch.randn(3, 16, dtype=torch.float64)
    m.enable_adapters(False)
    torch.testing.assert_close(m(x), x @ (dense.weight * mask).T + dense.bias, rtol=0, atol=0)
    m.enable_adapters(True)
    torch.testing.assert_close(m(x), _naive(m, x))


def test_peft_config_options_checked():
    linear, mask = _layer()
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        SparseLoRALinear(linear, mask, r=4, config=LoraConfig(r=4, use_dora=True))
    with pytest.raises(ValueError, match="lora_bias=True is not supported"):
        SparseLoRALinear(linear, mask, r=4, config=LoraConfig(r=4, lora_bias=True))
    with pytest.raises(ValueError, match="lora_dropout and init_lora_weights come from it"):
        SparseLoRALinear(linear, mask, r=4, lora_dropout=0.1, config=LoraConfig(r=4))
    m = SparseLoRALinear(linear, mask, r=4, lora_alpha=8, config=LoraConfig(r=4, use_rslora=True))
    assert m.scaling["default"] == 8 / 2  # rsLoRA: alpha / sqrt(r)
