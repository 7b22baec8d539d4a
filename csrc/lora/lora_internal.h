// Helpers of csrc/lora shared by its files (lora_config.cpp defines them), private to this folder.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace anvil::lora {

/// re.fullmatch(pattern, name) (std::regex, ECMAScript grammar).
bool full_match(const std::string& pattern, const std::string& name);

/// "pissa_niter_N" -> N; -1 for "pissa"; throws std::invalid_argument for anything else.
int64_t pissa_niter(const std::string& init);

}  // namespace anvil::lora
