// libFuzzer target for a SentencePiece tokenizer.model (csrc/data/sentencepiece_tokenizer.cpp: the load through
// libsentencepiece, the special pieces' table, encode around special strings, decode of byte pieces and the
// dummy prefix). anvil's wrapper is compiled into this binary with ASan, UBSan and coverage; libsentencepiece and
// its protobuf parser are the system's, uninstrumented, so a fault inside them shows as a crash rather than a
// sanitizer report. An input is the file's bytes (written to a scratch file: the library loads from a path).
// The loader must refuse with std::runtime_error naming the file or give a tokenizer; a built tokenizer must
// encode and decode a few fixed texts and every id of its vocabulary without a crash (std::invalid_argument for
// text that is not UTF-8 and std::out_of_range for an id outside the vocabulary are its contract).
#include "data/tokenizer_impl.h"

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/anvil-fuzz-tokenizer-" + std::to_string(getpid()) + ".model";
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  try {
    const auto tok = anvil::data::detail::make_sentencepiece(path, /*add_bos=*/true, /*add_eos=*/true);
    for (const std::string& s : {std::string("Hello world"), std::string(" 12  ab\n\t!</s><s>x<unk>"),
                                  std::string("\xC3\xA9 \xC3\xBC \xE4\xB8\xAD\xE6\x96\x87")}) {
      const auto ids = tok->encode(s, true);
      tok->decode(ids, false);
      tok->decode(ids, true);
    }
    std::vector<int32_t> all;
    for (int64_t id = 0; id < tok->vocab_size() && id < 4096; ++id) all.push_back(int32_t(id));
    tok->decode(all, false);
    tok->decode(all, true);
    try {
      tok->decode({int32_t(tok->vocab_size())}, false);
    } catch (const std::out_of_range&) {
      // the contract for an id outside the vocabulary
    }
  } catch (const std::bad_alloc&) {
    std::abort();
  } catch (const std::runtime_error&) {
    // a clean refusal: not a SentencePiece model
  }
  return 0;
}
