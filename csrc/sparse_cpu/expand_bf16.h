// The 16-bit masked expand of a bitmask row, shared by the tiers built for AVX-512 BW + VBMI2 (kernels_avx512bf16.cpp
// and kernels_amx.cpp) and included only by them. Internal linkage, as decode.h: each of those translation units
// keeps its own copy, compiled for its own target (kernels.h).
#pragma once
#include <immintrin.h>

#include "decode.h"

namespace vlmsparse_cpu {
namespace {

// The stored values (bf16 bits) of one bitmask row, expanded to its k columns (zeros where pruned) into out [k
// rounded up to 32]: one 16-bit masked expand by a 32-bit mask per 32 inputs, the stored values fetched
// kPrefetchBytes ahead (their address waits on the popcounts). The values hold 32 entries of padding after the
// last row (checked_offsets), so every 32-value load is whole; mask bits past k are dropped.
template <int64_t kPrefetchBytes>
VLMSPARSE_INLINE void expand_bitmask_row(const uint16_t* v, const uint8_t* meta, int64_t k, uint16_t* out) {
  for (int64_t col = 0; col < k; col += 32) {
    uint32_t bits;
    if (k - col >= 32) {
      std::memcpy(&bits, meta + col / 8, sizeof(bits));
    } else {  // the last 1-31 inputs
      const int rest = static_cast<int>(k - col);
      bits = 0;
      std::memcpy(&bits, meta + col / 8, static_cast<size_t>((rest + 7) / 8));
      bits &= (1u << rest) - 1;
    }
    _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
    _mm512_storeu_si512(out + col, _mm512_maskz_expand_epi16(static_cast<__mmask32>(bits), _mm512_loadu_si512(v)));
    v += popcount(bits);
  }
}

}  // namespace
}  // namespace vlmsparse_cpu
