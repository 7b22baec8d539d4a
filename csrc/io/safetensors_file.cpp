// SafetensorsFile: one safetensors file mapped into memory and validated before use.
//
// The mapping is MAP_PRIVATE with write permission: tensors handed out are ordinary writable ATen
// tensors, and a write to one copies the touched page instead of faulting (a PROT_READ mapping would
// crash the process on the first in-place op) or reaching the file. Reading costs no anonymous memory:
// the pages are the page cache's. The mapping lives in a shared_ptr that every zero-copy tensor's
// deleter holds, so tensors outlive the SafetensorsFile they came from safely.
// A file truncated by someone else while mapped can still raise SIGBUS on access; that is the price
// of zero-copy loading and the same as the reference implementation's.
#include "anvil/io/safetensors.h"
#include "io/io_internal.h"

#include <c10/util/Exception.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace anvil::io {

struct Mapping {
  void* addr = MAP_FAILED;
  uint64_t size = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (addr != MAP_FAILED) munmap(addr, size);
  }
  const uint8_t* bytes() const { return static_cast<const uint8_t*>(addr); }
};

namespace {

std::shared_ptr<Mapping> map_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK(fd >= 0, "safetensors: cannot open '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    TORCH_CHECK(false, "safetensors: cannot stat '", path, "': ", std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    TORCH_CHECK(false, "safetensors: '", path, "' is not a regular file");
  }
  auto m = std::make_shared<Mapping>();
  m->size = static_cast<uint64_t>(st.st_size);
  if (m->size < 8) {  // mmap of an empty file fails; the header check reports the rule
    ::close(fd);
    uint8_t small[8] = {};
    parse_safetensors_header(small, m->size, path);
  }
  m->addr = ::mmap(nullptr, m->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);  // the mapping keeps the file referenced
  TORCH_CHECK(m->addr != MAP_FAILED, "safetensors: cannot map '", path, "' (", m->size, " bytes): ",
              std::strerror(err));
  return m;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path), mapping_(map_file(path)) {
  header_ = parse_safetensors_header(mapping_->bytes(), mapping_->size, path_);
  for (size_t i = 0; i < header_.entries.size(); ++i) index_.emplace(header_.entries[i].name, i);
}

const TensorEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  TORCH_CHECK(it != index_.end(), "safetensors: no tensor '", name, "' in '", path_, "' (", index_.size(),
              " tensors)");
  return header_.entries[it->second];
}

const uint8_t* SafetensorsFile::data(const TensorEntry& e) const {
  return mapping_->bytes() + 8 + header_.header_bytes + e.begin;
}

bool SafetensorsFile::is_zero_copy(const std::string& name) const {
  const TensorEntry& e = entry(name);
  const auto elem = static_cast<uintptr_t>(c10::elementSize(e.dtype));
  return e.nbytes() > 0 && reinterpret_cast<uintptr_t>(data(e)) % elem == 0;
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const TensorEntry& e = entry(name);
  const auto options = at::TensorOptions().dtype(e.dtype).device(at::kCPU);
  if (e.nbytes() == 0) return at::empty(e.shape, options);
  if (is_zero_copy(name)) {
    auto keep = mapping_;
    // The mapping is writable copy-on-write, so casting away const is sound: writes never reach the file.
    return at::from_blob(const_cast<uint8_t*>(data(e)), e.shape, [keep](void*) {}, options);
  }
  // Unaligned for its dtype (a file written without the reference writer's ordering): copy.
  at::Tensor out = at::empty(e.shape, options);  // (shape) dtype
  std::memcpy(out.data_ptr(), data(e), e.nbytes());
  return out;
}

}  // namespace anvil::io
