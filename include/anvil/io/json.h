// Reading JSON that comes from outside (config files, index files, headers): nlohmann's parser with the
// rules it lacks, duplicate keys rejected (a repeated "train" section must not silently replace the first)
// and nesting bounded.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

namespace anvil::io {

/// Parses JSON text, rejecting duplicate keys in any object and nesting deeper than 64 levels; with
/// `allow_comments`, // and /* */ comments are skipped (training configs allow them). Throws c10::Error
/// "<what>: not valid JSON: ..." or "<what>: duplicate key 'k'".
nlohmann::json parse_json_strict(const std::string& text, const std::string& what, bool allow_comments = false);

}  // namespace anvil::io
