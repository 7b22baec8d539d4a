// compressed-tensors format (include/anvil/model/compressed_tensors.h). The config reader mirrors the
// validators of compressed-tensors 0.19.0's pydantic models (quant_args.py validate_model_after,
// quant_scheme.py, quant_config.py model_post_init for presets) so that anvil refuses what the package
// refuses, with the key named; the tensor functions follow compressors/naive_quantized/base.py and
// compressors/pack_quantized/{base,helpers}.py operation for operation (same casts, same order), so that
// dequantized weights are bit-equal to the package's decompress. The packing loop works on uint32 words
// element by element: simpler than the package's scatter_add formulation and the same bits.
#include "anvil/model/compressed_tensors.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <regex>
#include <sstream>

namespace anvil::model::ct {

using json = nlohmann::json;

namespace {

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string upper(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

[[noreturn]] void fail(const std::string& path, const std::string& rule) { TORCH_CHECK(false, path, ": ", rule); }

std::string shown(const json& v) {
  std::string s = v.dump();
  return s.size() > 80 ? s.substr(0, 77) + "..." : s;
}

int64_t get_int(const json& v, const std::string& path) {
  if (!v.is_number_integer()) fail(path, "must be an integer, got " + shown(v));
  return v.get<int64_t>();
}

bool get_bool(const json& v, const std::string& path) {
  if (!v.is_boolean()) fail(path, "must be true or false, got " + shown(v));
  return v.get<bool>();
}

std::string get_string(const json& v, const std::string& path) {
  if (!v.is_string()) fail(path, "must be a string, got " + shown(v));
  return v.get<std::string>();
}

std::vector<std::string> get_strings(const json& v, const std::string& path) {
  if (!v.is_array()) fail(path, "must be a list of strings, got " + shown(v));
  std::vector<std::string> out;
  for (size_t i = 0; i < v.size(); ++i) out.push_back(get_string(v[i], path + "[" + std::to_string(i) + "]"));
  return out;
}

const char* kArgsKeys[] = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic",
                           "actorder", "scale_dtype", "zp_dtype", "observer", "observer_kwargs"};

std::string default_zp_dtype(const QuantArgs& a) {
  if (a.type == QuantType::kFloat) return "torch.float8_e4m3fn";  // fp8 (and fp4's e4m3 zero point)
  if (a.num_bits <= 8) return "torch.int8";
  if (a.num_bits <= 16) return "torch.int16";
  return "torch.int32";
}

QuantArgs parse_args(const json& j, const std::string& path) {
  if (!j.is_object()) fail(path, "must be an object of quantization args, got " + shown(j));
  for (const auto& [key, value] : j.items()) {
    bool known = false;
    for (const char* k : kArgsKeys) known = known || key == k;
    if (!known) {
      std::string keys;
      for (const char* k : kArgsKeys) keys += std::string(keys.empty() ? "" : ", ") + k;
      fail(path + "." + key, "unknown key (quantization args have " + keys + ")");
    }
  }
  QuantArgs a;
  auto has = [&](const char* k) { return j.contains(k) && !j.at(k).is_null(); };
  if (has("num_bits")) {
    a.num_bits = get_int(j.at("num_bits"), path + ".num_bits");
    if (a.num_bits < 1 || a.num_bits > 32) fail(path + ".num_bits", "must be in [1, 32], got " + std::to_string(a.num_bits));
  }
  if (has("type")) {
    const std::string t = lower(get_string(j.at("type"), path + ".type"));
    if (t == "int") a.type = QuantType::kInt;
    else if (t == "float") a.type = QuantType::kFloat;
    else fail(path + ".type", "must be \"int\" or \"float\", got " + shown(j.at("type")));
  }
  if (has("symmetric")) a.symmetric = get_bool(j.at("symmetric"), path + ".symmetric");
  if (has("group_size")) {
    a.group_size = get_int(j.at("group_size"), path + ".group_size");
    if (*a.group_size < -1)
      fail(path + ".group_size", "must be > 0 for strategy group or -1 for channel, got " + std::to_string(*a.group_size));
  }
  std::optional<Strategy> strategy;
  if (has("strategy")) {
    const std::string s = lower(get_string(j.at("strategy"), path + ".strategy"));
    static const std::map<std::string, Strategy> kNames = {
        {"tensor", Strategy::kTensor}, {"channel", Strategy::kChannel},          {"group", Strategy::kGroup},
        {"block", Strategy::kBlock},   {"token", Strategy::kToken},              {"tensor_group", Strategy::kTensorGroup},
        {"attn_head", Strategy::kAttnHead}};
    auto it = kNames.find(s);
    if (it == kNames.end())
      fail(path + ".strategy",
           "must be one of tensor, channel, group, block, token, tensor_group, attn_head, got " + shown(j.at("strategy")));
    strategy = it->second;
  }
  if (has("block_structure")) {
    const json& b = j.at("block_structure");
    std::vector<int64_t> dims;
    bool ok = true;
    if (b.is_string()) {  // the legacy "RxC" spelling compressed-tensors still accepts
      const std::string s = b.get<std::string>();
      const auto x = s.find('x');
      try {
        if (x == std::string::npos) throw std::invalid_argument(s);
        size_t used = 0;
        dims.push_back(std::stoll(s.substr(0, x), &used));
        ok = used == x;
        dims.push_back(std::stoll(s.substr(x + 1), &used));
        ok = ok && used == s.size() - x - 1;
      } catch (const std::exception&) {
        ok = false;
      }
    } else if (b.is_array()) {
      for (const auto& v : b) {
        if (!v.is_number_integer()) ok = false;
        else dims.push_back(v.get<int64_t>());
      }
    } else {
      ok = false;
    }
    ok = ok && dims.size() == 2 && dims[0] > 0 && dims[1] > 0;
    if (!ok) fail(path + ".block_structure", "must be a list of two positive integers [rows, cols], got " + shown(b));
    a.block_structure = dims;
  }
  if (has("dynamic")) {
    const json& d = j.at("dynamic");
    if (d.is_boolean()) a.dynamic = d.get<bool>();
    else if (d.is_string() && lower(d.get<std::string>()) == "local") a.dynamic = a.dynamic_local = true;
    else fail(path + ".dynamic", "must be true, false or \"local\", got " + shown(d));
  }
  if (has("actorder")) {
    const json& o = j.at("actorder");
    if (o.is_boolean()) {
      a.actorder = o.get<bool>() ? "group" : "";  // legacy: actorder=true meant group
    } else if (o.is_string()) {
      const std::string s = lower(o.get<std::string>());
      if (s == "weight" || s == "static") a.actorder = s;  // "static" is an alias, kept as written
      else if (s == "group" || s == "dynamic") a.actorder = "group";  // removed in 0.19; its checkpoints hold g_idx
      else fail(path + ".actorder", "must be null, \"weight\", \"static\" or the legacy \"group\", got " + shown(o));
    } else {
      fail(path + ".actorder", "must be null, a string or a boolean, got " + shown(o));
    }
  }
  if (has("scale_dtype")) a.scale_dtype = get_string(j.at("scale_dtype"), path + ".scale_dtype");
  if (has("zp_dtype")) a.zp_dtype = get_string(j.at("zp_dtype"), path + ".zp_dtype");
  if (has("observer")) a.observer = get_string(j.at("observer"), path + ".observer");
  if (has("observer_kwargs")) {
    if (!j.at("observer_kwargs").is_object()) fail(path + ".observer_kwargs", "must be an object, got " + shown(j.at("observer_kwargs")));
    a.observer_kwargs = j.at("observer_kwargs");
  }

  // quant_args.py validate_model_after: infer the strategy, then the consistency rules.
  if (!strategy) {
    if (!a.group_size) strategy = Strategy::kTensor;
    else if (*a.group_size > 0) strategy = Strategy::kGroup;
    else if (*a.group_size == -1) strategy = Strategy::kChannel;
    else fail(path + ".group_size", "must be > 0 for strategy group or -1 for channel, got " + std::to_string(*a.group_size));
  }
  a.strategy = *strategy;
  const std::string s = to_string(a.strategy);
  if (a.strategy == Strategy::kToken && !a.dynamic)
    fail(path + ".strategy", "token quantization must be dynamic (dynamic: true)");
  if ((a.strategy == Strategy::kGroup || a.strategy == Strategy::kTensorGroup) && (!a.group_size || *a.group_size <= 0))
    fail(path + ".group_size", "strategy " + s + " needs a positive group_size");
  if (a.group_size && *a.group_size > 0 && a.strategy != Strategy::kGroup && a.strategy != Strategy::kTensorGroup)
    fail(path + ".group_size", "a positive group_size needs strategy group, got strategy " + s);
  if (a.strategy == Strategy::kBlock && a.block_structure.empty())
    fail(path + ".block_structure", "strategy block needs a block_structure [rows, cols]");
  if (!a.block_structure.empty() && a.strategy != Strategy::kBlock)
    fail(path + ".block_structure", "a block_structure needs strategy block, got strategy " + s);
  if (a.dynamic && a.strategy != Strategy::kToken && a.strategy != Strategy::kTensor &&
      a.strategy != Strategy::kTensorGroup && a.strategy != Strategy::kGroup)
    fail(path + ".dynamic", "dynamic quantization needs strategy token, tensor, tensor_group or group, got " + s);
  if (a.dynamic_local && a.strategy != Strategy::kTensorGroup)
    fail(path + ".dynamic", "\"local\" needs strategy tensor_group, got " + s);
  if (a.type == QuantType::kFloat && a.num_bits != 8 && a.num_bits != 4)
    fail(path + ".num_bits", "float quantization has 4 or 8 bits, got " + std::to_string(a.num_bits));
  return a;
}

}  // namespace

Scheme parse_scheme(const json& j, const std::string& path) {
  if (!j.is_object()) fail(path, "must be a scheme object or a list of targets of a preset, got " + shown(j));
  static const std::set<std::string> kKeys = {"targets", "weights", "input_activations", "output_activations", "format"};
  for (const auto& [key, value] : j.items())
    if (!kKeys.count(key))
      fail(path + "." + key, "unknown key (a scheme has targets, weights, input_activations, output_activations, format)");
  if (!j.contains("targets")) fail(path + ".targets", "missing (the modules the scheme applies to, e.g. [\"Linear\"])");
  Scheme s;
  s.targets = get_strings(j.at("targets"), path + ".targets");
  auto args = [&](const char* key) -> std::optional<QuantArgs> {
    if (!j.contains(key) || j.at(key).is_null()) return std::nullopt;
    return parse_args(j.at(key), path + "." + key);
  };
  s.weights = args("weights");
  s.input_activations = args("input_activations");
  s.output_activations = args("output_activations");
  if (j.contains("format") && !j.at("format").is_null()) s.format = get_string(j.at("format"), path + ".format");
  if (s.format == "mixed-precision") fail(path + ".format", "mixed-precision cannot be the format of one scheme");
  if (const auto& in = s.input_activations) {
    if (in->strategy != Strategy::kToken && in->strategy != Strategy::kTensor && in->strategy != Strategy::kGroup &&
        in->strategy != Strategy::kTensorGroup && in->strategy != Strategy::kAttnHead)
      fail(path + ".input_activations.strategy", "strategy " + to_string(in->strategy) + " is not supported for activations");
    if (!in->actorder.empty()) fail(path + ".input_activations.actorder", "actorder applies to weights only");
  }
  if (s.output_activations && !s.output_activations->actorder.empty())
    fail(path + ".output_activations.actorder", "actorder applies to weights only");
  return s;
}

QuantArgs parse_quant_args(const json& j, const std::string& path) { return parse_args(j, path); }

namespace {

QuantArgs make_args(int64_t bits, QuantType type, Strategy strategy, bool symmetric, bool dynamic,
                    std::optional<int64_t> group_size = std::nullopt, std::vector<int64_t> block = {}) {
  QuantArgs a;
  a.num_bits = bits;
  a.type = type;
  a.strategy = strategy;
  a.symmetric = symmetric;
  a.dynamic = dynamic;
  a.group_size = group_size;
  a.block_structure = std::move(block);
  return a;
}

bool is_quantized_format(const std::string& f) {
  return f == "naive-quantized" || f == "int-quantized" || f == "float-quantized";
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

// ceil(a / b) for a >= 0, b > 0, without a + b - 1 (which overflows for a block_structure or group_size near 2^63).
int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }
// The int32 words of `cols` values of num_bits (1..8) packed densely: ceil(cols * num_bits / 32) without forming
// cols * num_bits (a weight_shape near 2^61 would wrap it to a few words that a tiny packed tensor matches).
int64_t packed_words(int64_t cols, int64_t num_bits) { return cols / 32 * num_bits + ceil_div(cols % 32 * num_bits, 32); }

}  // namespace

std::string to_string(QuantType type) { return type == QuantType::kInt ? "int" : "float"; }

std::string to_string(Strategy strategy) {
  switch (strategy) {
    case Strategy::kTensor: return "tensor";
    case Strategy::kChannel: return "channel";
    case Strategy::kGroup: return "group";
    case Strategy::kBlock: return "block";
    case Strategy::kToken: return "token";
    case Strategy::kTensorGroup: return "tensor_group";
    case Strategy::kAttnHead: return "attn_head";
  }
  return "?";
}

Scheme preset_scheme(const std::string& name, const std::vector<std::string>& targets) {
  const std::string n = upper(name);
  Scheme s;
  s.targets = targets;
  const auto I = QuantType::kInt, F = QuantType::kFloat;
  auto wna16 = [&](int64_t bits) { return make_args(bits, I, Strategy::kGroup, true, false, 128); };
  auto token_act = [&](int64_t bits, QuantType t) { return make_args(bits, t, Strategy::kToken, true, true); };
  static const std::regex kWnAm(R"(W([2-8])A(4|8|16))");
  std::smatch m;
  if (n == "UNQUANTIZED") {
  } else if (std::regex_match(n, m, kWnAm) && std::stoi(m[1]) <= std::stoi(m[2]) && n != "W8A8") {
    s.weights = wna16(std::stoi(m[1]));
    if (std::stoi(m[2]) < 16) s.input_activations = token_act(std::stoi(m[2]), I);
  } else if (n == "W8A8" || n == "INT8") {
    s.weights = make_args(8, I, Strategy::kChannel, true, false);
    s.input_activations = token_act(8, I);
  } else if (n == "W4A16_ASYM") {
    s.weights = make_args(4, I, Strategy::kGroup, false, false, 128);
  } else if (n == "W4AFP8") {
    s.weights = wna16(4);
    s.input_activations = token_act(8, F);
  } else if (n == "FP8") {
    s.weights = make_args(8, F, Strategy::kTensor, true, false);
    s.input_activations = make_args(8, F, Strategy::kTensor, true, false);
    s.input_activations->observer = "static_minmax";
  } else if (n == "FP8_DYNAMIC") {
    s.weights = make_args(8, F, Strategy::kChannel, true, false);
    s.input_activations = token_act(8, F);
  } else if (n == "FP8_BLOCK") {
    s.weights = make_args(8, F, Strategy::kBlock, true, false, std::nullopt, {128, 128});
    s.input_activations = make_args(8, F, Strategy::kGroup, true, true, 128);
  } else {
    TORCH_CHECK(false, "preset quantization scheme '", name,
                "' is not one anvil reads (W4A16, W8A16, WnAm, W8A8/INT8, W4A16_ASYM, W4AFP8, FP8, FP8_DYNAMIC, FP8_BLOCK)");
  }
  for (auto* a : {&s.weights, &s.input_activations})
    if (*a && !(*a)->symmetric) (*a)->zp_dtype = default_zp_dtype(**a);
  return s;
}

Config parse_quantization_config(const json& j) {
  const std::string root = "quantization_config";
  if (!j.is_object()) fail(root, "must be an object, got " + shown(j));
  Config c;
  const std::string method = j.contains("quant_method") ? get_string(j.at("quant_method"), root + ".quant_method") : kQuantMethod;
  if (method != kQuantMethod) fail(root + ".quant_method", "must be \"compressed-tensors\", got \"" + method + "\"");
  auto opt = [&](const char* k) -> const json* { return j.contains(k) && !j.at(k).is_null() ? &j.at(k) : nullptr; };
  if (!j.contains("config_groups")) fail(root + ".config_groups", "missing (the quantization schemes by group name)");
  const json& groups = j.at("config_groups");
  if (!groups.is_object()) fail(root + ".config_groups", "must be an object of schemes by name, got " + shown(groups));
  for (const auto& [name, value] : groups.items()) {
    const std::string path = root + ".config_groups." + name;
    if (value.is_array()) c.config_groups.emplace_back(name, preset_scheme(name, get_strings(value, path)));
    else c.config_groups.emplace_back(name, parse_scheme(value, path));
  }
  if (const json* f = opt("format")) c.format = get_string(*f, root + ".format");
  else c.format = "dense";
  if (const json* ig = opt("ignore")) c.ignore = get_strings(*ig, root + ".ignore");
  if (const json* st = opt("quantization_status")) {
    c.quantization_status = get_string(*st, root + ".quantization_status");
    static const std::set<std::string> kStatus = {"initialized", "calibration", "frozen", "compressed", "decompressed"};
    if (!kStatus.count(c.quantization_status))
      fail(root + ".quantization_status",
           "must be one of initialized, calibration, frozen, compressed, decompressed, got \"" + c.quantization_status + "\"");
  } else {
    c.quantization_status = "initialized";
  }
  if (const json* kv = opt("kv_cache_scheme")) c.kv_cache_scheme = parse_args(*kv, root + ".kv_cache_scheme");
  if (const json* r = opt("global_compression_ratio")) {
    if (!r->is_number()) fail(root + ".global_compression_ratio", "must be a number, got " + shown(*r));
    c.global_compression_ratio = r->get<double>();
  }
  if (const json* v = opt("version")) c.version = get_string(*v, root + ".version");
  static const std::set<std::string> kKnown = {"config_groups", "format", "ignore", "quantization_status", "kv_cache_scheme",
                                               "global_compression_ratio", "version", "quant_method"};
  for (const auto& [key, value] : j.items())
    if (!kKnown.count(key)) c.extra[key] = value;  // sparsity_config, transform_config, ...: QuantizationConfig ignores extras
  return c;
}

json to_json(const QuantArgs& a) {
  json j;
  j["num_bits"] = a.num_bits;
  j["type"] = to_string(a.type);
  j["symmetric"] = a.symmetric;
  j["group_size"] = a.group_size ? json(*a.group_size) : json(nullptr);
  j["strategy"] = to_string(a.strategy);
  j["block_structure"] = a.block_structure.empty() ? json(nullptr) : json(a.block_structure);
  j["dynamic"] = a.dynamic_local ? json("local") : json(a.dynamic);
  j["actorder"] = a.actorder.empty() ? json(nullptr) : json(a.actorder);
  j["scale_dtype"] = a.scale_dtype.empty() ? json(nullptr) : json(a.scale_dtype);
  // quant_args.py serialize_dtype: null for symmetric args, else the (defaulted) zero-point dtype.
  j["zp_dtype"] = a.symmetric ? json(nullptr) : json(a.zp_dtype.empty() ? default_zp_dtype(a) : a.zp_dtype);
  j["observer"] = a.observer.empty() ? json(nullptr) : json(a.observer);
  j["observer_kwargs"] = a.observer_kwargs;
  return j;
}

json to_json(const Scheme& s) {
  json j;
  j["targets"] = s.targets;
  j["weights"] = s.weights ? to_json(*s.weights) : json(nullptr);
  j["input_activations"] = s.input_activations ? to_json(*s.input_activations) : json(nullptr);
  j["output_activations"] = s.output_activations ? to_json(*s.output_activations) : json(nullptr);
  j["format"] = s.format.empty() ? json(nullptr) : json(s.format);
  return j;
}

json to_json(const Config& c) {
  json j = c.extra;
  if (!j.contains("sparsity_config")) j["sparsity_config"] = json::object();
  if (!j.contains("transform_config")) j["transform_config"] = json::object();
  json groups = json::object();
  for (const auto& [name, scheme] : c.config_groups) groups[name] = to_json(scheme);
  j["config_groups"] = groups;
  j["format"] = c.format;
  j["global_compression_ratio"] = c.global_compression_ratio ? json(*c.global_compression_ratio) : json(nullptr);
  j["ignore"] = c.ignore;
  j["kv_cache_scheme"] = c.kv_cache_scheme ? to_json(*c.kv_cache_scheme) : json(nullptr);
  j["quant_method"] = kQuantMethod;
  j["quantization_status"] = c.quantization_status;
  j["version"] = c.version.empty() ? std::string(kFormatVersion) : c.version;
  return j;
}

// ---- targets --------------------------------------------------------------------------------------

namespace {

bool match_name(const std::string& name, const std::string& target) {
  if (target.rfind("re:", 0) == 0) {
    std::regex re;
    try {
      re = std::regex(target.substr(3), std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      TORCH_CHECK(false, "quantization target '", target, "': not a valid regular expression (", e.what(), ")");
    }
    return std::regex_search(name, re, std::regex_constants::match_continuous);  // Python re.match: anchored at the start
  }
  return target == name;
}

bool match_class(const std::vector<std::string>& classes, const std::string& target) {
  return std::find(classes.begin(), classes.end(), target) != classes.end();
}

}  // namespace

bool matches(const std::string& module_name, const std::vector<std::string>& class_names, const std::string& target) {
  return match_name(module_name, target) || match_class(class_names, target);
}

bool matches(const std::string& module_name, const std::vector<std::string>& class_names,
             const std::vector<std::string>& targets) {
  for (const auto& t : targets)
    if (matches(module_name, class_names, t)) return true;
  return false;
}

std::optional<std::pair<std::string, const Scheme*>> scheme_for(const Config& config, const std::string& module_name,
                                                                const std::vector<std::string>& class_names) {
  if (matches(module_name, class_names, config.ignore)) return std::nullopt;
  // match_targets' order of specificity: exact name, then regex, then class name.
  for (int pass = 0; pass < 3; ++pass) {
    for (const auto& [name, scheme] : config.config_groups) {
      for (const auto& t : scheme.targets) {
        const bool regex = t.rfind("re:", 0) == 0;
        const bool hit = pass == 0   ? (!regex && t == module_name)
                         : pass == 1 ? (regex && match_name(module_name, t))
                                     : match_class(class_names, t);
        if (hit) return std::make_pair(name, &scheme);
      }
    }
  }
  return std::nullopt;
}

std::string effective_format(const Config& config, const Scheme& scheme) {
  return scheme.format.empty() ? config.format : scheme.format;
}

bool is_supported(const Scheme& scheme, const std::string& format, std::string* why) {
  auto no = [&](const std::string& reason) {
    if (why) *why = reason;
    return false;
  };
  if (format != "dense" && format != "pack-quantized" && !is_quantized_format(format))
    return no("format '" + format + "' (anvil reads dense, naive-quantized, int-quantized, float-quantized, pack-quantized)");
  if (!scheme.weights) return true;  // activation-only schemes store the weight dense
  const QuantArgs& w = *scheme.weights;
  const std::string desc = std::to_string(w.num_bits) + "-bit " + to_string(w.type) + " " + to_string(w.strategy);
  if (w.strategy != Strategy::kTensor && w.strategy != Strategy::kChannel && w.strategy != Strategy::kGroup &&
      w.strategy != Strategy::kBlock)
    return no("weights with strategy " + to_string(w.strategy) + " (anvil reads tensor, channel, group, block)");
  if (w.type == QuantType::kFloat && w.num_bits != 8) return no(desc + " weights (only 8-bit float, e4m3)");
  if (w.type == QuantType::kFloat && !w.scale_dtype.empty() && w.scale_dtype != "torch.float32" &&
      w.scale_dtype != "torch.bfloat16" && w.scale_dtype != "torch.float16")
    return no(desc + " weights with scale_dtype " + w.scale_dtype + " (MX/NV formats are not read)");
  if (w.type == QuantType::kInt && w.num_bits > 8) return no(desc + " weights (int weights of at most 8 bits)");
  if (w.type == QuantType::kFloat && !w.symmetric) return no("asymmetric float weights");
  if (format == "pack-quantized" && w.type != QuantType::kInt) return no("pack-quantized " + desc + " weights (int only)");
  if (format == "pack-quantized" && w.strategy == Strategy::kBlock) return no("pack-quantized block weights");
  if (w.actorder == "group" && w.strategy != Strategy::kGroup) return no("actorder group without strategy group");
  return true;
}

std::vector<std::string> required_keys(const std::string& module, const Scheme& scheme, const std::string& format) {
  std::vector<std::string> local;
  const bool sym = !scheme.weights || scheme.weights->symmetric;
  if (format == "dense" || !scheme.weights) {
    local.push_back("weight");
  } else if (format == "pack-quantized") {
    local = {"weight_packed", "weight_scale", "weight_shape"};
    if (!sym) local.push_back("weight_zero_point");  // packed for group/channel, as stored for tensor
    if (scheme.weights->actorder == "group") local.push_back("weight_g_idx");
  } else {
    local = {"weight", "weight_scale"};
    if (!sym) local.push_back("weight_zero_point");
  }
  if (format != "dense") {
    for (const auto& [args, base] : {std::make_pair(&scheme.input_activations, "input"),
                                     std::make_pair(&scheme.output_activations, "output")}) {
      if (!*args || (*args)->dynamic) continue;
      local.push_back(std::string(base) + "_scale");
      if (!(*args)->symmetric) local.push_back(std::string(base) + "_zero_point");
    }
  }
  if (module.empty()) return local;
  for (auto& k : local) k = module + "." + k;
  return local;
}

std::vector<std::string> check_complete(const std::set<std::string>& keys, const Config& config,
                                        const std::vector<ModuleRef>& modules) {
  std::vector<std::string> missing;
  for (const auto& m : modules) {
    auto hit = scheme_for(config, m.name, m.class_names);
    if (!hit) continue;
    for (const auto& k : required_keys(m.name, *hit->second, effective_format(config, *hit->second)))
      if (!keys.count(k)) missing.push_back(k);
  }
  std::sort(missing.begin(), missing.end());
  return missing;
}

// ---- packing --------------------------------------------------------------------------------------

at::Tensor pack_int32(const at::Tensor& values, int64_t num_bits, int64_t packed_dim) {
  TORCH_CHECK(values.scalar_type() == at::kChar, "pack_int32: values must be int8, got ", values.scalar_type());
  TORCH_CHECK(num_bits >= 1 && num_bits <= 8, "pack_int32: num_bits must be in [1, 8], got ", num_bits);
  TORCH_CHECK(packed_dim == 0 || packed_dim == 1, "pack_int32: packed_dim must be 0 or 1, got ", packed_dim);
  TORCH_CHECK(values.dim() == 2 || values.dim() == 3, "pack_int32: values must be 2-D or 3-D, got ", values.dim(), " dims");
  if (values.dim() == 3) {
    std::vector<at::Tensor> slices;
    for (int64_t i = 0; i < values.size(0); ++i) slices.push_back(pack_int32(values[i], num_bits, packed_dim));
    return at::stack(slices);
  }
  const int64_t offset = int64_t{1} << (num_bits - 1);
  if (values.numel() > 0) {
    const int64_t lo = values.min().item<int64_t>(), hi = values.max().item<int64_t>();
    TORCH_CHECK(lo >= -offset && hi < offset, "pack_int32: values must be in [", -offset, ", ", offset - 1, "] for ", num_bits,
                "-bit packing, got [", lo, ", ", hi, "]");
  }
  // (rows, cols) with the packed dimension last.
  const at::Tensor v = (packed_dim == 0 ? values.t() : values).contiguous().cpu();
  const int64_t rows = v.size(0), cols = v.size(1), words = packed_words(cols, num_bits);
  at::Tensor out = at::zeros({rows, words}, at::kInt);
  const int8_t* src = v.data_ptr<int8_t>();
  auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  for (int64_t r = 0; r < rows; ++r) {
    uint32_t* row = dst + r * words;
    for (int64_t i = 0; i < cols; ++i) {
      const auto u = static_cast<uint32_t>(src[r * cols + i] + offset);  // unsigned, in [0, 2^b)
      const int64_t bit = i * num_bits, word = bit / 32, shift = bit % 32;
      row[word] |= u << shift;
      if (shift + num_bits > 32) row[word + 1] |= u >> (32 - shift);  // the element straddles two words
    }
  }
  if (packed_dim == 0) out = out.t().contiguous();
  return out.to(values.device());
}

at::Tensor unpack_int32(const at::Tensor& packed, int64_t num_bits, at::IntArrayRef shape, int64_t packed_dim) {
  TORCH_CHECK(packed.scalar_type() == at::kInt, "unpack_int32: packed must be int32, got ", packed.scalar_type());
  TORCH_CHECK(num_bits >= 1 && num_bits <= 8, "unpack_int32: num_bits must be in [1, 8], got ", num_bits);
  TORCH_CHECK(packed_dim == 0 || packed_dim == 1, "unpack_int32: packed_dim must be 0 or 1, got ", packed_dim);
  TORCH_CHECK(packed.dim() == static_cast<int64_t>(shape.size()) && (packed.dim() == 2 || packed.dim() == 3),
              "unpack_int32: packed ", shape_str(packed.sizes()), " and shape ", shape_str(shape),
              " must both be 2-D or both 3-D");
  if (packed.dim() == 3) {
    TORCH_CHECK(packed.size(0) == shape[0], "unpack_int32: packed ", shape_str(packed.sizes()), " does not hold ",
                shape_str(shape));
    std::vector<at::Tensor> slices;
    for (int64_t i = 0; i < packed.size(0); ++i) slices.push_back(unpack_int32(packed[i], num_bits, shape.slice(1), packed_dim));
    return at::stack(slices);
  }
  const int64_t other = packed_dim == 0 ? 1 : 0;
  const int64_t cols = shape[packed_dim], rows = shape[other];
  TORCH_CHECK(cols >= 0 && rows >= 0, "unpack_int32: shape ", shape_str(shape), " must not be negative");
  const int64_t words = packed_words(cols, num_bits);
  std::vector<int64_t> expect(2);
  expect[packed_dim] = words;
  expect[other] = rows;
  TORCH_CHECK(packed.sizes() == at::IntArrayRef(expect), "unpack_int32: ", shape_str(shape), " packed at ", num_bits,
              " bits along dim ", packed_dim, " is ", shape_str(expect), " int32, got ", shape_str(packed.sizes()));
  const at::Tensor p = (packed_dim == 0 ? packed.t() : packed).contiguous().cpu();
  at::Tensor out = at::empty({rows, cols}, at::kChar);
  const auto* src = reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>());
  int8_t* dst = out.data_ptr<int8_t>();
  const uint32_t mask = (uint32_t{1} << num_bits) - 1;
  const int64_t offset = int64_t{1} << (num_bits - 1);
  for (int64_t r = 0; r < rows; ++r) {
    const uint32_t* row = src + r * words;
    for (int64_t i = 0; i < cols; ++i) {
      const int64_t bit = i * num_bits, word = bit / 32, shift = bit % 32;
      uint32_t u = row[word] >> shift;
      if (shift + num_bits > 32) u |= row[word + 1] << (32 - shift);
      dst[r * cols + i] = static_cast<int8_t>(static_cast<int64_t>(u & mask) - offset);
    }
  }
  if (packed_dim == 0) out = out.t().contiguous();
  return out.to(packed.device());
}

// ---- (de)quantization -----------------------------------------------------------------------------

std::pair<double, double> quant_range(const QuantArgs& a) {
  if (a.type == QuantType::kFloat) {
    TORCH_CHECK(a.num_bits == 8, "quant_range: float args of ", a.num_bits, " bits are not supported (8-bit e4m3 only)");
    return {-448.0, 448.0};
  }
  const double half = std::ldexp(1.0, static_cast<int>(a.num_bits) - 1);
  return {-half, half - 1};
}

std::vector<int64_t> weight_scale_shape(const QuantArgs& a, int64_t out, int64_t in) {
  switch (a.strategy) {
    case Strategy::kTensor: return {1};
    case Strategy::kChannel: return {out, 1};
    case Strategy::kGroup:
    case Strategy::kTensorGroup: return {out, ceil_div(in, *a.group_size)};
    case Strategy::kBlock: return {ceil_div(out, a.block_structure[0]), ceil_div(in, a.block_structure[1])};
    default: TORCH_CHECK(false, "weight_scale_shape: strategy ", to_string(a.strategy), " does not apply to weights");
  }
}

namespace {

const at::Tensor& need(const ModuleTensors& t, const std::string& key, const std::string& module) {
  auto it = t.find(key);
  TORCH_CHECK(it != t.end(), "compressed-tensors module '", module, "': tensor '", module.empty() ? key : module + "." + key,
              "' is missing");
  return it->second;
}

// A scale or zero point of the shape the strategy stores (a tensor-wide one may be () or (1)).
at::Tensor check_param(const at::Tensor& t, const std::vector<int64_t>& shape, const std::string& name) {
  if (shape.size() == 1 && shape[0] == 1) {
    TORCH_CHECK(t.numel() == 1, "compressed-tensors tensor '", name, "' must hold one value (per-tensor), got shape ",
                shape_str(t.sizes()));
    return t.reshape({1});
  }
  if (shape.size() == 2 && shape[1] == 1 && t.dim() == 1 && t.size(0) == shape[0]) return t.reshape({shape[0], 1});
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), "compressed-tensors tensor '", name, "' must have shape ",
              shape_str(shape), ", got ", shape_str(t.sizes()));
  return t;
}

// A per-group / per-block parameter (scale or zero point) expanded to the weight's (out, in).
at::Tensor expand_param(const at::Tensor& p, const QuantArgs& a, int64_t out, int64_t in, const at::Tensor& g_idx) {
  switch (a.strategy) {
    case Strategy::kTensor:
    case Strategy::kChannel: return p;  // (1) or (out, 1) broadcasts
    case Strategy::kGroup:
    case Strategy::kTensorGroup:
      if (g_idx.defined()) return p.index_select(1, g_idx.to(at::kLong));
      return p.repeat_interleave(*a.group_size, 1).narrow(1, 0, in);
    case Strategy::kBlock: {
      // Element (i, j) takes block (i / rows, j / cols): gathered by index, so the expansion is (out, in) whatever
      // the block size (repeat_interleave by a block of 2^40 rows first made a tensor of 2^40 rows).
      const auto opt = at::TensorOptions().dtype(at::kLong).device(p.device());
      return p.index_select(0, at::arange(out, opt).div_(a.block_structure[0], "floor"))
          .index_select(1, at::arange(in, opt).div_(a.block_structure[1], "floor"));
    }
    default: TORCH_CHECK(false, "strategy ", to_string(a.strategy), " does not apply to weights");
  }
}

std::string key_name(const std::string& module, const std::string& local) {
  return module.empty() ? local : module + "." + local;
}

void check_group_divides(const QuantArgs& w, int64_t in, const std::string& module) {
  if (w.strategy == Strategy::kGroup || w.strategy == Strategy::kTensorGroup)
    TORCH_CHECK(in % *w.group_size == 0, "compressed-tensors module '", module, "': in_features ", in,
                " is not a multiple of group_size ", *w.group_size);
}

}  // namespace

at::Tensor dequantize_module(const ModuleTensors& tensors, const Scheme& scheme, const std::string& format,
                             std::optional<at::ScalarType> dtype, const std::string& module) {
  std::string why;
  TORCH_CHECK(is_supported(scheme, format, &why), "compressed-tensors module '", module, "': unsupported scheme: ", why);
  if (format == "dense" || !scheme.weights) {
    const at::Tensor& w = need(tensors, "weight", module);
    TORCH_CHECK(at::isFloatingType(w.scalar_type()), "compressed-tensors tensor '", key_name(module, "weight"),
                "' of a dense module must be floating point, got ", w.scalar_type());
    return dtype ? w.to(*dtype) : w;
  }
  const QuantArgs& w = *scheme.weights;
  at::Tensor q, zp;
  int64_t out = 0, in = 0;
  if (format == "pack-quantized") {
    const at::Tensor& packed = need(tensors, "weight_packed", module);
    const at::Tensor& shape_t = need(tensors, "weight_shape", module);
    TORCH_CHECK(packed.scalar_type() == at::kInt && packed.dim() == 2, "compressed-tensors tensor '",
                key_name(module, "weight_packed"), "' must be 2-D int32, got ", packed.scalar_type(), " ",
                shape_str(packed.sizes()));
    TORCH_CHECK(!at::isFloatingType(shape_t.scalar_type()) && shape_t.numel() == 2, "compressed-tensors tensor '",
                key_name(module, "weight_shape"), "' must hold two integers (out, in), got ", shape_t.scalar_type(), " ",
                shape_str(shape_t.sizes()));
    const at::Tensor s = shape_t.to(at::kCPU, at::kLong).reshape({2});
    out = s[0].item<int64_t>();
    in = s[1].item<int64_t>();
    TORCH_CHECK(out > 0 && in > 0, "compressed-tensors tensor '", key_name(module, "weight_shape"), "' must be positive, got [",
                out, ", ", in, "]");
    try {
      q = unpack_int32(packed, w.num_bits, {out, in}, 1);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "compressed-tensors tensor '", key_name(module, "weight_packed"), "': ", e.what_without_backtrace());
    }
  } else {
    q = need(tensors, "weight", module);
    const at::ScalarType want = w.type == QuantType::kFloat ? at::kFloat8_e4m3fn : at::kChar;
    TORCH_CHECK(q.scalar_type() == want, "compressed-tensors tensor '", key_name(module, "weight"), "' must be ", want,
                " for ", w.num_bits, "-bit ", to_string(w.type), " weights in ", format, ", got ", q.scalar_type());
    TORCH_CHECK(q.dim() == 2, "compressed-tensors tensor '", key_name(module, "weight"), "' must be 2-D (out, in), got ",
                shape_str(q.sizes()));
    out = q.size(0);
    in = q.size(1);
    if (w.type == QuantType::kInt && w.num_bits < 8 && q.numel() > 0) {
      const auto r = quant_range(w);
      const int64_t lo = q.min().item<int64_t>(), hi = q.max().item<int64_t>();
      TORCH_CHECK(lo >= r.first && hi <= r.second, "compressed-tensors tensor '", key_name(module, "weight"), "' holds [", lo,
                  ", ", hi, "], outside the ", w.num_bits, "-bit range [", r.first, ", ", r.second, "]");
    }
  }
  check_group_divides(w, in, module);
  const auto pshape = weight_scale_shape(w, out, in);
  const at::Tensor scale = check_param(need(tensors, "weight_scale", module), pshape, key_name(module, "weight_scale"));
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()), "compressed-tensors tensor '", key_name(module, "weight_scale"),
              "' must be floating point, got ", scale.scalar_type());
  if (!w.symmetric) {
    const at::Tensor& z = need(tensors, "weight_zero_point", module);
    const std::string zname = key_name(module, "weight_zero_point");
    if (format == "pack-quantized" && (w.strategy == Strategy::kGroup || w.strategy == Strategy::kChannel)) {
      try {
        zp = unpack_int32(z, w.num_bits, pshape, 0);  // packed along the output dimension
      } catch (const c10::Error& e) {
        TORCH_CHECK(false, "compressed-tensors tensor '", zname, "': ", e.what_without_backtrace());
      }
    } else {
      zp = check_param(z, pshape, zname);
    }
  }
  at::Tensor g_idx;
  if (auto it = tensors.find("weight_g_idx"); it != tensors.end()) {
    g_idx = it->second;
    const std::string gname = key_name(module, "weight_g_idx");
    TORCH_CHECK(w.strategy == Strategy::kGroup, "compressed-tensors tensor '", gname, "' needs strategy group, got ",
                to_string(w.strategy));
    TORCH_CHECK(!at::isFloatingType(g_idx.scalar_type()) && g_idx.dim() == 1 && g_idx.size(0) == in,
                "compressed-tensors tensor '", gname, "' must be an integer (", in, ") vector, got ", g_idx.scalar_type(), " ",
                shape_str(g_idx.sizes()));
    if (in > 0) {
      const int64_t lo = g_idx.min().item<int64_t>(), hi = g_idx.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < pshape[1], "compressed-tensors tensor '", gname, "' holds groups [", lo, ", ", hi,
                  "], outside the ", pshape[1], " groups of weight_scale");
    }
  } else {
    TORCH_CHECK(w.actorder != "group", "compressed-tensors module '", module, "': tensor '",
                key_name(module, "weight_g_idx"), "' is missing (actorder group)");
  }
  // compressed-tensors' _dequantize: x_q.to(scale.dtype) - zero_point.to(scale.dtype), times scale, in
  // the scale's dtype; then the requested dtype. A wider requested dtype (bf16 scales into an fp32 model)
  // computes in that dtype, as transformers does when it loads the checkpoint in fp32 (the scale
  // parameters are created in the model dtype), so q * scale is not rounded to the scale's dtype first.
  const at::ScalarType sd = dtype ? at::promote_types(scale.scalar_type(), *dtype) : scale.scalar_type();
  at::Tensor x = q.to(scale.device(), sd);
  if (zp.defined()) x = x - expand_param(zp.to(scale.device()), w, out, in, g_idx).to(sd);
  x = x * expand_param(scale.to(sd), w, out, in, g_idx);
  return dtype ? x.to(*dtype) : x;
}

double scale_eps(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBFloat16: return 0.0078125;
    case at::kHalf: return 0.0009765625;
    case at::kDouble: return 2.220446049250313e-16;
    default: return 1.1920928955078125e-07;  // fp32
  }
}

WeightQParams observe_weight(const at::Tensor& weight, const QuantArgs& a, const std::string& module) {
  TORCH_CHECK(weight.dim() == 2 && at::isFloatingType(weight.scalar_type()), "observe_weight '", module,
              "': weight must be a 2-D floating tensor, got ", weight.scalar_type(), " ", shape_str(weight.sizes()));
  TORCH_CHECK(a.scale_dtype.empty(), "observe_weight '", module, "': scale_dtype ", a.scale_dtype,
              " is not supported (scales are computed in the weight's dtype)");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  check_group_divides(a, cols, module);
  // (G0, G1, n): the values sharing each scale along the last dimension (flatten_for_calibration's layout
  // without its leading observation dimension).
  at::Tensor v;
  switch (a.strategy) {
    case Strategy::kTensor: v = weight.reshape({1, 1, -1}); break;
    case Strategy::kChannel: v = weight.unsqueeze(1); break;
    case Strategy::kGroup: v = weight.reshape({rows, cols / *a.group_size, *a.group_size}); break;
    case Strategy::kBlock: {
      const int64_t br = a.block_structure[0], bc = a.block_structure[1];
      const int64_t pr = ceil_div(rows, br) * br, pc = ceil_div(cols, bc) * bc;  // zero padding: min/max keep 0 anyway
      const at::Tensor padded = pr == rows && pc == cols ? weight : at::constant_pad_nd(weight, {0, pc - cols, 0, pr - rows});
      v = padded.reshape({pr / br, br, pc / bc, bc}).transpose(1, 2).reshape({pr / br, pc / bc, br * bc});
      break;
    }
    default: TORCH_CHECK(false, "observe_weight '", module, "': strategy ", to_string(a.strategy), " does not apply to weights");
  }
  const at::Tensor mn = at::clamp_max(v.amin(-1), 0), mx = at::clamp_min(v.amax(-1), 0);  // (G0, G1)
  const auto [qmin, qmax] = quant_range(a);
  const at::Tensor range = at::scalar_tensor(qmax - qmin, weight.options());  // exact in bf16/fp16 for <= 8 bits
  WeightQParams out;
  at::Tensor scale;
  if (a.symmetric) {
    scale = at::maximum(mn.abs(), mx.abs()) / (range / 2);
  } else {
    TORCH_CHECK(a.type == QuantType::kInt, "observe_weight '", module, "': asymmetric float weights are not supported");
    scale = (mx - mn) / range;
    at::Tensor zp = at::clamp(at::scalar_tensor(qmin, weight.options()) - mn / scale, qmin, qmax);
    zp = at::round(at::clamp(zp, -128, 127));  // round_to_quantized_type_dtype(int8)
    out.zero_point = at::where(scale == 0, at::zeros_like(zp), zp).to(at::kChar);
  }
  const double eps = scale_eps(weight.scalar_type());
  out.scale = at::where(scale == 0, at::scalar_tensor(eps, scale.options()), scale);
  const auto shape = weight_scale_shape(a, rows, cols);
  out.scale = out.scale.reshape(shape);
  if (out.zero_point.defined()) out.zero_point = out.zero_point.reshape(shape);
  return out;
}

ModuleTensors compress_module(const at::Tensor& weight, const at::Tensor& scale_in, const at::Tensor& zero_point,
                              const Scheme& scheme, const std::string& format, const std::string& module) {
  TORCH_CHECK(weight.dim() == 2 && at::isFloatingType(weight.scalar_type()), "compress_module '", module,
              "': weight must be a 2-D floating tensor, got ", weight.scalar_type(), " ", shape_str(weight.sizes()));
  ModuleTensors out;
  if (format == "dense" || !scheme.weights) {
    out["weight"] = weight;
    return out;
  }
  std::string why;
  TORCH_CHECK(is_supported(scheme, format, &why), "compress_module '", module, "': unsupported scheme: ", why);
  const QuantArgs& w = *scheme.weights;
  const int64_t rows = weight.size(0), cols = weight.size(1);
  check_group_divides(w, cols, module);
  const auto pshape = weight_scale_shape(w, rows, cols);
  const at::Tensor scale = check_param(scale_in, pshape, key_name(module, "weight_scale"));
  at::Tensor zp;
  if (!w.symmetric) {
    TORCH_CHECK(zero_point.defined(), "compress_module '", module, "': asymmetric weights need a zero point");
    zp = check_param(zero_point, pshape, key_name(module, "weight_zero_point"));
  }
  // compressed-tensors' _quantize: x / scale (+ zero_point in x's dtype), clamp to the range, round
  // (int) or cast to e4m3 (float).
  const at::Tensor g_idx;
  at::Tensor scaled = weight / expand_param(scale, w, rows, cols, g_idx);
  if (zp.defined()) scaled = scaled + expand_param(zp, w, rows, cols, g_idx).to(weight.scalar_type());
  const auto [qmin, qmax] = quant_range(w);
  scaled = at::clamp(scaled, qmin, qmax);
  at::Tensor q = w.type == QuantType::kFloat ? scaled.to(at::kFloat8_e4m3fn) : at::round(scaled).to(at::kChar);
  out["weight_scale"] = scale_in;
  if (format == "pack-quantized") {
    out["weight_packed"] = pack_int32(q, w.num_bits, 1);
    out["weight_shape"] = at::tensor(std::vector<int64_t>{rows, cols}, at::kLong);
    if (zp.defined()) {
      if (w.strategy == Strategy::kGroup || w.strategy == Strategy::kChannel)
        out["weight_zero_point"] = pack_int32(zp.to(at::kChar), w.num_bits, 0);
      else
        out["weight_zero_point"] = zero_point;
    }
  } else {
    out["weight"] = q;
    if (zp.defined()) out["weight_zero_point"] = zero_point;
  }
  return out;
}

}  // namespace anvil::model::ct
