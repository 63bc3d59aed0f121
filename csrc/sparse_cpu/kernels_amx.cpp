// AMX tier: bf16 weights times bf16 inputs on AMX tiles (TDPBF16PS) from kAmxFromRowsPacked24 /
// kAmxFromRowsBitmask rows of x; everything else (fp32, fewer rows of x) goes to the AVX-512 BF16 tier. Needs
// AMX-TILE, AMX-BF16 and Linux's permission for tile data (ops.cpp asks for it before it offers this tier), plus what
// the AVX-512 BF16 tier needs.
//
// Each panel of 16 weight rows is first expanded, row after row (the panel's stored values and meta are read in
// memory order), into dense bf16 rows in a buffer that stays in L2: a 16-bit masked expand of the stored values by a
// 32-bit mask per 32 inputs (the bitmask's bits; for packed 2:4 the mask made from the meta nibbles, i0 | i1 << 2 ->
// bits i0 and i1, by a table lookup). Each 32 inputs of the panel is then one A tile [16 weight rows, 32 inputs],
// multiplied with the B tile of the same inputs of 16 rows of x, stored in pairs (B[p][2t + j] = x[t, 32c + 2p + j],
// arranged once per call), into the C tile [16 weight rows, 16 rows of x] of that block of x. Two C tiles per block
// of x (even and odd tiles of inputs) keep two accumulation chains; with six C tiles a pass over the panel serves
// three blocks (48 rows of x). While a panel's products run, the next panel's stored values and meta are fetched
// into L2. Products are exact and summed in fp32 (as VDPBF16PS; bf16 denormals count as zero).
// Packed 2:4 nibbles with i0 >= i1 (no packing here writes them) cannot be expanded in order: a panel with one goes
// to the AVX-512 BF16 tier.
// Tried: expanding 256 inputs of the 16 rows at a time into an L1 buffer, each chunk's products right after it (16
// interleaved read streams, and no overlap of reads with products): slower for 70% bitmask (8.72 against 6.92 ms,
// 4096->11008, 16 rows of x, weights rotated over only 150 MiB of this machine's 480 MiB L3). Also tried: the next
// panel expanded between the current panel's pairs of tile products (two panel buffers), so that the core's expand
// work overlaps the tile unit's: slower (70% bitmask 8.9 against 6.3-6.5 ms, packed 2:4 7.95 against 7.5-7.8).
#if defined(__clang__)
#pragma clang attribute push(                                                                                 \
    __attribute__((target(                                                                                     \
        "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,avx2,fma,bmi,popcnt,amx-tile,amx-bf16"))), \
    apply_to = function)
#elif defined(__GNUC__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,avx2,fma,bmi,popcnt,amx-tile,amx-bf16")
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

constexpr int64_t kAmxPanel = 16;  // weight rows per panel: the rows of an A tile
constexpr int64_t kTileInputs = 32;  // inputs per A / B tile: 64 bytes of bf16 a row
constexpr int64_t kTokens = 16;     // rows of x per block: the columns of a C tile
constexpr int kMaxBlocks = 3;       // blocks of x per pass over the weight (two C tiles each, tmm2..tmm7)
// Rows of x from which the tiles run, by format. Measured side by side with the AVX-512 BF16 tier's paths (1 thread,
// thread CPU time, median of 15 calls, weights rotated over 512 MiB; 4096->11008 / 11008->4096 / 4096->4096, ms):
// packed 2:4 4 rows 6.13 -> 7.58 / 6.39 -> 7.69 / 2.51 -> 2.80, 8 rows 9.37 -> 7.43 / 10.83 -> 8.03 / 4.14 -> 3.08;
// 70% bitmask 2 rows 7.04 -> 6.28 / 5.40 -> 6.63 / 2.65 -> 2.43, 4 rows 8.78 -> 6.69 / 7.11 -> 6.73 / 3.34 -> 2.31.
// Again in bench_cpu.py --isas amx avx512bf16 (11008->4096 / 4096->11008 / 4096->4096, 4 rows): 70% bitmask 8.8 ->
// 9.0 / 8.6 -> 7.1 / 3.6 -> 3.1, 50% 7.9 -> 9.4 / 10.5 -> 8.9 / 3.8 -> 3.5: summed over the shapes a small gain
// (21.0 -> 19.2, 22.2 -> 21.8 ms), kept.
constexpr int64_t kAmxFromRowsPacked24 = 8;
constexpr int64_t kAmxFromRowsBitmask = 4;
constexpr int64_t kChunkTiles = 8;   // tiles of inputs of a packed 2:4 row whose masks are made at once
// Stored values fetched this far ahead while a row is expanded. Packed 2:4 bf16, 16 rows of x, 1 thread, thread CPU
// time, expansion alone (no products), weights rotated over 512 MiB: none 6.43 / 6.35 / 2.46 ms (4096->11008 /
// 11008->4096 / 4096->4096), 1 KiB ahead 5.91 / 5.75 / 2.27, 4 KiB 6.34 / 6.71 / 2.43.
constexpr int64_t kPrefetchBytes = 1024;

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Packed 2:4 meta byte (two nibbles i0 | i1 << 2) -> the byte of its 8 columns' mask, and whether both nibbles
// have i0 < i1 (0xFF) or not (0).
struct MetaTables {
  __m256i mask_lo, mask_hi, ordered_lo, ordered_hi;
};

MetaTables meta_tables() {
  alignas(32) uint8_t mask_lo[32], mask_hi[32], ordered_lo[32], ordered_hi[32];
  for (int i = 0; i < 32; ++i) {
    const int nibble = i & 15, i0 = nibble & 3, i1 = nibble >> 2;
    mask_lo[i] = static_cast<uint8_t>((1 << i0) | (1 << i1));
    mask_hi[i] = static_cast<uint8_t>(mask_lo[i] << 4);
    ordered_lo[i] = ordered_hi[i] = i0 < i1 ? 0xFF : 0;
  }
  auto load = [](const uint8_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); };
  return {load(mask_lo), load(mask_hi), load(ordered_lo), load(ordered_hi)};
}

// The 32-bit masks of `tiles` (<= kChunkTiles) tiles of inputs of one packed 2:4 row from tile c0 (bit j of
// masks[c] = column 32 (c0 + c) + j kept), from its meta. Past the row's last group the masks hold bits of
// ordered pairs: the expand puts nothing there (the caller's load of stored values is zero past the row). False when
// a nibble of these groups has i0 >= i1.
VLMSPARSE_INLINE bool p24_masks(const MetaTables& t, const uint8_t* meta, int64_t k, int64_t c0, int64_t tiles,
                                uint32_t* masks) {
  const int64_t groups = k / 4, byte0 = c0 * 4, g_end = (c0 + tiles) * 8 < groups ? (c0 + tiles) * 8 : groups;
  const int64_t bytes = (g_end - c0 * 8 + 1) / 2;
  __m256i m;
  if (bytes == 32) {
    m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(meta + byte0));
  } else {  // the row's end: bytes past it, and the high nibble past an odd group count, read as 0x4 (0 | 1 << 2)
    alignas(32) uint8_t copy[32];
    std::memset(copy, 0x44, sizeof(copy));
    std::memcpy(copy, meta + byte0, static_cast<size_t>(bytes));
    if ((g_end - c0 * 8) % 2) copy[bytes - 1] = static_cast<uint8_t>((copy[bytes - 1] & 0x0F) | 0x40);
    m = _mm256_load_si256(reinterpret_cast<const __m256i*>(copy));
  }
  const __m256i lo = _mm256_and_si256(m, _mm256_set1_epi8(0x0F));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(m, 4), _mm256_set1_epi8(0x0F));
  const __m256i ordered =
      _mm256_and_si256(_mm256_shuffle_epi8(t.ordered_lo, lo), _mm256_shuffle_epi8(t.ordered_hi, hi));
  if (_mm256_movemask_epi8(ordered) != -1) return false;
  const __m256i bits = _mm256_or_si256(_mm256_shuffle_epi8(t.mask_lo, lo), _mm256_shuffle_epi8(t.mask_hi, hi));
  alignas(32) uint32_t all[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(all), bits);
  for (int64_t c = 0; c < tiles; ++c) masks[c] = all[c];
  return true;
}

// Two byte ranges (the next panel's stored values and its meta) fetched into L2 during a panel's products.
struct Prefetch {
  const char* begin[2];
  int64_t bytes[2];
};

// The products of the panel (A tile c at a + 32c, rows `stride` apart) with NB blocks of x (B tile of block b and
// tile c at xv + (b * tiles + c) * 512): even tiles into C tile 2 + 2b, odd ones into 3 + 2b. (Tile numbers are
// immediates, hence the unrolled blocks.) `next` is fetched a few lines per pair of tiles.
template <int NB>
VLMSPARSE_INLINE void panel_products(const uint16_t* a, int64_t stride, const uint16_t* xv, int64_t tiles,
                                     const Prefetch& next) {
  constexpr int64_t kTileElems = kAmxPanel * kTileInputs;  // 512 bf16, 1 KiB
  const int64_t a_stride = stride * static_cast<int64_t>(sizeof(uint16_t));
  const int64_t lines0 = (next.bytes[0] + 63) / 64, lines1 = (next.bytes[1] + 63) / 64;
  const int64_t per_step = (lines0 + lines1) / ((tiles + 1) / 2) + 1;
  int64_t line = 0;
  for (int64_t c = 0; c < tiles; c += 2) {
    for (int64_t q = 0; q < per_step; ++q, ++line) {
      if (line < lines0) {
        _mm_prefetch(next.begin[0] + line * 64, _MM_HINT_T1);
      } else if (line < lines0 + lines1) {
        _mm_prefetch(next.begin[1] + (line - lines0) * 64, _MM_HINT_T1);
      }
    }
    _tile_loadd(0, a + c * kTileInputs, a_stride);
    _tile_loadd(1, xv + c * kTileElems, 64);
    _tile_dpbf16ps(2, 0, 1);
    if constexpr (NB > 1) {
      _tile_loadd(1, xv + (tiles + c) * kTileElems, 64);
      _tile_dpbf16ps(4, 0, 1);
    }
    if constexpr (NB > 2) {
      _tile_loadd(1, xv + (2 * tiles + c) * kTileElems, 64);
      _tile_dpbf16ps(6, 0, 1);
    }
    if (c + 1 == tiles) break;
    _tile_loadd(0, a + (c + 1) * kTileInputs, a_stride);
    _tile_loadd(1, xv + (c + 1) * kTileElems, 64);
    _tile_dpbf16ps(3, 0, 1);
    if constexpr (NB > 1) {
      _tile_loadd(1, xv + (tiles + c + 1) * kTileElems, 64);
      _tile_dpbf16ps(5, 0, 1);
    }
    if constexpr (NB > 2) {
      _tile_loadd(1, xv + (2 * tiles + c + 1) * kTileElems, 64);
      _tile_dpbf16ps(7, 0, 1);
    }
  }
}

template <int NB>
VLMSPARSE_INLINE void zero_accumulators() {
  _tile_zero(2);
  _tile_zero(3);
  if constexpr (NB > 1) {
    _tile_zero(4);
    _tile_zero(5);
  }
  if constexpr (NB > 2) {
    _tile_zero(6);
    _tile_zero(7);
  }
}

// C tiles 2 + 2b and 3 + 2b of each block, stored to out [NB][2][16 weight rows][16 rows of x].
template <int NB>
VLMSPARSE_INLINE void store_accumulators(float* out) {
  constexpr int64_t kTileFloats = kAmxPanel * kTokens;
  _tile_stored(2, out, 64);
  _tile_stored(3, out + kTileFloats, 64);
  if constexpr (NB > 1) {
    _tile_stored(4, out + 2 * kTileFloats, 64);
    _tile_stored(5, out + 3 * kTileFloats, 64);
  }
  if constexpr (NB > 2) {
    _tile_stored(6, out + 4 * kTileFloats, 64);
    _tile_stored(7, out + 5 * kTileFloats, 64);
  }
}

// One packed 2:4 row expanded to its columns (bf16 bits, zeros where pruned) into out [tiles * 32]. False (out
// partly written) when a nibble has i0 >= i1.
VLMSPARSE_INLINE bool expand_p24_row(const MetaTables& tables, const uint16_t* v, const uint8_t* meta, int64_t k,
                                     int64_t tiles, uint16_t* out) {
  for (int64_t c0 = 0; c0 < tiles; c0 += kChunkTiles) {
    const int64_t chunk = tiles - c0 < kChunkTiles ? tiles - c0 : kChunkTiles;
    uint32_t masks[kChunkTiles];
    for (int64_t line = 0; line < kChunkTiles * 32 / 64; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(v + c0 * 16) + kPrefetchBytes + 64 * line, _MM_HINT_T0);
    }
    _mm_prefetch(reinterpret_cast<const char*>(meta + c0 * 4) + kPrefetchBytes / 8, _MM_HINT_T0);
    if (!p24_masks(tables, meta, k, c0, chunk, masks)) return false;
    for (int64_t c = 0; c < chunk; ++c) {
      const int64_t col = (c0 + c) * kTileInputs;
      const int64_t stored = k - col >= kTileInputs ? 16 : (k - col) / 2;
      const __m256i values = stored == 16
                                 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + col / 2))
                                 : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << stored) - 1), v + col / 2);
      _mm512_store_si512(out + col, _mm512_maskz_expand_epi16(masks[c], _mm512_castsi256_si512(values)));
    }
  }
  return true;
}

struct Buffers {
  uint16_t* xv;     // x in B tiles: [blocks][tiles][16 pairs of inputs][16 rows of x][2]
  uint16_t* panel;  // the panel's rows expanded: [16][stride]
  float* c;         // stored C tiles: [kMaxBlocks][2][16][16]
};

// y rows t0 .. t0 + tokens (NB blocks of x from xv) for the expanded panel [r0, r0 + rows).
template <int NB>
void panel_pass(const Buffers& buf, int64_t stride, const uint16_t* xv, int64_t tiles, int64_t n, int64_t r0,
                int64_t rows, const float* bias, float* y, int64_t t0, int64_t tokens, const Prefetch& next) {
  zero_accumulators<NB>();
  panel_products<NB>(buf.panel, stride, xv, tiles, next);
  store_accumulators<NB>(buf.c);
  constexpr int64_t kTileFloats = kAmxPanel * kTokens;
  for (int64_t b = 0; b < NB; ++b) {
    const float* even = buf.c + 2 * b * kTileFloats;
    const float* odd = even + kTileFloats;
    for (int64_t t = b * kTokens; t < tokens && t < (b + 1) * kTokens; ++t) {
      float* yt = y + (t0 + t) * n + r0;
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t at = i * kTokens + t - b * kTokens;
        yt[i] = even[at] + odd[at] + (bias ? bias[r0 + i] : 0.0f);
      }
    }
  }
}

// x [m, k] bf16 into B tiles: xv[(b * tiles + c) * 512 + p * 32 + 2t + j] = x[16b + t, 32c + 2p + j], zero past
// m and k.
void arrange_x(const uint16_t* x, int64_t m, int64_t k, int64_t tiles, uint16_t* xv) {
  const int64_t blocks = (m + kTokens - 1) / kTokens;
  std::memset(xv, 0, sizeof(uint16_t) * blocks * tiles * kAmxPanel * kTileInputs);
  for (int64_t t = 0; t < m; ++t) {
    const uint16_t* row = x + t * k;
    uint16_t* block = xv + (t / kTokens) * tiles * kAmxPanel * kTileInputs + 2 * (t % kTokens);
    for (int64_t col = 0; col < k; ++col) {
      block[(col / kTileInputs) * kAmxPanel * kTileInputs + ((col % kTileInputs) / 2) * kTileInputs + (col & 1)] =
          row[col];
    }
  }
}

// The rows [row_begin, row_end) of y for bf16 weights and m rows of bf16 x on AMX tiles. False (nothing written)
// when its buffers cannot be allocated.
bool amx_rows(const SparseWeight& w, const uint16_t* values, const uint16_t* x, int64_t m, const float* bias,
              float* y, int64_t row_begin, int64_t row_end) {
  const int64_t k = w.k, n = w.n, tiles = (k + kTileInputs - 1) / kTileInputs, blocks = (m + kTokens - 1) / kTokens;
  // expanded rows one cache line more than whole tiles apart: a stride of a multiple of 4 KiB puts the 16 rows of
  // an A tile in one cache set
  const int64_t stride = tiles * kTileInputs + 32;
  Buffers buf{static_cast<uint16_t*>(kernel_buffer(sizeof(uint16_t) * blocks * tiles * kAmxPanel * kTileInputs, 64)),
              static_cast<uint16_t*>(kernel_buffer(sizeof(uint16_t) * kAmxPanel * stride, 64)),
              static_cast<float*>(kernel_buffer(sizeof(float) * kMaxBlocks * 2 * kAmxPanel * kTokens, 64))};
  if (buf.xv == nullptr || buf.panel == nullptr || buf.c == nullptr) {
    free(buf.c);
    free(buf.panel);
    free(buf.xv);
    return false;
  }
  arrange_x(x, m, k, tiles, buf.xv);
  TileConfig config{};
  config.palette_id = 1;
  for (int tile = 0; tile < 8; ++tile) {
    config.rows[tile] = kAmxPanel;
    config.colsb[tile] = 64;
  }
  _tile_loadconfig(&config);
  const MetaTables tables = meta_tables();
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kAmxPanel) {
    const int64_t rows = row_end - r0 < kAmxPanel ? row_end - r0 : kAmxPanel;
    bool ordered = true;
    for (int64_t i = 0; i < rows && ordered; ++i) {
      const uint8_t* meta = w.meta + (r0 + i) * w.meta_stride;
      uint16_t* out = buf.panel + i * stride;
      if (w.format == kPacked24) {
        ordered = expand_p24_row(tables, values + (r0 + i) * (k / 2), meta, k, tiles, out);
      } else {
        expand_bitmask_row<kPrefetchBytes>(values + w.row_offsets[r0 + i], meta, k, out);
      }
    }
    if (!ordered) {  // a packed nibble with i0 >= i1: this panel by the AVX-512 BF16 tier
      _tile_release();
      const Input in{nullptr, x, m};
      rows_avx512bf16(w, in, bias, y, r0, r0 + rows);
      _tile_loadconfig(&config);
      continue;
    }
    for (int64_t i = rows; i < kAmxPanel; ++i) std::memset(buf.panel + i * stride, 0, sizeof(uint16_t) * stride);
    // the next panel's stored values and meta, fetched into L2 while this one's products run
    Prefetch next{};
    const int64_t r1 = r0 + rows, r2 = row_end - r1 < kAmxPanel ? row_end : r1 + kAmxPanel;
    if (r1 < r2) {
      const int64_t v1 = w.format == kPacked24 ? r1 * (k / 2) : w.row_offsets[r1];
      const int64_t v2 = w.format == kPacked24 ? r2 * (k / 2) : w.row_offsets[r2];
      next = Prefetch{{reinterpret_cast<const char*>(values + v1),
                       reinterpret_cast<const char*>(w.meta + r1 * w.meta_stride)},
                      {(v2 - v1) * 2, (r2 - r1) * w.meta_stride}};
    }
    for (int64_t b = 0; b < blocks; b += kMaxBlocks) {
      const int64_t nb = blocks - b < kMaxBlocks ? blocks - b : kMaxBlocks;
      const int64_t t0 = b * kTokens, tokens = m - t0 < nb * kTokens ? m - t0 : nb * kTokens;
      const uint16_t* xv = buf.xv + b * tiles * kAmxPanel * kTileInputs;
      if (nb == 1) {
        panel_pass<1>(buf, stride, xv, tiles, n, r0, rows, bias, y, t0, tokens, b == 0 ? next : Prefetch{});
      } else if (nb == 2) {
        panel_pass<2>(buf, stride, xv, tiles, n, r0, rows, bias, y, t0, tokens, b == 0 ? next : Prefetch{});
      } else {
        panel_pass<3>(buf, stride, xv, tiles, n, r0, rows, bias, y, t0, tokens, b == 0 ? next : Prefetch{});
      }
    }
  }
  _tile_release();
  free(buf.c);
  free(buf.panel);
  free(buf.xv);
  return true;
}

}  // namespace

void rows_amx(const SparseWeight& w, const Input& in, const float* bias, float* y, int64_t row_begin,
              int64_t row_end) {
  const int64_t from_rows = w.format == kPacked24 ? kAmxFromRowsPacked24 : kAmxFromRowsBitmask;
  if (w.values_bf16 && in.x_bf16 != nullptr && in.m >= from_rows &&
      amx_rows(w, static_cast<const uint16_t*>(w.values), in.x_bf16, in.m, bias, y, row_begin, row_end)) {
    return;
  }
  rows_avx512bf16(w, in, bias, y, row_begin, row_end);
}

}  // namespace vlmsparse_cpu

#if defined(__clang__)
#pragma clang attribute pop
#endif
