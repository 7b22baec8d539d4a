// SentencePiece tokenizer.model (Llama-2, Mistral, Mixtral) through libsentencepiece, shaped like
// transformers' Llama tokenizer (legacy mode):
//   encode  the text is first split at the special pieces' strings ("<s>", "</s>", "<unk>"), which become
//           their ids (so a rendered chat template tokenizes as in transformers); each other piece goes
//           through SentencePiece, which adds its dummy-prefix space per piece; bos/eos as the config asks
//   decode  pieces are concatenated with "▁" as a space, byte pieces (<0xAB>) as bytes (an invalid byte
//           becomes U+FFFD, as SentencePiece decodes), special pieces as their text unless skipped, and
//           the first piece's leading "▁" (the dummy prefix) is dropped: sentencepiece's DecodeIds for ordinary ids, and transformers'
//           output where special tokens are kept.
#include "data/tokenizer_impl.h"
#include "data/unicode_text.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <stdexcept>

namespace anvil::data::detail {

namespace {

class SentencePieceTokenizer final : public TokenizerImpl {
 public:
  SentencePieceTokenizer(const std::string& path, bool add_bos, bool add_eos) : path_(path) {
    const auto status = sp_.Load(path);
    if (!status.ok()) throw std::runtime_error(path + ": not a SentencePiece model: " + status.ToString());
    add_bos_ = add_bos ? sp_.bos_id() : -1;
    add_eos_ = add_eos ? sp_.eos_id() : -1;
    for (int id = 0; id < sp_.GetPieceSize(); ++id) {
      if (sp_.IsControl(id) || sp_.IsUnknown(id)) {
        mark_special(id);
        specials_.emplace_back(sp_.IdToPiece(id), id);
      }
    }
    // Longest first: at a position the longest special string wins.
    std::sort(specials_.begin(), specials_.end(),
              [](const auto& x, const auto& y) { return x.first.size() > y.first.size(); });
    set_special_ids(sp_.bos_id(), sp_.eos_id(), sp_.pad_id(), sp_.unk_id());
  }

  std::string kind() const override { return "sentencepiece"; }

  std::vector<int32_t> encode(const std::string& text, bool add_special_tokens) const override {
    unicode::check_utf8(text, "encode(text)");
    std::vector<int32_t> ids;
    if (add_special_tokens && add_bos_ >= 0) ids.push_back(add_bos_);
    size_t emitted = 0;
    for (size_t pos = 0; pos < text.size();) {
      const std::pair<std::string, int>* hit = nullptr;
      for (const auto& special : specials_) {
        if (!special.first.empty() && text.compare(pos, special.first.size(), special.first) == 0) {
          hit = &special;
          break;
        }
      }
      if (hit == nullptr) {
        pos += unicode::utf8_length(static_cast<unsigned char>(text[pos]));
        continue;
      }
      encode_plain(text.substr(emitted, pos - emitted), ids);
      ids.push_back(hit->second);
      pos += hit->first.size();
      emitted = pos;
    }
    encode_plain(text.substr(emitted), ids);
    if (add_special_tokens && add_eos_ >= 0) ids.push_back(add_eos_);
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const override {
    std::string out;
    std::string byte_run;  // consecutive byte pieces, decoded together
    bool seen_piece = false;
    for (const int32_t id : ids) {
      check_id(id);
      if (sp_.IsByte(id)) {
        byte_run += static_cast<char>(std::stoi(sp_.IdToPiece(id).substr(3, 2), nullptr, 16));
        continue;
      }
      flush_bytes(byte_run, out);
      if (is_special(id)) {
        if (!skip_special_tokens) out += sp_.IdToPiece(id);
        continue;
      }
      // The dummy prefix: a first piece that opens with "▁" loses it (a byte piece <0x20> keeps its space).
      const bool first = out.empty() && !seen_piece;
      seen_piece = true;
      append_piece(sp_.IdToPiece(id), out);
      if (first && !out.empty() && out[0] == ' ') out.erase(0, 1);
    }
    flush_bytes(byte_run, out);
    return out;
  }

  int64_t vocab_size() const override { return sp_.GetPieceSize(); }

  std::optional<int32_t> token_to_id(const std::string& token) const override {
    const int id = sp_.PieceToId(token);
    if (id == sp_.unk_id() && token != sp_.IdToPiece(id)) return std::nullopt;  // PieceToId answers unk
    return id;
  }

  std::string id_to_token(int32_t id) const override {
    check_id(id);
    return sp_.IdToPiece(id);
  }

  void set_bos_eos_template(int32_t bos, int32_t eos) override {
    add_bos_ = bos;
    add_eos_ = eos;
  }

  int32_t add_special_token(const std::string& content) override {
    if (const auto id = token_to_id(content)) return *id;
    throw std::runtime_error(path_ + ": special token \"" + content +
                             "\" named by the config is not a piece of the SentencePiece model");
  }

 private:
  void check_id(int32_t id) const {
    if (id < 0 || id >= sp_.GetPieceSize()) {
      throw std::out_of_range("id " + std::to_string(id) + " is not in the vocabulary of " + path_ + " (size " +
                              std::to_string(sp_.GetPieceSize()) + ")");
    }
  }

  void encode_plain(const std::string& text, std::vector<int32_t>& ids) const {
    if (text.empty()) return;
    std::vector<int> piece_ids;
    const auto status = sp_.Encode(text, &piece_ids);
    if (!status.ok()) throw std::runtime_error(path_ + ": SentencePiece encode failed: " + status.ToString());
    ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
  }

  static void append_piece(const std::string& piece, std::string& out) {
    static const std::string kSpace = "\xE2\x96\x81";  // U+2581 LOWER ONE EIGHTH BLOCK
    for (size_t pos = 0; pos < piece.size();) {
      if (piece.compare(pos, kSpace.size(), kSpace) == 0) {
        out += ' ';
        pos += kSpace.size();
      } else {
        out += piece[pos++];
      }
    }
  }

  // Valid UTF-8 sequences are kept; each byte of an invalid one becomes U+FFFD (SentencePiece's rule).
  static void flush_bytes(std::string& run, std::string& out) {
    for (size_t pos = 0; pos < run.size();) {
      const long n = unicode::utf8_sequence_at(run, pos);
      if (n > 0) {
        out.append(run, pos, static_cast<size_t>(n));
        pos += static_cast<size_t>(n);
      } else {
        out += "\xEF\xBF\xBD";
        pos += 1;
      }
    }
    run.clear();
  }

  std::string path_;
  sentencepiece::SentencePieceProcessor sp_;
  std::vector<std::pair<std::string, int>> specials_;
  int32_t add_bos_ = -1, add_eos_ = -1;
};

}  // namespace

std::unique_ptr<TokenizerImpl> make_sentencepiece(const std::string& path, bool add_bos, bool add_eos) {
  return std::make_unique<SentencePieceTokenizer>(path, add_bos, add_eos);
}

}  // namespace anvil::data::detail
