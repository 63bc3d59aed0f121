"""SparseGPT's column steps as a Triton kernel (vlmsparse.kernels.obs) under TRITON_INTERPRET=1, run through
sparsegpt_prune in place of the native op, against the Python loop (the semantics)."""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close_to_reference

import vlmsparse.pruning.algorithms as algorithms
from vlmsparse.pruning import sparsegpt_prune
from vlmsparse.sparsity import satisfies_nm

pytestmark = pytest.mark.interpret


def _triton_and_python(weight, hessian, pattern, monkeypatch, segments=None):
    """``(triton, python)``: sparsegpt_prune with the Triton column steps (forced on the CPU tensors, which the
    interpreter runs), and with the Python loop."""
    from vlmsparse.kernels import obs

    with monkeypatch.context() as patch:
        patch.setattr(algorithms, "_native_columns", lambda WT: None)
        python = sparsegpt_prune(weight, hessian, pattern, blocksize=64, segments=segments)
        patch.setattr(algorithms, "_triton_columns", lambda WT, nm_m, blocksize: obs.sparsegpt_columns)
        triton = sparsegpt_prune(weight, hessian, pattern, blocksize=64, segments=segments)
    return triton, python


@pytest.mark.parametrize("pattern,segments", [("2:4", None), ("4:8", None), (0.5, [17, 23]), (0.7, None)])
def test_triton_column_steps_equal_the_python_loop(pattern, segments, monkeypatch):
    """The same masks as the Python loop (float32 and float64) and weights within the table against the float64
    loop. 130 input columns (blocks of 64, 64 and 2) for unstructured, 128 for N:M; 40 rows: a full program of
    32 rows and a partial one."""
    generator = torch.Generator().manual_seed(3)
    in_features = 128 if isinstance(pattern, str) else 130
    weight = torch.randn(40, in_features, generator=generator, dtype=torch.float64)
    x = torch.randn(400, in_features, generator=generator, dtype=torch.float64)
    hessian = 2 * x.T @ x / 400
    with monkeypatch.context() as patch:
        patch.setattr(algorithms, "_native_columns", lambda WT: None)
        exact, exact_keep = sparsegpt_prune(weight, hessian, pattern, blocksize=64, segments=segments)
    (w32, keep32), (p32, pkeep32) = _triton_and_python(weight.float(), hessian.float(), pattern, monkeypatch,
                                                      segments)
    assert torch.equal(keep32, pkeep32) and torch.equal(keep32, exact_keep)
    assert_close_to_reference(w32, p32, exact)
    assert torch.equal(w32 == 0, ~keep32)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_triton_nm_ties_go_to_the_lower_column(n, m, monkeypatch):
    """Equal scores in an N:M group (integer weights, identity Hessian): the lower columns are kept first, as the
    Python loop's keep_top_dim0."""
    weight = torch.randint(-2, 3, (36, 2 * m)).float()
    (w, keep), (pw, pkeep) = _triton_and_python(weight, torch.eye(2 * m), f"{n}:{m}", monkeypatch)
    assert torch.equal(keep, pkeep) and torch.equal(w, pw)
    assert satisfies_nm(keep, n, m)


def test_triton_column_steps_refuse_what_they_do_not_hold():
    from vlmsparse.kernels import obs

    w = torch.zeros(8, 4)
    with pytest.raises(ValueError, match="float32 blocks of at most 128 columns"):
        obs.sparsegpt_columns(w.double(), w.double(), torch.zeros(8, 4, dtype=torch.bool), torch.eye(8).double(), 0, 0)
    with pytest.raises(ValueError, match="M=16"):
        obs.sparsegpt_columns(torch.zeros(16, 4), torch.zeros(16, 4), torch.zeros(16, 4, dtype=torch.bool),
                              torch.eye(16), 8, 16)
    with pytest.raises(ValueError, match="not whole groups"):
        obs.sparsegpt_columns(torch.zeros(6, 4), torch.zeros(6, 4), torch.zeros(6, 4, dtype=torch.bool),
                              torch.eye(6), 2, 4)
