"""Per-layer pruning algorithms: exact sparsity, Wanda against a brute-force reference, SparseGPT's
reconstruction, padding-free statistics, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from vlmsparse.pruning import InputStats, algorithms, prune_layer, sparsegpt_prune
from vlmsparse.pruning.algorithms import _columns_of_block as _COLUMNS_OF_BLOCK
from vlmsparse.sparsity import check_pattern, num_pruned, satisfies_nm

PATTERNS = ["0.5", "0.7", "2:4", "4:8"]


def _correlated_inputs(n: int = 512, d: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d // 4, generator=g)
    mix = torch.randn(d // 4, d, generator=g)
    scale = torch.rand(d, generator=g) * 4 + 0.1
    return (base @ mix + 0.1 * torch.randn(n, d, generator=g)) * scale


def _stats(x: torch.Tensor, hessian: bool = True) -> InputStats:
    stats = InputStats(x.shape[-1], hessian=hessian)
    stats.add_batch(x)
    return stats


def _rel_error(x, w, w2) -> float:
    return float((x @ w.T - x @ w2.T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_exact_sparsity_and_positive_zeros(method, pattern, dtype):
    torch.manual_seed(1)
    w = torch.randn(48, 64).to(dtype)
    x = _correlated_inputs()
    res = prune_layer(w, _stats(x) if method != "magnitude" else None, method, pattern)
    assert res.mask.dtype == torch.bool and res.mask.shape == w.shape
    assert res.weight.dtype == w.dtype and res.weight.shape == w.shape
    # zeros of the weight are exactly the pruned positions, and they are +0.0
    assert torch.equal(res.weight != 0, res.mask)
    assert not torch.signbit(res.weight[~res.mask]).any()
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        assert satisfies_nm(res.mask, n, m)
        assert int((~res.mask).sum()) == w.numel() * (m - n) // m
    else:
        s = float(pattern)
        if method == "sparsegpt":  # exact over the matrix
            assert int((~res.mask).sum()) == num_pruned(w.numel(), s)
        else:  # magnitude and Wanda compare within each output row by default: exact per row
            assert ((~res.mask).sum(dim=1) == num_pruned(w.shape[1], s)).all()
            assert check_pattern(res.mask, pattern, scope="row")
    # kept weights: unchanged for magnitude / Wanda, updated by SparseGPT
    if method != "sparsegpt":
        assert torch.equal(res.weight[res.mask], w[res.mask])
    else:
        assert not torch.equal(res.weight[res.mask], w[res.mask])
    assert w.abs().min() > 0  # input not modified in place (randn has no zeros)


def test_magnitude_keeps_largest_per_row_and_per_matrix():
    w = torch.tensor([[1.0, -4.0, 2.0, -3.0], [0.1, 0.2, 0.3, 0.4]])
    row = prune_layer(w, None, "magnitude", 0.5).mask
    assert row.tolist() == [[False, True, False, True], [False, False, True, True]]
    mat = prune_layer(w, None, "magnitude", 0.5, scope="matrix").mask
    # the 4 largest |w| of the whole matrix are all in row 0
    assert mat.tolist() == [[True, True, True, True], [False, False, False, False]]


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_wanda_matches_brute_force(pattern):
    torch.manual_seed(2)
    w = torch.randn(8, 16)
    x = torch.randn(40, 16) * torch.linspace(0.1, 3.0, 16)
    res = prune_layer(w, _stats(x, hessian=False), "wanda", pattern)
    # brute force: per row (or group of 4), keep the entries with the largest |w_ij| * ||x_j||
    expected = torch.zeros_like(res.mask)
    norms = [math.sqrt(sum(float(x[t, j]) ** 2 for t in range(x.shape[0]))) for j in range(16)]
    for i in range(8):
        groups = [list(range(16))] if pattern == "0.5" else [list(range(g, g + 4)) for g in range(0, 16, 4)]
        for cols in groups:
            scored = sorted(cols, key=lambda j: (-abs(float(w[i, j])) * norms[j], j))
            for j in scored[: len(cols) // 2]:
                expected[i, j] = True
    assert torch.equal(res.mask, expected)


@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    torch.manual_seed(3)
    w = torch.randn(64, 128)
    x = _correlated_inputs(n=1024, d=128, seed=4)
    stats = _stats(x)
    errors = {m: _rel_error(x, w, prune_layer(w, stats, m, pattern).weight) for m in ("magnitude", "wanda", "sparsegpt")}
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors
    # the reported error (from X^T X) equals the one measured on X
    res = prune_layer(w, stats, "sparsegpt", pattern)
    assert res.error == pytest.approx(_rel_error(x, w, res.weight), rel=1e-3)


def test_sparsegpt_blocks_and_segments():
    torch.manual_seed(5)
    q, k = torch.randn(24, 64), torch.randn(8, 64)
    x = _correlated_inputs(n=256, d=64)
    h = _stats(x).hessian()
    stacked, mask = sparsegpt_prune(torch.cat([q, k]), h, 0.6, blocksize=16, segments=[24, 8])
    # each segment keeps exactly its own sparsity
    assert int((~mask[:24]).sum()) == num_pruned(q.numel(), 0.6)
    assert int((~mask[24:]).sum()) == num_pruned(k.numel(), 0.6)
    # rows are independent given H: the stacked result equals pruning with the same per-block counts
    alone, _ = sparsegpt_prune(k, h, 0.6, blocksize=16)
    assert int((alone == 0).sum()) == int((stacked[24:] == 0).sum())
    with pytest.raises(ValueError, match="segments"):
        sparsegpt_prune(q, h, 0.5, segments=[10, 10])


def test_padding_does_not_change_statistics():
    torch.manual_seed(6)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = x.clone()
    padded[0, 3:] = 100.0  # garbage at pad positions
    a = InputStats(16, hessian=True)
    a.add_batch(padded, token_mask=mask)
    b = InputStats(16, hessian=True)
    b.add_batch(torch.cat([x[0, :3], x[1]]))
    assert a.count == b.count == 8
    assert torch.allclose(a.norm, b.norm) and torch.allclose(a.hessian(), b.hessian())
    c = InputStats(16)
    c.add_batch(padded)
    assert not torch.allclose(c.norm, b.norm)  # without the mask the pads would count


def test_statistics_accumulate_over_batches():
    x = torch.randn(30, 8)
    a = InputStats(8, hessian=True)
    for chunk in x.split(7):
        a.add_batch(chunk)
    assert a.count == 30
    torch.testing.assert_close(a.hessian(), 2 * x.T @ x / 30, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.norm, x.square().mean(0).sqrt())


def test_error_sample_holds_whole_sequences():
    """``sample_tokens``: the first whole sequences (rows of x, padding skipped) until the sample holds at least
    that many tokens, so each position of a sequence (the first ones carry outlier activations) is as frequent as in
    the data; a 2-D x is single tokens. In the inputs' dtype, copied (not a view that keeps the batch alive)."""
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 1, 1, 1]])
    stats = InputStats(16, sample_tokens=9)
    stats.add_batch(x, token_mask=mask)  # 3 + 5 real tokens: both sequences
    stats.add_batch(2 * x)  # 8 < 9: the next whole sequence (5 tokens), then 13 >= 9
    stats.add_batch(3 * x)  # full: nothing
    expected = torch.cat([x[0, [0, 1, 4]], x[1], 2 * x[0]])
    assert stats.sample.shape == (13, 16) and torch.equal(stats.sample, expected)
    assert stats.sample.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    flat = InputStats(16, sample_tokens=4)
    flat.add_batch(x[1].bfloat16())  # 2-D: tokens
    assert flat.sample.dtype == torch.bfloat16 and torch.equal(flat.sample, x[1, :4].bfloat16())
    assert InputStats(16).sample is None  # not asked: nothing kept
    with pytest.raises(ValueError, match="sample_tokens must be an int >= 0"):
        InputStats(16, sample_tokens=-1)
    with pytest.raises(ValueError, match="token_mask shape"):
        InputStats(16, sample_tokens=4).add_batch(x, token_mask=mask[:, :4])


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_error_from_the_sample_without_the_gram_matrix(method):
    """Without X^T X (Wanda, magnitude) the reported error is ||X D^T|| / ||X W^T|| over the sampled tokens (here
    the first 4 sequences of 30 tokens: 120 >= 100); with X^T X (SparseGPT) over every token; with neither, None."""
    torch.manual_seed(7)
    w = torch.randn(24, 32)
    x = _correlated_inputs(n=300, d=32, seed=8)
    skewed = x.clone()
    skewed[120:] = 100 * torch.randn(180, 32)  # tokens outside the sample: other data entirely
    stats = InputStats(32, sample_tokens=100)
    for batch in skewed.reshape(10, 30, 32).split(3):
        stats.add_batch(batch)
    res = prune_layer(w, stats, method, "2:4")
    assert stats.gram is None and stats.sample.shape == (120, 32)
    expected = _rel_error(x[:120].double(), w.double(), res.weight.double())
    assert res.error == pytest.approx(expected, rel=1e-5)
    assert abs(_rel_error(skewed, w, res.weight) - expected) > 0.01  # over all 300 it would differ
    # bfloat16 inputs: the GEMMs run in bf16, their squares summed in float32
    low = InputStats(32, sample_tokens=100)
    low.add_batch(x.bfloat16())
    got = low.reconstruction_error(w.bfloat16(), res.weight.bfloat16())
    exact = _rel_error(x[:100].bfloat16().double(), w.bfloat16().double(), res.weight.bfloat16().double())
    assert got == pytest.approx(exact, rel=2e-3)
    assert _stats(x, hessian=False).reconstruction_error(w, res.weight) is None


def test_bad_input_is_rejected():
    w = torch.randn(8, 12)
    with pytest.raises(ValueError, match="divisible by 8"):
        prune_layer(w, None, "magnitude", "4:8")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune_layer(w, None, "magnitude", 1.0)
    with pytest.raises(ValueError, match="N < M|1 <= N < M"):
        prune_layer(w, None, "magnitude", "4:4")
    with pytest.raises(ValueError, match="unknown method"):
        prune_layer(w, None, "optimal", 0.5)
    with pytest.raises(ValueError, match="needs calibration"):
        prune_layer(w, None, "wanda", 0.5)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prune_layer(bad, None, "magnitude", 0.5)
    huge = torch.full_like(w, 3e38)  # finite, but its sum overflows: the exact check decides
    assert int(prune_layer(huge, None, "magnitude", 0.5).mask.sum()) == w.numel() // 2
    stats = InputStats(12)
    with pytest.raises(ValueError, match="NaN"):
        stats.add_batch(torch.full((2, 12), float("inf")))
    with pytest.raises(ValueError, match="no calibration tokens"):
        prune_layer(w, stats, "wanda", 0.5)
    with pytest.raises(ValueError, match="hessian=True"):
        stats.add_batch(torch.randn(3, 12))
        prune_layer(w, stats, "sparsegpt", 0.5)
    with pytest.raises(ValueError, match="token_mask shape"):
        stats.add_batch(torch.randn(2, 3, 12), token_mask=torch.ones(2, 4))


def test_sparsegpt_raises_dampening_on_singular_hessian(caplog):
    w = torch.randn(4, 8)
    h = -torch.eye(8)  # not positive definite at any small dampening
    with pytest.raises(ValueError, match="Cholesky"):
        sparsegpt_prune(w, h, 0.5, dampening=0.01)
    assert "retrying" in caplog.text
    # rank-deficient but PSD: the dampening makes it work
    x = torch.randn(2, 8)
    out, mask = sparsegpt_prune(w, 2 * x.T @ x / 2, 0.5)
    assert int((~mask).sum()) == 16 and torch.isfinite(out).all()


def _hessian(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A damped Gram matrix with a few loud inputs (condition number ~1e4), as calibration gives."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, n, generator=g, dtype=torch.float64)
    x[:, : max(1, n // 50)] *= 100
    h = x.T @ x / x.shape[0]
    return (h + 0.01 * h.diagonal().mean() * torch.eye(n, dtype=torch.float64)).to(dtype)


def _former_factor(h: torch.Tensor) -> torch.Tensor:
    """The reference's chain: cholesky -> cholesky_inverse -> upper cholesky."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@pytest.mark.parametrize("leaf", [128, 4])
@pytest.mark.parametrize("n", [1, 5, 128, 129, 300, 700])
def test_upper_inverse_factor_matches_the_cholesky_chain(monkeypatch, n, leaf):
    """U upper triangular with U^T U = H^-1, against float64; leaves of 4 run the recursion deep on odd splits."""
    from tolerances import assert_close_to_reference

    monkeypatch.setattr(algorithms, "FACTOR_LEAF", leaf)
    h64 = _hessian(n, torch.float64)
    exact = _former_factor(h64)
    got64 = algorithms._upper_inverse_factor(h64)
    assert torch.equal(got64, got64.triu()) and bool((got64.diagonal() > 0).all())
    assert_close_to_reference(got64, exact, exact)
    h32 = h64.float()
    got32 = algorithms._upper_inverse_factor(h32)
    assert got32.dtype == torch.float32 and torch.equal(got32, got32.triu())
    assert_close_to_reference(got32, _former_factor(h32), exact)


def test_factor_gemms_run_in_full_float32_precision(monkeypatch):
    """A caller's lower float32 matmul precision (TF32 on CUDA) does not reach the factor's GEMMs, and is back
    afterwards."""
    seen = []
    real = algorithms.cpu_gemm.linear
    monkeypatch.setattr(algorithms.cpu_gemm, "linear",
                        lambda *a: seen.append(torch.get_float32_matmul_precision()) or real(*a))
    monkeypatch.setattr(algorithms, "FACTOR_LEAF", 4)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        algorithms._inverse_cholesky(_hessian(12, torch.float32), 0.01)
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert seen and set(seen) == {"highest"}


@pytest.mark.gpu
@pytest.mark.parametrize("n", [129, 1536])
def test_upper_inverse_factor_on_cuda_with_tf32_allowed(n):
    """On CUDA, with TF32 allowed by the caller, the factor keeps float32 accuracy (the GEMMs run at full
    precision inside) against the float64 chain."""
    from tolerances import assert_close_to_reference

    h64 = _hessian(n, torch.float64)
    exact = _former_factor(h64)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls
    try:
        got = algorithms._inverse_cholesky(h64.float().cuda(), 0.0).cpu()
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(got, got.triu())
    assert_close_to_reference(got, _former_factor(h64.float()), exact)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["2:4", "4:8", 0.5])
def test_triton_column_steps_on_cuda_equal_the_python_loop(pattern, monkeypatch):
    """On CUDA, sparsegpt_prune runs the Triton column steps (kernels/obs.py); the same masks and, within the
    table, the same weights as the Python loop on CUDA, against a float64 run."""
    from tolerances import assert_close_to_reference

    calls = []
    real = algorithms._triton_columns
    monkeypatch.setattr(algorithms, "_triton_columns", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(72, 256, generator=g, dtype=torch.float64)  # 2 programs of 32 rows and a partial one
    x = torch.randn(1000, 256, generator=g, dtype=torch.float64)
    hessian = 2 * x.T @ x / 1000
    exact, _ = sparsegpt_prune(weight, hessian, pattern)
    got, keep = sparsegpt_prune(weight.float().cuda(), hessian.float().cuda(), pattern)
    assert calls and real(got.T.contiguous(), 4 if pattern == "2:4" else 8, 128) is not None
    monkeypatch.setattr(algorithms, "_triton_columns", lambda *a: None)
    loop, loop_keep = sparsegpt_prune(weight.float().cuda(), hessian.float().cuda(), pattern)
    assert torch.equal(keep, loop_keep)
    assert_close_to_reference(got.cpu(), loop.cpu(), exact)


@pytest.mark.parametrize("where", [0, -1])
def test_upper_inverse_factor_refuses_an_indefinite_matrix(monkeypatch, where):
    """A negative pivot in the first or the last half (the Schur complement or the trailing block) gives None."""
    monkeypatch.setattr(algorithms, "FACTOR_LEAF", 4)
    h = _hessian(20, torch.float64)
    h[where, :] = 0.0
    h[:, where] = 0.0
    h[where, where] = -1.0
    assert algorithms._upper_inverse_factor(h) is None


def _naive_obs_nm(w: torch.Tensor, h: torch.Tensor, n: int, m: int, dampening: float = 0.01):
    """Unblocked optimal brain surgeon with an explicitly downdated inverse Hessian, in float64: after pruning
    column j, ``W[:, j:] -= err * Hinv[j, j:] / Hinv[j, j]`` and column j is eliminated from ``Hinv``."""
    h = h.double()
    h = h + dampening * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    cols = w.shape[1]
    diag = []  # Hinv[j, j] after eliminating columns < j (what the scores of column j divide by)
    tmp = hinv.clone()
    for j in range(cols):
        diag.append(tmp[j, j].item())
        tmp = tmp - torch.outer(tmp[:, j], tmp[j, :]) / tmp[j, j]
    W = w.double().clone()
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        if j % m == 0:
            scores = W[:, j : j + m].square() / torch.tensor(diag[j : j + m], dtype=torch.float64)
            order = torch.sort(scores, dim=1, stable=True).indices[:, : m - n]
            pruned[:, j : j + m].scatter_(1, order, True)
        err = torch.where(pruned[:, j], W[:, j], torch.zeros_like(W[:, j])) / hinv[j, j]
        W[:, j:] -= torch.outer(err, hinv[j, j:])
        W[pruned[:, j], j] = 0.0
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return W, ~pruned


@pytest.mark.parametrize("blocksize", [8, 128])
def test_sparsegpt_equals_unblocked_obs(blocksize):
    torch.manual_seed(7)
    w = torch.randn(12, 32)
    x = _correlated_inputs(n=200, d=32, seed=8)
    h = _stats(x).hessian()
    expected_w, expected_keep = _naive_obs_nm(w, h, 2, 4)
    got_w, got_keep = sparsegpt_prune(w, h, "2:4", blocksize=blocksize)
    assert torch.equal(got_keep, expected_keep)
    torch.testing.assert_close(got_w.double(), expected_w, rtol=1e-3, atol=1e-4)


def test_lowest_selection_is_exact_with_ties():
    from vlmsparse.pruning.algorithms import _lowest

    scores = torch.tensor([[3.0, 1.0, 1.0, 0.5], [1.0, 2.0, 1.0, 4.0]])
    # 0.5 first, then the 1.0s in flat index order: (0,1), (0,2), (1,0), (1,2)
    assert _lowest(scores, 3).tolist() == [[False, True, True, True], [False, False, False, False]]
    assert _lowest(scores, 4).tolist() == [[False, True, True, True], [True, False, False, False]]
    assert _lowest(scores, 0).sum() == 0 and _lowest(scores, 8).all()
    x = torch.randn(40, 30)
    for k in (1, 17, 600, 1199):
        got = _lowest(x, k)
        assert int(got.sum()) == k and x[got].max() <= x[~got].min()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_threads_one_only_in_the_sparsegpt_column_loop(method, without_native, monkeypatch):
    """Statistics, scores, the Cholesky and the reconstruction error run on all threads; SparseGPT's per-column
    Python loop (the fallback of the native column steps) alone on one (a speed choice, see ``one_thread``); the
    caller's thread count is restored."""
    import vlmsparse.pruning.algorithms as algorithms

    seen: dict[str, list[int]] = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.setdefault(name, []).append(torch.get_num_threads())
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(InputStats, "reconstruction_error", spy("error", InputStats.reconstruction_error))
    monkeypatch.setattr(algorithms, "build_mask", spy("mask", algorithms.build_mask))
    monkeypatch.setattr(algorithms, "_inverse_cholesky", spy("cholesky", algorithms._inverse_cholesky))
    monkeypatch.setattr(algorithms, "_columns_of_block", spy("columns", algorithms._columns_of_block))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stats = InputStats(16, hessian=True)
        stats.add_batch(torch.randn(64, 16))
        prune_layer(torch.randn(8, 16), stats, method, "0.5" if method == "wanda" else "2:4", blocksize=8)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen["error"] == [2]
    if method == "wanda":
        assert seen["mask"] == [2]
    else:
        assert seen["cholesky"] == [2] and seen["columns"] == [1, 1]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (7, 8)])
def test_nm_selection_by_pairwise_ranks_equals_a_stable_sort_with_ties(n, m):
    """``keep_top_dim0`` (SparseGPT's per-group N:M selection in the column loop, and ``mask_nm``'s) keeps what a
    stable descending sort keeps first, ties included."""
    from vlmsparse.sparsity import keep_top_dim0

    for scores in (torch.randint(0, 3, (m, 64)).float(), torch.randn(m, 64)):
        order = torch.sort(-scores, dim=0, stable=True).indices[:n]  # the n best, ties to the lower index
        expected = torch.zeros(m, 64, dtype=torch.bool).scatter_(0, order, True)
        assert torch.equal(keep_top_dim0(scores, n), expected)


def _sparsegpt_both(weight, hessian, pattern, monkeypatch, segments=None):
    """``(native, python)``: sparsegpt_prune with the native column steps, and with the Python loop."""
    import vlmsparse.pruning.algorithms as algorithms

    native = sparsegpt_prune(weight, hessian, pattern, blocksize=64, segments=segments)
    with monkeypatch.context() as patch:
        patch.setattr(algorithms, "_native_columns", lambda WT: None)
        python = sparsegpt_prune(weight, hessian, pattern, blocksize=64, segments=segments)
    return native, python


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512bf16", "amx"])
@pytest.mark.parametrize("pattern,segments", [("2:4", None), ("4:8", None), (0.5, [24, 40]), (0.7, None)])
def test_native_column_steps_equal_the_python_loop(native, isa, pattern, segments, monkeypatch):
    """The C++ column steps (csrc/sparse_cpu/obs.h, each ISA tier) choose the same masks as the Python loop and
    give the same weights: in float64 to 1e-10; in float32 within the table's bound against the float64 run.
    130 input columns: blocks of 64, 64 and 2 (a rest); 64 rows: split over the threads in chunks of 64 and less."""
    if isa not in native.supported_isas():
        pytest.skip(f"this CPU has no {isa} tier")
    from tolerances import assert_close_to_reference

    previous = native.set_isa(isa)
    try:
        generator = torch.Generator().manual_seed(3)
        in_features = 128 if isinstance(pattern, str) else 130  # N:M needs whole groups
        weight = torch.randn(64, in_features, generator=generator, dtype=torch.float64)
        x = torch.randn(400, in_features, generator=generator, dtype=torch.float64)
        hessian = 2 * x.T @ x / 400
        (w64, keep64), (p64, pkeep64) = _sparsegpt_both(weight, hessian, pattern, monkeypatch, segments)
        assert torch.equal(keep64, pkeep64)
        assert (w64 - p64).abs().max().item() <= 1e-10
        (w32, keep32), (p32, pkeep32) = _sparsegpt_both(weight.float(), hessian.float(), pattern, monkeypatch,
                                                        segments)
        assert torch.equal(keep32, pkeep32) and torch.equal(keep32, keep64)
        assert_close_to_reference(w32, p32, w64)
        assert torch.equal(w32 == 0, ~keep32)
    finally:
        native.set_isa(previous)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_native_nm_ties_go_to_the_lower_column(native, n, m, monkeypatch):
    """Equal scores in an N:M group (integer weights, identity Hessian): the native steps keep the lower columns
    first, as the Python loop's keep_top_dim0."""
    weight = torch.randint(-2, 3, (32, 2 * m)).double()
    hessian = torch.eye(2 * m, dtype=torch.float64)
    (w, keep), (pw, pkeep) = _sparsegpt_both(weight, hessian, f"{n}:{m}", monkeypatch)
    assert torch.equal(keep, pkeep) and torch.equal(w, pw)
    assert satisfies_nm(keep, n, m)


def test_wide_nm_groups_take_the_python_loop(native, monkeypatch):
    """N:M with M above the native steps' limit (32) runs the Python loop instead of failing."""
    import vlmsparse.pruning.algorithms as algorithms

    calls = []
    monkeypatch.setattr(algorithms, "_columns_of_block",
                        lambda *args: calls.append(1) or _COLUMNS_OF_BLOCK(*args))
    weight, x = torch.randn(16, 128), torch.randn(300, 128)
    new, keep = sparsegpt_prune(weight, 2 * x.T @ x / 300, "8:64", blocksize=64)
    assert calls and satisfies_nm(keep, 8, 64) and torch.equal(new == 0, ~keep)


def test_native_column_steps_refuse_bad_input(native):
    op = torch.ops.vlmsparse_native.sparsegpt_columns
    w, err = torch.randn(8, 16), torch.empty(8, 16)
    pruned, u = torch.zeros(8, 16, dtype=torch.bool), torch.eye(8)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(w.half(), err.half(), pruned, u.half(), 0, 0)
    with pytest.raises(RuntimeError, match=r"u must be \[8, 8\]"):
        op(w, err, pruned, torch.eye(7), 0, 0)
    with pytest.raises(RuntimeError, match="pruned must be bool"):
        op(w, err, pruned.float(), u, 0, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(16, 8).T, err, pruned, u, 0, 0)
    with pytest.raises(RuntimeError, match="m dividing"):
        op(w, err, pruned, u, 2, 3)
    torch.library.opcheck(op, (w, err, pruned, u, 2, 4))
