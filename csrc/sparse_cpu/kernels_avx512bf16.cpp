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

// One row of x, bitmask (decode): instead of expanding each weight row's stored values to their columns (a 16-bit
// expand per 32 inputs, then a load of values whose address waits on the mask's popcounts), x is compressed by the
// row's mask into `buf`, kRowPiece inputs at a time (one 16-bit compress per 32 inputs, reading only the mask and
// x), and the piece's stored values are then one contiguous dense dot with it (VDPBF16PS on 32 stored values a
// step, none pruned), prefetched kPrefetch values ahead. Same products (exact) and fp32 sums as the expand, in
// another order. The expand path read its weight at 6.7 GB/s (the loads wait on the popcounts); this one at ~15
// (4096->4096). Measured: see
// Avx512Bf16::kCompressDecode.
constexpr int64_t kPrefetch = 1024;  // values (2 KiB) ahead: 70% bitmask bf16, M = 1, 1 thread, thread CPU time,
// load 1.7-2.6, against 512: 11008->4096 2.70-2.76 -> 2.40-2.44 ms, 4096->11008 2.05-2.06 -> 2.07-2.10, 4096->4096
// 0.80 -> 0.82-0.89 (2048: 2.25-2.34, 2.16-2.19, 0.80-0.85)
constexpr int64_t kRowPiece = 2048;  // inputs compressed, then dotted, at a time (a 4 KiB buffer):
// measured against whole rows (1 thread, thread CPU time, 70% bitmask bf16, M = 1, load 3.3-3.7): 11008->4096
// 2.95-4.17 -> 2.72-2.77 ms, 4096->4096 0.81 -> 0.72-0.83 (1024 inputs: 2.65-2.69 and 0.83-0.98)

VLMSPARSE_INLINE float bitmask_compressed_row(const uint16_t* v, const uint8_t* meta, const uint16_t* x, int64_t k,
                                              uint16_t* buf) {
  for (int64_t p = 0; p < kPrefetch; p += 32) _mm_prefetch(reinterpret_cast<const char*>(v + p), _MM_HINT_T0);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < k; c0 += kRowPiece) {
    const int64_t c1 = k - c0 < kRowPiece ? k : c0 + kRowPiece;
    int64_t count = 0, kk = c0;
    for (; kk + 32 <= c1; kk += 32) {
      uint32_t bits;
      std::memcpy(&bits, meta + kk / 8, sizeof(bits));
      _mm512_storeu_si512(buf + count, _mm512_maskz_compress_epi16(static_cast<__mmask32>(bits), load32(x + kk)));
      count += popcount(bits);
    }
    if (kk < c1) {  // the last 1-31 inputs: mask bits past k dropped, x not read past k
      const int rest = static_cast<int>(c1 - kk);
      uint32_t bits = 0;
      std::memcpy(&bits, meta + kk / 8, static_cast<size_t>((rest + 7) / 8));
      const uint32_t lanes = (1u << rest) - 1;
      bits &= lanes;
      const __m512i xm = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(lanes), x + kk);
      _mm512_storeu_si512(buf + count, _mm512_maskz_compress_epi16(static_cast<__mmask32>(bits), xm));
      count += popcount(bits);
    }
    int64_t e = 0;
    for (; e + 64 <= count; e += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(v + e + kPrefetch), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v + e + kPrefetch + 32), _MM_HINT_T0);
      acc0 = dot_bf16(acc0, load32(buf + e), load32(v + e));
      acc1 = dot_bf16(acc1, load32(buf + e + 32), load32(v + e + 32));
    }
    for (; e < count; e += 32) {
      const __mmask32 lanes = count - e >= 32 ? ~0u : (1u << (count - e)) - 1;
      acc0 = dot_bf16(acc0, _mm512_maskz_loadu_epi16(lanes, buf + e), _mm512_maskz_loadu_epi16(lanes, v + e));
    }
    v += count;
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// The rows [row_begin, row_end) for one row of x, bitmask bf16 (bitmask_compressed_row). False (nothing written)
// when its buffer cannot be allocated.
bool bitmask_decode_rows(const SparseWeight& w, const uint16_t* values, const uint16_t* x, const float* bias,
                         float* y, int64_t row_begin, int64_t row_end) {
  uint16_t* buf = static_cast<uint16_t*>(malloc(sizeof(uint16_t) * (kRowPiece + 32)));
  if (buf == nullptr) return false;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float dot = bitmask_compressed_row(values + w.row_offsets[r], w.meta + r * w.meta_stride, x, w.k, buf);
    y[r] = dot + (bias ? bias[r] : 0.0f);
  }
  free(buf);
  return true;
}

struct Avx512Bf16 {
  using Vec = __m512;
  static constexpr int64_t kPackedInputs = 64, kBitmaskInputs = 32, kBitmaskDecodeInputs = 32;
  static constexpr bool kColumnPass = false;
  // Bitmask, one row of x: bitmask_decode_rows (x compressed by each row's mask) instead of the row pass.
  // Measured side by side (4096->4096, 1 thread, thread CPU time, median of 24 calls on rotated copies, AMD EPYC,
  // load 3.4-4): 70% bitmask bf16 1.80-1.83 -> 0.80-0.83 ms, 50% 2.22 -> 0.99 ms.
  static constexpr bool kCompressDecode = true;
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
  const uint16_t* values = static_cast<const uint16_t*>(w.values);
  if (Avx512Bf16::kCompressDecode && w.format == kBitmask && in.m == 1 &&
      bitmask_decode_rows(w, values, in.x_bf16, bias, y, row_begin, row_end)) {
    return;
  }
  tier_rows<Avx512Bf16>(w, values, in.x_bf16, in.m, bias, y, row_begin, row_end);
}

}  // namespace vlmsparse_cpu

#if defined(__clang__)
#pragma clang attribute pop
#endif
