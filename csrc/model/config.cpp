// config.json -> ModelConfig. The defaults of optional keys are those of transformers 5.17's
// configuration classes (configuration_<family>.py), so a config that transformers accepts means
// the same thing here; keys that fix the model's shape are required. RoPE parameters are read from
// `rope_parameters` (transformers 5.x) or `rope_scaling` + top-level `rope_theta` (4.x), the same
// precedence as transformers' convert_rope_params_to_dict.
#include "anvil/model/config.h"

#include "anvil/io/gguf.h"
#include "anvil/model/gguf_model.h"
#include "anvil/io/fs.h"
#include "anvil/model/compressed_tensors.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <stdexcept>

namespace anvil::model {
namespace {

using json = nlohmann::json;
namespace ct = anvil::model::ct;

struct Reader {
  const json& j;
  const std::string& source;

  // The key's value, or nullptr when absent or null (transformers treats both alike).
  const json* find(const std::string& key) const {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return nullptr;
    return &*it;
  }
  [[noreturn]] void fail(const std::string& what) const { throw std::runtime_error(source + ": " + what); }

  int64_t integer(const std::string& key, const json& v) const {
    if (!v.is_number_integer()) fail("key '" + key + "' must be an integer, got " + v.dump());
    return v.get<int64_t>();
  }
  int64_t req_int(const std::string& key) const {
    const json* v = find(key);
    if (!v) fail("missing required key '" + key + "'");
    return integer(key, *v);
  }
  int64_t opt_int(const std::string& key, int64_t def) const {
    const json* v = find(key);
    return v ? integer(key, *v) : def;
  }
  double opt_double(const std::string& key, double def) const {
    const json* v = find(key);
    if (!v) return def;
    if (!v->is_number()) fail("key '" + key + "' must be a number, got " + v->dump());
    return v->get<double>();
  }
  bool opt_bool(const std::string& key, bool def) const {
    const json* v = find(key);
    if (!v) return def;
    if (!v->is_boolean()) fail("key '" + key + "' must be true or false, got " + v->dump());
    return v->get<bool>();
  }
  std::string opt_string(const std::string& key, const std::string& def) const {
    const json* v = find(key);
    if (!v) return def;
    if (!v->is_string()) fail("key '" + key + "' must be a string, got " + v->dump());
    return v->get<std::string>();
  }
};

struct FamilyName {
  const char* architecture;
  const char* model_type;
  ModelFamily family;
};
constexpr FamilyName kFamilies[] = {
    {"LlamaForCausalLM", "llama", ModelFamily::kLlama},
    {"MistralForCausalLM", "mistral", ModelFamily::kMistral},
    {"Qwen2ForCausalLM", "qwen2", ModelFamily::kQwen2},
    {"Qwen3ForCausalLM", "qwen3", ModelFamily::kQwen3},
    {"MixtralForCausalLM", "mixtral", ModelFamily::kMixtral},
    {"Qwen2MoeForCausalLM", "qwen2_moe", ModelFamily::kQwen2Moe},
    {"Qwen3MoeForCausalLM", "qwen3_moe", ModelFamily::kQwen3Moe},
    {"DeepseekV2ForCausalLM", "deepseek_v2", ModelFamily::kDeepseekV2},
    {"DeepseekV3ForCausalLM", "deepseek_v3", ModelFamily::kDeepseekV3},
};

std::string supported_list() {
  std::string s;
  for (const auto& f : kFamilies) s += (s.empty() ? "" : ", ") + std::string(f.architecture);
  return s;
}

void read_family(const Reader& r, ModelConfig& c) {
  c.model_type = r.opt_string("model_type", "");
  if (const json* a = r.find("architectures")) {
    if (!a->is_array() || a->empty() || !(*a)[0].is_string())
      r.fail("key 'architectures' must be a non-empty list of strings, got " + a->dump());
    c.architecture = (*a)[0].get<std::string>();
    for (const auto& f : kFamilies)
      if (c.architecture == f.architecture) {
        c.family = f.family;
        return;
      }
    r.fail("unknown architecture '" + c.architecture + "' (supported: " + supported_list() + ")");
  }
  if (c.model_type.empty()) r.fail("missing required key 'architectures' (and no 'model_type' to fall back on)");
  for (const auto& f : kFamilies)
    if (c.model_type == f.model_type) {
      c.family = f.family;
      c.architecture = f.architecture;
      return;
    }
  r.fail("unknown model_type '" + c.model_type + "' and no 'architectures' (supported: " + supported_list() + ")");
}

bool is_deepseek(ModelFamily f) { return f == ModelFamily::kDeepseekV2 || f == ModelFamily::kDeepseekV3; }
bool is_qwen_moe(ModelFamily f) { return f == ModelFamily::kQwen2Moe || f == ModelFamily::kQwen3Moe; }

// transformers' yarn get_mscale.
double yarn_mscale(double scale, double mscale) { return scale <= 1.0 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0; }

void read_rope(const Reader& r, ModelConfig& c) {
  // 5.x: rope_parameters (with rope_theta inside); 4.x: rope_scaling (may be null) + rope_theta.
  json params = json::object();
  if (const json* p = r.find("rope_parameters")) params = *p;
  else if (const json* p2 = r.find("rope_scaling")) params = *p2;
  if (!params.is_object()) r.fail("key 'rope_parameters'/'rope_scaling' must be an object, got " + params.dump());
  const std::string ctx = r.find("rope_parameters") ? "rope_parameters" : "rope_scaling";
  Reader p{params, r.source};

  RopeConfig& rope = c.rope;
  const double default_theta = c.family == ModelFamily::kMixtral ? 1e6 : 1e4;
  rope.theta = p.opt_double("rope_theta", r.opt_double("rope_theta", default_theta));
  rope.type = p.opt_string("rope_type", p.opt_string("type", "default"));
  rope.dim = c.mla ? c.qk_rope_head_dim : c.head_dim;
  const double partial = p.opt_double("partial_rotary_factor", r.opt_double("partial_rotary_factor", 1.0));
  if (partial != 1.0) r.fail("partial_rotary_factor " + std::to_string(partial) + " is not supported (only 1.0)");

  auto need = [&](const std::string& key) {
    const json* v = p.find(key);
    if (!v || !v->is_number()) r.fail("rope type '" + rope.type + "' needs number '" + ctx + "." + key + "'");
    return v->get<double>();
  };
  rope.original_max_position_embeddings =
      p.opt_int("original_max_position_embeddings",
                r.opt_int("original_max_position_embeddings", c.max_position_embeddings));
  if (rope.type == "default") {
  } else if (rope.type == "linear") {
    rope.factor = need("factor");
  } else if (rope.type == "llama3") {
    rope.factor = need("factor");
    rope.low_freq_factor = need("low_freq_factor");
    rope.high_freq_factor = need("high_freq_factor");
  } else if (rope.type == "yarn") {
    rope.factor = p.find("factor") ? need("factor")
                                   : double(c.max_position_embeddings) / double(rope.original_max_position_embeddings);
    rope.beta_fast = p.opt_double("beta_fast", 32.0);
    rope.beta_slow = p.opt_double("beta_slow", 1.0);
    if (rope.beta_fast == 0) rope.beta_fast = 32.0;  // transformers: `get("beta_fast") or 32`
    if (rope.beta_slow == 0) rope.beta_slow = 1.0;
    rope.mscale = p.opt_double("mscale", 0.0);
    rope.mscale_all_dim = p.opt_double("mscale_all_dim", 0.0);
    rope.truncate = p.opt_bool("truncate", true);
    if (p.find("attention_factor")) rope.attention_factor = need("attention_factor");
    else if (rope.mscale != 0 && rope.mscale_all_dim != 0)
      rope.attention_factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim);
    else rope.attention_factor = yarn_mscale(rope.factor, 1.0);
  } else {
    r.fail("rope type '" + rope.type + "' is not supported (supported: default, linear, llama3, yarn)");
  }

  // DeepSeek lays the rotary dims out in pairs: V2 always (complex multiply), V3 when rope_interleave.
  if (c.family == ModelFamily::kDeepseekV2) rope.interleave = true;
  if (c.family == ModelFamily::kDeepseekV3) rope.interleave = r.opt_bool("rope_interleave", true);

  // Softmax scale; MLA multiplies it by mscale(factor, mscale_all_dim)^2 for any scaled rope type
  // (transformers' yarn_apply_mscale).
  if (c.mla) {
    double scale = 1.0 / std::sqrt(double(c.qk_nope_head_dim + c.qk_rope_head_dim));
    if (rope.type != "default") {
      const double all_dim = p.opt_double("mscale_all_dim", 0.0);
      if (all_dim != 0) {
        const double m = yarn_mscale(p.opt_double("factor", 1.0), all_dim);
        scale = scale * m * m;
      }
    }
    c.attention_scale = scale;
  } else {
    c.attention_scale = 1.0 / std::sqrt(double(c.head_dim));
  }
}

void read_sliding_window(const Reader& r, ModelConfig& c) {
  c.layer_sliding.assign(c.num_hidden_layers, false);
  int64_t window = 0;
  // Mistral's class default is 4096 when the key is absent; an explicit null means none.
  if (c.family == ModelFamily::kMistral) window = r.j.contains("sliding_window") ? r.opt_int("sliding_window", 0) : 4096;
  if (c.family == ModelFamily::kMixtral) window = r.opt_int("sliding_window", 0);
  if (c.family == ModelFamily::kMistral || c.family == ModelFamily::kMixtral) {
    if (window > 0) c.layer_sliding.assign(c.num_hidden_layers, true);
  }
  if (c.family == ModelFamily::kQwen2 || c.family == ModelFamily::kQwen3 || c.family == ModelFamily::kQwen2Moe) {
    if (r.opt_bool("use_sliding_window", false)) window = r.opt_int("sliding_window", 4096);
    if (window > 0) {
      if (const json* lt = r.find("layer_types")) {
        if (!lt->is_array() || int64_t(lt->size()) != c.num_hidden_layers)
          r.fail("key 'layer_types' must list num_hidden_layers = " + std::to_string(c.num_hidden_layers) + " entries");
        for (int64_t i = 0; i < c.num_hidden_layers; ++i) c.layer_sliding[i] = (*lt)[i] == "sliding_attention";
      } else if (c.family == ModelFamily::kQwen2Moe) {
        // Qwen2MoeConfig's own rule (5.17): the even layers below max_window_layers slide.
        const int64_t below = r.opt_int("max_window_layers", 28);
        for (int64_t i = 0; i < c.num_hidden_layers; ++i) c.layer_sliding[i] = i % 2 == 0 && i < below;
      } else {
        const int64_t first = r.opt_int("max_window_layers", 28);
        for (int64_t i = first; i < c.num_hidden_layers; ++i) c.layer_sliding[i] = true;
      }
    }
  }
  // Qwen3-MoE has no layer_types: its one mask is the sliding one on every layer when the window is on.
  if (c.family == ModelFamily::kQwen3Moe) {
    if (r.opt_bool("use_sliding_window", false)) window = r.opt_int("sliding_window", 4096);
    if (window > 0) c.layer_sliding.assign(c.num_hidden_layers, true);
  }
  if (window < 0) r.fail("key 'sliding_window' must be positive, got " + std::to_string(window));
  c.sliding_window = window;
}

// Qwen2MoeConfig / Qwen3MoeConfig (5.17) and their routers: softmax over every expert in fp32, top-k,
// renormalised only with `norm_topk_prob` (default false), router logits in the model's dtype.
void read_qwen_moe(const Reader& r, ModelConfig& c) {
  const bool q2 = c.family == ModelFamily::kQwen2Moe;
  // Qwen3MoeConfig maps num_experts to num_local_experts, which is what its save_pretrained writes;
  // published Qwen3-MoE configs say num_experts. Either is read; both must agree.
  const json* experts = r.find("num_experts");
  const json* local = q2 ? nullptr : r.find("num_local_experts");
  if (experts && local && *experts != *local)
    r.fail("keys 'num_experts' " + experts->dump() + " and 'num_local_experts' " + local->dump() + " disagree");
  c.num_experts = experts ? r.integer("num_experts", *experts)
                  : local ? r.integer("num_local_experts", *local)
                          : (q2 ? 60 : 128);
  if (c.num_experts < 0) r.fail("key 'num_experts' must be >= 0, got " + std::to_string(c.num_experts));
  c.num_experts_per_tok = r.opt_int("num_experts_per_tok", q2 ? 4 : 8);
  c.moe_intermediate_size = r.opt_int("moe_intermediate_size", q2 ? 1408 : 768);
  if (q2) c.shared_expert_intermediate_size = r.opt_int("shared_expert_intermediate_size", 5632);
  c.decoder_sparse_step = r.opt_int("decoder_sparse_step", 1);
  if (c.decoder_sparse_step < 1)
    r.fail("key 'decoder_sparse_step' must be >= 1, got " + std::to_string(c.decoder_sparse_step));
  if (const json* m = r.find("mlp_only_layers")) {
    if (!m->is_array()) r.fail("key 'mlp_only_layers' must be a list of layer indices, got " + m->dump());
    for (const auto& v : *m) {
      const int64_t i = r.integer("mlp_only_layers", v);
      if (i < 0 || i >= c.num_hidden_layers)
        r.fail("key 'mlp_only_layers' holds layer " + std::to_string(i) + ", outside [0, num_hidden_layers = " +
               std::to_string(c.num_hidden_layers) + ")");
      c.mlp_only_layers.push_back(i);
    }
  }
  c.router_score = "softmax";
  c.renormalize = r.opt_bool("norm_topk_prob", false);
  c.router_fp32 = false;
}

void read_moe(const Reader& r, ModelConfig& c) {
  if (c.family == ModelFamily::kMixtral) {
    c.num_experts = r.opt_int("num_local_experts", 8);
    c.num_experts_per_tok = r.opt_int("num_experts_per_tok", 2);
    c.moe_intermediate_size = c.intermediate_size;
    c.router_score = "softmax";
    c.renormalize = true;
    c.router_fp32 = false;
    return;
  }
  if (is_qwen_moe(c.family)) {
    read_qwen_moe(r, c);
    return;
  }
  if (!is_deepseek(c.family)) return;
  const bool v3 = c.family == ModelFamily::kDeepseekV3;
  c.num_experts = r.find("n_routed_experts") ? r.req_int("n_routed_experts") : (v3 ? 256 : 64);
  c.num_experts_per_tok = v3 ? r.opt_int("num_experts_per_tok", 8) : r.req_int("num_experts_per_tok");
  c.moe_intermediate_size = r.req_int("moe_intermediate_size");
  c.n_shared_experts = r.opt_int("n_shared_experts", v3 ? 1 : 2);
  c.first_k_dense_replace = r.opt_int("first_k_dense_replace", v3 ? 3 : 0);
  c.routed_scaling_factor = r.opt_double("routed_scaling_factor", v3 ? 2.5 : 1.0);
  c.router_fp32 = true;
  if (v3) {
    // transformers' DeepseekV3TopkRouter: sigmoid scores + e_score_correction_bias, groups ranked by
    // the sum of their two best, whatever `topk_method` says (published V3 configs say noaux_tc).
    const std::string method = r.opt_string("topk_method", "noaux_tc");
    if (method != "noaux_tc") r.fail("topk_method '" + method + "' is not supported for DeepSeek-V3 (only noaux_tc)");
    const std::string scoring = r.opt_string("scoring_func", "sigmoid");
    if (scoring != "sigmoid") r.fail("scoring_func '" + scoring + "' is not supported for DeepSeek-V3 (only sigmoid)");
    c.router_score = "sigmoid";
    c.router_bias = true;
    c.n_group = r.opt_int("n_group", 8);
    c.topk_group = r.opt_int("topk_group", 4);
    c.renormalize = r.opt_bool("norm_topk_prob", true);
  } else {
    const std::string method = r.opt_string("topk_method", "greedy");
    const std::string scoring = r.opt_string("scoring_func", "softmax");
    if (scoring != "softmax") r.fail("scoring_func '" + scoring + "' is not supported for DeepSeek-V2 (only softmax)");
    c.router_score = "softmax";
    c.renormalize = false;  // transformers 5.17's DeepseekV2TopkRouter never renormalizes
    if (method == "greedy") {
      c.n_group = 1;
      c.topk_group = 1;
    } else if (method == "group_limited_greedy") {
      c.n_group = r.req_int("n_group");
      c.topk_group = r.req_int("topk_group");
    } else {
      r.fail("topk_method '" + method + "' is not supported for DeepSeek-V2 (greedy, group_limited_greedy)");
    }
  }
}

void read_mla(const Reader& r, ModelConfig& c) {
  if (!is_deepseek(c.family)) return;
  c.mla = true;
  c.q_lora_rank = r.opt_int("q_lora_rank", 0);  // null -> a plain q_proj
  c.kv_lora_rank = r.req_int("kv_lora_rank");
  c.qk_nope_head_dim = r.req_int("qk_nope_head_dim");
  c.qk_rope_head_dim = r.req_int("qk_rope_head_dim");
  c.v_head_dim = r.req_int("v_head_dim");
  c.head_dim = c.qk_rope_head_dim;  // as transformers' DeepseekV2/V3Config set it
}

void read_tokens(const Reader& r, ModelConfig& c) {
  c.bos_token_id = r.opt_int("bos_token_id", -1);
  c.pad_token_id = r.opt_int("pad_token_id", -1);
  if (const json* e = r.find("eos_token_id")) {
    if (e->is_array()) {
      for (const auto& v : *e) c.eos_token_ids.push_back(r.integer("eos_token_id", v));
    } else {
      c.eos_token_ids.push_back(r.integer("eos_token_id", *e));
    }
  }
}

// compressed-tensors: parsed (every key checked, errors naming it) and each config group checked for a
// scheme anvil can read, so that an unsupported checkpoint fails here, naming the group and the reason.
void read_compressed_tensors(const Reader& r, const json& q) {
  ct::Config config;
  try {
    config = ct::parse_quantization_config(q);
  } catch (const c10::Error& e) {
    r.fail(e.what_without_backtrace());
  }
  if (config.kv_cache_scheme)
    r.fail("quantization_config.kv_cache_scheme: a quantized KV cache (k_scale / v_scale) is not supported");
  for (const auto& [name, scheme] : config.config_groups) {
    std::string why;
    if (!ct::is_supported(scheme, ct::effective_format(config, scheme), &why))
      r.fail("quantization_config.config_groups." + name + ": unsupported compressed-tensors scheme: " + why);
    if (scheme.output_activations)
      r.fail("quantization_config.config_groups." + name + ".output_activations: output quantization is not supported");
  }
  // Any other status (frozen, calibration, ...) is a model whose forward fake-quantizes its weights on the
  // fly in compressed-tensors; anvil would run the stored weights as they are, so it refuses instead.
  if (config.quantization_status != "compressed")
    r.fail("quantization_config.quantization_status '" + config.quantization_status +
           "' is not supported (anvil reads saved checkpoints, status compressed)");
}

void read_quantization(const Reader& r, ModelConfig& c) {
  const json* q = r.find("quantization_config");
  if (!q) return;
  Reader qr{*q, r.source};
  const std::string method = qr.opt_string("quant_method", "");
  if (method == ct::kQuantMethod) {
    read_compressed_tensors(r, *q);
    c.compressed_tensors_checkpoint = true;
    return;
  }
  if (method != "fp8")
    r.fail("quantization_config.quant_method '" + method +
           "' is not supported (fp8 (FineGrainedFP8) and compressed-tensors are)");
  if (const json* b = qr.find("weight_block_size")) {
    if (*b != json::array({128, 128}))
      r.fail("quantization_config.weight_block_size " + b->dump() + " is not supported (only [128, 128])");
  } else {
    r.fail("quantization_config with quant_method fp8 needs 'weight_block_size' [128, 128]");
  }
  const std::string fmt = qr.opt_string("fmt", "e4m3");
  if (fmt != "e4m3") r.fail("quantization_config.fmt '" + fmt + "' is not supported (only e4m3)");
  c.fp8_checkpoint = true;
}

void check_positive(const Reader& r, const char* key, int64_t v) {
  if (v <= 0) r.fail("key '" + std::string(key) + "' must be positive, got " + std::to_string(v));
}

void validate(const Reader& r, const ModelConfig& c) {
  check_positive(r, "vocab_size", c.vocab_size);
  check_positive(r, "hidden_size", c.hidden_size);
  check_positive(r, "intermediate_size", c.intermediate_size);
  check_positive(r, "num_hidden_layers", c.num_hidden_layers);
  check_positive(r, "num_attention_heads", c.num_attention_heads);
  check_positive(r, "num_key_value_heads", c.num_key_value_heads);
  check_positive(r, "head_dim", c.head_dim);
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    r.fail("num_attention_heads " + std::to_string(c.num_attention_heads) + " is not a multiple of num_key_value_heads " +
           std::to_string(c.num_key_value_heads));
  if (c.rope.dim % 2 != 0) r.fail("the rotary dimension " + std::to_string(c.rope.dim) + " must be even");
  if (c.mla) {
    check_positive(r, "kv_lora_rank", c.kv_lora_rank);
    check_positive(r, "qk_nope_head_dim", c.qk_nope_head_dim);
    check_positive(r, "qk_rope_head_dim", c.qk_rope_head_dim);
    check_positive(r, "v_head_dim", c.v_head_dim);
    if (c.q_lora_rank < 0) r.fail("key 'q_lora_rank' must be positive or null");
  }
  if (c.num_experts > 0) {
    check_positive(r, "num_experts_per_tok", c.num_experts_per_tok);
    check_positive(r, "moe_intermediate_size", c.moe_intermediate_size);
    if (c.num_experts_per_tok > c.num_experts)
      r.fail("num_experts_per_tok " + std::to_string(c.num_experts_per_tok) + " exceeds the " +
             std::to_string(c.num_experts) + " experts");
    if (c.n_group < 1 || c.num_experts % c.n_group != 0)
      r.fail("n_group " + std::to_string(c.n_group) + " must divide the " + std::to_string(c.num_experts) + " experts");
    if (c.topk_group < 1 || c.topk_group > c.n_group)
      r.fail("topk_group " + std::to_string(c.topk_group) + " must be in [1, n_group = " + std::to_string(c.n_group) + "]");
    if (c.first_k_dense_replace < 0) r.fail("key 'first_k_dense_replace' must be >= 0");
    if (c.family == ModelFamily::kQwen2Moe) check_positive(r, "shared_expert_intermediate_size", c.shared_expert_intermediate_size);
  }
  if (c.hidden_act != "silu") r.fail("hidden_act '" + c.hidden_act + "' is not supported (only silu)");
  if (c.attention_backend != "sdpa" && c.attention_backend != "eager" && c.attention_backend != "sparse")
    r.fail("anvil_attention_backend '" + c.attention_backend + "' is not supported (sdpa, eager, sparse)");
  if (c.attention_backend == "sparse") {
    const auto& sp = c.sparse;
    if (sp.window < -1) r.fail("anvil_sparse_window must be >= 0 or -1 (unlimited), got " + std::to_string(sp.window));
    if (sp.block_size < 64 || sp.block_size % 64 != 0)
      r.fail("anvil_sparse_block_size must be a multiple of 64, got " + std::to_string(sp.block_size));
    if (sp.sink_tokens < 0 || sp.top_n < 0 || sp.sink_blocks < 0 || sp.local_blocks < 0)
      r.fail("anvil_sparse_sink_tokens, _top_n, _sink_blocks and _local_blocks must be >= 0");
  }
}

}  // namespace

std::string family_architecture(ModelFamily family) {
  for (const auto& f : kFamilies)
    if (f.family == family) return f.architecture;
  return "unknown";
}

ModelConfig parse_model_config(const std::string& json_text, const std::string& source) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    throw std::runtime_error(source + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw std::runtime_error(source + ": must hold a JSON object");
  Reader r{j, source};
  ModelConfig c;
  c.json = json_text;
  read_family(r, c);

  c.vocab_size = r.req_int("vocab_size");
  c.hidden_size = r.req_int("hidden_size");
  c.intermediate_size = r.req_int("intermediate_size");
  c.num_hidden_layers = r.req_int("num_hidden_layers");
  c.num_attention_heads = r.req_int("num_attention_heads");
  const int64_t kv_default = (c.family == ModelFamily::kMistral || c.family == ModelFamily::kMixtral) ? 8
                             : c.family == ModelFamily::kDeepseekV3 ? 128
                             : (c.family == ModelFamily::kQwen2 || c.family == ModelFamily::kQwen3) ? 32
                             : c.family == ModelFamily::kQwen2Moe                                   ? 16
                             : c.family == ModelFamily::kQwen3Moe                                   ? 4
                                                                                                    : c.num_attention_heads;
  c.num_key_value_heads = r.opt_int("num_key_value_heads", kv_default);
  if (c.num_attention_heads > 0 && c.hidden_size > 0)
    c.head_dim = r.opt_int("head_dim", c.family == ModelFamily::kQwen3 ? 128 : c.hidden_size / c.num_attention_heads);
  const int64_t max_pos_default = c.family == ModelFamily::kMistral || c.family == ModelFamily::kMixtral ? 4096 * 32
                                  : c.family == ModelFamily::kQwen2 || c.family == ModelFamily::kQwen3 ||
                                          is_qwen_moe(c.family)                                          ? 32768
                                  : c.family == ModelFamily::kDeepseekV3                                 ? 4096
                                                                                                         : 2048;
  c.max_position_embeddings = r.opt_int("max_position_embeddings", max_pos_default);
  c.rms_norm_eps = r.opt_double("rms_norm_eps", c.family == ModelFamily::kMixtral ? 1e-5 : 1e-6);
  c.tie_word_embeddings = r.opt_bool("tie_word_embeddings", false);
  c.hidden_act = r.opt_string("hidden_act", "silu");
  c.dtype = r.opt_string("dtype", r.opt_string("torch_dtype", ""));
  c.attention_backend = r.opt_string("anvil_attention_backend", "sdpa");
  c.sparse.window = r.opt_int("anvil_sparse_window", c.sparse.window);
  c.sparse.sink_tokens = r.opt_int("anvil_sparse_sink_tokens", c.sparse.sink_tokens);
  c.sparse.block_size = r.opt_int("anvil_sparse_block_size", c.sparse.block_size);
  c.sparse.top_n = r.opt_int("anvil_sparse_top_n", c.sparse.top_n);
  c.sparse.sink_blocks = r.opt_int("anvil_sparse_sink_blocks", c.sparse.sink_blocks);
  c.sparse.local_blocks = r.opt_int("anvil_sparse_local_blocks", c.sparse.local_blocks);

  // Which projections carry biases, per transformers' modeling files.
  const bool attention_bias = r.opt_bool("attention_bias", false);
  switch (c.family) {
    case ModelFamily::kLlama:
    case ModelFamily::kQwen3:
    case ModelFamily::kQwen3Moe:
    case ModelFamily::kDeepseekV2:
    case ModelFamily::kDeepseekV3:
      c.attention_bias = attention_bias;
      c.qkv_bias = c.o_bias = attention_bias;
      break;
    case ModelFamily::kQwen2:
      c.qkv_bias = true;
      break;
    case ModelFamily::kQwen2Moe:
      c.qkv_bias = r.opt_bool("qkv_bias", true);  // Qwen2MoeConfig.qkv_bias; o_proj never has one
      break;
    case ModelFamily::kMistral:
    case ModelFamily::kMixtral:
      break;
  }
  if (c.family == ModelFamily::kLlama || c.family == ModelFamily::kDeepseekV2) c.mlp_bias = r.opt_bool("mlp_bias", false);
  c.qk_norm = c.family == ModelFamily::kQwen3 || c.family == ModelFamily::kQwen3Moe;

  read_mla(r, c);
  read_rope(r, c);
  read_sliding_window(r, c);
  read_moe(r, c);
  read_tokens(r, c);
  read_quantization(r, c);
  validate(r, c);
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  // POSIX paths through io's helpers: std::filesystem is unsafe in a process that loads libtorch
  // (docs/ARCHITECTURE.md, io).
  if (anvil::io::is_gguf_file(path)) return gguf_model_config(anvil::io::GgufFile(path));  // a llama.cpp model file
  const std::string file = anvil::io::is_directory(path) ? anvil::io::join_path(path, "config.json") : path;
  if (!anvil::io::is_regular_file(file))
    throw std::runtime_error(file + ": cannot open the model config (config.json): no such file");
  return parse_model_config(anvil::io::read_text_file(file, 64ull << 20), file);
}

}  // namespace anvil::model
