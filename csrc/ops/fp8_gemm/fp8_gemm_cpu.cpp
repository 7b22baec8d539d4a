// CPU reference of the FP8 GEMM ops, exactly the definition: dequantize each operand with its
// scales (anvil's dequantize_fp8, float(q) * scale_inv in fp32), multiply in fp32, add the bias in fp32,
// round once to out_dtype. It is the oracle for the CUDA kernels and the fallback without a GPU.
// Grouped layouts: each expert's rows are multiplied by its own weight; rows that belong to no expert are
// zero (contiguous layout), and rows at or past an expert's valid count are zero (masked layout).
#include "ops/fp8_gemm/fp8_gemm_common.h"

#include "anvil/ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace anvil::ops {
namespace {

at::Tensor dequantize_a(const at::Tensor& a, const at::Tensor& a_scale, ScaleKind kind) {
  return dequantize_fp8(a, a_scale, a_granularity(kind), at::kFloat);  // (M, K) fp32
}

at::Tensor dequantize_b(const at::Tensor& b, const at::Tensor& b_scale, ScaleKind kind) {
  return dequantize_fp8(b, b_scale, b_granularity(kind), at::kFloat);  // (N, K) fp32
}

at::Tensor fp8_gemm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                        const at::Tensor& b_scale, c10::optional<at::ScalarType> out_dtype_opt,
                         const c10::optional<at::Tensor>& bias) {
  const at::ScalarType out_dtype = out_dtype_opt.value_or(at::kBFloat16);
  const GemmShape s = check_gemm_args(a, a_scale, b, b_scale, out_dtype, bias, "anvil::fp8_gemm");
  auto out = at::matmul(dequantize_a(a, a_scale, s.a_kind), dequantize_b(b, b_scale, s.b_kind).t());  // (M, N)
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out.to(out_dtype);
}

// out rows [row0, row0 + rows) = a rows [row0, row0 + rows) x b[e]^T, dequantized and in fp32.
void expert_block(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale,
                  int64_t e, int64_t row0, int64_t rows, at::Tensor& out) {
  if (rows <= 0) return;
  const auto xa = dequantize_fp8(a.narrow(0, row0, rows), a_scale.narrow(0, row0, rows), "block1x128", at::kFloat);
  const auto xb = dequantize_fp8(b.select(0, e), b_scale.select(0, e), "block128x128", at::kFloat);
  out.narrow(0, row0, rows).copy_(at::matmul(xa, xb.t()));
}

at::Tensor fp8_grouped_gemm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                const at::Tensor& b_scale, const at::Tensor& offsets,
                                 c10::optional<at::ScalarType> out_dtype_opt) {
  const at::ScalarType out_dtype = out_dtype_opt.value_or(at::kBFloat16);
  const char* op = "anvil::fp8_grouped_gemm";
  const GroupedShape s = check_grouped_args(a, a_scale, b, b_scale, offsets, out_dtype, op);
  const int32_t* off = offsets.const_data_ptr<int32_t>();
  for (int64_t e = 0; e < s.experts; ++e) {
    ANVIL_CHECK(off[e] >= 0 && off[e] <= off[e + 1] && off[e + 1] <= s.rows, op,
                ": offsets must be non-decreasing within [0, R = ", s.rows, "], got offsets[", e, "] = ", off[e],
                ", offsets[", e + 1, "] = ", off[e + 1]);
  }
  auto out = at::zeros({s.rows, s.n}, a.options().dtype(at::kFloat));  // (R, N)
  for (int64_t e = 0; e < s.experts; ++e) expert_block(a, a_scale, b, b_scale, e, off[e], off[e + 1] - off[e], out);
  return out.to(out_dtype);
}

at::Tensor fp8_grouped_gemm_masked_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                       const at::Tensor& b_scale, const at::Tensor& masked_m,
                                       c10::optional<at::ScalarType> out_dtype_opt) {
  const at::ScalarType out_dtype = out_dtype_opt.value_or(at::kBFloat16);
  const char* op = "anvil::fp8_grouped_gemm_masked";
  const GroupedShape s = check_masked_args(a, a_scale, b, b_scale, masked_m, out_dtype, op);
  const auto a2 = a.view({s.rows, s.k});
  const auto s2 = a_scale.view({s.rows, s.k / kBlock});
  const int32_t* valid = masked_m.const_data_ptr<int32_t>();
  auto out = at::zeros({s.rows, s.n}, a.options().dtype(at::kFloat));  // (E * C, N)
  for (int64_t e = 0; e < s.experts; ++e) {
    ANVIL_CHECK(valid[e] >= 0 && valid[e] <= s.capacity, op, ": masked_m[", e, "] = ", valid[e],
                " must be in [0, C = ", s.capacity, "]");
    expert_block(a2, s2, b, b_scale, e, e * s.capacity, valid[e], out);
  }
  return out.to(out_dtype).view({s.experts, s.capacity, s.n});
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, CPU, m) {
  m.impl("fp8_gemm", &fp8_gemm_cpu);
  m.impl("fp8_grouped_gemm", &fp8_grouped_gemm_cpu);
  m.impl("fp8_grouped_gemm_masked", &fp8_grouped_gemm_masked_cpu);
}

}  // namespace anvil::ops
