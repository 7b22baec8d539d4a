// libFuzzer target for the two JSON files of a Hugging Face folder that anvil interprets before any tensor is
// read: a model's config.json (csrc/model/config.cpp: every architecture's keys, rope scaling, quantization_config)
// and a PEFT adapter's adapter_config.json (csrc/lora/lora_config.cpp: PEFT's keys, then the targeting rules on a
// few module names, which run the file's regexes). Both readers are compiled into this binary with ASan, UBSan and
// coverage. An input's first byte picks the file ('a': adapter_config.json, anything else: config.json), the rest
// is its text. A reader must refuse with std::invalid_argument / std::runtime_error / c10::Error naming the key,
// or give a config; any other exception, a crash or a sanitizer report is a finding. A std::regex pattern that
// throws std::regex_error is refused by validate(); one that recurses too deep for the stack is a finding.
#include "anvil/lora/lora.h"
#include "anvil/model/config.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <stdexcept>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool adapter = data[0] == 'a';
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    if (adapter) {
      const auto c = anvil::lora::parse_adapter_config(text, "fuzz/adapter_config.json");
      for (const char* name : {"model.layers.0.self_attn.q_proj", "model.layers.11.mlp.experts.3.down_proj", "lm_head"}) {
        if (anvil::lora::is_target(c, name, std::string(name) == "lm_head")) anvil::lora::scaling_of(c, name);
      }
    } else {
      anvil::model::parse_model_config(text, "fuzz/config.json");
    }
  } catch (const std::invalid_argument&) {
  } catch (const std::runtime_error&) {
  } catch (const c10::Error&) {
    // clean refusals
  }
  return 0;
}
