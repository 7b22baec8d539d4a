// Layer-by-layer quantization of a checkpoint that is never loaded whole.
//
// Why it is built this way (the memory bounds the issue asks for):
// - The source is read through SourceModel: each shard is memory-mapped only while one of its tensors is being
//   read (at most two shards mapped at once), tensors are zero-copy views, and a layer's tensors are copied to the
//   device only when that layer is quantized. Host memory is a layer, the calibration activations and one shard of
//   output; device memory about one layer plus one batch of activations.
// - Calibration streams: each decoder layer is built alone (model::load_decoder_layer), its inputs on the
//   calibration tokens are the previous layer's *quantized* outputs (kept on the host between layers), its Linear
//   inputs are observed while the dense layer runs, the layer is quantized, and the quantized layer (weights as
//   exported, activations quantized as the scheme does at inference) produces the next layer's inputs.
// - MoE: during the observing pass every routed expert sees every calibration token (not only its top-k), so no
//   expert is left without statistics; the report counts each expert's calibrated and routed tokens. A quantized
//   Linear with no observed token, a non-finite statistic or a NaN / zero scale is an error, never an export.
#pragma once

#include "anvil/io/safetensors.h"
#include "anvil/model/config.h"
#include "quantize/export.h"
#include "quantize/schemes.h"

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace anvil::quantize {

/// A checkpoint folder read a shard at a time (see above).
class SourceModel {
 public:
  explicit SourceModel(const std::string& dir);
  const std::vector<std::string>& keys() const { return keys_; }
  bool contains(const std::string& name) const { return shard_of_.count(name) != 0; }
  /// CPU tensor of `name` as stored (a view of its shard's mapping).
  at::Tensor tensor(const std::string& name);
  /// Every tensor whose name starts with `prefix`.
  std::unordered_map<std::string, at::Tensor> with_prefix(const std::string& prefix);
  /// Bytes of tensor data in the checkpoint.
  int64_t bytes() const { return bytes_; }

 private:
  std::string dir_;
  std::vector<std::string> keys_;
  std::unordered_map<std::string, std::string> shard_of_;  // name -> file
  std::vector<std::pair<std::string, std::shared_ptr<io::SafetensorsFile>>> open_;  // most recent last
  int64_t bytes_ = 0;
};

/// Whether the Linear `module` is kept in high precision by `patterns` (quantize.ignore): a pattern matches the
/// full name, a dotted suffix of it ("lm_head", "mlp.down_proj"), or, as "re:REGEX", the name from its start
/// (Python's re.match, as compressed-tensors reads the export's ignore list).
bool is_ignored(const std::string& module, const std::vector<std::string>& patterns);

struct StreamOptions {
  const Scheme* scheme = nullptr;
  std::string format;                 ///< "fp8" | "compressed-tensors"
  std::vector<std::string> ignore;
  std::string misfit = "error";
  int64_t group_size = 128;
  bool act_order = false;
  bool symmetric = true;              ///< group schemes: false = an int8 zero point per group (quantize.symmetric)
  double dampening = 0.01, smoothquant_alpha = -1;
  at::ScalarType dtype = at::kFloat;  ///< computation and high-precision export dtype
  at::Device device = at::kCPU;
  std::vector<at::Tensor> calib_rows;  ///< each (S) int64 token ids; empty: no calibration pass
  int64_t calib_batch = 8;
  int64_t max_shard_bytes = 2'000'000'000;
};

struct LinearReport {
  std::string name;
  int64_t out_features = 0, in_features = 0;
  bool quantized = false;
  std::string kept_because;      ///< why it stays in high precision (ignored, misfit)
  double weight_sqnr_db = 0;     ///< dequantized vs original weight
  double output_sqnr_db = 0;     ///< calibration: x W^T vs the scheme's quantized product, on the same inputs
  int64_t tokens = 0;            ///< calibration tokens observed (0 without calibration)
};

struct ExpertTokens {
  int64_t layer = 0, expert = 0, calibrated = 0, routed = 0;
};

struct StreamResult {
  std::vector<LinearReport> linears;
  std::vector<ExpertTokens> experts;
  std::vector<std::string> kept;  ///< Linear modules (transformers' names) in high precision: the export's ignore
  std::vector<std::pair<std::string, double>> smoothing;  ///< w8a8-int8: (norm, alpha) of each smoothed group
  std::vector<std::string> rtn_fallbacks;  ///< gptq-*: Linears whose Hessian failed Cholesky (rounded to nearest)
  int64_t bytes_before = 0, bytes_after = 0;
  double seconds = 0;
};

/// Quantizes the checkpoint `src` (config `config`) into `dir` (shards, not config.json), a decoder layer at a
/// time; `progress` gets one line per layer.
StreamResult quantize_streaming(const model::ModelConfig& config, SourceModel& src, const StreamOptions& options,
                                const std::string& dir, const std::function<void(const std::string&)>& progress);

}  // namespace anvil::quantize
