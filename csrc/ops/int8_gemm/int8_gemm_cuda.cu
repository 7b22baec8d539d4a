// Launcher of int8_gemm on CUDA: the shared argument checks, then one of three paths (int8_gemm_path says
// which, ANVIL_INT8_GEMM_PATH forces one where it can run):
//   "sm90"    Hopper, bf16 output, K % 16 == 0, N % 8 == 0: the CUTLASS sm_90a kernel with the scales and the
//             bias fused into its epilogue (int8_gemm_sm90.cu; in the build when ANVIL_CUDA_ARCHS has 90a);
//   "int_mm"  M > 16, K % 8 == 0, N % 8 == 0 (what cuBLASLt's IMMA kernels take, at::_int_mm's checks):
//             cuBLASLt's int8 GEMM to an int32 (M, N) tensor, then int8_epilogue_kernel;
//   "simt"    everything else (decode batches of M <= 16, unaligned K or N): int8_simt_gemm_kernel, exact
//             int32 on the CUDA cores with the epilogue in the same kernel.
// All three compute the exact int32 sum; the epilogue is int8_gemm_common.h's (the sm90 one fuses the last
// multiply and add into one rounding).
#include "ops/int8_gemm/int8_gemm_common.h"
#include "ops/int8_gemm/int8_gemm_kernels.cuh"
#include "ops/int8_gemm/int8_gemm_sm90.h"

#include "anvil/ops.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace anvil::ops {
namespace {

constexpr const char* kOp = "anvil::int8_gemm";

bool is_sm90(int device) {
  const cudaDeviceProp* p = at::cuda::getDeviceProperties(device);
  return p->major == 9 && p->minor == 0;
}

bool has_sm90_kernel() {
#if defined(ANVIL_WITH_SM90A)
  return true;
#else
  return false;
#endif
}

bool sm90_fits(int device, int64_t n, int64_t k, at::ScalarType out_dtype) {
  return has_sm90_kernel() && is_sm90(device) && out_dtype == at::kBFloat16 && k % 16 == 0 && n % 8 == 0;
}
bool int_mm_fits(int64_t m, int64_t n, int64_t k) { return m > 16 && k % 8 == 0 && n % 8 == 0; }

bool path_forced() {
  const char* env = std::getenv("ANVIL_INT8_GEMM_PATH");
  return env != nullptr && *env != '\0';
}

// The path for a problem: the forced one (when it can run; else an error, so that a test or benchmark never
// measures another path than it names, or "" when !strict: int8_gemm_path's answer) or the fastest that can.
std::string choose_path(int device, int64_t m, int64_t n, int64_t k, at::ScalarType out_dtype, bool strict = true) {
  if (path_forced()) {
    const std::string forced(std::getenv("ANVIL_INT8_GEMM_PATH"));
    TORCH_CHECK(forced == "sm90" || forced == "int_mm" || forced == "simt",
                "ANVIL_INT8_GEMM_PATH must be sm90, int_mm or simt, got '", forced, "'");
    const bool runs = forced == "simt" || (forced == "sm90" ? sm90_fits(device, n, k, out_dtype) : int_mm_fits(m, n, k));
    if (!runs && !strict) return "";
    TORCH_CHECK(forced != "sm90" || runs, kOp, ": ANVIL_INT8_GEMM_PATH=sm90 cannot run (M ", m, ", N ", n, ", K ", k,
                ", ", out_dtype, "): it needs an sm_90a build, an sm_90 device, bf16 output, K % 16 == 0 and N % 8 == 0");
    TORCH_CHECK(forced != "int_mm" || runs, kOp, ": ANVIL_INT8_GEMM_PATH=int_mm cannot run (M ", m, ", N ", n, ", K ",
                k, "): cuBLASLt needs M > 16, K % 8 == 0 and N % 8 == 0");
    return forced;
  }
  if (sm90_fits(device, n, k, out_dtype) && m > 16) return "sm90";
  if (int_mm_fits(m, n, k)) return "int_mm";
  return "simt";
}

int blocks_for(int64_t work, int threads) {
  const int64_t b = (work + threads - 1) / threads;
  return int(std::min<int64_t>(std::max<int64_t>(b, 1), 65535 * 8));
}

template <typename T>
void launch_epilogue(const at::Tensor& acc, at::Tensor& out, const int8k::Epilogue& e, cudaStream_t stream) {
  const int64_t m = acc.size(0), n = acc.size(1);
  const int threads = 256;
  const int64_t work = n % 4 == 0 ? m * n / 4 : m * n;
  int8k::int8_epilogue_kernel<T><<<blocks_for(work, threads), threads, 0, stream>>>(
      acc.const_data_ptr<int32_t>(), reinterpret_cast<T*>(out.data_ptr()), m, n, e);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_simt(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, const int8k::Epilogue& e,
                 cudaStream_t stream) {
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  const int64_t blocks = (m * n + int8k::kSimtWarps - 1) / int8k::kSimtWarps;
  TORCH_CHECK(blocks <= 0x7fffffffLL, kOp, ": M * N (", m * n, ") is too large for the SIMT path");
  const bool dp4a = k % 4 == 0 && reinterpret_cast<uintptr_t>(a.const_data_ptr()) % 4 == 0 &&
                    reinterpret_cast<uintptr_t>(b.const_data_ptr()) % 4 == 0;
  auto* o = reinterpret_cast<T*>(out.data_ptr());
  const auto* pa = a.const_data_ptr<int8_t>();
  const auto* pb = b.const_data_ptr<int8_t>();
  if (dp4a)
    int8k::int8_simt_gemm_kernel<T, true><<<unsigned(blocks), 32 * int8k::kSimtWarps, 0, stream>>>(pa, pb, o, m, n, k, e);
  else
    int8k::int8_simt_gemm_kernel<T, false><<<unsigned(blocks), 32 * int8k::kSimtWarps, 0, stream>>>(pa, pb, o, m, n, k, e);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <template <typename> class F, typename... Args>
void by_dtype(at::ScalarType t, Args&&... args) {
  if (t == at::kBFloat16) F<__nv_bfloat16>::run(std::forward<Args>(args)...);
  else if (t == at::kHalf) F<__half>::run(std::forward<Args>(args)...);
  else F<float>::run(std::forward<Args>(args)...);
}
template <typename T>
struct EpilogueLaunch {
  static void run(const at::Tensor& acc, at::Tensor& out, const int8k::Epilogue& e, cudaStream_t s) {
    launch_epilogue<T>(acc, out, e, s);
  }
};
template <typename T>
struct SimtLaunch {
  static void run(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, const int8k::Epilogue& e, cudaStream_t s) {
    launch_simt<T>(a, b, out, e, s);
  }
};

at::Tensor int8_gemm_cuda(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                          const at::Tensor& b_scale, c10::optional<at::ScalarType> out_dtype_opt,
                          const c10::optional<at::Tensor>& bias) {
  const at::ScalarType out_dtype = out_dtype_opt.value_or(at::kBFloat16);
  const Int8GemmShape s = check_int8_gemm_args(a, a_scale, b, b_scale, out_dtype, bias, kOp);
  const c10::cuda::CUDAGuard guard(a.device());
  const int device = a.get_device();
  auto out = at::empty({s.m, s.n}, a.options().dtype(out_dtype));  // (M, N)
  if (s.m == 0 || s.n == 0) return out;
  at::Tensor bias32;
  if (bias.has_value()) bias32 = bias->to(at::kFloat).contiguous();  // (N) fp32
  const int8k::Epilogue e{a_scale.const_data_ptr<float>(), s.a_per_row, b_scale.const_data_ptr<float>(), s.b_per_row,
                          bias32.defined() ? bias32.const_data_ptr<float>() : nullptr};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device);
  if (s.k == 0) {  // an empty sum: the epilogue of zeros
    const auto acc = at::zeros({s.m, s.n}, a.options().dtype(at::kInt));
    by_dtype<EpilogueLaunch>(out_dtype, acc, out, e, stream);
    return out;
  }
  const std::string path = choose_path(device, s.m, s.n, s.k, out_dtype);
  if (path == "sm90") {
    int8sm90::Args p{};
    p.a = a.const_data_ptr<int8_t>();
    p.b = b.const_data_ptr<int8_t>();
    p.a_scale = e.a_scale;
    p.a_per_row = s.a_per_row;
    p.b_scale = e.b_scale;
    p.b_per_row = s.b_per_row;
    p.bias = e.bias;
    p.out = out.data_ptr();
    p.m = s.m;
    p.n = s.n;
    p.k = s.k;
    p.device = device;
    p.sm_count = at::cuda::getDeviceProperties(device)->multiProcessorCount;
    p.stream = stream;
#if defined(ANVIL_WITH_SM90A)
    const std::string err = int8sm90::run_bf16(p);
#else
    const std::string err = "no sm_90a kernel in this build";
#endif
    if (err.empty()) return out;
    TORCH_CHECK(!path_forced(), kOp, ": the sm_90a kernel declined (M ", s.m, ", N ", s.n, ", K ", s.k, "): ", err,
                " (ANVIL_INT8_GEMM_PATH=sm90, so no fallback)");
    if (!int_mm_fits(s.m, s.n, s.k)) {
      by_dtype<SimtLaunch>(out_dtype, a, b, out, e, stream);
      return out;
    }
    // else cuBLASLt below (CUTLASS checks some alignments only at run time).
  } else if (path == "simt") {
    by_dtype<SimtLaunch>(out_dtype, a, b, out, e, stream);
    return out;
  }
  const auto acc = at::_int_mm(a, b.t());  // (M, N) int32, cuBLASLt IMMA (b column-major: the "TN" layout)
  by_dtype<EpilogueLaunch>(out_dtype, acc, out, e, stream);
  return out;
}

}  // namespace

std::string int8_gemm_path(int64_t m, int64_t n, int64_t k, at::ScalarType out_dtype) {
  if (!at::cuda::is_available()) return "cpu";
  return choose_path(c10::cuda::current_device(), m, n, k, out_dtype, /*strict=*/false);
}

TORCH_LIBRARY_IMPL(anvil, CUDA, m) { m.impl("int8_gemm", &int8_gemm_cuda); }

}  // namespace anvil::ops
