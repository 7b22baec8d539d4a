// The tokenizer of a GGUF file (tokenizer.ggml.* metadata), for load_tokenizer on a .gguf path.
//
// llama.cpp stores a byte-level BPE ("gpt2" tokenizer model) as its token list, merges, token types and a
// pre-tokenizer name (`tokenizer.ggml.pre`) that stands for a regex set hard-coded in llama.cpp
// (llama-vocab.cpp). Rather than a third tokenizer implementation, the metadata is rewritten as the
// tokenizer.json that the Hugging Face tokenizer of the same model holds and handed to the existing HF
// BPE tokenizer: vocab = the tokens by id, merges as stored, CONTROL tokens (type 3) as special added
// tokens, USER_DEFINED ones (type 4) as plain added tokens, the pre-tokenizer named by `pre` (the ones
// anvil knows are below; any other is an error that points to a tokenizer.json), a ByteLevel decoder.
// bos/eos/pad/unk ids, add_bos_token/add_eos_token and the chat template come from the metadata as
// tokenizer_config.json would give them. SentencePiece GGUFs ("llama" tokenizer model) are refused
// with the same pointer: their scores-only form has no tokenizer.model to hand to SentencePiece.
#include "anvil/data/gguf_vocab.h"
#include "anvil/io/fs.h"
#include "anvil/io/gguf.h"
#include "data/tokenizer_impl.h"

#include <sentencepiece_processor.h>

#include <nlohmann/json.hpp>

#include <map>
#include <stdexcept>

namespace anvil::data {
namespace {

using nlohmann::json;

constexpr int64_t kControl = 3, kUserDefined = 4;  // llama.cpp's llama_token_type

// transformers' GPT-2 ByteLevel pre-tokenizer (its regex is built in).
json byte_level(bool use_regex) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}

json split_then_bytes(const std::string& regex) {
  return {{"type", "Sequence"},
          {"pretokenizers",
           json::array({{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}},
                        byte_level(false)})}};
}

// The pre-tokenizer of a llama.cpp `tokenizer.ggml.pre` name, as the model's tokenizer.json spells it;
// null when anvil does not know the name. ignore_merges: llama.cpp's flag for that pre-tokenizer.
json pre_tokenizer(const std::string& pre, bool& ignore_merges) {
  ignore_merges = false;
  if (pre == "default" || pre == "gpt-2" || pre == "gpt2") return byte_level(true);
  if (pre == "smollm")  // llama.cpp: "\p{N}" then GPT-2's regex == Digits(individual) + ByteLevel
    return {{"type", "Sequence"},
            {"pretokenizers", json::array({{{"type", "Digits"}, {"individual_digits", true}}, byte_level(true)})}};
  if (pre == "llama-bpe" || pre == "llama3") {
    ignore_merges = true;
    return split_then_bytes(
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
        "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+");
  }
  if (pre == "qwen2")
    return split_then_bytes(
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
        "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+");
  return nullptr;
}

[[noreturn]] void fail(const std::string& path, const std::string& rule) {
  throw std::runtime_error(path + ": GGUF tokenizer: " + rule +
                           " (pass the model's tokenizer.json folder instead, e.g. --tokenizer DIR)");
}

const std::vector<std::string>& string_array(const io::GgufFile& f, const std::string& key) {
  const io::GgufValue& v = f.value(key);
  if (!v.is_array() || !v.is_string()) fail(f.path(), key + " must be an array of strings");
  return v.strings;
}

int32_t optional_id(const io::GgufFile& f, const std::string& key, int64_t n_tokens) {
  if (!f.has(key)) return -1;
  const int64_t id = f.get_int(key);
  if (id < 0 || id >= n_tokens) fail(f.path(), key + " = " + std::to_string(id) + " is not a token id");
  return static_cast<int32_t>(id);
}

}  // namespace

std::unique_ptr<Tokenizer> load_gguf_tokenizer(const std::string& path) {
  const io::GgufFile f(path);
  if (!f.has("tokenizer.ggml.model")) fail(path, "the file holds no tokenizer (no tokenizer.ggml.model)");
  const std::string model = f.get_string("tokenizer.ggml.model");
  if (model != "gpt2") fail(path, "tokenizer.ggml.model '" + model + "' is not supported (only 'gpt2', byte-level BPE)");
  const std::string pre = f.has("tokenizer.ggml.pre") ? f.get_string("tokenizer.ggml.pre") : "default";
  bool ignore_merges = false;
  json pre_tok = pre_tokenizer(pre, ignore_merges);
  if (pre_tok.is_null())
    fail(path, "tokenizer.ggml.pre '" + pre + "' is not one anvil knows (default, gpt-2, smollm, llama-bpe, qwen2)");

  const auto& tokens = string_array(f, "tokenizer.ggml.tokens");
  const int64_t n = static_cast<int64_t>(tokens.size());
  std::vector<int64_t> types;
  if (f.has("tokenizer.ggml.token_type")) {
    const io::GgufValue& v = f.value("tokenizer.ggml.token_type");
    if (!v.is_array() || !v.is_integer() || static_cast<int64_t>(v.size()) != n)
      fail(path, "tokenizer.ggml.token_type must be an integer array as long as tokenizer.ggml.tokens");
    types = v.ints;
  }
  json vocab = json::object(), added = json::array();
  for (int64_t i = 0; i < n; ++i) {
    if (vocab.contains(tokens[i])) fail(path, "token '" + tokens[i] + "' appears twice in tokenizer.ggml.tokens");
    vocab[tokens[i]] = i;
    const int64_t type = types.empty() ? 1 : types[i];
    if (type == kControl || type == kUserDefined)
      added.push_back({{"id", i}, {"content", tokens[i]}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                       {"normalized", type != kControl}, {"special", type == kControl}});
  }
  json merges = json::array();
  if (f.has("tokenizer.ggml.merges"))
    for (const auto& m : string_array(f, "tokenizer.ggml.merges")) merges.push_back(m);

  const json j = {{"version", "1.0"},
                  {"added_tokens", added},
                  {"normalizer", nullptr},
                  {"pre_tokenizer", pre_tok},
                  {"post_processor", nullptr},
                  {"decoder", byte_level(true)},
                  {"model",
                   {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"fuse_unk", false},
                    {"byte_fallback", false}, {"ignore_merges", ignore_merges}, {"vocab", vocab}, {"merges", merges}}}};
  auto tok = detail::make_hf_bpe(j, path + " (GGUF tokenizer)");

  const int32_t bos = optional_id(f, "tokenizer.ggml.bos_token_id", n);
  const int32_t eos = optional_id(f, "tokenizer.ggml.eos_token_id", n);
  const int32_t pad = optional_id(f, "tokenizer.ggml.padding_token_id", n);
  const int32_t unk = optional_id(f, "tokenizer.ggml.unknown_token_id", n);
  for (const int32_t id : {bos, eos, pad, unk})
    if (id >= 0) tok->mark_special(id);
  tok->set_special_ids(bos, eos, pad, unk);
  tok->set_special_texts(bos >= 0 ? tokens[bos] : "", eos >= 0 ? tokens[eos] : "");
  const bool add_bos = f.has("tokenizer.ggml.add_bos_token") && f.get_bool("tokenizer.ggml.add_bos_token");
  const bool add_eos = f.has("tokenizer.ggml.add_eos_token") && f.get_bool("tokenizer.ggml.add_eos_token");
  if (add_bos || add_eos) tok->set_bos_eos_template(add_bos ? bos : -1, add_eos ? eos : -1);
  tok->set_eos_ids(eos >= 0 ? std::vector<int32_t>{eos} : std::vector<int32_t>{});
  if (f.has("tokenizer.chat_template")) tok->set_chat_template(f.get_string("tokenizer.chat_template"));
  return tok;
}

}  // namespace anvil::data

// ---- the other direction: a model folder's tokenizer as GGUF metadata (anvil/data/gguf_vocab.h) ----------
namespace anvil::data {
namespace {

using io::GgufType;
constexpr int64_t kNormal = 1, kUnknown = 2, kUnused = 5, kByte = 6;

[[noreturn]] void fail_export(const std::string& file, const std::string& rule) {
  throw std::runtime_error("gguf export: '" + file + "': " + rule);
}

json read_json(const std::string& path) {
  try {
    return json::parse(io::read_text_file(path, uint64_t(1) << 30));
  } catch (const json::exception& e) {
    fail_export(path, std::string("not valid JSON: ") + e.what());
  }
}

// convert_hf_to_gguf.py's Model.does_token_look_special.
bool looks_special(const std::string& t) {
  auto starts = [&](const std::string& p) { return t.rfind(p, 0) == 0; };
  auto ends = [&](const std::string& p) { return t.size() >= p.size() && t.compare(t.size() - p.size(), p.size(), p) == 0; };
  if (t == "<pad>" || t == "<mask>" || t == "<2mass>" || t == "[@BOS@]") return true;
  if (starts("<|") && ends("|>")) return true;
  if (starts("<\xEF\xBD\x9C") && ends("\xEF\xBD\x9C>")) return true;  // <｜ ... ｜>
  return starts("<unused") && ends(">");
}

// "▁" (U+2581) -> " ", as the converter pre-normalizes user-defined tokens.
std::string spaces_for_metaspace(std::string t) {
  const std::string m = "\xE2\x96\x81";
  for (size_t at = t.find(m); at != std::string::npos; at = t.find(m, at + 1)) t.replace(at, m.size(), " ");
  return t;
}

// A pre-tokenizer reduced to what changes the ids: the kinds in order, Split regexes (Isolated, not
// inverted), ByteLevel's prefix space and regex flag, Digits' individual flag. trim_offsets only moves
// offsets and is left out.
json pre_signature(const json& p) {
  json out = json::array();
  if (p.is_null()) return out;
  const json parts = p.value("type", "") == "Sequence" ? p.value("pretokenizers", json::array()) : json::array({p});
  for (const json& q : parts) {
    const std::string type = q.value("type", "");
    if (type == "Split") {
      const json pattern = q.value("pattern", json::object());
      out.push_back({type, pattern.value("Regex", pattern.value("String", std::string("?"))),
                     q.value("behavior", ""), q.value("invert", false)});
    } else if (type == "ByteLevel") {
      out.push_back({type, q.value("add_prefix_space", true), q.value("use_regex", true)});
    } else if (type == "Digits") {
      out.push_back({type, q.value("individual_digits", false)});
    } else {
      out.push_back({type, q.dump()});
    }
  }
  return out;
}

// The llama.cpp pre-tokenizer name of a tokenizer.json, or "" when it is none anvil can name honestly.
std::string pre_name(const json& tok) {
  const json& n = tok.contains("normalizer") ? tok["normalizer"] : json();
  const bool no_normalizer = n.is_null() || (n.value("type", "") == "Sequence" && n.value("normalizers", json::array()).empty());
  const bool nfc = !n.is_null() && n.value("type", "") == "NFC";
  const json sig = pre_signature(tok.contains("pre_tokenizer") ? tok["pre_tokenizer"] : json());
  const bool tok_ignore = tok["model"].value("ignore_merges", false);
  for (const char* name : {"gpt-2", "smollm", "llama-bpe", "qwen2"}) {
    bool ignore_merges = false;
    const json cand = pre_tokenizer(name, ignore_merges);
    if (pre_signature(cand) != sig || ignore_merges != tok_ignore) continue;
    // Qwen2's tokenizer.json carries an NFC normalizer, which llama.cpp's qwen2 pre-tokenizer stands for.
    if (std::string(name) == "qwen2" ? (nfc || no_normalizer) : no_normalizer) return name;
  }
  return "";
}

// tokenizer.json's merges as the converter writes them: "a b", a space inside a part as U+0120.
std::vector<std::string> merges_of(const json& model, const std::string& path) {
  std::vector<std::string> out;
  if (!model.contains("merges")) return out;
  for (const json& m : model["merges"]) {
    if (m.is_string()) {
      out.push_back(m.get<std::string>());
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      std::string joined;
      for (int k = 0; k < 2; ++k) {
        if (k) joined += ' ';
        for (char ch : m[k].get<std::string>()) joined += ch == ' ' ? std::string("\xC4\xA0") : std::string(1, ch);
      }
      out.push_back(joined);
    } else {
      fail_export(path, "model.merges holds an entry that is neither \"a b\" nor [\"a\", \"b\"]");
    }
  }
  return out;
}

using Meta = std::vector<std::pair<std::string, io::GgufValue>>;

void sentencepiece_vocab(const std::string& dir, int64_t vocab_size, const json& tok_config, Meta& meta) {
  const std::string path = io::join_path(dir, "tokenizer.model");
  sentencepiece::SentencePieceProcessor sp;
  const auto status = sp.Load(path);
  if (!status.ok()) fail_export(path, "not a SentencePiece model: " + status.ToString());
  const int64_t n = sp.GetPieceSize();
  if (n > vocab_size)
    fail_export(path, "holds " + std::to_string(n) + " pieces, more than config.json's vocab_size " + std::to_string(vocab_size));
  std::vector<std::string> tokens(vocab_size);
  std::vector<double> scores(vocab_size, -10000.0);
  std::vector<int64_t> types(vocab_size, kUnused);
  for (int64_t i = 0; i < vocab_size; ++i) tokens[i] = "[PAD" + std::to_string(i) + "]";
  for (int id = 0; id < n; ++id) {
    tokens[id] = sp.IdToPiece(id);
    scores[id] = sp.GetScore(id);
    types[id] = sp.IsUnknown(id) ? kUnknown : sp.IsControl(id) ? kControl : sp.IsUnused(id) ? kUnused
              : sp.IsByte(id)    ? kByte    : kNormal;
  }
  if (tok_config.contains("added_tokens_decoder") && tok_config["added_tokens_decoder"].is_object()) {
    for (const auto& [key, data] : tok_config["added_tokens_decoder"].items()) {
      const int64_t id = std::stoll(key);
      if (id < 0 || id >= vocab_size || !data.contains("content") || !data["content"].is_string())
        fail_export(io::join_path(dir, "tokenizer_config.json"), "added_tokens_decoder entry '" + key + "' is not a token of the vocabulary");
      std::string t = data["content"].get<std::string>();
      if (data.value("special", false) || looks_special(t)) {
        types[id] = kControl;
      } else {
        t = spaces_for_metaspace(t);
        types[id] = kUserDefined;
      }
      scores[id] = -1000.0;
      tokens[id] = t;
    }
  }
  meta.emplace_back("tokenizer.ggml.model", io::gguf_string_value("llama"));
  meta.emplace_back("tokenizer.ggml.pre", io::gguf_string_value("default"));
  meta.emplace_back("tokenizer.ggml.tokens", io::gguf_string_array(std::move(tokens)));
  meta.emplace_back("tokenizer.ggml.scores", io::gguf_float_array(GgufType::kFloat32, std::move(scores)));
  meta.emplace_back("tokenizer.ggml.token_type", io::gguf_int_array(GgufType::kInt32, std::move(types)));
}

void bpe_vocab(const std::string& path, const json& tok, int64_t vocab_size, Meta& meta) {
  const json& model = tok["model"];
  if (model.value("type", "") != "BPE") fail_export(path, "model.type is '" + model.value("type", "") + "'; a GGUF export writes byte-level BPE (or a tokenizer.model)");
  const std::string pre = pre_name(tok);
  if (pre.empty())
    fail_export(path, "the pre-tokenizer " + (tok.contains("pre_tokenizer") ? tok["pre_tokenizer"].dump() : std::string("null")) +
                          " (with its normalizer) is none of the llama.cpp pre-tokenizers anvil can name (gpt-2, smollm, "
                          "llama-bpe, qwen2); writing another name would tokenize differently in llama.cpp");
  std::map<int64_t, std::string> by_id;
  std::map<int64_t, json> added;
  for (const auto& [t, id] : model["vocab"].items()) by_id[id.get<int64_t>()] = t;
  for (const json& a : tok.value("added_tokens", json::array())) {
    by_id[a["id"].get<int64_t>()] = a["content"].get<std::string>();
    added[a["id"].get<int64_t>()] = a;
  }
  if (!by_id.empty() && by_id.rbegin()->first >= vocab_size)
    fail_export(path, "token id " + std::to_string(by_id.rbegin()->first) + " is not below config.json's vocab_size " + std::to_string(vocab_size));
  std::vector<std::string> tokens(vocab_size);
  std::vector<int64_t> types(vocab_size);
  for (int64_t i = 0; i < vocab_size; ++i) {
    auto it = by_id.find(i);
    if (it == by_id.end()) {
      tokens[i] = "[PAD" + std::to_string(i) + "]";
      types[i] = kUnused;
    } else if (added.count(i)) {
      if (added[i].value("special", false) || looks_special(it->second)) {
        tokens[i] = it->second;
        types[i] = kControl;
      } else {
        tokens[i] = spaces_for_metaspace(it->second);
        types[i] = kUserDefined;
      }
    } else {
      tokens[i] = it->second;
      types[i] = kNormal;
    }
  }
  meta.emplace_back("tokenizer.ggml.model", io::gguf_string_value("gpt2"));
  meta.emplace_back("tokenizer.ggml.pre", io::gguf_string_value(pre));
  meta.emplace_back("tokenizer.ggml.tokens", io::gguf_string_array(std::move(tokens)));
  meta.emplace_back("tokenizer.ggml.token_type", io::gguf_int_array(GgufType::kInt32, std::move(types)));
  meta.emplace_back("tokenizer.ggml.merges", io::gguf_string_array(merges_of(model, path)));
}

}  // namespace

std::vector<std::pair<std::string, io::GgufValue>> gguf_tokenizer_metadata(const std::string& dir, int64_t vocab_size) {
  if (vocab_size <= 0) fail_export(dir, "vocab_size must be positive");
  const std::string sp_path = io::join_path(dir, "tokenizer.model"), json_path = io::join_path(dir, "tokenizer.json");
  const std::string cfg_path = io::join_path(dir, "tokenizer_config.json");
  const json tok_config = io::is_regular_file(cfg_path) ? read_json(cfg_path) : json::object();
  const json tok = io::is_regular_file(json_path) ? read_json(json_path) : json();
  Meta meta;
  if (io::is_regular_file(sp_path)) {
    sentencepiece_vocab(dir, vocab_size, tok_config, meta);
  } else if (!tok.is_null()) {
    if (!tok.contains("model") || !tok["model"].is_object()) fail_export(json_path, "has no model object");
    bpe_vocab(json_path, tok, vocab_size, meta);
  } else {
    fail_export(dir, "holds no tokenizer (tokenizer.model or tokenizer.json)");
  }

  // gguf-py SpecialVocab: ids from tokenizer_config.json's *_token (looked up among tokenizer.json's
  // added tokens), then config.json's *_token_id; the first found wins.
  static const std::pair<const char*, const char*> kSpecial[] = {
      {"bos", "bos_token_id"}, {"eos", "eos_token_id"}, {"unk", "unknown_token_id"},
      {"sep", "seperator_token_id"}, {"pad", "padding_token_id"}, {"mask", "mask_token_id"}};
  const std::string config_path = io::join_path(dir, "config.json");
  const json config = io::is_regular_file(config_path) ? read_json(config_path) : json::object();
  const json added = tok.is_null() ? json::array() : tok.value("added_tokens", json::array());
  for (const auto& [typ, key] : kSpecial) {
    int64_t id = -1;
    const std::string entry = std::string(typ) + "_token";
    if (tok_config.contains(entry)) {
      const json& e = tok_config[entry];
      const std::string content = e.is_string() ? e.get<std::string>()
                                  : (e.is_object() && e.contains("content") && e["content"].is_string()) ? e["content"].get<std::string>()
                                                                                                        : std::string();
      if (!content.empty())
        for (const json& a : added)
          if (a.value("content", "") == content) { id = a["id"].get<int64_t>(); break; }
    }
    const std::string cfg_key = std::string(typ) + "_token_id";
    if (id < 0 && config.contains(cfg_key) && config[cfg_key].is_number_integer()) id = config[cfg_key].get<int64_t>();
    if (id >= 0 && id < vocab_size)
      meta.emplace_back(std::string("tokenizer.ggml.") + key, io::gguf_int_value(GgufType::kUint32, id));
  }
  // add_bos/add_eos: tokenizer.json's TemplateProcessing (its single template starting with the bos
  // token / ending with the eos token, SpecialVocab's reading of it), overridden by tokenizer_config.json.
  std::map<std::string, bool> add;
  const json post = tok.is_null() ? json() : tok.value("post_processor", json());
  if (post.is_object()) {
    const json procs = post.value("type", "") == "Sequence" ? post.value("processors", json::array()) : json::array({post});
    auto content_of = [&](const char* typ) {
      const json e = tok_config.value(std::string(typ) + "_token", json());
      return e.is_string() ? e.get<std::string>() : e.is_object() ? e.value("content", std::string()) : std::string();
    };
    for (const json& p : procs) {
      if (p.value("type", "") != "TemplateProcessing") continue;
      const json single = p.value("single", json::array());
      if (single.size() < 2) continue;
      const std::string first = single.front().value("SpecialToken", json::object()).value("id", std::string());
      const std::string last = single.back().value("SpecialToken", json::object()).value("id", std::string());
      if (!first.empty()) add["bos"] = first == content_of("bos");
      if (!last.empty()) add["eos"] = last == content_of("eos");
    }
  }
  for (const char* typ : {"bos", "eos"}) {
    const std::string k = std::string("add_") + typ + "_token";
    if (tok_config.contains(k) && tok_config[k].is_boolean()) add[typ] = tok_config[k].get<bool>();
  }
  for (const char* typ : {"bos", "eos"})
    if (add.count(typ))
      meta.emplace_back(std::string("tokenizer.ggml.add_") + typ + "_token", io::gguf_int_value(GgufType::kBool, add[typ] ? 1 : 0));
  std::string chat;
  if (tok_config.contains("chat_template") && tok_config["chat_template"].is_string()) {
    chat = tok_config["chat_template"].get<std::string>();
  } else if (io::is_regular_file(io::join_path(dir, "chat_template.jinja"))) {
    chat = io::read_text_file(io::join_path(dir, "chat_template.jinja"));
  } else if (io::is_regular_file(io::join_path(dir, "chat_template.json"))) {
    const json c = read_json(io::join_path(dir, "chat_template.json"));
    if (c.contains("chat_template") && c["chat_template"].is_string()) chat = c["chat_template"].get<std::string>();
  }
  if (!chat.empty()) meta.emplace_back("tokenizer.chat_template", io::gguf_string_value(chat));
  return meta;
}

}  // namespace anvil::data
