// Attention building blocks (include/anvil/model/attention.h). Each function mirrors the matching
// code of transformers 5.17 (modeling_llama.py, modeling_qwen3.py, modeling_deepseek_v3.py,
// modeling_rope_utils.py) so that fp32 logits agree to rounding; comments name the counterpart.
#include "anvil/model/attention.h"
#include "anvil/ops.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace anvil::model {

// ---- Linear, Embedding, RmsNorm ----------------------------------------------------------------

Linear::Linear(int64_t in_features, int64_t out_features, bool has_bias, const at::TensorOptions& options) {
  weight = register_parameter("weight", at::empty({out_features, in_features}, options));
  if (has_bias) bias = register_parameter("bias", at::empty({out_features}, options));
}

namespace {

// ---- quantized base weights (the formats: include/anvil/model/attention.h, docs/FORMATS.md "Linear weight
// formats"). Each format's dequantization and product are one function each below, used by the forward, the
// backward and dense_weight alike, so the three cannot disagree.

bool is_grouped_weight_only(const std::string& f) { return f == "int8" || f == "int4"; }
bool known_format(const std::string& f) {
  return f == "fp8" || f == "fp8-channel" || f == "fp8-tensor" || f == "w8a8" || is_grouped_weight_only(f);
}
constexpr const char* kFormats = "fp8, fp8-channel, fp8-tensor, w8a8, int8, int4";

// The checkpoint key of the scale buffer: DeepSeek-V3's for "fp8", compressed-tensors' for the others.
const char* scale_key(const std::string& f) { return f == "fp8" ? "weight_scale_inv" : "weight_scale"; }

// The dense (out, in) weight of `dtype` from a quantized one. Weight-only groups: W = (q - zp) * scale per
// group of `in / scale.size(1)` consecutive inputs, in fp32, rounded once to dtype.
at::Tensor dequantize_weight(const std::string& f, const at::Tensor& q, const at::Tensor& scale,
                             const at::Tensor& zero_point, at::ScalarType dtype) {
  if (f == "fp8") return anvil::ops::dequantize_fp8(q, scale, "block128x128", dtype);
  const char* g = scale.dim() == 0 ? "tensor" : "row";
  if (f == "fp8-channel" || f == "fp8-tensor") return anvil::ops::dequantize_fp8(q, scale, g, dtype);
  if (f == "w8a8") return anvil::ops::dequantize_int8(q, scale, g, dtype);
  const int64_t out = q.size(0), in = q.size(1), groups = scale.size(1);
  if (groups == 1 && !zero_point.defined()) return anvil::ops::dequantize_int8(q, scale, "row", dtype);
  auto v = q.to(at::kFloat).view({out, groups, in / groups});                 // (out, G, group) fp32
  if (zero_point.defined()) v = v - zero_point.to(at::kFloat).unsqueeze(-1);  // exact: small integers
  return (v * scale.unsqueeze(-1)).view({out, in}).to(dtype);
}

// x (..., K) as the contiguous (M, K) rows the activation quantizers take.
at::Tensor as_rows(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}).contiguous(); }

// The activation quantization a format's product runs on x ("" for the weight-only formats: none).
const char* activation_kind(const std::string& f) {
  if (f == "fp8") return "fp8-block1x128";
  if (f == "fp8-channel" || f == "fp8-tensor") return "fp8-row";
  if (f == "w8a8") return "int8-row";
  return "";
}

// x W^T without the bias, in x's dtype: the product each format runs (the GEMM of its own kind). The quantized
// formats read x's quantization `xq`/`xs` (SharedInput::quantized(activation_kind(f))), the weight-only ones x.
at::Tensor quantized_product(const std::string& f, const at::Tensor& x, const at::Tensor& xq, const at::Tensor& xs,
                             const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero_point) {
  auto shape = x.sizes().vec();
  shape.back() = q.size(0);
  if (f == "fp8" || f == "fp8-channel" || f == "fp8-tensor")  // xq (M, K) e4m3, xs (M, K/128) or (M, 1)
    return anvil::ops::fp8_gemm(xq, xs, q, scale, x.scalar_type()).view(shape);  // (..., out)
  if (f == "w8a8")                                                                // xq (M, K) int8, xs (M, 1)
    return anvil::ops::int8_gemm(xq, xs, q, scale, x.scalar_type()).view(shape);  // (..., out)
  // Weight-only: the dense copy lives only for this product.
  return at::linear(x, dequantize_weight(f, q, scale, zero_point, x.scalar_type()));
}

// x W^T over a frozen quantized W: the forward runs the format's product over x's (shared) quantization; dX = dY W
// with W dequantized to dY's dtype for the backward alone (fp8: ops::fp8_linear_backward, in column slices), so
// only the quantized weight stays resident (autograd of at::linear would keep a dense copy alive until the
// backward). autograd's apply needs every tensor argument defined: an absent zero point or activation
// quantization travels as an empty tensor.
class QuantizedWeightMatmul : public torch::autograd::Function<QuantizedWeightMatmul> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& xq,
                            const at::Tensor& xs, const at::Tensor& q, const at::Tensor& scale,
                            const at::Tensor& zero_point_or_empty, const std::string& format) {
    const at::Tensor zero_point = zero_point_or_empty.numel() > 0 ? zero_point_or_empty : at::Tensor();
    ctx->save_for_backward({q, scale, zero_point_or_empty});
    ctx->saved_data["format"] = format;
    return quantized_product(format, x, xq, xs, q, scale, zero_point);  // (..., out)
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& g = grads[0];  // (..., out)
    const auto& format = ctx->saved_data["format"].toStringRef();
    at::Tensor dx;
    if (ctx->needs_input_grad(0))
      dx = format == "fp8" ? anvil::ops::fp8_linear_backward(g, saved[0], saved[1])
                           : at::matmul(g, dequantize_weight(format, saved[0], saved[1],
                                                             saved[2].numel() > 0 ? saved[2] : at::Tensor(),
                                                             g.scalar_type()));  // (..., in)
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Round-to-nearest symmetric quantization of w (out, in) in groups of `group` inputs, with the arithmetic of
// anvil's quantize ops (docs/FORMATS.md "Quantization arithmetic"): scale = max(amax, 1e-10) / qmax (fp32),
// q = round_half_even(clamp(w / scale, -qmax, qmax)); a group holding NaN or inf gets scale NaN and q 0.
// -> (q (out, in) int8, scale (out, in / group) fp32)
std::pair<at::Tensor, at::Tensor> quantize_groups(const at::Tensor& w, int64_t group, double qmax) {
  const int64_t out = w.size(0), in = w.size(1);
  const auto x = w.to(at::kFloat).view({out, in / group, group});       // (out, G, group)
  const auto amax = x.abs().amax(-1, /*keepdim=*/true);                 // (out, G, 1), NaN propagates
  const auto finite = at::isfinite(amax);
  // A tensor divisor: ATen's CUDA division by a scalar multiplies by its reciprocal, which rounds differently
  // from the division the CPU (and FORMATS.md) does and flips int4 values near ties (0.8% of them here).
  const auto scale = at::where(finite, amax.clamp_min(1e-10) / at::scalar_tensor(qmax, amax.options()),
                               at::full({}, std::numeric_limits<float>::quiet_NaN(), amax.options()));
  auto q = at::round(at::clamp(x / scale, -qmax, qmax));
  q = at::where(finite, q, at::zeros({}, q.options()));
  return {q.to(at::kChar).view({out, in}), scale.view({out, in / group})};
}

}  // namespace

const std::pair<at::Tensor, at::Tensor>& SharedInput::quantized(const std::string& kind) {
  for (const auto& [k, v] : quantized_)
    if (k == kind) return v;
  const auto rows = as_rows(x_);  // (M, K)
  std::tuple<at::Tensor, at::Tensor> q;
  if (kind == "fp8-block1x128") q = anvil::ops::quantize_fp8(rows, "block1x128");  // (M, K) e4m3, (M, K/128)
  else if (kind == "fp8-row") q = anvil::ops::quantize_fp8(rows, "row");           // (M, K) e4m3, (M, 1)
  else if (kind == "int8-row") q = anvil::ops::quantize_int8(rows, "row");         // (M, K) int8, (M, 1)
  else TORCH_CHECK(false, "SharedInput: unknown activation quantization '", kind, "'");
  quantized_.emplace_back(kind, std::make_pair(std::get<0>(q), std::get<1>(q)));
  return quantized_.back().second;
}

at::Tensor Linear::forward(const at::Tensor& x) {
  SharedInput in(x);
  return forward(in);
}

at::Tensor Linear::forward(SharedInput& in) {
  const at::Tensor& x = in.x();
  at::Tensor out;  // (..., out)
  if (weight_format_.empty()) {
    out = at::linear(x, weight, bias);
  } else {
    if (weight_format_ == "fp8")  // fp8_linear's rule, checked before the activation is quantized
      TORCH_CHECK(x.size(-1) == weight.size(1), "Linear: input (..., ", x.size(-1), ") does not match the fp8 weight (",
                  weight.size(0), ", ", weight.size(1), ")");
    const auto none = at::empty({0}, weight.options());
    const char* kind = activation_kind(weight_format_);
    const auto& [xq, xs] = *kind ? in.quantized(kind) : std::pair<at::Tensor, at::Tensor>(none, none);
    const auto zero_point = weight_zero_point.defined() ? weight_zero_point : none;
    out = QuantizedWeightMatmul::apply(x, xq, xs, weight, weight_scale, zero_point, weight_format_);
    if (bias.defined()) out = out + bias;
  }
  return adapter ? adapter->forward(*this, x, out) : out;
}

void Linear::quantize_weight(const std::string& format, int64_t group_size) {
  TORCH_CHECK(weight_format_.empty(), "Linear: the weight is already quantized (", weight_format_, ")");
  TORCH_CHECK(known_format(format), "Linear: weight format '", format, "' is not one of ", kFormats);
  TORCH_CHECK(group_size == 0 || is_grouped_weight_only(format), "Linear: group_size applies to int8 and int4 only, got ",
              group_size, " for ", format);
  at::NoGradGuard no_grad;
  const auto w = weight.contiguous();  // (out, in)
  const int64_t in = w.size(1);
  if (format == "fp8") {
    TORCH_CHECK(in % 128 == 0, "Linear: an fp8 weight needs in_features % 128 == 0 (the 1x128 activation blocks "
                "of anvil::ops::fp8_linear), got ", in);
    auto [q, scale] = anvil::ops::quantize_fp8(w, "block128x128");
    set_quantized_weight(format, q, scale);
  } else if (format == "fp8-channel" || format == "fp8-tensor") {
    auto [q, scale] = anvil::ops::quantize_fp8(w, format == "fp8-channel" ? "row" : "tensor");
    set_quantized_weight(format, q, scale);
  } else if (format == "w8a8" || (format == "int8" && (group_size == 0 || group_size == in))) {
    auto [q, scale] = anvil::ops::quantize_int8(w, "row");
    set_quantized_weight(format, q, scale);
  } else {
    const int64_t group = group_size > 0 ? group_size : (format == "int4" ? std::min<int64_t>(128, in) : in);
    TORCH_CHECK(group > 0 && in % group == 0, "Linear: ", format, " group size ", group,
                " must divide in_features (", in, ")");
    auto [q, scale] = quantize_groups(w, group, format == "int4" ? 7.0 : 127.0);
    set_quantized_weight(format, q, scale, {}, group);
  }
}

void Linear::set_quantized_weight(const std::string& format, const at::Tensor& q, const at::Tensor& scale_in,
                                  const at::Tensor& zero_point, int64_t group_size) {
  // A per-tensor scale may come as () or, as compressed-tensors stores it, (1) or (1, 1).
  const bool one_scale = (format == "fp8-tensor" || format == "w8a8") && scale_in.numel() == 1 && scale_in.dim() <= 2 &&
                         !(format == "w8a8" && scale_in.dim() == 2 && q.dim() == 2 && q.size(0) == 1);
  const at::Tensor scale = one_scale ? scale_in.reshape({}) : scale_in;
  TORCH_CHECK(weight_format_.empty(), "Linear: the weight is already quantized (", weight_format_, ")");
  TORCH_CHECK(known_format(format), "Linear: weight format '", format, "' is not one of ", kFormats);
  TORCH_CHECK(q.dim() == 2 && q.sizes() == weight.sizes(), "Linear: quantized weight shape ", q.sizes(),
              " differs from the layer's ", weight.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "Linear: ", format, " ", scale_key(format), " must be float32, got ",
              scale.scalar_type());
  const int64_t out = q.size(0), in = q.size(1);
  const bool fp8_kind = format == "fp8" || format == "fp8-channel" || format == "fp8-tensor";
  TORCH_CHECK(q.scalar_type() == (fp8_kind ? at::kFloat8_e4m3fn : at::kChar), "Linear: a ", format, " weight must be ",
              fp8_kind ? "float8_e4m3fn" : "int8", ", got ", q.scalar_type());
  TORCH_CHECK(!zero_point.defined() || is_grouped_weight_only(format), "Linear: a zero point applies to int8 and int4 "
              "(weight-only) only, not ", format);
  TORCH_CHECK(group_size == 0 || is_grouped_weight_only(format), "Linear: group_size applies to int8 and int4 only, got ",
              group_size, " for ", format);
  if (format == "fp8") {
    TORCH_CHECK(scale.dim() == 2 && scale.size(0) == (out + 127) / 128 && scale.size(1) == (in + 127) / 128,
                "Linear: fp8 weight_scale_inv must be (ceil(out/128), ceil(in/128)), got ", scale.sizes());
  } else if (format == "fp8-channel") {
    TORCH_CHECK(scale.dim() == 2 && scale.size(0) == out && scale.size(1) == 1,
                "Linear: fp8-channel weight_scale must be (out, 1) = (", out, ", 1), got ", scale.sizes());
  } else if (format == "fp8-tensor") {
    TORCH_CHECK(scale.dim() == 0, "Linear: fp8-tensor weight_scale must be a scalar (), got ", scale.sizes());
  } else if (format == "w8a8") {
    TORCH_CHECK(scale.dim() == 0 || (scale.dim() == 2 && scale.size(0) == out && scale.size(1) == 1),
                "Linear: w8a8 weight_scale must be (out, 1) = (", out, ", 1) or a per-tensor (), got ", scale.sizes());
  } else {  // int8 / int4 weight-only, in groups along in_features
    TORCH_CHECK(scale.dim() == 2 && scale.size(0) == out && scale.size(1) >= 1 && in % scale.size(1) == 0,
                "Linear: ", format, " weight_scale must be (out, in / group_size) with group_size dividing in_features (",
                in, "), got ", scale.sizes());
    const int64_t group = in / scale.size(1);
    TORCH_CHECK(group_size == 0 || group_size == group, "Linear: ", format, " group_size ", group_size,
                " does not match weight_scale ", scale.sizes(), " (in_features ", in, " / ", scale.size(1), " = ", group, ")");
    if (zero_point.defined()) {
      TORCH_CHECK(zero_point.scalar_type() == at::kChar, "Linear: ", format, " weight_zero_point must be int8, got ",
                  zero_point.scalar_type());
      TORCH_CHECK(zero_point.sizes() == scale.sizes(), "Linear: ", format, " weight_zero_point must have weight_scale's "
                  "shape ", scale.sizes(), ", got ", zero_point.sizes());
    }
  }
  // The registered parameter is replaced (same name, so checkpoints keep their keys); the dense tensor
  // is released with it. The weight takes no gradient.
  weight = q.to(weight.device()).set_requires_grad(false);
  parameters_["weight"] = weight;
  weight_scale = register_buffer(scale_key(format), scale.to(weight.device(), at::kFloat).contiguous());
  if (zero_point.defined()) weight_zero_point = register_buffer("weight_zero_point", zero_point.to(weight.device()).contiguous());
  weight_format_ = format;
}

int64_t Linear::group_size() const {
  return is_grouped_weight_only(weight_format_) ? weight.size(1) / weight_scale.size(1) : 0;
}

at::Tensor Linear::dense_weight(at::ScalarType dtype) const {
  if (weight_format_.empty()) return weight.to(dtype);
  return dequantize_weight(weight_format_, weight, weight_scale, weight_zero_point, dtype);
}

std::vector<std::pair<std::string, std::shared_ptr<Linear>>> named_linears(torch::nn::Module& root) {
  std::vector<std::pair<std::string, std::shared_ptr<Linear>>> out;
  for (auto& item : root.named_modules(/*name_prefix=*/"", /*include_self=*/false)) {
    if (auto linear = std::dynamic_pointer_cast<Linear>(item.value())) out.emplace_back(item.key(), linear);
  }
  return out;
}

Embedding::Embedding(int64_t num_embeddings, int64_t dim, const at::TensorOptions& options) {
  weight = register_parameter("weight", at::empty({num_embeddings, dim}, options));
}

at::Tensor Embedding::forward(const at::Tensor& ids) { return at::embedding(weight, ids); }

RmsNorm::RmsNorm(int64_t dim, double eps_, const at::TensorOptions& options) : eps(eps_) {
  weight = register_parameter("weight", at::ones({dim}, options));
}

// ---- fused ops ---------------------------------------------------------------------------------
// The model runs anvil's fused ops (csrc/ops/fused) wherever their dtype rules hold; their CPU kernels
// compute transformers' formulas with the same roundings, so the CPU path still matches transformers.

at::Tensor RmsNorm::forward(const at::Tensor& x) {
  if (ops::use_fused_ops(x) && weight.scalar_type() == x.scalar_type() && x.size(-1) > 0)
    return std::get<0>(anvil::ops::rms_norm(x.contiguous(), weight, eps));  // (..., D)
  auto xf = x.to(at::kFloat);                                // (..., D) fp32
  auto variance = xf.pow(2).mean(-1, /*keepdim=*/true);      // (..., 1)
  xf = xf * at::rsqrt(variance + eps);
  return weight * xf.to(x.scalar_type());
}

// ---- rotary embeddings -------------------------------------------------------------------------

namespace {

// base ** (arange(0, dim, 2) / dim), fp32, as the rope init functions write it.
at::Tensor rope_powers(double base, int64_t dim) {
  auto exponents = at::arange(0, dim, 2, at::kLong).to(at::kFloat) / double(dim);
  return at::pow(base, exponents);
}

at::Tensor llama3_inv_freq(const RopeConfig& r) {  // _compute_llama3_parameters
  auto inv_freq = rope_powers(r.theta, r.dim).reciprocal();
  const double old_len = double(r.original_max_position_embeddings);
  const double low_freq_wavelen = old_len / r.low_freq_factor;
  const double high_freq_wavelen = old_len / r.high_freq_factor;
  auto wavelen = inv_freq.reciprocal() * (2 * M_PI);
  auto inv_llama = at::where(wavelen > low_freq_wavelen, inv_freq / r.factor, inv_freq);
  auto smooth = (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
  auto smoothed = (1 - smooth) * inv_llama / r.factor + smooth * inv_llama;
  auto is_medium = (wavelen < high_freq_wavelen).logical_not() & (wavelen > low_freq_wavelen).logical_not();
  return at::where(is_medium, smoothed, inv_llama);
}

at::Tensor yarn_inv_freq(const RopeConfig& r) {  // _compute_yarn_parameters
  const int64_t dim = r.dim;
  auto pos_freqs = rope_powers(r.theta, dim);
  auto inv_extrapolation = pos_freqs.reciprocal();
  auto inv_interpolation = (r.factor * pos_freqs).reciprocal();
  auto correction_dim = [&](double rotations) {
    return (double(dim) * std::log(double(r.original_max_position_embeddings) / (rotations * 2 * M_PI))) /
           (2 * std::log(r.theta));
  };
  double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
  if (r.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, double(dim - 1));
  if (low == high) high += 0.001;  // transformers: prevent a singular ramp
  auto ramp = ((at::arange(dim / 2, at::kFloat) - low) / (high - low)).clamp(0, 1);
  auto extrapolation_factor = 1 - ramp;
  return inv_interpolation * (1 - extrapolation_factor) + inv_extrapolation * extrapolation_factor;
}

}  // namespace

RotaryEmbedding::RotaryEmbedding(const RopeConfig& rope) : rope_(rope) {
  if (rope.type == "llama3") {
    inv_freq_ = llama3_inv_freq(rope);
  } else if (rope.type == "yarn") {
    inv_freq_ = yarn_inv_freq(rope);
  } else {
    inv_freq_ = rope_powers(rope.theta, rope.dim).reciprocal();
    if (rope.type == "linear") inv_freq_ = inv_freq_ / rope.factor;
  }
}

std::pair<at::Tensor, at::Tensor> RotaryEmbedding::cos_sin(const at::Tensor& positions, at::ScalarType dtype) const {
  auto inv = inv_freq_.to(positions.device());                          // (d/2) fp32
  auto freqs = positions.to(at::kFloat).unsqueeze(-1) * inv;            // (B, S, d/2)
  auto emb = at::cat({freqs, freqs}, -1);                               // (B, S, d)
  auto cos = emb.cos() * rope_.attention_factor;
  auto sin = emb.sin() * rope_.attention_factor;
  return {cos.to(dtype), sin.to(dtype)};
}

at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in, bool interleave) {
  // The fused op takes the (B, S, H, d) view of x (the projection's own layout) and returns it contiguous.
  if (ops::use_fused_ops(x) && cos_in.scalar_type() == x.scalar_type() && sin_in.scalar_type() == x.scalar_type() &&
      x.stride(-1) == 1 && cos_in.is_contiguous() && sin_in.is_contiguous())
    return anvil::ops::rope(x.transpose(1, 2), cos_in, sin_in, interleave).transpose(1, 2);  // (B, H, S, d)
  auto cos = cos_in.unsqueeze(1);  // (B, 1, S, d)
  auto sin = sin_in.unsqueeze(1);
  const int64_t d = x.size(-1), half = d / 2;
  if (!interleave) {  // apply_rotary_pos_emb: x * cos + rotate_half(x) * sin
    auto x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
    auto rotated = at::cat({-x2, x1}, -1);
    return x * cos + rotated * sin;
  }
  // apply_rotary_pos_emb_interleave: pairs (x0, x1), (x2, x3), ... each rotated by one frequency;
  // the output holds the rotated evens, then the rotated odds.
  auto c = cos.narrow(-1, 0, half), s = sin.narrow(-1, 0, half);
  auto x1 = x.slice(-1, 0, d, 2), x2 = x.slice(-1, 1, d, 2);
  return at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
}

// ---- cache and mask ----------------------------------------------------------------------------

namespace {

// Grows `buf` (B, H, cap, D) to hold `needed` positions, doubling, keeping the first `used`.
void reserve(at::Tensor& buf, const at::Tensor& like, int64_t used, int64_t needed) {
  if (buf.defined() && buf.size(2) >= needed) return;
  const int64_t cap = std::max<int64_t>(needed, buf.defined() ? 2 * buf.size(2) : 16);
  auto grown = at::empty({like.size(0), like.size(1), cap, like.size(3)}, like.options());
  if (used > 0) grown.narrow(2, 0, used).copy_(buf.narrow(2, 0, used));
  buf = grown;
}

}  // namespace

std::pair<at::Tensor, at::Tensor> LayerCache::append(const at::Tensor& a, const at::Tensor& b) {
  const int64_t s = a.size(2);
  reserve(a_, a, length_, length_ + s);
  reserve(b_, b, length_, length_ + s);
  a_.narrow(2, length_, s).copy_(a);
  b_.narrow(2, length_, s).copy_(b);
  length_ += s;
  return {a_.narrow(2, 0, length_), b_.narrow(2, 0, length_)};
}

void LayerCache::keep_rows(const at::Tensor& rows) {
  if (!a_.defined()) return;
  const auto r = rows.to(a_.device(), at::kLong);
  a_ = a_.index_select(0, r);  // (B', H, capacity, D1): the capacity is kept, appends stay copy-free
  b_ = b_.index_select(0, r);
}

AttentionMask AttentionMask::make(int64_t seq_len, int64_t offset, int64_t window, const at::Device& device) {
  AttentionMask m;
  const int64_t total = offset + seq_len;
  if (window <= 0 || total <= window) {
    if (offset == 0) return m;  // plain causal
    if (seq_len == 1) {         // one new token sees everything cached
      m.causal = false;
      return m;
    }
  }
  auto q = at::arange(offset, total, at::TensorOptions().dtype(at::kLong).device(device)).unsqueeze(1);  // (S, 1)
  auto k = at::arange(0, total, at::TensorOptions().dtype(at::kLong).device(device)).unsqueeze(0);       // (1, L)
  auto allowed = k <= q;
  if (window > 0) allowed = allowed & (k > q - window);  // sliding_window_overlay
  m.mask = allowed;
  m.causal = false;
  return m;
}

AttentionMask AttentionMask::packed(const at::Tensor& doc_ids, int64_t window) {
  TORCH_CHECK(doc_ids.dim() == 2, "doc_ids must be (B, S), got ", doc_ids.sizes());
  const int64_t b = doc_ids.size(0), s = doc_ids.size(1);
  const auto ids = doc_ids.to(at::kLong);
  // A document starts at every row start and wherever the id changes within a row.
  auto starts = at::ones({b, s}, ids.options().dtype(at::kBool));  // (B, S)
  if (s > 1) starts.narrow(1, 1, s - 1).copy_(ids.narrow(1, 1, s - 1).ne(ids.narrow(1, 0, s - 1)));
  const auto begin = at::nonzero(starts.reshape({-1})).reshape({-1});  // (docs) int64, ascending
  AttentionMask m;
  m.cu_seqlens = at::cat({begin, at::full({1}, b * s, begin.options())}).to(at::kInt);  // (docs + 1)
  m.window = window;
  return m;
}

bool use_varlen_for_packed(const at::Device& device, at::ScalarType dtype, int64_t qk_head_dim, int64_t v_head_dim,
                           int64_t seq_len) {
  const char* env = std::getenv("ANVIL_PACKED_ATTENTION");
  if (env != nullptr && std::strcmp(env, "varlen") == 0) return true;
  if (env != nullptr && std::strcmp(env, "mask") == 0) return false;
  TORCH_CHECK(env == nullptr || *env == '\0', "ANVIL_PACKED_ATTENTION must be mask or varlen, got '", env, "'");
  const bool dims = (qk_head_dim == v_head_dim && (qk_head_dim == 64 || qk_head_dim == 128)) ||
                    (qk_head_dim == 192 && v_head_dim == 128);
  return device.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf) && dims && seq_len >= kVarlenMinSeqLen;
}

namespace {

// Packed rows as the one sequence the varlen path attends: (B, H, S, D) -> (1, H, B * S, D), and back.
at::Tensor rows_as_one_sequence(const at::Tensor& t) {
  return t.transpose(0, 1).reshape({1, t.size(1), t.size(0) * t.size(2), t.size(3)});
}
at::Tensor one_sequence_as_rows(const at::Tensor& t, int64_t b, int64_t s) {
  return t.view({t.size(1), b, s, t.size(3)}).transpose(0, 1);
}

// Packed rows on the varlen path: q (B, Hq, S, D), k (B, Hk, S, D), v (B, Hk, S, Dv) attended document by
// document by sparse_attention (causal within each document, the sliding window if any) -> (B, Hq, S, Dv).
at::Tensor attend_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                         double scale) {
  auto [o, lse] = ops::sparse_attention(rows_as_one_sequence(q), rows_as_one_sequence(k), rows_as_one_sequence(v),
                                        c10::nullopt, c10::nullopt, mask.cu_seqlens, mask.window > 0 ? mask.window : -1,
                                        0, 64, scale);
  return one_sequence_as_rows(o, q.size(0), q.size(2));
}

}  // namespace

at::Tensor attend(const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in, const AttentionMask& mask,
                  double scale, const std::string& backend) {
  if (mask.cu_seqlens.defined()) return attend_varlen(q, k_in, v_in, mask, scale);
  // Each of the Hk kv heads serves Hq / Hk consecutive query heads.
  const int64_t groups = q.size(1) / k_in.size(1);
  if (backend == "sdpa") {
    // Without a mask, enable_gqa: the flash kernel reads each kv head for its group of query heads, so
    // no (B, Hq, L, D) copies of k and v are made (nor kept for the backward), as transformers' sdpa path
    // does. With a mask the memory-efficient kernel runs, which (torch 2.11) takes no GQA: repeat then.
    if (!mask.mask.defined())
      return at::scaled_dot_product_attention(q, k_in, v_in, {}, 0.0, mask.causal, scale, /*enable_gqa=*/groups > 1);
    auto k = groups == 1 ? k_in : k_in.repeat_interleave(groups, 1);
    auto v = groups == 1 ? v_in : v_in.repeat_interleave(groups, 1);
    return at::scaled_dot_product_attention(q, k, v, mask.mask, 0.0, false, scale);
  }
  // repeat_kv
  auto k = groups == 1 ? k_in : k_in.repeat_interleave(groups, 1);
  auto v = groups == 1 ? v_in : v_in.repeat_interleave(groups, 1);
  // eager_attention_forward
  auto scores = at::matmul(q, k.transpose(2, 3)) * scale;  // (B, H, S, L)
  const int64_t s = q.size(2), l = k.size(2);
  if (mask.mask.defined()) {
    scores = scores.masked_fill(mask.mask.logical_not(), -std::numeric_limits<double>::infinity());
  } else if (mask.causal && s > 1) {
    auto causal = at::ones({s, l}, q.options().dtype(at::kBool)).tril(l - s);
    scores = scores.masked_fill(causal.logical_not(), -std::numeric_limits<double>::infinity());
  }
  auto probs = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
  return at::matmul(probs, v);
}

// ---- grouped-query attention -------------------------------------------------------------------

GqaAttention::GqaAttention(const ModelConfig& c, const at::TensorOptions& options) : config_(c) {
  const int64_t hq = c.num_attention_heads * c.head_dim, hkv = c.num_key_value_heads * c.head_dim;
  q_proj_ = register_module("q_proj", std::make_shared<Linear>(c.hidden_size, hq, c.qkv_bias, options));
  k_proj_ = register_module("k_proj", std::make_shared<Linear>(c.hidden_size, hkv, c.qkv_bias, options));
  v_proj_ = register_module("v_proj", std::make_shared<Linear>(c.hidden_size, hkv, c.qkv_bias, options));
  o_proj_ = register_module("o_proj", std::make_shared<Linear>(hq, c.hidden_size, c.o_bias, options));
  if (c.qk_norm) {
    q_norm_ = register_module("q_norm", std::make_shared<RmsNorm>(c.head_dim, c.rms_norm_eps, options));
    k_norm_ = register_module("k_norm", std::make_shared<RmsNorm>(c.head_dim, c.rms_norm_eps, options));
  }
}

at::Tensor GqaAttention::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                 const AttentionMask& mask, LayerCache* cache) {
  const int64_t b = x.size(0), s = x.size(1), d = config_.head_dim;
  SharedInput in(x);  // q, k and v quantize x once between them
  auto q = q_proj_->forward(in).view({b, s, -1, d});  // (B, S, Hq, D)
  auto k = k_proj_->forward(in).view({b, s, -1, d});  // (B, S, Hk, D)
  auto v = v_proj_->forward(in).view({b, s, -1, d});
  if (q_norm_) {  // Qwen3: RMSNorm over head_dim, before RoPE
    q = q_norm_->forward(q);
    k = k_norm_->forward(k);
  }
  q = apply_rotary(q.transpose(1, 2), cos, sin, config_.rope.interleave);  // (B, Hq, S, D)
  k = apply_rotary(k.transpose(1, 2), cos, sin, config_.rope.interleave);  // (B, Hk, S, D)
  v = v.transpose(1, 2);
  if (cache) std::tie(k, v) = cache->append(k, v);                        // (B, Hk, L, D)
  if (config_.attention_backend == "sparse" && cache == nullptr && mask.causal && !mask.mask.defined()) {
    // Long-context fine-tuning: block-sparse attention (include/anvil/model/sparse_attention.h); packed
    // documents as one row of B * S tokens with their boundaries.
    at::Tensor out;  // (B, Hq, S, D)
    if (mask.cu_seqlens.defined()) {
      out = one_sequence_as_rows(sparse_attend(rows_as_one_sequence(q), rows_as_one_sequence(k), rows_as_one_sequence(v),
                                               config_.sparse, config_.attention_scale, mask.cu_seqlens),
                                 b, s);
    } else {
      out = sparse_attend(q, k, v, config_.sparse, config_.attention_scale);
    }
    return o_proj_->forward(out.transpose(1, 2).reshape({b, s, -1}));
  }
  auto out = attend(q, k, v, mask, config_.attention_scale, config_.attention_backend);  // (B, Hq, S, D)
  return o_proj_->forward(out.transpose(1, 2).reshape({b, s, -1}));
}

// ---- multi-head latent attention ---------------------------------------------------------------

MlaAttention::MlaAttention(const ModelConfig& c, const at::TensorOptions& options) : config_(c) {
  const int64_t h = c.num_attention_heads, qk_head = c.qk_nope_head_dim + c.qk_rope_head_dim;
  if (c.q_lora_rank == 0) {
    q_proj_ = register_module("q_proj", std::make_shared<Linear>(c.hidden_size, h * qk_head, false, options));
  } else {
    q_a_proj_ = register_module("q_a_proj", std::make_shared<Linear>(c.hidden_size, c.q_lora_rank, c.attention_bias, options));
    q_a_layernorm_ = register_module("q_a_layernorm", std::make_shared<RmsNorm>(c.q_lora_rank, 1e-6, options));
    q_b_proj_ = register_module("q_b_proj", std::make_shared<Linear>(c.q_lora_rank, h * qk_head, false, options));
  }
  kv_a_proj_ = register_module("kv_a_proj_with_mqa", std::make_shared<Linear>(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim,
                                                                              c.attention_bias, options));
  // transformers builds both latent norms with the default eps 1e-6, not rms_norm_eps.
  kv_a_layernorm_ = register_module("kv_a_layernorm", std::make_shared<RmsNorm>(c.kv_lora_rank, 1e-6, options));
  kv_b_proj_ = register_module("kv_b_proj", std::make_shared<Linear>(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim),
                                                                     false, options));
  o_proj_ = register_module("o_proj", std::make_shared<Linear>(h * c.v_head_dim, c.hidden_size, c.attention_bias, options));
}

at::Tensor MlaAttention::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                 const AttentionMask& mask, LayerCache* cache) {
  const auto& c = config_;
  const int64_t b = x.size(0), s = x.size(1), h = c.num_attention_heads;
  const int64_t nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim;
  SharedInput in(x);  // the query and kv_a projections quantize x once between them
  auto q = q_proj_ ? q_proj_->forward(in) : q_b_proj_->forward(q_a_layernorm_->forward(q_a_proj_->forward(in)));
  q = q.view({b, s, h, nope + rope}).transpose(1, 2);  // (B, H, S, nope + rope)
  auto q_pass = q.narrow(-1, 0, nope);
  auto q_rot = q.narrow(-1, nope, rope);

  auto compressed = kv_a_proj_->forward(in);                                       // (B, S, r + rope)
  auto latent = kv_a_layernorm_->forward(compressed.narrow(-1, 0, c.kv_lora_rank))
                    .view({b, 1, s, c.kv_lora_rank});                              // (B, 1, S, r)
  auto k_rot = compressed.narrow(-1, c.kv_lora_rank, rope).reshape({b, 1, s, rope});  // (B, 1, S, rope)

  q_rot = apply_rotary(q_rot, cos, sin, c.rope.interleave);
  k_rot = apply_rotary(k_rot, cos, sin, c.rope.interleave);
  if (cache) std::tie(latent, k_rot) = cache->append(latent, k_rot);  // (B, 1, L, r), (B, 1, L, rope)
  const int64_t l = latent.size(2);

  auto query = at::cat({q_pass, q_rot}, -1);                                            // (B, H, S, nope + rope)
  auto kv = kv_b_proj_->forward(latent).view({b, l, h, nope + c.v_head_dim}).transpose(1, 2);  // (B, H, L, nope + v)
  auto k_nope = kv.narrow(-1, 0, nope);
  auto value = kv.narrow(-1, nope, c.v_head_dim);
  auto key = at::cat({k_nope, k_rot.expand({b, h, l, rope})}, -1);                      // (B, H, L, nope + rope)
  auto out = attend(query, key, value, mask, c.attention_scale, c.attention_backend);   // (B, H, S, v)
  return o_proj_->forward(out.transpose(1, 2).reshape({b, s, h * c.v_head_dim}));
}

}  // namespace anvil::model
