// AVX2 + FMA tier (8 fp32 lanes).
//
// Small m (decode): one pass over each weight row per call, every step feeding all m rows of x:
// - packed 2:4: 16 inputs per step; the 16 meta bits of 4 groups give, lane l, the column 4*(l/2) + i
//   (a variable shift by 2l, no table); two in-lane permutes of x pick the kept inputs, one FMA.
// - bitmask: 8 inputs (one mask byte) per step; the next 8 stored values are expanded to their columns with
//   one permute (index table kExpand: rank of each set bit) and zeroed elsewhere, one FMA per row of x.
// Larger m: each weight row is decoded once into (value, column) pairs and multiplied into blocks of 16 rows
// of x transposed ([k, 16]): two FMAs per stored value and block, no work on pruned entries.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,bmi,popcnt"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,bmi,popcnt")
#endif

#include <immintrin.h>

#include "decode.h"

namespace vlmsparse_cpu {
namespace {

struct ExpandTable {
  alignas(64) uint8_t index[256][8];
  constexpr ExpandTable() : index{} {
    for (int byte = 0; byte < 256; ++byte) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        index[byte][j] = static_cast<uint8_t>(rank);
        if ((byte >> j) & 1) ++rank;
      }
    }
  }
};
constexpr ExpandTable kExpand{};

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename V, int MB>
void p24_dot(const SparseWeight& w, const V* values, const float* x, int64_t r, float* out) {
  const int64_t k = w.k;
  const V* v = values + r * (k / 2);
  const uint8_t* meta = w.meta + r * w.meta_stride;
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3);
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  int64_t kk = 0;
  for (; kk + 32 <= k; kk += 32) {
#pragma GCC unroll 2
    for (int u = 0; u < 2; ++u) {
      const int64_t k0 = kk + 16 * u;
      uint16_t bits;
      std::memcpy(&bits, meta + k0 / 8, sizeof(bits));
      const __m256i idx = _mm256_add_epi32(
          _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(bits), shifts), three), base);
      const __m256 val = load8(v + k0 / 2);
      for (int m = 0; m < MB; ++m) {
        const float* xm = x + m * k + k0;
        const __m256 sel = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xm), idx),
                                           _mm256_permutevar8x32_ps(_mm256_loadu_ps(xm + 8), idx), 0xF0);
        acc[m][u] = _mm256_fmadd_ps(sel, val, acc[m][u]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    out[m] = hsum(_mm256_add_ps(acc[m][0], acc[m][1])) + p24_dot_tail(v, meta, x + m * k, kk / 4, k / 4);
  }
}

template <typename V, int MB>
void bitmask_dot(const SparseWeight& w, const V* values, const float* x, int64_t r, float* out) {
  const int64_t k = w.k;
  const V* v = values + w.row_offsets[r];
  const uint8_t* meta = w.meta + r * w.meta_stride;
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  __m256 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  int64_t kk = 0;
  for (; kk + 16 <= k; kk += 16) {
#pragma GCC unroll 2
    for (int u = 0; u < 2; ++u) {
      const int64_t k0 = kk + 8 * u;
      const unsigned byte = meta[k0 / 8];
      const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kExpand.index[byte])));
      const __m256i set = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), lane_bit);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bit));
      const __m256 val = _mm256_and_ps(_mm256_permutevar8x32_ps(load8(v), perm), keep);
      v += popcount(byte);
      for (int m = 0; m < MB; ++m) acc[m][u] = _mm256_fmadd_ps(val, _mm256_loadu_ps(x + m * k + k0), acc[m][u]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    out[m] = hsum(_mm256_add_ps(acc[m][0], acc[m][1])) + bitmask_dot_tail(v, meta, x + m * k, kk, k);
  }
}

struct Avx2 {
  template <typename V, int MB>
  static void dot(const SparseWeight& w, const V* values, const float* x, int64_t r, float* out) {
    if (w.format == kPacked24) {
      p24_dot<V, MB>(w, values, x, r, out);
    } else {
      bitmask_dot<V, MB>(w, values, x, r, out);
    }
  }
};

}  // namespace

void rows_avx2(const SparseWeight& w, const Input& in, const float* bias, float* y, int64_t row_begin,
               int64_t row_end) {
  rows_for_tier<Avx2>(w, in, bias, y, row_begin, row_end);
}

}  // namespace vlmsparse_cpu

#if defined(__clang__)
#pragma clang attribute pop
#endif
