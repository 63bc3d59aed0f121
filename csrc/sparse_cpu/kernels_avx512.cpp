// AVX-512 tier (F, BW, VL, DQ; 16 fp32 lanes). The same plan as the AVX2 tier, with twice the width:
// - packed 2:4: 32 inputs per step; lane l of the 32 meta bits gives column 4*(l/2) + ((bits >> 2l) & 3),
//   one two-source permute of x picks the kept inputs;
// - bitmask: 16 inputs (two mask bytes) per step; the next 16 stored values go to their columns with one
//   masked expand (no table);
// - two weight rows per pass share each load of x; blocks of up to 4 rows of x share each weight vector;
// - bitmask, one row of x (fp32 values): x compressed by the row's mask, then a dense dot with the stored values
//   (bitmask_decode_rows); bitmask fp32 values from 12 rows of x: the column pass of decode.h (column_rows).
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
#include "obs.h"

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
    // the address of the next values waits on the mask's popcount: fetched 2 KiB ahead. 70% bitmask fp32, 1 thread,
    // thread CPU time, without -> with, 4096->11008 / 11008->4096 / 4096->4096: 2 rows of x 7.86-8.20 -> 4.94-8.59 /
    // 8.25-8.85 -> 3.74-3.82 / 3.01-3.19 -> 1.99-2.07 ms; 4 rows 8.70-8.91 -> 6.05-6.62 / 8.90-9.19 -> 4.25-4.46 /
    // 3.21-3.47 -> 2.28-2.37
    _mm_prefetch(reinterpret_cast<const char*>(v[i]) + 2048, _MM_HINT_T0);
    val[i] = _mm512_maskz_expand_ps(static_cast<__mmask16>(bits), load16(v[i]));
    v[i] += popcount(bits);
  }
  for (int m = 0; m < MB; ++m) {
    const __m512 xm = _mm512_loadu_ps(x + m * k + k0);
    for (int i = 0; i < R; ++i) acc[i][m][u] = _mm512_fmadd_ps(val[i], xm, acc[i][m][u]);
  }
}

// One row of x, bitmask (decode): x compressed by each weight row's mask into `buf`, kRowPiece inputs at a time
// (one compress per 16 inputs, reading only the mask and x), then the piece's stored values one contiguous dense
// dot with it,
// prefetched kPrefetch values ahead; instead of the row pass's expand of the values to their columns (whose loads
// wait on the mask's popcounts): the expand path read its values at ~7-8 GB/s, this one at ~12. Measured: see
// Avx512::kCompressDecode.
constexpr int64_t kPrefetch = 512;
constexpr int64_t kRowPiece = 1024;  // inputs compressed, then dotted, at a time (a 4 KiB buffer):
// measured against whole rows (1 thread, thread CPU time, 70% bitmask fp32, M = 1, load 3.2-3.7): 11008->4096
// 5.53-6.14 -> 4.97-5.05 ms, 4096->4096 1.90-2.04 -> 1.55-1.66 (2048 inputs: 5.93-6.00 and 1.59-1.63)

template <typename V>
VLMSPARSE_INLINE float bitmask_compressed_row(const V* v, const uint8_t* meta, const float* x, int64_t k, float* buf) {
  constexpr int64_t kLine = 64 / sizeof(V);
  for (int64_t p = 0; p < kPrefetch; p += kLine) _mm_prefetch(reinterpret_cast<const char*>(v + p), _MM_HINT_T0);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t c0 = 0; c0 < k; c0 += kRowPiece) {
    const int64_t c1 = k - c0 < kRowPiece ? k : c0 + kRowPiece;
    int64_t count = 0, kk = c0;
    for (; kk + 16 <= c1; kk += 16) {
      uint16_t bits;
      std::memcpy(&bits, meta + kk / 8, sizeof(bits));
      _mm512_storeu_ps(buf + count, _mm512_maskz_compress_ps(static_cast<__mmask16>(bits), _mm512_loadu_ps(x + kk)));
      count += popcount(bits);
    }
    if (kk < c1) {  // the last 1-15 inputs: mask bits past k dropped, x not read past k
      const int rest = static_cast<int>(c1 - kk);
      uint16_t bits = 0;
      std::memcpy(&bits, meta + kk / 8, static_cast<size_t>((rest + 7) / 8));
      const unsigned lanes = (1u << rest) - 1;
      bits &= lanes;
      const __m512 xm = _mm512_maskz_loadu_ps(static_cast<__mmask16>(lanes), x + kk);
      _mm512_storeu_ps(buf + count, _mm512_maskz_compress_ps(static_cast<__mmask16>(bits), xm));
      count += popcount(bits);
    }
    int64_t e = 0;
    for (; e + 64 <= count; e += 64) {
      for (int64_t p = 0; p < 64; p += kLine) {
        _mm_prefetch(reinterpret_cast<const char*>(v + e + kPrefetch + p), _MM_HINT_T0);
      }
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        acc[q] = _mm512_fmadd_ps(_mm512_loadu_ps(buf + e + 16 * q), load16(v + e + 16 * q), acc[q]);
      }
    }
    for (; e < count; e += 16) {
      const __mmask16 lanes = count - e >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (count - e)) - 1);
      const __m512 xv = _mm512_maskz_loadu_ps(lanes, buf + e);
      acc[0] = _mm512_fmadd_ps(xv, _mm512_maskz_mov_ps(lanes, load16(v + e)), acc[0]);
    }
    v += count;
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// The rows [row_begin, row_end) for one row of x, bitmask (bitmask_compressed_row). False (nothing written) when
// its buffer cannot be allocated.
template <typename V>
bool bitmask_decode_rows(const SparseWeight& w, const V* values, const float* x, const float* bias, float* y,
                         int64_t row_begin, int64_t row_end) {
  float* buf = static_cast<float*>(kernel_buffer(sizeof(float) * (kRowPiece + 16)));
  if (buf == nullptr) return false;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float dot = bitmask_compressed_row(values + w.row_offsets[r], w.meta + r * w.meta_stride, x, w.k, buf);
    y[r] = dot + (bias ? bias[r] : 0.0f);
  }
  free(buf);
  return true;
}

// The stored entries of bitmask weight row r for the column pass (decode.h column_rows; rows_avx512 runs it for
// no other format): cols[e] = column * L of entry e (in order), 16 inputs a step, the set lanes of the step's
// columns compressed to the next entries; the values as fp32 (the row's own values, prefetched in order).
template <typename V>
const float* decode_row(const SparseWeight& w, const V* values, int64_t r, int64_t L, int32_t* cols, float* buf) {
  static_assert(sizeof(V) == sizeof(float), "the AVX-512 column pass takes fp32 values");
  (void)buf;
  const uint8_t* meta = w.meta + r * w.meta_stride;
  const int64_t k = w.k;
  const V* v = values + w.row_offsets[r];
  const int64_t count = w.row_offsets[r + 1] - w.row_offsets[r];
  const __m512i scale = _mm512_set1_epi32(static_cast<int>(L));
  const __m512i step = _mm512_set1_epi32(static_cast<int>(16 * L));
  __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), scale);
  int64_t e = 0, kk = 0;
  for (; kk + 16 <= k; kk += 16) {
    uint16_t bits;
    std::memcpy(&bits, meta + kk / 8, sizeof(bits));
    _mm512_storeu_si512(cols + e, _mm512_maskz_compress_epi32(bits, column));
    column = _mm512_add_epi32(column, step);
    e += popcount(bits);
  }
  if (kk < k) {  // the last 1-15 inputs; mask bits past k dropped
    const int rest = static_cast<int>(k - kk);
    unsigned bits = meta[kk / 8];
    if (rest > 8) bits |= static_cast<unsigned>(meta[kk / 8 + 1]) << 8;
    bits &= (1u << rest) - 1;
    _mm512_storeu_si512(cols + e, _mm512_maskz_compress_epi32(static_cast<__mmask16>(bits), column));
  }
  for (int64_t p = 0; p < count; p += 16) _mm_prefetch(reinterpret_cast<const char*>(v + p), _MM_HINT_T0);
  return v;  // read next by the column loop, chunk by chunk: fetched above in order
}

struct Avx512 {
  using Vec = __m512;
  static constexpr int64_t kPackedInputs = 32, kBitmaskInputs = 16, kBitmaskDecodeInputs = 16;
  // Bitmask fp32 values from kColumnFromRows rows of x on: the column pass (decode.h column_rows, 16 fp32 lanes,
  // kColumnChains chains, kColumnChunk columns a chunk), called by rows_avx512 (not through tier_rows:
  // kColumnPass is false). Measured side by side against the row pass (4096->4096, 1 thread, thread CPU time,
  // median of 24 calls on rotated copies, AMD EPYC, load 4.6-5.7): 70% bitmask M = 8 4.02-4.10 -> 3.80-3.83 ms,
  // M = 12 5.05-5.54 -> 4.08-4.09, M = 16 5.85-6.80 -> 3.96-4.29, M = 32 10.1 -> 5.9-6.2; 50% bitmask M = 8
  // 4.56-4.71 -> 5.52-5.54 (slower), M = 12 5.40-5.70 -> 5.63-6.11 (even), M = 16 6.16 -> 5.51-5.63, M = 64
  // 19.1 -> 15.6. 4 chains and 512 columns against decode.h's defaults (8, 256): 70% M = 16 4.14-4.29 vs
  // 4.42-4.81 ms, M = 32 5.95-6.20 vs 6.16-6.33. Not for packed 2:4 fp32 (M = 8 2.97-3.06 -> 5.18-5.32 ms,
  // M = 16 5.07-5.34 -> 5.43-5.95) nor bf16 values (on this tier M = 16 packed 2:4 3.80-4.20 -> 5.5-7.1 ms, 70%
  // bitmask 4.20-4.58 -> 5.0-6.3; the bf16 tier's row pass is faster still): those keep the row pass.
  static constexpr bool kColumnPass = false;
  static constexpr int64_t kLanes = 16;
  static constexpr int64_t kColumnFromRows = 12, kColumnChunk = 512;
  static constexpr int kColumnChains = 4;
  static VLMSPARSE_INLINE Vec bcast(const float* p) { return _mm512_set1_ps(*p); }
  static VLMSPARSE_INLINE Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static VLMSPARSE_INLINE void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static VLMSPARSE_INLINE Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  template <typename V>
  static const float* decode(const SparseWeight& w, const V* values, int64_t r, int64_t L, int32_t* cols,
                             float* buf) {
    return decode_row(w, values, r, L, cols, buf);
  }
  // Bitmask fp32 values, one row of x: bitmask_decode_rows (x compressed by each row's mask) instead of the row
  // pass. Measured side by side (4096->4096, 1 thread, thread CPU time, median of 24 calls on rotated copies, AMD
  // EPYC, load 3-3.5): 70% bitmask fp32 2.80-3.12 -> 1.82-1.99 ms, 50% 3.11-3.22 -> 2.56-2.57 ms. Not for bf16
  // values on this tier (bf16 weights with fp32 inputs, the CPUs without AVX512_BF16): there it was slower,
  // 70% 1.51 -> 1.61 ms, 50% 1.79 -> 2.44 ms, so those keep the row pass.
  static constexpr bool kCompressDecode = true;
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
  if (Avx512::kCompressDecode && w.format == kBitmask && in.m == 1 && !w.values_bf16 &&
      bitmask_decode_rows(w, static_cast<const float*>(w.values), in.x, bias, y, row_begin, row_end)) {
    return;
  }
  if (w.format == kBitmask && !w.values_bf16 && in.m >= Avx512::kColumnFromRows) {
    const float* values = static_cast<const float*>(w.values);
    const bool done =
        in.m <= Avx512::kLanes
            ? column_rows<Avx512, float, 1, Avx512::kColumnChains, Avx512::kColumnChunk>(w, values, in.x, in.m, bias, y,
                                                                                        row_begin, row_end)
            : column_rows<Avx512, float, 2, Avx512::kColumnChains, Avx512::kColumnChunk>(w, values, in.x, in.m, bias, y,
                                                                                        row_begin, row_end);
    if (done) return;  // else (no memory for its buffers) the row pass
  }
  rows_for_tier<Avx512>(w, in, bias, y, row_begin, row_end);
}

void obs_avx512(const ObsBlock& b, int64_t row_begin, int64_t row_end) { obs_block(b, row_begin, row_end); }

}  // namespace vlmsparse_cpu

#if defined(__clang__)
#pragma clang attribute pop
#endif
