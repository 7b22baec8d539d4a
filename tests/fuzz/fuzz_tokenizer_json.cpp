// libFuzzer target for the tokenizer.json reader (csrc/data/hf_bpe_tokenizer.cpp: vocabulary, merges, added
// tokens, normalizer, pre-tokenizer regexes, post-processor, decoder), compiled into this binary with ASan
// and coverage instrumentation. An input is the file's text. The reader must refuse it with a
// std::exception naming the rule (std::runtime_error, std::invalid_argument, a JSON type error) or build a
// tokenizer; a built tokenizer must encode and decode a few fixed texts and the input's own text without
// a crash. A std::bad_alloc is a finding: a small file must never ask for gigabytes (libFuzzer's
// -malloc_limit_mb catches the large requests that do not throw). How to run it: docs/FORMATS.md, "Fuzzing".
#include "data/tokenizer_impl.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <new>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const auto j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return 0;  // not JSON: the JSON parser is not what this target tests
  try {
    const auto tok = anvil::data::detail::make_hf_bpe(j, "fuzz");
    for (const std::string& s : {std::string("Hello world"), std::string(" 12  ab\n\t!"),
                                  std::string("\xC3\xA9 \xC3\xBC \xE4\xB8\xAD\xE6\x96\x87"), text}) {
      try {
        const auto ids = tok->encode(s, true);
        tok->decode(ids, false);
        tok->decode(ids, true);
      } catch (const std::invalid_argument&) {
        // text that is not UTF-8 is refused by encode, by contract
      }
    }
  } catch (const std::bad_alloc&) {
    std::abort();
  } catch (const std::exception&) {
    // a clean refusal
  }
  return 0;
}
