// AVX2 + FMA tier (8 fp32 lanes).
//
// One row of x (decode) to 7 (11 for packed 2:4 bf16): the row pass, one pass over each weight row per call, every
// step feeding all rows of x:
// - packed 2:4: 16 inputs per step; the 16 meta bits of 4 groups give, lane l, the column 4*(l/2) + i
//   (a variable shift by 2l, no table); two lane-crossing permutes of x pick the kept inputs, one FMA. One row of
//   x: its own pass (P24Decode): x arranged once per call so that in-lane permutes with the plain 2-bit indices
//   pick the kept inputs, 32 inputs per step.
// - bitmask, one row of x: its own pass (BitmaskDecode): per weight row x packed to the stored entries (one permute
//   and one store per mask byte), then a dense dot product with the stored values.
// - bitmask, more rows of x: 8 inputs (one mask byte) per step; the next 8 stored values are expanded to their
//   columns with one permute (index table kExpand: rank of each set bit) and zeroed elsewhere, one FMA per row
//   of x.
// Two weight rows per pass share each load of x; blocks of up to 4 rows of x share each weight vector.
// More rows of x (Avx2::column_from_rows): the column pass of decode.h (column_rows): rows of x in the lanes,
// one broadcast of each stored value times its column, no product with a pruned zero.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,bmi,popcnt"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx2,fma,bmi,popcnt")
#endif

#include <immintrin.h>

#include "decode.h"
#include "obs.h"

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

// Positions of the set bits of each byte, in order (then zeros).
struct CompressTable {
  alignas(64) uint8_t index[256][8];
  constexpr CompressTable() : index{} {
    for (int byte = 0; byte < 256; ++byte) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        if ((byte >> j) & 1) index[byte][rank++] = static_cast<uint8_t>(j);
      }
    }
  }
};
constexpr CompressTable kCompress{};

// The byte shuffle (pshufb) that packs 8 bf16 inputs to the set bits of a byte, in order (then zeros).
struct CompressTable16 {
  alignas(64) uint8_t index[256][16];
  constexpr CompressTable16() : index{} {
    for (int byte = 0; byte < 256; ++byte) {
      int rank = 0;
      for (int j = 0; j < 8; ++j) {
        if ((byte >> j) & 1) {
          index[byte][2 * rank] = static_cast<uint8_t>(2 * j);
          index[byte][2 * rank + 1] = static_cast<uint8_t>(2 * j + 1);
          ++rank;
        }
      }
      for (int j = 2 * rank; j < 16; ++j) index[byte][j] = 0x80;
    }
  }
};
constexpr CompressTable16 kCompress16{};

// For one row of x (bitmask_step with MB = 1): per mask byte, the permute of x that packs the columns of its
// set bits into the lanes of the stored values; lanes past the set bits hold 8 (the permute reads the low 3 bits,
// a compare with 8 gives the lanes to keep, no second table). fp32 values: lane j is set bit j. bf16 values, read
// as 4 words of two and widened by shifts (no permute): lanes 0-3 the even set bits 0, 2, 4, 6 (low halves,
// shifted up), lanes 4-7 the odd ones 1, 3, 5, 7 (high halves, low 16 bits cleared).
struct PackTable {
  alignas(64) int32_t index[2][256][8];  // [bf16][byte][lane]
  constexpr PackTable() : index{} {
    for (int byte = 0; byte < 256; ++byte) {
      int pos[8], count = 0;  // kCompress's positions of the set bits, then 8
      for (int j = 0; j < 8; ++j) count += (byte >> j) & 1;
      for (int j = 0; j < 8; ++j) pos[j] = j < count ? kCompress.index[byte][j] : 8;
      for (int lane = 0; lane < 8; ++lane) {
        index[0][byte][lane] = pos[lane];
        index[1][byte][lane] = pos[lane < 4 ? 2 * lane : 2 * (lane - 4) + 1];
      }
    }
  }
};
constexpr PackTable kPack{};

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
// Several rows of x: the stored values are expanded to their columns (kExpand), one permute per weight row.
// One row of x: 32 inputs a step; the stored values stay packed and x is packed to match (kPack), one permute
// per byte.
template <typename V, int MB, int R, int U>
VLMSPARSE_INLINE void bitmask_step(const V* (&v)[R], const uint8_t* const (&meta)[R], const float* x, int64_t k,
                                   int64_t k0, int u, __m256 (&acc)[R][MB][U]) {
  if constexpr (MB == 1) {  // 32 inputs (4 mask bytes) a step
    constexpr int kBf16 = sizeof(V) == 2;
    for (int i = 0; i < R; ++i) {
      uint32_t bits;
      std::memcpy(&bits, meta[i] + k0 / 8, sizeof(bits));
      __m256 prod[4];
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const unsigned byte = (bits >> (8 * q)) & 0xFF;
        const V* p = v[i] + (q == 0 ? 0 : popcount(bits & ((1u << (8 * q)) - 1)));
        const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.index[kBf16][byte]));
        __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(8), index);
        __m256 val;
        if constexpr (kBf16) {
          keep = _mm256_and_si256(keep, _mm256_setr_epi32(-1, -1, -1, -1, -65536, -65536, -65536, -65536));
          const __m256i pairs = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
          const __m256i widened = _mm256_sllv_epi32(pairs, _mm256_setr_epi32(16, 16, 16, 16, 0, 0, 0, 0));
          val = _mm256_castsi256_ps(_mm256_and_si256(widened, keep));
        } else {
          val = _mm256_and_ps(_mm256_loadu_ps(p), _mm256_castsi256_ps(keep));
        }
        const __m256 xq = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + k0 + 8 * q), index);
        prod[q] = q % 2 == 0 ? _mm256_mul_ps(val, xq) : _mm256_fmadd_ps(val, xq, prod[q - 1]);
      }
      acc[i][0][u] = _mm256_add_ps(acc[i][0][u], _mm256_add_ps(prod[1], prod[3]));
      v[i] += popcount(bits);
    }
    return;
  }
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  __m256 val[R];
  for (int i = 0; i < R; ++i) {
    const unsigned byte = meta[i][k0 / 8];
    // the address of the next values waits on the masks' popcounts: fetched 2 KiB ahead once per 64 inputs. 70%
    // bitmask, AVX2 tier, 1 thread, thread CPU time, without -> with, 4096->11008 / 11008->4096 / 4096->4096, 2 rows
    // of x: fp32 8.57-9.09 -> 7.26-7.45 / 7.66-7.91 -> 5.58-5.98 / 3.40-3.64 -> 2.77-4.15 ms, bf16 7.11-7.47 ->
    // 5.79-5.92 / 6.26-6.29 -> 5.71-5.72 / 2.66-2.77 -> 2.21-2.23; 4 rows: fp32 9.37-9.84 -> 8.23-8.71 / 8.74-8.87 ->
    // 6.59-6.78, bf16 8.14-9.29 -> 6.53-6.83 / 8.36-7.28 -> 7.12-7.14
    if (k0 % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(v[i]) + 2048, _MM_HINT_T0);
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

// The stored entries of weight row r for the column pass: cols[e] = column * L of entry e (in order), the
// values as fp32 (the row's own values when fp32, else widened into buf); cols and buf hold k + 16.
template <typename V>
const float* decode_row(const SparseWeight& w, const V* values, int64_t r, int64_t L, int32_t* cols, float* buf) {
  const uint8_t* meta = w.meta + r * w.meta_stride;
  const int64_t k = w.k;
  const __m256i scale = _mm256_set1_epi32(static_cast<int>(L));
  const V* v;
  int64_t count;
  if (w.format == kPacked24) {
    v = values + r * (k / 2);
    count = k / 2;
    const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
    int64_t k0 = 0;
    for (; k0 + 16 <= k; k0 += 16) {
      uint16_t bits;
      std::memcpy(&bits, meta + k0 / 8, sizeof(bits));
      const __m256i column = _mm256_add_epi32(
          _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(bits), shifts), _mm256_set1_epi32(3)), base);
      const __m256i offset = _mm256_mullo_epi32(_mm256_add_epi32(column, _mm256_set1_epi32(static_cast<int>(k0))), scale);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(cols + k0 / 2), offset);
    }
    for (int64_t g = k0 / 4; g < k / 4; ++g) {
      const int nibble = (meta[g >> 1] >> ((g & 1) * 4)) & 0xF;
      cols[2 * g] = static_cast<int32_t>((4 * g + (nibble & 3)) * L);
      cols[2 * g + 1] = static_cast<int32_t>((4 * g + (nibble >> 2)) * L);
    }
  } else {
    v = values + w.row_offsets[r];
    count = w.row_offsets[r + 1] - w.row_offsets[r];
    int64_t e = 0;
    for (int64_t b = 0; b < w.meta_stride; ++b) {
      unsigned byte = meta[b];
      if (8 * b + 8 > k) byte &= (1u << (k - 8 * b)) - 1;  // bits past k
      const __m128i pos = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompress.index[byte]));
      const __m256i column = _mm256_add_epi32(_mm256_cvtepu8_epi32(pos), _mm256_set1_epi32(static_cast<int>(8 * b)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(cols + e), _mm256_mullo_epi32(column, scale));
      e += popcount(byte);
    }
  }
  if constexpr (sizeof(V) == sizeof(float)) {
    return v;
  } else {
    int64_t e = 0;
    for (; e + 8 <= count; e += 8) _mm256_storeu_ps(buf + e, load8(v + e));
    for (; e < count; ++e) buf[e] = load1(v + e);
    return buf;
  }
}

// One row of x (decode), packed 2:4: x is arranged once per call (arrange) in blocks of 32 inputs (8 groups
// of 4) as four vectors of two groups each (one group per 128-bit lane), so that the plain 2-bit indices of the
// meta, shifted into the lanes (one variable shift; the permute reads the low 2 bits), pick each lane's input with
// an in-lane permute (vpermilps) of two of these vectors and one blend: per 8 stored values one shift, two in-lane
// permutes, one blend and one FMA (the general row pass: a shift, an and, an add, two lane-crossing permutes).
// bf16 values are widened by unpacking with zeros (32 bytes give the values of groups 0, 1, 4, 5 and 2, 3, 6, 7),
// no shift; x is arranged in that order.
// Measured side by side against the row pass (emulated AVX2 on the AMD EPYC, 1 thread, thread CPU time, load ~1.3):
// bf16 4096->4096 0.99 -> 0.79-0.83 ms, 4096->11008 2.68-2.78 -> 1.92-2.17 ms (18-19 -> 23-26 GB/s, about dense
// bf16's 24 GB/s); fp32 4096->4096 1.51-1.57 -> 1.31-1.44 ms. One weight row per pass and two chains (per half)
// measured best: two rows per pass 2x slower (1.7 ms bf16 4096->4096), four 1.4x slower, one chain the same;
// a software prefetch of the values 512 / 1024 / 2048 bytes ahead no faster (512: 1.0 ms).
template <typename V>
struct P24Decode {
  static constexpr bool kBf16 = sizeof(V) == 2;
  // Groups of a 32-input block in the order of the arranged vectors A0 (low, high), B0, A1, B1.
  static constexpr int kOrder[8] = {0, kBf16 ? 4 : 2, 1, kBf16 ? 5 : 3, kBf16 ? 2 : 4, 6, kBf16 ? 3 : 5, 7};
  // fp32 values: xr holds the four vectors of each block in fp32. bf16 values: in bf16 (x holds bf16 numbers: the ops
  // take x in the values' dtype, so its upper 16 bits are exact), A0 and B0 interleaved (A0[j], B0[j]) in the first
  // 16 words of a block, A1 and B1 in the next 16, so that a shift gives A and an and gives B (no shuffle): half the
  // bytes, so that xr stays in L1 at 11008 inputs (44 KB in fp32: packed 2:4 bf16 11008->4096 ran at 9.5 GB/s,
  // 22 with xr's reads folded into 16 KB). Side by side (load ~2): 11008->4096 4.85-5.18 -> 3.19-3.30 ms,
  // 4096->4096 and 4096->11008 the same (0.77-0.84, 2.11-2.29 ms). fp32 values keep fp32 xr (x is not bf16 there).
  static void arrange(const float* x, int64_t blocks, float* out) {
    if constexpr (kBf16) {
      uint16_t* o = reinterpret_cast<uint16_t*>(out);
      for (int64_t b = 0; b < blocks; ++b) {
        for (int half = 0; half < 2; ++half) {
          for (int j = 0; j < 8; ++j) {
            for (int ab = 0; ab < 2; ++ab) {  // A (vector 2 * half) or B (2 * half + 1), lane j
              const int q = 2 * (2 * half + ab) + j / 4;  // group slot in kOrder
              uint32_t bits;
              std::memcpy(&bits, x + 32 * b + 4 * kOrder[q] + j % 4, sizeof(bits));
              o[32 * b + 16 * half + 2 * j + ab] = static_cast<uint16_t>(bits >> 16);
            }
          }
        }
      }
    } else {
      for (int64_t b = 0; b < blocks; ++b)
        for (int q = 0; q < 8; ++q) _mm_storeu_ps(out + 32 * b + 4 * q, _mm_loadu_ps(x + 32 * b + 4 * kOrder[q]));
    }
  }
  // Meta bit of each lane of the first and second 8 values of a block.
  static VLMSPARSE_INLINE __m256i shifts(int half) {
    if constexpr (kBf16) {
      return half == 0 ? _mm256_setr_epi32(0, 2, 4, 6, 16, 18, 20, 22) : _mm256_setr_epi32(8, 10, 12, 14, 24, 26, 28, 30);
    } else {
      return half == 0 ? _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14) : _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
    }
  }
  // R weight rows from r against the arranged x (xr) and x; y[r + i] = dot + bias.
  template <int R, int U>
  static void rows(const SparseWeight& w, const V* values, const float* xr, const float* x, const float* bias,
                   float* y, int64_t r) {
    const int64_t k = w.k;
    const V* v[R];
    const uint8_t* meta[R];
    for (int i = 0; i < R; ++i) {
      v[i] = values + (r + i) * (k / 2);
      meta[i] = w.meta + (r + i) * w.meta_stride;
    }
    __m256 acc[R][2 * U];
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < 2 * U; ++c) acc[i][c] = _mm256_setzero_ps();
    const __m256i sh0 = shifts(0), sh1 = shifts(1);
    auto step = [&](int64_t k0, int u) __attribute__((always_inline)) {
      __m256 a0, b0, a1, b1;
      if constexpr (kBf16) {
        const uint16_t* xr16 = reinterpret_cast<const uint16_t*>(xr) + k0;
        const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr16));
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr16 + 16));
        const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
        a0 = _mm256_castsi256_ps(_mm256_slli_epi32(p, 16));
        b0 = _mm256_castsi256_ps(_mm256_and_si256(p, high));
        a1 = _mm256_castsi256_ps(_mm256_slli_epi32(q, 16));
        b1 = _mm256_castsi256_ps(_mm256_and_si256(q, high));
      } else {
        a0 = _mm256_loadu_ps(xr + k0), b0 = _mm256_loadu_ps(xr + k0 + 8);
        a1 = _mm256_loadu_ps(xr + k0 + 16), b1 = _mm256_loadu_ps(xr + k0 + 24);
      }
      for (int i = 0; i < R; ++i) {
        uint32_t bits;
        std::memcpy(&bits, meta[i] + k0 / 8, sizeof(bits));
        const __m256i all = _mm256_set1_epi32(static_cast<int>(bits));
        const __m256i idx0 = _mm256_srlv_epi32(all, sh0), idx1 = _mm256_srlv_epi32(all, sh1);
        __m256 lo, hi;
        if constexpr (kBf16) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v[i] + k0 / 2));
          lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), raw));
          hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), raw));
        } else {
          lo = _mm256_loadu_ps(v[i] + k0 / 2);
          hi = _mm256_loadu_ps(v[i] + k0 / 2 + 8);
        }
        const __m256 s0 = _mm256_blend_ps(_mm256_permutevar_ps(a0, idx0), _mm256_permutevar_ps(b0, idx0), 0xCC);
        const __m256 s1 = _mm256_blend_ps(_mm256_permutevar_ps(a1, idx1), _mm256_permutevar_ps(b1, idx1), 0xCC);
        acc[i][2 * u] = _mm256_fmadd_ps(s0, lo, acc[i][2 * u]);
        acc[i][2 * u + 1] = _mm256_fmadd_ps(s1, hi, acc[i][2 * u + 1]);
      }
    };
    int64_t kk = 0;
    for (; kk + 32 * U <= k; kk += 32 * U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) step(kk + 32 * u, u);
    }
    for (; kk + 32 <= k; kk += 32) step(kk, 0);
    for (int i = 0; i < R; ++i) {
      __m256 total = acc[i][0];
      for (int c = 1; c < 2 * U; ++c) total = _mm256_add_ps(total, acc[i][c]);
      const float b = bias ? bias[r + i] : 0.0f;
      y[r + i] = hsum(total) + p24_dot_tail(v[i], meta[i], x, kk / 4, k / 4) + b;
    }
  }
  static constexpr int kRows = 1, kChains = 2;
  // Returns false (nothing written) when its buffer cannot be allocated.
  static bool run(const SparseWeight& w, const V* values, const float* x, const float* bias, float* y,
                  int64_t row_begin, int64_t row_end) {
    const int64_t blocks = w.k / 32;
    float* xr = static_cast<float*>(kernel_buffer(sizeof(float) * (32 * blocks + 1)));
    if (xr == nullptr) return false;
    arrange(x, blocks, xr);
    int64_t r = row_begin;
    for (; r + kRows <= row_end; r += kRows) rows<kRows, kChains>(w, values, xr, x, bias, y, r);
    for (; r < row_end; ++r) rows<1, kChains>(w, values, xr, x, bias, y, r);
    free(xr);
    return true;
  }
};

// One row of x (decode), bitmask: per weight row, x is first packed to the row's stored entries (per mask byte one
// permute of its 8 inputs by the positions of its set bits (kCompress), stored at the running count: no mask, no
// multiply), then the row is one dense dot product of its stored values with the packed x (all lanes used, four
// chains). Measured side by side against the row pass (32 inputs a step, x permuted per byte to the values and
// multiplied with masked values; emulated AVX2 on the AMD EPYC, 1 thread, thread CPU time, load ~1-2), 70% bitmask:
// 4096->4096 bf16 1.46-1.60 -> 1.32-1.36 ms, fp32 1.95-2.22 -> 1.68-1.81 ms; 11008->4096 bf16 4.9 -> 4.4-4.6 ms.
// Tried, not faster: the packing of row r + 1 interleaved with the dot product of row r (16 values per 64 inputs;
// 1.41-1.59 ms bf16 4096->4096), the permute indices as int32 (kPack: 1.7 ms). The packing alone takes about
// 0.8 ms of the 1.3 (1.5 cycles per mask byte; also with the byte taken by bextr, or from memory, or bf16 inputs
// packed by 128-bit byte shuffles), the dot product alone 0.37 ms.
// bf16 values: x packed as bf16 (one 128-bit byte shuffle per mask byte, half the bytes in L1) and the products of
// pairs widened by a shift and an and (no shuffle): against fp32 packing, side by side (load 5), 70% bitmask bf16
// 4096->4096 1.30-1.39 -> 1.11-1.14 ms, 4096->11008 3.45-3.70 -> 2.98-3.09, 11008->4096 4.49-4.79 -> 4.05-4.15.
// While a row is packed, the next row's values are prefetched (64 bytes per 64 inputs for bf16, 128 for fp32:
// the whole row up to 50% stored; the packing otherwise leaves the memory idle): side by side,
// load 5, 70% bitmask fp32 4096->4096 1.73-1.89 -> 1.21-1.31 ms, 4096->11008 4.38-5.02 -> 3.04-3.38, 11008->4096
// 4.41-5.00 -> 3.22-3.55; bf16 11008->4096 3.97-4.17 -> 2.98-3.22, 4096->4096 and 4096->11008 the same (1.07-1.17,
// 2.89-3.06). Two rows ahead (bf16): no faster; two lines per 64 inputs for bf16: the same; the bf16 table offset
// (byte * 16) taken by one shift and one and instead of extracting the byte: no faster (1.13-1.21 vs 1.05-1.09 ms).
template <typename V>
struct BitmaskDecode {
  // Dot product of the n values v with the packed inputs xp (xp holds n + 8 floats).
  static VLMSPARSE_INLINE float dot(const V* v, const float* xp, int64_t n) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t e = 0;
    for (; e + 32 <= n; e += 32) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) acc[u] = _mm256_fmadd_ps(load8(v + e + 8 * u), _mm256_loadu_ps(xp + e + 8 * u), acc[u]);
    }
    for (; e + 8 <= n; e += 8) acc[0] = _mm256_fmadd_ps(load8(v + e), _mm256_loadu_ps(xp + e), acc[0]);
    if (e < n) {  // the last n - e: the loads read past them (values padding, xp's 8 spare floats), masked
      const __m256 keep = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - e)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      acc[1] = _mm256_fmadd_ps(_mm256_and_ps(load8(v + e), keep), _mm256_and_ps(_mm256_loadu_ps(xp + e), keep), acc[1]);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  }
  // x packed to the set bits of one row's mask (`meta`) into xp (k + 8 floats); returns the count.
  static VLMSPARSE_INLINE int64_t pack(const uint8_t* meta, const float* x, int64_t k, float* xp, const char* ahead) {
    float* out = xp;
    const int64_t full = k / 8;
    auto byte_step = [&](unsigned byte, int64_t b) __attribute__((always_inline)) {
      const __m128i pos = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompress.index[byte]));
      _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8 * b), _mm256_cvtepu8_epi32(pos)));
      out += popcount(byte);
    };
    int64_t b = 0;
    for (; b + 8 <= full; b += 8) {
      uint64_t word;
      std::memcpy(&word, meta + b, sizeof(word));
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) byte_step(static_cast<unsigned>(word >> (8 * q)) & 0xFF, b + q);
      _mm_prefetch(ahead + 16 * b, _MM_HINT_T0);  // the next row's values, 128 bytes per 64 inputs
      _mm_prefetch(ahead + 16 * b + 64, _MM_HINT_T0);
    }
    for (; b < full; ++b) byte_step(meta[b], b);
    if (8 * full < k) {  // the last byte: its bits within k, one by one (x ends there)
      const unsigned byte = meta[full];
      for (int64_t j = 0; 8 * full + j < k; ++j)
        if ((byte >> j) & 1) *out++ = x[8 * full + j];
    }
    return out - xp;
  }
  // bf16 values: x as bf16 (xb, k + 8 entries) packed by a byte shuffle (kCompress16) into xp (k + 16 entries, the
  // 16 after the count zero); returns the count.
  static VLMSPARSE_INLINE int64_t pack16(const uint8_t* meta, const uint16_t* xb, int64_t k, uint16_t* xp,
                                         const char* ahead) {
    uint16_t* out = xp;
    const int64_t full = k / 8;
    auto byte_step = [&](unsigned byte, int64_t b) __attribute__((always_inline)) {
      const __m128i control = _mm_load_si128(reinterpret_cast<const __m128i*>(kCompress16.index[byte]));
      const __m128i in = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 8 * b));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi8(in, control));
      out += popcount(byte);
    };
    int64_t b = 0;
    for (; b + 8 <= full; b += 8) {
      uint64_t word;
      std::memcpy(&word, meta + b, sizeof(word));
#pragma GCC unroll 8
      for (int q = 0; q < 8; ++q) byte_step(static_cast<unsigned>(word >> (8 * q)) & 0xFF, b + q);
      _mm_prefetch(ahead + 8 * b, _MM_HINT_T0);  // the next row's values, 64 bytes per 64 inputs
    }
    for (; b < full; ++b) byte_step(meta[b], b);
    if (8 * full < k) {
      const unsigned byte = meta[full];
      for (int64_t j = 0; 8 * full + j < k; ++j)
        if ((byte >> j) & 1) *out++ = xb[8 * full + j];
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_setzero_si256());
    return out - xp;
  }
  // bf16 values v times the packed bf16 inputs xp, n of them: 16 a step as 8 pairs, the even entries shifted up,
  // the odd ones with their low 16 bits cleared (exact fp32, no shuffle).
  static VLMSPARSE_INLINE float dot16(const uint16_t* v, const uint16_t* xp, int64_t n) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    auto step = [&](__m256i vv, __m256i xx, int c) __attribute__((always_inline)) {
      acc[c] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(vv, 16)),
                               _mm256_castsi256_ps(_mm256_slli_epi32(xx, 16)), acc[c]);
      acc[c + 1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(vv, high)),
                                   _mm256_castsi256_ps(_mm256_and_si256(xx, high)), acc[c + 1]);
    };
    auto load = [](const uint16_t* p) __attribute__((always_inline)) {
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    };
    int64_t e = 0;
    for (; e + 32 <= n; e += 32) {
      step(load(v + e), load(xp + e), 0);
      step(load(v + e + 16), load(xp + e + 16), 2);
    }
    if (e < n) {  // the last n - e (< 32): the values past them masked (the padding, or the next row's), xp zero
      const __m256i iota = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m256i rem = _mm256_set1_epi16(static_cast<int16_t>(n - e));
      step(_mm256_and_si256(load(v + e), _mm256_cmpgt_epi16(rem, iota)), load(xp + e), 0);
      if (e + 16 < n) {
        const __m256i rem16 = _mm256_set1_epi16(static_cast<int16_t>(n - e - 16));
        step(_mm256_and_si256(load(v + e + 16), _mm256_cmpgt_epi16(rem16, iota)), load(xp + e + 16), 2);
      }
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  }
  // Returns false (nothing written) when its buffers cannot be allocated.
  static bool run(const SparseWeight& w, const V* values, const float* x, const float* bias, float* y,
                  int64_t row_begin, int64_t row_end) {
    const int64_t k = w.k;
    if constexpr (sizeof(V) == 2) {
      // x holds bf16 numbers (the ops take x in the values' dtype), so its upper 16 bits are exact
      uint16_t* xb = static_cast<uint16_t*>(kernel_buffer(sizeof(uint16_t) * (2 * k + 48)));
      if (xb == nullptr) return false;
      uint16_t* xp = xb + k + 8;
      for (int64_t c = 0; c < k; ++c) {
        uint32_t bits;
        std::memcpy(&bits, x + c, sizeof(bits));
        xb[c] = static_cast<uint16_t>(bits >> 16);
      }
      for (int64_t r = row_begin; r < row_end; ++r) {
        const int64_t n = pack16(w.meta + r * w.meta_stride, xb, k, xp,
                                 reinterpret_cast<const char*>(values + w.row_offsets[r + 1 < row_end ? r + 1 : r]));
        y[r] = dot16(values + w.row_offsets[r], xp, n) + (bias ? bias[r] : 0.0f);
      }
      free(xb);
    } else {
      float* xp = static_cast<float*>(kernel_buffer(sizeof(float) * (k + 16)));
      if (xp == nullptr) return false;
      for (int64_t r = row_begin; r < row_end; ++r) {
        const int64_t n = pack(w.meta + r * w.meta_stride, x, k, xp,
                               reinterpret_cast<const char*>(values + w.row_offsets[r + 1 < row_end ? r + 1 : r]));
        y[r] = dot(values + w.row_offsets[r], xp, n) + (bias ? bias[r] : 0.0f);
      }
      free(xp);
    }
    return true;
  }
};

struct Avx2 {
  using Vec = __m256;
  static constexpr int64_t kPackedInputs = 16, kBitmaskInputs = 8, kBitmaskDecodeInputs = 32;
  // The column pass (column_rows, kLanes fp32 lanes) from this many rows of x on, else the row pass: the row pass
  // costs about its blocks of 4 rows of x, the column pass about the same from 2 to 8 rows of x (and ~1.2x that
  // at 16). Measured side by side, 4096->4096, 1 thread, thread CPU time, both builds vs dense limited to AVX2,
  // AMD EPYC (Zen 4), load 5.5: at M=5 rows 4.7-4.8 ms vs columns 5.8-6.1 (fp32 packed 2:4 and 70% bitmask),
  // at M=8 rows 5.1-6.4 vs columns 5.0-6.0; packed 2:4 bf16 rows 5.5 / 5.7 / 7.2 ms at M=8 / 9 / 12 vs columns
  // 5.6 / 7.4 / 7.5 (bench_cpu.py at M=16: rows 10.7, columns 7.4).
  static constexpr bool kColumnPass = true;
  static constexpr int64_t kLanes = 8;
  static constexpr int64_t column_from_rows(bool packed, bool bf16) { return packed && bf16 ? 12 : 8; }
  static VLMSPARSE_INLINE Vec bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static VLMSPARSE_INLINE Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static VLMSPARSE_INLINE void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static VLMSPARSE_INLINE Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  template <typename V>
  static const float* decode(const SparseWeight& w, const V* values, int64_t r, int64_t L, int32_t* cols,
                             float* buf) {
    return decode_row(w, values, r, L, cols, buf);
  }
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
  if (in.m == 1 && w.format == kPacked24) {  // decode: its own pass (P24Decode), else (no memory) the row pass
    const bool done = w.values_bf16 ? P24Decode<uint16_t>::run(w, static_cast<const uint16_t*>(w.values), in.x, bias,
                                                               y, row_begin, row_end)
                                    : P24Decode<float>::run(w, static_cast<const float*>(w.values), in.x, bias, y,
                                                            row_begin, row_end);
    if (done) return;
  }
  if (in.m == 1 && w.format == kBitmask) {  // decode: its own pass (BitmaskDecode), else (no memory) the row pass
    const bool done = w.values_bf16 ? BitmaskDecode<uint16_t>::run(w, static_cast<const uint16_t*>(w.values), in.x,
                                                                   bias, y, row_begin, row_end)
                                    : BitmaskDecode<float>::run(w, static_cast<const float*>(w.values), in.x, bias, y,
                                                                row_begin, row_end);
    if (done) return;
  }
  rows_for_tier<Avx2>(w, in, bias, y, row_begin, row_end);
}

void obs_avx2(const ObsBlock& b, int64_t row_begin, int64_t row_end) { obs_block(b, row_begin, row_end); }

}  // namespace vlmsparse_cpu

#if defined(__clang__)
#pragma clang attribute pop
#endif
