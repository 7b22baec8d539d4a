// The exports (quantize/export.h): shard writing, each format's tensor names and config, the key check and the
// atomic publication of the output folder. Formats and keys: docs/FORMATS.md "Quantized exports", taken from
// transformers 5.17 (integrations/finegrained_fp8.py), compressed-tensors 0.19 (compressors/, quantization/
// lifecycle/initialize.py) and vLLM's compressed-tensors schemes.
#include "quantize/export.h"

#include "anvil/io/fs.h"
#include "anvil/io/safetensors.h"
#include "anvil/model/compressed_tensors.h"

#include <unistd.h>

#include <cstdio>
#include <stdexcept>

namespace anvil::quantize {

using nlohmann::json;

std::string export_format(const std::string& format_key, const Scheme& scheme) {
  if (format_key == "auto") return scheme.format == "fp8" || scheme.format == "gguf" ? scheme.format : "compressed-tensors";
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

// ---- the formats ------------------------------------------------------------------------------------------------

std::vector<std::pair<std::string, at::Tensor>> module_tensors(const std::string& format, const Scheme& scheme,
                                                               const std::string& module, const QuantizedWeight& w) {
  if (format == "fp8") return {{module + ".weight", w.q}, {module + ".weight_scale_inv", w.scale}};
  if (scheme.format == "pack-quantized") {
    const auto shape = at::tensor({w.q.size(0), w.q.size(1)}, at::kLong);
    std::vector<std::pair<std::string, at::Tensor>> out = {
        {module + ".weight_packed", model::ct::pack_int32(w.q, weight_bits(scheme), 1)},
        {module + ".weight_scale", w.scale},
        {module + ".weight_shape", shape}};
    // compressed-tensors packs a group/channel zero point along the output dimension (pack_quantized.py).
    if (w.zero_point.defined())
      out.emplace_back(module + ".weight_zero_point", model::ct::pack_int32(w.zero_point, weight_bits(scheme), 0));
    return out;
  }
  // float-quantized / int-quantized: a per-tensor scale has shape (1) in compressed-tensors (initialize.py).
  TORCH_CHECK(!w.zero_point.defined(), module, ": a zero point is written by the pack-quantized export only");
  return {{module + ".weight", w.q}, {module + ".weight_scale", w.scale.dim() == 0 ? w.scale.reshape({1}) : w.scale}};
}

std::vector<std::string> required_keys(const std::string& format, const Scheme& scheme, const std::string& module,
                                       int64_t group_size, bool symmetric) {
  if (format == "fp8") return {module + ".weight", module + ".weight_scale_inv"};  // transformers' FP8Linear
  // compressed-tensors: the names its compressors and vLLM's schemes look up (anvil::model::ct's one list).
  return model::ct::required_keys(module, ct_scheme(scheme, group_size, false, symmetric), ct_format(scheme));
}

void check_module_keys(const std::string& format, const Scheme& scheme, const std::string& module, int64_t group_size,
                       const std::vector<std::pair<std::string, at::Tensor>>& written, bool symmetric) {
  std::string missing;
  for (const auto& key : required_keys(format, scheme, module, group_size, symmetric)) {
    bool found = false;
    for (const auto& [name, t] : written) found = found || (name == key && t.defined() && t.numel() > 0);
    if (!found) missing += (missing.empty() ? "" : ", ") + key;
  }
  if (!missing.empty())
    throw std::runtime_error("refusing to write " + module + ": the " +
                             (format == "fp8" ? std::string("FineGrainedFP8") : "compressed-tensors " + ct_format(scheme)) +
                             " loader looks up tensors this export lacks: " + missing);
}

std::string ct_format(const Scheme& scheme) { return scheme.format == "fp8" ? "float-quantized" : scheme.format; }

model::ct::Scheme ct_scheme(const Scheme& scheme, int64_t group_size, bool act_order, bool symmetric) {
  namespace ct = model::ct;
  ct::Scheme out;
  out.targets = {"Linear"};
  out.format = ct_format(scheme);
  ct::QuantArgs w;
  w.num_bits = weight_bits(scheme);
  w.type = scheme.weight == "fp8" ? ct::QuantType::kFloat : ct::QuantType::kInt;
  TORCH_CHECK(symmetric || scheme.granularity == "group", "ct_scheme: ", scheme.name,
              " is symmetric only (asymmetric weights are for the group schemes)");
  w.symmetric = symmetric;
  w.observer = "minmax";
  if (scheme.granularity == "row") {
    w.strategy = ct::Strategy::kChannel;
  } else if (scheme.granularity == "tensor") {
    w.strategy = ct::Strategy::kTensor;
  } else if (scheme.granularity == "block128x128") {
    w.strategy = ct::Strategy::kBlock;
    w.block_structure = {128, 128};
  } else {
    w.strategy = ct::Strategy::kGroup;
    w.group_size = group_size;
    if (act_order) w.actorder = "weight";  // the order GPTQ used; nothing extra is stored
  }
  out.weights = w;
  if (!scheme.activations.empty()) {
    ct::QuantArgs a;
    a.num_bits = 8;
    a.type = w.type;
    a.symmetric = true;
    a.dynamic = true;
    if (scheme.activations == "token") a.strategy = ct::Strategy::kToken;
    else if (scheme.activations == "tensor") a.strategy = ct::Strategy::kTensor;
    else a.strategy = ct::Strategy::kGroup, a.group_size = 128;  // block1x128
    out.input_activations = a;
  }
  return out;
}

json quantization_config(const std::string& format, const Scheme& scheme, const std::vector<std::string>& ignore,
                         int64_t group_size, bool act_order, bool symmetric) {
  if (format == "fp8")  // transformers' FineGrainedFP8Config, as DeepSeek-V3 publishes it
    return {{"quant_method", "fp8"},
            {"fmt", "e4m3"},
            {"activation_scheme", "dynamic"},
            {"weight_block_size", {128, 128}},
            {"modules_to_not_convert", ignore}};
  model::ct::Config c;
  c.format = ct_format(scheme);
  c.config_groups = {{"group_0", ct_scheme(scheme, group_size, act_order, symmetric)}};
  c.ignore = ignore;
  c.quantization_status = "compressed";
  return model::ct::to_json(c);
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
