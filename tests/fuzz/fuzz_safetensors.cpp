// libFuzzer target for the safetensors header parser: the function every file anvil reads goes through
// (csrc/io/safetensors_header.cpp), compiled into this binary with ASan and coverage instrumentation.
// An input is a whole file held in memory. The parser must either refuse it with a c10::Error or accept
// it; an accepted header must describe tensors that lie inside the input, which the target checks by
// reading every byte of every tensor (ASan reports any read past the buffer). Anything else (a crash, a
// hang, another exception type) is a finding. How to build and run it: docs/FORMATS.md, "Fuzzing".
#include "anvil/io/safetensors.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A private copy, so that ASan sees the exact bounds of the input (libFuzzer's buffer may be larger).
  std::vector<uint8_t> input(data, data + size);
  try {
    const auto h = anvil::io::parse_safetensors_header(input.data(), input.size(), "fuzz");
    const uint8_t* section = input.data() + 8 + h.header_bytes;
    uint64_t expected = 0;
    unsigned sum = 0;
    for (const auto& e : h.entries) {
      if (e.begin != expected || e.end < e.begin) std::abort();  // contiguity was promised
      expected = e.end;
      for (uint64_t i = e.begin; i < e.end; ++i) sum += section[i];
    }
    if (8 + h.header_bytes + h.data_bytes != size) std::abort();
    volatile unsigned sink = sum;
    (void)sink;
  } catch (const c10::Error&) {
    // a clean refusal
  }
  return 0;
}
