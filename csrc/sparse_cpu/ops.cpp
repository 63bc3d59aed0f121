// torch glue: the ops vlmsparse_native::packed24_linear / bitmask_linear on CPU tensors, the choice of ISA
// tier (the best the CPU has, or VLMSPARSE_CPU_ISA, or set_isa), and the thread split over output rows.
//
// Inputs x [..., k] (fp32 or bf16) go to fp32 once per call (m * k values, small next to the weight);
// values stay in their dtype and are widened in registers; y is computed in fp32 and returned in x's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include <unistd.h>  // sysconf (and syscall)

#include "kernels.h"

#if defined(__x86_64__) && defined(VLMSPARSE_X86_TIERS)
#include <cpuid.h>
#include <sys/syscall.h>
#endif

namespace vlmsparse_cpu {
namespace {

const char* const kIsaNames[] = {"scalar", "avx2", "avx512", "avx512bf16", "amx"};
constexpr int kIsaCount = 5;
constexpr int kIsaBf16 = 3;  // bf16 weights and inputs through VDPBF16PS
constexpr int kIsaAmx = 4;   // the same, and from a few rows of x on AMX tiles (kernels_amx.cpp)

#if defined(__x86_64__) && defined(VLMSPARSE_X86_TIERS) && defined(VLMSPARSE_AMX)
// AMX-TILE and AMX-BF16 in CPUID, and Linux's permission to use tile data (asked once; a kernel without AMX
// support, or before 5.16, refuses, and the tier is not offered).
bool amx_usable() {
  static const bool usable = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amx_bf16 = (edx >> 22) & 1, amx_tile = (edx >> 24) & 1;
    if (!amx_bf16 || !amx_tile) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, ...)
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
}
#endif

bool cpu_has(int isa) {
#if defined(__x86_64__) && defined(VLMSPARSE_X86_TIERS)
  __builtin_cpu_init();
  if (isa == 1) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (isa == 2) return avx512;
  const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2");
  if (isa == kIsaBf16) return bf16;
#if defined(VLMSPARSE_AMX)  // setup.py: the compiler knows AMX
  if (isa == kIsaAmx) return bf16 && amx_usable();
#endif
#endif
  return isa == 0;
}

int isa_index(const std::string& name) {
  for (int i = 0; i < kIsaCount; ++i) {
    if (name == kIsaNames[i]) return i;
  }
  TORCH_CHECK(false, "vlmsparse native CPU kernels: unknown ISA level '", name,
              "'; allowed: scalar, avx2, avx512, avx512bf16, amx");
  return 0;
}

int checked_isa(const std::string& name, const char* where) {
  const int isa = isa_index(name);
  TORCH_CHECK(cpu_has(isa), "vlmsparse native CPU kernels (", where, "): this CPU or build has no '", name,
              "' tier");
  return isa;
}

int best_isa() {
  const char* env = std::getenv("VLMSPARSE_CPU_ISA");
  if (env != nullptr && env[0] != '\0') return checked_isa(env, "VLMSPARSE_CPU_ISA");
  for (int isa = kIsaCount - 1; isa > 0; --isa) {
    if (cpu_has(isa)) return isa;
  }
  return 0;
}

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{best_isa()};
  return isa;
}

RowsFn rows_fn(int isa) {
#if defined(__x86_64__) && defined(VLMSPARSE_X86_TIERS)
#if defined(VLMSPARSE_AMX)
  if (isa == kIsaAmx) return rows_amx;
#endif
  if (isa == kIsaBf16) return rows_avx512bf16;
  if (isa == 2) return rows_avx512;
  if (isa == 1) return rows_avx2;
#endif
  return rows_scalar;
}

std::string isa() { return kIsaNames[current_isa().load()]; }

std::string set_isa(const std::string& name) {
  const int previous = current_isa().exchange(checked_isa(name, "set_isa"));
  return kIsaNames[previous];
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = 0; i < kIsaCount; ++i) {
    if (cpu_has(i)) out.emplace_back(kIsaNames[i]);
  }
  return out;
}

void check_common(const char* op, const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                  int64_t n, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && meta.device().is_cpu(), op,
              ": needs CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": values dtype ", values.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(0) == n, op,
              ": meta must be uint8 [", n, ", ceil(in/8)], got ", meta.scalar_type(), " ", meta.sizes());
  TORCH_CHECK(meta.size(1) == (x.size(-1) + 7) / 8, op, ": meta has ", meta.size(1), " bytes per row; ",
              x.size(-1), " inputs need ", (x.size(-1) + 7) / 8);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == n, op, ": bias must be a CPU [",
                n, "] tensor, got ", bias->sizes());
  }
}

// Rows of x a kernel call takes at a time. Every kernel walks its weight rows in groups and re-reads all the rows
// of x it was given for each group, so x must stay in L2; but each call also reads (and decodes or expands) the
// whole weight once. So all rows at once while x fills at most 3/4 of L2, else chunks of at most half of L2 (as
// few as that takes, of equal rows rounded up to 16, the kernels' blocks; the last one shorter). Measured side by
// side (thread CPU time, 1 thread, Intel Xeon with 2 MiB L2, weights rotated over 512 MiB, median of >= 4 calls),
// all rows at once -> chunks of 1 MiB:
// - 4096->11008: packed 2:4 fp32 M = 128 135 -> 105 ms, M = 256 431 -> 214, M = 512 881 -> 415-449; 70% bitmask
//   fp32 M = 256 276 -> 133; packed 2:4 bf16 (amx) M = 256 52 -> 34, M = 512 132 -> 65-71;
// - 11008->4096: packed 2:4 fp32 M = 64 97 -> 60, M = 128 214 -> 121; bf16 M = 128 34 -> 30;
// - but chunks cost where x still fits: 11008->4096 bf16 M = 48 (1 MiB of x) 10.2 -> 15.8 ms (packed 2:4), 70%
//   bitmask fp32 M = 32 24.8 -> 32.4. Chunks of 1.5 MiB instead were 10-20% slower at 512-1024 rows (packed 2:4
//   fp32 M = 512 490 ms, bf16 M = 1024 182 against 138-150).
std::atomic<int64_t> g_l2_bytes{0};  // set_l2_bytes (a test hook); 0: this CPU's (sysconf)

int64_t x_chunk_rows(int64_t m, int64_t x_row_bytes) {
  static const int64_t cpu_l2 = [] {
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);  // 0 or -1 where unknown
    return l2 > 0 ? static_cast<int64_t>(l2) : int64_t{1} << 20;
  }();
  const int64_t set = g_l2_bytes.load(std::memory_order_relaxed);
  const int64_t l2 = set > 0 ? set : cpu_l2;
  const int64_t row_bytes = std::max<int64_t>(x_row_bytes, 1);
  if (m * row_bytes <= l2 / 4 * 3) return std::max<int64_t>(m, 1);
  const int64_t fit = std::max<int64_t>(l2 / 2 / row_bytes, 1);
  const int64_t chunks = (m + fit - 1) / fit;
  const int64_t rows = (m + chunks - 1) / chunks;
  return (rows + 15) / 16 * 16;
}

// A test hook: the L2 bytes that x_chunk_rows assumes (0: this CPU's), so that tests reach several chunks with
// small shapes. Returns the previous setting.
int64_t set_l2_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_l2_bytes: bytes must be >= 0 (0: this CPU's L2), got ", bytes);
  return g_l2_bytes.exchange(bytes);
}

// y [..., n] = x [..., k] @ W.T + bias for the sparse weight `w` (its pointers filled in by the caller), the rows
// of x in chunks (x_chunk_rows), the weight rows of each chunk split over threads.
at::Tensor run(SparseWeight w, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  const int64_t k = w.k, n = w.n;
  const int isa = current_isa().load();
  // The bf16 tiers read bf16 inputs as they are; every other path reads them in fp32.
  const bool bf16_inputs = isa >= kIsaBf16 && x.scalar_type() == at::kBFloat16;
  const at::Tensor x2 = bf16_inputs ? x.reshape({-1, k}).contiguous() : x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t m = x2.size(0);
  at::Tensor y = at::empty({m, n}, x2.options().dtype(at::kFloat));
  at::Tensor bias32;
  if (bias.has_value()) bias32 = bias->to(at::kFloat).contiguous();
  const Input in{bf16_inputs ? nullptr : x2.data_ptr<float>(),
                 bf16_inputs ? static_cast<const uint16_t*>(x2.data_ptr()) : nullptr, m};
  const float* b = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  const RowsFn fn = rows_fn(isa);
  if (n > 0) {
    const int64_t chunk = x_chunk_rows(m, k * (bf16_inputs ? 2 : 4));
    for (int64_t m0 = 0; m0 < m;) {
      const int64_t rows = std::min(chunk, m - m0);
      const Input part{in.x ? in.x + m0 * k : nullptr, in.x_bf16 ? in.x_bf16 + m0 * k : nullptr, rows};
      float* part_out = out + m0 * n;
      // Weight rows in chunks of >= 16 (a chunk reads >= 16 rows of weights, KBs, before a thread moves on).
      at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) { fn(w, part, b, part_out, begin, end); });
      m0 += rows;
    }
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return y.to(x.scalar_type()).view(shape);
}

// A checked sparse weight for x: the contiguous tensors its pointers read, kept alive with it.
struct CheckedWeight {
  at::Tensor values, meta, offsets;
  SparseWeight w;
};

CheckedWeight checked_packed24(const char* op, const at::Tensor& x, const at::Tensor& values,
                               const at::Tensor& meta, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 4 == 0, op, ": in-features must be a multiple of 4, got ",
              x.sizes());
  TORCH_CHECK(values.dim() == 2 && values.size(1) * 2 == x.size(-1), op, ": values must be [out, ",
              x.size(-1) / 2, "], got ", values.sizes());
  const int64_t n = values.size(0);
  check_common(op, x, values, meta, n, bias);
  CheckedWeight c{values.contiguous(), meta.contiguous(), at::Tensor(), {}};
  c.w = SparseWeight{kPacked24, n, x.size(-1), c.values.data_ptr(), c.values.scalar_type() == at::kBFloat16,
                     c.meta.data_ptr<uint8_t>(), c.meta.size(1), nullptr};
  return c;
}

at::Tensor packed24_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                           const std::optional<at::Tensor>& bias) {
  const CheckedWeight c = checked_packed24("vlmsparse_native::packed24_linear", x, values, meta, bias);
  return run(c.w, x, bias);
}

// Row offsets of a bitmask weight with n rows: int64 [n + 1], from 0, not decreasing, within values (which
// hold 32 entries of padding after the last stored one). The bitmask's own counts are the caller's to keep.
at::Tensor checked_offsets(const char* op, const at::Tensor& values, const at::Tensor& row_offsets, int64_t n) {
  TORCH_CHECK(row_offsets.device().is_cpu() && row_offsets.scalar_type() == at::kLong &&
                  row_offsets.dim() == 1 && row_offsets.size(0) == n + 1,
              op, ": row_offsets must be int64 [", n + 1, "], got ", row_offsets.scalar_type(), " ",
              row_offsets.sizes());
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D, got ", values.sizes());
  at::Tensor offsets = row_offsets.contiguous();
  const int64_t* offset = offsets.data_ptr<int64_t>();
  TORCH_CHECK(offset[0] == 0, op, ": row_offsets[0] must be 0, got ", offset[0]);
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(offset[r + 1] >= offset[r], op, ": row_offsets must not decrease (row ", r, ")");
  }
  TORCH_CHECK(values.size(0) >= offset[n] + kBitmaskPadding, op, ": values must hold the ", offset[n],
              " stored entries and ", kBitmaskPadding, " of padding, got ", values.size(0));
  return offsets;
}

CheckedWeight checked_bitmask(const char* op, const at::Tensor& x, const at::Tensor& values,
                              const at::Tensor& bitmask, const at::Tensor& row_offsets,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  const int64_t n = bitmask.dim() == 2 ? bitmask.size(0) : -1;
  check_common(op, x, values, bitmask, n, bias);
  CheckedWeight c{values.contiguous(), bitmask.contiguous(), checked_offsets(op, values, row_offsets, n), {}};
  c.w = SparseWeight{kBitmask, n, x.size(-1), c.values.data_ptr(), c.values.scalar_type() == at::kBFloat16,
                     c.meta.data_ptr<uint8_t>(), c.meta.size(1), c.offsets.data_ptr<int64_t>()};
  return c;
}

at::Tensor bitmask_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                          const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias) {
  const CheckedWeight c = checked_bitmask("vlmsparse_native::bitmask_linear", x, values, bitmask, row_offsets, bias);
  return run(c.w, x, bias);
}

// Rows [row_begin, row_end) of the dense [n, k] weight, row r written at dense + (r - first_row) * k: each row
// zeroed, then its stored values written to their columns (packed 2:4: two per group from the nibble; bitmask: the
// set bits of each 64-bit mask word in turn). Against the former loops (each column written once: a group array per
// 2:4 group, one branch-free select per bitmask column), 4096->11008, 1 thread: the prefill path at 8 rows of x
// (nearly all expansion, bench_cpu.py --prefill) packed 2:4 fp32 65.8 -> 33.6 ms, bf16 52.8 -> 16.1-18.2; 70%
// bitmask fp32 138.1 -> 32.3-33.4, bf16 133.8 -> 19.6-28.1; the whole weight into a fresh tensor
// (packed24_to_dense / bitmask_to_dense, page faults included) 123 -> 95-105, 84 -> 46-51, 198 -> 94-117, 159 -> 52-55.
template <typename V>
void densify_rows(const SparseWeight& w, const V* values, V* dense, int64_t first_row, int64_t row_begin,
                  int64_t row_end) {
  const int64_t k = w.k;
  for (int64_t r = row_begin; r < row_end; ++r) {
    V* out = dense + (r - first_row) * k;
    const uint8_t* meta = w.meta + r * w.meta_stride;
    std::memset(out, 0, sizeof(V) * k);
    if (w.format == kPacked24) {
      const V* v = values + r * (k / 2);
      for (int64_t g = 0; g < k / 4; ++g) {
        const int nibble = (meta[g >> 1] >> ((g & 1) * 4)) & 0xF;
        out[4 * g + (nibble & 3)] = v[2 * g];
        out[4 * g + (nibble >> 2)] = v[2 * g + 1];
      }
    } else {
      const V* v = values + w.row_offsets[r];
      for (int64_t c0 = 0; c0 < k; c0 += 64) {
        const int64_t bytes = k - c0 >= 64 ? 8 : (k - c0 + 7) / 8;
        uint64_t word = 0;
        std::memcpy(&word, meta + c0 / 8, static_cast<size_t>(bytes));
        if (k - c0 < 64) word &= (uint64_t{1} << (k - c0)) - 1;  // bits past k
        for (; word != 0; word &= word - 1) out[c0 + __builtin_ctzll(word)] = *v++;
      }
    }
  }
}

// Rows [row_begin, row_end) of the dense weight into `dense` [row_end - row_begin, k] (contiguous), the rows
// split over threads.
void densify_into(const SparseWeight& w, at::Tensor& dense, int64_t row_begin, int64_t row_end) {
  at::parallel_for(row_begin, row_end, 16, [&](int64_t begin, int64_t end) {
    if (w.values_bf16) {
      densify_rows(w, static_cast<const uint16_t*>(w.values), static_cast<uint16_t*>(dense.data_ptr()), row_begin,
                   begin, end);
    } else {
      densify_rows(w, static_cast<const float*>(w.values), dense.data_ptr<float>(), row_begin, begin, end);
    }
  });
}

at::Tensor densify(const SparseWeight& w, const at::Tensor& values) {
  at::Tensor dense = at::empty({w.n, w.k}, values.options());
  densify_into(w, dense, 0, w.n);
  return dense;
}

// Bytes of dense weight rows one block of dense_linear expands: half the last-level cache here (32 MB), so that
// a block is still cached when its GEMM reads it, and few blocks (each costs two parallel regions, expensive on
// a loaded machine: 4 MB blocks were slower with 2 threads, benchmarks/bench_cpu.py --prefill).
constexpr int64_t kDenseBlockBytes = 16 << 20;

// y [..., n] = x [..., k] @ W.T + bias for inputs with many rows (prefill), as dense GEMMs over blocks of weight
// rows: about `block_rows` rows a block (0: kDenseBlockBytes of dense weight, at least 64 rows), the n rows split
// evenly, each block expanded into one buffer that every block of the call reuses, then one at::addmm / at::mm
// into the block's columns of y. Nothing of full weight size is allocated, and the buffer is the call's own
// (thread safe; freed on return). y is F.linear(x, dense W, bias) bit for bit as long as torch's GEMM picks the
// same kernel for a block as for the whole weight: for fp32 here from 12 rows of x and 12 rows a block on
// (tests/test_native_cpu.py checks blocks of >= 32 rows from 12 rows of x on), for bf16 always.
at::Tensor dense_linear(const SparseWeight& w, const at::Tensor& x, const at::Tensor& values,
                        const std::optional<at::Tensor>& bias, int64_t block_rows) {
  const int64_t k = w.k, n = w.n;
  TORCH_CHECK(block_rows >= 0, "block_rows must be >= 0 (0: the default), got ", block_rows);
  const at::Tensor x2 = x.reshape({-1, k}).contiguous();
  at::Tensor y = at::empty({x2.size(0), n}, x2.options());
  const int64_t row_bytes = std::max<int64_t>(k * values.element_size(), 1);
  const int64_t target = block_rows > 0 ? block_rows : std::max<int64_t>(64, kDenseBlockBytes / row_bytes);
  const int64_t blocks = std::max<int64_t>((n + target - 1) / target, 1);
  const int64_t base = n / blocks, extra = n % blocks;  // blocks of base + 1 rows first, then of base
  at::Tensor buffer = at::empty({base + (extra > 0 ? 1 : 0), k}, values.options());
  at::Tensor bias_x;
  if (bias.has_value()) bias_x = bias->to(x.scalar_type());
  int64_t r0 = 0;
  for (int64_t i = 0; i < blocks && x2.size(0) > 0 && n > 0; ++i) {
    const int64_t count = base + (i < extra ? 1 : 0);
    at::Tensor block = buffer.narrow(0, 0, count);
    densify_into(w, block, r0, r0 + count);
    at::Tensor out = y.narrow(1, r0, count);
    if (bias_x.defined()) {
      at::addmm_out(out, bias_x.narrow(0, r0, count), x2, block.t());
    } else {
      at::mm_out(out, x2, block.t());
    }
    r0 += count;
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return y.view(shape);
}

at::Tensor packed24_to_dense(const at::Tensor& values, const at::Tensor& meta) {
  const char* op = "vlmsparse_native::packed24_to_dense";
  TORCH_CHECK(values.device().is_cpu() && meta.device().is_cpu(), op, ": needs CPU tensors");
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16, op,
              ": values must be float32 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK(values.dim() == 2, op, ": values must be [out, in/2], got ", values.sizes());
  const int64_t n = values.size(0), k = values.size(1) * 2;
  TORCH_CHECK(k % 4 == 0, op, ": in-features (2 * values.size(1) = ", k, ") must be a multiple of 4");
  TORCH_CHECK(meta.scalar_type() == at::kByte && meta.dim() == 2 && meta.size(0) == n && meta.size(1) == (k + 7) / 8,
              op, ": meta must be uint8 [", n, ", ", (k + 7) / 8, "], got ", meta.scalar_type(), " ", meta.sizes());
  const at::Tensor v = values.contiguous();
  const at::Tensor mt = meta.contiguous();
  const SparseWeight w{kPacked24, n, k, v.data_ptr(), v.scalar_type() == at::kBFloat16, mt.data_ptr<uint8_t>(),
                       mt.size(1), nullptr};
  return densify(w, v);
}

// Packs one row of a 2:4 weight whose entries are T (uint32_t for float32, uint16_t for bfloat16 bit patterns):
// each group's entry priorities (2 a non-zero, 1 a -0.0, 0 a +0.0; `sign` is the sign bit of T) index
// `kept_pairs` (256 x 2: the two kept positions, i0 < i1), as vlmsparse.sparse24.pack24 does in torch. Returns
// how many groups hold more than 2 non-zeros (written anyway: the caller refuses the weight).
template <typename T>
int64_t pack24_row(const T* w, T* values, uint8_t* meta, int64_t groups, const uint8_t* kept_pairs) {
  constexpr T sign = static_cast<T>(T{1} << (8 * sizeof(T) - 1));
  int64_t bad = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const T* e = w + 4 * g;
    int index = 0, nonzero = 0;
    for (int j = 0; j < 4; ++j) {
      const int priority = (e[j] & static_cast<T>(~sign)) != 0 ? 2 : (e[j] == sign ? 1 : 0);
      nonzero += priority == 2;
      index |= priority << (2 * j);
    }
    bad += nonzero > 2;
    const int i0 = kept_pairs[2 * index], i1 = kept_pairs[2 * index + 1];
    values[2 * g] = e[i0];
    values[2 * g + 1] = e[i1];
    const uint8_t nibble = static_cast<uint8_t>(i0 | (i1 << 2));
    if (g % 2 == 0) {
      meta[g / 2] = nibble;  // the high nibble stays 0 when this is the row's last group
    } else {
      meta[g / 2] |= static_cast<uint8_t>(nibble << 4);
    }
  }
  return bad;
}

// The packed 2:4 form (values, meta) of a float32 / bfloat16 weight [out, in] (in % 4 == 0), with the number of
// groups that hold more than 2 non-zeros (an int64 scalar tensor; not 2:4 when > 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_to_packed24(const at::Tensor& weight,
                                                                 const at::Tensor& kept_pairs) {
  const char* op = "vlmsparse_native::dense_to_packed24";
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              op, ": weight must be a 2-D float32 or bfloat16 CPU tensor, got ", weight.scalar_type(), " ",
              weight.sizes(), " on ", weight.device());
  TORCH_CHECK(weight.size(1) % 4 == 0, op, ": in-features must be a multiple of 4, got ", weight.size(1));
  TORCH_CHECK(kept_pairs.device().is_cpu() && kept_pairs.scalar_type() == at::kByte && kept_pairs.dim() == 2 &&
                  kept_pairs.size(0) == 256 && kept_pairs.size(1) == 2,
              op, ": kept_pairs must be uint8 [256, 2], got ", kept_pairs.scalar_type(), " ", kept_pairs.sizes());
  const at::Tensor w = weight.contiguous();
  const at::Tensor table = kept_pairs.contiguous();
  const int64_t rows = w.size(0), groups = w.size(1) / 4, meta_cols = (w.size(1) + 7) / 8;
  at::Tensor values = at::empty({rows, 2 * groups}, w.options());
  at::Tensor meta = at::empty({rows, meta_cols}, w.options().dtype(at::kByte));
  const uint8_t* pairs = table.data_ptr<uint8_t>();
  uint8_t* meta_rows = meta.data_ptr<uint8_t>();
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  std::atomic<int64_t> bad{0};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(groups, 1));  // >= 16K groups per task
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    int64_t local = 0;
    for (int64_t r = begin; r < end; ++r) {
      uint8_t* m = meta_rows + r * meta_cols;
      if (bf16) {
        const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr()) + r * 4 * groups;
        uint16_t* dst = reinterpret_cast<uint16_t*>(values.data_ptr()) + r * 2 * groups;
        local += pack24_row<uint16_t>(src, dst, m, groups, pairs);
      } else {
        const uint32_t* src = reinterpret_cast<const uint32_t*>(w.data_ptr()) + r * 4 * groups;
        uint32_t* dst = reinterpret_cast<uint32_t*>(values.data_ptr()) + r * 2 * groups;
        local += pack24_row<uint32_t>(src, dst, m, groups, pairs);
      }
    }
    bad.fetch_add(local);
  });
  return {values, meta, at::scalar_tensor(bad.load(), at::kLong)};
}

at::Tensor bitmask_to_dense(const at::Tensor& values, const at::Tensor& bitmask, const at::Tensor& row_offsets,
                            int64_t in_features) {
  const char* op = "vlmsparse_native::bitmask_to_dense";
  const at::Tensor probe = at::empty({1, in_features}, values.options());
  const int64_t n = bitmask.dim() == 2 ? bitmask.size(0) : -1;
  check_common(op, probe, values, bitmask, n, std::nullopt);
  const at::Tensor offsets = checked_offsets(op, values, row_offsets, n);
  const at::Tensor v = values.contiguous();
  const at::Tensor mt = bitmask.contiguous();
  const SparseWeight w{kBitmask, n, in_features, v.data_ptr(), v.scalar_type() == at::kBFloat16,
                       mt.data_ptr<uint8_t>(), mt.size(1), offsets.data_ptr<int64_t>()};
  return densify(w, v);
}

at::Tensor packed24_linear_dense(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                                 const std::optional<at::Tensor>& bias, int64_t block_rows) {
  const CheckedWeight c = checked_packed24("vlmsparse_native::packed24_linear_dense", x, values, meta, bias);
  return dense_linear(c.w, x, c.values, bias, block_rows);
}

at::Tensor bitmask_linear_dense(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bitmask,
                                const at::Tensor& row_offsets, const std::optional<at::Tensor>& bias,
                                int64_t block_rows) {
  const CheckedWeight c =
      checked_bitmask("vlmsparse_native::bitmask_linear_dense", x, values, bitmask, row_offsets, bias);
  return dense_linear(c.w, x, c.values, bias, block_rows);
}

ObsFn obs_fn(int isa) {
#if defined(__x86_64__) && defined(VLMSPARSE_X86_TIERS)
  if (isa >= 2) return obs_avx512;  // the avx512bf16 and amx tiers have no bf16 work here: their AVX-512 code
  if (isa == 1) return obs_avx2;
#endif
  return obs_scalar;
}

// SparseGPT's OBS column steps for one block of columns, in place (obs.h; vlmsparse/pruning/algorithms.py
// _sparsegpt_columns): w, err [count, rows] and u [count, count] float32 or float64, pruned [count, rows] bool,
// all contiguous CPU tensors; n, m: the N:M pattern chosen here per group of m columns, or 0, 0 (unstructured:
// pruned holds the choice).
void sparsegpt_columns(const at::Tensor& w, const at::Tensor& err, const at::Tensor& pruned, const at::Tensor& u,
                       int64_t n, int64_t m) {
  const char* op = "vlmsparse_native::sparsegpt_columns";
  TORCH_CHECK(w.device().is_cpu() && err.device().is_cpu() && pruned.device().is_cpu() && u.device().is_cpu(), op,
              ": needs CPU tensors");
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble), op,
              ": w must be a 2-D float32 or float64 tensor, got ", w.scalar_type(), " ", w.sizes());
  const int64_t count = w.size(0), rows = w.size(1);
  TORCH_CHECK(err.sizes() == w.sizes() && err.scalar_type() == w.scalar_type(), op, ": err must be ", w.sizes(),
              " ", w.scalar_type(), ", got ", err.sizes(), " ", err.scalar_type());
  TORCH_CHECK(pruned.sizes() == w.sizes() && pruned.scalar_type() == at::kBool, op, ": pruned must be bool ",
              w.sizes(), ", got ", pruned.scalar_type(), " ", pruned.sizes());
  TORCH_CHECK(u.dim() == 2 && u.size(0) == count && u.size(1) == count && u.scalar_type() == w.scalar_type(), op,
              ": u must be [", count, ", ", count, "] ", w.scalar_type(), ", got ", u.scalar_type(), " ", u.sizes());
  TORCH_CHECK(w.is_contiguous() && err.is_contiguous() && pruned.is_contiguous() && u.is_contiguous(), op,
              ": w, err, pruned and u must be contiguous");
  TORCH_CHECK((n == 0 && m == 0) || (0 < n && n < m && m <= kObsMaxM && count % m == 0), op,
              ": n, m must be 0, 0 (unstructured) or 0 < n < m <= ", kObsMaxM, " with m dividing the block's ",
              count, " columns; got ", n, ", ", m);
  const ObsBlock b{w.data_ptr(), err.data_ptr(), pruned.data_ptr<bool>(), u.data_ptr(), count, rows, n, m,
                   w.scalar_type() == at::kDouble};
  const ObsFn fn = obs_fn(current_isa().load());
  // rows in chunks of >= 64 (a chunk's segment of a column: 256 bytes of fp32 or more)
  if (count > 0 && rows > 0) at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) { fn(b, begin, end); });
}

// The bits of a float32 (as an int32) -> an int32 whose signed order is the float order (-0.0 one below +0.0), and
// back: the map is its own inverse.
inline int32_t order_key(int32_t bits) { return bits ^ ((bits >> 31) & 0x7FFFFFFF); }

inline int32_t float_bits(float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

// The keep-th largest of `keys[0..n)` (1 <= keep <= n; `keys` is overwritten; lo, hi: their least and greatest):
// the largest c with #(keys >= c) >= keep, found bit by bit from the top (c built in the unsigned order, compared
// in the signed one). Each step is one branch-free count, which the compiler vectorises; every 4 bits the keys that
// can no longer change a count (those above the answer's remaining range count always, those below never) are
// dropped. std::nth_element's data-dependent branches mispredict about once per entry. Measured on the selection of
// Wanda 50% on SmolLM2-135M (210 weights, 2 threads, Intel Xeon): torch's kthvalue + comparisons 0.83 s,
// nth_element 0.75 s, all bits over all keys 0.35 s; `[1536, 576]` scores: torch 8.4 ms, all bits over all keys
// 2.3 ms, keys dropped every 4 bits 1.9 ms, with keep_top_rows' passes vectorised 1.3 ms.
int32_t kth_largest_key(int32_t* keys, int64_t n, int64_t keep, int32_t lo, int32_t hi) {
  const uint32_t ulo = static_cast<uint32_t>(lo) ^ 0x80000000u, uhi = static_cast<uint32_t>(hi) ^ 0x80000000u;
  if (ulo == uhi) return lo;
  // the bits above the highest one in which lo and hi differ are the answer's too (2u << 31 is 0: none)
  const int top = 31 - __builtin_clz(ulo ^ uhi);
  uint32_t answer = ulo & ~((2u << top) - 1u);
  int32_t above = 0;  // dropped keys above the answer's range: counted by every candidate
  for (int bit = top; bit >= 0; --bit) {
    const uint32_t candidate = answer | (1u << bit);
    const int32_t c = static_cast<int32_t>(candidate ^ 0x80000000u);
    int32_t count = above;  // an int32 sum vectorises with the int32 compares (n < 2^31, checked by the caller)
    for (int64_t j = 0; j < n; ++j) count += keys[j] >= c;
    if (count >= keep) answer = candidate;
    if (bit % 4 == 0 && bit > 0) {  // keep the keys in [answer, answer + 2^bit): the others are settled
      const int32_t first = static_cast<int32_t>(answer ^ 0x80000000u);
      const int32_t last = static_cast<int32_t>((answer | ((1u << bit) - 1u)) ^ 0x80000000u);
      int64_t kept = 0;
      for (int64_t j = 0; j < n; ++j) {
        const int32_t k = keys[j];
        above += k > last;
        keys[kept] = k;
        kept += k >= first && k <= last;
      }
      n = kept;
    }
  }
  return static_cast<int32_t>(answer ^ 0x80000000u);
}

// Rows of kCols <= 8 entries (the groups of an N:M pattern, one per row): an entry's rank is the number of entries
// that beat it (a larger score, or an equal one at a lower index) and it is kept when its rank is below `keep`:
// sparsity.keep_top_dim0's rule, which gives the selection's mask. Returns whether a row held NaN.
template <int kCols>
bool keep_top_short_rows(const float* src, bool* dst, int64_t rows, int64_t keep) {
  bool nan = false;
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * kCols;
    int rank[kCols] = {};
    for (int i = 0; i < kCols; ++i) {
      nan |= s[i] != s[i];
      for (int j = 0; j < i; ++j) {
        const bool j_wins = s[j] >= s[i];
        rank[i] += j_wins;
        rank[j] += !j_wins;
      }
    }
    for (int i = 0; i < kCols; ++i) dst[r * kCols + i] = rank[i] < keep;
  }
  return nan;
}

using ShortRowsFn = bool (*)(const float*, bool*, int64_t, int64_t);
constexpr ShortRowsFn kShortRows[] = {nullptr,
                                      keep_top_short_rows<1>,
                                      keep_top_short_rows<2>,
                                      keep_top_short_rows<3>,
                                      keep_top_short_rows<4>,
                                      keep_top_short_rows<5>,
                                      keep_top_short_rows<6>,
                                      keep_top_short_rows<7>,
                                      keep_top_short_rows<8>};
constexpr int64_t kShortRowMax = 8;

// The `keep` largest entries of each row of float32 `scores [rows, cols]` as a bool mask, ties at the threshold kept
// from the lowest index: what vlmsparse.sparsity's torch selection gives (kthvalue, then comparisons, and a
// cumulative count where a row has more ties than places). NaN is refused (it has no place in the order; the
// Python caller refuses NaN / inf scores first).
at::Tensor keep_top_rows(const at::Tensor& scores, int64_t keep) {
  const char* op = "vlmsparse_native::keep_top_rows";
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat && scores.dim() == 2, op,
              ": scores must be a 2-D float32 CPU tensor, got ", scores.scalar_type(), " ", scores.sizes(), " on ",
              scores.device());
  const int64_t rows = scores.size(0), cols = scores.size(1);
  TORCH_CHECK(0 <= keep && keep <= cols, op, ": keep must be in [0, ", cols, "], got ", keep);
  TORCH_CHECK(cols < (int64_t{1} << 31), op, ": rows of at most 2^31 - 1 entries, got ", cols);
  const at::Tensor s = scores.contiguous();
  at::Tensor out = at::empty({rows, cols}, s.options().dtype(at::kBool));
  if (keep == 0 || keep == cols || rows == 0) {
    out.fill_(keep == cols);
    return out;
  }
  const float* src = s.data_ptr<float>();
  bool* dst = out.data_ptr<bool>();
  const int64_t grain = std::max<int64_t>(1, 65536 / cols);  // >= 64K entries per task
  if (cols <= kShortRowMax) {  // N:M groups (2:4 of [1536, 576] scores, 2 threads: torch 3.3 ms, this 0.95 ms)
    std::atomic<bool> nan{false};
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      if (kShortRows[cols](src + begin * cols, dst + begin * cols, end - begin, keep)) nan.store(true);
    });
    if (nan.load()) {
      int64_t r = 0;
      while (r < rows && std::none_of(src + r * cols, src + (r + 1) * cols, [](float v) { return v != v; })) ++r;
      TORCH_CHECK(false, op, ": row ", r, " holds NaN");
    }
    return out;
  }
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> keys(static_cast<size_t>(cols));
    // NaNs lie outside [lowest, highest]
    const int32_t lowest = order_key(float_bits(-INFINITY)), highest = order_key(float_bits(INFINITY));
    for (int64_t r = begin; r < end; ++r) {
      const float* row = src + r * cols;
      // each loop below is one branch-free pass that the compiler vectorises
      std::memcpy(keys.data(), row, sizeof(float) * cols);
      int32_t lo = highest, hi = lowest;
      for (int64_t j = 0; j < cols; ++j) {
        const int32_t k = order_key(keys[j]);
        keys[j] = k;
        lo = std::min(lo, k);
        hi = std::max(hi, k);
      }
      TORCH_CHECK(lo >= lowest && hi <= highest, op, ": row ", r, " holds NaN");
      const int32_t bits = order_key(kth_largest_key(keys.data(), cols, keep, lo, hi));
      float threshold;
      std::memcpy(&threshold, &bits, sizeof(threshold));
      int32_t above = 0, tied = 0;
      for (int64_t j = 0; j < cols; ++j) {
        above += row[j] > threshold;
        tied += row[j] == threshold;
      }
      uint8_t* mask = reinterpret_cast<uint8_t*>(dst + r * cols);
      int64_t places = keep - above;  // >= 1: the threshold itself is one of the kept
      if (tied == places) {  // every tie kept (the usual case: one entry equals the threshold)
        for (int64_t j = 0; j < cols; ++j) mask[j] = row[j] >= threshold;
      } else {
        for (int64_t j = 0; j < cols; ++j) mask[j] = row[j] > threshold;
        for (int64_t j = 0; j < cols && places > 0; ++j) {
          if (row[j] == threshold) {
            mask[j] = 1;
            --places;
          }
        }
      }
    }
  });
  return out;
}

// x's entry as a float: a float32, or a bfloat16's bits (the upper half of a float32's)
inline float entry_float(const float* x, int64_t i) { return x[i]; }
inline float entry_float(const uint16_t* x, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(x[i]) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// Adds the sums of squares of columns [c0, c1) of x [rows, cols] to sums[c0..c1). Squares add up in float32 over
// 64 rows (vectorised across the columns), and those partial sums in float64: about 64 float32 roundings per term
// at most, where one float32 sum over a batch of 16K tokens could drift by 1e-3.
template <typename T>
void add_column_square_sums(const T* x, int64_t rows, int64_t cols, int64_t c0, int64_t c1, double* sums) {
  constexpr int64_t kBlockCols = 256, kBlockRows = 64;
  float part[kBlockCols];
  for (int64_t cb = c0; cb < c1; cb += kBlockCols) {
    const int64_t width = std::min(kBlockCols, c1 - cb);
    for (int64_t rb = 0; rb < rows; rb += kBlockRows) {
      std::fill(part, part + width, 0.0f);
      for (int64_t r = rb; r < std::min(rows, rb + kBlockRows); ++r) {
        const T* row = x + r * cols + cb;
        for (int64_t j = 0; j < width; ++j) {
          const float v = entry_float(row, j);
          part[j] += v * v;
        }
      }
      for (int64_t j = 0; j < width; ++j) sums[cb + j] += part[j];
    }
  }
}

// Sum of squares of each column of x [rows, cols] (float32 or bfloat16), float64 [cols]: Wanda's ||X_j||^2 over a
// batch of calibration inputs. Threads take blocks of columns, so the sums do not depend on the thread count.
// [1024, 1536] bf16, 2 threads, Intel Xeon: torch's float copy, square and sum 0.58 ms, this 0.12 ms.
at::Tensor column_square_sums(const at::Tensor& x) {
  const char* op = "vlmsparse_native::column_square_sums";
  const bool float_type = x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && float_type, op,
              ": x must be a 2-D float32 or bfloat16 CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ",
              x.device());
  const at::Tensor c = x.contiguous();
  const int64_t rows = c.size(0), cols = c.size(1);
  at::Tensor sums = at::zeros({cols}, c.options().dtype(at::kDouble));
  double* out = sums.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 16) / std::max<int64_t>(rows, 1));
  at::parallel_for(0, cols, grain, [&](int64_t begin, int64_t end) {
    if (c.scalar_type() == at::kFloat) {
      add_column_square_sums(c.data_ptr<float>(), rows, cols, begin, end, out);
    } else {
      add_column_square_sums(static_cast<const uint16_t*>(c.data_ptr()), rows, cols, begin, end, out);
    }
  });
  return sums;
}

std::atomic<bool> g_refuse_buffers{false};
std::atomic<int64_t> g_refused_buffers{0};

}  // namespace

void* kernel_buffer(size_t bytes, size_t align) {
  if (g_refuse_buffers.load(std::memory_order_relaxed)) {
    g_refused_buffers.fetch_add(1, std::memory_order_relaxed);
    return nullptr;
  }
  return align ? aligned_alloc(align, (bytes + align - 1) / align * align) : malloc(bytes);
}

int64_t refuse_buffers(bool refuse) {
  g_refuse_buffers.store(refuse);
  return g_refused_buffers.exchange(0);
}

}  // namespace vlmsparse_cpu

TORCH_LIBRARY(vlmsparse_native, m) {
  m.def("packed24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias) -> Tensor");
  m.def("bitmask_linear(Tensor x, Tensor values, Tensor bitmask, Tensor row_offsets, Tensor? bias) -> Tensor");
  m.def("packed24_to_dense(Tensor values, Tensor meta) -> Tensor");
  m.def("bitmask_to_dense(Tensor values, Tensor bitmask, Tensor row_offsets, int in_features) -> Tensor");
  m.def("packed24_linear_dense(Tensor x, Tensor values, Tensor meta, Tensor? bias, int block_rows=0) -> Tensor");
  m.def("bitmask_linear_dense(Tensor x, Tensor values, Tensor bitmask, Tensor row_offsets, Tensor? bias, "
        "int block_rows=0) -> Tensor");
  m.def("sparsegpt_columns(Tensor(a!) w, Tensor(b!) err, Tensor(c!) pruned, Tensor u, int n, int m) -> ()");
  m.def("keep_top_rows(Tensor scores, int keep) -> Tensor");
  m.def("column_square_sums(Tensor x) -> Tensor");
  m.def("dense_to_packed24(Tensor weight, Tensor kept_pairs) -> (Tensor, Tensor, Tensor)");
  m.def("isa() -> str", &vlmsparse_cpu::isa);
  m.def("set_isa(str name) -> str", &vlmsparse_cpu::set_isa);
  m.def("supported_isas() -> str[]", &vlmsparse_cpu::supported_isas);
  m.def("refuse_buffers(bool refuse) -> int", &vlmsparse_cpu::refuse_buffers);  // a test hook (kernels.h)
  m.def("set_l2_bytes(int bytes) -> int", &vlmsparse_cpu::set_l2_bytes);  // a test hook (x_chunk_rows)
}

TORCH_LIBRARY_IMPL(vlmsparse_native, CPU, m) {
  m.impl("packed24_linear", &vlmsparse_cpu::packed24_linear);
  m.impl("bitmask_linear", &vlmsparse_cpu::bitmask_linear);
  m.impl("packed24_to_dense", &vlmsparse_cpu::packed24_to_dense);
  m.impl("bitmask_to_dense", &vlmsparse_cpu::bitmask_to_dense);
  m.impl("packed24_linear_dense", &vlmsparse_cpu::packed24_linear_dense);
  m.impl("bitmask_linear_dense", &vlmsparse_cpu::bitmask_linear_dense);
  m.impl("sparsegpt_columns", &vlmsparse_cpu::sparsegpt_columns);
  m.impl("keep_top_rows", &vlmsparse_cpu::keep_top_rows);
  m.impl("column_square_sums", &vlmsparse_cpu::column_square_sums);
  m.impl("dense_to_packed24", &vlmsparse_cpu::dense_to_packed24);
}
