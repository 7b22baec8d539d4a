// What the CPU, CUDA and Meta kernels of the quantization ops share: the granularity names, the
// shape of scale_inv for each, and the argument checks. See docs/FORMATS.md ("Scales").
//
// A tensor x of shape (..., K) is viewed as (rows, K), rows = product of the leading dims.
//   granularity    groups sharing one scale         scale_inv shape        used for
//   "tensor"       all of x                         ()                     per-tensor W8A8
//   "row"          one row (K values)               (..., 1)               per-token / per-channel
//   "block1x128"   1 x 128 (last one partial)       (..., ceil(K/128))     activations, DeepSeek-V3
//   "block128x128" 128 x 128 (edges partial)        (ceil(N/128), ceil(K/128)), x 2-D (N, K): weights
#pragma once

#include "ops/common/checks.h"

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <string>
#include <vector>

namespace anvil::ops {

enum class Granularity { kTensor, kRow, kBlock1x128, kBlock128x128 };

constexpr int64_t kBlock = 128;  // the side of DeepSeek-V3's scaling blocks

inline const char* granularity_name(Granularity g) {
  switch (g) {
    case Granularity::kTensor: return "tensor";
    case Granularity::kRow: return "row";
    case Granularity::kBlock1x128: return "block1x128";
    case Granularity::kBlock128x128: return "block128x128";
  }
  return "?";
}

// Accepts the four names above. "block<M>x<K>" with other sizes is recognised so the error can say
// which block sizes exist (and that a block side of zero is not a block).
inline Granularity parse_granularity(c10::string_view s, const char* op) {
  const std::string name(s.data(), s.size());
  if (name == "tensor") return Granularity::kTensor;
  if (name == "row") return Granularity::kRow;
  if (name == "block1x128") return Granularity::kBlock1x128;
  if (name == "block128x128") return Granularity::kBlock128x128;
  long long bm = -1, bk = -1;
  char tail = 0;
  if (std::sscanf(name.c_str(), "block%lldx%lld%c", &bm, &bk, &tail) == 2) {
    ANVIL_CHECK(bm > 0 && bk > 0, op, ": granularity '", name,
                "' has a zero-size block dimension; block sides must be positive (block1x128 or block128x128)");
    ANVIL_CHECK(false, op, ": granularity '", name,
                "' is not supported; block sizes are block1x128 (activations) and block128x128 (weights)");
  }
  ANVIL_CHECK(false, op, ": granularity must be one of tensor, row, block1x128, block128x128; got '", name, "'");
  return Granularity::kTensor;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The 2-D view every kernel works on.
struct RowsCols {
  int64_t rows;
  int64_t cols;
};

inline RowsCols rows_cols(at::IntArrayRef shape) {
  if (shape.empty()) return {1, 1};
  int64_t cols = shape.back();
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
  return {rows, cols};
}

inline std::vector<int64_t> scale_shape(at::IntArrayRef x_shape, Granularity g) {
  std::vector<int64_t> s(x_shape.begin(), x_shape.end());
  switch (g) {
    case Granularity::kTensor: return {};
    case Granularity::kRow: s.back() = 1; return s;
    case Granularity::kBlock1x128: s.back() = ceil_div(s.back(), kBlock); return s;
    case Granularity::kBlock128x128: return {ceil_div(x_shape[0], kBlock), ceil_div(x_shape[1], kBlock)};
  }
  return s;
}

// Rank and size rules of x (or q) for a granularity; `arg` names the tensor in messages.
inline void check_shape_for(const at::Tensor& x, Granularity g, const char* op, const char* arg) {
  switch (g) {
    case Granularity::kTensor: break;
    case Granularity::kRow:
    case Granularity::kBlock1x128:
      check_min_rank(x, op, arg, 1);
      break;
    case Granularity::kBlock128x128:
      ANVIL_CHECK(x.dim() == 2, op, ": granularity block128x128 needs a 2-D ", arg,
                  " (N, K) (a weight), got shape ", x.sizes());
      break;
  }
  if (g != Granularity::kTensor) {
    ANVIL_CHECK(x.size(-1) > 0, op, ": granularity ", granularity_name(g), " needs ", arg,
                ".size(-1) > 0 (a group must hold at least one value), got shape ", x.sizes());
  }
}

inline void check_quantize_args(const at::Tensor& x, Granularity g, const char* op) {
  check_dtype(x, op, "x", {at::kFloat, at::kBFloat16, at::kHalf});
  check_contiguous(x, op, "x");
  check_shape_for(x, g, op, "x");
}

inline void check_dequantize_args(const at::Tensor& q, const at::Tensor& scale_inv, Granularity g,
                                  at::ScalarType q_dtype, at::ScalarType out_dtype, const char* op) {
  check_dtype(q, op, "q", {q_dtype});
  check_dtype(scale_inv, op, "scale_inv", {at::kFloat});
  check_contiguous(q, op, "q");
  check_contiguous(scale_inv, op, "scale_inv");
  check_same_device(q, scale_inv, op, "q", "scale_inv");
  check_shape_for(q, g, op, "q");
  ANVIL_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf, op,
              ": out_dtype must be one of Float, BFloat16, Half, got ", out_dtype);
  const auto want = scale_shape(q.sizes(), g);
  ANVIL_CHECK(scale_inv.sizes() == at::IntArrayRef(want), op, ": scale_inv for granularity ",
              granularity_name(g), " and q of shape ", q.sizes(), " must have shape ", at::IntArrayRef(want),
              ", got ", scale_inv.sizes());
}

}  // namespace anvil::ops
