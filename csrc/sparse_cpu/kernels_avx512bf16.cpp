// AVX-512 BF16 tier: bf16 weights times bf16 inputs with VDPBF16PS (32 products a step, exact, summed in fp32
// pairs; inputs that are bf16 denormals count as zero, as the instruction does). Needs AVX512_BF16, BW and
// VBMI2 (16-bit expand). fp32 weights or inputs go to the AVX-512 tier.
// - packed 2:4: 64 inputs (32 stored values, 64 meta bits) a step; lane l of 32 gets column
//   4*(l/2) + ((bits >> 2l) & 3) (the 16-bit piece l/8 of the meta word, shifted by 2l mod 16), one two-source
//   16-bit permute of x picks the kept inputs, one VDPBF16PS; from 12 rows of x, the rows of x go in the lanes
//   instead (p24_token_rows: no permute per weight row);
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
#include "expand_bf16.h"

namespace vlmsparse_cpu {
namespace {

VLMSPARSE_INLINE __m512i load32(const uint16_t* p) { return _mm512_loadu_si512(p); }

VLMSPARSE_INLINE __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// Packed 2:4 stored values fetched this far ahead of the row pass. One row of x, 1 thread, thread CPU time, weights
// rotated over 512 MiB, Intel Xeon with AMX (480 MiB L3), two alternating runs each, 4096->11008 / 11008->4096 /
// 4096->4096: none 6.36-7.32 / 6.50-7.48 / 2.50-2.63 ms, 2 KiB ahead 5.22-5.35 / 5.26-5.67 / 1.86-1.92 (512 B:
// 6.26 / 6.24 / 2.43). Not measured on the AMD EPYC of the earlier tables.
constexpr int kP24PrefetchBytes = 2048;

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
    _mm_prefetch(reinterpret_cast<const char*>(v[i] + k0 / 2) + kP24PrefetchBytes, _MM_HINT_T0);
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
    // the address of the next values waits on this mask's popcount: fetched 2 KiB ahead. 70% bitmask, 1 thread,
    // thread CPU time, without -> with, 4096->11008 / 11008->4096 / 4096->4096: 4 rows of x 5.56 -> 4.37 / 4.77 ->
    // 2.91 / 1.86 -> 1.60 ms; 16 rows 8.80 -> 7.55 / 8.12 -> 6.31 / 3.29 -> 3.20
    _mm_prefetch(reinterpret_cast<const char*>(v[i] + 1024), _MM_HINT_T0);
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
// when its buffer cannot be allocated. Tried and not kept: two rows at once (one load of x per 32 inputs for both,
// their compress and dot chains interleaved). 70% bitmask, Intel Xeon, weights rotated over 600 MiB, two runs each,
// one row -> two rows: 4096->4096 1.27-1.39 -> 1.36-1.54 ms (1 thread), 0.68-0.74 -> 0.74-0.82 (2 threads);
// 4096->11008 3.51-3.65 -> 3.82-4.08, 1.82-1.90 -> 1.92-2.08.
bool bitmask_decode_rows(const SparseWeight& w, const uint16_t* values, const uint16_t* x, const float* bias,
                         float* y, int64_t row_begin, int64_t row_end) {
  uint16_t* buf = static_cast<uint16_t*>(kernel_buffer(sizeof(uint16_t) * (kRowPiece + 32)));
  if (buf == nullptr) return false;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float dot = bitmask_compressed_row(values + w.row_offsets[r], w.meta + r * w.meta_stride, x, w.k, buf);
    y[r] = dot + (bias ? bias[r] : 0.0f);
  }
  free(buf);
  return true;
}

// Packed 2:4, several rows of x ("token lanes"): the 16 fp32 lanes hold 16 rows of x (tokens), so that each
// stored pair of a weight row (w0, w1) at (4g + i0, 4g + i1) is one broadcast dword and one VDPBF16PS with the
// pairs (x[t, 4g + i0], x[t, 4g + i1]) of the 16 tokens: 32 products, none of them a pruned zero and no permute
// per weight row. (The row pass permutes x once per weight row and row of x: measured here in a loop, a permute
// + VDPBF16PS pair costs ~0.36 ns, VDPBF16PS alone ~0.12 ns, VDPBF16PS with its two loads from L1 ~0.28 ns.)
// Those pair vectors depend only on x and the nibble i0 | i1 << 2, so they are made once per chunk of
// kTokenChunkGroups groups and panel of weight rows, for the six nibbles with i0 < i1 (every packing writes those;
// a chunk of a row with any other nibble is summed by p24_token_chunk_scalar instead), into a table indexed by the
// nibble that stays in L1, and looked up by each stored pair's nibble.
constexpr int kTokenLanes = 16;            // rows of x per block (lanes)
constexpr int64_t kTokenChunkGroups = 16;  // groups of 4 inputs per table: 64 inputs, 16 x 16 x 64 B (6 KiB used)
// Weight rows per table: 1 thread, 16 rows of x, 4096->11008 / 11008->4096 / 4096->4096: 48 rows 7.82 / 7.76 /
// 2.80 ms, 128 rows 5.52 / 5.11 / 2.19, 256 rows 5.60 / 5.05 / 2.17.
constexpr int64_t kTokenPanelRows = 128;
constexpr int kOrderedNibbles[6] = {4, 8, 12, 9, 13, 14};  // i0 | i1 << 2 with i0 < i1

// The meta of `groups` (<= 16) groups from group g0 of one row, nibble j = group g0 + j (bits 4j..4j+3); nibbles
// past `groups` are not meaningful (every reader stops at `groups`).
VLMSPARSE_INLINE uint64_t chunk_nibbles(const uint8_t* meta, int64_t g0, int64_t groups) {
  uint64_t word = 0;
  if (groups == kTokenChunkGroups) {  // a fixed-size copy: one load (a variable size is a library call)
    std::memcpy(&word, meta + g0 / 2, sizeof(word));
  } else {
    std::memcpy(&word, meta + g0 / 2, static_cast<size_t>((groups + 1) / 2));
  }
  return word;
}

// Whether every nibble of `word` among the first `groups` has i0 < i1 (the table holds only those).
VLMSPARSE_INLINE bool nibbles_ordered(uint64_t word, int64_t groups) {
  const uint64_t lo = word & 0x3333333333333333ull, hi = (word >> 2) & 0x3333333333333333ull;
  // per nibble 4 + i1 - i0 - 1 (>= 0, no borrow between nibbles): bit 2 set iff i1 > i0
  const uint64_t ok = (hi + 0x3333333333333333ull - lo) & 0x4444444444444444ull;
  const uint64_t used = groups * 4 >= 64 ? ~0ull : (1ull << (groups * 4)) - 1;
  return (ok & used) == (0x4444444444444444ull & used);
}

// Rows 16b..16b+15 of columns c and c + 1 of a group stored [4][lanes]: `p` points at column c's piece, the next
// column's piece is `lanes` entries on.
VLMSPARSE_INLINE __m512i pair_columns(const uint16_t* p, int64_t lanes) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_load_si256(reinterpret_cast<const __m256i*>(p))),
                            _mm256_load_si256(reinterpret_cast<const __m256i*>(p + lanes)), 1);
}

// R weight rows against one chunk's table for NB blocks of 16 rows of x: the rows' sums in `tile` (NB x 16 fp32
// a row) += the chunk's products. A whole chunk is unrolled; two chains per row and block when NB = 1.
template <int R, int NB>
VLMSPARSE_INLINE void p24_token_chunk(const uint16_t* const (&v)[R], const uint64_t (&word)[R], const __m512i* table,
                                      int64_t g0, int64_t groups, float* const (&tile)[R]) {
  constexpr int U = NB == 1 ? 2 : 1;
  __m512 acc[R][NB][U];
  for (int i = 0; i < R; ++i) {
    // into L2: a panel's rows are k bytes apart, so with k = 4096 each chunk of every row falls in the same L1 set;
    // 16 rows of x, 4096->11008 / 4096->4096 with _MM_HINT_T0: 6.12 / 2.43 ms, with T1: 5.52 / 2.19
    _mm_prefetch(reinterpret_cast<const char*>(v[i] + 2 * (g0 + 2 * kTokenChunkGroups)), _MM_HINT_T1);
    for (int b = 0; b < NB; ++b) {
      acc[i][b][0] = _mm512_loadu_ps(tile[i] + b * kTokenLanes);
      for (int u = 1; u < U; ++u) acc[i][b][u] = _mm512_setzero_ps();
    }
  }
  auto step = [&](int64_t j, int u) __attribute__((always_inline)) {
    for (int i = 0; i < R; ++i) {
      uint32_t pair;
      std::memcpy(&pair, v[i] + 2 * (g0 + j), sizeof(pair));
      const __m512i weights = _mm512_set1_epi32(static_cast<int>(pair));
      const __m512i* entry = table + (j * 16 + ((word[i] >> (4 * j)) & 15)) * NB;
      for (int b = 0; b < NB; ++b) acc[i][b][u] = dot_bf16(acc[i][b][u], _mm512_load_si512(entry + b), weights);
    }
  };
  if (groups == kTokenChunkGroups) {
#pragma GCC unroll 8
    for (int64_t j = 0; j < kTokenChunkGroups; j += 2) {
      step(j, 0);
      step(j + 1, U - 1);
    }
  } else {
    for (int64_t j = 0; j < groups; ++j) step(j, 0);
  }
  for (int i = 0; i < R; ++i) {
    for (int b = 0; b < NB; ++b) {
      __m512 total = acc[i][b][0];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[i][b][u]);
      _mm512_storeu_ps(tile[i] + b * kTokenLanes, total);
    }
  }
}

// One row's chunk whose nibbles are not all ordered (i0 >= i1: no packing here writes them, the row pass accepts
// them), for `lanes` rows of x: each stored pair summed in fp32 from xg, as the row pass does.
void p24_token_chunk_scalar(const uint16_t* v, uint64_t word, const uint16_t* xg, int64_t lanes, int64_t g0,
                            int64_t groups, float* tile) {
  for (int64_t j = 0; j < groups; ++j) {
    const int nib = static_cast<int>((word >> (4 * j)) & 15);
    const float w0 = bf16_to_float(v[2 * (g0 + j)]), w1 = bf16_to_float(v[2 * (g0 + j) + 1]);
    const uint16_t* x0 = xg + (4 * (g0 + j) + (nib & 3)) * lanes;
    const uint16_t* x1 = xg + (4 * (g0 + j) + (nib >> 2)) * lanes;
    for (int64_t t = 0; t < lanes; ++t) tile[t] += w0 * bf16_to_float(x0[t]) + w1 * bf16_to_float(x1[t]);
  }
}

// One pass over the weight rows [row_begin, row_end) for NB blocks of 16 rows of x (the last block may be partial):
// xg [groups][4][NB * 16] holds them (zero past m), `table` and `tile` are the caller's buffers.
template <int NB>
void p24_token_pass(const SparseWeight& w, const uint16_t* values, const uint16_t* xg, const __m512i (&pick)[6],
                    __m512i* table, float* tile, const float* bias, float* y, int64_t tokens, int64_t row_begin,
                    int64_t row_end) {
  constexpr int64_t lanes = NB * kTokenLanes;
  const int64_t k = w.k, n = w.n, groups = k / 4;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTokenPanelRows) {
    const int64_t rows = row_end - r0 < kTokenPanelRows ? row_end - r0 : kTokenPanelRows;
    std::memset(tile, 0, sizeof(float) * rows * lanes);
    for (int64_t g0 = 0; g0 < groups; g0 += kTokenChunkGroups) {
      const int64_t chunk = groups - g0 < kTokenChunkGroups ? groups - g0 : kTokenChunkGroups;
      for (int64_t j = 0; j < chunk; ++j) {
        const uint16_t* group = xg + (g0 + j) * 4 * lanes;  // [4][lanes]: block b of column c at c * lanes + 16b
        for (int b = 0; b < NB; ++b) {
          // columns 0, 1 of the block's 16 rows (lanes 0..31 of the permute), then columns 2, 3 (32..63)
          const __m512i lo = pair_columns(group + 16 * b, lanes);
          const __m512i hi = pair_columns(group + 2 * lanes + 16 * b, lanes);
          for (int e = 0; e < 6; ++e) {
            table[(j * 16 + kOrderedNibbles[e]) * NB + b] = _mm512_permutex2var_epi16(lo, pick[e], hi);
          }
        }
      }
      int64_t i = 0;
      for (; i + 4 <= rows; i += 4) {
        const uint16_t* v[4];
        uint64_t word[4];
        float* out[4];
        bool ordered = true;
        for (int q = 0; q < 4; ++q) {
          v[q] = values + (r0 + i + q) * (k / 2);
          word[q] = chunk_nibbles(w.meta + (r0 + i + q) * w.meta_stride, g0, chunk);
          out[q] = tile + (i + q) * lanes;
          ordered = ordered && nibbles_ordered(word[q], chunk);
        }
        if (ordered) {
          p24_token_chunk<4, NB>(v, word, table, g0, chunk, out);
        } else {
          for (int q = 0; q < 4; ++q) p24_token_chunk_scalar(v[q], word[q], xg, lanes, g0, chunk, out[q]);
        }
      }
      for (; i < rows; ++i) {
        const uint16_t* v[1] = {values + (r0 + i) * (k / 2)};
        const uint64_t word[1] = {chunk_nibbles(w.meta + (r0 + i) * w.meta_stride, g0, chunk)};
        float* out[1] = {tile + i * lanes};
        if (nibbles_ordered(word[0], chunk)) {
          p24_token_chunk<1, NB>(v, word, table, g0, chunk, out);
        } else {
          p24_token_chunk_scalar(v[0], word[0], xg, lanes, g0, chunk, out[0]);
        }
      }
    }
    for (int64_t i = 0; i < rows; ++i) {
      const float b = bias ? bias[r0 + i] : 0.0f;
      for (int64_t t = 0; t < tokens; ++t) y[t * n + r0 + i] = tile[i * lanes + t] + b;
    }
  }
}

// The rows [row_begin, row_end) of y for packed 2:4 bf16 weights and m rows of bf16 x, 32 rows of x per pass
// over the weight (16 for the last 1-16; token lanes, above). False (nothing written) when its buffers cannot be
// allocated.
bool p24_token_rows(const SparseWeight& w, const uint16_t* values, const uint16_t* x, int64_t m, const float* bias,
                    float* y, int64_t row_begin, int64_t row_end) {
  constexpr int64_t kMaxLanes = 2 * kTokenLanes;
  const int64_t k = w.k, n = w.n, groups = k / 4;
  uint16_t* xg = static_cast<uint16_t*>(kernel_buffer(sizeof(uint16_t) * groups * 4 * kMaxLanes + 64, 64));
  __m512i* table = static_cast<__m512i*>(kernel_buffer(sizeof(__m512i) * kTokenChunkGroups * 16 * 2, 64));
  float* tile = static_cast<float*>(kernel_buffer(sizeof(float) * kTokenPanelRows * kMaxLanes, 64));
  if (xg == nullptr || table == nullptr || tile == nullptr) {
    free(tile);
    free(table);
    free(xg);
    return false;
  }
  // nibble i0 | i1 << 2 (entry e): lane 2t <- column i0 of row t of x (word 16 * i0 + t of the two vectors that
  // hold a group's 4 columns of 16 rows), 2t + 1 <- column i1
  __m512i pick[6];
  for (int e = 0; e < 6; ++e) {
    alignas(64) uint16_t lanes[32];
    for (int t = 0; t < kTokenLanes; ++t) {
      lanes[2 * t] = static_cast<uint16_t>(16 * (kOrderedNibbles[e] & 3) + t);
      lanes[2 * t + 1] = static_cast<uint16_t>(16 * (kOrderedNibbles[e] >> 2) + t);
    }
    pick[e] = _mm512_load_si512(lanes);
  }
  for (int64_t t0 = 0; t0 < m;) {
    const int64_t tokens = m - t0 < kMaxLanes ? m - t0 : kMaxLanes;
    const int64_t lanes = tokens > kTokenLanes ? kMaxLanes : kTokenLanes;
    // xg[g][c][t] = x[t0 + t, 4g + c] (t < lanes; zero past m)
    if (tokens < lanes) std::memset(xg, 0, sizeof(uint16_t) * groups * 4 * lanes);
    for (int64_t t = 0; t < tokens; ++t) {
      const uint16_t* row = x + (t0 + t) * k;
      for (int64_t col = 0; col < 4 * groups; ++col) xg[col * lanes + t] = row[col];
    }
    if (lanes == kMaxLanes) {
      p24_token_pass<2>(w, values, xg, pick, table, tile, bias, y + t0 * n, tokens, row_begin, row_end);
    } else {
      p24_token_pass<1>(w, values, xg, pick, table, tile, bias, y + t0 * n, tokens, row_begin, row_end);
    }
    t0 += tokens;
  }
  free(tile);
  free(table);
  free(xg);
  return true;
}

// Bitmask, several rows of x ("expanded tile"): the row pass expands each weight row's stored values to their
// columns once per block of 4 rows of x, and reads x from L2 for every group of weight rows. Here each panel of
// kTileRows weight rows is expanded once into a dense bf16 tile [kTileRows, kpad] (a 16-bit expand per 32 inputs),
// and the tile is then multiplied like a dense weight: register blocks of 4 weight rows x 4 rows of x (16
// accumulators; per 32 inputs 4 tile loads, 4 x loads and 16 VDPBF16PS), walked in chunks of kTileChunk inputs
// so that the chunk of the tile and of up to kTileTokens rows of x stay in L1 for all blocks. x is copied once into
// a buffer padded to whole blocks of 4 rows and 32 inputs (zeros), so every load is whole. The pruned zeros are
// multiplied too (as in the row pass); same exact products and fp32 sums as the row pass, in another order.
// Measured side by side (70% bitmask, 1 thread, thread CPU time, median of 20 calls on 4 rotated copies, dense bf16
// F.linear in brackets), 4096->11008 / 11008->4096 / 4096->4096, row pass -> tile: 8 rows of x 7.31 -> 4.36-4.68
// (5.6-6.1) / 5.27 -> 3.99-4.08 (6.1-7.3) / 1.95 -> 1.57-1.59 (2.2) ms; 16 rows 7.89 -> 6.01-6.49 (6.9-7.6) / 7.37 ->
// 5.69-6.14 (8.4-9.5) / 3.01 -> 2.25-2.32 (2.7-2.8); 32 rows 12.31 -> 9.83-10.23 (10.7-11.0) / 10.69 -> 10.09-11.45
// (10.4-11.8) / 4.70 -> 3.62-3.84 (3.9-4.1); two runs of the final build. Panels of 4 or 16 rows and
// chunks of 128, 512 or 1024 inputs were slower (16 rows, 4096->11008: 6.72, 6.86, 11.1, 5.90, 6.59 ms). Also tried
// and slower (8.94 ms at 16 rows, 4096->11008): expanding each chunk of the panel just before its products (the
// tile in L1 instead of L2), eight rows' values and masks read side by side.
constexpr int64_t kTileRows = 8;      // weight rows expanded per panel: two register blocks of 4
constexpr int64_t kTileChunk = 256;   // inputs per chunk: 4 KB of the tile and 8 KB of 16 rows of x in L1
constexpr int64_t kTileTokens = 16;   // rows of x whose block sums are kept per pass over the chunks

// sums[16] (row i, row of x t at i * 4 + t) += the products of 4 tile rows and 4 rows of x (both `stride` apart)
// over inputs [c0, c1).
VLMSPARSE_INLINE void tile_block(const uint16_t* tile, const uint16_t* x, int64_t stride, int64_t c0, int64_t c1,
                                 __m512* sums) {
  __m512 acc[4][4];
  for (int i = 0; i < 4; ++i)
    for (int t = 0; t < 4; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t c = c0; c < c1; c += 32) {
    __m512i wv[4];
    for (int i = 0; i < 4; ++i) wv[i] = load32(tile + i * stride + c);
    for (int t = 0; t < 4; ++t) {
      const __m512i xv = load32(x + t * stride + c);
      for (int i = 0; i < 4; ++i) acc[i][t] = dot_bf16(acc[i][t], xv, wv[i]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int t = 0; t < 4; ++t) sums[i * 4 + t] = _mm512_add_ps(sums[i * 4 + t], acc[i][t]);
}

// The rows [row_begin, row_end) for m rows of x, bitmask bf16, by expanded tiles (above). False (nothing written)
// when its buffers cannot be allocated.
bool bitmask_tile_rows(const SparseWeight& w, const uint16_t* values, const uint16_t* x, int64_t m,
                       const float* bias, float* y, int64_t row_begin, int64_t row_end) {
  const int64_t n = w.n, k = w.k, kpad = (k + 31) / 32 * 32, xrows = (m + 3) / 4 * 4;
  // rows of the tile and of x one cache line more than kpad apart: at k = 4096 (8 KB rows) the 8 lines of a
  // register block's loads and the other rows' fell in one L1 set (4096->11008, 16 rows of x: 7.5 ms, 5.9 with the
  // extra line, varying with where the buffers fell)
  const int64_t stride = kpad + 32;
  constexpr int64_t kGroups = kTileRows / 4, kBlocks = kTileTokens / 4;
  uint16_t* xp = static_cast<uint16_t*>(kernel_buffer(sizeof(uint16_t) * xrows * stride, 64));
  uint16_t* tile = static_cast<uint16_t*>(kernel_buffer(sizeof(uint16_t) * kTileRows * stride, 64));
  __m512* sums = static_cast<__m512*>(kernel_buffer(sizeof(__m512) * kGroups * kBlocks * 16, 64));
  if (xp == nullptr || tile == nullptr || sums == nullptr) {
    free(sums);
    free(tile);
    free(xp);
    return false;
  }
  for (int64_t t = 0; t < xrows; ++t) {
    uint16_t* row = xp + t * stride;
    const int64_t copied = t < m ? k : 0;
    if (copied) std::memcpy(row, x + t * k, sizeof(uint16_t) * k);
    std::memset(row + copied, 0, sizeof(uint16_t) * (kpad - copied));
  }
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTileRows) {
    const int64_t rows = row_end - r0 < kTileRows ? row_end - r0 : kTileRows;
    for (int64_t i = 0; i < rows; ++i) {
      // values 2 KiB ahead (the amx tier fetches 1 KiB ahead: its own measurement)
      expand_bitmask_row<2048>(values + w.row_offsets[r0 + i], w.meta + (r0 + i) * w.meta_stride, k,
                               tile + i * stride);
    }
    const int64_t groups = (rows + 3) / 4;
    for (int64_t i = rows; i < groups * 4; ++i) std::memset(tile + i * stride, 0, sizeof(uint16_t) * kpad);
    for (int64_t t0 = 0; t0 < xrows; t0 += kTileTokens) {
      const int64_t blocks = xrows - t0 < kTileTokens ? (xrows - t0) / 4 : kBlocks;
      for (int64_t q = 0; q < kGroups * kBlocks * 16; ++q) sums[q] = _mm512_setzero_ps();
      for (int64_t c0 = 0; c0 < kpad; c0 += kTileChunk) {
        const int64_t c1 = kpad - c0 < kTileChunk ? kpad : c0 + kTileChunk;
        for (int64_t b = 0; b < blocks; ++b) {
          for (int64_t g = 0; g < groups; ++g) {
            tile_block(tile + g * 4 * stride, xp + (t0 + b * 4) * stride, stride, c0, c1,
                       sums + (g * kBlocks + b) * 16);
          }
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        for (int64_t b = 0; b < blocks; ++b) {
          for (int64_t i = 0; i < 4 && g * 4 + i < rows; ++i) {
            const int64_t r = r0 + g * 4 + i;
            const float bi = bias ? bias[r] : 0.0f;
            for (int64_t t = 0; t < 4 && t0 + b * 4 + t < m; ++t) {
              y[(t0 + b * 4 + t) * n + r] = _mm512_reduce_add_ps(sums[(g * kBlocks + b) * 16 + i * 4 + t]) + bi;
            }
          }
        }
      }
    }
  }
  free(sums);
  free(tile);
  free(xp);
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
  // Packed 2:4 from this many rows of x: p24_token_rows instead of the row pass. Measured side by side (1 thread,
  // thread CPU time, median of 20 calls on rotated copies, load ~1; row pass -> token lanes, dense bf16 F.linear in
  // brackets), 4096->11008 / 11008->4096 / 4096->4096: 8 rows 4.85 -> 6.04 / 4.32 -> 5.03 / 1.85 -> 2.26 ms; 12 rows
  // 6.31 -> 6.02 / 5.34 -> 5.13 / 2.41 -> 2.32; 16 rows 7.23 -> 5.52 (7.00) / 6.82 -> 5.11 (7.53) / 2.76 -> 2.19
  // (2.74); 32 rows 11.04 -> 7.97 (10.21) / 10.59 -> 7.99 (10.61) / 4.18 -> 3.71 (3.85).
  static constexpr int64_t kTokenLanesFromRows = 12;
  // Bitmask from this many rows of x: bitmask_tile_rows instead of the row pass (measured beside it). From 2 to 6
  // rows it was faster at 4096->11008 and 4096->4096 but slower at 11008->4096 (2 rows: 2.61 -> 3.30 ms).
  static constexpr int64_t kBitmaskTileFromRows = 8;
  // Tried for bitmask and not kept: rows of x in the lanes over column pairs (2j, 2j + 1), each weight row decoded
  // per call into the dwords of its non-empty pairs and their offsets (a 16-bit expand, two 32-bit compresses and a
  // pext per 32 columns), one VDPBF16PS per non-empty pair and 16 rows of x. 70% bitmask, 16 rows of x, 1 thread,
  // 4096->11008: 9.30 ms against the row pass's 8.32 and dense bf16's 6.99; the decode alone took 3.8 ms (2.6 ns per
  // 32 columns, and only after prefetching the values, whose address waits on the mask's popcounts: 8 ms without).
  // Also tried: the row pass with all 16 rows of x per expanded weight vector, in 512-column chunks of x kept in L1
  // for a panel of 16 weight rows (accumulators in an L1 tile between chunks): 16.9 ms at 4096->11008 against the
  // row pass's 8.8 (10.0 with only two distinct rows of x loaded: the 16 loads of x per vector cost the most).
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
  if (w.format == kBitmask && in.m >= Avx512Bf16::kBitmaskTileFromRows &&
      bitmask_tile_rows(w, values, in.x_bf16, in.m, bias, y, row_begin, row_end)) {
    return;
  }
  if (w.format == kPacked24 && in.m >= Avx512Bf16::kTokenLanesFromRows &&
      p24_token_rows(w, values, in.x_bf16, in.m, bias, y, row_begin, row_end)) {
    return;
  }
  tier_rows<Avx512Bf16>(w, values, in.x_bf16, in.m, bias, y, row_begin, row_end);
}

}  // namespace vlmsparse_cpu

#if defined(__clang__)
#pragma clang attribute pop
#endif
