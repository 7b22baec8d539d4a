// Helpers shared by the io sources and not part of the public API: the writer's dtype order, the
// staging-ring plan, page-locked file mappings, strict JSON. Paths and atomic writes: anvil/io/fs.h.
#pragma once

#include "anvil/io/fs.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace anvil::io::detail {

/// The reference writer's dtype order (its enum order): tensors are written by rank descending, then
/// name. -1 for an unknown name.
int safetensors_dtype_rank(const std::string& dtype_name);

/// One piece of a staging-ring plan: `bytes` bytes of tensor `tensor`, from `tensor_offset` in it, at
/// `staging_offset` in the chunk's staging buffer.
struct RingPiece {
  size_t tensor;
  uint64_t tensor_offset, staging_offset, bytes;
};
/// One fill of a staging buffer: the ring slot it uses and the pieces it carries.
struct RingChunk {
  int slot;
  std::vector<RingPiece> pieces;
};
/// How tensors of the given byte sizes, back to back, stream through a ring of `ring` staging buffers of
/// `chunk` bytes: chunks fill their buffer completely except the last, slots cycle 0, 1, ..., ring-1, 0,
/// and a tensor larger than a chunk spans several. Zero-size tensors get no piece. Pure, so the CPU
/// tests check it; load_all's GPU path executes it.
std::vector<RingChunk> plan_ring(const std::vector<uint64_t>& sizes, uint64_t chunk, int ring);

/// A whole file mapped read-only and page-locked (cudaHostRegister, read-only) so the GPU copies from it
/// directly: load_all's fast path to a CUDA device (host_register.cpp says why).
class RegisteredFile {
 public:
  /// nullptr, with the reason in *why_not, where registration is not available (a build without CUDA, a
  /// device without read-only registration, a failed mapping or registration); throws naming `path`
  /// when the file cannot be opened.
  static std::unique_ptr<RegisteredFile> open(const std::string& path, std::string* why_not);
  ~RegisteredFile();
  RegisteredFile(const RegisteredFile&) = delete;
  RegisteredFile& operator=(const RegisteredFile&) = delete;
  /// The file's bytes (page-locked, valid while this object lives).
  const uint8_t* bytes() const { return static_cast<const uint8_t*>(addr_); }
  size_t size() const { return size_; }

 private:
  RegisteredFile() = default;
  void* addr_ = nullptr;
  size_t size_ = 0;
  bool registered_ = false;
};

/// One ggml block quantizer: a block of the type's element count (fp32) -> its bytes (csrc/io/gguf_kquants.cpp).
using GgmlBlockQuantizer = void (*)(const float* x, uint8_t* out);
/// ggml's reference quantizer for Q4_K, Q5_K, Q6_K, Q5_0 or Q5_1 (quantize_row_*_ref, bit-exact); nullptr for
/// another type (Q8_0 and Q4_0 are in gguf_writer.cpp).
GgmlBlockQuantizer ggml_block_quantizer(uint32_t type);

}  // namespace anvil::io::detail
