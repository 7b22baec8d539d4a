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

#include <sys/stat.h>

#include <fstream>
#include <sstream>
#include <stdexcept>

namespace anvil::data {

using json = nlohmann::json;

namespace {

// POSIX stat rather than std::filesystem: libtorch exports its own copies of some std::filesystem
// functions, and which copy a call binds to depends on the link order of the program.
bool is_directory(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

json read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return json::parse(buffer.str());
  } catch (const json::parse_error& e) {
    throw std::runtime_error(path + ": not valid JSON: " + e.what());
  }
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// A special token entry: a string, {"content": ...} (AddedToken), or null.
std::optional<std::string> token_string(const json& config, const char* key, const std::string& file) {
  if (!config.contains(key) || config[key].is_null()) return std::nullopt;
  const json& v = config[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) return v["content"].get<std::string>();
  throw std::runtime_error(file + ": \"" + key + "\" is neither a string nor {\"content\": string}");
}

std::string chat_template_of(const json& config, const std::string& file) {
  if (!config.contains("chat_template") || config["chat_template"].is_null()) return "";
  const json& t = config["chat_template"];
  if (t.is_string()) return t.get<std::string>();
  if (t.is_array()) {  // [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
    for (const auto& entry : t) {
      if (entry.value("name", "") == "default") return entry.value("template", "");
    }
    throw std::runtime_error(file + ": chat_template is a list without a \"default\" entry");
  }
  throw std::runtime_error(file + ": chat_template is neither a string nor a list");
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
  const std::string bos = tok->bos_id() >= 0 ? tok->id_to_token(tok->bos_id()) : "";
  const std::string eos = tok->eos_id() >= 0 ? tok->id_to_token(tok->eos_id()) : "";
  tok->set_special_texts(bos, eos);
  tok->set_eos_ids(tok->eos_id() >= 0 ? std::vector<int32_t>{tok->eos_id()} : std::vector<int32_t>{});
  return tok;
}

namespace {

// A regular file that starts with GGUF's magic (as anvil::io::is_gguf_file, without pulling ATen in here).
bool is_gguf_file(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return false;
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::string(magic, 4) == "GGUF";
}

std::unique_ptr<Tokenizer> load_model_folder(const std::string& dir_name) {
  if (!is_directory(dir_name)) throw std::runtime_error(dir_name + ": not a directory (a model folder is expected)");
  const std::string dir = dir_name.back() == '/' ? dir_name : dir_name + "/";
  const std::string json_file = dir + "tokenizer.json", spm_file = dir + "tokenizer.model";
  const std::string config_file = dir + "tokenizer_config.json", map_file = dir + "special_tokens_map.json";

  json config = exists(config_file) ? read_json(config_file) : json::object();
  if (!config.is_object()) throw std::runtime_error(config_file + ": top level is not an object");
  const bool has_add_bos = config.contains("add_bos_token"), has_add_eos = config.contains("add_eos_token");
  const bool add_bos = config.value("add_bos_token", false), add_eos = config.value("add_eos_token", false);

  std::unique_ptr<detail::TokenizerImpl> tok;
  if (exists(json_file)) {
    json j = read_json(json_file);
    if (exists(spm_file) && is_sentencepiece_style(j)) {
      tok = detail::make_sentencepiece(spm_file, has_add_bos ? add_bos : true, add_eos);
    } else {
      tok = detail::make_hf_bpe(j, json_file);
    }
  } else if (exists(spm_file)) {
    // LlamaTokenizer's defaults: add_bos_token true, add_eos_token false.
    tok = detail::make_sentencepiece(spm_file, has_add_bos ? add_bos : true, add_eos);
  } else {
    throw std::runtime_error(dir_name + ": neither tokenizer.json nor tokenizer.model is present");
  }

  // Token strings: tokenizer_config.json, overridden by special_tokens_map.json.
  std::optional<std::string> bos = token_string(config, "bos_token", config_file);
  std::optional<std::string> eos = token_string(config, "eos_token", config_file);
  std::optional<std::string> pad = token_string(config, "pad_token", config_file);
  std::optional<std::string> unk = token_string(config, "unk_token", config_file);
  if (exists(map_file)) {
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
  const std::string gen_file = dir + "generation_config.json";
  if (exists(gen_file)) {
    const json gen = read_json(gen_file);
    // An id of the vocabulary, checked before narrowing (a stop id past it could never be generated).
    const auto eos_of = [&](const json& id) {
      const auto v = detail::json_token_id(id, tok->vocab_size());
      if (!v)
        throw std::runtime_error(gen_file + ": eos_token_id " + id.dump() + " is not an id of the vocabulary [0, " +
                                 std::to_string(tok->vocab_size()) + ")");
      return *v;
    };
    if (gen.contains("eos_token_id") && gen["eos_token_id"].is_number_integer()) {
      eos_ids.push_back(eos_of(gen["eos_token_id"]));
    } else if (gen.contains("eos_token_id") && gen["eos_token_id"].is_array()) {
      for (const auto& id : gen["eos_token_id"]) eos_ids.push_back(eos_of(id));
    }
  }
  if (eos_ids.empty() && eos_id >= 0) eos_ids.push_back(eos_id);
  tok->set_eos_ids(std::move(eos_ids));

  std::string chat_template = chat_template_of(config, config_file);
  if (exists(dir + "chat_template.jinja")) chat_template = read_text(dir + "chat_template.jinja");
  tok->set_chat_template(chat_template);
  return tok;
}

}  // namespace

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir_name) {
  if (is_gguf_file(dir_name)) return load_gguf_tokenizer(dir_name);  // csrc/data/gguf_tokenizer.cpp
  try {
    return load_model_folder(dir_name);
  } catch (const nlohmann::json::exception& e) {  // a config value of the wrong JSON type
    throw std::runtime_error(dir_name + ": malformed tokenizer config: " + e.what());
  }
}

}  // namespace anvil::data
