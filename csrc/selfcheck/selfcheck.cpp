// include/anvil/selfcheck.h. Each check draws a fresh random input whose shape has partial 128-blocks
// (so edge handling runs), calls the op through its typed entry point, and compares:
//   on the CPU   with the formula (quantize: round-trip error bound of the format; dequantize: the
//                ATen formula of anvil/quant_reference.h, bit for bit)
//   on the GPU   with the CPU result, bit for bit (the kernels share the CPU's arithmetic).
#include "anvil/selfcheck.h"

#include "anvil/ops.h"
#include "anvil/quant_reference.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/cuda.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <iomanip>
#include <set>
#include <sstream>

namespace anvil {
namespace {

const char* const kGranularities[] = {"tensor", "row", "block1x128", "block128x128"};

struct Format {
  const char* name;  // "fp8" or "int8"
  std::function<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::string&)> quantize;
  std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const std::string&, at::ScalarType)> dequantize;
};

const Format kFormats[] = {
    {"fp8", ops::quantize_fp8, ops::dequantize_fp8},
    {"int8", ops::quantize_int8, ops::dequantize_int8},
};

double time_ms(const std::function<void()>& f, bool cuda) {
  f();  // warm-up
  if (cuda) torch::cuda::synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  f();
  if (cuda) torch::cuda::synchronize();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

std::string fmt(double v) {
  std::ostringstream s;
  s << std::setprecision(3) << v;
  return s.str();
}

bool bit_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  const auto ac = a.cpu().contiguous(), bc = b.cpu().contiguous();
  return std::memcmp(ac.const_data_ptr(), bc.const_data_ptr(), ac.nbytes()) == 0;
}

// Round-trip error of x against dequantize(quantize(x)) relative to the format's bound:
// fp8 e4m3: |err| <= 2^-4 |x| where |x| / scale >= 2^-6 (its normal range), else <= 2^-10 scale;
// int8:     |err| <= scale / 2 (+ 2e-5 scale for the fp32 rounding of x / scale and q * scale). Returns the worst ratio err / bound (<= 1 passes).
double roundtrip_ratio(const Format& f, const at::Tensor& x, const at::Tensor& xr, const at::Tensor& scale) {
  const auto err = (xr - x).abs();
  at::Tensor bound;
  if (std::string(f.name) == "fp8") {
    const auto normal = x.abs() >= scale * std::ldexp(1.0, -6);
    // (1 + 1e-5): a value on a rounding tie is off by exactly the bound, plus fp32 rounding.
    bound = at::where(normal, x.abs() * std::ldexp(1.0, -4), scale * std::ldexp(1.0, -10)) * (1 + 1e-5);
  } else {
    bound = scale * (0.5 + 2e-5);
  }
  return (err / bound.clamp_min(1e-30)).max().item<double>();
}

void check_quantize(const Format& f, const std::string& g, std::vector<SelfCheckRow>& rows, bool cuda) {
  const std::string op = std::string("quantize_") + f.name + "[" + g + "]";
  const auto x = at::randn({300, 1000}, at::kBFloat16) * 3.0;  // (300, 1000): partial blocks both ways
  const auto [q, s] = f.quantize(x, g);
  const auto xf = x.to(at::kFloat);
  const auto scale = ops::expand_scale_inv(s, x.sizes(), g);
  const double ratio = roundtrip_ratio(f, xf, ops::reference_dequantize(q, s, g), scale);
  const double ms = time_ms([&] { f.quantize(x, g); }, false);
  rows.push_back({op, "cpu", ratio <= 1.0 ? "ok" : "FAIL", "round-trip error / bound = " + fmt(ratio), ms});
  if (!cuda) return;
  const auto xc = x.cuda();
  const auto [qc, sc] = f.quantize(xc, g);
  const bool same = bit_equal(qc, q) && bit_equal(sc, s);
  const double ms_cuda = time_ms([&] { f.quantize(xc, g); }, true);
  rows.push_back({op, "cuda", same ? "ok" : "FAIL", same ? "bit-exact vs cpu" : "differs from cpu", ms_cuda});
}

void check_dequantize(const Format& f, const std::string& g, std::vector<SelfCheckRow>& rows, bool cuda) {
  const std::string op = std::string("dequantize_") + f.name + "[" + g + "]";
  const auto x = at::randn({300, 1000}, at::kFloat);
  const auto [q, s] = f.quantize(x, g);
  const auto out = f.dequantize(q, s, g, at::kFloat);
  const bool exact = bit_equal(out, ops::reference_dequantize(q, s, g));
  const double ms = time_ms([&] { f.dequantize(q, s, g, at::kBFloat16); }, false);
  rows.push_back({op, "cpu", exact ? "ok" : "FAIL", exact ? "bit-exact vs formula" : "differs from formula", ms});
  if (!cuda) return;
  const auto qc = q.cuda(), sc = s.cuda();
  bool same = true;
  for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf})
    same = same && bit_equal(f.dequantize(qc, sc, g, dt), f.dequantize(q, s, g, dt));
  const double ms_cuda = time_ms([&] { f.dequantize(qc, sc, g, at::kBFloat16); }, true);
  rows.push_back({op, "cuda", same ? "ok" : "FAIL", same ? "bit-exact vs cpu (fp32, bf16, fp16 out)" : "differs from cpu",
                  ms_cuda});
}

// ---- MoE ----
// CPU: the DeepSeek-V3 gate (sigmoid, bias, 8 groups) against the same selection written in ATen ops on
// tie-free data, and routing/combining against ATen composites; CUDA: equal to the CPU (indices
// exactly, weights within 1e-6 relative).
void check_moe(std::vector<SelfCheckRow>& rows, bool cuda) {
  const int64_t T = 300, E = 256, k = 8;
  const auto logits = at::randn({T, E});
  const auto bias = at::randn({E}) * 0.1;
  const auto [w, idx] = ops::moe_gate(logits, bias, c10::nullopt, k, 8, 4, "sigmoid", true, 2.5);
  {
    const auto s = logits.sigmoid();
    const auto c = s + bias;                                                           // (T, E)
    const auto gscore = std::get<0>(c.view({T, 8, 32}).topk(2, -1)).sum(-1);          // (T, 8)
    const auto gidx = std::get<1>(gscore.topk(4, -1));                                 // (T, 4)
    const auto gmask = at::zeros({T, 8}).scatter_(1, gidx, 1.0).repeat_interleave(32, 1);
    const auto ridx = std::get<1>(c.masked_fill(gmask == 0, -INFINITY).topk(k, -1));
    const bool same_idx = at::equal(std::get<0>(idx.to(at::kLong).sort(1)), std::get<0>(ridx.sort(1)));
    auto rw = s.gather(1, idx.to(at::kLong));
    rw = rw / (rw.sum(1, true) + 1e-20) * 2.5;
    const double err = ((w - rw).abs() / rw.abs()).max().item<double>();
    const bool ok = same_idx && err <= 1e-6;
    rows.push_back({"moe_gate[deepseek-v3]", "cpu", ok ? "ok" : "FAIL",
                    std::string(same_idx ? "indices = ATen topk" : "indices differ") + ", weights rel err " + fmt(err),
                    time_ms([&] { ops::moe_gate(logits, bias, c10::nullopt, k, 8, 4, "sigmoid", true, 2.5); }, false)});
  }
  const auto g = at::randn({T, k});
  const auto grad = ops::moe_gate_backward(g, logits, idx, "sigmoid", true, 2.5);
  {
    auto l = logits.clone().requires_grad_(true);
    auto sw = l.sigmoid().gather(1, idx.to(at::kLong));
    auto ref = sw / (sw.sum(1, true) + 1e-20) * 2.5;
    const auto want = torch::autograd::grad({ref}, {l}, {g})[0];
    const double err = (grad - want).abs().max().item<double>() / want.abs().max().item<double>();
    rows.push_back({"moe_gate_backward", "cpu", err < 1e-5 ? "ok" : "FAIL", "vs torch autograd, rel err " + fmt(err), 0.0});
  }
  const auto hidden = at::randn({T, 64});
  const auto [perm, slot_rows, counts, offsets, dropped] = ops::moe_permute(hidden, idx, E, 16, -1);
  const auto [rslot, rcounts, roffsets, rdropped] = ops::moe_route(idx, E, 16, -1);
  const auto load = ops::moe_expert_load(idx, E);
  const bool counts_ok = at::equal(load.to(at::kLong), at::bincount(idx.flatten().to(at::kLong), {}, E)) &&
                         at::equal(counts, load) && at::equal(rslot, slot_rows);
  const bool gathered = at::equal(perm.index_select(0, slot_rows.flatten().to(at::kLong)),
                                  hidden.repeat_interleave(k, 0));
  rows.push_back({"moe_route/permute/expert_load", "cpu", counts_ok && gathered ? "ok" : "FAIL",
                  "counts = bincount, rows hold their tokens", 0.0});
  const auto back = ops::moe_unpermute(perm, slot_rows, at::full({T, k}, 1.0 / k));
  const double uerr = (back - hidden).abs().max().item<double>();
  rows.push_back({"moe_unpermute", "cpu", uerr < 1e-5 ? "ok" : "FAIL", "unpermute(permute(x)) = x, err " + fmt(uerr), 0.0});
  const auto pgrad = ops::moe_permute_backward(at::ones_like(perm), slot_rows);
  const auto [ugx, ugw] = ops::moe_unpermute_backward(at::ones_like(hidden), perm, slot_rows, at::full({T, k}, 1.0 / k));
  const bool grads_ok = at::allclose(pgrad, at::full_like(hidden, double(k))) &&
                        at::allclose(ugw, hidden.to(at::kDouble).sum(1, true).expand({T, k}).to(at::kFloat), 1e-5, 1e-6);
  rows.push_back({"moe_permute_backward/unpermute_backward", "cpu", grads_ok ? "ok" : "FAIL", "vs closed forms", 0.0});
  auto b = at::zeros({E});
  ops::moe_update_bias(b, load, 0.001);
  const bool bias_ok = at::allclose(b, (load.to(at::kFloat).mean() - load.to(at::kFloat)).sign() * 0.001);
  rows.push_back({"moe_update_bias", "cpu", bias_ok ? "ok" : "FAIL", "b += gamma sign(mean - counts)", 0.0});
  if (!cuda) return;
  const auto lc = logits.cuda(), bc = bias.cuda();
  const auto [wc, ic] = ops::moe_gate(lc, bc, c10::nullopt, k, 8, 4, "sigmoid", true, 2.5);
  const bool same = at::equal(ic.cpu(), idx) && at::allclose(wc.cpu(), w, 1e-6, 0.0);
  rows.push_back({"moe_gate[deepseek-v3]", "cuda", same ? "ok" : "FAIL", same ? "indices = cpu, weights within 1e-6" : "differs from cpu",
                  time_ms([&] { ops::moe_gate(lc, bc, c10::nullopt, k, 8, 4, "sigmoid", true, 2.5); }, true)});
  const auto gradc = ops::moe_gate_backward(g.cuda(), lc, ic, "sigmoid", true, 2.5);
  const bool gsame = at::allclose(gradc.cpu(), grad, 1e-5, 1e-6);
  rows.push_back({"moe_gate_backward", "cuda", gsame ? "ok" : "FAIL", "close to cpu", 0.0});
  const auto [pc, sc, cc, oc, dc] = ops::moe_permute(hidden.cuda(), ic, E, 16, -1);
  const bool psame = at::equal(pc.cpu(), perm) && at::equal(sc.cpu(), slot_rows) && at::equal(oc.cpu(), offsets) &&
                     at::equal(ops::moe_expert_load(ic, E).cpu(), load);
  rows.push_back({"moe_route/permute/expert_load", "cuda", psame ? "ok" : "FAIL", "equal to cpu", 0.0});
  const auto backc = ops::moe_unpermute(pc, sc, at::full({T, k}, 1.0 / k, at::kCUDA));
  const bool usame = at::allclose(backc.cpu(), back, 1e-5, 1e-6);
  const auto pgc = ops::moe_permute_backward(at::ones_like(pc), sc);
  const auto [ugxc, ugwc] = ops::moe_unpermute_backward(at::ones_like(hidden).cuda(), pc, sc, at::full({T, k}, 1.0 / k, at::kCUDA));
  const bool gcs = at::allclose(pgc.cpu(), pgrad) && at::allclose(ugwc.cpu(), ugw, 1e-5, 1e-5) && at::allclose(ugxc.cpu(), ugx);
  rows.push_back({"moe_unpermute(+backwards)", "cuda", usame && gcs ? "ok" : "FAIL", "close to cpu", 0.0});
  auto bcu = at::zeros({E}, at::kCUDA);
  ops::moe_update_bias(bcu, ops::moe_expert_load(ic, E), 0.001);
  rows.push_back({"moe_update_bias", "cuda", at::allclose(bcu.cpu(), b) ? "ok" : "FAIL", "equal to cpu", 0.0});
}

// ---- FP8 GEMM ----
// The error measure of the issue (DeepGEMM's calc_diff): 1 - 2 sum(xy) / sum(x^2 + y^2), in double.
double gemm_diff(const at::Tensor& x, const at::Tensor& y) {
  const auto a = x.to(at::kDouble).cpu(), b = y.to(at::kDouble).cpu();
  const double den = (a * a + b * b).sum().item<double>();
  return den == 0 ? 0.0 : 1.0 - 2.0 * (a * b).sum().item<double>() / den;
}

// CPU: fp8_gemm (every scale granularity) and the grouped GEMMs against the formula (dequantize with
// reference_dequantize, fp32 matmul); fp8_linear against quantize + formula, its backward against
// grad_out W. CUDA: the same inputs on the GPU against the CPU, diff < 1e-3 (bf16 output).
void check_fp8_gemm(std::vector<SelfCheckRow>& rows, bool cuda) {
  const int64_t M = 37, N = 300, K = 512;
  const auto x = at::randn({M, K}), w = at::randn({N, K}) * 0.05;
  const auto bias = at::randn({N});
  struct Pair {
    const char *ga, *gb;
  };
  for (const Pair& g : {Pair{"block1x128", "block128x128"}, Pair{"row", "row"}, Pair{"tensor", "tensor"}}) {
    const auto [qa, sa] = ops::quantize_fp8(x, g.ga);
    const auto [qb, sb] = ops::quantize_fp8(w, g.gb);
    const auto want = at::matmul(ops::reference_dequantize(qa, sa, g.ga), ops::reference_dequantize(qb, sb, g.gb).t()) + bias;
    const auto got = ops::fp8_gemm(qa, sa, qb, sb, at::kFloat, bias);
    const double d = gemm_diff(got, want);
    const std::string name = std::string("fp8_gemm[") + g.ga + " x " + g.gb + "]";
    rows.push_back({name, "cpu", d < 1e-9 ? "ok" : "FAIL", "diff vs formula " + fmt(d),
                    time_ms([&] { ops::fp8_gemm(qa, sa, qb, sb, at::kBFloat16, bias); }, false)});
    if (cuda) {
      const auto gc = ops::fp8_gemm(qa.cuda(), sa.cuda(), qb.cuda(), sb.cuda(), at::kBFloat16, bias.cuda());
      const double dc = gemm_diff(gc, want);
      const auto qac = qa.cuda(), sac = sa.cuda(), qbc = qb.cuda(), sbc = sb.cuda(), bc = bias.cuda();
      rows.push_back({name, "cuda", dc < 1e-3 ? "ok" : "FAIL",
                      "diff vs formula " + fmt(dc) + " (config '" + ops::fp8_gemm_config(M, N, K) + "')",
                      time_ms([&] { ops::fp8_gemm(qac, sac, qbc, sbc, at::kBFloat16, bc); }, true)});
    }
  }
  // grouped: 3 experts, the middle one empty, rows padded to 8 per expert
  const int64_t E = 3;
  const auto offsets = at::tensor(std::vector<int32_t>{0, 16, 16, 40}, at::kInt);
  const int64_t R = 48;  // rows 40..47 belong to no expert
  const auto xg = at::randn({R, K});
  const auto wg = at::randn({E, N, K}) * 0.05;
  const auto [qa, sa] = ops::quantize_fp8(xg, "block1x128");
  std::vector<at::Tensor> qbs, sbs;
  for (int64_t e = 0; e < E; ++e) {
    auto [q, s] = ops::quantize_fp8(wg[e].contiguous(), "block128x128");
    qbs.push_back(q);
    sbs.push_back(s);
  }
  const auto qb = at::stack(qbs), sb = at::stack(sbs);
  auto want = at::zeros({R, N});
  const auto da = ops::reference_dequantize(qa, sa, "block1x128");
  for (auto [e, r0, r1] : {std::tuple<int64_t, int64_t, int64_t>{0, 0, 16}, {2, 16, 40}})
    want.narrow(0, r0, r1 - r0).copy_(at::matmul(da.narrow(0, r0, r1 - r0),
                                                 ops::reference_dequantize(qbs[e], sbs[e], "block128x128").t()));
  const auto got = ops::fp8_grouped_gemm(qa, sa, qb, sb, offsets, at::kFloat);
  const double dg = gemm_diff(got, want);
  rows.push_back({"fp8_grouped_gemm", "cpu", dg < 1e-9 && got.narrow(0, 40, 8).abs().max().item<float>() == 0 ? "ok" : "FAIL",
                  "3 experts (one empty) vs formula, diff " + fmt(dg), 0.0});
  const auto masked = at::tensor(std::vector<int32_t>{16, 0, 9}, at::kInt);
  const int64_t C = 16;
  const auto qm = qa.narrow(0, 0, E * C).view({E, C, K}), sm = sa.narrow(0, 0, E * C).view({E, C, K / 128});
  const auto gm = ops::fp8_grouped_gemm_masked(qm, sm, qb, sb, masked, at::kFloat);
  auto wantm = at::zeros({E, C, N});
  for (auto [e, rows_e] : {std::pair<int64_t, int64_t>{0, 16}, {2, 9}})
    wantm[e].narrow(0, 0, rows_e).copy_(at::matmul(da.narrow(0, e * C, rows_e),
                                                   ops::reference_dequantize(qbs[e], sbs[e], "block128x128").t()));
  const double dm = gemm_diff(gm, wantm);
  rows.push_back({"fp8_grouped_gemm_masked", "cpu", dm < 1e-9 ? "ok" : "FAIL", "counts 16, 0, 9 vs formula, diff " + fmt(dm), 0.0});
  if (cuda) {
    const auto gc = ops::fp8_grouped_gemm(qa.cuda(), sa.cuda(), qb.cuda(), sb.cuda(), offsets.cuda(), at::kBFloat16);
    const double d1 = gemm_diff(gc, want);
    rows.push_back({"fp8_grouped_gemm", "cuda", d1 < 1e-3 ? "ok" : "FAIL", "vs formula, diff " + fmt(d1), 0.0});
    const auto mc = ops::fp8_grouped_gemm_masked(qm.cuda(), sm.cuda(), qb.cuda(), sb.cuda(), masked.cuda(), at::kBFloat16)
                        .cpu().to(at::kFloat);
    const double d2 = gemm_diff(at::cat({mc[0], mc[2].narrow(0, 0, 9)}), at::cat({wantm[0], wantm[2].narrow(0, 0, 9)}));
    rows.push_back({"fp8_grouped_gemm_masked", "cuda", d2 < 1e-3 ? "ok" : "FAIL", "valid rows vs formula, diff " + fmt(d2), 0.0});
  }
  // fp8_linear and its backward
  const auto [qw, sw] = ops::quantize_fp8(w, "block128x128");
  auto xl = x.clone().requires_grad_(true);
  const auto y = ops::fp8_linear(xl, qw, sw, bias);
  const auto [qx, sx] = ops::quantize_fp8(x, "block1x128");
  const auto wd = ops::reference_dequantize(qw, sw, "block128x128");
  const double dl = gemm_diff(y.detach(), at::matmul(ops::reference_dequantize(qx, sx, "block1x128"), wd.t()) + bias);
  const auto gy = at::randn({M, N});
  const auto gx = torch::autograd::grad({y}, {xl}, {gy})[0];
  const double rel = ((gx - at::matmul(gy, wd)).norm() / at::matmul(gy, wd).norm()).item<double>();
  rows.push_back({"fp8_linear", "cpu", dl < 1e-9 ? "ok" : "FAIL", "vs quantize + formula, diff " + fmt(dl), 0.0});
  rows.push_back({"fp8_linear_backward", "cpu", rel < 1e-5 ? "ok" : "FAIL", "dX vs dY W, rel err " + fmt(rel), 0.0});
  if (cuda) {
    auto xc = x.cuda().to(at::kBFloat16).requires_grad_(true);
    const auto yc = ops::fp8_linear(xc, qw.cuda(), sw.cuda(), bias.cuda().to(at::kBFloat16));
    const auto gxc = torch::autograd::grad({yc}, {xc}, {gy.cuda().to(at::kBFloat16)})[0];
    const double dlc = gemm_diff(yc.detach(), y.detach());
    const double relc = ((gxc.cpu().to(at::kFloat) - at::matmul(gy, wd)).norm() / at::matmul(gy, wd).norm()).item<double>();
    rows.push_back({"fp8_linear", "cuda", dlc < 1e-3 ? "ok" : "FAIL", "bf16 vs cpu, diff " + fmt(dlc), 0.0});
    rows.push_back({"fp8_linear_backward", "cuda", relc < 1e-2 ? "ok" : "FAIL", "bf16 dX vs dY W, rel err " + fmt(relc), 0.0});
  }
}

// sparse_attention: the CPU op against masked softmax built from the rule (window 40, 2 sinks, listed
// blocks, GQA 4), its gradients against torch autograd of that formula; CUDA (bf16) against the CPU.
at::Tensor sparse_formula(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bi,
                          int64_t window, int64_t sinks, int64_t bs) {
  const int64_t S = q.size(2), NB = bi.size(2), G = q.size(1) / k.size(1);
  const auto lopt = at::TensorOptions().dtype(at::kLong);
  const auto i = at::arange(S, lopt).view({S, 1}), j = at::arange(S, lopt).view({1, S});
  const auto base = j <= i;
  const auto near = base & ((i - j < window) | (j < sinks));                     // (S, S)
  auto table = at::zeros({k.size(1), NB, NB + 1}, at::TensorOptions().dtype(at::kBool));
  const auto bil = bi[0].to(at::kLong);
  table.scatter_(2, at::where(bil >= 0, bil, at::full({}, NB, lopt)), true);
  const auto listed = table.narrow(2, 0, NB).index_select(1, i.div(bs, "floor").view({S})).index_select(2, j.div(bs, "floor").view({S}));
  const auto mask = (near.unsqueeze(0) | (base.unsqueeze(0) & listed)).repeat_interleave(G, 0);  // (Hq, S, S)
  const auto kk = k.repeat_interleave(G, 1), vv = v.repeat_interleave(G, 1);
  auto sc = at::matmul(q, kk.transpose(-1, -2)) / std::sqrt(static_cast<double>(q.size(3)));
  sc = sc.masked_fill(mask.unsqueeze(0).logical_not(), -INFINITY);
  return at::matmul(at::softmax(sc, -1), vv);
}

// int8_gemm: the CPU against its definition (int64 sums, then (float(acc) * a_scale) * b_scale + bias in fp32),
// bit-exact; CUDA (whichever path the shape takes) against the CPU in fp32 output, within an fp32 ulp or two.
void check_int8_gemm(std::vector<SelfCheckRow>& rows, bool cuda) {
  const int64_t M = 37, N = 264, K = 512;
  const auto a = at::randint(-128, 128, {M, K}, at::TensorOptions().dtype(at::kChar));
  const auto b = at::randint(-128, 128, {N, K}, at::TensorOptions().dtype(at::kChar));
  const auto sa = (at::rand({M, 1}) + 0.1) / 127, sb = (at::rand({N, 1}) + 0.1) / 127;
  const auto bias = at::randn({N});
  const auto acc = at::mm(a.to(at::kLong), b.to(at::kLong).t()).to(at::kInt);  // exact
  const auto want = acc.to(at::kFloat) * sa * sb.view({1, -1}) + bias;
  const auto got = ops::int8_gemm(a, sa, b, sb, at::kFloat, bias);
  const bool exact = at::equal(got, want);
  rows.push_back({"int8_gemm", "cpu", exact ? "ok" : "FAIL", exact ? "bit-exact vs formula" : "differs from formula",
                  time_ms([&] { ops::int8_gemm(a, sa, b, sb, at::kBFloat16, bias); }, false)});
  if (cuda) {
    const auto ac = a.cuda(), sac = sa.cuda(), bc = b.cuda(), sbc = sb.cuda(), biasc = bias.cuda();
    const auto gc = ops::int8_gemm(ac, sac, bc, sbc, at::kFloat, biasc).cpu();
    const double rel = ((gc - want).abs() / (want.abs() + 1e-3)).max().item<double>();
    rows.push_back({"int8_gemm", "cuda", rel < 1e-6 ? "ok" : "FAIL",
                    "max rel diff vs cpu " + fmt(rel) + " (path '" + ops::int8_gemm_path(M, N, K, at::kFloat) + "')",
                    time_ms([&] { ops::int8_gemm(ac, sac, bc, sbc, at::kBFloat16, biasc); }, true)});
  }
}

void check_sparse_attention(std::vector<SelfCheckRow>& rows, bool cuda) {
  const int64_t S = 130, W = 40, sinks = 2, bs = 64;
  auto q = at::randn({1, 8, S, 64}, at::kDouble), k = at::randn({1, 2, S, 64}, at::kDouble),
       v = at::randn({1, 2, S, 64}, at::kDouble);
  const auto bi = at::tensor({0, -1, 1, 0, 2, 1, -1, -1, 0, 0, 1, -1}, at::kInt).view({1, 2, 3, 2});
  const auto ref = sparse_formula(q, k, v, bi, W, sinks, bs);
  const auto [o, lse] = ops::sparse_attention(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), bi, c10::nullopt,
                                              c10::nullopt, W, sinks, bs);
  const double err = (o.to(at::kDouble) - ref).abs().max().item<double>();
  rows.push_back({"sparse_attention", "cpu", err < 1e-5 ? "ok" : "FAIL", "fp32 vs masked-softmax formula, err " + fmt(err),
                  time_ms([&] { ops::sparse_attention(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), bi,
                                                      c10::nullopt, c10::nullopt, W, sinks, bs); }, false)});
  const auto go = at::randn(ref.sizes(), at::kDouble);
  auto qr = q.clone().requires_grad_(), kr = k.clone().requires_grad_(), vr = v.clone().requires_grad_();
  sparse_formula(qr, kr, vr, bi, W, sinks, bs).backward(go);
  const auto [o64, lse64] = ops::sparse_attention(q, k, v, bi, c10::nullopt, c10::nullopt, W, sinks, bs);
  const auto [dq, dk, dv] =
      ops::sparse_attention_backward(go, q, k, v, o64, lse64, bi, c10::nullopt, c10::nullopt, W, sinks, bs, c10::nullopt);
  const double gerr = std::max({(dq - qr.grad()).abs().max().item<double>(), (dk - kr.grad()).abs().max().item<double>(),
                                (dv - vr.grad()).abs().max().item<double>()});
  rows.push_back({"sparse_attention_backward", "cpu", gerr < 1e-9 ? "ok" : "FAIL",
                  "fp64 vs torch autograd of the formula, err " + fmt(gerr), 0.0});
  const auto sel = ops::select_blocks(q.to(at::kFloat), k.to(at::kFloat), bs, 2, 1, 1);
  const bool sel_ok = sel[0][0][2][0].item<int>() == 0 && sel[0][0][2][1].item<int>() == 2 &&
                      sel[0][1][0][1].item<int>() == -1;
  rows.push_back({"select_blocks", "cpu", sel_ok ? "ok" : "FAIL", "forced sink + local blocks, -1 padding", 0.0});
  if (!cuda) return;
  const auto bf = [](const at::Tensor& t) { return t.to(at::kBFloat16).cuda(); };
  const auto [oc, lsec] = ops::sparse_attention(bf(q), bf(k), bf(v), bi.cuda(), c10::nullopt, c10::nullopt, W, sinks, bs);
  const double cerr = (oc.cpu().to(at::kDouble) - ref).abs().max().item<double>();
  rows.push_back({"sparse_attention", "cuda", cerr < 3e-2 ? "ok" : "FAIL", "bf16 vs formula, err " + fmt(cerr),
                  time_ms([&] { ops::sparse_attention(bf(q), bf(k), bf(v), bi.cuda(), c10::nullopt, c10::nullopt, W,
                                                      sinks, bs); }, true)});
  const auto [dqc, dkc, dvc] = ops::sparse_attention_backward(bf(go), bf(q), bf(k), bf(v), oc, lsec, bi.cuda(),
                                                              c10::nullopt, c10::nullopt, W, sinks, bs, c10::nullopt);
  const double rel = std::max({((dqc.cpu().to(at::kDouble) - qr.grad()).abs().max() / qr.grad().abs().max()).item<double>(),
                               ((dkc.cpu().to(at::kDouble) - kr.grad()).abs().max() / kr.grad().abs().max()).item<double>(),
                               ((dvc.cpu().to(at::kDouble) - vr.grad()).abs().max() / vr.grad().abs().max()).item<double>()});
  rows.push_back({"sparse_attention_backward", "cuda", rel < 3e-2 ? "ok" : "FAIL", "bf16 vs autograd, rel err " + fmt(rel), 0.0});
  const auto selc = ops::select_blocks(q.to(at::kFloat).cuda(), k.to(at::kFloat).cuda(), bs, 2, 1, 1);
  rows.push_back({"select_blocks", "cuda", at::equal(selc.cpu(), sel) ? "ok" : "FAIL", "equal to cpu", 0.0});
}

// ---- fused training ops ----
// CPU: each op against the ATen formula it replaces (transformers' RMSNorm, silu(gate) * up,
// apply_rotary_pos_emb bit for bit, cross_entropy), backwards against autograd through the formulas.
// CUDA: against the CPU (rope bit for bit, the others within 1e-5 relative in fp32).
double rel_err(const at::Tensor& got, const at::Tensor& want) {
  const auto g = got.cpu().to(at::kDouble), w = want.cpu().to(at::kDouble);
  return (g - w).abs().max().item<double>() / std::max(1e-30, w.abs().max().item<double>());
}

void check_fused(std::vector<SelfCheckRow>& rows, bool cuda) {
  const int64_t T = 300, H = 1000, D = 64, V = 5000;
  auto row = [&](const std::string& op, const std::string& dev, bool ok, const std::string& detail) {
    rows.push_back({op, dev, ok ? "ok" : "FAIL", detail, 0.0});
  };
  // rms_norm
  const auto x = at::randn({T, H}) * 2, w = at::randn({H}) * 0.3 + 1, gy = at::randn({T, H});
  const auto [y, rstd] = ops::rms_norm(x, w, 1e-6);
  auto xr = x.clone().requires_grad_(true), wr = w.clone().requires_grad_(true);
  const auto yr = wr * (xr * at::rsqrt(xr.pow(2).mean(-1, true) + 1e-6));
  const auto ref_g = torch::autograd::grad({yr}, {xr, wr}, {gy});
  const auto [dx, dw] = ops::rms_norm_backward(gy, x, w, rstd);
  const double e_y = rel_err(y, yr.detach()), e_dx = rel_err(dx, ref_g[0]), e_dw = rel_err(dw, ref_g[1]);
  row("rms_norm", "cpu", e_y < 1e-6, "vs LlamaRMSNorm formula, rel err " + fmt(e_y));
  row("rms_norm_backward", "cpu", e_dx < 1e-5 && e_dw < 1e-5, "vs autograd, rel err dx " + fmt(e_dx) + ", dw " + fmt(e_dw));
  // swiglu
  const auto g = at::randn({T, H}) * 4, u = at::randn({T, H});
  const auto sy = ops::swiglu(g, u);
  auto grr = g.clone().requires_grad_(true), urr = u.clone().requires_grad_(true);
  const auto syr = at::silu(grr) * urr;
  const auto sref = torch::autograd::grad({syr}, {grr, urr}, {gy});
  const auto [dg, du] = ops::swiglu_backward(gy, g, u);
  const double e_s = rel_err(sy, syr.detach()), e_dg = rel_err(dg, sref[0]), e_du = rel_err(du, sref[1]);
  row("swiglu", "cpu", e_s < 1e-6, "vs silu(gate) * up, rel err " + fmt(e_s));
  row("swiglu_backward", "cpu", e_dg < 1e-5 && e_du < 1e-5, "vs autograd, rel err " + fmt(std::max(e_dg, e_du)));
  // rope (half layout) against apply_rotary_pos_emb written in ATen ops
  const auto q = at::randn({2, 50, 4, D}, at::kBFloat16);
  const auto ang = at::rand({2, 50, D / 2}) * 50;
  const auto emb = at::cat({ang, ang}, -1);
  const auto cs = emb.cos().to(at::kBFloat16), sn = emb.sin().to(at::kBFloat16);
  const auto rot = at::cat({-q.narrow(-1, D / 2, D / 2), q.narrow(-1, 0, D / 2)}, -1);
  const auto qr = q * cs.unsqueeze(2) + rot * sn.unsqueeze(2);
  const auto qo = ops::rope(q, cs, sn, false);
  row("rope", "cpu", bit_equal(qo, qr), "bf16 vs apply_rotary_pos_emb, bit for bit");
  const auto gq = at::randn({2, 50, 4, D});
  const auto c32 = emb.cos(), s32 = emb.sin();  // fp32 angles: cos^2 + sin^2 = 1 to fp32 rounding
  const auto back = ops::rope_backward(ops::rope(gq, c32, s32, true), c32, s32, true);
  const double e_rb = rel_err(back, gq);
  row("rope_backward", "cpu", e_rb < 1e-5, "inverse of rope (interleaved), rel err " + fmt(e_rb));
  // cross_entropy_chunk
  const auto logits = at::randn({T, V}) * 3;
  auto labels = at::randint(0, V, {T}, at::kLong);
  labels[0] = -100;
  const auto [loss, lse] = ops::cross_entropy_chunk(logits, labels, -100);
  const double e_l = rel_err(loss, at::cross_entropy_loss(logits, labels, {}, at::Reduction::None, -100));
  row("cross_entropy_chunk", "cpu", e_l < 1e-6, "vs torch cross_entropy, rel err " + fmt(e_l));
  auto buf = logits.clone();
  const auto gl = at::rand({T});
  ops::cross_entropy_chunk_backward(buf, labels, lse, gl, -100);
  auto want = (at::softmax(logits, -1) - at::one_hot(labels.clamp_min(0), V).to(at::kFloat)) * gl.unsqueeze(1);
  want[0].zero_();
  const double e_b = rel_err(buf, want);
  row("cross_entropy_chunk_backward", "cpu", e_b < 1e-5, "in place = (softmax - onehot) * grad, rel err " + fmt(e_b));
  // kd_rows is CUDA only (the CPU path is train/kd_loss.cpp's composite): on the GPU, forward KL blended with CE at
  // T = 1.5 against the ATen formulas here: kd = sum p (log p - log q), ce, and the written gradient.
  const double kd_t = 1.5, kd_w = 0.3, ce_w = 0.7;
  const auto zt = at::randn({T, V}) * 3;
  const auto kd_labels = labels.clamp_min(0);
  if (!cuda) rows.push_back({"kd_rows", "cpu", "skip", "CUDA only: the CPU path is train/kd_loss.cpp's composite", 0.0});
  if (!cuda) return;
  {
    const auto ls = at::log_softmax(logits / kd_t, -1), lt = at::log_softmax(zt / kd_t, -1);
    const auto kd_want = (lt.exp() * (lt - ls)).sum(-1);
    const auto ce_want = at::cross_entropy_loss(logits, kd_labels, {}, at::Reduction::None);
    const auto g_want = (ls.exp() - lt.exp()) * (kd_w / kd_t) +
                        (at::softmax(logits, -1) - at::one_hot(kd_labels, V).to(at::kFloat)) * ce_w;
    auto zs = logits.cuda();
    const auto [kd_got, ce_got] = ops::kd_rows(zs, zt.cuda(), kd_labels.cuda(), 0, kd_t, 0.1, 0.5, kd_w, ce_w, true);
    const double e_kd = rel_err(kd_got, kd_want), e_ce = rel_err(ce_got, ce_want), e_g = rel_err(zs, g_want);
    row("kd_rows", "cuda", e_kd < 1e-4 && e_ce < 1e-5 && e_g < 1e-4,
        "forward KL + CE vs the formulas, rel err " + fmt(std::max({e_kd, e_ce, e_g})));
  }
  const auto [yc, rc] = ops::rms_norm(x.cuda(), w.cuda(), 1e-6);
  const auto [dxc, dwc] = ops::rms_norm_backward(gy.cuda(), x.cuda(), w.cuda(), rc);
  const double c_y = rel_err(yc, y), c_dx = rel_err(dxc, dx), c_dw = rel_err(dwc, dw);
  row("rms_norm", "cuda", c_y < 1e-5, "vs cpu, rel err " + fmt(c_y));
  row("rms_norm_backward", "cuda", c_dx < 1e-5 && c_dw < 1e-5, "vs cpu, rel err " + fmt(std::max(c_dx, c_dw)));
  const double c_s = rel_err(ops::swiglu(g.cuda(), u.cuda()), sy);
  const auto [dgc, duc] = ops::swiglu_backward(gy.cuda(), g.cuda(), u.cuda());
  row("swiglu", "cuda", c_s < 1e-5, "vs cpu, rel err " + fmt(c_s));
  row("swiglu_backward", "cuda", rel_err(dgc, dg) < 1e-5 && rel_err(duc, du) < 1e-5, "vs cpu");
  const bool rope_same = bit_equal(ops::rope(q.cuda(), cs.cuda(), sn.cuda(), false), qo) &&
                         bit_equal(ops::rope(q.cuda(), cs.cuda(), sn.cuda(), true), ops::rope(q, cs, sn, true));
  row("rope", "cuda", rope_same, rope_same ? "bit-exact vs cpu (both layouts)" : "differs from cpu");
  const auto gqb = gq.to(at::kBFloat16);
  const bool rb_same = bit_equal(ops::rope_backward(gqb.cuda(), cs.cuda(), sn.cuda(), true), ops::rope_backward(gqb, cs, sn, true));
  row("rope_backward", "cuda", rb_same, rb_same ? "bit-exact vs cpu" : "differs from cpu");
  const auto [lc, lsec] = ops::cross_entropy_chunk(logits.cuda(), labels.cuda(), -100);
  const double c_l = rel_err(lc, loss);
  row("cross_entropy_chunk", "cuda", c_l < 1e-5 && rel_err(lsec, lse) < 1e-5, "vs cpu, rel err " + fmt(c_l));
  auto bufc = logits.cuda();
  ops::cross_entropy_chunk_backward(bufc, labels.cuda(), lsec, gl.cuda(), -100);
  const double c_b = rel_err(bufc, buf);
  row("cross_entropy_chunk_backward", "cuda", c_b < 1e-5, "vs cpu, rel err " + fmt(c_b));
}

// Runs `check`, turning an exception into a FAIL row so one broken op never hides the others.
void guarded(const std::string& op, std::vector<SelfCheckRow>& rows, const std::function<void()>& check) {
  try {
    check();
  } catch (const std::exception& e) {
    std::string what = e.what();
    what = what.substr(0, what.find('\n'));
    rows.push_back({op, "?", "FAIL", "threw: " + what, 0.0});
  }
}

}  // namespace

std::vector<SelfCheckRow> run_selfcheck(bool cuda) {
  const bool use_cuda = cuda && torch::cuda::is_available();
  std::vector<SelfCheckRow> rows;
  std::set<std::string> checked;
  for (const auto& f : kFormats) {
    for (const char* g : kGranularities) {
      guarded(std::string("quantize_") + f.name, rows, [&] { check_quantize(f, g, rows, use_cuda); });
      guarded(std::string("dequantize_") + f.name, rows, [&] { check_dequantize(f, g, rows, use_cuda); });
    }
    checked.insert(std::string("quantize_") + f.name);
    checked.insert(std::string("dequantize_") + f.name);
  }
  guarded("moe", rows, [&] { check_moe(rows, use_cuda); });
  for (const char* op : {"moe_gate", "moe_gate_backward", "moe_route", "moe_permute", "moe_permute_backward",
                         "moe_unpermute", "moe_unpermute_backward", "moe_expert_load", "moe_update_bias"})
    checked.insert(op);
  guarded("fp8_gemm", rows, [&] { check_fp8_gemm(rows, use_cuda); });
  for (const char* op : {"fp8_gemm", "fp8_grouped_gemm", "fp8_grouped_gemm_masked", "fp8_linear", "fp8_linear_backward"})
    checked.insert(op);
  guarded("int8_gemm", rows, [&] { check_int8_gemm(rows, use_cuda); });
  checked.insert("int8_gemm");
  guarded("sparse_attention", rows, [&] { check_sparse_attention(rows, use_cuda); });
  for (const char* op : {"sparse_attention", "sparse_attention_backward", "select_blocks"}) checked.insert(op);
  guarded("fused", rows, [&] { check_fused(rows, use_cuda); });
  for (const char* op : {"rms_norm", "rms_norm_backward", "swiglu", "swiglu_backward", "rope", "rope_backward",
                         "cross_entropy_chunk", "cross_entropy_chunk_backward", "kd_rows"})
    checked.insert(op);
  if (!use_cuda) rows.push_back({"(all ops)", "cuda", "skip", cuda ? "no CUDA device" : "--cpu-only", 0.0});
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("anvil::", 0) != 0) continue;
    const std::string op = name.name.substr(7);
    if (!checked.count(op)) rows.push_back({op, "-", "unchecked", "registered, but the self-check has no case for it", 0.0});
  }
  return rows;
}

std::string format_selfcheck(const std::vector<SelfCheckRow>& rows) {
  std::ostringstream out;
  size_t w = 2;
  for (const auto& r : rows) w = std::max(w, r.op.size());
  out << std::left << std::setw(w + 2) << "op" << std::setw(7) << "device" << std::setw(11) << "status"
      << std::setw(10) << "ms" << "detail\n";
  out << std::string(w + 2 + 7 + 11 + 10 + 40, '-') << "\n";
  int ok = 0, failed = 0, other = 0;
  for (const auto& r : rows) {
    out << std::left << std::setw(w + 2) << r.op << std::setw(7) << r.device << std::setw(11) << r.status
        << std::setw(10) << (r.ms > 0 ? fmt(r.ms) : "") << r.detail << "\n";
    (r.status == "ok" ? ok : r.status == "FAIL" ? failed : other) += 1;
  }
  out << ok << " ok, " << failed << " failed, " << other << " skipped or unchecked\n";
  return out.str();
}

bool selfcheck_passed(const std::vector<SelfCheckRow>& rows) {
  for (const auto& r : rows)
    if (r.status == "FAIL" || r.status == "unchecked") return false;
  return true;
}

}  // namespace anvil
