// Scalar helpers every tier includes. Everything here has internal linkage (static inline / anonymous
// namespace), so each tier's translation unit keeps its own copy compiled for its own instruction set.
#pragma once
#include <cstring>

#include "kernels.h"

namespace vlmsparse_cpu {
namespace {

inline float bf16_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &word, sizeof(out));
  return out;
}

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }

// Tail of a packed 2:4 row dot product: groups [g_begin, k/4) of row `v`/`meta` against x.
template <typename V>
inline float p24_dot_tail(const V* v, const uint8_t* meta, const float* x, int64_t g_begin, int64_t groups) {
  float sum = 0.0f;
  for (int64_t g = g_begin; g < groups; ++g) {
    const int nibble = (meta[g >> 1] >> ((g & 1) * 4)) & 0xF;
    sum += load1(v + 2 * g) * x[4 * g + (nibble & 3)] + load1(v + 2 * g + 1) * x[4 * g + (nibble >> 2)];
  }
  return sum;
}

// Tail of a bitmask row dot product: columns [col_begin, k), `v` the row's next stored value.
template <typename V>
inline float bitmask_dot_tail(const V* v, const uint8_t* meta, const float* x, int64_t col_begin, int64_t k) {
  float sum = 0.0f;
  for (int64_t col = col_begin; col < k; ++col) {
    if ((meta[col >> 3] >> (col & 7)) & 1) sum += load1(v++) * x[col];
  }
  return sum;
}

inline int popcount(unsigned bits) { return __builtin_popcount(bits); }

}  // namespace
}  // namespace vlmsparse_cpu

namespace vlmsparse_cpu {
namespace {

// The row loop of a vector tier: for each weight row in [row_begin, row_end), `Tier::dot<V, MB>` runs one
// pass over the row per block of up to kDotRows rows of x (the row stays in L1 between blocks).
template <class Tier, typename V>
void tier_rows(const SparseWeight& w, const V* values, const Input& in, const float* bias, float* y,
               int64_t row_begin, int64_t row_end) {
  const int64_t n = w.n, k = w.k;
  float out[kDotRows];
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float b = bias ? bias[r] : 0.0f;
    for (int64_t m0 = 0; m0 < in.m; m0 += kDotRows) {
      const int64_t block = in.m - m0 < kDotRows ? in.m - m0 : kDotRows;
      const float* x = in.x + m0 * k;
      switch (block) {
        case 1: Tier::template dot<V, 1>(w, values, x, r, out); break;
        case 2: Tier::template dot<V, 2>(w, values, x, r, out); break;
        case 3: Tier::template dot<V, 3>(w, values, x, r, out); break;
        default: Tier::template dot<V, 4>(w, values, x, r, out); break;
      }
      for (int64_t j = 0; j < block; ++j) y[(m0 + j) * n + r] = out[j] + b;
    }
  }
}

template <class Tier>
void rows_for_tier(const SparseWeight& w, const Input& in, const float* bias, float* y, int64_t row_begin,
                   int64_t row_end) {
  if (w.values_bf16) {
    tier_rows<Tier>(w, static_cast<const uint16_t*>(w.values), in, bias, y, row_begin, row_end);
  } else {
    tier_rows<Tier>(w, static_cast<const float*>(w.values), in, bias, y, row_begin, row_end);
  }
}

}  // namespace
}  // namespace vlmsparse_cpu
