// libFuzzer target for training configs (csrc/train/config.cpp on io::parse_json_strict): the path every
// recipe's --config file and --section.key=value override takes before any training starts. An input is a
// config file's text; its lines that start with "--" after a line "#overrides" are overrides. The reader
// must refuse with std::invalid_argument / c10::Error naming the key or the file, or give typed sections;
// any other exception, a crash or a sanitizer report is a finding.
#include "anvil/io/json.h"
#include "anvil/train/config.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size), overrides;
  const auto split = text.find("\n#overrides\n");
  if (split != std::string::npos) {
    overrides = text.substr(split + 12);
    text.resize(split);
  }
  using anvil::train::ConfigReader;
  try {
    auto user = anvil::io::parse_json_strict(text, "fuzz", /*allow_comments=*/true);
    if (!user.is_object()) return 0;
    std::istringstream lines(overrides);
    for (std::string line; std::getline(lines, line);)
      if (line.rfind("--", 0) == 0) anvil::train::apply_override(user, line.substr(2));
    const anvil::train::ConfigSchema schema{anvil::train::training_defaults("runs/fuzz"),
                                            {{"lora", "is for anvil lora"}}};
    const auto resolved = anvil::train::merge_over_defaults(schema, user);
    const ConfigReader r(resolved);
    anvil::train::read_model_section(r);
    anvil::train::read_data_section(r);
    anvil::train::read_train_section(r);
    anvil::train::read_eval_section(r);
    anvil::train::read_output_section(r);
  } catch (const std::invalid_argument&) {
  } catch (const c10::Error&) {
    // clean refusals
  }
  return 0;
}
