// Helpers shared by the io sources and not part of the public API: the writer's dtype order, JSON
// files read with the same strictness as safetensors headers, atomic file writes, path utilities.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <string>

namespace anvil::io::detail {

/// The reference writer's dtype order (its enum order): tensors are written by rank descending, then
/// name. -1 for an unknown name.
int safetensors_dtype_rank(const std::string& dtype_name);

/// Writes a file atomically: `write(fd)` fills a temporary file in the target's directory, which is
/// then fsync'ed and renamed over `path`. On any error (from `write` or the system) the temporary file
/// is removed, the target is untouched, and the error is rethrown naming `path`.
void write_file_atomically(const std::string& path, const std::function<void(int fd)>& write);

/// Writes all of `n` bytes to `fd`, retrying short writes; throws naming `path` on failure.
void write_all(int fd, const void* data, uint64_t n, const std::string& path);

/// Reads a small text file whole (index.json, refs/main); throws naming the file when it cannot, or
/// when it is larger than `max_bytes`.
std::string read_text_file(const std::string& path, uint64_t max_bytes);

/// Parses JSON text, rejecting duplicate keys; errors name `what`.
nlohmann::json parse_json_strict(const std::string& text, const std::string& what);

bool is_directory(const std::string& path);
bool is_regular_file(const std::string& path);
std::string join_path(const std::string& dir, const std::string& name);

}  // namespace anvil::io::detail
