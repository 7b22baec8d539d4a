// Internal base of the two tokenizer implementations: what load_tokenizer sets from the config files
// after the tokenizer file itself is read (special tokens, chat template, transformers' bos/eos rule).
#pragma once

#include "anvil/data/tokenizer.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace anvil::data::detail {

class TokenizerImpl : public Tokenizer {
 public:
  /// transformers rebuilds the post-processor as [bos] $A [eos] when tokenizer_config.json names
  /// add_bos_token or add_eos_token; -1 leaves that end empty.
  virtual void set_bos_eos_template(int32_t bos, int32_t eos) = 0;

  /// Registers a config-named special token missing from the vocabulary (transformers appends it).
  virtual int32_t add_special_token(const std::string& content) = 0;

  void set_special_ids(int32_t bos, int32_t eos, int32_t pad, int32_t unk) {
    bos_id_ = bos;
    eos_id_ = eos;
    pad_id_ = pad;
    unk_id_ = unk;
  }
  void set_special_texts(const std::string& bos, const std::string& eos) {
    bos_token_ = bos;
    eos_token_ = eos;
  }
  void set_eos_ids(std::vector<int32_t> ids) { eos_ids_ = std::move(ids); }
  void set_chat_template(const std::string& t) { chat_template_ = t; }
  void mark_special(int32_t id) { special_ids_.insert(id); }
};

/// A JSON value as a token id: an integer in [0, limit) (limit <= 2^31), checked before any narrowing, so
/// that 4294967297 is refused rather than read as 1. Null when it is not one; callers name the field.
inline std::optional<int32_t> json_token_id(const nlohmann::json& v, int64_t limit) {
  if (!v.is_number_integer()) return std::nullopt;
  const bool ok = v.is_number_unsigned() ? v.get<uint64_t>() < uint64_t(limit)
                                         : v.get<int64_t>() >= 0 && v.get<int64_t>() < limit;
  return ok ? std::optional<int32_t>(static_cast<int32_t>(v.get<int64_t>())) : std::nullopt;
}

/// tokenizer.json (parsed) to a byte-level BPE tokenizer. `path` names the file in errors.
std::unique_ptr<TokenizerImpl> make_hf_bpe(const nlohmann::json& j, const std::string& path);

/// A SentencePiece .model file; add_bos/add_eos as the config asks.
std::unique_ptr<TokenizerImpl> make_sentencepiece(const std::string& path, bool add_bos, bool add_eos);

}  // namespace anvil::data::detail
