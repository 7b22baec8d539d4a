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
#include <torch/cuda.h>

#include <chrono>
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
