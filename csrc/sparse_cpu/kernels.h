// Sparse linear kernels for CPUs: y[M, N] = x[M, K] @ W[N, K]^T + bias, W stored sparse.
//
// Formats (the same as vlmsparse/sparse24.py and vlmsparse/masks.py):
// - packed 2:4: values [N, K/2] (fp32 or bf16), meta [N, ceil(K/8)] uint8; group g of 4 inputs keeps
//   columns 4g+i0 and 4g+i1 (i0 < i1), nibble i0 | i1 << 2, group g in byte g/2, low nibble when g is even;
//   values [r, 2g], [r, 2g+1] are W[r, 4g+i0], W[r, 4g+i1].
// - bitmask: bitmask [N, ceil(K/8)] uint8 (bit j of byte b is column 8b+j), values 1-D: the kept entries in
//   row-major order, row r starting at row_offsets[r]; the values buffer holds at least 32 entries more than
//   row_offsets[N] (read, never used), so vector loads never leave it.
//
// This header is plain C++ (no torch, no std templates): each ISA tier is its own translation unit compiled
// for its instruction set, and nothing inline may be shared between tiers (the linker could otherwise pick an
// AVX-512 copy of an inline function for the scalar path).
#pragma once
#include <cstddef>
#include <cstdint>

namespace vlmsparse_cpu {

enum Format : int { kPacked24 = 0, kBitmask = 1 };

struct SparseWeight {
  int format;                 // Format
  int64_t n, k;               // out_features, in_features
  const void* values;         // fp32 or bf16 (uint16 bits)
  bool values_bf16;
  const uint8_t* meta;        // packed 2:4 meta or bitmask, [n, meta_stride]
  int64_t meta_stride;        // ceil(k / 8)
  const int64_t* row_offsets; // bitmask only: [n + 1]
};

// The input of one call: x [m, k] fp32, row-major; for the bf16 dot-product tier also x as bf16 bits (else
// null).
struct Input {
  const float* x;
  const uint16_t* x_bf16;
  int64_t m;
};

constexpr int64_t kBitmaskPadding = 32;  // entries after the last stored value (vector loads of up to 32 bf16)

// A scratch buffer of `bytes` for a kernel (aligned to `align` bytes when align > 0; released with free()), or
// null when there is no memory for it, or while refuse_buffers(true) holds: a test hook, so that every kernel that
// needs one takes its fallback (the row pass, which needs none). Defined in ops.cpp.
void* kernel_buffer(size_t bytes, size_t align = 0);
// Sets the hook; returns how many buffers were refused since the last call.
int64_t refuse_buffers(bool refuse);

// Computes y[:, r] for r in [row_begin, row_end): y [m, n] fp32 row-major, bias [n] fp32 or null.
using RowsFn = void (*)(const SparseWeight&, const Input&, const float* bias, float* y, int64_t row_begin,
                        int64_t row_end);

// SparseGPT's OBS column steps for one block of columns (obs.h): the block's columns of the weight as rows of
// its transpose, [count, rows], float32 or float64 (fp64), row-major.
constexpr int64_t kObsMaxM = 32;  // the largest M of an N:M pattern

struct ObsBlock {
  void* w;             // [count, rows]: updated in place (pruned entries become 0)
  void* err;           // [count, rows]: out, (w - q) / d per column, 0 where kept
  bool* pruned;        // [count, rows]: unstructured (nm_m == 0): the given choice; N:M: out, chosen per group
  const void* u;       // [count, count]: this block of the upper Cholesky factor of H^-1
  int64_t count, rows;
  int64_t nm_n, nm_m;  // keep n of every m columns; 0, 0: unstructured
  bool fp64;
};

// Runs the block on weight rows [row_begin, row_end).
using ObsFn = void (*)(const ObsBlock&, int64_t row_begin, int64_t row_end);

void obs_scalar(const ObsBlock&, int64_t, int64_t);
void obs_avx2(const ObsBlock&, int64_t, int64_t);
void obs_avx512(const ObsBlock&, int64_t, int64_t);

void rows_scalar(const SparseWeight&, const Input&, const float*, float*, int64_t, int64_t);
void rows_avx2(const SparseWeight&, const Input&, const float*, float*, int64_t, int64_t);
void rows_avx512(const SparseWeight&, const Input&, const float*, float*, int64_t, int64_t);
void rows_avx512bf16(const SparseWeight&, const Input&, const float*, float*, int64_t, int64_t);
void rows_amx(const SparseWeight&, const Input&, const float*, float*, int64_t, int64_t);

}  // namespace vlmsparse_cpu
