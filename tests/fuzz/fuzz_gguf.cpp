// libFuzzer target for the GGUF reader (csrc/io/gguf.cpp: header, metadata, tensor table, and the ggml
// dequantizers), compiled into this binary with ASan/UBSan and coverage instrumentation; ATen comes from
// torch uninstrumented. An input is a whole file held in memory. parse_gguf must refuse it with a
// c10::Error or accept it; an accepted file's tensors must lie inside the input, which the target checks by
// dequantizing every small dequantizable tensor (ASan reports any read past the buffer). Anything else is
// a finding. How to run it: docs/FORMATS.md, "Fuzzing".
#include "anvil/io/gguf.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<uint8_t> input(data, data + size);  // exact bounds for ASan
  try {
    const auto h = anvil::io::parse_gguf(input.data(), input.size(), "fuzz");
    for (const auto& t : h.tensors) {
      if (h.data_offset + t.offset + t.nbytes > size) std::abort();  // parse_gguf promised the bounds
      if (!anvil::io::ggml_type_dequantizable(t.type) || t.numel() > (1 << 16)) continue;
      const auto out = anvil::io::dequantize_ggml_tensor(t, input.data() + h.data_offset + t.offset, "fuzz");
      if (out.numel() != t.numel()) std::abort();
    }
  } catch (const c10::Error&) {
    // a clean refusal
  }
  return 0;
}
