// Helpers shared by the recipe config tests (tests/cpp/lora, tests/cpp/finetune): the smallest user config
// a recipe accepts, and the message resolving a config throws.
#pragma once

#include <nlohmann/json.hpp>

#include <stdexcept>
#include <string>

namespace anvil::test {

inline nlohmann::json minimal_recipe_config() {
  return nlohmann::json{{"model", {{"path", "some/model"}}}, {"data", {{"train", "train.jsonl"}}}};
}

// The message of the std::invalid_argument that `resolve(user)` throws ("" when it does not).
template <class Resolve>
std::string resolve_error(Resolve resolve, const nlohmann::json& user) {
  try {
    resolve(user);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

}  // namespace anvil::test
