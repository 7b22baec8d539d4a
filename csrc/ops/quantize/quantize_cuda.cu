// Launchers of the quantization ops on CUDA: argument checks (shared with CPU and Meta), the current
// stream, grid sizes, and the dispatch over input dtype x output kind x vector/scalar path.
// Kernels and their design: quantize_kernels.cuh.
#include "ops/quantize/quantize_common.h"
#include "ops/quantize/quantize_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

namespace anvil::ops {
namespace {

using cuda::kThreads;
using cuda::kVecValues;

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The kVec path needs whole 8-value chunks in every row and 16-byte aligned rows.
bool can_vectorize(const at::Tensor& a, const at::Tensor& b, int64_t cols) {
  return cols % kVecValues == 0 && aligned16(a.const_data_ptr()) && aligned16(b.const_data_ptr());
}

int64_t grid_stride_blocks(int64_t n) {
  const int64_t want = ceil_div(ceil_div(n, kVecValues), kThreads);
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return std::max<int64_t>(1, std::min(want, cap));
}

template <typename T, typename Q, bool kVec>
void launch_quantize(const at::Tensor& x, at::Tensor& q, at::Tensor& scale_inv, Granularity g) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const RowsCols rc = rows_cols(x.sizes());
  const T* xp = reinterpret_cast<const T*>(x.const_data_ptr());
  auto* qp = reinterpret_cast<typename Q::Storage*>(q.data_ptr());
  float* sp = scale_inv.data_ptr<float>();
  switch (g) {
    case Granularity::kBlock1x128: {
      const int64_t per_row = ceil_div(rc.cols, kBlock), groups = rc.rows * per_row;
      // K % 128 == 0 (the DeepSeek shapes): no index division, 4 groups in flight per half-warp
      // (88% of copy bandwidth on H100 against 77% for the general path; docs/BENCHMARKS.md).
      constexpr int64_t kHalfWarps = kThreads / 16;
      if (rc.cols % kBlock == 0) {
        cuda::quantize_1x128_kernel<T, Q, kVec, true, 4><<<ceil_div(groups, kHalfWarps * 4), kThreads, 0, stream>>>(
            xp, qp, sp, rc.cols, per_row, groups);
      } else {
        cuda::quantize_1x128_kernel<T, Q, kVec, false, 1><<<ceil_div(groups, kHalfWarps), kThreads, 0, stream>>>(
            xp, qp, sp, rc.cols, per_row, groups);
      }
      break;
    }
    case Granularity::kBlock128x128: {
      const int64_t per_row = ceil_div(rc.cols, kBlock), tiles = ceil_div(rc.rows, kBlock) * per_row;
      cuda::quantize_128x128_kernel<T, Q, kVec><<<tiles, kThreads, 0, stream>>>(xp, qp, sp, rc.rows, rc.cols,
                                                                                per_row);
      break;
    }
    case Granularity::kRow:
      cuda::quantize_row_kernel<T, Q, kVec><<<rc.rows, kThreads, 0, stream>>>(xp, qp, sp, rc.cols);
      break;
    case Granularity::kTensor: {
      const int64_t n = x.numel();
      auto amax = at::zeros({1}, x.options().dtype(at::kInt));
      auto* ap = reinterpret_cast<uint32_t*>(amax.data_ptr<int32_t>());
      const int64_t blocks = grid_stride_blocks(n);
      cuda::amax_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(xp, n, ap);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      cuda::quantize_tensor_kernel<T, Q, kVec><<<blocks, kThreads, 0, stream>>>(xp, qp, sp, n, ap);
      break;
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Q>
std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& x, c10::string_view granularity,
                                                 at::ScalarType q_dtype, const char* op) {
  const Granularity g = parse_granularity(granularity, op);
  check_quantize_args(x, g, op);
  const c10::cuda::CUDAGuard guard(x.device());
  auto q = at::empty(x.sizes(), x.options().dtype(q_dtype));
  auto scale_inv = at::empty(scale_shape(x.sizes(), g), x.options().dtype(at::kFloat));
  if (x.numel() == 0) {
    // Nothing to scale: a tensor scale still exists and is the floor's, as on the CPU.
    if (g == Granularity::kTensor) scale_inv.fill_(scale_inv_from_amax_bits(0, Q::kMax));
    return {q, scale_inv};
  }
  // The tensor granularity views x as one row, so the 8-value chunks only need numel % 8 == 0.
  const int64_t vec_cols = g == Granularity::kTensor ? x.numel() : rows_cols(x.sizes()).cols;
  const bool vec = can_vectorize(x, q, vec_cols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "anvil_quantize_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, __nv_bfloat16,
                                 std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half, float>>;
    if (vec) {
      launch_quantize<T, Q, true>(x, q, scale_inv, g);
    } else {
      launch_quantize<T, Q, false>(x, q, scale_inv, g);
    }
  });
  return {q, scale_inv};
}

template <typename Q>
at::Tensor dequantize_cuda(const at::Tensor& q, const at::Tensor& scale_inv, c10::string_view granularity,
                           at::ScalarType q_dtype, at::ScalarType out_dtype, const char* op) {
  const Granularity g = parse_granularity(granularity, op);
  check_dequantize_args(q, scale_inv, g, q_dtype, out_dtype, op);
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty(q.sizes(), q.options().dtype(out_dtype));
  if (q.numel() == 0) return out;
  const RowsCols rc = rows_cols(q.sizes());
  const int64_t groups_per_row = ceil_div(rc.cols, kBlock);
  const int mode = static_cast<int>(g);
  const int64_t blocks = ceil_div(rc.rows * ceil_div(rc.cols, kVecValues), kThreads);
  // kVec: one 8-byte load of q and 16-byte stores of out per thread.
  const bool vec = rc.cols % kVecValues == 0 && reinterpret_cast<uintptr_t>(q.const_data_ptr()) % 8 == 0 &&
                   aligned16(out.const_data_ptr());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto* qp = reinterpret_cast<const typename Q::Storage*>(q.const_data_ptr());
  const float* sp = scale_inv.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "anvil_dequantize_cuda", [&] {
    using OutT = std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, __nv_bfloat16,
                                    std::conditional_t<std::is_same_v<scalar_t, at::Half>, __half, float>>;
    auto* op_ = reinterpret_cast<OutT*>(out.data_ptr());
    if (vec) {
      cuda::dequantize_kernel<Q, OutT, true><<<blocks, kThreads, 0, stream>>>(qp, sp, op_, rc.rows, rc.cols, mode,
                                                                              groups_per_row);
    } else {
      cuda::dequantize_kernel<Q, OutT, false><<<blocks, kThreads, 0, stream>>>(qp, sp, op_, rc.rows, rc.cols, mode,
                                                                               groups_per_row);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cuda(const at::Tensor& x, c10::string_view granularity) {
  return quantize_cuda<cuda::Fp8Out>(x, granularity, at::kFloat8_e4m3fn, "anvil::quantize_fp8");
}
std::tuple<at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& x, c10::string_view granularity) {
  return quantize_cuda<cuda::Int8Out>(x, granularity, at::kChar, "anvil::quantize_int8");
}
at::Tensor dequantize_fp8_cuda(const at::Tensor& q, const at::Tensor& s, c10::string_view granularity,
                               at::ScalarType out_dtype) {
  return dequantize_cuda<cuda::Fp8In>(q, s, granularity, at::kFloat8_e4m3fn, out_dtype, "anvil::dequantize_fp8");
}
at::Tensor dequantize_int8_cuda(const at::Tensor& q, const at::Tensor& s, c10::string_view granularity,
                                at::ScalarType out_dtype) {
  return dequantize_cuda<cuda::Int8In>(q, s, granularity, at::kChar, out_dtype, "anvil::dequantize_int8");
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, CUDA, m) {
  m.impl("quantize_fp8", &quantize_fp8_cuda);
  m.impl("dequantize_fp8", &dequantize_fp8_cuda);
  m.impl("quantize_int8", &quantize_int8_cuda);
  m.impl("dequantize_int8", &dequantize_int8_cuda);
}

}  // namespace anvil::ops
