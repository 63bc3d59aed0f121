"""Our pruning against independent re-implementations of the reference algorithms.

The ``ref_*`` functions below are written from the papers and the reference repositories' semantics
(locuslab/wanda ``lib/prune.py`` + ``lib/layerwrapper.py``, IST-DASLab/sparsegpt ``sparsegpt.py``,
luuyin/OWL ``lib/prune_all.py``), in float64 with plain loops, and share no code with ``vlmsparse.pruning``:

- Wanda: score ``|W_ij| * sqrt(scaler_row_j)``, ``scaler_row_j = sum ||X_j||^2 / n_sequences``; per output row
  the ``int(in * s)`` lowest are pruned (stable sort: among ties the lower index goes first); N:M prunes the
  ``M - N`` lowest of every group of M consecutive inputs.
- magnitude: score ``|W_ij|`` compared over the whole matrix.
- SparseGPT: ``H = 2 X^T X / n_sequences``, dead inputs (``H_jj == 0``) set to 1, ``+ 0.01 mean(diag H) I``;
  ``U`` = upper Cholesky factor of ``H^-1`` (here: row j of the inverse after eliminating the columns before j,
  over the square root of its diagonal entry, no Cholesky call); columns in blocks; unstructured: the mask of a
  block is chosen at the block's start from ``w^2 / U_jj^2``; N:M: at every M-th column from the current
  (updated) weights; each column's error ``(w - q) / U_jj`` goes on the later columns along ``U[j, j+1:]``.
- OWL: per block, the Wanda scores of all its linears together; outlier ratio ``#{A > M mean(A)} / #A``;
  ``(D - min) / (max - min) * 2 lambda``, minus its mean, subtracted from the target sparsity.

Deliberate differences (documented in ``vlmsparse/pruning/algorithms.py`` and ``owl.py``) are asserted as such:
counts ``round(c * s)`` instead of ``int(c * s)`` (Wanda) or ``int(c * s) + 1`` (magnitude / SparseGPT's
``<=`` threshold), ties keep the lower index, and SparseGPT does not zero the weights of dead inputs.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vlmsparse.pipeline.prune import PruneConfig, prune_model
from vlmsparse.pipeline.prune.owl import _outlier_ratio
from vlmsparse.pruning import (
    InputStats,
    magnitude_prune,
    outlier_ratio,
    owl_sparsities,
    prune_layer,
    sparsegpt_prune,
    wanda_prune,
)

F64 = torch.float64


# ------------------------------------------------------------------------------------------------ inputs
def _random_inputs(batches: int, seq: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batches, seq, d, generator=g, dtype=F64) * (torch.rand(d, generator=g, dtype=F64) * 3 + 0.2)


def _correlated_inputs(batches: int, seq: int, d: int, seed: int) -> torch.Tensor:
    """Low-rank mixture plus noise, with per-feature scales: a badly conditioned Hessian, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batches * seq, max(d // 4, 1), generator=g, dtype=F64)
    mix = torch.randn(max(d // 4, 1), d, generator=g, dtype=F64)
    scale = torch.rand(d, generator=g, dtype=F64) * 4 + 0.1
    x = (base @ mix + 0.1 * torch.randn(batches * seq, d, generator=g, dtype=F64)) * scale
    return x.reshape(batches, seq, d)


INPUTS = {"random": _random_inputs, "correlated": _correlated_inputs}


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------------------- reference: Wanda, magnitude
def ref_scaler_row(x: torch.Tensor) -> list[float]:
    """``scaler_row`` of the reference wrapper: a running mean over sequences of ``||X_j||^2``."""
    scaler = [0.0] * x.shape[-1]
    nsamples = 0
    for seq in x:  # one sequence per forward, as the reference calls the layer
        scaler = [v * nsamples / (nsamples + 1) for v in scaler]
        nsamples += 1
        for j in range(x.shape[-1]):
            scaler[j] += sum(float(t) ** 2 for t in seq[:, j]) / nsamples
    return scaler


def ref_prune_lowest(scores: list[list[float]], groups: list[list[tuple[int, int]]], counts: list[int]) -> torch.Tensor:
    """Keep mask: in each group of positions, prune the ``count`` lowest scores (ties: lower position first)."""
    keep = torch.ones(len(scores), len(scores[0]), dtype=torch.bool)
    for group, count in zip(groups, counts):
        order = sorted(group, key=lambda p: (scores[p[0]][p[1]], p))
        for i, j in order[:count]:
            keep[i, j] = False
    return keep


def ref_wanda(w: torch.Tensor, scaler: list[float], sparsity: float | None, nm: tuple[int, int] | None,
              count=lambda c, s: int(c * s)) -> torch.Tensor:
    rows, cols = w.shape
    scores = [[abs(float(w[i, j])) * math.sqrt(scaler[j]) for j in range(cols)] for i in range(rows)]
    if nm is None:
        groups = [[(i, j) for j in range(cols)] for i in range(rows)]
        return ref_prune_lowest(scores, groups, [count(cols, sparsity)] * rows)
    n, m = nm
    groups = [[(i, j) for j in range(g, g + m)] for i in range(rows) for g in range(0, cols, m)]
    return ref_prune_lowest(scores, groups, [m - n] * len(groups))


def ref_magnitude_matrix(w: torch.Tensor, pruned: int) -> torch.Tensor:
    rows, cols = w.shape
    scores = [[abs(float(w[i, j])) for j in range(cols)] for i in range(rows)]
    return ref_prune_lowest(scores, [[(i, j) for i in range(rows) for j in range(cols)]], [pruned])


def assert_same_up_to_ties(got: torch.Tensor, expected: torch.Tensor, scores: torch.Tensor) -> None:
    """Same number pruned, and the pruned scores are the same multiset: only tied entries may swap."""
    assert int((~got).sum()) == int((~expected).sum())
    assert torch.equal(torch.sort(scores[~got]).values, torch.sort(scores[~expected]).values)


# ----------------------------------------------------------------------------------- reference: SparseGPT
def ref_hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / n_sequences`` summed sequence by sequence, as the reference accumulates it."""
    d = x.shape[-1]
    h = torch.zeros(d, d, dtype=F64)
    for seq in x:
        h += 2.0 * seq.T @ seq
    return h / x.shape[0]


def ref_inverse_rows(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Rows ``U[j, j:]`` of the upper Cholesky factor of ``(H + damp I)^-1``, by Gaussian elimination of the
    inverse: ``U[j] = Hinv_j[j] / sqrt(Hinv_j[j, j])`` with ``Hinv_j`` the inverse after removing columns < j."""
    h = h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h += percdamp * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=F64)
    hinv = torch.linalg.inv(h)
    d = h.shape[0]
    u = torch.zeros(d, d, dtype=F64)
    for j in range(d):
        u[j, j:] = hinv[j, j:] / math.sqrt(float(hinv[j, j]))
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return u


def ref_sparsegpt(w: torch.Tensor, h: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None,
                  blocksize: int, block_count) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT with immediate (not lazy) updates: after column j, ``W[:, j+1:] -= err_j U[j, j+1:]``.
    ``block_count(c0, c1)``: entries pruned in the column block ``[c0, c1)`` (unstructured)."""
    u = ref_inverse_rows(h)
    W = w.to(F64).clone()
    rows, cols = W.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for c0 in range(0, cols, blocksize):
        c1 = min(c0 + blocksize, cols)
        if nm is None:  # the block's mask from the weights as they are at the block's start
            scores = [[float(W[i, j]) ** 2 / float(u[j, j]) ** 2 for j in range(cols)] for i in range(rows)]
            group = [(i, j) for i in range(rows) for j in range(c0, c1)]
            pruned[:, c0:c1] |= ~ref_prune_lowest(scores, [group], [block_count(c0, c1)])[:, c0:c1]
        for j in range(c0, c1):
            if nm is not None and j % nm[1] == 0:  # N:M: the group's mask from the current weights
                n, m = nm
                for i in range(rows):
                    group = sorted(range(j, j + m), key=lambda c: (float(W[i, c]) ** 2 / float(u[c, c]) ** 2, c))
                    for c in group[: m - n]:
                        pruned[i, c] = True
            for i in range(rows):
                if pruned[i, j]:
                    err = float(W[i, j]) / float(u[j, j])
                    for c in range(j + 1, cols):
                        W[i, c] -= err * float(u[j, c])
                    W[i, j] = 0.0
    return W, ~pruned


def _exact_block_count(rows: int, s: float):
    """Our documented count: block ``[c0, c1)`` prunes ``round(rows c1 s) - round(rows c0 s)`` (the reference:
    ``int(rows (c1 - c0) s) + 1``, its ``<=`` threshold takes one more)."""
    rnd = lambda v: int(math.floor(v + 0.5 + 1e-9))  # noqa: E731
    return lambda c0, c1: rnd(rows * c1 * s) - rnd(rows * c0 * s)


# ----------------------------------------------------------------------------------------- reference: OWL
def ref_owl(block_scores: list[list[torch.Tensor]], target: float, lam: float, hyper_m: float) -> list[float]:
    """Layer sparsities: outlier ratio (in percent) per block over its linears' scores concatenated."""
    ratios = []
    for scores in block_scores:
        flat = [float(v) for s in scores for v in s.flatten()]
        mean = sum(flat) / len(flat)
        ratios.append(100.0 * sum(1 for v in flat if v > hyper_m * mean) / len(flat))
    lo, hi = min(ratios), max(ratios)
    spread = [(r - lo) * (1.0 / (hi - lo) * lam * 2) for r in ratios]
    mean = sum(spread) / len(spread)
    density = [v - mean + (1.0 - target) for v in spread]
    return [1.0 - v for v in density]


# =============================================================================================== tests
@pytest.mark.parametrize("kind", ["random", "correlated"])
@pytest.mark.parametrize("pattern", ["0.5", "0.7", "2:4", "4:8"])
def test_wanda_matches_reference(kind, pattern):
    x = INPUTS[kind](6, 10, 40, seed=11)
    w = _weight(24, 40, seed=12)
    scaler = ref_scaler_row(x)
    nm = tuple(map(int, pattern.split(":"))) if ":" in pattern else None
    s = float(pattern) if nm is None else None
    expected = ref_wanda(w, scaler, s, nm)  # 40 inputs: int(40 s) == round(40 s) for 0.5 and 0.7
    scores = w.abs() * torch.tensor(scaler, dtype=F64).sqrt()
    # our statistics (per token, float32) through the stable entry point
    stats = InputStats(40)
    for seq in x.float():
        stats.add_batch(seq)
    got = prune_layer(w.float(), stats, "wanda", pattern).mask
    assert torch.equal(got, expected)
    # and the algorithm alone on float64
    new, keep = wanda_prune(w, torch.tensor(scaler, dtype=F64).sqrt(), pattern)
    assert torch.equal(keep, expected)
    assert torch.equal(new, torch.where(expected, w, torch.zeros((), dtype=F64)))
    assert_same_up_to_ties(keep, expected, scores)


def test_wanda_count_rounds_where_reference_floors():
    """Deliberate: 70% of 64 inputs prunes round(44.8) = 45 per row; the reference prunes int(44.8) = 44."""
    x = _random_inputs(4, 8, 64, seed=13)
    w = _weight(8, 64, seed=14)
    scaler = ref_scaler_row(x)
    _, keep = wanda_prune(w, torch.tensor(scaler, dtype=F64).sqrt(), 0.7)
    assert ((~keep).sum(dim=1) == 45).all()
    assert torch.equal(keep, ref_wanda(w, scaler, 0.7, None, count=lambda c, s: round(c * s)))
    reference = ref_wanda(w, scaler, 0.7, None)
    assert ((~reference).sum(dim=1) == 44).all()
    assert (keep <= reference).all()  # the same order: ours prunes the reference's 44 plus the next one


def test_wanda_ties_keep_the_lower_index():
    """Deliberate: among equal scores we keep the lower index; the reference prunes it. Same pruned scores."""
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 0.5]], dtype=F64)
    scaler = [1.0] * 6
    _, keep = wanda_prune(w, torch.ones(6, dtype=F64), 0.5)
    expected = ref_wanda(w, scaler, 0.5, None)
    assert keep.tolist() == [[True, True, False, False, True, False]]
    assert expected.tolist() == [[False, False, True, True, True, False]]
    assert_same_up_to_ties(keep, expected, w.abs())


@pytest.mark.parametrize("kind", ["random", "correlated"])
def test_magnitude_matches_reference(kind):
    torch.manual_seed(0)
    w = _weight(16, 40, seed=15) if kind == "random" else _correlated_inputs(1, 16, 40, seed=16)[0]
    for s in (0.5, 0.7):
        # the reference takes one more than int(numel s) (``<=`` its threshold); we take round(numel s)
        _, keep = magnitude_prune(w, s, scope="matrix")
        assert torch.equal(keep, ref_magnitude_matrix(w, round(w.numel() * s)))
    assert int((~magnitude_prune(w, 0.5, scope="matrix")[1]).sum()) == 320  # the reference prunes 321 of 640
    for n, m in ((2, 4), (4, 8)):
        _, keep = magnitude_prune(w, f"{n}:{m}")
        groups = [[(i, j) for j in range(g, g + m)] for i in range(w.shape[0]) for g in range(0, 40, m)]
        scores = [[abs(float(v)) for v in row] for row in w]
        assert torch.equal(keep, ref_prune_lowest(scores, groups, [m - n] * len(groups)))


def test_nm_keeps_n_of_m():
    """Deliberate: ``N:M`` keeps N (the reference's ``prune_n`` prunes N); 1:4 keeps one of every four."""
    w = _weight(4, 16, seed=17)
    _, keep = magnitude_prune(w, "1:4")
    assert (keep.reshape(4, 4, 4).sum(dim=-1) == 1).all()
    assert torch.equal(keep.reshape(4, 4, 4), w.abs().reshape(4, 4, 4) == w.abs().reshape(4, 4, 4).amax(-1, True))


SPARSEGPT_CASES = [
    # (kind, rows, cols, blocksize, pattern): blocksize < cols, cols not a multiple of blocksize
    ("random", 12, 50, 16, "0.5"),
    ("correlated", 12, 50, 16, "0.5"),
    ("correlated", 10, 37, 8, "0.7"),
    ("random", 12, 40, 16, "2:4"),
    ("correlated", 12, 40, 16, "2:4"),
    ("correlated", 8, 40, 16, "4:8"),
    ("correlated", 8, 48, 128, "0.6"),  # one block
]


@pytest.mark.parametrize("kind,rows,cols,blocksize,pattern", SPARSEGPT_CASES)
def test_sparsegpt_matches_reference(kind, rows, cols, blocksize, pattern):
    x = INPUTS[kind](8, 16, cols, seed=rows * cols)
    w = _weight(rows, cols, seed=cols)
    h = ref_hessian(x)
    nm = tuple(map(int, pattern.split(":"))) if ":" in pattern else None
    s = float(pattern) if nm is None else None
    expected_w, expected_keep = ref_sparsegpt(w, h, s, nm, blocksize, _exact_block_count(rows, s or 0.0))
    got_w, got_keep = sparsegpt_prune(w, h, pattern, blocksize=blocksize, dampening=0.01)
    assert torch.equal(got_keep, expected_keep)
    torch.testing.assert_close(got_w, expected_w, rtol=1e-9, atol=1e-10)
    # H's scale (ours: per token; reference: per sequence) changes nothing
    scaled_w, scaled_keep = sparsegpt_prune(w, h * 0.37, pattern, blocksize=blocksize)
    assert torch.equal(scaled_keep, got_keep)
    torch.testing.assert_close(scaled_w, got_w, rtol=1e-9, atol=1e-10)


def test_sparsegpt_float32_path_matches_reference():
    """The production path (float32 statistics per token, float32 weight) agrees with the float64 reference."""
    x = _correlated_inputs(8, 16, 40, seed=18)
    w = _weight(12, 40, seed=19)
    expected_w, expected_keep = ref_sparsegpt(w, ref_hessian(x), None, (2, 4), 16, None)
    stats = InputStats(40, hessian=True)
    for seq in x.float():
        stats.add_batch(seq)
    res = prune_layer(w.float(), stats, "sparsegpt", "2:4", blocksize=16)
    assert torch.equal(res.mask, expected_keep)
    torch.testing.assert_close(res.weight.double(), expected_w, rtol=1e-3, atol=1e-4)


def test_sparsegpt_keeps_dead_inputs_unchanged():
    """Deliberate: the reference zeroes ``W[:, dead]``; we keep those weights where the mask keeps them (no
    update reaches them, no error leaves them) and zeros stay exactly the pruned positions."""
    x = _correlated_inputs(8, 16, 32, seed=20)
    x[..., [3, 17]] = 0.0
    w = _weight(12, 32, seed=21)
    h = ref_hessian(x)
    got_w, keep = sparsegpt_prune(w, h, 0.5, blocksize=8)
    dead = [3, 17]
    assert torch.equal(got_w[:, dead][keep[:, dead]], w[:, dead][keep[:, dead]])
    assert keep[:, dead].any()
    assert torch.equal(got_w != 0, keep)
    # the live columns equal the reference run with the same mask rule (it sets H_jj = 1 for dead inputs too)
    expected_w, expected_keep = ref_sparsegpt(w, h, 0.5, None, 8, _exact_block_count(12, 0.5))
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(got_w, expected_w, rtol=1e-9, atol=1e-10)


def _block_scores(weights: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    scaler = torch.tensor(ref_scaler_row(x), dtype=F64)
    return [w.abs() * scaler.sqrt() for w in weights]


def _owl_blocks(seed: int) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    """Blocks of two linears reading the same input, one ten times larger: per-linear means would differ."""
    g = torch.Generator().manual_seed(seed)
    blocks, inputs = [], []
    for b in range(5):
        x = _correlated_inputs(3, 8, 16, seed=seed + b)
        x[..., b] *= 8.0  # an outlier feature, growing with b
        w1 = torch.randn(12, 16, generator=g, dtype=F64)
        w2 = torch.randn(20, 16, generator=g, dtype=F64) * 10.0
        w2[:, : 2 + b] *= 6.0
        blocks.append([w1, w2])
        inputs.append(x)
    return blocks, inputs


@pytest.mark.parametrize("target,lam", [(0.5, 0.08), (0.7, 0.08), (0.6, 0.2)])
def test_owl_matches_reference(target, lam):
    blocks, inputs = _owl_blocks(seed=22)
    scores = [_block_scores(ws, x) for ws, x in zip(blocks, inputs)]
    expected = ref_owl(scores, target, lam, hyper_m=5.0)
    ratios = [outlier_ratio(s, 5.0) for s in scores]
    assert len(set(ratios)) > 2  # the case spreads
    got = owl_sparsities(ratios, target, lam)
    assert got == pytest.approx(expected, abs=1e-12)
    assert sum(got) / len(got) == pytest.approx(target, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam, abs=1e-12)


def test_outlier_ratio_uses_one_mean_per_block():
    w_small = torch.full((1, 10), 1.0, dtype=F64)
    w_large = torch.full((1, 10), 100.0, dtype=F64)
    # joint mean 50.5: the ten 100s are above 1.5 x mean, the ones are not -> 10 of 20
    assert outlier_ratio([w_small, w_large], 1.5) == 0.5
    # one linear alone has no outliers at all
    assert outlier_ratio([w_large], 1.5) == 0.0
    with pytest.raises(ValueError, match="threshold"):
        outlier_ratio([w_small], 0.0)
    assert owl_sparsities([0.1, 0.1, 0.1], 0.5, 0.08) == [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="lambda"):
        owl_sparsities([0.1, 0.2], 0.5, 0.6)


def test_pipeline_outlier_ratio_matches_reference():
    blocks, inputs = _owl_blocks(seed=23)
    for weights, x in zip(blocks, inputs):
        stats = InputStats(16)
        for seq in x.float():
            stats.add_batch(seq)
        targets = [SimpleNamespace(name=f"l{i}", module=SimpleNamespace(weight=w.float()))
                   for i, w in enumerate(weights)]
        got = _outlier_ratio(targets, {t.name: stats for t in targets}, 5.0)
        assert got == pytest.approx(outlier_ratio(_block_scores(weights, x), 5.0), abs=1e-9)


def test_sparsegpt_refuses_an_explicit_scope():
    for scope in ("row", "matrix"):
        with pytest.raises(ValueError, match="scope.*sparsegpt.*allowed: auto"):
            PruneConfig(method="sparsegpt", scope=scope)
        with pytest.raises(ValueError, match="scope.*sparsegpt"):
            prune_model(torch.nn.Linear(4, 4), method="sparsegpt", scope=scope)  # before any model work
        assert PruneConfig(method="wanda", scope=scope).scope == scope
    assert PruneConfig(method="sparsegpt").scope == "auto"
