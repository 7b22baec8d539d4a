// The exports of `anvil quantize`: FineGrainedFP8 (DeepSeek-V3's layout, transformers' quant_method "fp8") and
// compressed-tensors (float-quantized, int-quantized, pack-quantized), written a layer at a time into shards.
//
// Why it is built this way:
// - Shards are written as soon as they fill (ShardedWriter), so host memory holds at most one shard of output
//   besides the layer being quantized; their final names (model-0000i-of-0000N) are known only at the end, so
//   shards are written under temporary names and renamed by finish().
// - Everything goes into a temporary folder beside the output (OUT.tmp) that is renamed to OUT only once the
//   weights, config.json, the tokenizer files and the report are complete: a kill leaves no half-written OUT.
// - Before a module's tensors are written, they are checked against the names the format's loader looks up
//   (transformers' FP8Linear, compressed-tensors' compressors, vLLM's schemes), and the export refuses with the
//   missing names: the "KeyError ... weight_scale" of an incomplete checkpoint never reaches a user's server.
// Every key and layout follows the loaders' sources; docs/FORMATS.md "Quantized exports" states them.
#pragma once

#include "anvil/model/compressed_tensors.h"
#include "quantize/schemes.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace anvil::quantize {

/// "fp8" (FineGrainedFP8) or "compressed-tensors": output.format resolved against the scheme.
std::string export_format(const std::string& format_key, const Scheme& scheme);

/// Shards of one checkpoint, written as they fill; transformers' names and index.
class ShardedWriter {
 public:
  ShardedWriter(std::string dir, int64_t max_shard_bytes);
  /// Queues a tensor (copied to CPU, contiguous); writes the shard first when it would overflow.
  void add(const std::string& name, const at::Tensor& t);
  /// Writes the last shard, renames the shards to their final names and writes the index when there are several.
  void finish();
  int64_t total_bytes() const { return total_bytes_; }
  const std::map<std::string, std::string>& weight_map() const { return weight_map_; }

 private:
  void flush();
  std::string dir_;
  int64_t max_shard_bytes_;
  std::vector<std::pair<std::string, at::Tensor>> pending_;
  int64_t pending_bytes_ = 0, total_bytes_ = 0;
  std::vector<std::string> shard_files_;              // temporary names, in order
  std::map<std::string, std::string> weight_map_;     // name -> final shard file name (after finish)
  std::vector<std::vector<std::string>> shard_names_;  // tensor names of each shard
};

/// The tensors a quantized Linear `module` ("model.layers.0.mlp.down_proj") is written as, by format:
///   fp8:                         weight F8_E4M3 (N, K), weight_scale_inv F32 (ceil(N/128), K/128)
///   float-/int-quantized (CT):   weight F8_E4M3 / I8 (N, K), weight_scale (N, 1) | (1) | blocks, in `scale_dtype`
///   pack-quantized (CT):         weight_packed I32 (N, ceil(K bits / 32)) (model::ct::pack_int32), weight_scale (N, K / g),
///                                weight_shape I64 (2); asymmetric: weight_zero_point I32 (ceil(N bits / 32), K / g),
///                                the int8 zero points packed along the output dimension as compressed-tensors packs them
/// (a bias, when the Linear has one, is written by the caller under its own name).
std::vector<std::pair<std::string, at::Tensor>> module_tensors(const std::string& format, const Scheme& scheme,
                                                               const std::string& module, const QuantizedWeight& w);

/// The tensor names the format's loader looks up for a quantized `module` (compressed-tensors: model::ct's list).
std::vector<std::string> required_keys(const std::string& format, const Scheme& scheme, const std::string& module,
                                       int64_t group_size, bool symmetric = true);

/// Throws naming every key of required_keys that `written` lacks (and the loader that would fail on it).
void check_module_keys(const std::string& format, const Scheme& scheme, const std::string& module, int64_t group_size,
                       const std::vector<std::pair<std::string, at::Tensor>>& written, bool symmetric = true);

/// The compressed-tensors format of a scheme's weights ("float-quantized" for fp8-block, else the table's).
std::string ct_format(const Scheme& scheme);

/// The compressed-tensors scheme (config group) of an anvil scheme. symmetric = false: the group schemes'
/// asymmetric grid (quantize.symmetric), an int8 zero point per group.
model::ct::Scheme ct_scheme(const Scheme& scheme, int64_t group_size, bool act_order, bool symmetric = true);

/// The config.json "quantization_config" of the export. `ignore` lists the Linear modules kept in high precision
/// (exact names; regexes as "re:..."), `group_size` / `act_order` for the group schemes. compressed-tensors: as
/// model::ct::to_json writes it (compressed-tensors' own model_dump).
nlohmann::json quantization_config(const std::string& format, const Scheme& scheme,
                                   const std::vector<std::string>& ignore, int64_t group_size, bool act_order,
                                   bool symmetric = true);

/// The output folder's temporary twin ("OUT.tmp") and the final rename: OUT replaced (when `overwrite`) only
/// after the new one is complete.
std::string temporary_dir(const std::string& out);
void publish_dir(const std::string& tmp, const std::string& out, bool overwrite);

}  // namespace anvil::quantize
