// SmoothQuant scales, folding and the alpha search (quantize/smoothquant.h says what is matched and why).
// All ATen ops on the inputs' device; the search reuses the float reference outputs across alphas.
#include "quantize/smoothquant.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace anvil::quantize {
namespace {

void check_weights(const std::vector<at::Tensor>& weights, int64_t K, const char* who) {
  TORCH_CHECK(!weights.empty(), who, ": weights must name at least one consumer");
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.defined() && w.dim() == 2 && (K < 0 || w.size(1) == K), who, ": weights[", i,
                "] must be (N, ", K, "), got ", w.defined() ? w.sizes() : at::IntArrayRef{});
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), who, ": weights[", i, "] must be floating point");
  }
}

}  // namespace

at::Tensor smoothquant_scales(const at::Tensor& act_absmax, const at::Tensor& weight_absmax, double alpha) {
  TORCH_CHECK(act_absmax.defined() && act_absmax.dim() == 1, "smoothquant_scales: act_absmax must be (K)");
  TORCH_CHECK(weight_absmax.defined() && weight_absmax.sizes() == act_absmax.sizes(),
              "smoothquant_scales: weight_absmax must be (K) = ", act_absmax.sizes(), ", got ",
              weight_absmax.defined() ? weight_absmax.sizes() : at::IntArrayRef{});
  TORCH_CHECK(alpha >= 0 && alpha <= 1, "smoothquant_scales: alpha must be in [0, 1], got ", alpha);
  at::Tensor a = act_absmax.to(at::kFloat), w = weight_absmax.to(act_absmax.device(), at::kFloat);
  TORCH_CHECK(at::isfinite(a).all().item<bool>() && (a >= 0).all().item<bool>(),
              "smoothquant_scales: act_absmax must be finite and >= 0");
  TORCH_CHECK(at::isfinite(w).all().item<bool>() && (w >= 0).all().item<bool>(),
              "smoothquant_scales: weight_absmax must be finite and >= 0");
  at::Tensor s = a.pow(alpha) / w.pow(1 - alpha);
  s = at::where(w > 0, s, a);  // an all-zero weight column: nothing to balance against
  return at::clamp_min(s, kMinSmoothingScale);
}

at::Tensor consumer_weight_absmax(const std::vector<at::Tensor>& weights) {
  check_weights(weights, -1, "consumer_weight_absmax");
  const int64_t K = weights[0].size(1);
  check_weights(weights, K, "consumer_weight_absmax");
  at::Tensor m;
  for (const at::Tensor& w : weights) {
    at::Tensor c = std::get<0>(w.abs().max(0)).to(weights[0].device(), at::kFloat);  // (K)
    m = m.defined() ? at::maximum(m, c) : c;
  }
  return m;
}

Smoothed apply_smoothing(const at::Tensor& norm_weight, const std::vector<at::Tensor>& weights,
                         const at::Tensor& s) {
  TORCH_CHECK(s.defined() && s.dim() == 1, "apply_smoothing: s must be (K)");
  const int64_t K = s.size(0);
  TORCH_CHECK(norm_weight.defined() && norm_weight.dim() == 1 && norm_weight.size(0) == K,
              "apply_smoothing: norm_weight must be (", K, "), got ",
              norm_weight.defined() ? norm_weight.sizes() : at::IntArrayRef{});
  check_weights(weights, K, "apply_smoothing");
  TORCH_CHECK((s > 0).all().item<bool>() && at::isfinite(s).all().item<bool>(),
              "apply_smoothing: s must be finite and positive");
  Smoothed out;
  // Computed in fp32 (fp64 for fp64 tensors), stored back in each tensor's dtype.
  auto compute = [&](const at::Tensor& t) { return at::promote_types(at::kFloat, t.scalar_type()); };
  out.norm_weight = (norm_weight.to(compute(norm_weight)) / s.to(norm_weight.device(), compute(norm_weight)))
                        .to(norm_weight.scalar_type());
  for (const at::Tensor& w : weights)
    out.weights.push_back((w.to(compute(w)) * s.to(w.device(), compute(w)).unsqueeze(0)).to(w.scalar_type()));
  return out;
}

at::Tensor fake_quantize_int8_rows(const at::Tensor& v) {
  TORCH_CHECK(v.dim() == 2, "fake_quantize_int8_rows: v must be 2-D, got ", v.sizes());
  at::Tensor f = v.to(at::kFloat);
  at::Tensor scale = std::get<0>(f.abs().max(1, /*keepdim=*/true)) / 127.5;  // (rows, 1)
  scale = at::where(scale == 0, at::scalar_tensor(std::numeric_limits<float>::epsilon(), scale.options()), scale);
  return at::round(at::clamp(f / scale, -128, 127)) * scale;
}

namespace {

// Sum of squared errors of the W8A8 outputs and the element count, the references given.
double sq_error(const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& ref,
                const at::Tensor& s, double* count) {
  at::Tensor xq = fake_quantize_int8_rows(x.to(at::kFloat) / s.unsqueeze(0));  // (T, K)
  double total = 0;
  *count = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    at::Tensor wq = fake_quantize_int8_rows(weights[i].to(x.device(), at::kFloat) * s.unsqueeze(0));  // (N, K)
    at::Tensor y = at::matmul(xq, wq.t());  // (T, N)
    total += (y - ref[i]).square().sum().item<double>();
    *count += double(y.numel());
  }
  return total;
}

}  // namespace

double w8a8_output_mse(const at::Tensor& x, const std::vector<at::Tensor>& weights, const at::Tensor& s) {
  TORCH_CHECK(x.defined() && x.dim() == 2, "w8a8_output_mse: x must be (T, K)");
  check_weights(weights, x.size(1), "w8a8_output_mse");
  TORCH_CHECK(s.defined() && s.dim() == 1 && s.size(0) == x.size(1), "w8a8_output_mse: s must be (K)");
  std::vector<at::Tensor> ref;
  for (const at::Tensor& w : weights) ref.push_back(at::matmul(x.to(at::kFloat), w.to(x.device(), at::kFloat).t()));
  double n = 0;
  const double e = sq_error(x, weights, ref, s.to(x.device(), at::kFloat), &n);
  return e / n;
}

AlphaSearch search_smoothquant_alpha(const at::Tensor& x, const std::vector<at::Tensor>& weights,
                                     const std::vector<double>& grid, const at::Tensor& act_absmax) {
  TORCH_CHECK(x.defined() && x.dim() == 2 && x.size(0) > 0, "search_smoothquant_alpha: x must be (T, K) with T > 0, got ",
              x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "search_smoothquant_alpha: x must be floating point");
  check_weights(weights, x.size(1), "search_smoothquant_alpha");
  TORCH_CHECK(!grid.empty(), "search_smoothquant_alpha: grid must hold at least one alpha");
  for (double a : grid)
    TORCH_CHECK(a >= 0 && a <= 1, "search_smoothquant_alpha: every alpha of grid must be in [0, 1], got ", a);
  at::Tensor xf = x.to(at::kFloat);
  TORCH_CHECK(at::isfinite(xf).all().item<bool>(), "search_smoothquant_alpha: x has non-finite values");
  TORCH_CHECK(!act_absmax.defined() || (act_absmax.dim() == 1 && act_absmax.size(0) == x.size(1)),
              "search_smoothquant_alpha: act_absmax must be (", x.size(1), ")");
  const at::Tensor act = act_absmax.defined() ? act_absmax.to(x.device(), at::kFloat)
                                              : std::get<0>(xf.abs().max(0));  // (K)
  const at::Tensor wmax = consumer_weight_absmax(weights).to(x.device());  // (K)
  std::vector<at::Tensor> ref;
  for (const at::Tensor& w : weights) ref.push_back(at::matmul(xf, w.to(x.device(), at::kFloat).t()));
  AlphaSearch out;
  out.mse = std::numeric_limits<double>::infinity();
  for (double a : grid) {
    double n = 0;
    const double mse = sq_error(xf, weights, ref, smoothquant_scales(act, wmax, a), &n) / n;
    out.tried.emplace_back(a, mse);
    if (mse < out.mse) {
      out.mse = mse;
      out.alpha = a;
    }
  }
  return out;
}

}  // namespace anvil::quantize
