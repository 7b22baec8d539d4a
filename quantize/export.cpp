// The exports (quantize/export.h): shard writing, each format's tensor names and config, the key check and the
// atomic publication of the output folder. Formats and keys: docs/FORMATS.md "Quantized exports", taken from
// transformers 5.17 (integrations/finegrained_fp8.py), compressed-tensors 0.19 (compressors/, quantization/
// lifecycle/initialize.py) and vLLM's compressed-tensors schemes.
#include "quantize/export.h"

#include "anvil/io/fs.h"
#include "anvil/io/safetensors.h"

#include <unistd.h>

#include <cstdio>
#include <stdexcept>

namespace anvil::quantize {

using nlohmann::json;

std::string export_format(const std::string& format_key, const Scheme& scheme) {
  if (format_key == "auto") return scheme.format == "fp8" ? "fp8" : "compressed-tensors";
  return format_key;
}

// ---- shards --------------------------------------------------------------------------------------------------

ShardedWriter::ShardedWriter(std::string dir, int64_t max_shard_bytes)
    : dir_(std::move(dir)), max_shard_bytes_(max_shard_bytes) {}

void ShardedWriter::add(const std::string& name, const at::Tensor& t) {
  const int64_t bytes = int64_t(t.numel()) * int64_t(t.element_size());
  if (!pending_.empty() && pending_bytes_ + bytes > max_shard_bytes_) flush();
  pending_.emplace_back(name, t.detach().to(at::kCPU).contiguous());
  pending_bytes_ += bytes;
  total_bytes_ += bytes;
}

void ShardedWriter::flush() {
  if (pending_.empty()) return;
  char file[64];
  std::snprintf(file, sizeof file, "model-part-%05zu.safetensors", shard_files_.size() + 1);
  io::save_safetensors(io::join_path(dir_, file), pending_, {{"format", "pt"}});
  shard_files_.push_back(file);
  shard_names_.emplace_back();
  for (const auto& [name, t] : pending_) shard_names_.back().push_back(name);
  pending_.clear();  // the shard is on disk: its tensors are freed
  pending_bytes_ = 0;
}

void ShardedWriter::finish() {
  flush();
  const size_t n = shard_files_.size();
  for (size_t i = 0; i < n; ++i) {
    char final_name[64];
    if (n == 1) std::snprintf(final_name, sizeof final_name, "model.safetensors");
    else std::snprintf(final_name, sizeof final_name, "model-%05zu-of-%05zu.safetensors", i + 1, n);
    io::rename_path(io::join_path(dir_, shard_files_[i]), io::join_path(dir_, final_name));
    for (const auto& name : shard_names_[i]) weight_map_[name] = final_name;
  }
  if (n > 1) {
    json index = {{"metadata", {{"total_size", total_bytes_}}}, {"weight_map", json::object()}};
    for (const auto& [name, file] : weight_map_) index["weight_map"][name] = file;
    io::write_text_atomically(io::join_path(dir_, "model.safetensors.index.json"), index.dump(2) + "\n");
  }
}

// ---- packing ---------------------------------------------------------------------------------------------------

at::Tensor pack_int32(const at::Tensor& q, int bits) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar, "pack_int32: q must be a 2-D int8 tensor");
  const auto src = q.to(at::kCPU).contiguous();
  const int64_t n = src.size(0), k = src.size(1), words = (k * bits + 31) / 32;
  auto out = at::zeros({n, words}, at::kInt);
  const int8_t* s = src.data_ptr<int8_t>();
  auto* o = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const int offset = 1 << (bits - 1);
  const uint32_t mask = (uint32_t(1) << bits) - 1;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t i = 0; i < k; ++i) {
      const uint32_t v = uint32_t(int32_t(s[r * k + i]) + offset) & mask;
      const int64_t bit = i * bits, word = bit / 32, off = bit % 32;
      o[r * words + word] |= v << off;
      if (off + bits > 32) o[r * words + word + 1] |= v >> (32 - off);
    }
  }
  return out;
}

at::Tensor unpack_int32(const at::Tensor& packed, int bits, int64_t k) {
  const auto src = packed.to(at::kCPU).contiguous();
  const int64_t n = src.size(0), words = src.size(1);
  TORCH_CHECK(words == (k * bits + 31) / 32, "unpack_int32: ", words, " words cannot hold ", k, " values of ", bits, " bits");
  auto out = at::empty({n, k}, at::kChar);
  const auto* s = reinterpret_cast<const uint32_t*>(src.data_ptr<int32_t>());
  int8_t* o = out.data_ptr<int8_t>();
  const uint32_t mask = (uint32_t(1) << bits) - 1;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t i = 0; i < k; ++i) {
      const int64_t bit = i * bits, word = bit / 32, off = bit % 32;
      uint64_t v = s[r * words + word] >> off;
      if (off + bits > 32) v |= uint64_t(s[r * words + word + 1]) << (32 - off);
      o[r * k + i] = int8_t(int32_t(v & mask) - (1 << (bits - 1)));
    }
  }
  return out;
}

// ---- the formats ------------------------------------------------------------------------------------------------

std::vector<std::pair<std::string, at::Tensor>> module_tensors(const std::string& format, const Scheme& scheme,
                                                               const std::string& module, const QuantizedWeight& w) {
  if (format == "fp8") return {{module + ".weight", w.q}, {module + ".weight_scale_inv", w.scale}};
  if (scheme.format == "pack-quantized") {
    const auto shape = at::tensor({w.q.size(0), w.q.size(1)}, at::kLong);
    return {{module + ".weight_packed", pack_int32(w.q, weight_bits(scheme))},
            {module + ".weight_scale", w.scale},
            {module + ".weight_shape", shape}};
  }
  // float-quantized / int-quantized: a per-tensor scale has shape (1) in compressed-tensors (initialize.py).
  return {{module + ".weight", w.q}, {module + ".weight_scale", w.scale.dim() == 0 ? w.scale.reshape({1}) : w.scale}};
}

std::vector<std::string> required_keys(const std::string& format, const Scheme& scheme, const std::string& module) {
  if (format == "fp8") return {module + ".weight", module + ".weight_scale_inv"};  // transformers' FP8Linear
  if (scheme.format == "pack-quantized")  // PackedQuantizationCompressor.compression_param_names (symmetric)
    return {module + ".weight_packed", module + ".weight_scale", module + ".weight_shape"};
  return {module + ".weight", module + ".weight_scale"};  // NaiveQuantizationCompressor (symmetric, dynamic acts)
}

void check_module_keys(const std::string& format, const Scheme& scheme, const std::string& module,
                       const std::vector<std::pair<std::string, at::Tensor>>& written) {
  std::string missing;
  for (const auto& key : required_keys(format, scheme, module)) {
    bool found = false;
    for (const auto& [name, t] : written) found = found || (name == key && t.defined() && t.numel() > 0);
    if (!found) missing += (missing.empty() ? "" : ", ") + key;
  }
  if (!missing.empty())
    throw std::runtime_error("refusing to write " + module + ": the " +
                             (format == "fp8" ? std::string("FineGrainedFP8") : "compressed-tensors " + scheme.format) +
                             " loader looks up tensors this export lacks: " + missing);
}

namespace {

json quantization_args(int bits, const std::string& type, const std::string& strategy, bool dynamic,
                       const json& group_size, const json& block_structure, const json& actorder) {
  return {{"num_bits", bits},           {"type", type},
          {"symmetric", true},          {"group_size", group_size},
          {"strategy", strategy},       {"block_structure", block_structure},
          {"dynamic", dynamic},         {"actorder", actorder},
          {"scale_dtype", nullptr},     {"zp_dtype", nullptr},
          {"observer", dynamic ? json(nullptr) : json("minmax")}, {"observer_kwargs", json::object()}};
}

}  // namespace

json quantization_config(const std::string& format, const Scheme& scheme, const std::vector<std::string>& ignore,
                         int64_t group_size, bool act_order) {
  if (format == "fp8")  // transformers' FineGrainedFP8Config, as DeepSeek-V3 publishes it
    return {{"quant_method", "fp8"},
            {"fmt", "e4m3"},
            {"activation_scheme", "dynamic"},
            {"weight_block_size", {128, 128}},
            {"modules_to_not_convert", ignore}};
  const std::string type = scheme.weight == "fp8" ? "float" : "int";
  const int bits = weight_bits(scheme);
  const std::string strategy = scheme.granularity == "row" ? "channel" : scheme.granularity == "block128x128" ? "block" : scheme.granularity;
  json weights = quantization_args(bits, type, strategy, false, strategy == "group" ? json(group_size) : json(nullptr),
                                   strategy == "block" ? json({128, 128}) : json(nullptr),
                                   strategy == "group" && act_order ? json("weight") : json(nullptr));
  json input = nullptr;
  if (!scheme.activations.empty()) {
    const std::string a = scheme.activations == "block1x128" ? "group" : scheme.activations;
    input = quantization_args(8, type, a, true, a == "group" ? json(128) : json(nullptr), nullptr, nullptr);
  }
  json group = {{"targets", {"Linear"}},
                {"weights", weights},
                {"input_activations", input},
                {"output_activations", nullptr},
                {"format", scheme.format}};
  return {{"config_groups", {{"group_0", group}}},
          {"quant_method", "compressed-tensors"},
          {"kv_cache_scheme", nullptr},
          {"format", scheme.format},
          {"quantization_status", "compressed"},
          {"global_compression_ratio", nullptr},
          {"ignore", ignore}};
}

// ---- the output folder -------------------------------------------------------------------------------------------

std::string temporary_dir(const std::string& out) { return out + ".tmp"; }

void publish_dir(const std::string& tmp, const std::string& out, bool overwrite) {
  if (!io::path_exists(out)) {
    io::rename_path(tmp, out);
    return;
  }
  if (!overwrite)
    throw std::invalid_argument("config key output.dir: " + out + " exists; pass --overwrite (output.overwrite) to replace it");
  const std::string old = out + ".old";
  io::remove_tree(old);
  io::rename_path(out, old);
  io::rename_path(tmp, out);
  io::remove_tree(old);
}

}  // namespace anvil::quantize
