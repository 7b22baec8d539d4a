// Launchers of the FP8 GEMM ops on CUDA: the shared argument checks, then a choice by device:
//   sm_90 with a compiled configuration  -> the CUTLASS sm_90a kernels (fp8_gemm_sm90_*.cu), chosen by
//                                           fp8_gemm_heuristic.cpp; the scales are passed as anvil makes
//                                           them, or reshaped here (a few KB) where a configuration wants
//                                           another layout (docs/FORMATS.md, "FP8 GEMM");
//   any other GPU, an output dtype or a shape no configuration takes (K or N not 16-byte aligned, ...)
//                                        -> the generic fallback: dequantize_fp8 to bf16 and a cuBLAS bf16
//                                           GEMM, with a one-time warning saying why.
// This file is built for every architecture in ANVIL_CUDA_ARCHS and includes no CUTLASS header.
#include "ops/fp8_gemm/fp8_gemm_common.h"
#include "ops/fp8_gemm/fp8_gemm_sm90.h"

#include "anvil/ops.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <set>
#include <string>

namespace anvil::ops {
namespace {

bool is_sm90(int device) {
  const cudaDeviceProp* p = at::cuda::getDeviceProperties(device);
  return p->major == 9 && p->minor == 0;
}

int sm_count(int device) { return at::cuda::getDeviceProperties(device)->multiProcessorCount; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

sm90::OutType out_type(at::ScalarType t) {
  return t == at::kBFloat16 ? sm90::OutType::kBFloat16 : t == at::kHalf ? sm90::OutType::kHalf : sm90::OutType::kFloat;
}

// Why the sm_90a kernels cannot take this problem on this device ("" when they can).
std::string sm90_blocker(int device, int64_t n, int64_t k, at::ScalarType out_dtype,
                         std::initializer_list<const void*> ptrs) {
  if (sm90::dense_configs().empty()) return "this build has no sm_90a kernels (ANVIL_CUDA_ARCHS lacks 90a)";
  if (!is_sm90(device)) return "the device is not sm_90 (Hopper)";
  if (k % 16 != 0) return "K (" + std::to_string(k) + ") is not a multiple of 16 (TMA rows are 16-byte aligned)";
  const int64_t per16 = 16 / int64_t(c10::elementSize(out_dtype));
  if (n % per16 != 0)
    return "N (" + std::to_string(n) + ") is not a multiple of " + std::to_string(per16) + " for " +
           c10::toString(out_dtype) + " output (16-byte aligned rows)";
  for (const void* p : ptrs)
    if (!aligned16(p)) return "an operand's data pointer is not 16-byte aligned";
  return "";
}

// Once per op and process: the first reason is the one a user needs to see.
void warn_fallback(const char* op, const std::string& why) {
  static std::mutex mutex;
  static std::set<std::string> warned;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (!warned.insert(op).second) return;
  }
  TORCH_WARN(op, ": running the generic CUDA fallback (dequantize to bf16 + cuBLAS bf16 GEMM) because ", why,
                  "; the fast path is the sm_90a kernel on Hopper");
}

// ---- dense ------------------------------------------------------------------------------------------

at::Tensor gemm_fallback(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                         const at::Tensor& b_scale, at::ScalarType out_dtype, const c10::optional<at::Tensor>& bias,
                         const GemmShape& s) {
  const auto xa = dequantize_fp8(a, a_scale, a_granularity(s.a_kind), at::kBFloat16);  // (M, K)
  const auto xb = dequantize_fp8(b, b_scale, b_granularity(s.b_kind), at::kBFloat16);  // (N, K)
  auto out = at::mm(xa, xb.t());                                                        // (M, N) bf16
  if (bias.has_value()) return out.to(at::kFloat).add_(bias->to(at::kFloat)).to(out_dtype);
  return out.to(out_dtype);
}

// a's scales as the configuration reads them: one per (row, 128-block of K), K-major (M, Kb) or M-major
// (Kb, M_pad) with M_pad a multiple of 4 (TMA strides are 16-byte multiples). Per-tensor and per-row
// scales are broadcast over the blocks here (M x Kb floats: a few KB against the GEMM's MBs).
at::Tensor scales_a(const at::Tensor& a_scale, const GemmShape& s, bool m_major, int64_t* ld) {
  const int64_t kb = ceil_div(s.k, kBlock);
  const auto full = s.a_kind == ScaleKind::kBlock   ? a_scale
                    : s.a_kind == ScaleKind::kRow   ? a_scale.expand({s.m, kb})
                                                    : a_scale.reshape({1, 1}).expand({s.m, kb});  // (M, Kb) view
  if (!m_major) {
    *ld = kb;
    return full.contiguous();
  }
  const int64_t m_pad = (s.m + 3) / 4 * 4;
  auto t = at::empty({kb, m_pad}, a_scale.options());  // (Kb, M_pad)
  t.narrow(1, 0, s.m).copy_(full.t());
  *ld = m_pad;
  return t;
}

at::Tensor fp8_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                         const at::Tensor& b_scale, c10::optional<at::ScalarType> out_dtype_opt,
                         const c10::optional<at::Tensor>& bias) {
  const at::ScalarType out_dtype = out_dtype_opt.value_or(at::kBFloat16);
  const char* op = "anvil::fp8_gemm";
  const GemmShape s = check_gemm_args(a, a_scale, b, b_scale, out_dtype, bias, op);
  const c10::cuda::CUDAGuard guard(a.device());
  const int device = a.get_device();
  if (s.m == 0 || s.n == 0) return at::empty({s.m, s.n}, a.options().dtype(out_dtype));
  if (s.k == 0) {
    auto out = at::zeros({s.m, s.n}, a.options().dtype(at::kFloat));
    if (bias.has_value()) out.add_(bias->to(at::kFloat));
    return out.to(out_dtype);
  }
  std::string why = sm90_blocker(device, s.n, s.k, out_dtype, {a.const_data_ptr(), b.const_data_ptr()});
  const sm90::Sm90Config* cfg =
      why.empty() ? sm90::choose_dense(s.m, s.n, s.k, out_type(out_dtype), sm_count(device)) : nullptr;
  if (why.empty() && !cfg) why = std::string("no sm_90a configuration is compiled for ") + c10::toString(out_dtype);
  if (!cfg) {
    warn_fallback(op, why);
    return gemm_fallback(a, a_scale, b, b_scale, out_dtype, bias, s);
  }

  if (cfg->sfa_m_major && s.m % 4 != 0) {
    // The TMA load of M-major scales needs 16-byte rows of scales, M a multiple of 4: CUTLASS's
    // can_implement refuses M = 1, 14, 45 (seen on the H100, 2026-11-23). Pad a (and its per-row or
    // 1x128 scales) with zero rows to the next multiple of 4, run, and return the first M rows.
    const int64_t m4 = (s.m + 3) / 4 * 4;
    auto a_pad = at::zeros({m4, s.k}, a.options().dtype(at::kByte)).view(a.scalar_type());  // (M4, K) e4m3 zeros
    a_pad.narrow(0, 0, s.m).copy_(a);
    at::Tensor sa_pad = a_scale;
    if (s.a_kind != ScaleKind::kTensor) {
      sa_pad = at::ones({m4, a_scale.size(1)}, a_scale.options());  // (M4, Kb) or (M4, 1)
      sa_pad.narrow(0, 0, s.m).copy_(a_scale);
    }
    return fp8_gemm_cuda(a_pad, sa_pad, b, b_scale, out_dtype, bias).narrow(0, 0, s.m);
  }

  auto out = at::empty({s.m, s.n}, a.options().dtype(out_dtype));  // (M, N)
  sm90::DenseArgs p{};
  p.a = a.const_data_ptr();
  p.b = b.const_data_ptr();
  const auto sfa = scales_a(a_scale, s, cfg->sfa_m_major, &p.sfa_ld);
  p.sfa = sfa.const_data_ptr<float>();
  p.sfa_m_major = cfg->sfa_m_major;
  // b: 128x128 blocks go to the mainloop as they are; per-tensor and per-channel scales do not vary along
  // K, so the mainloop gets ones (one row of Kb, broadcast over the N blocks by a zero stride) and the
  // epilogue multiplies by alpha: the scalar, or the (N) vector.
  at::Tensor sfb = b_scale;
  at::Tensor alpha;
  if (s.b_kind == ScaleKind::kBlock) {
    p.sfb_ld = ceil_div(s.k, kBlock);
  } else {
    sfb = at::ones({ceil_div(s.k, kBlock)}, b_scale.options());
    p.sfb_ld = 0;
    alpha = b_scale;
    p.alpha = alpha.const_data_ptr<float>();
    p.alpha_is_vector = s.b_kind == ScaleKind::kRow;
  }
  p.sfb = sfb.const_data_ptr<float>();
  at::Tensor bias32;
  if (bias.has_value()) {
    bias32 = bias->to(at::kFloat).contiguous();
    p.bias = bias32.const_data_ptr<float>();
  }
  p.out = out.data_ptr();
  p.m = s.m;
  p.n = s.n;
  p.k = s.k;
  p.device = device;
  p.sm_count = sm_count(device);
  p.stream = at::cuda::getCurrentCUDAStream(device);
  p.knobs = sm90::choose_knobs(s.m, s.n, s.k, cfg->name, p.sm_count);
  const std::string err = cfg->run(p);
  if (!err.empty()) {
    // Tests and benchmarks set ANVIL_FP8_GEMM_STRICT=1 so that a declining kernel fails loudly instead of
    // being measured as the fallback.
    const char* strict = std::getenv("ANVIL_FP8_GEMM_STRICT");
    TORCH_CHECK(!(strict && *strict && *strict != '0'), op, ": configuration ", cfg->name, " declined (M ", s.m,
                ", N ", s.n, ", K ", s.k, "): ", err, " (ANVIL_FP8_GEMM_STRICT is set, so no fallback)");
    warn_fallback(op, std::string("configuration ") + cfg->name + " declined: " + err);
    return gemm_fallback(a, a_scale, b, b_scale, out_dtype, bias, s);
  }
  return out;
}

// ---- grouped ----------------------------------------------------------------------------------------

// Zeroes the rows of out (R, N) that belong to no expert: [0, offsets[0]) and [offsets[E], R). Reads the
// offsets on the device; rows are 16-byte multiples (the sm_90a path requires it).
__global__ void zero_rows_outside_kernel(uint4* out, int64_t rows, int64_t row_vecs, const int32_t* offsets,
                                         int64_t experts) {
  const int64_t first = offsets[0], last = offsets[experts];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    if (r >= first && r < last) continue;
    for (int64_t i = threadIdx.x; i < row_vecs; i += blockDim.x) out[r * row_vecs + i] = make_uint4(0, 0, 0, 0);
  }
}

// The fallback reads the offsets / counts on the host (a synchronisation; not for CUDA graphs).
at::Tensor grouped_fallback(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                            const at::Tensor& b_scale, const std::vector<int64_t>& row0,
                            const std::vector<int64_t>& rows, int64_t total_rows, at::ScalarType out_dtype) {
  auto out = at::zeros({total_rows, b.size(1)}, a.options().dtype(out_dtype));
  for (size_t e = 0; e < rows.size(); ++e) {
    if (rows[e] <= 0) continue;
    const auto xa = dequantize_fp8(a.narrow(0, row0[e], rows[e]), a_scale.narrow(0, row0[e], rows[e]), "block1x128",
                                   at::kBFloat16);
    const auto xb = dequantize_fp8(b.select(0, e), b_scale.select(0, e), "block128x128", at::kBFloat16);
    out.narrow(0, row0[e], rows[e]).copy_(at::mm(xa, xb.t()));
  }
  return out;
}

const sm90::Sm90GroupedConfig* grouped_choice(const at::Tensor& a, const at::Tensor& b, int64_t n, int64_t k,
                                              at::ScalarType out_dtype, const char* op) {
  const int device = a.get_device();
  std::string why = sm90_blocker(device, n, k, out_dtype, {a.const_data_ptr(), b.const_data_ptr()});
  const sm90::Sm90GroupedConfig* cfg = why.empty() ? sm90::choose_grouped(out_type(out_dtype)) : nullptr;
  if (why.empty() && !cfg)
    why = std::string("no grouped sm_90a configuration is compiled for ") + c10::toString(out_dtype);
  if (!cfg) warn_fallback(op, why);
  return cfg;
}

sm90::GroupedArgs grouped_args(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                               const at::Tensor& b_scale, const at::Tensor& out, const GroupedShape& s) {
  sm90::GroupedArgs p{};
  p.a = a.const_data_ptr();
  p.sfa = a_scale.const_data_ptr<float>();
  p.b = b.const_data_ptr();
  p.sfb = b_scale.const_data_ptr<float>();
  p.out = out.data_ptr();
  p.rows = s.rows;
  p.experts = s.experts;
  p.n = s.n;
  p.k = s.k;
  p.capacity = s.capacity;
  p.device = a.get_device();
  p.sm_count = sm_count(p.device);
  p.stream = at::cuda::getCurrentCUDAStream(p.device);
  return p;
}

at::Tensor fp8_grouped_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                 const at::Tensor& b_scale, const at::Tensor& offsets,
                                 c10::optional<at::ScalarType> out_dtype_opt) {
  const at::ScalarType out_dtype = out_dtype_opt.value_or(at::kBFloat16);
  const char* op = "anvil::fp8_grouped_gemm";
  const GroupedShape s = check_grouped_args(a, a_scale, b, b_scale, offsets, out_dtype, op);
  const c10::cuda::CUDAGuard guard(a.device());
  if (s.rows == 0 || s.n == 0) return at::empty({s.rows, s.n}, a.options().dtype(out_dtype));
  const sm90::Sm90GroupedConfig* cfg = grouped_choice(a, b, s.n, s.k, out_dtype, op);
  if (!cfg) {
    const auto off = offsets.cpu();
    const int32_t* o = off.const_data_ptr<int32_t>();
    std::vector<int64_t> row0(s.experts), rows(s.experts);
    for (int64_t e = 0; e < s.experts; ++e) {
      ANVIL_CHECK(o[e] >= 0 && o[e] <= o[e + 1] && o[e + 1] <= s.rows, op,
                  ": offsets must be non-decreasing within [0, R = ", s.rows, "], got offsets[", e, "] = ", o[e],
                  ", offsets[", e + 1, "] = ", o[e + 1]);
      row0[e] = o[e];
      rows[e] = o[e + 1] - o[e];
    }
    return grouped_fallback(a, a_scale, b, b_scale, row0, rows, s.rows, out_dtype);
  }
  auto out = at::empty({s.rows, s.n}, a.options().dtype(out_dtype));  // (R, N)
  sm90::GroupedArgs p = grouped_args(a, a_scale, b, b_scale, out, s);
  p.offsets = offsets.const_data_ptr<int32_t>();
  p.knobs = sm90::choose_knobs(s.rows, s.n, s.k, cfg->name, p.sm_count);
  const int64_t row_vecs = s.n * int64_t(c10::elementSize(out_dtype)) / 16;
  const int blocks = int(std::min<int64_t>(s.rows, 4 * int64_t(p.sm_count)));
  zero_rows_outside_kernel<<<blocks, 128, 0, p.stream>>>(static_cast<uint4*>(p.out), s.rows, row_vecs, p.offsets,
                                                         s.experts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const std::string err = cfg->run(p);
  TORCH_CHECK(err.empty(), op, ": the sm_90a grouped kernel ", cfg->name, " failed: ", err);
  return out;
}

at::Tensor fp8_grouped_gemm_masked_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                        const at::Tensor& b_scale, const at::Tensor& masked_m,
                                        c10::optional<at::ScalarType> out_dtype_opt) {
  const at::ScalarType out_dtype = out_dtype_opt.value_or(at::kBFloat16);
  const char* op = "anvil::fp8_grouped_gemm_masked";
  const GroupedShape s = check_masked_args(a, a_scale, b, b_scale, masked_m, out_dtype, op);
  const c10::cuda::CUDAGuard guard(a.device());
  if (s.rows == 0 || s.n == 0) return at::empty({s.experts, s.capacity, s.n}, a.options().dtype(out_dtype));
  const auto a2 = a.view({s.rows, s.k});
  const auto s2 = a_scale.view({s.rows, s.k / kBlock});
  const sm90::Sm90GroupedConfig* cfg = grouped_choice(a, b, s.n, s.k, out_dtype, op);
  if (!cfg) {
    const auto valid = masked_m.cpu();
    const int32_t* v = valid.const_data_ptr<int32_t>();
    std::vector<int64_t> row0(s.experts), rows(s.experts);
    for (int64_t e = 0; e < s.experts; ++e) {
      row0[e] = e * s.capacity;
      rows[e] = std::min<int64_t>(std::max<int64_t>(v[e], 0), s.capacity);
    }
    return grouped_fallback(a2, s2, b, b_scale, row0, rows, s.rows, out_dtype).view({s.experts, s.capacity, s.n});
  }
  auto out = at::empty({s.experts, s.capacity, s.n}, a.options().dtype(out_dtype));  // (E, C, N)
  sm90::GroupedArgs p = grouped_args(a2, s2, b, b_scale, out, s);
  p.masked_m = masked_m.const_data_ptr<int32_t>();
  p.knobs = sm90::choose_knobs(s.rows, s.n, s.k, cfg->name, p.sm_count);
  const std::string err = cfg->run(p);
  TORCH_CHECK(err.empty(), op, ": the sm_90a grouped kernel ", cfg->name, " failed: ", err);
  return out;
}

}  // namespace

std::string fp8_gemm_config(int64_t m, int64_t n, int64_t k, at::ScalarType out_dtype) {
  if (!at::cuda::is_available() || sm90::dense_configs().empty()) return "";
  const int device = c10::cuda::current_device();
  if (!sm90_blocker(device, n, k, out_dtype, {}).empty()) return "";
  const sm90::Sm90Config* c = sm90::choose_dense(m, n, k, out_type(out_dtype), sm_count(device));
  return c ? c->name : "";
}

TORCH_LIBRARY_IMPL(anvil, CUDA, m) {
  m.impl("fp8_gemm", &fp8_gemm_cuda);
  m.impl("fp8_grouped_gemm", &fp8_grouped_gemm_cuda);
  m.impl("fp8_grouped_gemm_masked", &fp8_grouped_gemm_masked_cuda);
}

}  // namespace anvil::ops
