// AVX-512 BF16 tier: bf16 weights times bf16 inputs with VDPBF16PS (32 products a step, exact, summed in fp32
// pairs; inputs that are bf16 denormals count as zero, as the instruction does). Needs AVX512_BF16, BW and
// VBMI2 (16-bit expand). fp32 weights or inputs go to the AVX-512 tier.
// - packed 2:4: 64 inputs (32 stored values, 64 meta bits) a step; lane l of 32 gets column
//   4*(l/2) + ((bits >> 2l) & 3) (the 16-bit piece l/8 of the meta word, shifted by 2l mod 16), one two-source
//   16-bit permute of x picks the kept inputs, one VDPBF16PS;
// - bitmask: 32 inputs (32 mask bits) a step; the next 32 stored values go to their columns with one 16-bit
//   masked expand, one VDPBF16PS.
#if defined(__clang__)
#pragma clang attribute push(                                                                                  \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,avx2,fma,bmi,popcnt"))), \
    apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,avx2,fma,bmi,popcnt")
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12 on _mm512_undefined_* inside intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

#include "decode.h"

namespace vlmsparse_cpu {
namespace {

VLMSPARSE_INLINE __m512i load32(const uint16_t* p) { return _mm512_loadu_si512(p); }

VLMSPARSE_INLINE __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

template <int MB, int R, int U>
VLMSPARSE_INLINE void p24_step(const uint16_t* (&v)[R], const uint8_t* const (&meta)[R], const uint16_t* x,
                               int64_t k, int64_t k0, int u, __m512 (&acc)[R][MB][U]) {
  // lane l: 16-bit piece l / 8 of the 64 meta bits, shifted right by 2l mod 16; column base 4 * (l / 2).
  const __m512i piece = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                         1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i shift = _mm512_set_epi16(14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0,
                                         14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i base = _mm512_set_epi16(60, 60, 56, 56, 52, 52, 48, 48, 44, 44, 40, 40, 36, 36, 32, 32,
                                        28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  __m512i idx[R];
  __m512i val[R];
  for (int i = 0; i < R; ++i) {
    int64_t bits;
    std::memcpy(&bits, meta[i] + k0 / 8, sizeof(bits));
    const __m512i pieces = _mm512_permutexvar_epi16(piece, _mm512_set1_epi64(bits));
    const __m512i column = _mm512_and_si512(_mm512_srlv_epi16(pieces, shift), _mm512_set1_epi16(3));
    idx[i] = _mm512_add_epi16(column, base);
    val[i] = load32(v[i] + k0 / 2);
  }
  for (int m = 0; m < MB; ++m) {
    const __m512i x0 = load32(x + m * k + k0);
    const __m512i x1 = load32(x + m * k + k0 + 32);
    for (int i = 0; i < R; ++i) {
      acc[i][m][u] = dot_bf16(acc[i][m][u], _mm512_permutex2var_epi16(x0, idx[i], x1), val[i]);
    }
  }
}

template <int MB, int R, int U>
VLMSPARSE_INLINE void bitmask_step(const uint16_t* (&v)[R], const uint8_t* const (&meta)[R], const uint16_t* x,
                                   int64_t k, int64_t k0, int u, __m512 (&acc)[R][MB][U]) {
  __m512i val[R];
  for (int i = 0; i < R; ++i) {
    uint32_t bits;
    std::memcpy(&bits, meta[i] + k0 / 8, sizeof(bits));
    val[i] = _mm512_maskz_expand_epi16(static_cast<__mmask32>(bits), load32(v[i]));
    v[i] += popcount(bits);
  }
  for (int m = 0; m < MB; ++m) {
    const __m512i xm = load32(x + m * k + k0);
    for (int i = 0; i < R; ++i) acc[i][m][u] = dot_bf16(acc[i][m][u], xm, val[i]);
  }
}

struct Avx512Bf16 {
  using Vec = __m512;
  static constexpr int64_t kPackedInputs = 64, kBitmaskInputs = 32, kBitmaskDecodeInputs = 32;
  static constexpr bool kColumnPass = false;
  // Rows of x per block; weight rows per pass by format and for one row of x (decode) or more: the fastest of
  // 1, 2 and 4 (and 2x8, 1x16 blocks) measured side by side, 1 thread, thread CPU time, AMD EPYC (Zen 4).
  static constexpr int kDotRows = 4;
  static constexpr int rows(bool packed, bool decode) { return packed ? (decode ? 1 : 4) : (decode ? 2 : 4); }
  static VLMSPARSE_INLINE Vec zero() { return _mm512_setzero_ps(); }
  static VLMSPARSE_INLINE Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static VLMSPARSE_INLINE float sum(Vec v) { return _mm512_reduce_add_ps(v); }
  template <bool kPacked, typename V, typename X, int MB, int R, int U>
  static VLMSPARSE_INLINE void step(const V* (&v)[R], const uint8_t* const (&meta)[R], const X* x, int64_t k,
                                    int64_t k0, int u, Vec (&acc)[R][MB][U]) {
    if constexpr (kPacked) {
      p24_step<MB, R, U>(v, meta, x, k, k0, u, acc);
    } else {
      bitmask_step<MB, R, U>(v, meta, x, k, k0, u, acc);
    }
  }
};

}  // namespace

void rows_avx512bf16(const SparseWeight& w, const Input& in, const float* bias, float* y, int64_t row_begin,
                     int64_t row_end) {
  if (!w.values_bf16 || in.x_bf16 == nullptr) {
    rows_avx512(w, in, bias, y, row_begin, row_end);
    return;
  }
  tier_rows<Avx512Bf16>(w, static_cast<const uint16_t*>(w.values), in.x_bf16, in.m, bias, y, row_begin, row_end);
}

}  // namespace vlmsparse_cpu

#if defined(__clang__)
#pragma clang attribute pop
#endif
