"""Shared Triton machinery of the SparseLoRA kernels (imported only by ``packed24.py`` / ``sparse_lora.py``).

One set of three kernels serves both weight storages, chosen by the constexpr ``PACKED``:

- ``PACKED=True``: ``w_ptr`` is the packed 2:4 ``values [N, K/2]``, ``m_ptr`` the uint8 ``meta [N, ceil(K/8)]``
  (see :mod:`vlmsparse.sparse24`); the keep-mask is the packed pattern.
- ``PACKED=False``: ``w_ptr`` is a dense-stored ``W [N, K]`` (any strides, stride 0 allowed), ``m_ptr`` the
  bool mask ``M [N, K]`` viewed as uint8.

Math (``x [T, K]``, ``A [R, K]``, ``B [N, R]``, ``s`` the LoRA scaling, ``W_eff = W*M + s*(B@A)*M``):

- forward  ``y = x @ W_eff.T + b``                                         (``_forward_kernel``)
- backward ``dX = dY @ W_eff``                                             (``_grad_input_kernel``)
           ``G = dY.T @ X``; ``dB = s * (G*M) @ A.T``; ``dA = s * B.T @ (G*M)``   (``_grad_lora_kernel``)

The effective weight is built tile by tile in registers: a ``[BLOCK_N, BLOCK_K]`` tile of ``W`` is
decompressed (or loaded and masked), the matching tile of ``B@A`` is one ``tl.dot`` over the rank
(``[BLOCK_N, R] @ [R, BLOCK_K]``), masked, added, and fed to the main dot. ``G`` is formed one
``[BLOCK_N, BLOCK_K]`` tile at a time (a loop over the tokens), masked and contracted with ``A`` and ``B``
at once; the tile-level partial sums of ``dA [R, K]`` / ``dB [N, R]`` are added into fp32 accumulators with
atomics, so the only extra memory is ``(N + K) * R`` floats and nothing of size ``N x K`` is written
(the summation order of the atomics, hence the last bits of ``dA`` / ``dB``, may vary between runs).

Decode (``T <= 16``) is memory bound: the forward uses narrow column tiles (``BLOCK_N = 16``, long K tiles)
for many programs per SM, and splits along K when N alone does not give enough (``SPLIT_K`` fp32 partial
sums, reduced in torch); each program streams its rows of ``values`` + ``meta`` (9/16 of the dense fp16 bytes)
once. The packed tile is loaded compactly (``[BLOCK_N, BLOCK_K/2]`` values, ``[BLOCK_N, BLOCK_K/8]`` meta
bytes) and expanded in registers with ``tl.join`` / ``tl.reshape``. The compiler does not pipeline loads that
feed register math, so the forward prefetches the raw tiles of step ``t + 1`` before computing step ``t``
(two tiles in flight per program). The default tiles compile without register spills for sm_90 (ptxas,
Triton 3.6 and 3.9; ``benchmarks/kernel_regs.py``).

Precision: fp32 inputs use full-precision dots (``input_precision="ieee"``, like torch's matmul without TF32);
fp16 / bf16 inputs use tensor-core dots with fp32 accumulation, the fp32 side products in TF32.

Interpreter notes (``TRITON_INTERPRET=1``): bf16 arithmetic is wrong there, so bf16 tiles are upcast to
fp32 right after loading (``UPCAST``), and its fp32 -> bf16 conversion truncates, so bf16 results are stored
as fp32 and rounded in torch; tiles are >= 16 so the same configs compile on a GPU.

Triton versions: 3.6 to 3.9 (every launcher config compiles for sm_90 with 3.6 and 3.9); two shims below
cover 3.6 (:func:`fix_interpreter_index`, ``OLD_TRITON_TRANS_FIX``).
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Every buffer a kernel fills completely is allocated through this name (tests poison it with NaN).
_empty = torch.empty


def fix_interpreter_index(interpreter) -> bool:
    """Make ``range(tensor)`` work in an old Triton interpreter under NumPy >= 2.4.

    Triton <= 3.6's interpreter (``triton.runtime.interpreter``) converts a scalar tensor to an int with
    ``int(data)`` on its 1-element array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars", triton-lang/triton#9171), so every loop with a runtime bound fails. This wraps
    the interpreter's tensor patching to use ``int(data.squeeze())``, as later Triton does. It changes nothing
    when the interpreter already does that. Returns whether it wrapped. Applied on import under
    ``TRITON_INTERPRET=1`` only (compiled kernels never call ``__index__``).
    """
    original = interpreter._patch_lang_tensor
    if getattr(original, "_vlmsparse_index_fix", False):
        return False
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        return False
    if "int(self.handle.data))" not in source:
        return False

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._vlmsparse_index_fix = True
    interpreter._patch_lang_tensor = patched
    return True


if _INTERPRET:
    from triton.runtime import interpreter as _interpreter

    fix_interpreter_index(_interpreter)


def _triton_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed Triton (``"3.7rc1"`` and ``"3.9.0+git..."`` included)."""
    major, minor = re.match(r"(\d+)\.(\d+)", triton.__version__).groups()
    return int(major), int(minor)


# Triton < 3.7 on sm_90 aborts in TritonGPUOptimizeDotOperands ("Illegal shared layout") when a dot operand is
# ``tl.trans`` of a ``tl.reshape(tl.join(...))`` tile, which is the packed forward without LoRA at
# BLOCK_M >= 64 (the LoRA and dense-stored paths end in a select and compile). With this flag the forward puts
# a select (``tl.where(valid, w, 0)``, a no-op on values) between the expansion and the transpose. Newer
# Triton gets the code as tuned, unchanged.
OLD_TRITON_TRANS_FIX = tl.constexpr(_triton_version() < (3, 7))


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= 16, got {value}")
        if self.block_k % 8:
            raise ValueError(f"TileConfig.block_k must be a multiple of 8, got {self.block_k}")
        if self.split_k < 1:
            raise ValueError(f"TileConfig.split_k must be >= 1, got {self.split_k}")


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: full fp32 for fp32 inputs (as torch's matmul without TF32), TF32 for the
    fp32 side products (``B@A`` tiles, ``(G*M) @ A.T``) of fp16 / bf16 inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2_at_least(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(max(int(n), 1)))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward_config(
    m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, packed: bool = True, lora: bool = False
) -> TileConfig:
    """Tiles for ``[m, k] @ [n, k].T``.

    Decode (``m <= 16``, memory bound): narrow column tiles so that there are many programs (>= 4 per SM, so
    that the last wave is a small part of the run), splitting along K when N alone does not give that many.
    The GPU tiles were chosen so that ptxas (sm_90, Triton 3.9) reports no register spills for each
    (packed, lora, dtype) variant with the forward's software prefetch; they are starting points, to be
    tuned with benchmarks/bench_linear.py on the GPU.
    """
    if _INTERPRET or device.type != "cuda":
        return TileConfig(min(_pow2_at_least(m), 64), 64, 64)
    if dtype == torch.float32:
        bm, bn, bk, warps = (16, 64, 32, 4) if m <= 16 else (64, 64, 32, 8)
    elif m <= 16:
        bm, warps = 16, 4
        bn, bk = {(True, False): (16, 256), (True, True): (32, 64), (False, False): (16, 128),
                  (False, True): (32, 32)}[(packed, lora)]
    elif m <= 64:
        bm, bn, bk, warps = {(True, False): (64, 64, 64, 4), (True, True): (32, 64, 32, 4),
                             (False, False): (64, 64, 64, 8), (False, True): (32, 64, 32, 4)}[(packed, lora)]
        bm = min(bm, _pow2_at_least(m))
    else:
        bm, bn, bk, warps = (128, 128, 32, 8) if packed else (128, 64, 32, 8)
    split = 1
    if m <= 16:
        programs = triton.cdiv(n, bn)
        k_tiles = triton.cdiv(k, bk)
        while programs * split < 4 * _num_sms(device) and split * 2 <= min(8, k_tiles // 4):
            split *= 2
    return TileConfig(bm, bn, bk, split_k=split, num_warps=warps, num_stages=3)


def backward_config(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, packed: bool = True) -> TileConfig:
    """Tiles of the two backward kernels (``dX`` over tiles of ``[m, k]``; ``G`` over tiles of ``[n, k]``)."""
    if _INTERPRET or device.type != "cuda":
        return TileConfig(min(_pow2_at_least(m), 64), 64, 64)
    if dtype == torch.float32:  # 4 warps: the dX kernel needs 255 registers and spills with Triton 3.6 (ptxas,
        # sm_90); 8 warps: 182-194, no spills with 3.6 or 3.9 (benchmarks/kernel_regs.py)
        return TileConfig(32, 32, 32, num_warps=8, num_stages=3)
    return TileConfig(64 if m > 32 else _pow2_at_least(m), 64, 64, num_warps=4 if packed else 8, num_stages=3)


def _constexprs(cfg: TileConfig, packed: bool, upcast: bool, precision: str, block_r: int) -> dict:
    """The constexprs common to the three kernels (each launcher and :func:`compile_for_target` pass these)."""
    return dict(PACKED=packed, UPCAST=upcast, PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, BLOCK_R=block_r)


def _lora_args(lora_A, lora_B, device):
    """Pointers, strides and the padded rank for the kernels (dummy 1-element tensors without LoRA)."""
    if lora_A is None:
        dummy = torch.zeros(1, 1, dtype=torch.float32, device=device)
        return dummy, dummy, 0, 16
    rank = lora_A.shape[0]
    return lora_A, lora_B, rank, _pow2_at_least(rank)


def fused_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    m: torch.Tensor,
    n: int,
    packed: bool,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scaling: float,
    bias: torch.Tensor | None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """``y [..., N] = x @ W_eff.T + b`` for ``x [..., K]`` (``W_eff`` per the module docstring)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    tokens = x2.shape[0]
    upcast = _INTERPRET and x.dtype == torch.bfloat16
    if tokens == 0:
        return x.new_empty(*x.shape[:-1], n)
    cfg = config or forward_config(tokens, n, k, x.dtype, x.device, packed, lora_A is not None)
    a, b, rank, block_r = _lora_args(lora_A, lora_B, x.device)
    split = cfg.split_k
    # Split K: fp32 partial sums [split, T, N], reduced in torch. The interpreter truncates fp32 -> bf16
    # (no round-to-nearest), so there bf16 results are stored as fp32 and rounded in torch.
    store = torch.float32 if upcast or split > 1 else x.dtype
    target = _empty(split, tokens, n, dtype=store, device=x.device)
    s_split, s_m, s_n = target.stride()
    grid = (triton.cdiv(tokens, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    _forward_kernel[grid](
        x2, w, m, a, b, bias.contiguous() if bias is not None else x2, target,  # the kernel reads bias[n]
        tokens, n, k, rank, float(scaling),
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), m.stride(0), m.stride(1),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), s_split, s_m, s_n,
        HAS_LORA=lora_A is not None, HAS_BIAS=bias is not None, SPLIT_K=split,
        **_constexprs(cfg, packed, upcast, _precision(x.dtype), block_r), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    out = target.sum(0) if split > 1 else target[0]  # the bias was added by split 0
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def fused_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    m: torch.Tensor,
    packed: bool,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    need_input_grad: bool,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``(dX [..., K] or None, dA [R, K], dB [N, R])`` for ``grad_out [..., N]``, ``x [..., K]``."""
    n, k = grad_out.shape[-1], x.shape[-1]
    dy, x2 = grad_out.reshape(-1, n), x.reshape(-1, k)
    if dy.dtype != x2.dtype:
        x2 = x2.to(dy.dtype)
    tokens = dy.shape[0]
    _, _, rank, block_r = _lora_args(lora_A, lora_B, dy.device)
    cfg = config or backward_config(tokens, n, k, dy.dtype, dy.device, packed)
    upcast = _INTERPRET and dy.dtype == torch.bfloat16
    consts = _constexprs(cfg, packed, upcast, _precision(dy.dtype), block_r)
    grad_x = None
    if need_input_grad:
        grad_x = _empty(tokens, k, dtype=torch.float32 if upcast else dy.dtype, device=dy.device)
        if tokens:
            grid = (triton.cdiv(tokens, cfg.block_m), triton.cdiv(k, cfg.block_k))
            _grad_input_kernel[grid](
                dy, w, m, lora_A, lora_B, grad_x,
                tokens, n, k, rank, float(scaling),
                dy.stride(0), dy.stride(1), w.stride(0), w.stride(1), m.stride(0), m.stride(1),
                lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
                grad_x.stride(0), grad_x.stride(1),
                **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        grad_x = grad_x.to(dy.dtype).reshape(*grad_out.shape[:-1], k)
    n_tiles, k_tiles = triton.cdiv(n, cfg.block_n), triton.cdiv(k, cfg.block_k)
    acc_a = torch.zeros(rank, k, dtype=torch.float32, device=dy.device)  # sums of atomic adds
    acc_b = torch.zeros(n, rank, dtype=torch.float32, device=dy.device)
    if tokens:
        _grad_lora_kernel[(n_tiles, k_tiles)](
            dy, x2, m, lora_A, lora_B, acc_a, acc_b,
            tokens, n, k, rank,
            dy.stride(0), dy.stride(1), x2.stride(0), x2.stride(1), m.stride(0), m.stride(1),
            lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            acc_a.stride(0), acc_a.stride(1), acc_b.stride(0), acc_b.stride(1),
            **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    grad_A = (acc_a * scaling).to(lora_A.dtype)
    grad_B = (acc_b * scaling).to(lora_B.dtype)
    return grad_x, grad_A, grad_B


# ---------------------------------------------------------------------------------------------- kernels
# Pointer arguments in the input dtype; every other pointer is fp32 (accumulators, A, B) or uint8 (m_ptr).
_WIDE_POINTERS = {"x_ptr", "w_ptr", "bias_ptr", "dy_ptr", "dx_ptr"}


def compile_for_target(kernel, dtype: str, cfg: TileConfig, packed: bool, lora: bool = True, bias: bool = True,
                       split: int = 1, target=None):
    """Compile one of this file's kernels ahead of time for a GPU target (default sm_90), without a GPU, with
    the constexprs a launcher would pass: ``dtype`` is ``fp32`` / ``fp16`` / ``bf16``. Returns Triton's
    compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata.shared``). For tests and tuning aids."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    constexprs = _constexprs(cfg, packed, False, "ieee" if dtype == "fp32" else "tf32", 16)
    if "HAS_LORA" in names:
        constexprs.update(HAS_LORA=lora, HAS_BIAS=bias, SPLIT_K=split)
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "m_ptr":
            signature[name] = "*u8"
        elif name == "y_ptr":
            signature[name] = "*fp32" if split > 1 else f"*{dtype}"
        elif name in _WIDE_POINTERS:
            signature[name] = f"*{dtype}"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        else:
            signature[name] = "fp32" if name == "scaling" else "i32"
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=target or GPUTarget("cuda", 90, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


@triton.jit
def _load_tile(ptr, rows, cols, n_rows, n_cols, stride_r, stride_c):
    """``ptr[rows, cols]`` as a ``[len(rows), len(cols)]`` tile in the stored dtype, zero outside
    ``[n_rows, n_cols]`` (``rows`` / ``cols`` are ``tl.arange`` offsets)."""
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _nibbles(m_ptr, offs_n, k0, N, K, stride_mn, stride_mk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Index pairs ``(i0, i1)`` ``[BLOCK_N, BLOCK_K/4]`` of the groups of a packed tile starting at column ``k0``
    (a compact ``[BLOCK_N, BLOCK_K/8]`` byte load, split into low / high nibbles in registers)."""
    offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    ok = (offs_n[:, None] < N) & (offs_b[None, :] < (K + 7) // 8)
    byte = tl.load(m_ptr + offs_n[:, None] * stride_mn + offs_b[None, :] * stride_mk, mask=ok, other=0).to(tl.int32)
    nib = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_K // 4))  # group g: byte g//2, low if even
    return nib & 3, nib >> 2


@triton.jit
def _expand4(t0, t1, t2, t3, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Interleave four ``[BLOCK_N, BLOCK_K/4]`` tiles (positions p = 0..3 of each group) into ``[BLOCK_N, BLOCK_K]``."""
    # join(a, b) adds a minor dim: [.., g, i, j] = (a if j == 0 else b)[.., g, i], so p = 2i + j
    return tl.reshape(tl.join(tl.join(t0, t2), tl.join(t1, t3)), (BLOCK_N, BLOCK_K))


@triton.jit
def _keep_tile(m_ptr, offs_n, k0, N, K, stride_mn, stride_mk, PACKED: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Bool keep-mask tile ``[BLOCK_N, BLOCK_K]`` at columns ``k0 ...`` (False outside the matrix)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    valid = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if PACKED:
        i0, i1 = _nibbles(m_ptr, offs_n, k0, N, K, stride_mn, stride_mk, BLOCK_N, BLOCK_K)
        keep = _expand4(((i0 == 0) | (i1 == 0)).to(tl.int8), ((i0 == 1) | (i1 == 1)).to(tl.int8),
                        ((i0 == 2) | (i1 == 2)).to(tl.int8), ((i0 == 3) | (i1 == 3)).to(tl.int8), BLOCK_N, BLOCK_K)
        keep = keep != 0
    else:
        keep = tl.load(m_ptr + offs_n[:, None] * stride_mn + offs_k[None, :] * stride_mk, mask=valid, other=0) != 0
    return keep & valid


@triton.jit
def _load_weight_raw(w_ptr, m_ptr, offs_n, k0, N, K, stride_wn, stride_wk, stride_mn, stride_mk,
                     PACKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The stored bytes of the weight tile at columns ``k0 ...`` as loaded: packed ``(values [BLOCK_N,
    BLOCK_K/2], meta bytes [BLOCK_N, BLOCK_K/8])`` (each stored byte once), or dense ``(W, M)`` tiles."""
    if PACKED:
        offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        v = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_v[None, :] * stride_wk,
                    mask=(offs_n[:, None] < N) & (offs_v[None, :] < K // 2), other=0.0)
        offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        byte = tl.load(m_ptr + offs_n[:, None] * stride_mn + offs_b[None, :] * stride_mk,
                       mask=(offs_n[:, None] < N) & (offs_b[None, :] < (K + 7) // 8), other=0)
        return v, byte
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        valid = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=valid, other=0.0)
        keep = tl.load(m_ptr + offs_n[:, None] * stride_mn + offs_k[None, :] * stride_mk, mask=valid, other=0)
        return w, keep


@triton.jit
def _expand_weight(raw_w, raw_m, offs_n, k0, N, K, PACKED: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """``(W*M tile [BLOCK_N, BLOCK_K] in the storage dtype, keep tile)`` from :func:`_load_weight_raw`'s tiles.

    Packed: the values are split into the first / second kept value of each group (``v0``, ``v1``) and
    expanded in registers: position ``p`` of group ``g`` holds ``v0`` if ``p == i0``, ``v1`` if ``p == i1``,
    else zero. (The keep tile is only computed when a caller uses it.)
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    valid = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if PACKED:
        byte = raw_m.to(tl.int32)
        nib = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, BLOCK_K // 4))  # group g: byte g//2, low if even
        i0 = nib & 3
        i1 = nib >> 2
        v0, v1 = tl.split(tl.reshape(raw_w, (BLOCK_N, BLOCK_K // 4, 2)))
        zero = tl.zeros_like(v0)
        w = _expand4(tl.where(i0 == 0, v0, tl.where(i1 == 0, v1, zero)),
                     tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero)),
                     tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero)),
                     tl.where(i0 == 3, v0, tl.where(i1 == 3, v1, zero)), BLOCK_N, BLOCK_K)
        keep = _expand4(((i0 == 0) | (i1 == 0)).to(tl.int8), ((i0 == 1) | (i1 == 1)).to(tl.int8),
                        ((i0 == 2) | (i1 == 2)).to(tl.int8), ((i0 == 3) | (i1 == 3)).to(tl.int8), BLOCK_N, BLOCK_K)
        return w, (keep != 0) & valid
    else:
        keep = (raw_m != 0) & valid
        return tl.where(keep, raw_w, tl.zeros_like(raw_w)), keep


@triton.jit
def _weight_tile(w_ptr, m_ptr, offs_n, k0, N, K, stride_wn, stride_wk, stride_mn, stride_mk,
                 PACKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(W*M tile [BLOCK_N, BLOCK_K] in the storage dtype, keep tile)`` at columns ``k0 ...``."""
    raw_w, raw_m = _load_weight_raw(w_ptr, m_ptr, offs_n, k0, N, K, stride_wn, stride_wk, stride_mn, stride_mk,
                                    PACKED, BLOCK_N, BLOCK_K)
    return _expand_weight(raw_w, raw_m, offs_n, k0, N, K, PACKED, BLOCK_N, BLOCK_K)


@triton.jit
def _effective_tile(w, keep, b_tile, a_ptr, offs_r, offs_k, R, K, stride_ar, stride_ak, scaling,
                    HAS_LORA: tl.constexpr, PRECISION: tl.constexpr):
    """``(W + s*(B@A)) * M`` for one tile, in fp32 when there is an adapter (else ``w`` as loaded)."""
    if HAS_LORA:
        a = _load_tile(a_ptr, offs_r, offs_k, R, K, stride_ar, stride_ak).to(tl.float32)
        ba = tl.dot(b_tile, a, input_precision=PRECISION)  # [BLOCK_N, BLOCK_R] @ [BLOCK_R, BLOCK_K]
        return tl.where(keep, w.to(tl.float32) + scaling * ba, 0.0)
    else:
        return w


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, m_ptr, a_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, scaling,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_mn, stride_mk,
    stride_ar, stride_ak, stride_bn, stride_br, stride_ys, stride_ym, stride_yn,
    PACKED: tl.constexpr, HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile over the K range of split ``program_id(2)``."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    b_tile = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    if HAS_LORA:
        b_tile = _load_tile(b_ptr, offs_n, offs_r, N, R, stride_bn, stride_br).to(tl.float32)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    start = pid_s * per_split
    end = tl.minimum(start + per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Software prefetch: the raw tiles of step t + 1 are requested before step t is computed, so that
    # two tiles per program are in flight (the compiler does not pipeline loads that feed register math).
    k_lim = tl.where(start < end, K, 0)
    offs_k = start * BLOCK_K + tl.arange(0, BLOCK_K)
    x_next = _load_tile(x_ptr, offs_m, offs_k, M, k_lim, stride_xm, stride_xk)
    w_next, m_next = _load_weight_raw(w_ptr, m_ptr, offs_n, start * BLOCK_K, N, k_lim, stride_wn, stride_wk,
                                      stride_mn, stride_mk, PACKED, BLOCK_N, BLOCK_K)
    for t in range(start, end):
        x = x_next
        raw_w = w_next
        raw_m = m_next
        k_lim = tl.where(t + 1 < end, K, 0)
        offs_k = (t + 1) * BLOCK_K + tl.arange(0, BLOCK_K)
        x_next = _load_tile(x_ptr, offs_m, offs_k, M, k_lim, stride_xm, stride_xk)
        w_next, m_next = _load_weight_raw(w_ptr, m_ptr, offs_n, (t + 1) * BLOCK_K, N, k_lim, stride_wn, stride_wk,
                                          stride_mn, stride_mk, PACKED, BLOCK_N, BLOCK_K)
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        w, keep = _expand_weight(raw_w, raw_m, offs_n, t * BLOCK_K, N, K, PACKED, BLOCK_N, BLOCK_K)
        w = _effective_tile(w, keep, b_tile, a_ptr, offs_r, offs_k, R, K, stride_ar, stride_ak, scaling, HAS_LORA,
                           PRECISION)
        if OLD_TRITON_TRANS_FIX and PACKED and not HAS_LORA:  # see OLD_TRITON_TRANS_FIX
            w = tl.where((offs_n[:, None] < N) & (offs_k[None, :] < K), w, tl.zeros_like(w))
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision=PRECISION)
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
    if HAS_BIAS:  # by the first K split only
        n_bias = tl.where(pid_s == 0, N, 0)
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < n_bias, other=0.0).to(tl.float32)[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y = y_ptr + pid_s * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grad_input_kernel(
    dy_ptr, w_ptr, m_ptr, a_ptr, b_ptr, dx_ptr,
    M, N, K, R, scaling,
    stride_dm, stride_dn, stride_wn, stride_wk, stride_mn, stride_mk,
    stride_ar, stride_ak, stride_bn, stride_br, stride_xm, stride_xk,
    PACKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_K]`` tile of ``dX = dY @ W_eff``, looping over N."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for t in range(0, tl.cdiv(N, BLOCK_N)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        dy = _load_tile(dy_ptr, offs_m, offs_n, M, N, stride_dm, stride_dn)
        w, keep = _weight_tile(w_ptr, m_ptr, offs_n, pid_k * BLOCK_K, N, K, stride_wn, stride_wk, stride_mn,
                               stride_mk, PACKED, BLOCK_N, BLOCK_K)
        b_tile = _load_tile(b_ptr, offs_n, offs_r, N, R, stride_bn, stride_br).to(tl.float32)
        w = _effective_tile(w, keep, b_tile, a_ptr, offs_r, offs_k, R, K, stride_ar, stride_ak, scaling, True,
                           PRECISION)
        if UPCAST:
            acc += tl.dot(dy.to(tl.float32), w, input_precision=PRECISION)
        else:
            acc += tl.dot(dy, w.to(dy.dtype), input_precision=PRECISION)
    out_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    dx = dx_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    tl.store(dx, acc.to(dx_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grad_lora_kernel(
    dy_ptr, x_ptr, m_ptr, a_ptr, b_ptr, pa_ptr, pb_ptr,
    M, N, K, R,
    stride_dm, stride_dn, stride_xm, stride_xk, stride_mn, stride_mk,
    stride_ar, stride_ak, stride_bn, stride_br,
    stride_pa_r, stride_pa_k, stride_pb_n, stride_pb_r,
    PACKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Tile ``(n, k)`` of ``G*M`` (a loop over the tokens, kept in registers), contracted at once:
    ``acc_b[n, :] += (G*M)[n, k] @ A[:, k].T`` and ``acc_a[:, k] += B[n, :].T @ (G*M)[n, k]`` (fp32 atomics)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t in range(0, tl.cdiv(M, BLOCK_M)):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        # Written out, not through _load_tile: with Triton 3.6 the inlined helper's debug labels cost this loop
        # 14 registers in ptxas (219 -> 233 for fp16 packed 64x64x64); the code is otherwise the same.
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        if UPCAST:
            g += tl.dot(tl.trans(dy.to(tl.float32)), x.to(tl.float32), input_precision=PRECISION)
        else:
            g += tl.dot(tl.trans(dy), x, input_precision=PRECISION)
    keep = _keep_tile(m_ptr, offs_n, pid_k * BLOCK_K, N, K, stride_mn, stride_mk, PACKED, BLOCK_N, BLOCK_K)
    g = tl.where(keep, g, 0.0)
    a = _load_tile(a_ptr, offs_r, offs_k, R, K, stride_ar, stride_ak).to(tl.float32)
    b = _load_tile(b_ptr, offs_n, offs_r, N, R, stride_bn, stride_br).to(tl.float32)
    part_b = tl.dot(g, tl.trans(a), input_precision=PRECISION)  # [BLOCK_N, BLOCK_R]
    part_a = tl.dot(tl.trans(b), g, input_precision=PRECISION)  # [BLOCK_R, BLOCK_K]
    pb = pb_ptr + offs_n[:, None] * stride_pb_n + offs_r[None, :] * stride_pb_r
    tl.atomic_add(pb, part_b, mask=(offs_n[:, None] < N) & (offs_r[None, :] < R))
    pa = pa_ptr + offs_r[:, None] * stride_pa_r + offs_k[None, :] * stride_pa_k
    tl.atomic_add(pa, part_a, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K))
