// The quantization schemes of `anvil quantize`: one table (kSchemes in schemes.cpp) saying, per scheme, how
// weights are held, how activations are quantized at inference, which algorithm picks the weights and which
// export writes them. Everything else (the recipe, calibration, the exports, the report) reads this table, so
// a new scheme (the lead's gguf-* ones) is one row here plus the export it names.
//
// Round-to-nearest weights use the core ops (anvil::ops::quantize_fp8 / quantize_int8: the arithmetic of
// docs/FORMATS.md, bit-exact on CPU and CUDA); a scale is always a dequantization multiplier
// (x ~= q * scale), fp32.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace anvil::quantize {

struct Scheme {
  std::string name;         ///< "fp8-block", ...
  std::string weight;       ///< "fp8" (e4m3) | "int8" | "int4"
  std::string granularity;  ///< weight scales: "block128x128" | "row" (per output channel) | "tensor" | "group"
  std::string activations;  ///< dynamic activation quantization at inference: "" (weight-only) | "token" |
                            ///< "block1x128" | "tensor"
  std::string algorithm;    ///< "rtn" | "gptq" | "smoothquant" (w8a8: SmoothQuant, then RTN)
  std::string format;       ///< default export: "fp8" (FineGrainedFP8) | "float-quantized" | "int-quantized" |
                            ///< "pack-quantized" (the last three compressed-tensors)
  std::string summary;      ///< one line for --help and docs
};

/// Every scheme, in the order docs/CLI.md lists them.
const std::vector<Scheme>& schemes();

/// The scheme named `name`; throws std::invalid_argument naming `key` and listing the schemes.
const Scheme& find_scheme(const std::string& name, const std::string& key = "quantize.scheme");

/// Number of weight bits.
int weight_bits(const Scheme& s);

/// A quantized (N, K) weight.
struct QuantizedWeight {
  at::Tensor q;      ///< (N, K): float8_e4m3fn, or int8 (int4 values in [-8, 7] held one per int8)
  at::Tensor scale;  ///< dequantization multipliers: () or (1) tensor, (N, 1) row, (ceil(N/128), K/128) block,
                     ///< (N, K/group) group; fp32 from the ops (FineGrainedFP8), the model's dtype for the
                     ///< compressed-tensors exports (llm-compressor's observer, calibrate.cpp quantize_weight)
  at::Tensor zero_point;   ///< (N, K/group) int8 for an asymmetric group scheme (w ~ (q - zero_point) * scale);
                           ///< undefined when symmetric
  int64_t group_size = 0;  ///< "group" only
  /// (float(q) - zero_point) * scale, rounded once to `dtype`: exactly what a loader of the export computes.
  at::Tensor dequantize(at::ScalarType dtype) const;
  /// q and scale moved to the host (a no-op there).
  void to_host() {
    q = q.cpu(), scale = scale.cpu();
    if (zero_point.defined()) zero_point = zero_point.cpu();
  }
};

/// Why an (N, K) weight cannot take the scheme, or "" when it can: fp8-block needs K % 128 == 0 (activations
/// are quantized in 1x128 blocks along K; N may end in a partial block, as DeepSeek-V3's do), group schemes
/// need K % group_size == 0, int4 packing needs K % 8 == 0.
std::string shape_misfit(const Scheme& s, int64_t n, int64_t k, int64_t group_size);

/// Round-to-nearest quantization of `w` (N, K) (any float dtype; computed in fp32) for the fp8 and per-channel int8
/// schemes, through the core ops. Group schemes take quantize/gptq.h's rtn_quantize (llm-compressor's grid).
/// Throws when the weight is not finite (a NaN scale would be a silent wrong export).
QuantizedWeight quantize_rtn(const Scheme& s, const at::Tensor& w);

/// x (..., K) quantized and dequantized as the scheme quantizes activations at inference (dynamic per token,
/// per 1x128 block or per tensor; fp8 or int8 as the weights); x itself for weight-only schemes.
at::Tensor fake_quantize_activations(const Scheme& s, const at::Tensor& x);

/// Signal-to-quantization-noise ratio 10 log10(sum(ref^2) / sum((ref - q)^2)) in dB (computed in fp64);
/// +inf when they are equal.
double sqnr_db(const at::Tensor& ref, const at::Tensor& q);

}  // namespace anvil::quantize
