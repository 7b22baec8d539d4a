// Unicode helpers of the tokenizers (see unicode_text.h): UTF-8 checks, GPT-2's byte table, Rust's lossy
// decoding, normalization through utf8proc and the PCRE2 regex wrapper.
#include "data/unicode_text.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <array>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <unordered_map>

namespace anvil::data::unicode {

namespace {

// The valid range of the second byte of a UTF-8 sequence, by lead byte (Unicode table 3-7); later
// continuation bytes are always 80..BF. A lead byte with no valid sequence returns {1, 0}.
struct LeadRule {
  size_t length;
  unsigned char lo, hi;
};

LeadRule lead_rule(unsigned char b) {
  if (b >= 0xC2 && b <= 0xDF) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) return {3, 0x80, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b >= 0xF1 && b <= 0xF3) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};
  return {1, 1, 0};
}

// The length of the valid sequence at `pos`, or the negated length of the maximal invalid subpart.
long valid_sequence_at(const std::string& s, size_t pos) {
  const auto b = static_cast<unsigned char>(s[pos]);
  if (b < 0x80) return 1;
  const LeadRule rule = lead_rule(b);
  if (rule.length == 1) return -1;
  for (size_t k = 1; k < rule.length; ++k) {
    if (pos + k >= s.size()) return -static_cast<long>(k);
    const auto c = static_cast<unsigned char>(s[pos + k]);
    const unsigned char lo = k == 1 ? rule.lo : 0x80, hi = k == 1 ? rule.hi : 0xBF;
    if (c < lo || c > hi) return -static_cast<long>(k);
  }
  return static_cast<long>(rule.length);
}

struct ByteTables {
  std::array<std::string, 256> to_char;
  std::unordered_map<char32_t, int> to_byte;
};

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes take the
// code points 256, 257, ... in byte order.
const ByteTables& byte_tables() {
  static const ByteTables tables = [] {
    ByteTables t;
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(next++);
      append_utf8(t.to_char[b], cp);
      t.to_byte[cp] = b;
    }
    return t;
  }();
  return tables;
}

}  // namespace

long utf8_sequence_at(const std::string& text, size_t pos) { return valid_sequence_at(text, pos); }

void check_utf8(const std::string& text, const char* what) {
  for (size_t pos = 0; pos < text.size();) {
    const long n = valid_sequence_at(text, pos);
    if (n < 0) {
      throw std::invalid_argument(std::string(what) + ": invalid UTF-8 at byte " + std::to_string(pos) +
                                  " (the tokenizer takes Unicode text)");
    }
    pos += static_cast<size_t>(n);
  }
}

char32_t decode_at(const std::string& s, size_t pos, size_t* len) {
  const auto b = static_cast<unsigned char>(s[pos]);
  const size_t n = utf8_length(b);
  *len = n;
  if (n == 1) return b;
  char32_t cp = b & (0xFF >> (n + 1));
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[pos + k]) & 0x3F);
  return cp;
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

bool is_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

std::string utf8_lossy(const std::string& bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t pos = 0; pos < bytes.size();) {
    const long n = valid_sequence_at(bytes, pos);
    if (n > 0) {
      out.append(bytes, pos, static_cast<size_t>(n));
      pos += static_cast<size_t>(n);
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD for the maximal invalid subpart
      pos += static_cast<size_t>(-n);
    }
  }
  return out;
}

const std::string& byte_to_char(uint8_t b) { return byte_tables().to_char[b]; }

int char_to_byte(char32_t cp) {
  const auto& m = byte_tables().to_byte;
  const auto it = m.find(cp);
  return it == m.end() ? -1 : it->second;
}

std::string normalize(const std::string& text, const std::string& form) {
  int options = UTF8PROC_STABLE;
  if (form == "NFC") {
    options |= UTF8PROC_COMPOSE;
  } else if (form == "NFD") {
    options |= UTF8PROC_DECOMPOSE;
  } else if (form == "NFKC") {
    options |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
  } else if (form == "NFKD") {
    options |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
  } else {
    throw std::invalid_argument("normalize: unknown form '" + form + "' (NFC, NFD, NFKC, NFKD)");
  }
  utf8proc_uint8_t* result = nullptr;
  const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                                          static_cast<utf8proc_ssize_t>(text.size()), &result,
                                          static_cast<utf8proc_option_t>(options));
  if (n < 0) {
    throw std::invalid_argument(std::string("normalize ") + form + ": " + utf8proc_errmsg(n));
  }
  std::string out(reinterpret_cast<char*>(result), static_cast<size_t>(n));
  std::free(result);
  return out;
}

namespace {

// Oniguruma's \s (the engine of `tokenizers`) is Unicode White_Space; PCRE2 10.42's \s under UCP also
// takes U+180E MONGOLIAN VOWEL SEPARATOR, so \s and \S are spelled as the binary property instead.
std::string onig_compatible(const std::string& pattern) {
  std::string out;
  out.reserve(pattern.size() + 32);
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] != '\\' || i + 1 == pattern.size()) {
      out += pattern[i];
      continue;
    }
    const char next = pattern[++i];
    if (next == 's') {
      out += "\\p{White_Space}";
    } else if (next == 'S') {
      out += "\\P{White_Space}";
    } else {
      out += '\\';
      out += next;
    }
  }
  return out;
}

}  // namespace

Regex::Regex(const std::string& source, const std::string& where) : where_(where) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  const std::string pattern = onig_compatible(source);
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP,
                        &error, &offset, nullptr);
  if (code_ == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    throw std::runtime_error(where + ": regex does not compile at offset " + std::to_string(offset) + ": " +
                                reinterpret_cast<char*>(message));
  }
  pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // best effort: the interpreter is the fallback
}

Regex::~Regex() { pcre2_code_free(code_); }

std::vector<std::pair<size_t, size_t>> Regex::find_all(const std::string& text, size_t begin, size_t end) const {
  std::vector<std::pair<size_t, size_t>> matches;
  std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data(
      pcre2_match_data_create_from_pattern(code_, nullptr), &pcre2_match_data_free);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data() + begin);
  const size_t length = end - begin;
  size_t start = 0;
  while (start <= length) {
    // The text was checked to be valid UTF-8 once, up front; PCRE2 need not check it again per call.
    const int rc = pcre2_match(code_, subject, length, start, PCRE2_NO_UTF_CHECK, data.get(), nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof(message));
      throw std::runtime_error(where_ + ": regex match failed: " + reinterpret_cast<char*>(message));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(data.get());
    const size_t s = ov[0], e = ov[1];
    if (e > s) {
      matches.emplace_back(s, e);
      start = e;
    } else {  // an empty match: step over one character
      if (s >= length) break;
      start = s + utf8_length(static_cast<unsigned char>(text[begin + s]));
    }
  }
  return matches;
}

}  // namespace anvil::data::unicode
