// AVX-512 tier (F, BW, VL, DQ; 16 fp32 lanes). The same plan as the AVX2 tier, with twice the width:
// - packed 2:4: 32 inputs per step; lane l of the 32 meta bits gives column 4*(l/2) + ((bits >> 2l) & 3),
//   one two-source permute of x picks the kept inputs;
// - bitmask: 16 inputs (two mask bytes) per step; the next 16 stored values go to their columns with one
//   masked expand (no table);
// - two weight rows per pass share each load of x; blocks of up to 4 rows of x share each weight vector.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,popcnt"))), \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,popcnt")
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on _mm512_undefined_* inside intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"
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

// One step of the packed 2:4 row pass: 32 inputs (16 stored values) of R weight rows against MB rows of x.
template <typename V, int MB, int R, int U>
VLMSPARSE_INLINE void p24_step(const V* (&v)[R], const uint8_t* const (&meta)[R], const float* x, int64_t k,
                               int64_t k0, int u, __m512 (&acc)[R][MB][U]) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  __m512i idx[R];
  __m512 val[R];
  for (int i = 0; i < R; ++i) {
    uint32_t bits;
    std::memcpy(&bits, meta[i] + k0 / 8, sizeof(bits));
    const __m512i shifted = _mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(bits)), shifts);
    idx[i] = _mm512_add_epi32(_mm512_and_si512(shifted, _mm512_set1_epi32(3)), base);
    val[i] = load16(v[i] + k0 / 2);
  }
  for (int m = 0; m < MB; ++m) {
    const __m512 x0 = _mm512_loadu_ps(x + m * k + k0);
    const __m512 x1 = _mm512_loadu_ps(x + m * k + k0 + 16);
    for (int i = 0; i < R; ++i) {
      acc[i][m][u] = _mm512_fmadd_ps(_mm512_permutex2var_ps(x0, idx[i], x1), val[i], acc[i][m][u]);
    }
  }
}

// One step of the bitmask row pass: 16 inputs of R weight rows; advances each row's value pointer.
template <typename V, int MB, int R, int U>
VLMSPARSE_INLINE void bitmask_step(const V* (&v)[R], const uint8_t* const (&meta)[R], const float* x, int64_t k,
                                   int64_t k0, int u, __m512 (&acc)[R][MB][U]) {
  __m512 val[R];
  for (int i = 0; i < R; ++i) {
    uint16_t bits;
    std::memcpy(&bits, meta[i] + k0 / 8, sizeof(bits));
    val[i] = _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), load16(v[i]));
    v[i] += popcount(bits);
  }
  for (int m = 0; m < MB; ++m) {
    const __m512 xm = _mm512_loadu_ps(x + m * k + k0);
    for (int i = 0; i < R; ++i) acc[i][m][u] = _mm512_fmadd_ps(val[i], xm, acc[i][m][u]);
  }
}

struct Avx512 {
  using Vec = __m512;
  static constexpr int64_t kPackedInputs = 32, kBitmaskInputs = 16, kBitmaskDecodeInputs = 16;
  static constexpr bool kColumnPass = false;
  // Rows of x per block; weight rows per pass by format and for one row of x (decode) or more: the fastest of
  // 1, 2 and 4 (and 2x8, 1x16 blocks) measured side by side, 1 thread, thread CPU time, AMD EPYC (Zen 4).
  static constexpr int kDotRows = 4;
  static constexpr int rows(bool packed, bool decode) { return packed ? (decode ? 1 : 4) : (decode ? 4 : 4); }
  static VLMSPARSE_INLINE Vec zero() { return _mm512_setzero_ps(); }
  static VLMSPARSE_INLINE Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static VLMSPARSE_INLINE float sum(Vec v) { return _mm512_reduce_add_ps(v); }
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

void rows_avx512(const SparseWeight& w, const Input& in, const float* bias, float* y, int64_t row_begin,
                 int64_t row_end) {
  rows_for_tier<Avx512>(w, in, bias, y, row_begin, row_end);
}

}  // namespace vlmsparse_cpu

#if defined(__clang__)
#pragma clang attribute pop
#endif
