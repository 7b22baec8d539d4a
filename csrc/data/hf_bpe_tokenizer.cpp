// Hugging Face tokenizer.json, byte-level BPE: the pipeline of the `tokenizers` library (Rust) re-done
// step for step, because ids must be identical, not merely similar:
//
//   1. added tokens    matched in the raw text first (leftmost-longest, as its Aho-Corasick automaton),
//                      lstrip/rstrip swallowing neighbouring whitespace; then the normalizer runs on each
//                      remaining piece and "normalized" added tokens are matched in the normalized text
//   2. normalizer      NFC / NFD / NFKC / NFKD / Prepend / Replace(string) / Sequence
//   3. pre-tokenizer   Split(regex or string, behavior, invert) / ByteLevel(add_prefix_space, use_regex) /
//                      Digits / Sequence; regexes through PCRE2 (UTF + UCP), each split searched alone
//   4. model           BPE: each word's characters become ids, then the pair of lowest merge rank is merged
//                      until none is left (a min-heap on (rank, position), the Rust crate's order);
//                      ignore_merges returns a word found whole in the vocabulary; results cached per word
//   5. post-processor  TemplateProcessing / Roberta / Bert / ByteLevel (no ids) / Sequence, only when
//                      special tokens are asked for
//   decoder            ByteLevel: each token's characters map back to bytes (a token with a character
//                      outside the byte table contributes its UTF-8 as is), then lossy UTF-8
// Anything else in the JSON (another model type, a WordPiece decoder, a Lowercase normalizer...) is
// refused at load time with an error naming the section and the type.
#include "data/tokenizer_impl.h"
#include "data/unicode_text.h"

#include <algorithm>
#include <functional>
#include <mutex>
#include <queue>
#include <stdexcept>
#include <unordered_map>

namespace anvil::data::detail {

namespace {

using json = nlohmann::json;
using unicode::Regex;

// GPT-2's pre-tokenizer pattern, used by ByteLevel(use_regex = true).
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error(path + ": " + what);
}

// The largest token id a tokenizer.json may hold. Real vocabularies stay below 2^20 (Gemma 3: 262,144);
// the bound keeps a tiny hostile file from asking for gigabytes (the id table is as long as the largest id).
constexpr int64_t kMaxTokenId = (int64_t(1) << 22) - 1;

// A token id from the file (json_token_id), or an error naming the field and the bound.
int32_t read_token_id(const json& v, const std::string& path, const std::string& what) {
  if (!v.is_number_integer()) fail(path, what + " is " + v.dump() + ", not an integer id");
  const auto id = detail::json_token_id(v, kMaxTokenId + 1);
  if (!id) fail(path, what + " = " + v.dump() + " is outside [0, " + std::to_string(kMaxTokenId) + "]");
  return *id;
}

std::string type_of(const json& j, const std::string& path, const std::string& section) {
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    fail(path, section + " has no string \"type\"");
  }
  return j["type"].get<std::string>();
}

[[noreturn]] void unsupported(const std::string& path, const std::string& section, const std::string& type,
                              const std::string& supported) {
  fail(path, "unsupported " + section + " type \"" + type + "\" (anvil supports " + supported +
                 "; a SentencePiece-style tokenizer.json can be replaced by the model's tokenizer.model)");
}

struct AddedToken {
  int32_t id = -1;
  std::string content;
  bool special = false, lstrip = false, rstrip = false, normalized = false;
};

struct NormalizerStep {
  enum Kind { kForm, kPrepend, kReplace } kind;
  std::string a, b;  // form name | prepend text | replace pattern and content
};

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum Kind { kSplit, kByteLevel } kind = kSplit;
  std::shared_ptr<Regex> regex;  // Split with a regex, Digits, ByteLevel(use_regex)
  std::string literal;           // Split with a string pattern
  Behavior behavior = Behavior::kIsolated;
  bool invert = false;
  bool add_prefix_space = false;
};

// A piece of the input: text still to tokenize (id < 0) or an added token already found.
struct Piece {
  std::string text;
  int32_t id = -1;
};

Behavior parse_behavior(const std::string& b, const std::string& path) {
  if (b == "Removed") return Behavior::kRemoved;
  if (b == "Isolated") return Behavior::kIsolated;
  if (b == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::kMergedWithNext;
  if (b == "Contiguous") return Behavior::kContiguous;
  fail(path, "pre_tokenizer Split: unknown behavior \"" + b + "\"");
}

// The (start, end, is_match) segments that cover `text` given the matches inside it.
std::vector<std::tuple<size_t, size_t, bool>> segments_of(const std::vector<std::pair<size_t, size_t>>& matches,
                                                          size_t length) {
  std::vector<std::tuple<size_t, size_t, bool>> out;
  size_t prev = 0;
  for (const auto& [s, e] : matches) {
    if (prev != s) out.emplace_back(prev, s, false);
    out.emplace_back(s, e, true);
    prev = e;
  }
  if (prev != length) out.emplace_back(prev, length, false);
  return out;
}

// SplitDelimiterBehavior of the Rust crate, applied to covering segments.
std::vector<std::pair<size_t, size_t>> apply_behavior(const std::vector<std::tuple<size_t, size_t, bool>>& segs,
                                                      Behavior behavior) {
  std::vector<std::pair<size_t, size_t>> out;
  bool previous_match = false;
  switch (behavior) {
    case Behavior::kRemoved:
      for (const auto& [s, e, m] : segs) {
        if (!m) out.emplace_back(s, e);
      }
      break;
    case Behavior::kIsolated:
      for (const auto& [s, e, m] : segs) out.emplace_back(s, e);
      break;
    case Behavior::kMergedWithPrevious:
      for (const auto& [s, e, m] : segs) {
        if (m && !previous_match && !out.empty()) {
          out.back().second = e;
        } else {
          out.emplace_back(s, e);
        }
        previous_match = m;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        const auto& [s, e, m] = *it;
        if (m && !previous_match && !out.empty()) {
          out.back().first = s;
        } else {
          out.emplace_back(s, e);
        }
        previous_match = m;
      }
      std::reverse(out.begin(), out.end());
      break;
    case Behavior::kContiguous:
      for (const auto& [s, e, m] : segs) {
        if (m == previous_match && !out.empty()) {
          out.back().second = e;
        } else {
          out.emplace_back(s, e);
        }
        previous_match = m;
      }
      break;
  }
  return out;
}

std::vector<std::pair<size_t, size_t>> find_literal(const std::string& text, const std::string& literal) {
  std::vector<std::pair<size_t, size_t>> out;
  if (literal.empty()) return out;
  for (size_t pos = text.find(literal); pos != std::string::npos; pos = text.find(literal, pos + literal.size())) {
    out.emplace_back(pos, pos + literal.size());
  }
  return out;
}

std::string replace_all(const std::string& text, const std::string& from, const std::string& to) {
  if (from.empty()) return text;
  std::string out;
  size_t prev = 0;
  for (size_t pos = text.find(from); pos != std::string::npos; pos = text.find(from, prev)) {
    out.append(text, prev, pos - prev);
    out += to;
    prev = pos + from.size();
  }
  out.append(text, prev, std::string::npos);
  return out;
}

class HfBpeTokenizer final : public TokenizerImpl {
 public:
  HfBpeTokenizer(const json& j, const std::string& path) : path_(path) {
    if (!j.is_object()) fail(path, "top level is not a JSON object");
    parse_model(j.contains("model") ? j["model"] : json(), path);
    parse_added_tokens(j.value("added_tokens", json::array()), path);
    parse_normalizer(j.value("normalizer", json()), path);
    parse_pre_tokenizer(j.value("pre_tokenizer", json()), path);
    parse_post_processor(j.value("post_processor", json()), path);
    parse_decoder(j.value("decoder", json()), path);
  }

  std::string kind() const override { return "hf-bpe"; }

  std::vector<int32_t> encode(const std::string& text, bool add_special_tokens) const override {
    unicode::check_utf8(text, "encode(text)");
    std::vector<int32_t> ids;
    for (const Piece& raw : split_added(text, /*normalized_pass=*/false)) {
      if (raw.id >= 0) {
        ids.push_back(raw.id);
        continue;
      }
      for (const Piece& piece : split_added(normalize(raw.text), /*normalized_pass=*/true)) {
        if (piece.id >= 0) {
          ids.push_back(piece.id);
          continue;
        }
        for (const std::string& word : pre_tokenize(piece.text)) append_word_ids(word, ids);
      }
    }
    return add_special_tokens ? post_process(std::move(ids)) : ids;
  }

  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override {
    std::vector<const std::string*> tokens;
    tokens.reserve(ids.size());
    for (const int32_t id : ids) {
      const std::string& token = token_of(id);
      if (skip_special_tokens && is_special(id)) continue;
      tokens.push_back(&token);
    }
    if (!byte_level_decoder_) {  // the crate joins tokens with spaces when there is no decoder
      std::string out;
      for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + *tokens[i];
      return out;
    }
    std::string bytes;
    for (const std::string* token : tokens) append_token_bytes(*token, bytes);
    return unicode::utf8_lossy(bytes);
  }

  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }

  std::optional<int32_t> token_to_id(const std::string& token) const override {
    if (const auto it = added_by_content_.find(token); it != added_by_content_.end()) return added_[it->second].id;
    if (const auto it = vocab_.find(token); it != vocab_.end()) return it->second;
    return std::nullopt;
  }

  std::string id_to_token(int32_t id) const override { return token_of(id); }

  void set_bos_eos_template(int32_t bos, int32_t eos) override {
    post_template_.clear();
    if (bos >= 0) post_template_.push_back(bos);
    post_template_.push_back(kSequenceMarker);
    if (eos >= 0) post_template_.push_back(eos);
  }

  int32_t add_special_token(const std::string& content) override {
    if (const auto id = token_to_id(content)) return *id;
    AddedToken t;
    t.id = static_cast<int32_t>(id_to_token_.size());
    t.content = content;
    t.special = true;
    register_added(t);
    return t.id;
  }

 private:
  static constexpr int32_t kSequenceMarker = -1;  // "$A" in a post-processor template

  // ---- loading -----------------------------------------------------------------------------------
  void parse_model(const json& m, const std::string& path) {
    if (!m.is_object()) fail(path, "no \"model\" object");
    const std::string type = m.contains("type") ? m["type"].get<std::string>() : std::string("BPE");
    if (type != "BPE") unsupported(path, "model", type, "BPE");
    if (m.value("byte_fallback", false)) {
      fail(path, "unsupported model option BPE.byte_fallback = true (a SentencePiece-style BPE; anvil reads "
                 "such models from their tokenizer.model)");
    }
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (m.contains(key) && !m[key].is_null() && !m[key].get<std::string>().empty()) {
        fail(path, std::string("unsupported model option BPE.") + key);
      }
    }
    if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"].get<double>() > 0.0) {
      fail(path, "unsupported model option BPE.dropout > 0 (sampling is not deterministic)");
    }
    ignore_merges_ = m.value("ignore_merges", false);
    fuse_unk_ = m.value("fuse_unk", false);
    if (!m.contains("vocab") || !m["vocab"].is_object()) fail(path, "model.vocab is not an object");
    int32_t max_id = -1;
    for (const auto& [token, id] : m["vocab"].items()) {
      const int32_t i = read_token_id(id, path, "model.vocab[\"" + token + "\"]");
      vocab_[token] = i;
      max_id = std::max(max_id, i);
    }
    id_to_token_.assign(static_cast<size_t>(max_id + 1), std::string());
    for (const auto& [token, id] : vocab_) id_to_token_[static_cast<size_t>(id)] = token;
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      const auto it = vocab_.find(m["unk_token"].get<std::string>());
      if (it == vocab_.end()) fail(path, "model.unk_token is not in model.vocab");
      model_unk_ = it->second;
    }
    parse_merges(m.value("merges", json::array()), path);
  }

  void parse_merges(const json& merges, const std::string& path) {
    if (!merges.is_array()) fail(path, "model.merges is not an array");
    int32_t rank = 0;
    for (const auto& entry : merges) {
      std::string a, b;
      if (entry.is_string()) {  // "a b", the format of older files
        const std::string s = entry.get<std::string>();
        const size_t space = s.find(' ');
        if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
          fail(path, "model.merges[" + std::to_string(rank) + "] \"" + s +
                         "\" is not two tokens separated by one space");
        }
        a = s.substr(0, space);
        b = s.substr(space + 1);
      } else if (entry.is_array() && entry.size() == 2 && entry[0].is_string() && entry[1].is_string()) {
        a = entry[0].get<std::string>();
        b = entry[1].get<std::string>();
      } else {
        fail(path, "model.merges[" + std::to_string(rank) + "] is neither \"a b\" nor [\"a\", \"b\"]");
      }
      const auto ia = vocab_.find(a), ib = vocab_.find(b), iab = vocab_.find(a + b);
      if (ia == vocab_.end() || ib == vocab_.end() || iab == vocab_.end()) {
        fail(path, "model.merges[" + std::to_string(rank) + "] (\"" + a + "\", \"" + b +
                       "\"): a token or the merged token is not in model.vocab");
      }
      merges_.emplace(pair_key(ia->second, ib->second), std::make_pair(rank, iab->second));
      ++rank;
    }
  }

  void register_added(const AddedToken& t) {
    if (static_cast<size_t>(t.id) >= id_to_token_.size()) id_to_token_.resize(static_cast<size_t>(t.id) + 1);
    id_to_token_[static_cast<size_t>(t.id)] = t.content;
    added_by_content_[t.content] = added_.size();
    added_.push_back(t);
    if (t.special) mark_special(t.id);
    auto& by_byte = (t.normalized ? normalized_index_ : raw_index_)[static_cast<unsigned char>(t.content[0])];
    by_byte.push_back(added_.size() - 1);
    // Longest first, so the first hit at a position is the longest (Aho-Corasick leftmost-longest).
    std::stable_sort(by_byte.begin(), by_byte.end(),
                     [&](size_t x, size_t y) { return added_[x].content.size() > added_[y].content.size(); });
  }

  void parse_added_tokens(const json& list, const std::string& path) {
    if (!list.is_array()) fail(path, "added_tokens is not an array");
    for (size_t i = 0; i < list.size(); ++i) {
      const json& e = list[i];
      AddedToken t;
      if (!e.is_object() || !e.contains("id") || !e.contains("content") || !e["content"].is_string())
        fail(path, "added_tokens[" + std::to_string(i) + "] is not an object with an integer \"id\" and a string \"content\"");
      t.id = read_token_id(e["id"], path, "added_tokens[" + std::to_string(i) + "].id");
      t.content = e["content"].get<std::string>();
      t.special = e.value("special", false);
      t.lstrip = e.value("lstrip", false);
      t.rstrip = e.value("rstrip", false);
      t.normalized = e.value("normalized", !t.special);
      if (t.content.empty()) fail(path, "added_tokens[" + std::to_string(i) + "] has empty content");
      if (e.value("single_word", false)) {
        fail(path, "added_tokens[" + std::to_string(i) + "] \"" + t.content +
                       "\": single_word = true is not supported");
      }
      unicode::check_utf8(t.content, (path + ": added_tokens content").c_str());
      register_added(t);
    }
  }

  void parse_normalizer(const json& n, const std::string& path) {
    if (n.is_null()) return;
    const std::string type = type_of(n, path, "normalizer");
    if (type == "Sequence") {
      for (const auto& child : n.at("normalizers")) parse_normalizer(child, path);
    } else if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
      normalizer_.push_back({NormalizerStep::kForm, type, ""});
    } else if (type == "Prepend") {
      normalizer_.push_back({NormalizerStep::kPrepend, n.at("prepend").get<std::string>(), ""});
    } else if (type == "Replace" && n.at("pattern").contains("String")) {
      normalizer_.push_back(
          {NormalizerStep::kReplace, n["pattern"]["String"].get<std::string>(), n.at("content").get<std::string>()});
    } else {
      unsupported(path, "normalizer", type == "Replace" ? "Replace(Regex)" : type,
                  "NFC, NFD, NFKC, NFKD, Prepend, Replace(String), Sequence");
    }
  }

  void parse_pre_tokenizer(const json& p, const std::string& path) {
    if (p.is_null()) return;
    const std::string type = type_of(p, path, "pre_tokenizer");
    if (type == "Sequence") {
      for (const auto& child : p.at("pretokenizers")) parse_pre_tokenizer(child, path);
    } else if (type == "Split") {
      PreTokenizerStep s;
      const json& pattern = p.at("pattern");
      if (pattern.contains("Regex")) {
        s.regex = std::make_shared<Regex>(pattern["Regex"].get<std::string>(), path + ": pre_tokenizer Split");
      } else if (pattern.contains("String")) {
        s.literal = pattern["String"].get<std::string>();
      } else {
        fail(path, "pre_tokenizer Split: pattern is neither {\"Regex\"} nor {\"String\"}");
      }
      s.behavior = parse_behavior(p.at("behavior").get<std::string>(), path);
      s.invert = p.value("invert", false);
      pre_tokenizer_.push_back(std::move(s));
    } else if (type == "ByteLevel") {
      PreTokenizerStep s;
      s.kind = PreTokenizerStep::kByteLevel;
      s.add_prefix_space = p.value("add_prefix_space", true);
      if (p.value("use_regex", true)) s.regex = gpt2_regex();
      pre_tokenizer_.push_back(std::move(s));
    } else if (type == "Digits") {
      PreTokenizerStep s;
      const bool individual = p.value("individual_digits", false);
      s.regex = std::make_shared<Regex>(individual ? "\\p{N}" : "\\p{N}+", path + ": pre_tokenizer Digits");
      pre_tokenizer_.push_back(std::move(s));
    } else {
      unsupported(path, "pre_tokenizer", type, "ByteLevel, Split, Digits, Sequence");
    }
  }

  void parse_post_processor(const json& p, const std::string& path) {
    if (p.is_null()) return;
    const std::string type = type_of(p, path, "post_processor");
    if (type == "Sequence") {
      for (const auto& child : p.at("processors")) parse_post_processor(child, path);
    } else if (type == "ByteLevel") {
      // Offsets only; no ids.
    } else if (type == "TemplateProcessing") {
      post_template_.clear();
      for (const auto& item : p.at("single")) {
        if (item.contains("Sequence")) {
          post_template_.push_back(kSequenceMarker);
        } else if (item.contains("SpecialToken")) {
          const std::string name = item["SpecialToken"].at("id").get<std::string>();
          const json& specials = p.at("special_tokens");
          if (!specials.contains(name)) {
            fail(path, "post_processor template names unknown special token \"" + name + "\"");
          }
          for (const auto& id : specials[name].at("ids"))
            post_template_.push_back(read_token_id(id, path, "post_processor special_tokens[\"" + name + "\"].ids"));
        } else {
          fail(path, "post_processor TemplateProcessing: an item is neither Sequence nor SpecialToken");
        }
      }
    } else if (type == "RobertaProcessing" || type == "BertProcessing") {
      post_template_ = {read_token_id(p.at("cls").at(1), path, "post_processor cls"), kSequenceMarker,
                        read_token_id(p.at("sep").at(1), path, "post_processor sep")};
    } else {
      unsupported(path, "post_processor", type,
                  "TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence");
    }
  }

  void parse_decoder(const json& d, const std::string& path) {
    if (d.is_null()) return;
    const std::string type = type_of(d, path, "decoder");
    if (type != "ByteLevel") unsupported(path, "decoder", type, "ByteLevel");
    byte_level_decoder_ = true;
  }

  static std::shared_ptr<Regex> gpt2_regex() {
    static const auto regex = std::make_shared<Regex>(kGpt2Pattern, "ByteLevel pre-tokenizer");
    return regex;
  }

  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  // ---- encoding ----------------------------------------------------------------------------------
  const std::string& token_of(int32_t id) const {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || id_to_token_[static_cast<size_t>(id)].empty()) {
      throw std::out_of_range("id " + std::to_string(id) + " is not in the vocabulary of " + path_ + " (size " +
                              std::to_string(id_to_token_.size()) + ")");
    }
    return id_to_token_[static_cast<size_t>(id)];
  }

  // Splits `text` at the added tokens of one pass (raw or normalized), as AddedVocabulary::find_matches.
  std::vector<Piece> split_added(const std::string& text, bool normalized_pass) const {
    const auto& index = normalized_pass ? normalized_index_ : raw_index_;
    std::vector<Piece> out;
    if (index.empty()) {
      if (!text.empty()) out.push_back({text, -1});
      return out;
    }
    size_t emitted = 0;  // end of the last match, after its rstrip
    for (size_t pos = 0; pos < text.size();) {
      const AddedToken* hit = nullptr;
      if (const auto it = index.find(static_cast<unsigned char>(text[pos])); it != index.end()) {
        for (const size_t k : it->second) {
          const std::string& c = added_[k].content;
          if (text.compare(pos, c.size(), c) == 0) {
            hit = &added_[k];
            break;
          }
        }
      }
      if (hit == nullptr) {
        pos += unicode::utf8_length(static_cast<unsigned char>(text[pos]));
        continue;
      }
      size_t start = pos, stop = pos + hit->content.size();
      if (hit->lstrip) start = std::max(emitted, whitespace_start_before(text, start));
      if (hit->rstrip) stop = whitespace_end_after(text, stop);
      if (emitted < start) out.push_back({text.substr(emitted, start - emitted), -1});
      out.push_back({std::string(), hit->id});
      emitted = stop;
      pos = pos + hit->content.size();  // the automaton resumes after the match itself
      if (pos < emitted) pos = emitted;
    }
    if (emitted < text.size()) out.push_back({text.substr(emitted), -1});
    return out;
  }

  static size_t whitespace_start_before(const std::string& text, size_t start) {
    // Walk back over whitespace characters (UTF-8 continuation bytes are skipped to find lead bytes).
    size_t pos = start;
    while (pos > 0) {
      size_t lead = pos - 1;
      while (lead > 0 && (static_cast<unsigned char>(text[lead]) & 0xC0) == 0x80) --lead;
      size_t len = 0;
      if (!unicode::is_whitespace(unicode::decode_at(text, lead, &len))) break;
      pos = lead;
    }
    return pos;
  }

  static size_t whitespace_end_after(const std::string& text, size_t stop) {
    while (stop < text.size()) {
      size_t len = 0;
      if (!unicode::is_whitespace(unicode::decode_at(text, stop, &len))) break;
      stop += len;
    }
    return stop;
  }

  std::string normalize(const std::string& text) const {
    std::string s = text;
    for (const NormalizerStep& step : normalizer_) {
      switch (step.kind) {
        case NormalizerStep::kForm:
          s = unicode::normalize(s, step.a);
          break;
        case NormalizerStep::kPrepend:
          if (!s.empty()) s = step.a + s;
          break;
        case NormalizerStep::kReplace:
          s = replace_all(s, step.a, step.b);
          break;
      }
    }
    return s;
  }

  std::vector<std::string> pre_tokenize(const std::string& text) const {
    std::vector<std::string> pieces{text};
    for (const PreTokenizerStep& step : pre_tokenizer_) {
      std::vector<std::string> next;
      for (std::string& piece : pieces) {
        if (step.kind == PreTokenizerStep::kByteLevel) {
          byte_level_split(step, piece, next);
        } else {
          split_piece(step, piece, next);
        }
      }
      pieces.swap(next);
    }
    return pieces;
  }

  static void split_piece(const PreTokenizerStep& step, const std::string& piece, std::vector<std::string>& out) {
    auto matches = step.regex ? step.regex->find_all(piece, 0, piece.size()) : find_literal(piece, step.literal);
    auto segs = segments_of(matches, piece.size());
    if (step.invert) {
      for (auto& seg : segs) std::get<2>(seg) = !std::get<2>(seg);
    }
    for (const auto& [s, e] : apply_behavior(segs, step.behavior)) {
      if (e > s) out.push_back(piece.substr(s, e - s));
    }
  }

  // ByteLevel: optional leading space, optional GPT-2 split, then every byte becomes its stand-in character.
  static void byte_level_split(const PreTokenizerStep& step, std::string piece, std::vector<std::string>& out) {
    if (step.add_prefix_space && (piece.empty() || piece[0] != ' ')) piece.insert(piece.begin(), ' ');
    std::vector<std::pair<size_t, size_t>> ranges;
    if (step.regex) {
      for (const auto& [s, e, m] : segments_of(step.regex->find_all(piece, 0, piece.size()), piece.size())) {
        ranges.emplace_back(s, e);
      }
    } else {
      ranges.emplace_back(0, piece.size());
    }
    for (const auto& [s, e] : ranges) {
      if (e <= s) continue;
      std::string mapped;
      mapped.reserve(2 * (e - s));
      for (size_t i = s; i < e; ++i) mapped += unicode::byte_to_char(static_cast<uint8_t>(piece[i]));
      out.push_back(std::move(mapped));
    }
  }

  void append_word_ids(const std::string& word, std::vector<int32_t>& ids) const {
    constexpr size_t kMaxCachedWord = 256;
    constexpr size_t kMaxCacheEntries = 200000;
    if (word.size() <= kMaxCachedWord) {
      std::lock_guard<std::mutex> lock(cache_mutex_);
      if (const auto it = cache_.find(word); it != cache_.end()) {
        ids.insert(ids.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<int32_t> word_ids = bpe(word);
    ids.insert(ids.end(), word_ids.begin(), word_ids.end());
    if (word.size() <= kMaxCachedWord) {
      std::lock_guard<std::mutex> lock(cache_mutex_);
      if (cache_.size() >= kMaxCacheEntries) cache_.clear();
      cache_.emplace(word, std::move(word_ids));
    }
  }

  // BPE on one word: characters to ids (unknown characters to unk, or dropped when the model has none),
  // then merges by rank with the Rust crate's heap order (lowest rank, then leftmost position).
  std::vector<int32_t> bpe(const std::string& word) const {
    if (ignore_merges_) {
      if (const auto it = vocab_.find(word); it != vocab_.end()) return {it->second};
    }
    struct Symbol {
      int32_t id;
      int prev, next;
      bool alive;
    };
    std::vector<Symbol> symbols;
    bool pending_unk = false;
    for (size_t pos = 0; pos < word.size();) {
      const size_t len = unicode::utf8_length(static_cast<unsigned char>(word[pos]));
      const auto it = vocab_.find(word.substr(pos, len));
      pos += len;
      if (it != vocab_.end()) {
        pending_unk = false;
        symbols.push_back({it->second, 0, 0, true});
      } else if (model_unk_ >= 0 && !(fuse_unk_ && pending_unk)) {
        symbols.push_back({model_unk_, 0, 0, true});
        pending_unk = true;
      }
    }
    const int n = static_cast<int>(symbols.size());
    for (int i = 0; i < n; ++i) {
      symbols[i].prev = i - 1;
      symbols[i].next = i + 1 < n ? i + 1 : -1;
    }
    struct Candidate {
      int32_t rank;
      int pos;
      int32_t new_id;
    };
    const auto later = [](const Candidate& x, const Candidate& y) {
      return x.rank != y.rank ? x.rank > y.rank : x.pos > y.pos;
    };
    std::priority_queue<Candidate, std::vector<Candidate>, decltype(later)> heap(later);
    const auto push_pair = [&](int pos) {
      const int next = symbols[pos].next;
      if (next < 0) return;
      const auto it = merges_.find(pair_key(symbols[pos].id, symbols[next].id));
      if (it != merges_.end()) heap.push({it->second.first, pos, it->second.second});
    };
    for (int i = 0; i + 1 < n; ++i) push_pair(i);
    while (!heap.empty()) {
      const Candidate top = heap.top();
      heap.pop();
      Symbol& left = symbols[top.pos];
      if (!left.alive || left.next < 0) continue;
      const auto it = merges_.find(pair_key(left.id, symbols[left.next].id));
      if (it == merges_.end() || it->second.second != top.new_id) continue;  // stale entry
      Symbol& right = symbols[left.next];
      left.id = top.new_id;
      right.alive = false;
      left.next = right.next;
      if (right.next >= 0) symbols[right.next].prev = top.pos;
      if (left.prev >= 0) push_pair(left.prev);
      push_pair(top.pos);
    }
    std::vector<int32_t> out;
    for (const Symbol& s : symbols) {
      if (s.alive) out.push_back(s.id);
    }
    return out;
  }

  std::vector<int32_t> post_process(std::vector<int32_t> ids) const {
    if (post_template_.empty()) return ids;
    std::vector<int32_t> out;
    out.reserve(ids.size() + post_template_.size());
    for (const int32_t item : post_template_) {
      if (item == kSequenceMarker) {
        out.insert(out.end(), ids.begin(), ids.end());
      } else {
        out.push_back(item);
      }
    }
    return out;
  }

  static void append_token_bytes(const std::string& token, std::string& bytes) {
    std::string mapped;
    mapped.reserve(token.size());
    for (size_t pos = 0; pos < token.size();) {
      size_t len = 0;
      const int b = unicode::char_to_byte(unicode::decode_at(token, pos, &len));
      if (b < 0) {  // a character outside the byte table: the crate keeps the token's own UTF-8
        bytes += token;
        return;
      }
      mapped += static_cast<char>(b);
      pos += len;
    }
    bytes += mapped;
  }

  std::string path_;
  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a, b) -> (rank, merged id)
  bool ignore_merges_ = false, fuse_unk_ = false;
  int32_t model_unk_ = -1;

  std::vector<AddedToken> added_;
  std::unordered_map<std::string, size_t> added_by_content_;
  std::unordered_map<unsigned char, std::vector<size_t>> raw_index_, normalized_index_;  // by first byte

  std::vector<NormalizerStep> normalizer_;
  std::vector<PreTokenizerStep> pre_tokenizer_;
  std::vector<int32_t> post_template_;  // ids and kSequenceMarker; empty: no post-processing
  bool byte_level_decoder_ = false;

  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace

std::unique_ptr<TokenizerImpl> make_hf_bpe(const nlohmann::json& j, const std::string& path) {
  try {
    return std::make_unique<HfBpeTokenizer>(j, path);
  } catch (const nlohmann::json::exception& e) {  // a missing key or a value of the wrong JSON type
    throw std::runtime_error(path + ": malformed tokenizer.json: " + e.what());
  } catch (const std::invalid_argument& e) {  // invalid UTF-8 in an added token
    throw std::runtime_error(e.what());
  }
}

}  // namespace anvil::data::detail
