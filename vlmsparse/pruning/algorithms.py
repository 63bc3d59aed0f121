"""Per-layer pruning algorithms on tensors: magnitude, Wanda, SparseGPT (layer 3: depends on layer 0, and on layer
1's kernels ``cpu_gemm``, ``cpu`` (native) and ``obs`` (Triton)).

Every function takes a weight ``W`` ``[out, in]`` and returns ``(new_weight, keep_mask)``; the new weight has
the input's dtype and holds +0.0 at every pruned position (``torch.where``, never a multiplication by the
mask, which would give -0.0 for negative weights).

- magnitude: score ``|W_ij|``;
- Wanda: score ``|W_ij| * ||X_j||_2``; no weight update;
- SparseGPT: ``H = 2 X^T X / n + lambda I`` (``lambda`` = ``dampening`` x mean diag), ``U`` = upper Cholesky
  factor of ``H^-1``; columns in blocks of ``blocksize``; inside a block the pruned entries are those with the
  lowest ``w^2 / U_jj^2`` (per block, or per group of M for N:M) and each column's error
  ``e = (w - q) / U_jj`` is spread on the later columns: ``W[:, j:] -= e U[j, j:]`` (optimal brain surgeon).

Deliberate differences from the reference code (locuslab/wanda, IST-DASLab/sparsegpt), checked in
``tests/test_pruning_reference.py``:

- counts: a group of ``c`` entries prunes exactly ``round(c * s)`` (``num_pruned``); the reference Wanda prunes
  ``int(c * s)`` per row and the reference magnitude / SparseGPT prune ``int(c * s) + 1`` (``<=`` the sorted
  value at index ``int(c * s)``): 70% of a 64-input row prunes 45 here, 44 in the reference Wanda;
- ties: equal scores keep the lower index (the reference's stable sort prunes the lower index first);
- ``N:M`` keeps N of every M (the reference's ``prune_n`` is the number pruned); the same for 2:4 and 4:8;
- ``U`` comes from a recursion on GEMMs (:func:`_upper_inverse_factor`), not from the reference's
  cholesky -> cholesky_inverse -> cholesky: the same factor, rounded differently.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..kernels import cpu_gemm
from ..sparsity import (
    Selection,
    SparsityPattern,
    all_finite,
    build_mask,
    keep_top_dim0,
    num_pruned,
    parse_pattern,
)

__all__ = ["magnitude_prune", "wanda_prune", "sparsegpt_prune", "check_weight", "one_thread"]

log = logging.getLogger(__name__)


def check_weight(weight: torch.Tensor, pattern: SparsityPattern, name: str = "weight") -> None:
    """Raise ``ValueError`` for a weight that cannot be pruned to ``pattern`` (shape, NaN/inf, N:M divisibility)."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if not all_finite(weight):
        raise ValueError(f"{name}: weight holds {int((~torch.isfinite(weight)).sum())} NaN/inf values")
    if pattern.is_nm and weight.shape[1] % pattern.m:
        raise ValueError(
            f"{name}: {pattern} sparsity needs in-features divisible by {pattern.m}, got {weight.shape[1]}"
        )


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    """float64 for float64 weights (exact comparisons with a float64 reference), float32 for everything else."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _selection(scores: torch.Tensor) -> Selection | None:
    """The native CPU selection of the kept entries (``cpu.keep_top_rows``) where it runs ``scores`` (the
    extension built, CPU scores), else None (torch's, in :mod:`vlmsparse.sparsity`): the same mask either way.
    Wanda 50% on SmolLM2-135M, bf16, 2 threads, Intel Xeon: the 210 selections took 0.83 s with torch."""
    if scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    from ..kernels import cpu  # loads the extension: only once a CPU selection is asked for

    return cpu.keep_top_rows if cpu.native_available() else None


# The integer type of each float dtype's width: a weight times its mask as integers keeps a kept entry's bits and
# gives +0.0 for a pruned one (a float product would give -0.0 for negative ones). On the CPU, [1536, 576] bf16:
# torch.where 1.5 ms, the float product 0.46 ms, the integer one 0.11 ms (2 threads, Intel Xeon).
_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}


def _apply(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight where mask else +0.0, mask)``."""
    bits = _SAME_WIDTH_INT.get(weight.dtype)
    if bits is None:
        return torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)), mask
    return (weight.view(bits) * mask).view(weight.dtype), mask


def magnitude_prune(
    weight: torch.Tensor, pattern: str | float | SparsityPattern, scope: str = "row"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the largest ``|W|`` per row (``scope="row"``), per matrix, or per group of M (N:M).

    The reference magnitude baseline compares per matrix; ``PruneConfig(scope="auto")`` uses per row outside the
    vision encoder (Wanda's comparison group), ``scope="matrix"`` gives the reference's group."""
    pattern = parse_pattern(pattern)
    check_weight(weight, pattern)
    scores = weight.abs()
    return _apply(weight, build_mask(scores, pattern, scope, _selection(scores)))


def wanda_prune(
    weight: torch.Tensor, norm: torch.Tensor, pattern: str | float | SparsityPattern, scope: str = "row"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the largest ``|W_ij| * norm_j`` (``norm`` ``[in]``: the input features' L2 norms)."""
    pattern = parse_pattern(pattern)
    check_weight(weight, pattern)
    if norm.shape != (weight.shape[1],):
        raise ValueError(f"wanda: norm must have shape ({weight.shape[1]},), got {tuple(norm.shape)}")
    dtype = _work_dtype(weight)
    scores = weight.abs().to(dtype) * norm.to(weight.device, dtype).unsqueeze(0)
    return _apply(weight, build_mask(scores, pattern, scope, _selection(scores)))


def _inverse_cholesky(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; raises the dampening x10 (up to 5 times) if ``H`` is not
    positive definite, logging a warning each time."""
    diag_mean = float(hessian.diagonal().mean())
    damp = dampening
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(6):
        with _full_precision_matmuls():
            upper = _upper_inverse_factor(hessian + (damp * max(diag_mean, 1e-12)) * eye)
        if upper is not None and torch.isfinite(upper).all():
            return upper
        if attempt == 5:
            break
        log.warning("sparsegpt: Hessian not positive definite with dampening %g; retrying with %g", damp, damp * 10)
        damp *= 10
    raise ValueError(
        f"sparsegpt: Cholesky factorisation failed even with dampening {damp:g}; the calibration inputs are "
        "degenerate (too few tokens or NaN/inf)"
    )


@contextlib.contextmanager
def _full_precision_matmuls():
    """float32 matmuls in full precision inside, whatever the caller allowed with
    ``torch.set_float32_matmul_precision`` (TF32 on CUDA would put ~1e-3 errors into the factor's GEMMs)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# Matrices up to this size are factored by LAPACK, larger ones by the recursion. Measured (2 threads, float32,
# median of 7): the former chain cholesky -> cholesky_inverse -> cholesky took 6.6 / 75 / 826 ms at n = 576 /
# 1536 / 4096; the recursion with leaves of 128 takes 3.8 / 19 / 276 ms (oneDNN GEMMs), leaves of 512
# 3.5 / 21 / 288 ms.
FACTOR_LEAF = 128


def _upper_inverse_factor(h: torch.Tensor) -> torch.Tensor | None:
    """Upper triangular ``U`` with ``U^T U = h^-1``, for a symmetric ``h [n, n]``; None if ``h`` is not positive
    definite.

    With ``h = R R^T``, ``R`` upper triangular (the Cholesky factor of ``h`` with rows and columns reversed),
    ``U = R^-1``. Above :data:`FACTOR_LEAF`, on the split ``h = [[A, B], [B^T, D]]``: ``U22`` of ``D``;
    ``T = B U22^T``; ``U11`` of the Schur complement ``A - T T^T`` (= ``A - B D^-1 B^T``); ``U12 = -U11 T U22``.
    About 4/3 n^3 flops, nearly all of them in GEMMs (on the CPU through :func:`cpu_gemm.linear`)."""
    n = h.shape[0]
    if n <= FACTOR_LEAF:
        lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
        if int(info) != 0:
            return None
        eye = torch.eye(n, dtype=h.dtype, device=h.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
    top = n // 2
    u22 = _upper_inverse_factor(h[top:, top:])
    if u22 is None:
        return None
    t = cpu_gemm.linear(h[:top, top:], u22)  # B @ U22^T
    u11 = _upper_inverse_factor(h[:top, :top] - cpu_gemm.linear(t, t))
    if u11 is None:
        return None
    u = torch.zeros_like(h)
    u[:top, :top] = u11
    u[:top, top:] = -cpu_gemm.linear(cpu_gemm.linear(u11, t.T), u22.T)  # -U11 @ T @ U22
    u[top:, top:] = u22
    return u


@contextlib.contextmanager
def one_thread(device: torch.device):
    """Run CPU work on one thread. Used only for SparseGPT's per-column loop (a few ``[rows]`` / ``[<=128, rows]``
    ops per column), where intra-op threads cost more in hand-offs than they gain: measured on a shared 2-core
    CPU, a 2:4 column loop of a 1536 x 576 weight took 60 ms on one thread and 560 ms on two (576 x 1536: 120 ms
    either way). A speed choice, not a correctness one: results do not depend on the thread count beyond
    float rounding. Everything else (statistics, Wanda scores, Cholesky, the block GEMMs, the reconstruction
    error) runs on all threads. No-op on accelerators."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly the ``k`` lowest entries of ``scores`` (ties at the threshold: the lower flat index
    is pruned first). A selection (``kthvalue``), not a sort: about 7x faster on CPU."""
    flat = scores.reshape(-1)
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k <= 0:
        return out.reshape(scores.shape)
    if k >= flat.numel():
        return ~out.reshape(scores.shape)
    threshold = torch.kthvalue(flat, k).values
    below = flat < threshold
    out |= below
    need = k - int(below.sum())
    if need > 0:
        ties = torch.nonzero(flat == threshold).flatten()[:need]
        out[ties] = True
    return out.reshape(scores.shape)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: str | float | SparsityPattern,
    blocksize: int = 128,
    dampening: float = 0.01,
    segments: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on ``weight`` ``[out, in]`` with ``hessian`` ``[in, in]`` (``2 X^T X / n``).

    ``segments``: row counts of stacked weights that share the Hessian (e.g. q, k, v concatenated along the
    rows); unstructured selection is done per segment so each keeps exactly its own sparsity. Every segment
    prunes exactly ``round(rows * in * sparsity)`` entries: block ``[c0, c1)`` prunes
    ``round(rows*c1*s) - round(rows*c0*s)``.
    """
    pattern = parse_pattern(pattern)
    check_weight(weight, pattern)
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"sparsegpt: hessian must be [{cols}, {cols}], got {tuple(hessian.shape)}")
    if blocksize < 1:
        raise ValueError(f"sparsegpt: blocksize must be >= 1, got {blocksize}")
    if pattern.is_nm and blocksize % pattern.m:
        raise ValueError(f"sparsegpt: blocksize {blocksize} must be a multiple of M={pattern.m}")
    segments = list(segments) if segments is not None else [rows]
    if sum(segments) != rows or any(s < 1 for s in segments):
        raise ValueError(f"sparsegpt: segments {segments} must be positive and sum to the {rows} rows")
    if not torch.isfinite(hessian).all():
        raise ValueError("sparsegpt: Hessian holds NaN/inf values")

    device = weight.device
    dtype = _work_dtype(weight)
    W = weight.to(dtype).clone()
    H = hessian.to(device=device, dtype=dtype).clone()
    dead = H.diagonal() == 0  # inputs that are always zero: no information, no cross-terms
    H.diagonal()[dead] = 1.0
    # unlike the reference we do not zero W[:, dead]: an input silent in calibration may be live at inference,
    # and zeros outside the mask would break zeros(W') == ~mask; U has no off-diagonal terms there, so those
    # columns are neither updated nor spread error (the mask still chooses among them by w^2 / U_jj^2)
    U = _inverse_cholesky(H, dampening)
    del H

    bounds = [0]
    for s in segments:
        bounds.append(bounds[-1] + s)
    WT = W.T.contiguous()  # [in, out]: column j of W is the contiguous row WT[j]
    del W
    pruneT = _sparsegpt_columns(WT, U, pattern, blocksize, bounds)
    return _apply(WT.T.to(weight.dtype), ~pruneT.T)


def _sparsegpt_columns(
    WT: torch.Tensor, U: torch.Tensor, pattern: SparsityPattern, blocksize: int, bounds: list[int]
) -> torch.Tensor:
    """The OBS column loop of :func:`sparsegpt_prune` on the transposed weight ``WT`` ``[in, out]`` (float32/64,
    updated in place); returns the pruned positions ``[in, out]``. The column steps of a block run natively on the
    CPU (:func:`_native_columns`) or in one Triton kernel on CUDA (:func:`_triton_columns`) where they can, else in
    the Python loop :func:`_columns_of_block`. Working on rows of
    ``WT`` keeps every per-column update contiguous and, in the Python loop, one BLAS call (``addr_``:
    ``WT[j+1:] -= U[j, j+1:] outer err``) run on one thread (:func:`one_thread`). The GEMM of a block's error onto
    the later columns runs on all threads."""
    cols, rows = WT.shape
    device = WT.device
    pruneT = torch.zeros(cols, rows, dtype=torch.bool, device=device)
    nm = SparsityPattern.nm(pattern.n, pattern.m) if pattern.is_nm else None
    native = _native_columns(WT) if nm is None or nm.m <= NATIVE_MAX_M else None
    if native is None:
        native = _triton_columns(WT, nm.m if nm else 0, blocksize)
    for c0 in range(0, cols, blocksize):
        c1 = min(c0 + blocksize, cols)
        W1 = WT[c0:c1]  # a view: updated in place
        Err1 = torch.empty_like(W1)
        U1 = U[c0:c1, c0:c1]
        d1 = U1.diagonal()
        P1 = pruneT[c0:c1]
        if nm is None:
            scores = W1.square() / d1.square().unsqueeze(1)  # [count, rows]
            for r0, r1 in zip(bounds[:-1], bounds[1:]):
                n = r1 - r0
                k = num_pruned(n * c1, pattern.sparsity) - num_pruned(n * c0, pattern.sparsity)
                if k > 0:
                    P1[:, r0:r1] = _lowest(scores[:, r0:r1].T.contiguous(), k).T
        if native is not None:
            native(W1, Err1, P1, U1.contiguous(), nm.n if nm else 0, nm.m if nm else 0)
        else:
            # per column: err = w * E (E = pruned / d), q = w * K (K = kept); three kernels per column in all.
            # (q holds -0.0 where a negative weight was pruned; the caller's torch.where turns it into +0.0.)
            inv_d = d1.reciprocal().unsqueeze(1)
            E1 = P1.to(W1.dtype) * inv_d
            K1 = (~P1).to(W1.dtype)
            with one_thread(device):
                _columns_of_block(W1, Err1, U1, d1, P1, E1, K1, inv_d, nm)
        if c1 < cols:
            WT[c1:].addmm_(U[c0:c1, c1:].T, Err1, alpha=-1.0)
    return pruneT


NATIVE_MAX_M = 32  # the largest M of an N:M pattern the native column steps take (kObsMaxM in csrc/sparse_cpu)


def _native_columns(WT: torch.Tensor):
    """The native op for the column steps of a block (``csrc/sparse_cpu/obs.h``: the same steps as
    :func:`_columns_of_block`, rows split over all threads) for a CPU float32 / float64 ``WT`` when the extension
    is built, else None. Measured on SmolLM2-135M (2 CPU threads, SparseGPT 2:4, 30 blocks): the Python loop
    takes 11.3 s of the 19.5 s run, about 3 torch calls per column at ~35 us each."""
    if WT.device.type != "cpu" or WT.dtype not in (torch.float32, torch.float64):
        return None
    from ..kernels import cpu as native_cpu

    return torch.ops.vlmsparse_native.sparsegpt_columns if native_cpu.native_available() else None


def _triton_columns(WT: torch.Tensor, nm_m: int, blocksize: int):
    """The Triton kernel for the column steps of a block (:mod:`vlmsparse.kernels.obs`: the same steps, one launch
    per block instead of the Python loop's three per column) for a CUDA ``WT`` whose blocks it takes
    (:func:`~vlmsparse.kernels.obs.applies`), when Triton is installed; else None. Not yet timed on a GPU."""
    if WT.device.type != "cuda":
        return None
    try:
        from ..kernels import obs
    except ImportError:  # no triton
        return None
    return obs.sparsegpt_columns if obs.applies(WT.dtype, blocksize, nm_m) else None


def _columns_of_block(W1: torch.Tensor, Err1: torch.Tensor, U1: torch.Tensor, d1: torch.Tensor, P1: torch.Tensor,
                      E1: torch.Tensor, K1: torch.Tensor, inv_d: torch.Tensor, nm: SparsityPattern | None) -> None:
    """The per-column OBS steps inside one block of :func:`_sparsegpt_columns` (all tensors updated in place)."""
    count = W1.shape[0]
    for i in range(count):
        if nm is not None and i % nm.m == 0:
            g = slice(i, i + nm.m)
            group = W1[g].square() / d1[g].square().unsqueeze(1)  # [m, rows]
            P1[g] = ~keep_top_dim0(group, nm.n)
            E1[g] = P1[g].to(W1.dtype) * inv_d[g]
            K1[g] = (~P1[g]).to(W1.dtype)
        w = W1[i]
        err = torch.mul(w, E1[i], out=Err1[i])  # (w - q) / d: non-zero only where pruned
        w.mul_(K1[i])  # q
        if i + 1 < count:
            W1[i + 1 :].addr_(U1[i, i + 1 :], err, alpha=-1.0)
