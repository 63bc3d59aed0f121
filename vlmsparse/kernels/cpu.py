"""Native CPU sparse matmuls (C++ in ``csrc/sparse_cpu``, built by ``pip install`` when a compiler is there).

Ops, in the torch.library namespace ``vlmsparse_native`` (defined in C++, fake implementations here):

- ``packed24_linear(x [..., in], values [out, in/2], meta [out, ceil(in/8)] uint8, bias [out]?) -> [..., out]``:
  ``y = x @ unpack24(values, meta).T + b`` (the packed 2:4 format of :mod:`vlmsparse.sparse24`);
- ``bitmask_linear(x, values, bitmask, row_offsets, bias?)``: the same for the bitmask format of
  :mod:`vlmsparse.bitmask` (unstructured sparsity).
- ``sparsegpt_columns(w!, err!, pruned!, u, n, m)``: SparseGPT's per-column OBS steps of one block of columns,
  in place (``csrc/sparse_cpu/obs.h``; called by :mod:`vlmsparse.pruning.algorithms`, whose Python loop is the
  fallback and the semantics).
- ``dense_to_packed24(weight [out, in], kept_pairs uint8 [256, 2]) -> (values, meta, bad groups)``: the packed
  2:4 form of a float32 / bfloat16 weight, each group's kept pair looked up in ``kept_pairs`` by its entries'
  priorities (:func:`vlmsparse.sparse24.pack24`'s table and rule, which is the fallback);
- ``keep_top_rows(scores [rows, cols] float32, keep) -> bool [rows, cols]``: the ``keep`` largest of each row
  (ties kept from the lowest index), one selection per row: the unstructured masks of Wanda and magnitude
  (:mod:`vlmsparse.pruning.algorithms`; :func:`vlmsparse.sparsity.build_mask`'s torch selection is the fallback and
  the semantics); rows of up to 8 entries (the groups of an N:M pattern) rank each entry by comparisons instead;
- ``column_square_sums(x [rows, cols]) -> float64 [cols]``: the sum of squares of each column (Wanda's input
  statistics, :class:`vlmsparse.pruning.InputStats`, whose torch sum is the fallback).

x and values are float32 or bfloat16 (the same dtype); arithmetic is fp32, the result has x's dtype. Each weight
row is read once per call and serves blocks of 4 rows of x (decode, small batches). One row of x (decode) has its
own passes: on the AVX2 tier for packed 2:4 (x arranged once per call so that in-lane permutes pick the kept
inputs) and bitmask weights (x packed to each weight row's stored entries, then a dense dot product), on the AVX-512
tiers for bitmask weights (bf16 ones on ``avx512bf16`` only: x compressed by each row's mask, then one dense dot
with the row's stored values). A column pass (x transposed into blocks of 8 or 16 rows, each stored weight one
broadcast times its column: no products with the pruned zeros) runs on the AVX2 tier from 8 rows of x (12 for
packed 2:4 bf16) and on the AVX-512 tiers for bitmask fp32 weights from 12 rows of x (16 rows a block).
Packed 2:4 bf16 on the avx512bf16 tier from 12 rows of x puts the rows of x in the vector lanes instead (one
VDPBF16PS per stored pair and 16 rows of x, the pairs of x looked up by the pair's 2-bit indices). The ``amx``
tier runs bf16 weights from 8 rows of x (packed 2:4) or 4 (bitmask) on AMX tiles: each panel of 16 weight rows
expanded to dense bf16 in L2, then TDPBF16PS against 16 rows of x at a time; fewer rows go to avx512bf16's paths.
Rows of x go to the kernels all at once while they fill at most 3/4 of L2, else in chunks of at most half of it
(each kernel re-reads its rows of x for every group of weight rows), and weight rows are split over torch's
intra-op threads. From :func:`dense_from_rows` rows of x on
(prefill: ``DENSE_FROM_ROWS`` by format and dtype: packed 2:4 1024 fp32 and 256 bf16, bitmask 2048 fp32 and 256
bf16; bf16 512 / 1024 on the amx tier and 4096 on tiers without AVX-512 BF16, whose bf16 GEMMs are slow),
:func:`packed24_matmul` and :func:`bitmask_matmul` instead run dense GEMMs (``packed24_linear_dense`` /
``bitmask_linear_dense``): the weight is expanded block by block of rows (about 16 MB each) into one buffer that
the call reuses, and each block is one ``addmm`` into its columns of y (bit for bit ``F.linear(x, dense W, b)``;
no full-size dense copy, no page faults of a fresh full-size allocation per call). ``packed24_to_dense`` /
``bitmask_to_dense`` give the whole dense weight. ISA tiers: ``scalar``, ``avx2`` (AVX2 + FMA), ``avx512`` (F,
BW, VL, DQ), ``avx512bf16`` (also AVX512_BF16 and VBMI2: bf16 weights times bf16 inputs with VDPBF16PS, exact
products summed in fp32; bf16 denormal inputs count as zero), ``amx`` (also AMX-TILE and AMX-BF16, with Linux's
permission for tile data): the best the CPU has, or ``$VLMSPARSE_CPU_ISA``, or :func:`set_isa`.

:func:`packed24_matmul` / :func:`bitmask_matmul` check their arguments in Python (clear ``ValueError``); the
``*_unchecked`` twins, which :mod:`vlmsparse.ops` runs after its own checks (or a module's at construction), skip
that (about 4 us per call on a 2-core CPU) and leave the checks to the C++ ops (``RuntimeError``).

When the extension is not built (no compiler at install time, ``VLMSPARSE_NATIVE=0``, not Linux),
:func:`native_available` is False and callers use the pure-torch twins in :mod:`vlmsparse.kernels.reference`.
"""

from __future__ import annotations

import importlib.util

import torch

from ..bitmask import BitmaskWeight
from ..sparse24 import Packed24
from .checks import check_bias, check_bitmask, check_features, check_packed

__all__ = [
    "NATIVE_DTYPES",
    "FORMATS",
    "DENSE_FROM_ROWS",
    "DENSE_FROM_ROWS_AMX",
    "DENSE_FROM_ROWS_BF16_WITHOUT_AVX512BF16",
    "BF16_TIERS",
    "dense_from_rows",
    "native_available",
    "unavailable_reason",
    "supports",
    "isa",
    "set_isa",
    "supported_isas",
    "packed24_matmul",
    "packed24_matmul_unchecked",
    "bitmask_matmul",
    "bitmask_matmul_unchecked",
]

NATIVE_DTYPES = (torch.float32, torch.bfloat16)
FORMATS = ("packed24", "bitmask")
# Rows of x from which the dense-GEMM path runs, by (format, dtype): DENSE_FROM_ROWS on every tier, but for bf16 on
# the amx tier DENSE_FROM_ROWS_AMX (the tiles keep up with torch's AMX GEMMs longer) and on the tiers without
# AVX-512 BF16 DENSE_FROM_ROWS_BF16_WITHOUT_AVX512BF16 (torch's bf16 GEMMs are slow there). Crossovers measured by
# benchmarks/bench_cpu.py --prefill (4096->11008, 1 thread, thread CPU time; row kernels vs dense path, ms):
# - Intel Xeon with AMX, 2026-12-07, after rows of x went in chunks of L2 (csrc/sparse_cpu/ops.cpp): packed
#   2:4 fp32 100 vs 116 at 128 rows, 209 vs 200 at 256, 430 vs 343 at 512, 908 vs 650 at 1024; 70% bitmask fp32 558
#   vs 655 at 1024, 1199 vs 1326 at 2048; amx tier: packed 2:4 bf16 37 vs 45 at 256, 78 vs 68 at 512; 70% bitmask
#   bf16 68 vs 73 at 512, 147 vs 122 at 1024.
# - AMD EPYC, 2026-12-07, before the chunks (its fp32 and avx512bf16 rows not re-measured since): packed 2:4 fp32
#   306 vs 466 at 512, 1185 vs 986 at 1024; 70% bitmask fp32 909 vs 1020 at 1024, 2898 vs 1991 at 2048; packed 2:4
#   bf16 32 vs 42 at 128, 64 vs 65 at 256, 146 vs 124 at 512; 70% bitmask bf16 45 vs 45 at 128, 123 vs 70 at 256.
# - AVX2 tier (bench_cpu.py --emulate-avx2 --prefill, AMD EPYC, load 5-6, 2026-12-06): fp32 crosses between 512
#   and 1024 rows (packed 2:4 471 vs 503 ms at 512, 1939 vs 1094 at 1024), bf16 above 2048 (no bf16 GEMM: packed
#   2:4 3974 vs 6625 ms at 2048).
# Packed 2:4 fp32 keeps 1024, where the AMD machine's rows won at 512, but 256 on the amx tier: on the Intel Xeon
# the dense path is faster from 256 rows (up to 1.4x at 1023), since its row pass is bound by one permute per
# product (one port; 2026-12-08, 2 threads, wall clock: 63 vs 62 ms at 128 rows, 120 vs 95 at 256, 255 vs 185 at
# 512). The tier stands for that CPU: the AMX CPUs measured are that one.
DENSE_FROM_ROWS = {("packed24", torch.float32): 1024, ("bitmask", torch.float32): 2048,
                   ("packed24", torch.bfloat16): 256, ("bitmask", torch.bfloat16): 256}
DENSE_FROM_ROWS_AMX = {("packed24", torch.bfloat16): 512, ("bitmask", torch.bfloat16): 1024,
                       ("packed24", torch.float32): 256}
DENSE_FROM_ROWS_BF16_WITHOUT_AVX512BF16 = 4096
BF16_TIERS = ("avx512bf16", "amx")  # the tiers that multiply bf16 weights by bf16 inputs as they are
_MODULE = "vlmsparse._native_cpu"


def _try_load() -> str:
    """Loads the extension; returns ``""`` on success, else why it is not there."""
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or spec.origin is None:
        return ("the extension vlmsparse._native_cpu is not built (reinstall with a C++ compiler and torch "
                "installed first: pip install -e .)")
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as error:
        return f"the extension {spec.origin} does not load: {error}"
    _register_fakes()
    return ""


def _register_fakes() -> None:
    """Shapes for torch.compile / meta tensors: ``[..., out]`` in x's dtype."""

    @torch.library.register_fake("vlmsparse_native::packed24_linear")
    def _(x, values, meta, bias):
        return x.new_empty((*x.shape[:-1], values.shape[0]))

    @torch.library.register_fake("vlmsparse_native::bitmask_linear")
    def _(x, values, bitmask, row_offsets, bias):
        return x.new_empty((*x.shape[:-1], bitmask.shape[0]))

    @torch.library.register_fake("vlmsparse_native::packed24_to_dense")
    def _(values, meta):
        return values.new_empty((values.shape[0], 2 * values.shape[1]))

    @torch.library.register_fake("vlmsparse_native::bitmask_to_dense")
    def _(values, bitmask, row_offsets, in_features):
        return values.new_empty((bitmask.shape[0], in_features))

    @torch.library.register_fake("vlmsparse_native::packed24_linear_dense")
    def _(x, values, meta, bias, block_rows=0):
        return x.new_empty((*x.shape[:-1], values.shape[0]))

    @torch.library.register_fake("vlmsparse_native::bitmask_linear_dense")
    def _(x, values, bitmask, row_offsets, bias, block_rows=0):
        return x.new_empty((*x.shape[:-1], bitmask.shape[0]))

    @torch.library.register_fake("vlmsparse_native::sparsegpt_columns")
    def _(w, err, pruned, u, n, m):  # in place: w, err, pruned
        return None

    @torch.library.register_fake("vlmsparse_native::keep_top_rows")
    def _(scores, keep):
        return scores.new_empty(scores.shape, dtype=torch.bool)

    @torch.library.register_fake("vlmsparse_native::column_square_sums")
    def _(x):
        return x.new_empty((x.shape[1],), dtype=torch.float64)

    @torch.library.register_fake("vlmsparse_native::dense_to_packed24")
    def _(weight, kept_pairs):
        rows, cols = weight.shape
        meta = weight.new_empty((rows, (cols + 7) // 8), dtype=torch.uint8)
        return weight.new_empty((rows, cols // 2)), meta, weight.new_empty((), dtype=torch.int64)


# Loaded when this module is imported (a prebuilt library, milliseconds; vlmsparse imports this module only
# when a sparse CPU path is asked for), so that code traced by torch.compile only reads the result.
_LOAD_RESULT = _try_load()


def _load() -> str:
    return _LOAD_RESULT


def native_available() -> bool:
    """Whether the native CPU kernels are built and loaded."""
    return _load() == ""


def unavailable_reason() -> str:
    """Why the native kernels are not available (``""`` when they are)."""
    return _load()


def supports(x: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the native kernels take these tensors: loaded, CPU, float32 / bfloat16, one dtype."""
    return (native_available() and x.device.type == "cpu" and values.device.type == "cpu"
            and x.dtype in NATIVE_DTYPES and values.dtype == x.dtype)


def _ops():
    reason = _load()
    if reason:
        raise RuntimeError(f"vlmsparse native CPU kernels: {reason}")
    return torch.ops.vlmsparse_native


# DENSE_FROM_ROWS for the tier in use, by (format, dtype) (set at load and by set_isa; read on every call)
_dense_from: dict[tuple[str, torch.dtype], int] = {}


def _set_dense_from(tier: str) -> None:
    _dense_from.clear()
    _dense_from.update(DENSE_FROM_ROWS)
    if tier == "amx":
        _dense_from.update(DENSE_FROM_ROWS_AMX)
    elif tier not in BF16_TIERS:
        for fmt in FORMATS:
            _dense_from[fmt, torch.bfloat16] = DENSE_FROM_ROWS_BF16_WITHOUT_AVX512BF16


def dense_from_rows(fmt: str, dtype: torch.dtype) -> int:
    """Rows of x from which :func:`packed24_matmul` (``fmt`` "packed24") / :func:`bitmask_matmul` ("bitmask") run
    the dense-GEMM path for ``dtype`` on the tier in use (``DENSE_FROM_ROWS``)."""
    if (fmt, dtype) not in _dense_from:
        raise ValueError(f"dense_from_rows: format must be one of {FORMATS} and dtype one of {NATIVE_DTYPES}, got "
                         f"{fmt!r}, {dtype}")
    return _dense_from[fmt, dtype]


def isa() -> str:
    """The ISA tier in use: ``scalar``, ``avx2``, ``avx512``, ``avx512bf16`` or ``amx``."""
    return _ops().isa()


def set_isa(name: str) -> str:
    """Use tier ``name`` from now on (process-wide); returns the previous one. Raises for a tier this CPU lacks."""
    previous = _ops().set_isa(name)
    _set_dense_from(name)
    return previous


_set_dense_from(isa() if native_available() else "scalar")


def supported_isas() -> list[str]:
    """The tiers this CPU (and build) can run, lowest first."""
    return list(_ops().supported_isas())


def _check(x: torch.Tensor, values: torch.Tensor, what: str) -> None:
    if x.dtype not in NATIVE_DTYPES or values.dtype != x.dtype:
        raise ValueError(f"{what}: x and values must both be float32 or both bfloat16, got {x.dtype} and "
                         f"{values.dtype}")
    if x.device.type != "cpu" or values.device.type != "cpu":
        raise ValueError(f"{what}: needs CPU tensors, got {x.device} and {values.device}")


def _dense_rows(fmt: str, x: torch.Tensor) -> bool:
    """Whether ``x [..., in]`` has :func:`dense_from_rows` rows or more (prefill: the dense-GEMM path)."""
    return x.dim() > 0 and x.numel() >= _dense_from[fmt, x.dtype] * x.shape[-1]


def packed24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y [..., out] = x [..., in] @ unpack24(values, meta).T + b`` with the native kernel (arguments checked)."""
    check_features(x, 2 * values.shape[-1], "packed24_matmul (native)")
    out_features = check_packed(values, meta, x.shape[-1], "packed24_matmul (native)")
    check_bias(bias, out_features, "packed24_matmul (native)")
    _check(x, values, "packed24_matmul (native)")
    return packed24_matmul_unchecked(x, values, meta, bias)


def packed24_matmul_unchecked(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`packed24_matmul` without the Python argument checks: what :mod:`vlmsparse.ops` runs, after its own
    checks or a module's checks at construction. The C++ op still refuses bad shapes, dtypes and devices
    (``RuntimeError`` naming the op)."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    # .default: the overload itself, ~1 us less per call than the overload packet (which picks one per call)
    if _dense_rows("packed24", x):
        return _ops().packed24_linear_dense.default(x, values, meta, bias)
    return _ops().packed24_linear.default(x, values, meta, bias)


def bitmask_matmul(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y [..., out] = x [..., in] @ W.T + b``, ``W`` in the bitmask format, with the native kernel (arguments
    checked)."""
    out_features = check_bitmask(values, bitmask, row_offsets, x.shape[-1], "bitmask_matmul (native)")
    check_bias(bias, out_features, "bitmask_matmul (native)")
    _check(x, values, "bitmask_matmul (native)")
    return bitmask_matmul_unchecked(x, values, bitmask, row_offsets, bias)


def bitmask_matmul_unchecked(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor,
                             row_offsets: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`bitmask_matmul` without the Python argument checks (see :func:`packed24_matmul_unchecked`; the C++
    op checks the row offsets against ``values`` on every call)."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if _dense_rows("bitmask", x):
        return _ops().bitmask_linear_dense.default(x, values, bitmask, row_offsets, bias)
    return _ops().bitmask_linear.default(x, values, bitmask, row_offsets, bias)


def unpack_weight(stored: Packed24 | BitmaskWeight) -> torch.Tensor:
    """The dense weight of a :class:`~vlmsparse.sparse24.Packed24` or :class:`~vlmsparse.bitmask.BitmaskWeight` of
    float32 / bfloat16 CPU tensors (shapes checked by the caller; the C++ ops check them too)."""
    if isinstance(stored, Packed24):
        return _ops().packed24_to_dense.default(stored.values, stored.meta)
    return _ops().bitmask_to_dense.default(stored.values, stored.bitmask, stored.row_offsets, stored.in_features)


def keep_top_rows(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask ``[rows, cols]`` of the ``keep`` largest entries of each row of ``scores`` (ties at the threshold
    kept from the lowest index), as :func:`vlmsparse.sparsity.build_mask`'s torch selection gives it; ``scores``
    float32 (other float dtypes are converted, exactly for bf16 / fp16) on the CPU, without NaN."""
    return _ops().keep_top_rows.default(scores.float(), keep)


def column_square_sums(x: torch.Tensor) -> torch.Tensor:
    """``sum_t x[t, j]^2``, float64 ``[cols]``, of a float32 / bfloat16 CPU ``x [rows, cols]`` (Wanda's input
    statistics; float32 partial sums over 64 rows, added in float64)."""
    return _ops().column_square_sums.default(x)


def pack24(weight: torch.Tensor, kept_pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(values, meta, groups with more than 2 non-zeros)`` of a float32 / bfloat16 CPU weight ``[out, in]``
    (``in % 4 == 0``); ``kept_pairs``: :func:`vlmsparse.sparse24.kept_pairs_table`."""
    values, meta, bad = _ops().dense_to_packed24.default(weight, kept_pairs)
    return values, meta, int(bad)
