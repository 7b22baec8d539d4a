// SentencePiece tokenizer.model (Llama-2, Mistral, Mixtral) through libsentencepiece, shaped like
// transformers' Llama tokenizer (legacy mode):
//   encode  the text is first split at the special pieces' strings ("<s>", "</s>", "<unk>"), which become
//           their ids (so a rendered chat template tokenizes as in transformers); each other piece goes
//           through SentencePiece, which adds its dummy-prefix space per piece; bos/eos as the config asks
//   decode  pieces are concatenated with "▁" as a space, byte pieces (<0xAB>) as bytes (an invalid byte
//           becomes U+FFFD, as SentencePiece decodes), special pieces as their text unless skipped, and
//           the first piece's leading "▁" (the dummy prefix) is dropped: sentencepiece's DecodeIds for
//           ordinary ids, and transformers' output where special tokens are kept.
#include "data/tokenizer_impl.h"
#include "data/unicode_text.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace anvil::data::detail {

namespace {

// ---- the pieces of a hostile file, before libsentencepiece sees them ----
// libsentencepiece aborts the whole process on a piece holding a NUL byte: its trie builder (Darts) throws where
// nothing catches it (found by tests/fuzz/fuzz_tokenizer_model). So the ModelProto's pieces (field 1, each a
// SentencePiece message whose field 1 is the piece's text) are read here in the protobuf wire format first; a file
// that is not wire format at all is left to the library, which refuses it with a status.

bool read_varint(const std::string& b, size_t& i, uint64_t& v) {
  v = 0;
  for (int shift = 0; shift < 64 && i < b.size(); shift += 7) {
    const auto byte = static_cast<unsigned char>(b[i++]);
    v |= uint64_t(byte & 0x7F) << shift;
    if (!(byte & 0x80)) return true;
  }
  return false;
}

// Calls f(field, payload) for each length-delimited field of the message b; false where b is not wire format.
template <typename F>
bool for_each_bytes_field(const std::string& b, F&& f) {
  size_t i = 0;
  while (i < b.size()) {
    uint64_t key = 0, len = 0;
    if (!read_varint(b, i, key)) return false;
    switch (key & 7) {
      case 0: if (!read_varint(b, i, len)) return false; continue;
      case 1: if (b.size() - i < 8) return false; i += 8; continue;
      case 5: if (b.size() - i < 4) return false; i += 4; continue;
      case 2: break;
      default: return false;  // groups (3, 4) are not in ModelProto
    }
    if (!read_varint(b, i, len) || len > b.size() - i) return false;
    f(key >> 3, b.substr(i, len));
    i += len;
  }
  return true;
}

std::string read_model_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open the SentencePiece model");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void check_pieces(const std::string& bytes, const std::string& path) {
  int64_t index = 0;
  for_each_bytes_field(bytes, [&](uint64_t field, const std::string& piece_message) {
    if (field != 1) return;  // ModelProto.pieces
    for_each_bytes_field(piece_message, [&](uint64_t f, const std::string& text) {
      if (f == 1 && text.find('\0') != std::string::npos)  // SentencePiece.piece
        throw std::runtime_error(path + ": not a usable SentencePiece model: piece " + std::to_string(index) +
                                 " holds a NUL byte");
    });
    ++index;
  });
}

class SentencePieceTokenizer final : public TokenizerImpl {
 public:
  SentencePieceTokenizer(const std::string& path, bool add_bos, bool add_eos) : path_(path) {
    const std::string bytes = read_model_file(path);
    check_pieces(bytes, path);
    const auto status = sp_.LoadFromSerializedProto(bytes);
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
