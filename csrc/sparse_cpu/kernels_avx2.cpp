// AVX2 + FMA tier (8 fp32 lanes).
//
// Small m (decode): one pass over each weight row per call, every step feeding all m rows of x:
// - packed 2:4: 16 inputs per step; the 16 meta bits of 4 groups give, lane l, the column 4*(l/2) + i
//   (a variable shift by 2l, no table); two in-lane permutes of x pick the kept inputs, one FMA.
// - bitmask: 8 inputs (one mask byte) per step; the next 8 stored values are expanded to their columns with
//   one permute (index table kExpand: rank of each set bit) and zeroed elsewhere, one FMA per row of x.
// Two weight rows per pass share each load of x; blocks of up to 4 rows of x share each weight vector.
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

// One step of the packed 2:4 row pass: 16 inputs (8 stored values) of R weight rows against MB rows of x.
template <typename V, int MB, int R, int U>
VLMSPARSE_INLINE void p24_step(const V* (&v)[R], const uint8_t* const (&meta)[R], const float* x, int64_t k,
                               int64_t k0, int u, __m256 (&acc)[R][MB][U]) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  __m256i idx[R];
  __m256 val[R];
  for (int i = 0; i < R; ++i) {
    uint16_t bits;
    std::memcpy(&bits, meta[i] + k0 / 8, sizeof(bits));
    const __m256i shifted = _mm256_srlv_epi32(_mm256_set1_epi32(bits), shifts);
    idx[i] = _mm256_add_epi32(_mm256_and_si256(shifted, _mm256_set1_epi32(3)), base);
    val[i] = load8(v[i] + k0 / 2);
  }
  for (int m = 0; m < MB; ++m) {
    const __m256 x0 = _mm256_loadu_ps(x + m * k + k0);
    const __m256 x1 = _mm256_loadu_ps(x + m * k + k0 + 8);
    for (int i = 0; i < R; ++i) {
      // lanes 0-3 pick from x0, lanes 4-7 from x1 (the permute reads the low 3 bits of idx).
      const __m256 sel =
          _mm256_blend_ps(_mm256_permutevar8x32_ps(x0, idx[i]), _mm256_permutevar8x32_ps(x1, idx[i]), 0xF0);
      acc[i][m][u] = _mm256_fmadd_ps(sel, val[i], acc[i][m][u]);
    }
  }
}

// One step of the bitmask row pass: 8 inputs (one mask byte) of R weight rows; advances the value pointers.
template <typename V, int MB, int R, int U>
VLMSPARSE_INLINE void bitmask_step(const V* (&v)[R], const uint8_t* const (&meta)[R], const float* x, int64_t k,
                                   int64_t k0, int u, __m256 (&acc)[R][MB][U]) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  __m256 val[R];
  for (int i = 0; i < R; ++i) {
    const unsigned byte = meta[i][k0 / 8];
    const __m128i ranks = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kExpand.index[byte]));
    const __m256i set = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(byte)), lane_bit);
    const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bit));
    val[i] = _mm256_and_ps(_mm256_permutevar8x32_ps(load8(v[i]), _mm256_cvtepu8_epi32(ranks)), keep);
    v[i] += popcount(byte);
  }
  for (int m = 0; m < MB; ++m) {
    const __m256 xm = _mm256_loadu_ps(x + m * k + k0);
    for (int i = 0; i < R; ++i) acc[i][m][u] = _mm256_fmadd_ps(val[i], xm, acc[i][m][u]);
  }
}

struct Avx2 {
  using Vec = __m256;
  static constexpr int64_t kPackedInputs = 16, kBitmaskInputs = 8;
  // Rows of x per block; weight rows per pass by format and for one row of x (decode) or more: the fastest of
  // 1, 2 and 4 (and 2x8, 1x16 blocks) measured side by side, 1 thread, thread CPU time, AMD EPYC (Zen 4).
  static constexpr int kDotRows = 4;
  static constexpr int rows(bool packed, bool decode) { return packed ? (decode ? 1 : 2) : (decode ? 1 : 2); }
  static VLMSPARSE_INLINE Vec zero() { return _mm256_setzero_ps(); }
  static VLMSPARSE_INLINE Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static VLMSPARSE_INLINE float sum(Vec v) { return hsum(v); }
  template <bool kPacked, typename V, typename X, int MB, int R, int U>
  static VLMSPARSE_INLINE void step(const V* (&v)[R], const uint8_t* const (&meta)[R], const X* x, int64_t k,
                                    int64_t k0, int u, Vec (&acc)[R][MB][U]) {
    if constexpr (kPacked) {
      p24_step<V, MB, R, U>(v, meta, x, k, k0, u, acc);
    } else {
      bitmask_step<V, MB, R, U>(v, meta, x, k, k0, u, acc);
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
