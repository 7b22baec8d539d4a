// load_tokenizer: a model folder to a Tokenizer, reading the files as transformers' AutoTokenizer reads
// them (tokenizers backend, transformers 5):
//   tokenizer.json            the pipeline, when it is a byte-level BPE anvil supports; otherwise
//   tokenizer.model           SentencePiece (the Llama-2 / Mistral files, or a fallback for a
//                             SentencePiece-style tokenizer.json)
//   tokenizer_config.json     bos/eos/pad/unk token strings (plain or {"content": ...}), add_bos_token /
//                             add_eos_token (when either key is present, transformers rebuilds the
//                             post-processor as [bos] $A [eos]), chat_template (string, or a list of
//                             {name, template} where "default" is used)
//   chat_template.jinja       the template of newer checkpoints (wins over tokenizer_config.json's)
//   special_tokens_map.json   token strings that override tokenizer_config.json's
//   generation_config.json    eos_token_id (an id or a list): the ids that end generation
// A named special token missing from the vocabulary is appended as a new special token, as
// transformers does. Every error names the file and what was wrong with it.
#include "data/tokenizer_impl.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace anvil::data {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

json read_json(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path.string() + ": cannot open");
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return json::parse(buffer.str());
  } catch (const json::parse_error& e) {
    throw std::runtime_error(path.string() + ": not valid JSON: " + e.what());
  }
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path.string() + ": cannot open");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// A special token entry: a string, {"content": ...} (AddedToken), or null.
std::optional<std::string> token_string(const json& config, const char* key, const fs::path& file) {
  if (!config.contains(key) || config[key].is_null()) return std::nullopt;
  const json& v = config[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  throw std::runtime_error(file.string() + ": \"" + key + "\" is neither a string nor {\"content\": string}");
}

std::string chat_template_of(const json& config, const fs::path& file) {
  if (!config.contains("chat_template") || config["chat_template"].is_null()) return "";
  const json& t = config["chat_template"];
  if (t.is_string()) return t.get<std::string>();
  if (t.is_array()) {  // [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    for (const auto& entry : t) {
      if (entry.value("name", "") == "default") return entry.value("template", "");
    }
    throw std::runtime_error(file.string() + ": chat_template is a list without a \"default\" entry");
  }
  throw std::runtime_error(file.string() + ": chat_template is neither a string nor a list");
}

// A SentencePiece-style tokenizer.json (byte fallback, Metaspace) that tokenizer.model can stand in for.
bool is_sentencepiece_style(const json& j) {
  const json model = j.value("model", json::object());
  if (model.value("byte_fallback", false)) return true;
  const std::string dump = j.value("pre_tokenizer", json()).dump() + j.value("decoder", json()).dump() +
                           j.value("normalizer", json()).dump();
  return dump.find("Metaspace") != std::string::npos || dump.find("\xE2\x96\x81") != std::string::npos;
}

}  // namespace

ChatFormat Tokenizer::chat_format() const {
  if (forced_chat_format_) return *forced_chat_format_;
  if (chat_template_.empty()) {
    throw std::runtime_error("the tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja); "
                             "force a built-in format by name");
  }
  return detect_chat_format(chat_template_);
}

std::string Tokenizer::render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                                   std::optional<bool> enable_thinking) const {
  ChatOptions options;
  options.add_generation_prompt = add_generation_prompt;
  options.enable_thinking = enable_thinking;
  options.bos_token = bos_token_;
  options.eos_token = eos_token_;
  return data::render_chat(chat_format(), messages, options);
}

std::unique_ptr<Tokenizer> load_hf_tokenizer_json(const std::string& path) {
  return detail::make_hf_bpe(read_json(path), path);
}

std::unique_ptr<Tokenizer> load_sentencepiece_model(const std::string& path, bool add_bos, bool add_eos) {
  auto tok = detail::make_sentencepiece(path, add_bos, add_eos);
  if (tok->bos_id() >= 0) tok->set_special_texts(tok->id_to_token(tok->bos_id()), tok->eos_id() >= 0 ? tok->id_to_token(tok->eos_id()) : "");
  tok->set_eos_ids(tok->eos_id() >= 0 ? std::vector<int32_t>{tok->eos_id()} : std::vector<int32_t>{});
  return tok;
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir_name) {
  const fs::path dir(dir_name);
  if (!fs::is_directory(dir)) throw std::runtime_error(dir_name + ": not a directory (a model folder is expected)");
  const fs::path json_file = dir / "tokenizer.json", spm_file = dir / "tokenizer.model";
  const fs::path config_file = dir / "tokenizer_config.json", map_file = dir / "special_tokens_map.json";

  json config = fs::exists(config_file) ? read_json(config_file) : json::object();
  if (!config.is_object()) throw std::runtime_error(config_file.string() + ": top level is not an object");
  const bool has_add_bos = config.contains("add_bos_token"), has_add_eos = config.contains("add_eos_token");
  const bool add_bos = config.value("add_bos_token", false), add_eos = config.value("add_eos_token", false);

  std::unique_ptr<detail::TokenizerImpl> tok;
  if (fs::exists(json_file)) {
    json j = read_json(json_file);
    if (fs::exists(spm_file) && is_sentencepiece_style(j)) {
      tok = detail::make_sentencepiece(spm_file.string(), has_add_bos ? add_bos : true, add_eos);
    } else {
      tok = detail::make_hf_bpe(j, json_file.string());
    }
  } else if (fs::exists(spm_file)) {
    // LlamaTokenizer's defaults: add_bos_token true, add_eos_token false.
    tok = detail::make_sentencepiece(spm_file.string(), has_add_bos ? add_bos : true, add_eos);
  } else {
    throw std::runtime_error(dir_name + ": neither tokenizer.json nor tokenizer.model is present");
  }

  // Token strings: tokenizer_config.json, overridden by special_tokens_map.json.
  std::optional<std::string> bos = token_string(config, "bos_token", config_file);
  std::optional<std::string> eos = token_string(config, "eos_token", config_file);
  std::optional<std::string> pad = token_string(config, "pad_token", config_file);
  std::optional<std::string> unk = token_string(config, "unk_token", config_file);
  if (fs::exists(map_file)) {
    const json map = read_json(map_file);
    const std::pair<const char*, std::optional<std::string>*> slots[] = {
        {"bos_token", &bos}, {"eos_token", &eos}, {"pad_token", &pad}, {"unk_token", &unk}};
    for (const auto& [key, slot] : slots) {
      if (const auto v = token_string(map, key, map_file)) *slot = v;
    }
  }
  const auto id_of = [&](const std::optional<std::string>& s) -> int32_t {
    return s ? tok->add_special_token(*s) : -1;
  };
  const bool spm = tok->kind() == "sentencepiece";
  const int32_t bos_id = bos ? id_of(bos) : (spm ? tok->bos_id() : -1);
  const int32_t eos_id = eos ? id_of(eos) : (spm ? tok->eos_id() : -1);
  const int32_t pad_id = pad ? id_of(pad) : (spm ? tok->pad_id() : -1);
  const int32_t unk_id = unk ? id_of(unk) : (spm ? tok->unk_id() : -1);
  for (const int32_t id : {bos_id, eos_id, pad_id, unk_id}) {
    if (id >= 0) tok->mark_special(id);
  }
  tok->set_special_ids(bos_id, eos_id, pad_id, unk_id);
  tok->set_special_texts(bos_id >= 0 ? tok->id_to_token(bos_id) : "", eos_id >= 0 ? tok->id_to_token(eos_id) : "");
  if (has_add_bos || has_add_eos || spm) {
    tok->set_bos_eos_template(add_bos || (spm && !has_add_bos) ? bos_id : -1, add_eos ? eos_id : -1);
  }

  // Generation stops at generation_config.json's eos ids where present.
  std::vector<int32_t> eos_ids;
  const fs::path gen_file = dir / "generation_config.json";
  if (fs::exists(gen_file)) {
    const json gen = read_json(gen_file);
    if (gen.contains("eos_token_id") && gen["eos_token_id"].is_number_integer()) {
      eos_ids.push_back(gen["eos_token_id"].get<int32_t>());
    } else if (gen.contains("eos_token_id") && gen["eos_token_id"].is_array()) {
      for (const auto& id : gen["eos_token_id"]) eos_ids.push_back(id.get<int32_t>());
    }
  }
  if (eos_ids.empty() && eos_id >= 0) eos_ids.push_back(eos_id);
  tok->set_eos_ids(std::move(eos_ids));

  std::string chat_template = chat_template_of(config, config_file);
  if (fs::exists(dir / "chat_template.jinja")) chat_template = read_text(dir / "chat_template.jinja");
  tok->set_chat_template(chat_template);
  return tok;
}

}  // namespace anvil::data
