// Files and paths, the one set every part of anvil uses: path tests and joins, mkdir -p, rm -r,
// rename, copy, atomic (fsync'ed) writes, bounded reads, and the list of the files a model folder
// carries beside its weights.
//
// POSIX calls, never std::filesystem: libtorch.so (torch 2.11) exports its own copies of
// std::filesystem's functions (status, file_size, remove_all, create_directories, ...), and in a process
// that loads it those win symbol resolution and crash (remove_all jumped to address 0 in anvil_tests;
// docs/ARCHITECTURE.md). Errors are c10::Error naming the path, the operation and errno's reason.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace anvil::io {

// ---- paths --------------------------------------------------------------------------------------------
/// Something (file, directory, link, even a dangling one) is at `path`.
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
bool is_regular_file(const std::string& path);
/// dir + "/" + name ("name" when dir is empty; no doubled slash).
std::string join_path(const std::string& dir, const std::string& name);
/// "a/b" of "a/b/c"; "." without a slash; "/" for "/x".
std::string parent_dir(const std::string& path);
/// "c" of "a/b/c".
std::string file_name(const std::string& path);
/// realpath(3), or `path` itself when it cannot be resolved (e.g. it does not exist).
std::string real_path(const std::string& path);
/// The entry names of `dir` (without "." and ".."); empty when it cannot be read.
std::vector<std::string> list_directory(const std::string& dir);

// ---- changes ------------------------------------------------------------------------------------------
/// mkdir -p.
void make_directories(const std::string& dir);
/// rm -r: a directory's entries (links not followed), then the directory; nothing when absent.
void remove_tree(const std::string& path);
/// rename(2), which replaces a file (or an empty directory) at `to`.
void rename_path(const std::string& from, const std::string& to);

// ---- writing and reading ------------------------------------------------------------------------------
/// Writes a file atomically: `write(fd)` fills a hidden temporary file in the target's directory, which is
/// then fsync'ed, closed and renamed over `path`, and the directory fsync'ed. On any error (from `write`
/// or the system) the temporary file is removed, the target is untouched, and the error names `path`.
void write_file_atomically(const std::string& path, const std::function<void(int fd)>& write);
/// Writes all of `n` bytes to `fd`, retrying short writes; throws naming `path` on failure.
void write_all(int fd, const void* data, uint64_t n, const std::string& path);
/// write_file_atomically with `text` as the contents.
void write_text_atomically(const std::string& path, const std::string& text);
/// Copies a file's bytes to `to`, atomically (a complete copy or none).
void copy_file(const std::string& from, const std::string& to);
/// A file read whole; throws naming it when it cannot be read or is larger than `max_bytes`.
std::string read_text_file(const std::string& path, uint64_t max_bytes = uint64_t(64) << 20);

// ---- model folders ------------------------------------------------------------------------------------
/// The files of a Hugging Face model folder besides config.json and the weights that a model written from
/// it needs to be used as the original was: the tokenizer files of both kinds, the chat template and the
/// generation defaults.
extern const std::vector<std::string> kModelSideFiles;
/// Copies those of kModelSideFiles present in `from` into `to`; returns how many it copied.
int copy_model_side_files(const std::string& from, const std::string& to);

}  // namespace anvil::io
