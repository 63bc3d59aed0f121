"""Dense float32 CPU GEMMs on oneDNN (vlmsparse.kernels.cpu_gemm): the same results as torch's within the float32
table, the choice (environment, measurement, cached), the instance swap of nn.Linear forwards and its inverse,
and its use by prune_model (the calibration forwards and the Gram matrices)."""

from __future__ import annotations

import pytest
import torch
from factories import text_inputs, tiny_llama
from tolerances import assert_close_to_reference
from torch import nn

from vlmsparse.kernels import cpu_gemm


@pytest.fixture
def onednn(monkeypatch):
    if not cpu_gemm.onednn_available():
        pytest.skip("this torch has no working oneDNN linear op")
    monkeypatch.setenv(cpu_gemm.ENV, "onednn")
    return cpu_gemm


@pytest.fixture
def default_gemm(monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV, "torch")
    return cpu_gemm


@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24), (0, 24)])  # 2-D, leading dims, no rows
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_on_onednn_matches_float64(onednn, shape, with_bias):
    x, weight = torch.randn(*shape), torch.randn(40, 24)
    bias = torch.randn(40) if with_bias else None
    with torch.no_grad():
        got = onednn.linear(x, weight, bias)
    exact = nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.shape == (*shape[:-1], 40) and got.dtype == torch.float32
    if x.numel():
        assert_close_to_reference(got, nn.functional.linear(x, weight, bias), exact)


def test_strided_weights_and_inputs_avoid_onednns_slow_path(onednn, monkeypatch):
    """oneDNN takes a weight only when it is contiguous or a transpose of a contiguous tensor (other strides ran
    1000x slower); the Gram's x may have any strides."""
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[1].stride()) or real(*a))
    x = torch.randn(6, 24)
    wide = torch.randn(40, 48)
    for weight, dense in [(wide[:, :24], False), (wide[:, ::2], False), (torch.randn(24, 40).T, True),
                          (wide[:20, :24].contiguous(), True)]:
        calls.clear()
        with torch.no_grad():
            got = onednn.linear(x, weight)
        assert bool(calls) == dense, weight.stride()
        assert_close_to_reference(got, nn.functional.linear(x, weight), nn.functional.linear(x.double(), weight.double()))
    calls.clear()
    strided = torch.randn(30, 48)[:, ::2]
    gram = onednn.gram_add_(torch.zeros(24, 24), strided)
    assert calls == [(1, 24)]  # the transpose of a contiguous copy
    exact = strided.double().T @ strided.double()
    assert_close_to_reference(gram, strided.T @ strided, exact)


def test_gram_on_onednn_within_the_float32_sum_bound(onednn):
    """``X^T X`` over 300 tokens. oneDNN sums the 300 products in another order than MKL: on one draw its error
    was 2.2x MKL's (1.9e-4 against 8.5e-5 on entries about 300), so the test holds it to the rounding bound of a
    float32 sum of n products instead, ``|error| <= n u / (1 - n u) * sum |x_i x_j|`` (u = 2^-24), and to symmetry."""
    n = 300
    x = torch.randn(n, 48)
    gram = torch.full((48, 48), 0.5)
    onednn.gram_add_(gram, x)
    exact = 0.5 + x.double().T @ x.double()
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    bound = gamma * (0.5 + x.double().abs().T @ x.double().abs())
    assert ((gram.double() - exact).abs() <= bound).all()
    assert torch.equal(gram, gram.T)


def test_torch_choice_is_torch_bit_for_bit(default_gemm):
    x, weight, bias = torch.randn(9, 24), torch.randn(40, 24), torch.randn(40)
    assert torch.equal(default_gemm.linear(x, weight, bias), nn.functional.linear(x, weight, bias))
    gram = torch.zeros(24, 24)
    assert torch.equal(default_gemm.gram_add_(gram, x), torch.zeros(24, 24).addmm_(x.T, x))


def test_autograd_and_other_dtypes_stay_on_torch(onednn):
    """oneDNN's op records no backward: with autograd recording, and for other dtypes, torch's own op runs."""
    x, weight = torch.randn(2, 4), torch.randn(8, 4, requires_grad=True)
    y = onednn.linear(x, weight)
    assert y.grad_fn is not None
    y.sum().backward()
    assert torch.equal(weight.grad, torch.ones(2, 8).T @ x)
    x64, w64 = x.double(), weight.detach().double()
    assert torch.equal(onednn.linear(x64, w64), nn.functional.linear(x64, w64))


def test_unknown_choice_is_refused(monkeypatch):
    monkeypatch.setenv(cpu_gemm.ENV, "mkl")
    with pytest.raises(ValueError, match="expected one of auto, onednn, torch"):
        cpu_gemm.use_onednn()


def test_auto_measures_once_and_needs_a_clear_gain(monkeypatch):
    if not cpu_gemm.onednn_available():
        pytest.skip("this torch has no working oneDNN linear op")
    monkeypatch.delenv(cpu_gemm.ENV, raising=False)
    monkeypatch.setattr(cpu_gemm, "_decided", {"available": True})
    times = iter([2.0, 1.0])  # torch 2.0 ms, oneDNN 1.0 ms: a gain of 2x >= MIN_SPEEDUP
    monkeypatch.setattr(cpu_gemm, "median_ms", lambda fn, device: next(times))
    assert cpu_gemm.use_onednn() and cpu_gemm.use_onednn()  # the second call reads the cached decision
    monkeypatch.setattr(cpu_gemm, "_decided", {"available": True})
    times = iter([1.2, 1.0])  # 1.2x: below MIN_SPEEDUP, torch's default stays
    assert not cpu_gemm.use_onednn()


def test_linear_forwards_swapped_inside_and_restored_after(onednn, monkeypatch):
    class Subclass(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), Subclass(5, 4), nn.Linear(4, 3))
    seen, hooked = [], []
    monkeypatch.setattr(cpu_gemm, "linear", lambda x, w, b=None: seen.append(w.shape) or nn.functional.linear(x, w, b))
    model[0].register_forward_pre_hook(lambda module, args: hooked.append(1))
    x = torch.randn(2, 6)
    expected = model(x)
    with torch.no_grad(), cpu_gemm.onednn_linears(model) as swapped:
        got = model(x)
    assert swapped == 2 and seen == [(5, 6), (3, 4)]  # the subclass keeps its own forward
    assert hooked == [1, 1]
    assert_close_to_reference(got, expected, model.double()(x.double()))
    assert all("forward" not in m.__dict__ for m in model.float())


def test_only_float32_cpu_linears_are_swapped(onednn):
    """A bf16 linear keeps torch's forward (oneDNN's float32 op would not apply to it on any call)."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4).to(torch.bfloat16))
    with cpu_gemm.onednn_linears(model) as swapped:
        assert swapped == 1 and "forward" in model[0].__dict__ and "forward" not in model[1].__dict__


def test_linears_whose_weights_arrive_later_are_swapped(onednn, monkeypatch):
    """A float32 weight on the meta device on entry (streamed pruning builds the model there) computes through
    oneDNN once it arrives on the CPU: the same GEMMs as a model loaded whole."""
    model = nn.Sequential(nn.Linear(6, 5, device="meta"))
    calls = []
    real = cpu_gemm.linear
    monkeypatch.setattr(cpu_gemm, "linear", lambda *a: calls.append(1) or real(*a))
    with cpu_gemm.onednn_linears(model) as swapped:
        model.to_empty(device="cpu")
        model(torch.randn(2, 6))
    assert swapped == 1 and calls == [1] and "forward" not in model[0].__dict__


def test_no_swap_on_torch_choice(default_gemm):
    model = nn.Sequential(nn.Linear(6, 5))
    with cpu_gemm.onednn_linears(model) as swapped:
        assert swapped == 0 and "forward" not in model[0].__dict__


@pytest.mark.parametrize("choice", ["onednn", "torch"])
def test_prune_model_runs_its_forwards_on_the_choice(choice, monkeypatch):
    """prune_model's calibration forwards go through cpu_gemm.linear on oneDNN (none on torch), its Gram matrices
    through gram_add_, the choice is recorded in masks.info['gemm'], and the forwards are restored afterwards."""
    if choice == "onednn" and not cpu_gemm.onednn_available():
        pytest.skip("this torch has no working oneDNN linear op")
    from vlmsparse.pipeline.prune import prune_model

    monkeypatch.setenv(cpu_gemm.ENV, choice)
    calls = []
    real = cpu_gemm.linear
    monkeypatch.setattr(cpu_gemm, "linear", lambda *a: calls.append(1) or real(*a))
    model = tiny_llama()
    masks = prune_model(model, method="sparsegpt", sparsity="2:4", calibration=[text_inputs(model)], progress=False)
    assert masks.info["gemm"] == choice
    assert (len(calls) > 0) == (choice == "onednn")
    assert all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, nn.Linear))
    assert len(masks) == 14  # 2 blocks x 7 linears
