// Host side of the TMA loads of the Hopper sparse_attention kernels: the (D, S, heads) tensor map of a
// (B, H, S, D) contiguous tensor with (64 columns, 64 rows) boxes and the 128-byte swizzle (the wgmma
// shared-memory layout of sparse_attention_sm90.cuh), through cuTensorMapEncodeTiled from the runtime's
// driver entry point (no link against libcuda). Included by the sm_90a files only.
#pragma once

#include "ops/sparse_attention/sparse_attention_kernels.cuh"
#include "ops/sparse_attention/sparse_attention_sm90.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <type_traits>

namespace anvil::ops::sparse_cuda {

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult status{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &status));
    TORCH_CHECK(status == cudaDriverEntryPointSuccess && f != nullptr,
                "sparse_attention: cuTensorMapEncodeTiled is not available from the driver");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// (D, S, heads) view of a (B, H, S, D) contiguous tensor, boxes of 64 columns x 64 rows, 128-byte swizzle.
template <typename T, int D>
inline CUtensorMap head_map(const void* ptr, int64_t seq, int64_t heads) {
  CUtensorMap map;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(seq), static_cast<cuuint64_t>(heads)};
  const cuuint64_t strides[2] = {D * sizeof(T), static_cast<cuuint64_t>(seq) * D * sizeof(T)};
  const cuuint32_t box[3] = {64, static_cast<cuuint32_t>(kTile), 1};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  const auto dtype = std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult r = encode_fn()(&map, dtype, 3, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "sparse_attention: cuTensorMapEncodeTiled failed with CUresult ", static_cast<int>(r));
  return map;
}

// The tensor maps of q, k and v of the kernels' parameters (forward, dq and dk/dv alike).
template <typename T, int D>
inline sm90::TmaMaps qkv_maps(const Params& p) {
  const int64_t hq = static_cast<int64_t>(p.batch) * p.heads_q, hkv = static_cast<int64_t>(p.batch) * p.heads_kv;
  sm90::TmaMaps maps;
  maps.q = head_map<T, D>(p.q, p.seq, hq);
  maps.k = head_map<T, D>(p.k, p.seq, hkv);
  maps.v = head_map<T, D>(p.v, p.seq, hkv);
  return maps;
}

}  // namespace anvil::ops::sparse_cuda
