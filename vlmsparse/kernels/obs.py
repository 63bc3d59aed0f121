"""Triton: SparseGPT's per-column OBS steps inside one block of columns, for CUDA tensors.

The same steps as the native CPU op (``csrc/sparse_cpu/obs.h``) and the Python loop
(:func:`vlmsparse.pruning.algorithms._columns_of_block`), which are the semantics. On the block's columns as rows
of the transposed weight, ``W [count, rows]``, with ``U [count, count]`` the block of the upper Cholesky factor of
``H^-1`` and ``d = U[i, i]``, per column ``i``:

- N:M, at the first column of each group of ``M``: pruned = the ``M - N`` lowest of ``w^2 / d^2`` in the group (a
  tie goes to the lower column: it is kept first);
- ``err = w * (1 / d)`` where pruned, else 0; ``w = 0`` where pruned;
- ``w_j -= U[i, j] * err`` for every later column ``j`` of the block.

Every step is independent per weight row: each program holds a ``[COUNT, BLOCK_R]`` tile of the block (all its
columns, ``BLOCK_R`` rows) in registers for the whole block, so the Python loop's three kernel launches per column
become one launch per block. Column ``i`` of the tile is read by a masked sum over the tile (no dynamic register
indexing in Triton). The pruned flags (given for unstructured, chosen here for N:M), ``err`` and the updated
block are stored at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# imported for its effect: under TRITON_INTERPRET=1 it lets Triton <= 3.6's interpreter run loops with a runtime
# bound (fix_interpreter_index); the column loop here is one
from . import _fused  # noqa: F401

__all__ = ["sparsegpt_columns", "applies", "MAX_COUNT", "MAX_M", "BLOCK_R", "NUM_WARPS"]

MAX_COUNT = 128  # columns per block held in registers (SparseGPT's default block size)
MAX_M = 8  # the largest M of an N:M pattern (2:4, 4:8); wider groups take the Python loop
BLOCK_R = 32  # weight rows per program
# ptxas (sm_90a, Triton 3.9, no GPU needed), registers / spill stores, unstructured and 2:4: 4 warps 255 / 0 and
# 255 / 840 B; 8 warps 168 / 0 and 255 / 0 (16 rows: 122 / 0 and 163 / 0). Speed not measured yet.
NUM_WARPS = 8


def applies(dtype: torch.dtype, count: int, nm_m: int) -> bool:
    """Whether :func:`sparsegpt_columns` takes blocks of ``count`` columns: float32, at most :data:`MAX_COUNT`
    columns, N:M groups of at most :data:`MAX_M` (0: unstructured)."""
    return dtype == torch.float32 and count <= MAX_COUNT and nm_m <= MAX_M


def sparsegpt_columns(w: torch.Tensor, err: torch.Tensor, pruned: torch.Tensor, u: torch.Tensor, nm_n: int,
                      nm_m: int) -> None:
    """The column steps of one block, in place: ``w [count, rows]`` float32 contiguous (updated), ``err`` (out, the
    same shape), ``pruned [count, rows]`` bool (unstructured ``nm_m == 0``: the given choice; N:M: out), ``u
    [count, count]`` contiguous. The signature of the native op ``vlmsparse_native.sparsegpt_columns``."""
    count, rows = w.shape
    if not applies(w.dtype, count, nm_m):
        raise ValueError(f"sparsegpt_columns (Triton): float32 blocks of at most {MAX_COUNT} columns and N:M groups "
                         f"of at most {MAX_M}, got {w.dtype}, {count} columns, M={nm_m}")
    if nm_m and count % nm_m:
        raise ValueError(f"sparsegpt_columns: {count} columns are not whole groups of M={nm_m}")
    if count == 0 or rows == 0:
        return
    flags = pruned.view(torch.uint8)
    _obs_block_kernel[(triton.cdiv(rows, BLOCK_R),)](
        w, err, flags, u, count, rows, nm_n,
        COUNT=max(16, triton.next_power_of_2(count)), M=nm_m, BLOCK_R=BLOCK_R, num_warps=NUM_WARPS,
    )


def compile_for_target(nm_m: int, target=None):
    """Compile the kernel ahead of time for a GPU target (default sm_90) without a GPU (tests)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"w_ptr": "*fp32", "err_ptr": "*fp32", "p_ptr": "*u8", "u_ptr": "*fp32", "count": "i32",
                 "rows": "i32", "nm_n": "i32"}
    constexprs = {"COUNT": MAX_COUNT, "M": nm_m, "BLOCK_R": BLOCK_R}
    signature.update({name: "constexpr" for name in constexprs})
    return triton.compile(ASTSource(fn=_obs_block_kernel, signature=signature, constexprs=constexprs),
                          target=target or GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS})


@triton.jit
def _obs_block_kernel(w_ptr, err_ptr, p_ptr, u_ptr, count, rows, nm_n,
                      COUNT: tl.constexpr, M: tl.constexpr, BLOCK_R: tl.constexpr):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ci = tl.arange(0, COUNT)
    inside = (ci[:, None] < count) & (rr[None, :] < rows)
    offsets = ci[:, None] * rows + rr[None, :]
    tile = tl.load(w_ptr + offsets, mask=inside, other=0.0)
    if M == 0:
        pruned = tl.load(p_ptr + offsets, mask=inside, other=0) != 0
    else:
        pruned = tl.zeros([COUNT, BLOCK_R], dtype=tl.int1)
    errs = tl.zeros([COUNT, BLOCK_R], dtype=tl.float32)
    for i in range(0, count):
        if M != 0:
            if i % M == 0:
                # score of each entry of the group; rank = how many entries of the group beat it
                group = (ci >= i) & (ci < i + M)
                diag = tl.load(u_ptr + ci * count + ci, mask=group, other=1.0)
                scores = tile * tile / (diag * diag)[:, None]
                rank = tl.zeros([COUNT, BLOCK_R], dtype=tl.int32)
                for j in tl.static_range(M):
                    d_j = tl.load(u_ptr + (i + j) * count + (i + j))
                    w_j = tl.sum(tl.where((ci == i + j)[:, None], tile, 0.0), axis=0)
                    s_j = w_j * w_j / (d_j * d_j)
                    beats = tl.where((ci < i + j)[:, None], s_j[None, :] > scores, s_j[None, :] >= scores)
                    rank += (beats & (ci != i + j)[:, None]).to(tl.int32)
                pruned = tl.where(group[:, None], rank >= nm_n, pruned)
        column = ci == i
        w_i = tl.sum(tl.where(column[:, None], tile, 0.0), axis=0)
        p_i = tl.sum(tl.where(column[:, None] & pruned, 1, 0), axis=0) != 0
        inv_d = 1.0 / tl.load(u_ptr + i * count + i)
        err = tl.where(p_i, w_i * inv_d, 0.0)
        errs = tl.where(column[:, None], err[None, :], errs)
        tile = tl.where(column[:, None] & p_i[None, :], 0.0, tile)
        u_row = tl.load(u_ptr + i * count + ci, mask=(ci > i) & (ci < count), other=0.0)
        tile = tile - u_row[:, None] * err[None, :]
    tl.store(w_ptr + offsets, tile, mask=inside)
    tl.store(err_ptr + offsets, errs, mask=inside)
    if M != 0:
        tl.store(p_ptr + offsets, pruned.to(tl.uint8), mask=inside)
