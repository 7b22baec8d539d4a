// The scheme table and the round-to-nearest arithmetic (quantize/schemes.h). FP8 and int8 RTN go through the
// core ops, so the bytes are those of docs/FORMATS.md on any device; int4 groups are a few ATen lines with the
// int4/int8 groups are quantize/gptq.h's (llm-compressor's observer and grid).
#include "quantize/schemes.h"

#include "anvil/ops.h"

#include <cmath>
#include <limits>
#include <stdexcept>

namespace anvil::quantize {

const std::vector<Scheme>& schemes() {
  static const std::vector<Scheme> kSchemes = {
      {"fp8-block", "fp8", "block128x128", "block1x128", "rtn", "fp8",
       "FP8 e4m3 weights in 128x128 blocks, activations dynamic 1x128 (DeepSeek-V3, FineGrainedFP8)"},
      {"fp8-channel", "fp8", "row", "token", "rtn", "float-quantized",
       "FP8 e4m3 weights per output channel, activations dynamic per token (llm-compressor FP8_DYNAMIC)"},
      {"fp8-tensor", "fp8", "tensor", "tensor", "rtn", "float-quantized",
       "FP8 e4m3 weights per tensor, activations dynamic per tensor"},
      // Weight-only int8 is pack-quantized (four values per int32), as llm-compressor infers it for W8A16
      // (compressed-tensors' infer_module_format: int-quantized needs input activations) and as vLLM's
      // CompressedTensorsWNA16 requires; anvil's loader still reads the int-quantized layout of earlier exports.
      {"int8-weight", "int8", "row", "", "rtn", "pack-quantized", "int8 weights per output channel, weight-only (W8A16)"},
      {"w8a8-int8", "int8", "row", "token", "smoothquant", "int-quantized",
       "int8 weights per channel, int8 activations dynamic per token, SmoothQuant with a calibrated alpha"},
      {"int4-weight", "int4", "group", "", "rtn", "pack-quantized",
       "int4 weights in groups along K, round to nearest, weight-only (W4A16; GPTQ's baseline)"},
      {"gptq-int4", "int4", "group", "", "gptq", "pack-quantized", "GPTQ int4 weights in groups along K (W4A16)"},
      {"gptq-int8", "int8", "group", "", "gptq", "pack-quantized", "GPTQ int8 weights in groups along K (W8A16)"},
      // GGUF for llama.cpp / Ollama (quantize/gguf.h): one .gguf through anvil::model::export_gguf, llama-quantize's
      // tensor types and ggml's reference quantizers; weight = the export type.
      {"gguf-q8_0", "q8_0", "block32", "", "rtn", "gguf", "GGUF Q8_0 (llama.cpp's q8_0: 8-bit blocks of 32)"},
      {"gguf-q4_0", "q4_0", "block32", "", "rtn", "gguf", "GGUF Q4_0 (llama-quantize Q4_0; the output matrix Q6_K/Q8_0)"},
      {"gguf-q4_k_m", "q4_k_m", "superblock256", "", "rtn", "gguf",
       "GGUF Q4_K_M (llama-quantize's mix: Q4_K, attn_v/ffn_down Q6_K on some layers, the output Q6_K)"},
      {"gguf-q5_k_m", "q5_k_m", "superblock256", "", "rtn", "gguf",
       "GGUF Q5_K_M (llama-quantize's mix: Q5_K, attn_v/ffn_down Q6_K on some layers, the output Q6_K)"},
      {"gguf-q6_k", "q6_k", "superblock256", "", "rtn", "gguf", "GGUF Q6_K (llama-quantize Q6_K)"},
  };
  return kSchemes;
}

const Scheme& find_scheme(const std::string& name, const std::string& key) {
  std::string names;
  for (const auto& s : schemes()) {
    if (s.name == name) return s;
    names += (names.empty() ? "\"" : ", \"") + s.name + "\"";
  }
  throw std::invalid_argument("config key " + key + ": must be one of " + names + ", got \"" + name + "\"");
}

int weight_bits(const Scheme& s) { return s.weight == "int4" ? 4 : 8; }

at::Tensor QuantizedWeight::dequantize(at::ScalarType dtype) const {
  // q * scale in fp32 (exact for 8-bit q and an fp32, bf16 or fp16 scale), rounded once to `dtype`: what
  // compressed-tensors' decompress computes in a bf16 scale's own dtype, and what the ops compute for fp32 ones.
  const auto s = scale.to(at::kFloat);
  const bool per_tensor = s.dim() <= 1;  // () from the ops, (1) as compressed-tensors stores it
  if (q.scalar_type() == at::kFloat8_e4m3fn) {
    const std::string g = per_tensor ? "tensor" : (s.size(1) == 1 && s.size(0) == q.size(0) ? "row" : "block128x128");
    return anvil::ops::dequantize_fp8(q, per_tensor ? s.reshape({}) : s, g, dtype);
  }
  if (group_size > 0) {  // (N, K / g, g) * (N, K / g, 1)
    const int64_t n = q.size(0), k = q.size(1);
    auto v = q.to(at::kFloat).view({n, k / group_size, group_size});
    if (zero_point.defined()) v = v - zero_point.to(at::kFloat).unsqueeze(-1);  // exact: small integers
    auto w = v * s.unsqueeze(-1);
    return w.view({n, k}).to(dtype);
  }
  return anvil::ops::dequantize_int8(q, per_tensor ? s.reshape({}) : s, per_tensor ? "tensor" : "row", dtype);
}

std::string shape_misfit(const Scheme& s, int64_t n, int64_t k, int64_t group_size) {
  (void)n;
  if (s.granularity == "block128x128" && k % 128 != 0)
    return "in_features " + std::to_string(k) + " is not a multiple of 128 (fp8-block quantizes activations in 1x128 "
           "blocks along K, as vLLM and DeepGEMM require)";
  if (s.granularity == "group" && k % group_size != 0)
    return "in_features " + std::to_string(k) + " is not a multiple of quantize.group_size " + std::to_string(group_size);
  if (s.weight == "int4" && k % 8 != 0)
    return "in_features " + std::to_string(k) + " is not a multiple of 8 (eight int4 values per int32)";
  return "";
}

namespace {

void check_finite(const QuantizedWeight& r, const std::string& what) {
  if (!at::isfinite(r.scale).all().item<bool>())
    throw std::runtime_error(what + ": the weight holds NaN or inf, so its scales are NaN; refusing to export it");
}

}  // namespace

QuantizedWeight quantize_rtn(const Scheme& s, const at::Tensor& w) {
  QuantizedWeight r;
  // The ops read fp32, bf16 and fp16 themselves (each element widened to fp32, as a copy would): no fp32 copy
  // of the weight, which was the largest buffer of a layer's quantization on the device.
  const auto dt = w.scalar_type();
  const auto x = dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf ? w.contiguous() : w.to(at::kFloat).contiguous();
  if (s.weight == "fp8") {
    std::tie(r.q, r.scale) = anvil::ops::quantize_fp8(x, s.granularity);
  } else {
    TORCH_CHECK(s.granularity != "group", "quantize_rtn: group schemes use quantize/gptq.h's rtn_quantize");
    std::tie(r.q, r.scale) = anvil::ops::quantize_int8(x, s.granularity);
  }
  check_finite(r, "quantizing an (" + std::to_string(w.size(0)) + ", " + std::to_string(w.size(1)) + ") weight");
  return r;
}

at::Tensor fake_quantize_activations(const Scheme& s, const at::Tensor& x) {
  if (s.activations.empty()) return x;
  const auto shape = x.sizes().vec();
  const auto x2 = x.reshape({-1, shape.back()}).to(at::kFloat).contiguous();  // (T, K)
  const std::string g = s.activations == "token" ? "row" : s.activations;
  at::Tensor out;
  if (s.weight == "fp8") {
    auto [q, scale] = anvil::ops::quantize_fp8(x2, g);
    out = anvil::ops::dequantize_fp8(q, scale, g, at::kFloat);
  } else {
    auto [q, scale] = anvil::ops::quantize_int8(x2, g);
    out = anvil::ops::dequantize_int8(q, scale, g, at::kFloat);
  }
  return out.to(x.scalar_type()).reshape(shape);
}

double sqnr_db(const at::Tensor& ref, const at::Tensor& q) {
  // fp64 sums over blocks of rows: the whole (N, K) weight in fp64 would be 4x its bf16 bytes on the device.
  TORCH_CHECK(ref.sizes() == q.sizes(), "sqnr_db: shapes ", ref.sizes(), " and ", q.sizes(), " differ");
  const auto r2 = ref.reshape({ref.numel() > 0 ? ref.size(0) : 0, -1}), q2 = q.reshape(r2.sizes());
  const int64_t rows = r2.size(0), step = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, r2.size(1)));
  auto signal = at::zeros({}, ref.options().dtype(at::kDouble)), noise = at::zeros({}, ref.options().dtype(at::kDouble));
  for (int64_t i = 0; i < rows; i += step) {
    const auto r = r2.slice(0, i, std::min(rows, i + step)).to(at::kDouble);
    signal.add_(r.square().sum());
    noise.add_((r - q2.slice(0, i, std::min(rows, i + step)).to(at::kDouble)).square().sum());
  }
  const double s = signal.item<double>(), n = noise.item<double>();
  if (n == 0) return std::numeric_limits<double>::infinity();
  return 10.0 * std::log10(s / n);
}

}  // namespace anvil::quantize
