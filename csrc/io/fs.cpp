// Files and paths through POSIX (anvil/io/fs.h says why never std::filesystem).
#include "anvil/io/fs.h"

#include <c10/util/Exception.h>

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>

namespace anvil::io {

const std::vector<std::string> kModelSideFiles = {
    "tokenizer.json",    "tokenizer.model",     "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "vocab.json",            "merges.txt",
    "generation_config.json",
};

bool path_exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_regular_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string file_name(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

std::string real_path(const std::string& path) {
  char buf[PATH_MAX];
  return ::realpath(path.c_str(), buf) ? std::string(buf) : path;
}

std::vector<std::string> list_directory(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return names;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(d);
  return names;
}

void make_directories(const std::string& dir) {
  if (dir.empty() || is_directory(dir)) return;
  const std::string parent = parent_dir(dir);
  if (parent != dir) make_directories(parent);
  if (::mkdir(dir.c_str(), 0777) != 0 && errno != EEXIST)
    TORCH_CHECK(false, "cannot create the directory '", dir, "': ", std::strerror(errno));
}

void remove_tree(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    for (const auto& name : list_directory(path)) remove_tree(join_path(path, name));
    TORCH_CHECK(::rmdir(path.c_str()) == 0, "cannot remove the directory '", path, "': ", std::strerror(errno));
  } else {
    TORCH_CHECK(::unlink(path.c_str()) == 0, "cannot remove '", path, "': ", std::strerror(errno));
  }
}

void rename_path(const std::string& from, const std::string& to) {
  TORCH_CHECK(::rename(from.c_str(), to.c_str()) == 0, "cannot rename '", from, "' to '", to, "': ",
              std::strerror(errno));
}

void write_all(int fd, const void* data, uint64_t n, const std::string& path) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min<uint64_t>(n, 1u << 30));
    if (w < 0 && errno == EINTR) continue;
    TORCH_CHECK(w > 0, "cannot write '", path, "': ", w < 0 ? std::strerror(errno) : "wrote nothing");
    p += w;
    n -= static_cast<uint64_t>(w);
  }
}

void write_file_atomically(const std::string& path, const std::function<void(int fd)>& write) {
  static std::atomic<uint64_t> counter{0};
  const std::string dir = parent_dir(path);
  // Hidden, unique per process and call, in the target's directory (rename must not cross filesystems).
  const std::string tmp = join_path(dir, "." + file_name(path) + ".tmp." + std::to_string(::getpid()) + "." +
                                             std::to_string(counter++));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  TORCH_CHECK(fd >= 0, "cannot write '", path, "': cannot create the temporary file '", tmp, "': ",
              std::strerror(errno));
  bool open = true;
  try {
    write(fd);
    TORCH_CHECK(::fsync(fd) == 0, "cannot write '", path, "': fsync failed: ", std::strerror(errno));
    open = false;  // close releases the descriptor even when it reports an error
    TORCH_CHECK(::close(fd) == 0, "cannot write '", path, "': close failed: ", std::strerror(errno));
    TORCH_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, "cannot write '", path, "': rename from '", tmp,
                "' failed: ", std::strerror(errno));
  } catch (...) {
    if (open) ::close(fd);  // never twice: the number may already belong to another thread's file
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable; failure here loses nothing already written, so it is not an error.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void write_text_atomically(const std::string& path, const std::string& text) {
  write_file_atomically(path, [&](int fd) { write_all(fd, text.data(), text.size(), path); });
}

void copy_file(const std::string& from, const std::string& to) {
  const int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK(in >= 0, "cannot copy '", from, "': ", std::strerror(errno));
  try {
    write_file_atomically(to, [&](int out) {
      char buf[1 << 16];
      for (;;) {
        const ssize_t n = ::read(in, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        TORCH_CHECK(n >= 0, "cannot copy '", from, "': read failed: ", std::strerror(errno));
        if (n == 0) break;
        write_all(out, buf, uint64_t(n), to);
      }
    });
  } catch (...) {
    ::close(in);
    throw;
  }
  ::close(in);
}

std::string read_text_file(const std::string& path, uint64_t max_bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK(fd >= 0, "cannot read '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) > max_bytes) {
    ::close(fd);
    TORCH_CHECK(false, "'", path, "' is ", st.st_size, " bytes, more than the ", max_bytes, " allowed");
  }
  std::string text;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int e = errno;
      ::close(fd);
      TORCH_CHECK(false, "cannot read '", path, "': ", std::strerror(e));
    }
    if (n == 0) break;
    text.append(buf, size_t(n));
    if (text.size() > max_bytes) {
      ::close(fd);
      TORCH_CHECK(false, "'", path, "' is more than the ", max_bytes, " bytes allowed");
    }
  }
  ::close(fd);
  return text;
}

int copy_model_side_files(const std::string& from, const std::string& to) {
  int copied = 0;
  for (const auto& name : kModelSideFiles) {
    const std::string src = join_path(from, name);
    if (!is_regular_file(src)) continue;
    copy_file(src, join_path(to, name));
    ++copied;
  }
  return copied;
}

}  // namespace anvil::io
