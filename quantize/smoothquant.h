// SmoothQuant (Xiao et al., arXiv 2211.10438): per-token int8 activations lose the few input channels with
// outliers, per-channel int8 weights do not mind a larger range. Scaling input channel j of the activations
// down by s_j and the consumers' weight column j up by s_j keeps X W^T exactly (X diag(s)^-1 diag(s) W^T)
// and moves the difficulty from activations to weights:
//   s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)   (W_j: column j over all rows of all consumers)
// X / s is folded into the weight of the norm in front of the consumers, W * s into the consumers.
//
// llm-compressor's SmoothQuantModifier (modifiers/transform/smoothquant/base.py, _calculate_smoothing_scales)
// uses the same formula with the activation's range max - min for max|X_j| and 2 max|W_j| for max|W_j|, the
// same guards (s_j = the activation statistic where the weight column is all zero; s >= 1e-5): pass those
// statistics to smoothquant_scales and the scales are theirs. A constant factor on every s_j changes no W8A8
// result (per-token and per-channel scales absorb it), so only max|X| vs max - min differs in effect.
//
// The alpha search quantizes the smoothed consumers as the w8a8-int8 scheme serves them (compressed-tensors'
// symmetric int8 rule: scale = max|v| / 127.5, q = round(clamp(v / scale, -128, 127))) and keeps the alpha of
// least output MSE against the unquantized float outputs.
#pragma once

#include <torch/torch.h>

#include <utility>
#include <vector>

namespace anvil::quantize {

/// Smallest smoothing scale (llm-compressor's MINIMUM_SMOOTHING_SCALE).
constexpr double kMinSmoothingScale = 1e-5;

/// s (K) fp32 from act_absmax (K) and weight_absmax (K, the max over every consumer's rows), 0 <= alpha <= 1.
at::Tensor smoothquant_scales(const at::Tensor& act_absmax, const at::Tensor& weight_absmax, double alpha);

/// max_i |W_ij| over the rows of every consumer weight (each (N_i, K)): (K) fp32.
at::Tensor consumer_weight_absmax(const std::vector<at::Tensor>& weights);

/// Folds s into the norm weight (K) (returns norm_weight / s) and the consumers (returns each W * s),
/// in their own dtypes. The float function norm(x) W^T is unchanged up to rounding.
struct Smoothed {
  at::Tensor norm_weight;
  std::vector<at::Tensor> weights;
};
Smoothed apply_smoothing(const at::Tensor& norm_weight, const std::vector<at::Tensor>& weights,
                         const at::Tensor& s);

/// Symmetric int8 quantize-dequantize along `dim`'s complement: one scale per row of a 2-D v when dim == 1
/// (per output channel for weights, per token for activations), compressed-tensors' rule. fp32 out.
at::Tensor fake_quantize_int8_rows(const at::Tensor& v);

/// Output MSE of the W8A8 consumers on x (T, K) after smoothing with s (K), vs the float outputs x W^T:
/// sum over consumers of ||Q(x / s) Q(W s)^T - x W^T||^2 / sum of T N_i.
double w8a8_output_mse(const at::Tensor& x, const std::vector<at::Tensor>& weights, const at::Tensor& s);

struct AlphaSearch {
  double alpha = 0;
  double mse = 0;
  std::vector<std::pair<double, double>> tried;  ///< (alpha, mse) in grid order
};
/// Tries each alpha of grid (each in [0, 1]) on calibration inputs x (T, K) to the consumers (each (N_i, K))
/// and returns the one of least W8A8 output MSE (the first on ties). Pass a sample of tokens: each alpha
/// costs two (T, K) x (K, sum N_i) matmuls. act_absmax (K): max|X_j| over the whole calibration set, for the
/// scales (undefined: taken from x).
AlphaSearch search_smoothquant_alpha(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                     const std::vector<double>& grid, const at::Tensor& act_absmax = {});

}  // namespace anvil::quantize
