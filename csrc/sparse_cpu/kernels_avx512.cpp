// AVX-512 tier (F, BW, VL, DQ; 16 fp32 lanes). The same plan as the AVX2 tier, with twice the width:
// - packed 2:4: 32 inputs per step; lane l of the 32 meta bits gives column 4*(l/2) + ((bits >> 2l) & 3),
//   one two-source permute of x picks the kept inputs;
// - bitmask: 16 inputs (two mask bytes) per step; the next 16 stored values go to their columns with one
//   masked expand (no table);
// - larger m: decoded rows times blocks of 16 rows of x transposed, one FMA per stored value and block.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,popcnt"))), \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,popcnt")
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on _mm512_undefined_* inside intrinsics
#endif
#include <immintrin.h>

#include "decode.h"

namespace vlmsparse_cpu {
namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

template <typename V, int MB>
void p24_dot(const SparseWeight& w, const V* values, const float* x, int64_t r, float* out) {
  const int64_t k = w.k;
  const V* v = values + r * (k / 2);
  const uint8_t* meta = w.meta + r * w.meta_stride;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  __m512 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 64 <= k; kk += 64) {
#pragma GCC unroll 2
    for (int u = 0; u < 2; ++u) {
      const int64_t k0 = kk + 32 * u;
      uint32_t bits;
      std::memcpy(&bits, meta + k0 / 8, sizeof(bits));
      const __m512i idx = _mm512_add_epi32(
          _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(bits)), shifts), three), base);
      const __m512 val = load16(v + k0 / 2);
      for (int m = 0; m < MB; ++m) {
        const float* xm = x + m * k + k0;
        const __m512 sel = _mm512_permutex2var_ps(_mm512_loadu_ps(xm), idx, _mm512_loadu_ps(xm + 16));
        acc[m][u] = _mm512_fmadd_ps(sel, val, acc[m][u]);
      }
    }
  }
  for (int m = 0; m < MB; ++m) {
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) +
             p24_dot_tail(v, meta, x + m * k, kk / 4, k / 4);
  }
}

template <typename V, int MB>
void bitmask_dot(const SparseWeight& w, const V* values, const float* x, int64_t r, float* out) {
  const int64_t k = w.k;
  const V* v = values + w.row_offsets[r];
  const uint8_t* meta = w.meta + r * w.meta_stride;
  __m512 acc[MB][2];
  for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  int64_t kk = 0;
  for (; kk + 32 <= k; kk += 32) {
#pragma GCC unroll 2
    for (int u = 0; u < 2; ++u) {
      const int64_t k0 = kk + 16 * u;
      uint16_t bits;
      std::memcpy(&bits, meta + k0 / 8, sizeof(bits));
      const __m512 val = _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), load16(v));
      v += popcount(bits);
      for (int m = 0; m < MB; ++m) acc[m][u] = _mm512_fmadd_ps(val, _mm512_loadu_ps(x + m * k + k0), acc[m][u]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + bitmask_dot_tail(v, meta, x + m * k, kk, k);
  }
}

struct Avx512 {
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

void rows_avx512(const SparseWeight& w, const Input& in, const float* bias, float* y, int64_t row_begin,
                 int64_t row_end) {
  rows_for_tier<Avx512>(w, in, bias, y, row_begin, row_end);
}

}  // namespace vlmsparse_cpu

#if defined(__clang__)
#pragma clang attribute pop
#endif
