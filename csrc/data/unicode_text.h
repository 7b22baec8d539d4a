// Unicode helpers of the tokenizers: UTF-8 walking, the GPT-2 byte-to-character table of byte-level
// BPE, Rust's lossy UTF-8 decoding (what `tokenizers` returns for invalid bytes), Unicode normalization
// forms through utf8proc, and a PCRE2 regex wrapper compiled with UTF + UCP so that \p{L}, \p{N}, \s
// and lookaheads behave as the Oniguruma regexes of tokenizer.json files do.
//
// Everything here is internal to csrc/data; the public API is include/anvil/data/tokenizer.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

struct pcre2_real_code_8;

namespace anvil::data::unicode {

/// Length in bytes of the UTF-8 sequence whose lead byte is `lead` (1 for a stray byte).
inline size_t utf8_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xE) return 3;
  if ((lead >> 3) == 0x1E) return 4;
  return 1;
}

/// Throws std::invalid_argument naming `what` and the byte offset when `text` is not valid UTF-8.
void check_utf8(const std::string& text, const char* what);

/// The length of the valid UTF-8 sequence at byte `pos`, or minus the length of the maximal invalid part.
long utf8_sequence_at(const std::string& text, size_t pos);

/// The code point at byte `pos` of valid UTF-8 text; `len` receives its length in bytes.
char32_t decode_at(const std::string& text, size_t pos, size_t* len);

/// Appends the UTF-8 encoding of `cp`.
void append_utf8(std::string& out, char32_t cp);

/// Unicode White_Space (Rust's char::is_whitespace): what added tokens' lstrip/rstrip swallow.
bool is_whitespace(char32_t cp);

/// Bytes to text as Rust's String::from_utf8_lossy: each maximal invalid subsequence becomes U+FFFD.
std::string utf8_lossy(const std::string& bytes);

/// GPT-2's bytes_to_unicode: the UTF-8 text of the printable character that stands for byte `b`.
const std::string& byte_to_char(uint8_t b);

/// The inverse: the byte a code point stands for, or -1 when the code point is not in the table.
int char_to_byte(char32_t cp);

/// Unicode normalization forms; `form` is "NFC", "NFD", "NFKC" or "NFKD".
std::string normalize(const std::string& text, const std::string& form);

/// A compiled PCRE2 pattern (UTF, UCP, JIT when available). Thread-safe: matching allocates per call.
class Regex {
 public:
  /// Throws std::runtime_error naming `where` and PCRE2's message and offset on a bad pattern.
  Regex(const std::string& pattern, const std::string& where);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  /// Non-overlapping leftmost matches in text[begin, end) as byte ranges relative to `begin`, searched
  /// on that substring alone (as `tokenizers` searches each split). Empty matches are skipped.
  std::vector<std::pair<size_t, size_t>> find_all(const std::string& text, size_t begin, size_t end) const;

 private:
  pcre2_real_code_8* code_ = nullptr;
  std::string where_;
};

}  // namespace anvil::data::unicode
