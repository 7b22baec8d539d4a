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
#include "anvil/io/gguf.h"
#include "data/tokenizer_impl.h"

#include <nlohmann/json.hpp>

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
