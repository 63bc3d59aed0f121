// Scalar tier: one dot product per weight row and row of x, over the row's stored entries. Portable C++:
// the semantics every vector tier matches.
#include "decode.h"
#include "obs.h"

namespace vlmsparse_cpu {
namespace {

// Four partial sums (group or byte index mod 4), as a vector tier's lanes: a long row summed in one chain
// drifts further from the exact sum than torch's own (blocked) reductions do.
template <typename V>
float p24_dot(const V* v, const uint8_t* meta, const float* x, int64_t groups) {
  float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t g = 0; g < groups; ++g) {
    const int nibble = (meta[g >> 1] >> ((g & 1) * 4)) & 0xF;
    part[g & 3] += load1(v + 2 * g) * x[4 * g + (nibble & 3)] + load1(v + 2 * g + 1) * x[4 * g + (nibble >> 2)];
  }
  return (part[0] + part[1]) + (part[2] + part[3]);
}

template <typename V>
float bitmask_dot(const V* v, const uint8_t* meta, const float* x, int64_t k) {
  float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t col = 0; col < k; ++col) {
    if ((meta[col >> 3] >> (col & 7)) & 1) part[(col >> 3) & 3] += load1(v++) * x[col];
  }
  return (part[0] + part[1]) + (part[2] + part[3]);
}

template <typename V>
void rows(const SparseWeight& w, const V* values, const Input& in, const float* bias, float* y, int64_t row_begin,
          int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* meta = w.meta + r * w.meta_stride;
    for (int64_t m = 0; m < in.m; ++m) {
      const float* xm = in.x + m * w.k;
      const float sum = w.format == kPacked24 ? p24_dot(values + r * (w.k / 2), meta, xm, w.k / 4)
                                              : bitmask_dot(values + w.row_offsets[r], meta, xm, w.k);
      y[m * w.n + r] = sum + (bias ? bias[r] : 0.0f);
    }
  }
}

}  // namespace

void rows_scalar(const SparseWeight& w, const Input& in, const float* bias, float* y, int64_t row_begin,
                 int64_t row_end) {
  if (w.values_bf16) {
    rows(w, static_cast<const uint16_t*>(w.values), in, bias, y, row_begin, row_end);
  } else {
    rows(w, static_cast<const float*>(w.values), in, bias, y, row_begin, row_end);
  }
}

void obs_scalar(const ObsBlock& b, int64_t row_begin, int64_t row_end) { obs_block(b, row_begin, row_end); }

}  // namespace vlmsparse_cpu
