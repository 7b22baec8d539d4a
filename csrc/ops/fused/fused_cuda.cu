// Launchers of the fused training ops on CUDA: the shared argument checks, the current stream, the
// choice between the 16-byte vector path and the scalar one (rows or pointers not 16-byte aligned), the
// team and grid sizes, and the dtype dispatch. Kernels and their design: fused_kernels.cuh.
#include "ops/fused/fused_common.h"
#include "ops/fused/fused_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

namespace anvil::ops {
namespace {

namespace k = fused_cuda;
template <int N>
using Int = std::integral_constant<int, N>;

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Grid of a grid-stride elementwise kernel: enough blocks to fill the device a few times over.
int64_t elementwise_blocks(int64_t items, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>(div_up(items, threads), int64_t(sm_count()) * 16));
}

// Calls f(T{}) with T the CUDA type of `dtype`.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kHalf: f(__half{}); break;
    default: TORCH_CHECK(false, op, ": float64 is supported on the CPU only (for gradcheck), got ", dtype);
  }
}

// Values of T in 16 bytes.
template <typename T>
constexpr int kVecOf = 16 / sizeof(T);

// ---- rms_norm ------------------------------------------------------------------------------------------

// How a row is spread over a team: nvec vectors of kN values, team lanes holding vecs each.
struct NormLayout {
  int team, vecs, threads;
};

constexpr int kMaxTeam = k::kMaxNormThreads;  // lanes per row; wider rows take more vectors a lane
constexpr int kMaxVecsPerLane = 8;

NormLayout norm_layout(int64_t nvec) {
  int team = 1;
  while (team < nvec && team < kMaxTeam) team *= 2;
  int vecs = 1;
  while (int64_t(team) * vecs < nvec) vecs *= 2;
  return {team, vecs, std::max(team, 256)};
}

// Calls f(Int<kN>, Int<kVecs>) for the vector width (kVecOf<T> when `vec`, else 1) and vecs per lane.
template <typename T, typename F>
void dispatch_norm(bool vec, int vecs, F&& f) {
  auto by_vecs = [&](auto n) {
    switch (vecs) {
      case 1: f(n, Int<1>{}); break;
      case 2: f(n, Int<2>{}); break;
      case 4: f(n, Int<4>{}); break;
      default: f(n, Int<8>{}); break;
    }
  };
  if (vec) by_vecs(Int<kVecOf<T>>{});
  else by_vecs(Int<1>{});
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "anvil::rms_norm";
  const int64_t h = check_rms_norm_args(x, weight, eps, op);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  auto rstd = at::empty(rstd_shape(x), x.options().dtype(at::kFloat));
  const int64_t rows = x.numel() / h;
  if (rows == 0) return {y, rstd};
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = h % kVecOf<T> == 0 && aligned16(x.const_data_ptr()) && aligned16(weight.const_data_ptr()) &&
                     aligned16(y.const_data_ptr());
    const int64_t nvec = vec ? h / kVecOf<T> : h;
    const NormLayout lay = norm_layout(nvec);
    ANVIL_CHECK(lay.vecs <= kMaxVecsPerLane, op, ": x.size(-1) = ", h, " is too large for the CUDA kernel (at most ",
                int64_t(kMaxTeam) * kMaxVecsPerLane * (vec ? kVecOf<T> : 1), ")");
    const int64_t rows_per_block = lay.threads / lay.team;
    dispatch_norm<T>(vec, lay.vecs, [&](auto n, auto vecs) {
      k::rms_norm_kernel<T, decltype(n)::value, decltype(vecs)::value>
          <<<div_up(rows, rows_per_block), lay.threads, 0, at::cuda::getCurrentCUDAStream()>>>(
              reinterpret_cast<const T*>(x.const_data_ptr()), reinterpret_cast<const T*>(weight.const_data_ptr()),
              reinterpret_cast<T*>(y.data_ptr()), rstd.data_ptr<float>(), rows, int(h), lay.team, float(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd) {
  const char* op = "anvil::rms_norm_backward";
  const int64_t h = check_rms_norm_backward_args(grad_y, x, weight, rstd, op);
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty_like(x);
  auto dw = at::empty_like(weight);
  const int64_t rows = x.numel() / h;
  if (rows == 0) return {dx, dw.zero_()};
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = h % kVecOf<T> == 0 && aligned16(x.const_data_ptr()) && aligned16(weight.const_data_ptr()) &&
                     aligned16(grad_y.const_data_ptr()) && aligned16(dx.const_data_ptr());
    const int64_t nvec = vec ? h / kVecOf<T> : h;
    const NormLayout lay = norm_layout(nvec);
    ANVIL_CHECK(lay.vecs <= kMaxVecsPerLane, op, ": x.size(-1) = ", h, " is too large for the CUDA kernel (at most ",
                int64_t(kMaxTeam) * kMaxVecsPerLane * (vec ? kVecOf<T> : 1), ")");
    const int64_t teams = lay.threads / lay.team;
    // A few blocks per SM, each visiting rows at a fixed stride: the fewer blocks, the fewer partial rows
    // of grad_weight to write and sum; 2048 / threads blocks per SM keep the SMs' thread slots full.
    const int64_t blocks = std::min(div_up(rows, teams), int64_t(sm_count()) * std::max(1, 2048 / lay.threads));
    auto partial = at::empty({blocks, h}, x.options().dtype(at::kFloat));  // (blocks, H) fp32
    const size_t smem = teams > 1 ? size_t(teams) * h * sizeof(float) : 0;
    dispatch_norm<T>(vec, lay.vecs, [&](auto n, auto vecs) {
      auto kernel = k::rms_norm_backward_kernel<T, decltype(n)::value, decltype(vecs)::value>;
      if (smem > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      kernel<<<blocks, lay.threads, smem, stream>>>(
          reinterpret_cast<const T*>(grad_y.const_data_ptr()), reinterpret_cast<const T*>(x.const_data_ptr()),
          reinterpret_cast<const T*>(weight.const_data_ptr()), rstd.const_data_ptr<float>(),
          reinterpret_cast<T*>(dx.data_ptr()), partial.data_ptr<float>(), rows, int(h), lay.team);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    k::rms_norm_dw_reduce_kernel<T><<<div_up(h, 256), 256, 0, stream>>>(partial.const_data_ptr<float>(),
                                                                        reinterpret_cast<T*>(dw.data_ptr()),
                                                                        int(blocks), int(h));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dw};
}

// ---- swiglu ----------------------------------------------------------------------------------------------

constexpr int kElementwiseThreads = 256;

at::Tensor swiglu_cuda(const at::Tensor& gate, const at::Tensor& up) {
  const char* op = "anvil::swiglu";
  check_swiglu_args(gate, up, op);
  const c10::cuda::CUDAGuard guard(gate.device());
  auto out = at::empty_like(gate);
  const int64_t n = gate.numel();
  if (n == 0) return out;
  dispatch_dtype(gate.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = n % kVecOf<T> == 0 && aligned16(gate.const_data_ptr()) && aligned16(up.const_data_ptr()) &&
                     aligned16(out.const_data_ptr());
    auto launch = [&](auto kn) {
      constexpr int kN = decltype(kn)::value;
      k::swiglu_kernel<T, kN><<<elementwise_blocks(n / kN, kElementwiseThreads), kElementwiseThreads, 0,
                                at::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const T*>(gate.const_data_ptr()), reinterpret_cast<const T*>(up.const_data_ptr()),
          reinterpret_cast<T*>(out.data_ptr()), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) launch(Int<kVecOf<T>>{});
    else launch(Int<1>{});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_cuda(const at::Tensor& grad, const at::Tensor& gate,
                                                        const at::Tensor& up) {
  const char* op = "anvil::swiglu_backward";
  check_swiglu_backward_args(grad, gate, up, op);
  const c10::cuda::CUDAGuard guard(gate.device());
  auto dgate = at::empty_like(gate);
  auto dup = at::empty_like(up);
  const int64_t n = gate.numel();
  if (n == 0) return {dgate, dup};
  dispatch_dtype(gate.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = n % kVecOf<T> == 0 && aligned16(grad.const_data_ptr()) && aligned16(gate.const_data_ptr()) &&
                     aligned16(up.const_data_ptr()) && aligned16(dgate.const_data_ptr()) &&
                     aligned16(dup.const_data_ptr());
    auto launch = [&](auto kn) {
      constexpr int kN = decltype(kn)::value;
      k::swiglu_backward_kernel<T, kN><<<elementwise_blocks(n / kN, kElementwiseThreads), kElementwiseThreads, 0,
                                         at::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const T*>(grad.const_data_ptr()), reinterpret_cast<const T*>(gate.const_data_ptr()),
          reinterpret_cast<const T*>(up.const_data_ptr()), reinterpret_cast<T*>(dgate.data_ptr()),
          reinterpret_cast<T*>(dup.data_ptr()), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) launch(Int<kVecOf<T>>{});
    else launch(Int<1>{});
  });
  return {dgate, dup};
}

// ---- rope ------------------------------------------------------------------------------------------------

at::Tensor rope_launch(const at::Tensor& in, const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                       bool backward, const char* op) {
  const c10::cuda::CUDAGuard guard(in.device());
  auto out = at::empty(in.sizes(), in.options().memory_format(at::MemoryFormat::Contiguous));  // (B, S, H, D)
  if (in.numel() == 0) return out;
  const k::RopeShape sh{in.size(0), in.size(1), in.size(2), int(in.size(3)), int(in.size(3) / 2),
                        in.stride(0), in.stride(1), in.stride(2), cos.size(0) == 1 ? 0 : in.size(1) * in.size(3)};
  dispatch_dtype(in.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kP = kVecOf<T>;
    const bool vec = sh.half % kP == 0 && sh.xs0 % kP == 0 && sh.xs1 % kP == 0 && sh.xs2 % kP == 0 &&
                     aligned16(in.const_data_ptr()) && aligned16(cos.const_data_ptr()) &&
                     aligned16(sin.const_data_ptr()) && aligned16(out.const_data_ptr());
    auto launch = [&](auto kp, auto inter, auto back) {
      constexpr int kPer = decltype(kp)::value;
      const int64_t items = sh.b * sh.s * sh.h * (sh.half / kPer);
      k::rope_kernel<T, kPer, decltype(inter)::value, decltype(back)::value>
          <<<elementwise_blocks(items, kElementwiseThreads), kElementwiseThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
              reinterpret_cast<const T*>(in.const_data_ptr()), reinterpret_cast<const T*>(cos.const_data_ptr()),
              reinterpret_cast<const T*>(sin.const_data_ptr()), reinterpret_cast<T*>(out.data_ptr()), sh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto by_mode = [&](auto kp) {
      using B = std::true_type;
      using F = std::false_type;
      if (interleaved) backward ? launch(kp, B{}, B{}) : launch(kp, B{}, F{});
      else backward ? launch(kp, F{}, B{}) : launch(kp, F{}, F{});
    };
    if (vec) by_mode(Int<kP>{});
    else by_mode(Int<1>{});
  });
  return out;
}

at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  check_rope_args(x, cos, sin, "anvil::rope", "x");
  return rope_launch(x, cos, sin, interleaved, false, "anvil::rope");
}

at::Tensor rope_backward_cuda(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  check_rope_args(grad, cos, sin, "anvil::rope_backward", "grad");
  return rope_launch(grad, cos, sin, interleaved, true, "anvil::rope_backward");
}

// ---- cross_entropy_chunk -----------------------------------------------------------------------------------

// A block per row: 512 threads for a vocabulary's worth of vectors, fewer for short rows.
int ce_threads(int64_t nvec) { return nvec >= 4096 ? 512 : nvec >= 1024 ? 256 : 128; }

std::tuple<at::Tensor, at::Tensor> cross_entropy_chunk_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                            int64_t ignore_index) {
  const char* op = "anvil::cross_entropy_chunk";
  check_cross_entropy_args(logits, labels, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t t = logits.size(0), v = logits.size(1);
  auto loss = at::empty({t}, logits.options().dtype(at::kFloat));
  auto lse = at::empty({t}, logits.options().dtype(at::kFloat));
  if (t == 0) return {loss, lse};
  ANVIL_CHECK(t < (int64_t(1) << 31), op, ": at most 2^31 - 1 rows per chunk, got ", t);
  dispatch_dtype(logits.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = v % kVecOf<T> == 0 && aligned16(logits.const_data_ptr());
    auto launch = [&](auto kn) {
      constexpr int kN = decltype(kn)::value;
      k::cross_entropy_kernel<T, kN><<<unsigned(t), ce_threads(v / kN), 0, at::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const T*>(logits.const_data_ptr()), labels.const_data_ptr<int64_t>(),
          loss.data_ptr<float>(), lse.data_ptr<float>(), v, ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) launch(Int<kVecOf<T>>{});
    else launch(Int<1>{});
  });
  return {loss, lse};
}

void cross_entropy_chunk_backward_cuda(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                       const at::Tensor& grad_loss, int64_t ignore_index) {
  const char* op = "anvil::cross_entropy_chunk_backward";
  check_cross_entropy_backward_args(logits, labels, lse, grad_loss, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t t = logits.size(0), v = logits.size(1);
  if (t == 0) return;
  ANVIL_CHECK(t < (int64_t(1) << 31), op, ": at most 2^31 - 1 rows per chunk, got ", t);
  dispatch_dtype(logits.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = v % kVecOf<T> == 0 && aligned16(logits.const_data_ptr());
    auto launch = [&](auto kn) {
      constexpr int kN = decltype(kn)::value;
      k::cross_entropy_backward_kernel<T, kN><<<unsigned(t), ce_threads(v / kN), 0, at::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<T*>(logits.data_ptr()), labels.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
          grad_loss.const_data_ptr<float>(), grad_loss.dim() == 0 ? 0 : 1, v, ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) launch(Int<kVecOf<T>>{});
    else launch(Int<1>{});
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda);
  m.impl("rms_norm_backward", &rms_norm_backward_cuda);
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
  m.impl("rope", &rope_cuda);
  m.impl("rope_backward", &rope_backward_cuda);
  m.impl("cross_entropy_chunk", &cross_entropy_chunk_cuda);
  m.impl("cross_entropy_chunk_backward", &cross_entropy_chunk_backward_cuda);
}

}  // namespace anvil::ops
