// The "lora" config section, for any recipe that trains LoRA adapters (anvil lora; anvil distill's student):
// PEFT's LoraConfig fields under anvil's key names, their defaults and their reader. The one header where
// train/ (configs) meets lora/ (the adapters); neither of those knows the other. Every key: docs/CLI.md.
#pragma once

#include "anvil/lora/lora.h"
#include "anvil/train/config.h"

#include <nlohmann/json.hpp>

namespace anvil::train {

/// {"r": 16, "alpha": 32, "dropout": 0.0, "rslora": false, "dora": false, "targets": "all-linear",
///  "target_regex": "", "rank_pattern": {}, "alpha_pattern": {}, "init": "kaiming"}
nlohmann::json lora_section_defaults();

/// The section's values checked one key at a time ("config key lora.r: must be ...").
lora::LoraConfig read_lora_section(const ConfigReader& r);

}  // namespace anvil::train
