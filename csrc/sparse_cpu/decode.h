// Scalar helpers every tier includes. Everything here has internal linkage (static inline / anonymous
// namespace), so each tier's translation unit keeps its own copy compiled for its own instruction set.
#pragma once
#include <stdlib.h>  // free (a C function: nothing inline shared between tiers)

#include <cstring>

#include "kernels.h"

#define VLMSPARSE_INLINE inline __attribute__((always_inline))

namespace vlmsparse_cpu {
namespace {

inline float bf16_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &word, sizeof(out));
  return out;
}

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }

// Tail of a packed 2:4 row dot product: groups [g_begin, k/4) of row `v`/`meta` against x.
template <typename V, typename X>
inline float p24_dot_tail(const V* v, const uint8_t* meta, const X* x, int64_t g_begin, int64_t groups) {
  float sum = 0.0f;
  for (int64_t g = g_begin; g < groups; ++g) {
    const int nibble = (meta[g >> 1] >> ((g & 1) * 4)) & 0xF;
    sum += load1(v + 2 * g) * load1(x + 4 * g + (nibble & 3)) + load1(v + 2 * g + 1) * load1(x + 4 * g + (nibble >> 2));
  }
  return sum;
}

// Tail of a bitmask row dot product: columns [col_begin, k), `v` the row's next stored value.
template <typename V, typename X>
inline float bitmask_dot_tail(const V* v, const uint8_t* meta, const X* x, int64_t col_begin, int64_t k) {
  float sum = 0.0f;
  for (int64_t col = col_begin; col < k; ++col) {
    if ((meta[col >> 3] >> (col & 7)) & 1) sum += load1(v++) * load1(x + col);
  }
  return sum;
}

inline int popcount(unsigned bits) { return __builtin_popcount(bits); }

}  // namespace
}  // namespace vlmsparse_cpu

namespace vlmsparse_cpu {
namespace {

// One pass over R weight rows (r, r+1, ...) against MB rows of x [., k], in steps of the tier's width: each load
// of x serves R rows, each weight vector MB rows; U = 2 accumulators per pair for one row of x (decode: two
// independent chains per row, measured faster) or where R * MB alone gives too few independent FMA chains.
// out[i * MB + m]. A tier provides `Vec`, `zero`, `add`, `sum` (horizontal), the inputs per step of each format
// (kPackedInputs; kBitmaskInputs, kBitmaskDecodeInputs for one row of x),
// `step<kPacked, V, X, MB, R, U>`, kDotRows (rows of x per block) and rows(packed, decode) (weight rows per pass).
template <class Tier, bool kPacked, typename V, typename X, int MB, int R>
void row_pass(const SparseWeight& w, const V* values, const X* x, int64_t r, float* out) {
  using Vec = typename Tier::Vec;
  constexpr int U = MB > 1 && R * MB >= 4 ? 1 : 2;
  constexpr int64_t S = kPacked ? Tier::kPackedInputs : MB == 1 ? Tier::kBitmaskDecodeInputs : Tier::kBitmaskInputs;
  const int64_t k = w.k;
  const V* v[R];
  const uint8_t* meta[R];
  for (int i = 0; i < R; ++i) {
    v[i] = kPacked ? values + (r + i) * (k / 2) : values + w.row_offsets[r + i];
    meta[i] = w.meta + (r + i) * w.meta_stride;
  }
  Vec acc[R][MB][U];
  for (int i = 0; i < R; ++i)
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < U; ++u) acc[i][m][u] = Tier::zero();
  int64_t kk = 0;
  for (; kk + S * U <= k; kk += S * U) {
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u) Tier::template step<kPacked, V, X, MB, R, U>(v, meta, x, k, kk + S * u, u, acc);
  }
  if (U == 2 && kk + S <= k) {
    Tier::template step<kPacked, V, X, MB, R, U>(v, meta, x, k, kk, 0, acc);
    kk += S;
  }
  for (int i = 0; i < R; ++i) {
    for (int m = 0; m < MB; ++m) {
      Vec total = acc[i][m][0];
      for (int u = 1; u < U; ++u) total = Tier::add(total, acc[i][m][u]);
      const float tail = kPacked ? p24_dot_tail(v[i], meta[i], x + m * k, kk / 4, k / 4)
                                 : bitmask_dot_tail(v[i], meta[i], x + m * k, kk, k);
      out[i * MB + m] = Tier::sum(total) + tail;
    }
  }
}

// One row pass for R weight rows from r and `block` (1 <= block <= MB) rows of x.
template <class Tier, bool kPacked, typename V, typename X, int R, int MB>
inline void dot_block(const SparseWeight& w, const V* values, const X* x, int64_t r, int64_t block, float* out) {
  if constexpr (MB > 1) {
    if (block < MB) {
      dot_block<Tier, kPacked, V, X, R, MB - 1>(w, values, x, r, block, out);
      return;
    }
  }
  row_pass<Tier, kPacked, V, X, MB, R>(w, values, x, r, out);
}

// The row loop of a vector tier: weight rows in groups of R (each load of x serves the group), each group read
// once per block of up to Tier::kDotRows rows of x (the group stays in L1 between blocks); the last rows that
// make no full group one at a time.
template <class Tier, bool kPacked, int R, typename V, typename X>
void group_rows(const SparseWeight& w, const V* values, const X* x, int64_t m, const float* bias, float* y,
                int64_t row_begin, int64_t row_end) {
  constexpr int kBlock = Tier::kDotRows;
  const int64_t n = w.n, k = w.k;
  float out[R * kBlock];
  for (int64_t r = row_begin; r < row_end;) {
    const int rows = r + R <= row_end ? R : 1;
    for (int64_t m0 = 0; m0 < m; m0 += kBlock) {
      const int64_t block = m - m0 < kBlock ? m - m0 : kBlock;
      if (rows == R) {
        dot_block<Tier, kPacked, V, X, R, kBlock>(w, values, x + m0 * k, r, block, out);
      } else {
        dot_block<Tier, kPacked, V, X, 1, kBlock>(w, values, x + m0 * k, r, block, out);
      }
      for (int i = 0; i < rows; ++i) {
        const float b = bias ? bias[r + i] : 0.0f;
        for (int64_t j = 0; j < block; ++j) y[(m0 + j) * n + r + i] = out[i * block + j] + b;
      }
    }
    r += rows;
  }
}

// Column pass, for several rows of x (rows of x in the vector lanes): x [m, k] is transposed into blocks of
// L = NV * Tier::kLanes rows, xt[block][col][L] (rows past m zero), and each stored weight w[r, col] is one
// broadcast times the L inputs of its column: NV FMAs, every product used (the row pass above multiplies the
// pruned zeros too, or permutes x once per weight row and row of x). Per panel of kPanelRows weight rows, each
// row is decoded once (Tier::decode: the column offsets col * L of its stored entries, in order, and their values
// as fp32) and then walked once per block of x, in chunks of kChunkCols columns with the panel's rows innermost,
// so that the chunk of xt (kChunk * L floats) stays in L1 for all of them. Each row's entries of a chunk are
// summed in U independent chains, the chains and then the chunks added in order. U and kChunk (a multiple of 64)
// are template parameters: by default 8 (NV = 1) or 4 and kChunkCols; the AVX-512 tier passes its own. Returns
// false (nothing written) when its buffers cannot be allocated.
constexpr int64_t kPanelRows = 8;
constexpr int64_t kChunkCols = 256;  // a multiple of 64 (whole 64-bit words of bitmask)

template <class Tier, typename V, int NV, int U = (NV == 1 ? 8 : 4), int64_t kChunk = kChunkCols>
bool column_rows(const SparseWeight& w, const V* values, const float* x, int64_t m, const float* bias, float* y,
                 int64_t row_begin, int64_t row_end) {
  using Vec = typename Tier::Vec;
  constexpr int64_t L = NV * Tier::kLanes;
  const int64_t n = w.n, k = w.k;
  const int64_t blocks = (m + L - 1) / L, chunks = (k + kChunk - 1) / kChunk;
  // xt and cols 64-byte aligned, so that no load of a column's L lanes splits a cache line. Unaligned (as malloc
  // returned them), 70% bitmask fp32, 4096->11008, 256 rows of x, 1 thread: 124 ms on the first calls, 200-219 ms
  // once malloc's blocks had moved; aligned 124-150 ms on every call.
  float* xt = static_cast<float*>(kernel_buffer(sizeof(float) * blocks * k * L, 64));
  int32_t* cols = static_cast<int32_t*>(kernel_buffer(sizeof(int32_t) * kPanelRows * (k + 2 * Tier::kLanes), 64));
  float* vals = static_cast<float*>(kernel_buffer(sizeof(float) * kPanelRows * (k + 2 * Tier::kLanes)));
  int64_t* starts = static_cast<int64_t*>(kernel_buffer(sizeof(int64_t) * kPanelRows * (chunks + 1)));
  if (xt == nullptr || cols == nullptr || vals == nullptr || starts == nullptr) {
    free(starts);
    free(vals);
    free(cols);
    free(xt);
    return false;
  }
  alignas(64) float tile[kPanelRows][L];
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t j = 0; j < L; ++j) {
      const int64_t row = b * L + j;
      float* out = xt + b * k * L + j;
      if (row < m) {
        const float* in = x + row * k;
        for (int64_t c = 0; c < k; ++c) out[c * L] = in[c];
      } else {
        for (int64_t c = 0; c < k; ++c) out[c * L] = 0.0f;
      }
    }
  }
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kPanelRows) {
    const int64_t rows = row_end - r0 < kPanelRows ? row_end - r0 : kPanelRows;
    const float* row_vals[kPanelRows];
    for (int64_t i = 0; i < rows; ++i) {
      int32_t* row_cols = cols + i * (k + 2 * Tier::kLanes);
      row_vals[i] = Tier::decode(w, values, r0 + i, L, row_cols, vals + i * (k + 2 * Tier::kLanes));
      // entries of row i before chunk c: starts[i * (chunks + 1) + c]
      int64_t* start = starts + i * (chunks + 1);
      const uint8_t* meta = w.meta + (r0 + i) * w.meta_stride;
      start[0] = 0;
      for (int64_t c = 1; c < chunks; ++c) {  // every chunk but the last is whole bytes within k
        if (w.format == kPacked24) {
          start[c] = c * (kChunk / 2);
        } else {
          int64_t count = 0;
          for (int64_t q = 0; q < kChunk / 64; ++q) {
            uint64_t word;
            std::memcpy(&word, meta + (c - 1) * (kChunk / 8) + 8 * q, sizeof(word));
            count += __builtin_popcountll(word);
          }
          start[c] = start[c - 1] + count;
        }
      }
      start[chunks] = w.format == kPacked24 ? k / 2 : w.row_offsets[r0 + i + 1] - w.row_offsets[r0 + i];
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const float* xb = xt + b * k * L;
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < L; ++j) tile[i][j] = 0.0f;
      for (int64_t c = 0; c < chunks; ++c) {
        for (int64_t i = 0; i < rows; ++i) {
          const int32_t* row_cols = cols + i * (k + 2 * Tier::kLanes);
          const float* v = row_vals[i];
          const int64_t* start = starts + i * (chunks + 1);
          Vec acc[U][NV];
          for (int u = 0; u < U; ++u)
            for (int q = 0; q < NV; ++q) acc[u][q] = Tier::zero();
          int64_t e = start[c];
          const int64_t end = start[c + 1];
          for (; e + U <= end; e += U) {
#pragma GCC unroll 8
            for (int u = 0; u < U; ++u) {
              const Vec wv = Tier::bcast(v + e + u);
              const float* xc = xb + row_cols[e + u];
              for (int q = 0; q < NV; ++q) acc[u][q] = Tier::fma(wv, Tier::load(xc + q * Tier::kLanes), acc[u][q]);
            }
          }
          for (; e < end; ++e) {
            const Vec wv = Tier::bcast(v + e);
            const float* xc = xb + row_cols[e];
            for (int q = 0; q < NV; ++q) acc[0][q] = Tier::fma(wv, Tier::load(xc + q * Tier::kLanes), acc[0][q]);
          }
          for (int q = 0; q < NV; ++q) {
            Vec total = acc[0][q];
            for (int u = 1; u < U; ++u) total = Tier::add(total, acc[u][q]);
            float* t = tile[i] + q * Tier::kLanes;
            Tier::store(t, Tier::add(Tier::load(t), total));
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float bi = bias ? bias[r0 + i] : 0.0f;
        for (int64_t j = 0; j < L && b * L + j < m; ++j) y[(b * L + j) * n + r0 + i] = tile[i][j] + bi;
      }
    }
  }
  free(starts);
  free(vals);
  free(cols);
  free(xt);
  return true;
}

// The rows [row_begin, row_end) of y for the weight's format, with the tier's group size for one row of x
// (decode) or more (Tier::rows(packed, decode)). x [m, k] is fp32 (X = float) or, for the bf16 dot-product
// tier, bf16 bits (X = uint16_t).
template <class Tier, typename V, typename X>
void tier_rows(const SparseWeight& w, const V* values, const X* x, int64_t m, const float* bias, float* y,
               int64_t row_begin, int64_t row_end) {
  const bool decode = m == 1;
  if constexpr (Tier::kColumnPass && sizeof(X) == sizeof(float)) {
    if (m >= Tier::column_from_rows(w.format == kPacked24, sizeof(V) == 2)) {
      const bool done = m <= Tier::kLanes ? column_rows<Tier, V, 1>(w, values, x, m, bias, y, row_begin, row_end)
                                          : column_rows<Tier, V, 2>(w, values, x, m, bias, y, row_begin, row_end);
      if (done) return;  // else (no memory for its buffers) the row pass
    }
  }
  if (w.format == kPacked24) {
    decode ? group_rows<Tier, true, Tier::rows(true, true)>(w, values, x, m, bias, y, row_begin, row_end)
           : group_rows<Tier, true, Tier::rows(true, false)>(w, values, x, m, bias, y, row_begin, row_end);
  } else {
    decode ? group_rows<Tier, false, Tier::rows(false, true)>(w, values, x, m, bias, y, row_begin, row_end)
           : group_rows<Tier, false, Tier::rows(false, false)>(w, values, x, m, bias, y, row_begin, row_end);
  }
}

template <class Tier>
void rows_for_tier(const SparseWeight& w, const Input& in, const float* bias, float* y, int64_t row_begin,
                   int64_t row_end) {
  if (w.values_bf16) {
    tier_rows<Tier>(w, static_cast<const uint16_t*>(w.values), in.x, in.m, bias, y, row_begin, row_end);
  } else {
    tier_rows<Tier>(w, static_cast<const float*>(w.values), in.x, in.m, bias, y, row_begin, row_end);
  }
}

}  // namespace
}  // namespace vlmsparse_cpu
