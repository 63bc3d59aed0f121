// SparseGPT's per-column OBS steps inside one block of columns (vlmsparse/pruning/algorithms.py,
// _sparsegpt_columns; the Python loop _columns_of_block is the fallback and the semantics), on the rows
// [row_begin, row_end) of the transposed weight block. Every step is independent per weight row, so rows are
// split over threads. Per column i of the block (d = U[i, i]):
//   N:M, at the first column of each group of m: pruned = the m - n lowest of w^2 / d^2 in the group (a tie goes
//     to the lower column: it is kept first), as vlmsparse.sparsity.keep_top_dim0;
//   err = w / d where pruned, else 0 (w times the reciprocal of d, as the Python loop);  w = 0 where pruned;
//   w_j -= U[i, j] * err for every later column j of the block.
// Everything here has internal linkage: each ISA tier's translation unit includes it and compiles its own copy.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace vlmsparse_cpu {
namespace {

template <typename T>
void obs_select_nm(const ObsBlock& b, const T* W, const T* U, int64_t i, int64_t r0, int64_t r1) {
  const int64_t m = b.nm_m, count = b.count, rows = b.rows;
  T d2[kObsMaxM];
  for (int64_t j = 0; j < m; ++j) {
    const T d = U[(i + j) * count + (i + j)];
    d2[j] = d * d;
  }
  for (int64_t r = r0; r < r1; ++r) {
    T score[kObsMaxM];
    for (int64_t j = 0; j < m; ++j) {
      const T w = W[(i + j) * rows + r];
      score[j] = (w * w) / d2[j];
    }
    for (int64_t j = 0; j < m; ++j) {
      int64_t rank = 0;  // how many entries of the group beat entry j
      for (int64_t l = 0; l < m; ++l) rank += l < j ? score[l] >= score[j] : (l > j && score[l] > score[j]);
      b.pruned[(i + j) * rows + r] = rank >= b.nm_n;
    }
  }
}

template <typename T>
void obs_rows(const ObsBlock& b, int64_t r0, int64_t r1) {
  T* W = static_cast<T*>(b.w);
  T* E = static_cast<T*>(b.err);
  const T* U = static_cast<const T*>(b.u);
  const int64_t count = b.count, rows = b.rows, len = r1 - r0;
  for (int64_t i = 0; i < count; ++i) {
    if (b.nm_m > 0 && i % b.nm_m == 0) obs_select_nm<T>(b, W, U, i, r0, r1);
    T* w = W + i * rows + r0;
    T* e = E + i * rows + r0;
    const bool* p = b.pruned + i * rows + r0;
    const T inv_d = T(1) / U[i * count + i];
    for (int64_t r = 0; r < len; ++r) {
      const T err = p[r] ? w[r] * inv_d : T(0);
      w[r] = p[r] ? T(0) : w[r];
      e[r] = err;
    }
    for (int64_t j = i + 1; j < count; ++j) {
      const T u = U[i * count + j];
      T* wj = W + j * rows + r0;
      for (int64_t r = 0; r < len; ++r) wj[r] -= u * e[r];
    }
  }
}

inline void obs_block(const ObsBlock& b, int64_t row_begin, int64_t row_end) {
  if (b.fp64) {
    obs_rows<double>(b, row_begin, row_end);
  } else {
    obs_rows<float>(b, row_begin, row_end);
  }
}

}  // namespace
}  // namespace vlmsparse_cpu
