// Hugging Face Llama-family folder -> GGUF (include/anvil/model/gguf_export.h).
//
// Written from llama.cpp's convert_hf_to_gguf.py (Model.set_gguf_parameters, prepare_tensors; LlamaModel
// set_gguf_parameters, permute, modify_tensors, generate_extra_tensors) and gguf-py's GGUFWriter key
// types, so that a file written here and one written by the converter hold the same keys, types,
// names and bytes (the converter's outtypes f32/f16/bf16/q8_0). q4_0, q4_k_m, q5_k_m and q6_k are
// llama-quantize's ftypes: the per-tensor types are llama-quant.cpp's llama_tensor_get_type rules for the
// Llama architecture (gguf_tensor_type) and the bytes ggml's reference quantizers (io::quantize_ggml), so the
// file equals `llama-quantize model-f32.gguf out.gguf Q4_K_M` but for the tensor order (the converter's
// here; llama-quantize writes its loader's order, by layer then name, which no reader depends on).
//
// Everything is validated before the first byte is written (config keys, tensor names and shapes, the
// type), so an error names what is wrong and leaves no file; the tensors are then produced one at a
// time inside io::write_gguf's source callback.
#include "anvil/model/gguf_export.h"

#include "anvil/io/fs.h"
#include "anvil/io/safetensors.h"

#include <nlohmann/json.hpp>

#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <tuple>

namespace anvil::model {
namespace {

using anvil::io::GgufType;
using anvil::io::GgufValue;
using nlohmann::json;
namespace gt = anvil::io::ggml_type;

[[noreturn]] void fail(const std::string& what, const std::string& rule) {
  TORCH_CHECK(false, "gguf export: '", what, "': ", rule);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The ggml type of the 2-D weights for an export type (llama_ftype_get_default_type for the mixes).
uint32_t base_type(const std::string& type) {
  if (type == "f32") return gt::kF32;
  if (type == "f16") return gt::kF16;
  if (type == "bf16") return gt::kBF16;
  if (type == "q8_0") return gt::kQ8_0;
  if (type == "q4_0") return gt::kQ4_0;
  if (type == "q4_k_m") return gt::kQ4_K;
  if (type == "q5_k_m") return gt::kQ5_K;
  if (type == "q6_k") return gt::kQ6_K;
  TORCH_CHECK(false, "gguf export: type '", type, "' is not one of f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k");
}

int64_t block_of(uint32_t t) { return anvil::io::ggml_block_layout(t).first; }

// llama-quantize's use_more_bits: the first and last eighth of the layers and every third one between.
bool use_more_bits(int64_t i, int64_t n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

// tensor_type_fallback: a row that is not a whole number of the type's blocks takes the next type of 32-blocks
// (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and F16 when not even 32 divides it (llama-quantize refuses a
// Q8_0 / Q4_0 row of that kind; the converter writes F16, and so does anvil).
uint32_t fallback(uint32_t t, int64_t ncols) {
  if (ncols % block_of(t) == 0) return t;
  uint32_t r = gt::kF16;
  if (t == gt::kQ4_K) r = gt::kQ5_0;
  else if (t == gt::kQ5_K) r = gt::kQ5_1;
  else if (t == gt::kQ6_K) r = gt::kQ8_0;
  return ncols % block_of(r) == 0 ? r : gt::kF16;
}

int64_t get_int(const json& c, const std::string& key, const std::string& path) {
  if (!c.contains(key) || !c[key].is_number_integer()) fail(path, "'" + key + "' must be an integer");
  const int64_t v = c[key].get<int64_t>();
  if (v <= 0) fail(path, "'" + key + "' must be positive, got " + std::to_string(v));
  return v;
}

double get_number(const json& c, const std::string& key, const std::string& path) {
  if (!c.contains(key) || !c[key].is_number()) fail(path, "'" + key + "' must be a number");
  return c[key].get<double>();
}

GgufValue u32(int64_t v) { return anvil::io::gguf_int_value(GgufType::kUint32, v); }
GgufValue f32(double v) { return anvil::io::gguf_float_value(GgufType::kFloat32, v); }

// One tensor of the file: where its data comes from and how it is stored.
struct Planned {
  std::string name;    // llama.cpp name
  std::string hf;      // checkpoint key; "" for rope_freqs
  std::vector<int64_t> shape;
  uint32_t type = gt::kF32;
  int64_t permute_heads = 0;  // > 0: q/k rows permuted for this many heads
  std::tuple<int, int64_t, int> order;  // (section, layer, part): rope_freqs, token_embd, blocks, output_norm, output
};

const char* const kBlockParts[] = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                   "ffn_norm",  "ffn_gate", "ffn_up", "ffn_down"};

std::tuple<int, int64_t, int> order_of(const std::string& name) {
  if (name == "rope_freqs.weight") return {0, 0, 0};
  if (name == "token_embd.weight") return {1, 0, 0};
  if (name == "output_norm.weight") return {3, 0, 0};
  if (name == "output.weight") return {4, 0, 0};
  const auto dot = name.find('.', 4);
  const int64_t layer = std::stoll(name.substr(4, dot - 4));
  const std::string part = name.substr(dot + 1, name.size() - dot - 1 - 7);  // without ".weight"
  int k = 0;
  while (k < 9 && part != kBlockParts[k]) ++k;
  return {2, layer, k};
}

}  // namespace

int64_t gguf_export_file_type(const std::string& type) {
  // gguf-py constants.py LlamaFileType.
  if (type == "f32") return 0;   // ALL_F32
  if (type == "f16") return 1;   // MOSTLY_F16
  if (type == "q4_0") return 2;  // MOSTLY_Q4_0
  if (type == "q8_0") return 7;  // MOSTLY_Q8_0
  if (type == "bf16") return 32; // MOSTLY_BF16
  if (type == "q4_k_m") return 15;  // MOSTLY_Q4_K_M
  if (type == "q5_k_m") return 17;  // MOSTLY_Q5_K_M
  if (type == "q6_k") return 18;    // MOSTLY_Q6_K
  base_type(type);  // throws with the list
  return -1;
}

std::string hf_to_gguf_name(const std::string& hf) {
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  const std::string prefix = "model.layers.";
  if (hf.rfind(prefix, 0) != 0) return "";
  const auto dot = hf.find('.', prefix.size());
  if (dot == std::string::npos || dot == prefix.size()) return "";
  const std::string layer = hf.substr(prefix.size(), dot - prefix.size());
  for (char ch : layer)
    if (ch < '0' || ch > '9') return "";
  static const std::pair<const char*, const char*> kParts[] = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
  };
  const std::string part = hf.substr(dot + 1);
  for (const auto& [h, g] : kParts)
    if (part == h) return "blk." + layer + "." + g;
  return "";
}

uint32_t gguf_tensor_type(const std::string& type, const std::string& name, const std::vector<int64_t>& shape,
                          int64_t n_layer, bool has_output, bool is_70b) {
  const uint32_t base = base_type(type);
  if (shape.size() < 2 || ends_with(name, "_norm.weight") || !ends_with(name, "weight")) return gt::kF32;
  const int64_t ncols = shape.back();
  if (base == gt::kF32 || base == gt::kF16 || base == gt::kBF16)  // the converter: F16 for a row of odd length
    return ncols % block_of(base) == 0 ? base : gt::kF16;
  // llama_tensor_get_type_impl for LLM_ARCH_LLAMA, no importance matrix, no overrides.
  uint32_t t = base;
  if (name == "output.weight" || (!has_output && name == "token_embd.weight")) {
    // The output matrix (or the tied embedding that serves as it): Q8_0 when its row is not a whole number of the
    // base type's blocks, else Q6_K unless the base is Q8_0.
    if (ncols % block_of(base) != 0) t = gt::kQ8_0;
    else if (base != gt::kQ8_0) t = gt::kQ6_K;
  } else if (name.rfind("blk.", 0) == 0) {
    // i_attention_wv / i_ffn_down count tensors in the loader's order (layer, then name): the layer index here.
    const int64_t layer = std::stoll(name.substr(4, name.find('.', 4) - 4));
    const bool k_mix = type == "q4_k_m" || type == "q5_k_m";
    if (ends_with(name, ".attn_v.weight")) {
      if (k_mix && use_more_bits(layer, n_layer)) t = gt::kQ6_K;
      if (is_70b && t == gt::kQ4_K) t = gt::kQ5_K;  // 8 heads share attn_v in a 70B
    } else if (ends_with(name, ".ffn_down.weight")) {
      if (k_mix && use_more_bits(layer, n_layer)) t = gt::kQ6_K;
    }
  }
  return fallback(t, ncols);
}

at::Tensor gguf_permute_qk(const at::Tensor& w, int64_t n_head) {
  TORCH_CHECK(w.dim() == 2 && n_head > 0 && w.size(0) % (2 * n_head) == 0, "gguf export: q/k weight of shape ",
              w.sizes(), " cannot be split into ", n_head, " heads of an even head dimension");
  const int64_t rows = w.size(0), cols = w.size(1), half = rows / n_head / 2;
  // (head, 2, half) -> (head, half, 2): LlamaModel.permute's reshape + swapaxes(1, 2).
  return w.reshape({n_head, 2, half, cols}).transpose(1, 2).reshape({rows, cols}).contiguous();
}

at::Tensor gguf_llama3_rope_factors(double base, int64_t dim, double factor, double low_freq_factor,
                                    double high_freq_factor, double old_context_len) {
  TORCH_CHECK(dim > 0 && dim % 2 == 0, "gguf export: llama3 rope scaling needs an even head dimension, got ", dim);
  const double low_freq_wavelen = old_context_len / low_freq_factor;
  const double high_freq_wavelen = old_context_len / high_freq_factor;
  TORCH_CHECK(low_freq_wavelen != high_freq_wavelen, "gguf export: llama3 rope scaling with low_freq_factor == "
              "high_freq_factor");
  // The converter's torch arithmetic, op for op (python `a / t` on a tensor is t.reciprocal() * a):
  // freqs = 1.0 / (base ** (arange(0, dim, 2) / dim)); wavelen = 2 pi / freq;
  // smooth = (old_context_len / wavelen - low) / (high - low); factor' = 1 / ((1 - smooth) / factor + smooth).
  const at::Tensor exps = at::arange(0, dim, 2, at::kFloat) / static_cast<double>(dim);
  const at::Tensor freqs = at::reciprocal(at::pow(base, exps)) * 1.0;
  const at::Tensor wavelen = at::reciprocal(freqs) * (2 * M_PI);
  const at::Tensor smooth = (at::reciprocal(wavelen) * old_context_len - low_freq_factor) / (high_freq_factor - low_freq_factor);
  const at::Tensor mid = at::reciprocal(at::rsub(smooth, 1.0) / factor + smooth) * 1.0;
  const at::Tensor ones = at::ones_like(mid), factors = at::full_like(mid, factor);
  // (dim/2) fp32
  return at::where(at::lt(wavelen, high_freq_wavelen), ones, at::where(at::gt(wavelen, low_freq_wavelen), factors, mid));
}

GgufExportReport export_gguf(const std::string& model_dir, const std::string& out_path, const GgufExportOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  const uint32_t type = base_type(options.type);
  TORCH_CHECK(!out_path.empty(), "gguf export: the output path is empty");
  TORCH_CHECK(options.overwrite || !anvil::io::path_exists(out_path), "gguf export: output '", out_path,
              "' exists (pass overwrite to replace it)");
  TORCH_CHECK(!anvil::io::is_directory(out_path), "gguf export: output '", out_path, "' is a directory");
  const std::string config_path = anvil::io::join_path(model_dir, "config.json");
  TORCH_CHECK(anvil::io::is_regular_file(config_path), "gguf export: '", model_dir,
              "' holds no config.json (a Hugging Face model folder is expected)");
  json c;
  try {
    c = json::parse(anvil::io::read_text_file(config_path));
  } catch (const json::exception& e) {
    fail(config_path, std::string("not valid JSON: ") + e.what());
  }

  // ---- the architecture: what LlamaModel converts and anvil reads back --------------------------------
  const std::string arch = c.contains("architectures") && c["architectures"].is_array() && !c["architectures"].empty() &&
                                   c["architectures"][0].is_string()
                               ? c["architectures"][0].get<std::string>()
                               : "";
  if (arch != "LlamaForCausalLM" && arch != "MistralForCausalLM")
    fail(config_path, "architectures[0] is '" + arch + "'; the GGUF export writes LlamaForCausalLM and "
                      "MistralForCausalLM (llama.cpp architecture 'llama')");
  if (c.value("attention_bias", false)) fail(config_path, "'attention_bias': true is not supported by the GGUF export");
  if (c.value("mlp_bias", false)) fail(config_path, "'mlp_bias': true is not supported by the GGUF export");
  if (c.contains("num_local_experts") && !c["num_local_experts"].is_null())
    fail(config_path, "'num_local_experts' (a mixture of experts) is not supported by the GGUF export");
  if (c.value("hidden_act", std::string("silu")) != "silu")
    fail(config_path, "'hidden_act' is '" + c.value("hidden_act", std::string()) + "'; Llama's is 'silu'");

  const int64_t hidden = get_int(c, "hidden_size", config_path);
  const int64_t layers = get_int(c, "num_hidden_layers", config_path);
  const int64_t heads = get_int(c, "num_attention_heads", config_path);
  const int64_t ffn = get_int(c, "intermediate_size", config_path);
  const int64_t vocab = get_int(c, "vocab_size", config_path);
  const bool has_kv = c.contains("num_key_value_heads") && !c["num_key_value_heads"].is_null();
  const int64_t kv_heads = has_kv ? get_int(c, "num_key_value_heads", config_path) : heads;
  const bool has_head_dim = c.contains("head_dim") && !c["head_dim"].is_null();
  if (!has_head_dim && hidden % heads != 0)
    fail(config_path, "num_attention_heads does not divide hidden_size and there is no head_dim");
  const int64_t head_dim = has_head_dim ? get_int(c, "head_dim", config_path) : hidden / heads;
  if (head_dim % 2 != 0) fail(config_path, "the head dimension " + std::to_string(head_dim) + " is odd (RoPE pairs)");
  const double eps = get_number(c, "rms_norm_eps", config_path);
  const json rope_params = c.contains("rope_parameters") && c["rope_parameters"].is_object() ? c["rope_parameters"] : json();
  double rope_theta = 10000.0;
  if (c.contains("rope_theta") && c["rope_theta"].is_number()) rope_theta = c["rope_theta"].get<double>();
  else if (rope_params.contains("rope_theta") && rope_params["rope_theta"].is_number()) rope_theta = rope_params["rope_theta"].get<double>();
  json scaling = c.contains("rope_scaling") && c["rope_scaling"].is_object() ? c["rope_scaling"] : rope_params;
  std::string rope_type;
  if (scaling.is_object()) rope_type = scaling.value("rope_type", scaling.value("type", std::string()));
  if (rope_type == "default") rope_type.clear();
  if (!rope_type.empty() && rope_type != "linear" && rope_type != "llama3")
    fail(config_path, "rope scaling type '" + rope_type + "' is not supported by the GGUF export (linear, llama3)");
  const bool tied = c.value("tie_word_embeddings", false);

  // ---- the tensors --------------------------------------------------------------------------------------
  const anvil::io::Checkpoint ckpt(model_dir);
  std::vector<Planned> plan;
  uint64_t source_bytes = 0;
  if (rope_type == "llama3") {
    Planned p;
    p.name = "rope_freqs.weight";
    p.shape = {head_dim / 2};
    p.order = order_of(p.name);
    plan.push_back(p);
  }
  for (const std::string& key : ckpt.keys()) {
    if (ends_with(key, ".rotary_emb.inv_freq")) continue;  // the converter drops these
    if (key == "lm_head.weight" && tied) continue;       // tied: llama.cpp reuses token_embd
    const std::string name = hf_to_gguf_name(key);
    if (name.empty())
      fail(model_dir, "tensor '" + key + "' has no llama.cpp name (the export maps embed_tokens, norm, lm_head "
                      "and layers.N.{input_layernorm, post_attention_layernorm, self_attn.q/k/v/o_proj, mlp.gate/up/down_proj})");
    const auto& e = ckpt.entry(key);
    if (!at::isFloatingType(e.dtype) || e.dtype_name.rfind("F8", 0) == 0)
      fail(model_dir, "tensor '" + key + "' is " + e.dtype_name + "; the export reads F32, F16 and BF16 weights");
    source_bytes += e.nbytes();
    Planned p;
    p.name = name;
    p.hf = key;
    p.shape = e.shape;
    p.order = order_of(name);
    if (std::get<0>(p.order) == 2 && std::get<1>(p.order) >= layers)
      fail(model_dir, "tensor '" + key + "' belongs to a layer beyond num_hidden_layers " + std::to_string(layers));
    const bool is_q = ends_with(name, ".attn_q.weight"), is_k = ends_with(name, ".attn_k.weight");
    if (is_q || is_k) {
      p.permute_heads = is_q ? heads : kv_heads;
      const int64_t rows = p.permute_heads * head_dim;
      if (p.shape.size() != 2 || p.shape[0] != rows)
        fail(model_dir, "tensor '" + key + "' has shape " + c10::str(at::IntArrayRef(p.shape)) + ", not (" +
                            std::to_string(rows) + ", in) for " + std::to_string(p.permute_heads) + " heads of " +
                            std::to_string(head_dim));
    }
    plan.push_back(p);
  }
  const bool has_output = std::any_of(plan.begin(), plan.end(), [](const Planned& p) { return p.name == "output.weight"; });
  if (!tied && !has_output) fail(model_dir, "no lm_head.weight and tie_word_embeddings is false");
  if (std::none_of(plan.begin(), plan.end(), [](const Planned& p) { return p.name == "token_embd.weight"; }))
    fail(model_dir, "no model.embed_tokens.weight");
  std::sort(plan.begin(), plan.end(), [](const Planned& a, const Planned& b) { return a.order < b.order; });

  // Types (gguf_tensor_type): f32/f16/bf16 the converter's prepare_tensors rules (1-D and norms F32, F16 for a
  // row that is not a whole number of blocks); the quantized types llama-quantize's llama_tensor_get_type for
  // its ftype (the output matrix Q6_K, attn_v / ffn_down Q6_K on use_more_bits layers for the _M mixes, the
  // 256-block types falling back to 32-block ones on rows not a multiple of 256). LLM_TYPE_70B: 80 layers with
  // grouped KV heads.
  const bool is_70b = layers == 80 && kv_heads != heads;
  for (auto& p : plan) p.type = gguf_tensor_type(options.type, p.name, p.shape, layers, has_output, is_70b);

  // ---- metadata: Model.set_gguf_parameters + LlamaModel's, in the converter's order -----------------
  std::vector<std::pair<std::string, GgufValue>> meta;
  const std::string name = options.name.empty() ? anvil::io::file_name(anvil::io::real_path(model_dir)) : options.name;
  meta.emplace_back("general.architecture", anvil::io::gguf_string_value("llama"));
  meta.emplace_back("general.type", anvil::io::gguf_string_value("model"));
  meta.emplace_back("general.name", anvil::io::gguf_string_value(name));
  meta.emplace_back("llama.block_count", u32(layers));
  if (c.contains("max_position_embeddings") && c["max_position_embeddings"].is_number_integer())
    meta.emplace_back("llama.context_length", u32(get_int(c, "max_position_embeddings", config_path)));
  meta.emplace_back("llama.embedding_length", u32(hidden));
  meta.emplace_back("llama.feed_forward_length", u32(ffn));
  meta.emplace_back("llama.attention.head_count", u32(heads));
  if (has_kv) meta.emplace_back("llama.attention.head_count_kv", u32(kv_heads));
  meta.emplace_back("llama.rope.freq_base", f32(rope_theta));
  meta.emplace_back("llama.attention.layer_norm_rms_epsilon", f32(eps));
  if (has_head_dim) {
    meta.emplace_back("llama.attention.key_length", u32(head_dim));
    meta.emplace_back("llama.attention.value_length", u32(head_dim));
  }
  meta.emplace_back("general.file_type", u32(gguf_export_file_type(options.type)));
  meta.emplace_back("llama.vocab_size", u32(vocab));
  meta.emplace_back("llama.rope.dimension_count", u32(head_dim));
  if (rope_type == "linear") {
    meta.emplace_back("llama.rope.scaling.type", anvil::io::gguf_string_value("linear"));
    meta.emplace_back("llama.rope.scaling.factor", f32(get_number(scaling, "factor", config_path + " rope scaling")));
  }
  const auto tokenizer = options.tokenizer_metadata ? options.tokenizer_metadata(vocab)
                                                     : std::vector<std::pair<std::string, GgufValue>>{};
  for (const auto& kv : tokenizer) {
    if (kv.first.rfind("tokenizer.", 0) != 0)
      fail(out_path, "tokenizer metadata key '" + kv.first + "' does not start with 'tokenizer.'");
    meta.push_back(kv);
  }
  meta.emplace_back("general.quantization_version", u32(2));  // GGML_QUANT_VERSION

  at::Tensor rope_factors;
  if (rope_type == "llama3") {
    auto num = [&](const char* key, double dflt) {
      return scaling.contains(key) && scaling[key].is_number() ? scaling[key].get<double>() : dflt;
    };
    const double orig = c.contains("original_max_position_embeddings") && c["original_max_position_embeddings"].is_number()
                            ? c["original_max_position_embeddings"].get<double>()
                            : num("original_max_position_embeddings", 8192.0);
    rope_factors = gguf_llama3_rope_factors(rope_theta, head_dim, num("factor", 8.0), num("low_freq_factor", 1.0),
                                            num("high_freq_factor", 4.0), orig);
  }

  std::vector<anvil::io::GgufTensorSpec> specs;
  for (const auto& p : plan) specs.push_back({p.name, p.shape, p.type});

  GgufExportReport report;
  report.path = out_path;
  report.type = options.type;
  report.file_type = gguf_export_file_type(options.type);
  report.source_bytes = source_bytes;
  report.bytes = anvil::io::write_gguf(out_path, meta, specs, [&](size_t i) {
    const Planned& p = plan[i];
    if (p.hf.empty()) return anvil::io::quantize_ggml(rope_factors, p.type, p.name);
    // One tensor at a time: a zero-copy view of the mapping, converted to fp32 (as the converter does for
    // bf16; fp16 and fp32 quantize the same either way), permuted, quantized.
    at::Tensor t = ckpt.tensor(p.hf).to(at::kFloat);
    if (p.permute_heads > 0) t = gguf_permute_qk(t, p.permute_heads);
    return anvil::io::quantize_ggml(t, p.type, p.hf);
  });
  for (const auto& p : plan) {
    report.tensors_per_type[anvil::io::ggml_type_name(p.type)] += 1;
    report.tensor_types.emplace_back(p.name, anvil::io::ggml_type_name(p.type));
    int64_t n = 1;
    for (int64_t d : p.shape) n *= d;
    report.parameters += n;
  }
  report.tensors = static_cast<int64_t>(plan.size());
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

}  // namespace anvil::model
