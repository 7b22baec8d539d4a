// GPTQ and its round-to-nearest baseline (quantize/gptq.h says what is matched and why). The arithmetic
// follows llm-compressor 0.14.0.1's eager path op for op (fp32 working copies, the same Cholesky calls, the
// same per-column update and block matmul), so on the CPU its results equal ours to the last bit in most
// columns; the Python oracle test (tests/python/test_gptq.py) states the tolerance.
#include "quantize/gptq.h"

#include "anvil/model/compressed_tensors.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace anvil::quantize {
namespace {

// The integer grid of `bits`: compressed-tensors' calculate_range for type int.
struct Grid {
  double qmin, qmax;
};
Grid grid_of(int bits) { return {-std::ldexp(1.0, bits - 1), std::ldexp(1.0, bits - 1) - 1}; }

struct Observed {
  at::Tensor scale;       // (N, G) in scale_dtype
  at::Tensor zero_point;  // (N, G) int8, undefined when symmetric
  at::Tensor g_idx;       // (K) int32 group of each column
  int64_t group_size;     // resolved: K for channel-wise
};

void check_options(const at::Tensor& weight, const GptqOptions& o) {
  TORCH_CHECK(weight.defined() && weight.dim() == 2, "gptq: weight must be a 2-D (out_features, in_features) "
              "tensor, got ", weight.defined() ? weight.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "gptq: weight must be floating point, got ",
              weight.scalar_type());
  TORCH_CHECK(o.bits >= 2 && o.bits <= 8, "gptq: bits must be in 2..8, got ", o.bits);
  const int64_t K = weight.size(1);
  TORCH_CHECK(K > 0 && weight.size(0) > 0, "gptq: weight is empty ", weight.sizes());
  TORCH_CHECK(o.group_size == -1 || o.group_size > 0, "gptq: group_size must be positive or -1 (one group per "
              "row), got ", o.group_size);
  TORCH_CHECK(o.group_size == -1 || K % o.group_size == 0, "gptq: in_features ", K,
              " is not a multiple of group_size ", o.group_size,
              " (compressed-tensors groups need whole groups; quantize this layer channel-wise or leave it out)");
  TORCH_CHECK(o.block_size > 0, "gptq: block_size must be positive, got ", o.block_size);
  TORCH_CHECK(std::isfinite(o.dampening) && o.dampening >= 0, "gptq: dampening must be finite and >= 0, got ",
              o.dampening);
  if (o.scale_dtype) {
    TORCH_CHECK(at::isFloatingType(*o.scale_dtype), "gptq: scale_dtype must be a floating dtype, got ",
                *o.scale_dtype);
  }
  TORCH_CHECK(at::isfinite(weight).all().item<bool>(), "gptq: weight has non-finite values");
}

// compressed-tensors' min-max observer + calculate_qparams on the original weight, in the weight's dtype
// (llm-compressor observes module.weight before GPTQ runs: the core's model::ct::observe_weight), rounded to
// scale_dtype (a zero scale becoming that dtype's eps).
Observed observe(const at::Tensor& weight, const GptqOptions& o) {
  const int64_t K = weight.size(1);
  const int64_t gs = o.group_size == -1 ? K : o.group_size;
  const at::ScalarType sdt = o.scale_dtype.value_or(weight.scalar_type());
  model::ct::QuantArgs args;
  args.num_bits = o.bits, args.type = model::ct::QuantType::kInt, args.symmetric = o.symmetric;
  args.strategy = model::ct::Strategy::kGroup, args.group_size = gs;  // one group of K columns: channel-wise
  const auto qp = model::ct::observe_weight(weight, args);
  Observed out;
  out.group_size = gs;
  out.scale = qp.scale.to(sdt);
  if (sdt != weight.scalar_type()) {  // an all-zero group's scale is scale_dtype's eps, not the weight dtype's
    const double eps = model::ct::scale_eps(sdt);
    const auto zero = weight.reshape({weight.size(0), K / gs, gs}).abs().amax(-1) == 0;  // (N, G)
    out.scale = at::where(zero, at::scalar_tensor(eps, out.scale.options()), out.scale);
  }
  out.zero_point = qp.zero_point;
  out.g_idx = at::arange(K, weight.options().dtype(at::kInt)).div(gs, "floor");
  return out;
}

// Quantize then dequantize x with per-element scale s and zero point z (fp32, z undefined: symmetric):
// compressed-tensors' _quantize_dequantize. Returns {integer values (fp32), dequantized (fp32)}.
std::pair<at::Tensor, at::Tensor> qdq(const at::Tensor& x, const at::Tensor& s, const at::Tensor& z,
                                      const Grid& g, at::ScalarType sdt) {
  at::Tensor scaled = x / s;
  if (z.defined()) scaled = scaled + z;
  at::Tensor q = at::round(at::clamp(scaled, g.qmin, g.qmax));
  at::Tensor dq = (z.defined() ? q - z : q) * s;  // exact in fp32 for b <= 8 and a 16-bit scale
  if (sdt != at::kFloat) dq = dq.to(sdt).to(at::kFloat);  // compressed-tensors multiplies in scale.dtype
  return {q, dq};
}

GptqResult finish(const Observed& ob, at::Tensor qint, at::Tensor deq) {
  GptqResult r;
  r.q = qint.to(at::kChar);
  r.scale = ob.scale;
  r.zero_point = ob.zero_point;
  r.g_idx = ob.g_idx;
  r.dequantized = deq;
  return r;
}

}  // namespace

HessianAccumulator::HessianAccumulator(int64_t in_features, at::Device device) : in_features_(in_features) {
  TORCH_CHECK(in_features > 0, "HessianAccumulator: in_features must be positive, got ", in_features);
  sum_ = at::zeros({in_features, in_features}, at::TensorOptions().dtype(at::kFloat).device(device));
}

void HessianAccumulator::add(const at::Tensor& x) {
  TORCH_CHECK(x.defined() && x.dim() >= 1 && x.size(-1) == in_features_, "HessianAccumulator::add: x must be (..., ",
              in_features_, "), got ", x.defined() ? x.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "HessianAccumulator::add: x must be floating point, got ",
              x.scalar_type());
  at::Tensor x2 = x.reshape({-1, in_features_}).to(sum_.device(), at::kFloat);  // (n, K)
  if (x2.size(0) == 0) return;
  sum_.addmm_(x2.t(), x2, /*beta=*/1, /*alpha=*/2);
  rows_ += x2.size(0);
}

at::Tensor HessianAccumulator::hessian() const { return rows_ == 0 ? sum_.clone() : sum_ / double(rows_); }

GptqResult rtn_quantize(const at::Tensor& weight, const GptqOptions& options) {
  check_options(weight, options);
  const Observed ob = observe(weight, options);
  const at::ScalarType sdt = ob.scale.scalar_type();
  at::Tensor s = ob.scale.to(at::kFloat).repeat_interleave(ob.group_size, 1);  // (N, K)
  at::Tensor z = ob.zero_point.defined() ? ob.zero_point.to(at::kFloat).repeat_interleave(ob.group_size, 1)
                                         : at::Tensor();
  auto [q, dq] = qdq(weight.to(at::kFloat), s, z, grid_of(options.bits), sdt);
  return finish(ob, q, dq);
}

namespace {

// The sweep; row_loss (N) receives each row's sum of err^2 / 2, llm-compressor's per-row loss.
GptqResult gptq_sweep(const at::Tensor& weight, const at::Tensor& hessian, const GptqOptions& options,
                      at::Tensor* row_loss) {
  check_options(weight, options);
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(hessian.defined() && hessian.dim() == 2 && hessian.size(0) == K && hessian.size(1) == K,
              "gptq: hessian must be (in_features, in_features) = (", K, ", ", K, "), got ",
              hessian.defined() ? hessian.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isfinite(hessian).all().item<bool>(), "gptq: hessian has non-finite values");
  const Observed ob = observe(weight, options);
  const at::ScalarType sdt = ob.scale.scalar_type();
  const Grid grid = grid_of(options.bits);
  at::Tensor scale = ob.scale.to(at::kFloat);                                             // (N, G)
  at::Tensor zp = ob.zero_point.defined() ? ob.zero_point.to(at::kFloat) : at::Tensor();  // (N, G)

  at::Tensor W = weight.to(at::kFloat).clone();                   // (N, K) working copy, becomes Q
  at::Tensor H = hessian.to(weight.device(), at::kFloat).clone();  // (K, K)
  at::Tensor g_idx = ob.g_idx;                                    // (K) group of each (permuted) column
  at::Tensor perm;
  if (options.act_order) {
    perm = at::argsort(H.diagonal(), /*dim=*/-1, /*descending=*/true);
    H = H.index_select(0, perm).index_select(1, perm);
    W = W.index_select(1, perm);
    g_idx = g_idx.index_select(0, perm);
  }
  // Dead columns: no input ever reached them, so their weights do not matter: H_jj = 1, w = 0.
  at::Tensor diag = H.diagonal();
  at::Tensor dead = diag == 0;
  // No calibration input at all: llm-compressor would zero every weight; an uncalibrated layer is an error.
  TORCH_CHECK(!dead.all().item<bool>(), "gptq: the hessian's diagonal is all zero: no calibration input reached "
              "this layer (every column is dead)");
  diag.masked_fill_(dead, 1.0);
  W.masked_fill_(dead.unsqueeze(0), 0.0);
  diag.add_(options.dampening * diag.mean());

  bool rtn_fallback = false;
  at::Tensor Hinv;  // (K, K) upper Cholesky factor of H^-1
  {
    auto [L, info] = at::linalg_cholesky_ex(H);
    if (info.item<int64_t>() != 0) {
      Hinv = at::eye(K, H.options());
      rtn_fallback = true;
    } else {
      Hinv = at::linalg_cholesky(at::cholesky_inverse(L), /*upper=*/true);
    }
  }

  at::Tensor qint = at::empty({N, K}, W.options());  // integer values, fp32, in the processing order
  at::Tensor loss = at::zeros({N}, W.options());  // (N) per row, as llm-compressor's losses
  for (int64_t i1 = 0; i1 < K; i1 += options.block_size) {
    const int64_t i2 = std::min(i1 + options.block_size, K), bw = i2 - i1;
    // The block transposed, (bw, N): each weight column is a contiguous row here, so the per-column ops read
    // and write contiguous vectors (coalesced on a GPU). Element for element the arithmetic is
    // llm-compressor's (the same fp32 ops in the same order), so the layout changes no bit.
    at::Tensor W1 = W.slice(1, i1, i2).t().contiguous();  // (bw, N)
    at::Tensor Q1 = at::empty_like(W1), Err1 = at::empty_like(W1), q1 = at::empty_like(W1);
    at::Tensor Hinv1 = Hinv.slice(0, i1, i2).slice(1, i1, i2);  // (bw, bw)
    at::Tensor gi = g_idx.slice(0, i1, i2).to(at::kLong);
    at::Tensor s1 = scale.index_select(1, gi).t().contiguous();                          // (bw, N)
    at::Tensor z1 = zp.defined() ? zp.index_select(1, gi).t().contiguous() : at::Tensor();  // (bw, N)
    for (int64_t i = 0; i < bw; ++i) {
      at::Tensor w = W1[i], s_i = s1[i], q_i = q1[i], dq_i = Q1[i], e_i = Err1[i];  // (N) each
      // q = round(clamp(w / s + zp)), dq = (q - zp) * s in the scale's dtype: compressed-tensors' rule.
      at::Tensor x = at::div(w, s_i);
      if (z1.defined()) x.add_(z1[i]);
      x.clamp_(grid.qmin, grid.qmax);
      at::round_out(q_i, x);
      if (z1.defined()) {
        at::sub_out(dq_i, q_i, z1[i]);
        dq_i.mul_(s_i);
      } else {
        at::mul_out(dq_i, q_i, s_i);
      }
      if (sdt != at::kFloat) dq_i.copy_(dq_i.to(sdt));  // the fp32 product is exact: one rounding, as in sdt
      at::sub_out(e_i, w, dq_i);
      e_i.div_(Hinv1[i][i]);
      // Spread the error over the block's later columns (column i itself is done).
      W1.slice(0, i).sub_(Hinv1[i].slice(0, i).unsqueeze(1) * e_i.unsqueeze(0));
    }
    at::Tensor err = Err1.t().contiguous();  // (N, bw), as llm-compressor's Err1 for the same matmul
    W.slice(1, i1, i2).copy_(Q1.t());
    qint.slice(1, i1, i2).copy_(q1.t());
    loss += err.square().sum(1) / 2;
    if (i2 < K) W.slice(1, i2).sub_(at::matmul(err, Hinv.slice(0, i1, i2).slice(1, i2)));
  }
  if (perm.defined()) {
    at::Tensor inv = at::argsort(perm);
    W = W.index_select(1, inv);
    qint = qint.index_select(1, inv);
  }
  GptqResult r = finish(ob, qint, W);
  r.loss = loss.sum().item<double>();
  r.rtn_fallback = rtn_fallback;
  *row_loss = loss;
  return r;
}

}  // namespace

GptqResult gptq_quantize(const at::Tensor& weight, const at::Tensor& hessian, const GptqOptions& options) {
  at::Tensor row_loss;
  return gptq_sweep(weight, hessian, options, &row_loss);
}

std::vector<GptqResult> gptq_quantize_shared(const std::vector<at::Tensor>& weights, const at::Tensor& hessian,
                                             const GptqOptions& options) {
  TORCH_CHECK(!weights.empty(), "gptq_quantize_shared: weights must hold at least one weight");
  std::vector<int64_t> rows;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.defined() && w.dim() == 2 && w.size(1) == weights[0].size(1) &&
                    w.scalar_type() == weights[0].scalar_type() && w.device() == weights[0].device(),
                "gptq_quantize_shared: weights[", i, "] must be (N, ", weights[0].size(1), ") ",
                weights[0].scalar_type(), " on ", weights[0].device(), " like weights[0], got ",
                w.defined() ? w.sizes() : at::IntArrayRef{});
    rows.push_back(w.size(0));
  }
  at::Tensor row_loss;
  GptqResult all = gptq_sweep(at::cat(weights, 0), hessian, options, &row_loss);
  std::vector<GptqResult> out;
  int64_t r0 = 0;
  for (int64_t n : rows) {
    GptqResult r;
    r.q = all.q.slice(0, r0, r0 + n).clone();
    r.scale = all.scale.slice(0, r0, r0 + n).clone();
    if (all.zero_point.defined()) r.zero_point = all.zero_point.slice(0, r0, r0 + n).clone();
    r.g_idx = all.g_idx;
    r.dequantized = all.dequantized.slice(0, r0, r0 + n).clone();
    r.loss = row_loss.slice(0, r0, r0 + n).sum().item<double>();
    r.rtn_fallback = all.rtn_fallback;
    out.push_back(std::move(r));
    r0 += n;
  }
  return out;
}

double gptq_output_error(const at::Tensor& weight, const at::Tensor& dequantized, const at::Tensor& hessian) {
  TORCH_CHECK(weight.dim() == 2 && dequantized.sizes() == weight.sizes(), "gptq_output_error: weight ",
              weight.sizes(), " and dequantized ", dequantized.sizes(), " must be the same (N, K)");
  TORCH_CHECK(hessian.dim() == 2 && hessian.size(0) == weight.size(1) && hessian.size(1) == weight.size(1),
              "gptq_output_error: hessian must be (K, K) with K = ", weight.size(1), ", got ", hessian.sizes());
  at::Tensor d = weight.to(at::kDouble) - dequantized.to(weight.device(), at::kDouble);  // (N, K)
  return (at::matmul(d, hessian.to(weight.device(), at::kDouble)) * d).sum().item<double>();
}

}  // namespace anvil::quantize
