// compressed-tensors: the checkpoint format of vLLM's llm-compressor (config.json
// `quantization_config.quant_method` "compressed-tensors"), in both directions. Everything anvil knows
// about the format lives here, written against compressed-tensors 0.19.0's sources (quant_args.py,
// quant_scheme.py, quant_config.py, compressors/{naive_quantized,pack_quantized}, utils/match.py) and
// what its loaders look up (transformers 5.17 through compressed-tensors' ModelCompressor; vLLM's
// CompressedTensorsW8A8Fp8 / W8A8Int8 / WNA16 schemes):
//   - the config (`QuantArgs`, `Scheme`, `Config`): parsed strictly (an error names the key) and
//     written back as compressed-tensors' `model_dump` writes it, so an export round-trips;
//   - which module a scheme covers (`matches`, `scheme_for`: exact names, "re:" regexes anchored at the
//     start as Python's re.match, class names such as "Linear"; `ignore` wins);
//   - the tensors each format stores per module (`required_keys`, `check_complete`), so a loader or an
//     exporter can name what is missing instead of failing later with vLLM's KeyError;
//   - int32 packing (`pack_int32` / `unpack_int32`): dense bit packing of num_bits-wide values with
//     the offset 2^(num_bits-1) added, element i at bit i*num_bits of its row, exactly as
//     compressed-tensors' pack_to_int32 / unpack_from_int32 (asymmetric zero points packed along dim 0);
//   - `dequantize_module` (checkpoint tensors -> dense (out, in) weight) and `compress_module` (dense
//     weight + scales -> checkpoint tensors), with the package's arithmetic: q and the zero point are
//     cast to the scale's dtype, subtracted, multiplied by the scale in that dtype, then cast to the
//     output dtype, so results are bit-equal to compressed-tensors' decompress.
// Plain structs and free functions: the format is data, and the exporter (quantize/) and the loader
// (model/transformer.cpp) share these functions rather than each keeping a copy of the rules.
#pragma once

#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace anvil::model::ct {

/// config.json `quantization_config.quant_method` of this format.
inline constexpr const char* kQuantMethod = "compressed-tensors";
/// The compressed-tensors version whose format this module follows (written as `version`).
inline constexpr const char* kFormatVersion = "0.19.0";

/// `type`: integer or floating-point quantized values.
enum class QuantType { kInt, kFloat };
/// `strategy`: which values share a scale.
enum class Strategy { kTensor, kChannel, kGroup, kBlock, kToken, kTensorGroup, kAttnHead };

std::string to_string(QuantType type);
std::string to_string(Strategy strategy);

/// compressed-tensors' QuantizationArgs (one of weights / input_activations / output_activations).
struct QuantArgs {
  int64_t num_bits = 8;
  QuantType type = QuantType::kInt;
  bool symmetric = true;
  /// Inferred as compressed-tensors does when absent: group_size > 0 -> group, -1 -> channel, else tensor.
  Strategy strategy = Strategy::kTensor;
  /// `group_size`: absent (nullopt), > 0 for group / tensor_group, -1 for channel.
  std::optional<int64_t> group_size;
  /// `block_structure` [rows, cols] for the block strategy (empty = null).
  std::vector<int64_t> block_structure;
  /// `dynamic`: true = scales computed at run time (activations); `dynamic_local`: the string "local".
  bool dynamic = false;
  bool dynamic_local = false;
  /// `actorder`: "" (null), "weight" or its alias "static" (GPTQ reordering during calibration only;
  /// nothing stored; kept as written so that a config round-trips) or the
  /// legacy "group" (a `weight_g_idx` is stored; compressed-tensors 0.19 refuses it, anvil reads it).
  std::string actorder;
  /// `observer`, `scale_dtype`, `zp_dtype` ("" = null; dtypes as "torch.int8"), `observer_kwargs`.
  std::string observer;
  std::string scale_dtype;
  std::string zp_dtype;
  nlohmann::json observer_kwargs = nlohmann::json::object();
};

/// compressed-tensors' QuantizationScheme: the args for the modules that `targets` names.
struct Scheme {
  std::vector<std::string> targets;
  std::optional<QuantArgs> weights;
  std::optional<QuantArgs> input_activations;
  std::optional<QuantArgs> output_activations;
  /// Per-scheme `format` ("" = null: the config's format applies).
  std::string format;
};

/// `quantization_config` of a compressed-tensors checkpoint.
struct Config {
  /// "dense", "naive-quantized", "int-quantized", "float-quantized", "pack-quantized",
  /// "mixed-precision" (each scheme then carries its own), ... as written.
  std::string format = "dense";
  /// config_groups in file order (name, scheme); preset groups (`"W4A16": ["Linear"]`) are expanded.
  std::vector<std::pair<std::string, Scheme>> config_groups;
  std::vector<std::string> ignore;
  std::string quantization_status = "compressed";
  std::optional<QuantArgs> kv_cache_scheme;
  std::optional<double> global_compression_ratio;
  /// `version` as written ("" if absent); keys anvil does not interpret (sparsity_config,
  /// transform_config) are kept as they were so that to_json writes them back.
  std::string version;
  nlohmann::json extra = nlohmann::json::object();
};

/// Parses `quantization_config` (the object, not the whole config.json). Errors are c10::Error naming the
/// key path, e.g. "quantization_config.config_groups.group_0.weights.num_bits: must be an integer in
/// [1, 32], got "8"". Unknown keys inside a scheme or args are refused (pydantic's extra="forbid").
Config parse_quantization_config(const nlohmann::json& j);

/// One scheme or one args object alone (e.g. a config group), errors prefixed with `path`.
Scheme parse_scheme(const nlohmann::json& j, const std::string& path = "scheme");
QuantArgs parse_quant_args(const nlohmann::json& j, const std::string& path = "args");

/// The object compressed-tensors' ModelCompressor.update_config writes under `quantization_config`
/// (every QuantArgs field, nulls included; `quant_method`, `version`).
nlohmann::json to_json(const Config& config);
nlohmann::json to_json(const QuantArgs& args);
nlohmann::json to_json(const Scheme& scheme);

/// A preset scheme by name (upper-cased), as compressed-tensors' preset_name_to_scheme: W4A16, W8A16,
/// W4A16_ASYM, W8A8 / INT8, W4AFP8, FP8, FP8_DYNAMIC, FP8_BLOCK (others raise, naming the name).
Scheme preset_scheme(const std::string& name, const std::vector<std::string>& targets);

/// Whether one target (or any of a list) matches a module: "re:<regex>" matched at the start of the name
/// (Python re.match), otherwise an exact module name or one of the module's class names.
bool matches(const std::string& module_name, const std::vector<std::string>& class_names, const std::string& target);
bool matches(const std::string& module_name, const std::vector<std::string>& class_names,
             const std::vector<std::string>& targets);

/// The config group (its name and scheme) that covers a module, or nullopt when none does or the module
/// is ignored. Several matching groups: the first in file order whose target is an exact name, else a
/// regex, else a class name (compressed-tensors' match_targets order).
std::optional<std::pair<std::string, const Scheme*>> scheme_for(const Config& config, const std::string& module_name,
                                                                const std::vector<std::string>& class_names);

/// The format a scheme's tensors are stored in: the scheme's own, else the config's.
std::string effective_format(const Config& config, const Scheme& scheme);

/// Whether anvil reads (dequantizes) the scheme in `format`; if not, `why` says what is unsupported.
bool is_supported(const Scheme& scheme, const std::string& format, std::string* why = nullptr);

/// Local tensor names ("weight_packed", "weight_scale", ...) a loader needs for one module under a
/// scheme and format: dense `weight`; naive/int/float-quantized `weight`, `weight_scale` (+
/// `weight_zero_point` if asymmetric); pack-quantized `weight_packed`, `weight_scale`, `weight_shape`
/// (+ `weight_zero_point` if asymmetric group/channel, `weight_g_idx` for actorder "group"); plus
/// `input_scale` (+ `input_zero_point` if asymmetric) for static input activations and the same for
/// outputs. With a non-empty module name the names come back prefixed ("model.layers.0.mlp.up_proj.weight_scale").
std::vector<std::string> required_keys(const std::string& module, const Scheme& scheme, const std::string& format);

/// A module of a model: its checkpoint name and the class names targets may match ({"Linear"}).
struct ModuleRef {
  std::string name;
  std::vector<std::string> class_names;
};

/// The keys that `modules` need under `config` and `keys` lacks (sorted); empty when complete.
std::vector<std::string> check_complete(const std::set<std::string>& keys, const Config& config,
                                        const std::vector<ModuleRef>& modules);

/// Packs int8-held values of num_bits (1..8; signed, in [-2^(b-1), 2^(b-1)-1]) into int32 along
/// `packed_dim` (0 or 1) of a 2-D tensor (a 3-D one is packed per leading slice), as pack_to_int32:
/// (rows, cols) -> (rows, ceil(cols*b/32)). Values out of range are refused.
at::Tensor pack_int32(const at::Tensor& values, int64_t num_bits, int64_t packed_dim = 1);
/// The inverse: int32 (rows, words) -> int8 of `shape` (the unpacked 2-D or 3-D shape).
at::Tensor unpack_int32(const at::Tensor& packed, int64_t num_bits, at::IntArrayRef shape, int64_t packed_dim = 1);

/// The shape of `weight_scale` (and of an unpacked zero point) for a weight (out, in):
/// tensor (1), channel (out, 1), group (out, ceil(in/g)), block (ceil(out/r), ceil(in/c)).
std::vector<int64_t> weight_scale_shape(const QuantArgs& args, int64_t out_features, int64_t in_features);

/// One module's checkpoint tensors by local name ("weight", "weight_scale", ...).
using ModuleTensors = std::map<std::string, at::Tensor>;

/// The dense (out, in) weight of one module in `dtype` (nullopt: the scale's dtype, as the package).
/// The arithmetic runs in the wider of the scale's dtype and `dtype`: bit-equal to compressed-tensors'
/// decompress (then cast) when `dtype` is no wider than the scale's, and to transformers loading the
/// checkpoint in a wider dtype (bf16 scales, fp32 model: q * scale exact in fp32) otherwise.
/// Checks every shape and dtype against the scheme; errors name `module` + the local key.
at::Tensor dequantize_module(const ModuleTensors& tensors, const Scheme& scheme, const std::string& format,
                             std::optional<at::ScalarType> dtype, const std::string& module = "");

/// The checkpoint tensors of one module from its dense weight (out, in) and the weight's scale (and
/// zero point for asymmetric args, in the quantized integer range), as compressed-tensors' compress:
/// q = round(clamp(w / scale + zp, qmin, qmax)) (fp8: the clamped value cast to e4m3), then stored in
/// `format` (int8 / fp8 `weight`, or `weight_packed` + `weight_shape` + packed zero point). The scale
/// (and zero point) are stored as given. Activation scales are the caller's to add.
ModuleTensors compress_module(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& zero_point,
                              const Scheme& scheme, const std::string& format, const std::string& module = "");

/// A weight's quantization parameters as llm-compressor 0.14 computes them before it compresses a module:
/// its min-max observer (observers/helpers.py flatten_for_calibration: tensor, channel, group, or block
/// with zero padding) and compressed-tensors' calculate_qparams, in the weight's own dtype (a bf16 model
/// gets bf16 scales, rounded once, as llm-compressor writes them): min <= 0 <= max forced; symmetric
/// scale = max(|min|, |max|) / (range / 2), asymmetric scale = (max - min) / range and zero point
/// round(clamp(qmin - min / scale, qmin, qmax)) (int8; an all-zero group's 0/0 gives 0); range is
/// qmax - qmin as a tensor of the weight's dtype (255 for int8, 896 for e4m3); a zero scale becomes
/// the dtype's eps. Shapes are weight_scale_shape's. `args.scale_dtype` must be null (anvil writes none).
/// With compress_module this is llm-compressor's round to nearest bit for bit (quantizing against the
/// rounded scale, the division in the weight's dtype).
struct WeightQParams {
  at::Tensor scale;       ///< weight_scale_shape(args, out, in), the weight's dtype
  at::Tensor zero_point;  ///< same shape, int8; undefined when symmetric
};
WeightQParams observe_weight(const at::Tensor& weight, const QuantArgs& args, const std::string& module = "");

/// torch.finfo(dtype).eps of a floating dtype: what compressed-tensors puts in place of a zero scale.
double scale_eps(at::ScalarType dtype);

/// The integer range [qmin, qmax] of int args (-2^(b-1), 2^(b-1)-1) or +-448 for fp8.
std::pair<double, double> quant_range(const QuantArgs& args);

}  // namespace anvil::model::ct
