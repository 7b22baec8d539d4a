// GPTQ (Frantar et al., arXiv 2210.17323): weight quantization that corrects each column's rounding error
// with the inverse Hessian of the layer's calibration inputs, so the layer's outputs move least.
//
// Built to give what llm-compressor 0.14.0.1 gives (modifiers/gptq/gptq_quantize.py quantize_weight with
// compressed-tensors 0.19's observer and fake_quantize), because its checkpoints are what vLLM and
// transformers load and what users compare against:
// - the scales and zero points are fixed BEFORE the GPTQ sweep, by the min-max observer on the original
//   weight (groups of `group_size` consecutive input columns in the original order), computed in the
//   weight's own dtype: symmetric scale = max|w| / ((2^b - 1) / 2), asymmetric scale = (max - min) /
//   (2^b - 1) and zero point round(clamp(qmin - min / scale, qmin, qmax)), min <= 0 <= max forced, a zero
//   scale replaced by the dtype's eps;
// - each column is quantized q = round(clamp(w / scale + zp, qmin, qmax)) (round half to even), dequantized
//   (q - zp) * scale in the scale's dtype;
// - act_order is llm-compressor's "weight"/"static" ordering: columns are processed in decreasing H_jj but
//   keep their original groups, so the checkpoint needs no g_idx;
// - H is dampened by dampening * mean(diag H); dead columns (H_jj == 0) get H_jj = 1 and weight 0; a
//   Hessian that still fails Cholesky falls back to round-to-nearest (identity factor) and says so in
//   GptqResult::rtn_fallback, as llm-compressor does (it logs the modules).
// Everything is ATen ops on the weight's device: one Cholesky, per column about eight elementwise kernels on
// (N) vectors and one (bw - i, N) update inside a block of block_size columns, and one matmul per block (the
// lazy batch update of the paper's section 3.4); no per-element loop in C++. The per-column launches bound
// the GPU time (GptqCuda.MatchesCpuAndIsFast times a 4096 x 4096 layer), so layers that share an input
// (q/k/v, gate/up) are best quantized in one sweep: gptq_quantize_shared (rows are independent given H).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace anvil::quantize {

/// Accumulates H = 2 X^T X / n over calibration rows x (n = rows seen), the quadratic form of GPTQ's layer
/// loss ||W X^T - Q X^T||^2. fp32 on `device`. llm-compressor's accumulate_hessian keeps the same sum but
/// divides by the number of sequences instead of tokens: the GPTQ result is the same (H's scale cancels,
/// dampening is relative), only GptqResult::loss scales with it.
class HessianAccumulator {
 public:
  HessianAccumulator(int64_t in_features, at::Device device);
  /// x: (..., in_features), any floating dtype/device; its rows are added.
  void add(const at::Tensor& x);
  /// (K, K) fp32: 2 X^T X / rows(); zeros before any row was added.
  at::Tensor hessian() const;
  int64_t rows() const { return rows_; }
  int64_t in_features() const { return in_features_; }

 private:
  int64_t in_features_;
  at::Tensor sum_;  // (K, K) fp32, sum of 2 x x^T
  int64_t rows_ = 0;
};

struct GptqOptions {
  int bits = 4;              ///< 2..8, integer grid [-2^(b-1), 2^(b-1) - 1]
  int64_t group_size = 128;  ///< input columns sharing a scale; -1: one group per row (channel)
  bool act_order = false;    ///< process columns by decreasing H_jj (llm-compressor actorder "weight")
  double dampening = 0.01;   ///< fraction of mean(diag H) added to the diagonal (llm-compressor dampening_frac)
  int64_t block_size = 128;  ///< columns per lazy batch update
  bool symmetric = true;     ///< false: asymmetric, with an int8 zero point per group
  /// The dtype scales are computed and rounded in (compressed-tensors: the weight's dtype; the checkpoint
  /// stores weight_scale in it). nullopt: the weight's dtype.
  std::optional<at::ScalarType> scale_dtype;
};

struct GptqResult {
  at::Tensor q;           ///< (N, K) int8 integer values, in the grid of `bits`
  at::Tensor scale;       ///< (N, K / group) in scale_dtype: w ~ (q - zero_point) * scale
  at::Tensor zero_point;  ///< (N, K / group) int8; undefined when symmetric
  at::Tensor g_idx;       ///< (K) int32 group of each input column (always column / group_size here)
  at::Tensor dequantized; ///< (N, K) fp32 (q - zp) * scale, computed in scale_dtype as compressed-tensors does
  double loss = 0;        ///< llm-compressor's loss: sum over rows and columns of err^2 / 2 (err = (w-q)/d)
  bool rtn_fallback = false;  ///< H was not positive definite after dampening: round-to-nearest was used
};

/// GPTQ-quantizes weight (N, K) (any floating dtype) with the Hessian (K, K) of its inputs. Errors name the
/// argument and rule: shapes, K not a multiple of group_size, bits outside 2..8, non-finite input.
GptqResult gptq_quantize(const at::Tensor& weight, const at::Tensor& hessian, const GptqOptions& options);

/// GPTQ of several layers that read the same input (q/k/v, gate/up: one Hessian): their rows are
/// concatenated and quantized in one sweep (rows are independent given H, so each result is the one
/// gptq_quantize gives it alone, up to fp32 sums in the block matmul), then split back. Same K and dtype.
/// GptqResult::loss of each part is the whole sweep's loss split by rows.
std::vector<GptqResult> gptq_quantize_shared(const std::vector<at::Tensor>& weights, const at::Tensor& hessian,
                                             const GptqOptions& options);

/// Round-to-nearest with the same observer and grid (the baseline GPTQ must beat): GptqResult with loss 0.
GptqResult rtn_quantize(const at::Tensor& weight, const GptqOptions& options);

/// tr((W - Q) H (W - Q)^T): the layer-output error GPTQ minimizes (W, Q (N, K), H (K, K)), as a double.
double gptq_output_error(const at::Tensor& weight, const at::Tensor& dequantized, const at::Tensor& hessian);

}  // namespace anvil::quantize
