// The interface between the fp8 GEMM launcher (fp8_gemm_cuda.cu, built for every architecture) and the
// Hopper kernels (fp8_gemm_sm90_*.cu, built for sm_90a alone, one configuration per file). Plain structs
// of pointers and sizes: the launcher never sees a CUTLASS type, so it compiles for sm_80 and sm_89 too.
//
// Layouts the kernels read (docs/FORMATS.md, "FP8 GEMM"):
//   a    (M, K) e4m3 row-major (K-major)           b   (N, K) e4m3 row-major (K-major, the nn.Linear weight)
//   out  (M, N) row-major, bf16 / fp16 / fp32
//   sfa  a's scales as one per (row, 128-block of K), fp32, either
//          K-major  (M, Kb) row-major, row stride sfa_ld (= Kb: anvil's block1x128 scale_inv as is), or
//          M-major  (Kb, M) with column stride sfa_ld (>= M, a multiple of 4 so TMA can load it)
//   sfb  b's scales as one per (128 rows of N, 128-block of K), fp32 K-major: (Nb, Kb) with N-block
//        stride sfb_ld (= Kb for anvil's block128x128 scale_inv; 0 broadcasts one row of Kb values)
//   alpha  epilogue multiplier: nullptr (1), one fp32 scalar, or an (N) fp32 vector (per-channel b scales)
//   bias   (N) fp32 or nullptr
// out[m, n] = alpha[n] * sum_kb sfa[m, kb] * sfb[n / 128, kb] * sum_{k in block kb} a[m, k] * b[n, k] + bias[n],
// the inner sum on the tensor cores, the outer (the FP32 promotion every 128 of K) on the CUDA cores.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace anvil::ops::sm90 {

enum class OutType { kBFloat16, kHalf, kFloat };

// Run-time arguments of CUTLASS's persistent tile schedulers (no recompilation to change them): the order
// in which the persistent CTAs walk the output tiles, and, for the stream-K scheduler, how the K loop is
// divided. Chosen per shape by the heuristic; ANVIL_FP8_GEMM_SCHED overrides them (the tuning sweep), e.g.
// "raster=n,swizzle=2" or "mode=splitk,splits=4" (fp8_gemm_heuristic.cpp, parse_knobs).
struct SchedulerKnobs {
  int raster = 0;          // 0 CUTLASS's heuristic, 1 along M (consecutive CTAs share a weight tile), 2 along N
  int swizzle = 1;         // 1, 2, 4, 8: CTAs walk blocks of this many tiles across the other dimension
  int mode = 0;            // stream-K scheduler only: 0 heuristic, 1 data-parallel, 2 split-K, 3 stream-K
  int splits = 1;          // split-K: the number of K slices
  bool atomic_reduce = false;  // stream-K / split-K: CUTLASS's non-deterministic (unordered) reduction
};

struct DenseArgs {
  const void* a;           // (M, K) e4m3
  const void* b;           // (N, K) e4m3
  const float* sfa;        // see above
  int64_t sfa_ld;
  bool sfa_m_major;        // must equal the configuration's SFA layout (Sm90Config::sfa_m_major)
  const float* sfb;
  int64_t sfb_ld;
  const float* alpha;      // nullptr, scalar or (N)
  bool alpha_is_vector;
  const float* bias;       // (N) or nullptr
  void* out;               // (M, N)
  int64_t m, n, k;
  int device;
  int sm_count;
  cudaStream_t stream;
  SchedulerKnobs knobs;
};

// The grouped kernels: expert e multiplies rows [row0_e, row0_e + rows_e) of a by b[e]. Contiguous layout
// (offsets != nullptr): row0_e = offsets[e], rows_e = offsets[e+1] - offsets[e] (clamped to [0, R]).
// Masked layout (masked_m != nullptr): row0_e = e * capacity, rows_e = min(masked_m[e], capacity).
// Both read offsets / masked_m on the device (no host synchronisation; CUDA-graph safe).
struct GroupedArgs {
  const void* a;           // (R, K) e4m3
  const float* sfa;        // (R, Kb) fp32 K-major
  const void* b;           // (E, N, K) e4m3
  const float* sfb;        // (E, Nb, Kb) fp32
  const int32_t* offsets;  // (E + 1) or nullptr
  const int32_t* masked_m; // (E) or nullptr
  int64_t capacity;        // masked layout: rows per expert
  void* out;               // (R, N)
  int64_t rows, experts, n, k;
  int device;
  int sm_count;
  cudaStream_t stream;
  SchedulerKnobs knobs;    // raster and swizzle only (the grouped scheduler has no stream-K)
};

// What the launcher needs to know of a compiled configuration.
struct Sm90Config {
  const char* name;        // e.g. "coop_128x128_c1x2"
  bool sfa_m_major;        // its SFA layout (see above)
  OutType out;
  // Runs the kernel; returns "" or why it cannot (CUTLASS's can_implement failed, ...).
  std::string (*run)(const DenseArgs&);
};

struct Sm90GroupedConfig {
  const char* name;
  OutType out;
  std::string (*run)(const GroupedArgs&);
};

// Every compiled configuration (empty when the build has no sm_90a kernels). fp8_gemm_heuristic.cpp.
const std::vector<Sm90Config>& dense_configs();
const std::vector<Sm90GroupedConfig>& grouped_configs();
const char* out_type_name(OutType t);

// The heuristic (fp8_gemm_heuristic.cpp): the configuration for a problem, nullptr when none is compiled
// for the output dtype. ANVIL_FP8_GEMM_CONFIG=<name> forces one (an unknown name raises, listing them);
// ANVIL_FP8_GEMM_GROUPED_CONFIG=<name> forces a grouped one.
const Sm90Config* choose_dense(int64_t m, int64_t n, int64_t k, OutType out, int sm_count);
const Sm90GroupedConfig* choose_grouped(OutType out);
// The scheduler arguments for a problem run by config; ANVIL_FP8_GEMM_SCHED overrides them (a malformed
// value raises, naming the rule).
SchedulerKnobs choose_knobs(int64_t m, int64_t n, int64_t k, const char* config, int sm_count);

}  // namespace anvil::ops::sm90
