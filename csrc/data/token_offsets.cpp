// Byte offsets of tokens (include/anvil/data/token_offsets.h).
#include "anvil/data/token_offsets.h"

#include "data/unicode_text.h"

#include <stdexcept>

namespace anvil::data {

namespace {

bool is_byte_piece(const std::string& p) {  // SentencePiece's byte-fallback pieces: <0x00> .. <0xFF>
  auto hex = [](char c) { return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F') || (c >= 'a' && c <= 'f'); };
  return p.size() == 6 && p.compare(0, 3, "<0x") == 0 && p[5] == '>' && hex(p[3]) && hex(p[4]);
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

}  // namespace

std::string token_bytes(const Tokenizer& tok, int32_t id) {
  const std::string piece = tok.id_to_token(id);
  if (tok.kind() == "sentencepiece") {
    if (is_byte_piece(piece)) return std::string(1, char(std::stoi(piece.substr(3, 2), nullptr, 16)));
    std::string out;
    static const std::string kMeta = "\xe2\x96\x81";  // U+2581, SentencePiece's space
    for (size_t i = 0; i < piece.size();) {
      if (piece.compare(i, kMeta.size(), kMeta) == 0) out += ' ', i += kMeta.size();
      else out += piece[i++];
    }
    return out;
  }
  // Byte-level BPE: every character of a piece stands for one byte (GPT-2's table); a piece with another
  // character is not in byte space (an added token's content) and is its own spelling.
  std::string out;
  for (size_t pos = 0; pos < piece.size();) {
    size_t len = 0;
    const int b = unicode::char_to_byte(unicode::decode_at(piece, pos, &len));
    if (b < 0) return piece;
    out += char(b), pos += len;
  }
  return out;
}

std::vector<ByteSpan> token_byte_offsets(const Tokenizer& tok, const std::string& text, const std::vector<int32_t>& ids,
                                         const std::string& what) {
  std::vector<ByteSpan> out;
  out.reserve(ids.size());
  const int64_t n = int64_t(text.size());
  int64_t cur = 0;
  auto here = [&](const std::string& b, int64_t at) {
    return at + int64_t(b.size()) <= n && text.compare(size_t(at), b.size(), b) == 0;
  };
  // SentencePiece's dummy prefix: a space before the text, in the first piece, that no byte of the text is
  // (SentencePiece's own spans give "▁Hello" of "Hello" the bytes [0, 5) and "▁▁" of "  x" [0, 1)). Whether the
  // model adds one: its encoding of "a" opens with a space.
  bool dummy = false;
  if (tok.kind() == "sentencepiece") {
    const auto a = tok.encode("a", false);
    dummy = !a.empty() && token_bytes(tok, a.front()).rfind(' ', 0) == 0;
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    std::string b = token_bytes(tok, ids[i]);
    if (dummy && !tok.is_special(ids[i])) {
      dummy = false;
      if (!b.empty() && b[0] == ' ') b.erase(0, 1);
      if (b.empty()) {  // the dummy prefix alone
        out.emplace_back(cur, cur);
        continue;
      }
    }
    if (!b.empty() && here(b, cur)) {
      out.emplace_back(cur, cur + int64_t(b.size()));
      cur += int64_t(b.size());
      continue;
    }
    if (b.size() > 1 && b[0] == ' ' && here(b.substr(1), cur)) {  // a prefix space the text does not have
      out.emplace_back(cur, cur + int64_t(b.size()) - 1);
      cur += int64_t(b.size()) - 1;
      continue;
    }
    int64_t skip = cur;  // whitespace an added token's lstrip swallowed
    while (skip < n && is_space(text[size_t(skip)])) ++skip;
    if (skip > cur && !b.empty() && here(b, skip)) {
      out.emplace_back(skip, skip + int64_t(b.size()));
      cur = skip + int64_t(b.size());
      continue;
    }
    if (tok.is_special(ids[i])) {  // added by the post-processor (bos, eos), not spelled in the text
      out.emplace_back(cur, cur);
      continue;
    }
    throw std::runtime_error(what + ": token " + std::to_string(i) + " (id " + std::to_string(ids[i]) + ", \"" +
                             tok.id_to_token(ids[i]) + "\") does not spell the text at byte " + std::to_string(cur) +
                             ": the tokenizer rewrote the text (a normalizer), so its tokens have no byte offsets");
  }
  // rstrip: trailing whitespace an added token swallowed is no token's; nothing to do.
  return out;
}

EncodingWithOffsets encode_with_offsets(const Tokenizer& tok, const std::string& text, bool add_special_tokens,
                                        const std::string& what) {
  EncodingWithOffsets e;
  e.ids = tok.encode(text, add_special_tokens);
  e.offsets = token_byte_offsets(tok, text, e.ids, what);
  return e;
}

}  // namespace anvil::data
