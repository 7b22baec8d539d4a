// CPU reference of the quantization ops: plain loops over groups of values that share one scale.
// It is the oracle for the CUDA kernels (bit-exact, same arithmetic from quantize_math.h) and the
// fallback on machines without a GPU. Groups are independent, so they run in parallel.
#include "ops/quantize/quantize_common.h"
#include "ops/quantize/quantize_math.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace anvil::ops {
namespace {

// A rectangle of the (rows, cols) view that shares one scale.
struct Group {
  int64_t row0, row1, col0, col1;
};

// The groups of a granularity, in the order of scale_inv's elements.
struct GroupGrid {
  RowsCols rc;
  Granularity g;

  int64_t count() const {
    switch (g) {
      case Granularity::kTensor: return 1;
      case Granularity::kRow: return rc.rows;
      case Granularity::kBlock1x128: return rc.rows * ceil_div(rc.cols, kBlock);
      case Granularity::kBlock128x128: return ceil_div(rc.rows, kBlock) * ceil_div(rc.cols, kBlock);
    }
    return 0;
  }

  Group at(int64_t i) const {
    switch (g) {
      case Granularity::kTensor: return {0, rc.rows, 0, rc.cols};
      case Granularity::kRow: return {i, i + 1, 0, rc.cols};
      case Granularity::kBlock1x128: {
        const int64_t per_row = ceil_div(rc.cols, kBlock);
        const int64_t r = i / per_row, c0 = (i % per_row) * kBlock;
        return {r, r + 1, c0, std::min(rc.cols, c0 + kBlock)};
      }
      case Granularity::kBlock128x128: {
        const int64_t per_row = ceil_div(rc.cols, kBlock);
        const int64_t r0 = (i / per_row) * kBlock, c0 = (i % per_row) * kBlock;
        return {r0, std::min(rc.rows, r0 + kBlock), c0, std::min(rc.cols, c0 + kBlock)};
      }
    }
    return {0, 0, 0, 0};
  }
};

template <typename T>
uint32_t group_amax_bits(const T* x, int64_t cols, const Group& grp) {
  uint32_t amax = 0;
  for (int64_t r = grp.row0; r < grp.row1; ++r)
    for (int64_t c = grp.col0; c < grp.col1; ++c)
      amax = std::max(amax, abs_bits(static_cast<float>(x[r * cols + c])));
  return amax;
}

uint8_t round_to_e4m3(float v) { return c10::Float8_e4m3fn(v).x; }

int8_t round_to_int8(float v) { return static_cast<int8_t>(std::nearbyint(v)); }  // ties to even

// Quantizes x (rows, cols) group by group. Q is uint8_t (e4m3 bits) or int8_t.
template <typename T, typename Q>
void quantize_groups(const T* x, Q* q, float* scale_inv, const GroupGrid& grid, float qmax,
                     Q (*round)(float), Q poison) {
  const int64_t cols = grid.rc.cols;
  at::parallel_for(0, grid.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Group grp = grid.at(i);
      const float s = scale_inv_from_amax_bits(group_amax_bits(x, cols, grp), qmax);
      scale_inv[i] = s;
      const bool poisoned = scale_is_poisoned(s);
      for (int64_t r = grp.row0; r < grp.row1; ++r)
        for (int64_t c = grp.col0; c < grp.col1; ++c)
          q[r * cols + c] = poisoned ? poison : round(scaled_clamped(static_cast<float>(x[r * cols + c]), s, qmax));
    }
  });
}

template <typename Q, typename OutT>
void dequantize_groups(const Q* q, const float* scale_inv, OutT* out, const GroupGrid& grid,
                       float (*to_float)(Q)) {
  const int64_t cols = grid.rc.cols;
  at::parallel_for(0, grid.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Group grp = grid.at(i);
      const float s = scale_inv[i];
      for (int64_t r = grp.row0; r < grp.row1; ++r)
        for (int64_t c = grp.col0; c < grp.col1; ++c)
          out[r * cols + c] = static_cast<OutT>(to_float(q[r * cols + c]) * s);
    }
  });
}

float e4m3_to_float(uint8_t bits) { return static_cast<float>(c10::Float8_e4m3fn(bits, c10::Float8_e4m3fn::from_bits())); }
float int8_to_float(int8_t v) { return static_cast<float>(v); }

template <typename Q>
std::tuple<at::Tensor, at::Tensor> quantize_cpu(const at::Tensor& x, c10::string_view granularity,
                                                at::ScalarType q_dtype, float qmax, Q (*round)(float),
                                                Q poison, const char* op) {
  const Granularity g = parse_granularity(granularity, op);
  check_quantize_args(x, g, op);
  auto q = at::empty(x.sizes(), x.options().dtype(q_dtype));
  auto scale_inv = at::empty(scale_shape(x.sizes(), g), x.options().dtype(at::kFloat));
  const GroupGrid grid{rows_cols(x.sizes()), g};
  if (x.numel() == 0 && g != Granularity::kTensor) return {q, scale_inv};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "anvil_quantize_cpu", [&] {
    quantize_groups<scalar_t, Q>(x.const_data_ptr<scalar_t>(), static_cast<Q*>(q.data_ptr()),
                                 scale_inv.data_ptr<float>(), grid, qmax, round, poison);
  });
  return {q, scale_inv};
}

template <typename Q>
at::Tensor dequantize_cpu(const at::Tensor& q, const at::Tensor& scale_inv, c10::string_view granularity,
                          at::ScalarType q_dtype, at::ScalarType out_dtype, float (*to_float)(Q),
                          const char* op) {
  const Granularity g = parse_granularity(granularity, op);
  check_dequantize_args(q, scale_inv, g, q_dtype, out_dtype, op);
  auto out = at::empty(q.sizes(), q.options().dtype(out_dtype));
  if (q.numel() == 0) return out;
  const GroupGrid grid{rows_cols(q.sizes()), g};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "anvil_dequantize_cpu", [&] {
    dequantize_groups<Q, scalar_t>(static_cast<const Q*>(q.const_data_ptr()), scale_inv.const_data_ptr<float>(),
                                   out.data_ptr<scalar_t>(), grid, to_float);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_cpu(const at::Tensor& x, c10::string_view granularity) {
  return quantize_cpu<uint8_t>(x, granularity, at::kFloat8_e4m3fn, kFp8E4m3Max, round_to_e4m3, kFp8NanBits,
                               "anvil::quantize_fp8");
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& x, c10::string_view granularity) {
  return quantize_cpu<int8_t>(x, granularity, at::kChar, kInt8Max, round_to_int8, int8_t{0},
                              "anvil::quantize_int8");
}

at::Tensor dequantize_fp8_cpu(const at::Tensor& q, const at::Tensor& scale_inv, c10::string_view granularity,
                              at::ScalarType out_dtype) {
  return dequantize_cpu<uint8_t>(q, scale_inv, granularity, at::kFloat8_e4m3fn, out_dtype, e4m3_to_float,
                                 "anvil::dequantize_fp8");
}

at::Tensor dequantize_int8_cpu(const at::Tensor& q, const at::Tensor& scale_inv, c10::string_view granularity,
                               at::ScalarType out_dtype) {
  return dequantize_cpu<int8_t>(q, scale_inv, granularity, at::kChar, out_dtype, int8_to_float,
                                "anvil::dequantize_int8");
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, CPU, m) {
  m.impl("quantize_fp8", &quantize_fp8_cpu);
  m.impl("dequantize_fp8", &dequantize_fp8_cpu);
  m.impl("quantize_int8", &quantize_int8_cpu);
  m.impl("dequantize_int8", &dequantize_int8_cpu);
}

}  // namespace anvil::ops
