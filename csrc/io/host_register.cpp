// A shard mapped read-only and page-locked for DMA, so load_all copies it to the GPU straight from the
// page cache: no staging buffer, no host copy. Measured on the H100 machine (bench/profile/load_paths.py,
// 2026-11-23, a 4.3 GB file in a warm page cache): cudaHostRegister of the mapping 0.13-0.16 s, then one
// host-to-device copy, 16 GB/s together; the pageable copy that load_file + .to("cuda") does, 6.3 GB/s;
// anvil's earlier pread-into-a-pinned-ring path, ~6.5 GB/s.
//
// The mapping is its own (PROT_READ, MAP_SHARED) and registered with cudaHostRegisterReadOnly: pinning a
// writable private mapping would ask for write access and copy every page into anonymous memory (the
// SafetensorsFile's mapping is MAP_PRIVATE and writable, for its copy-on-write CPU tensors). Pinned page
// cache is file-backed memory, so the load's anonymous memory stays near zero.
//
// Only this file uses the CUDA runtime, and only in CUDA builds; elsewhere it reports "not available" and
// load_all takes its device-generic ring path.
#include "io/io_internal.h"

#include <c10/util/Exception.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#ifdef ANVIL_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace anvil::io::detail {

RegisteredFile::~RegisteredFile() {
#ifdef ANVIL_WITH_CUDA
  if (registered_) cudaHostUnregister(addr_);
#endif
  if (addr_ != nullptr) ::munmap(addr_, size_);
}

std::unique_ptr<RegisteredFile> RegisteredFile::open(const std::string& path, std::string* why_not) {
#ifndef ANVIL_WITH_CUDA
  if (why_not) *why_not = "this build has no CUDA";
  (void)path;
  return nullptr;
#else
  int supported = 0;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&supported, cudaDevAttrHostRegisterReadOnlySupported, device) != cudaSuccess ||
      !supported) {
    cudaGetLastError();  // clear the error state, so that later CUDA calls do not report it
    if (why_not) *why_not = "the device cannot register read-only host memory";
    return nullptr;
  }
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK(fd >= 0, "safetensors: cannot open '", path, "': ", std::strerror(errno));
  struct stat st {};
  const bool ok = ::fstat(fd, &st) == 0;
  const int stat_err = errno;
  if (!ok) ::close(fd);
  TORCH_CHECK(ok, "safetensors: cannot stat '", path, "': ", std::strerror(stat_err));
  std::unique_ptr<RegisteredFile> r(new RegisteredFile());
  r->size_ = static_cast<size_t>(st.st_size);
  void* addr = r->size_ > 0 ? ::mmap(nullptr, r->size_, PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
  ::close(fd);  // the mapping keeps the file referenced
  if (addr == MAP_FAILED) {
    if (why_not) *why_not = std::string("mmap failed: ") + std::strerror(errno);
    return nullptr;
  }
  r->addr_ = addr;
  const cudaError_t err = cudaHostRegister(addr, r->size_, cudaHostRegisterReadOnly);
  if (err != cudaSuccess) {
    cudaGetLastError();
    if (why_not) *why_not = std::string("cudaHostRegister failed: ") + cudaGetErrorString(err);
    return nullptr;  // the destructor unmaps
  }
  r->registered_ = true;
  return r;
#endif
}

}  // namespace anvil::io::detail
