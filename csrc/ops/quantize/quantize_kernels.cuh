// CUDA kernels of the quantization ops (quantize_fp8/int8, dequantize_fp8/int8).
//
// These kernels are memory-bound: a bf16 -> fp8 block-1x128 quantization reads 2 bytes and writes
// 1 byte (+ 4 bytes of scale per 128 values) per element, so the goal is the device's copy bandwidth.
// Every thread moves 8 consecutive values of one row: one 16-byte load of bf16/fp16 (two of fp32) and
// one 8-byte store of fp8/int8. The layouts:
//   block1x128   a half-warp (16 lanes x 8 values) owns one 128-value group: the amax is a 16-lane
//                shuffle reduction, each value is read once and stays in registers.
//   block128x128 a 256-thread block owns one 128x128 tile: thread t holds columns 8*(t%16).. of rows
//                t/16 + 16*i (i < 8), 64 values in registers; one block reduction gives the amax.
//   row          a block per row: one pass for the amax, a second (from L1/L2) to quantize.
//   tensor       a grid-wide amax (atomicMax on the bit pattern, which orders |x| and puts NaN on top),
//                then an element-wise pass.
// The arithmetic (quantize_math.h) is the CPU reference's, so the two agree bit for bit: IEEE division,
// clamp, then the hardware's round-to-nearest-even conversion (cvt.rn.satfinite.e4m3x2 on sm_89+,
// cuda_fp8.h's exact emulation on sm_80; rintf for int8). Rows whose length is not a multiple of 8, or
// pointers not 16-byte aligned, take the scalar path (kVec false): the same mapping with bounds-checked loads.
#pragma once

#include "ops/quantize/quantize_math.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>

namespace anvil::ops::cuda {

constexpr int kVecValues = 8;    // values per thread-step
constexpr int kThreads = 256;    // threads per block in every kernel here
constexpr int kGroup = 128;      // side of a scaling block

// ---- loading 8 values as fp32 -------------------------------------------------------------------
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

// Loads x[c0 .. c0+8) of one row. kVec: one or two 16-byte loads (caller guarantees alignment and
// that all 8 are in range); otherwise element by element, with values at or past `limit` read as 0
// (a zero never raises an amax and its output is not stored).
template <typename T, bool kVec>
__device__ __forceinline__ void load8(const T* row, int64_t c0, int64_t limit, float (&v)[kVecValues]) {
  if constexpr (kVec) {
    if constexpr (sizeof(T) == 4) {
      const float4* p = reinterpret_cast<const float4*>(row + c0);
      const float4 a = p[0], b = p[1];
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + c0);
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < kVecValues; ++j) v[j] = to_f32(h[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVecValues; ++j) v[j] = (c0 + j < limit) ? to_f32(row[c0 + j]) : 0.0f;
  }
}

// ---- rounding and storing 8 quantized values ----------------------------------------------------
struct Fp8Out {  // float8_e4m3fn bits
  using Storage = uint8_t;
  static constexpr float kMax = kFp8E4m3Max;
  static constexpr uint8_t kPoison = kFp8NanBits;
  __device__ static uint16_t pack2(float a, float b) {
    return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  }
};
struct Int8Out {
  using Storage = int8_t;
  static constexpr float kMax = kInt8Max;
  static constexpr int8_t kPoison = 0;
  __device__ static uint16_t pack2(float a, float b) {
    const uint16_t lo = static_cast<uint8_t>(static_cast<int8_t>(rintf(a)));
    const uint16_t hi = static_cast<uint8_t>(static_cast<int8_t>(rintf(b)));
    return lo | (hi << 8);
  }
};

// Quantizes v with scale s and stores the 8 results at q_row[c0..). kVec: one 8-byte store.
template <typename Q, bool kVec>
__device__ __forceinline__ void quantize_store8(const float (&v)[kVecValues], float s, typename Q::Storage* q_row,
                                                int64_t c0, int64_t limit) {
  uint16_t pairs[4];
  if (scale_is_poisoned(s)) {
    const uint16_t p = static_cast<uint8_t>(Q::kPoison);
#pragma unroll
    for (int j = 0; j < 4; ++j) pairs[j] = p | (p << 8);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      pairs[j] = Q::pack2(scaled_clamped(v[2 * j], s, Q::kMax), scaled_clamped(v[2 * j + 1], s, Q::kMax));
  }
  if constexpr (kVec) {
    uint2 packed;
    packed.x = pairs[0] | (uint32_t(pairs[1]) << 16);
    packed.y = pairs[2] | (uint32_t(pairs[3]) << 16);
    *reinterpret_cast<uint2*>(q_row + c0) = packed;
  } else {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(pairs);
#pragma unroll
    for (int j = 0; j < kVecValues; ++j)
      if (c0 + j < limit) reinterpret_cast<uint8_t*>(q_row)[c0 + j] = bytes[j];
  }
}

__device__ __forceinline__ uint32_t amax_bits8(const float (&v)[kVecValues]) {
  uint32_t m = 0;
#pragma unroll
  for (int j = 0; j < kVecValues; ++j) m = max(m, abs_bits(v[j]));
  return m;
}

// Max over the block; every thread gets the result. `smem` holds one word per warp.
__device__ __forceinline__ uint32_t block_max(uint32_t m, uint32_t* smem) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  m = __reduce_max_sync(0xffffffffu, m);
  if (lane == 0) smem[warp] = m;
  __syncthreads();
  if (warp == 0) {
    uint32_t w = lane < blockDim.x / 32 ? smem[lane] : 0u;
    w = __reduce_max_sync(0xffffffffu, w);
    if (lane == 0) smem[0] = w;
  }
  __syncthreads();
  return smem[0];
}

// ---- block1x128: a half-warp per group ------------------------------------------------------------
// A block of 16 half-warps covers 16 * kGroupsPerHalfWarp consecutive groups; half-warp h takes groups
// base + h + 16 * i, so every load instruction of the block still reads consecutive memory, and all
// loads are issued before the first use. kWholeGroups (K % 128 == 0, the DeepSeek shapes): group g
// starts at element 128 * g and owns scale g, so no integer division is needed; a 64-bit division per
// group otherwise costs as much issue time as the rest of the kernel.
template <typename T, typename Q, bool kVec, bool kWholeGroups, int kGroupsPerHalfWarp>
__global__ void __launch_bounds__(kThreads) quantize_1x128_kernel(const T* __restrict__ x,
                                                                  typename Q::Storage* __restrict__ q,
                                                                  float* __restrict__ scale_inv, int64_t cols,
                                                                  int64_t groups_per_row, int64_t total_groups) {
  const int lane = threadIdx.x % 16;
  const unsigned half_mask = 0xffffu << (threadIdx.x & 16);
  const int64_t first = int64_t(blockIdx.x) * (kThreads / 16) * kGroupsPerHalfWarp + threadIdx.x / 16;
  float v[kGroupsPerHalfWarp][kVecValues];
  int64_t row_start[kGroupsPerHalfWarp], c0[kGroupsPerHalfWarp];  // element offset of the row; column
  bool live[kGroupsPerHalfWarp];  // this lane holds values of group i
#pragma unroll
  for (int i = 0; i < kGroupsPerHalfWarp; ++i) {
    const int64_t group = first + i * (kThreads / 16);
    if constexpr (kWholeGroups) {
      row_start[i] = group * kGroup;
      c0[i] = lane * kVecValues;
      live[i] = group < total_groups;
    } else {
      const int64_t r = group / groups_per_row;
      row_start[i] = r * cols;
      c0[i] = (group - r * groups_per_row) * kGroup + lane * kVecValues;
      live[i] = group < total_groups && c0[i] < cols;
    }
    if (live[i]) {
      load8<T, kVec>(x + row_start[i], c0[i], kWholeGroups ? kGroup : cols, v[i]);
    } else {
#pragma unroll
      for (int j = 0; j < kVecValues; ++j) v[i][j] = 0.0f;
    }
  }
#pragma unroll
  for (int i = 0; i < kGroupsPerHalfWarp; ++i) {
    const int64_t group = first + i * (kThreads / 16);
    uint32_t m = amax_bits8(v[i]);
#pragma unroll
    for (int offset = 8; offset > 0; offset /= 2) m = max(m, __shfl_xor_sync(half_mask, m, offset));
    const float s = scale_inv_from_amax_bits(m, Q::kMax);
    if (lane == 0 && group < total_groups) scale_inv[group] = s;
    if (live[i]) quantize_store8<Q, kVec>(v[i], s, q + row_start[i], c0[i], kWholeGroups ? kGroup : cols);
  }
}

// ---- block128x128: a block per tile --------------------------------------------------------------
template <typename T, typename Q, bool kVec>
__global__ void __launch_bounds__(kThreads) quantize_128x128_kernel(const T* __restrict__ x,
                                                                    typename Q::Storage* __restrict__ q,
                                                                    float* __restrict__ scale_inv, int64_t rows,
                                                                    int64_t cols, int64_t tiles_per_row) {
  __shared__ uint32_t smem[kThreads / 32];
  constexpr int kRowsPerStep = kThreads / 16;          // 16 rows covered by one step of the block
  constexpr int kSteps = kGroup / kRowsPerStep;        // 8 steps cover the 128 rows of a tile
  const int64_t tile_r = blockIdx.x / tiles_per_row, tile_c = blockIdx.x % tiles_per_row;
  const int64_t c0 = tile_c * kGroup + (threadIdx.x % 16) * kVecValues;
  const int64_t r_first = tile_r * kGroup + threadIdx.x / 16;
  float v[kSteps][kVecValues];
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    const int64_t r = r_first + i * kRowsPerStep;
    if (r < rows && c0 < cols) {
      load8<T, kVec>(x + r * cols, c0, cols, v[i]);
    } else {
#pragma unroll
      for (int j = 0; j < kVecValues; ++j) v[i][j] = 0.0f;
    }
    m = max(m, amax_bits8(v[i]));
  }
  m = block_max(m, smem);
  const float s = scale_inv_from_amax_bits(m, Q::kMax);
  if (threadIdx.x == 0) scale_inv[blockIdx.x] = s;
#pragma unroll
  for (int i = 0; i < kSteps; ++i) {
    const int64_t r = r_first + i * kRowsPerStep;
    if (r < rows && c0 < cols) quantize_store8<Q, kVec>(v[i], s, q + r * cols, c0, cols);
  }
}

// ---- row: a block per row -------------------------------------------------------------------------
template <typename T, typename Q, bool kVec>
__global__ void __launch_bounds__(kThreads) quantize_row_kernel(const T* __restrict__ x,
                                                                typename Q::Storage* __restrict__ q,
                                                                float* __restrict__ scale_inv, int64_t cols) {
  __shared__ uint32_t smem[kThreads / 32];
  const T* x_row = x + int64_t(blockIdx.x) * cols;
  float v[kVecValues];
  uint32_t m = 0;
  for (int64_t c0 = int64_t(threadIdx.x) * kVecValues; c0 < cols; c0 += kThreads * kVecValues) {
    load8<T, kVec>(x_row, c0, cols, v);
    m = max(m, amax_bits8(v));
  }
  m = block_max(m, smem);
  const float s = scale_inv_from_amax_bits(m, Q::kMax);
  if (threadIdx.x == 0) scale_inv[blockIdx.x] = s;
  for (int64_t c0 = int64_t(threadIdx.x) * kVecValues; c0 < cols; c0 += kThreads * kVecValues) {
    load8<T, kVec>(x_row, c0, cols, v);
    quantize_store8<Q, kVec>(v, s, q + int64_t(blockIdx.x) * cols, c0, cols);
  }
}

// ---- tensor: a grid-wide amax, then an element-wise pass over x viewed as one row ----------------
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) amax_kernel(const T* __restrict__ x, int64_t n,
                                                        uint32_t* __restrict__ amax_bits) {
  __shared__ uint32_t smem[kThreads / 32];
  float v[kVecValues];
  uint32_t m = 0;
  const int64_t stride = int64_t(gridDim.x) * kThreads * kVecValues;
  for (int64_t c0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVecValues; c0 < n; c0 += stride) {
    load8<T, kVec>(x, c0, n, v);
    m = max(m, amax_bits8(v));
  }
  m = block_max(m, smem);
  if (threadIdx.x == 0) atomicMax(amax_bits, m);
}

template <typename T, typename Q, bool kVec>
__global__ void __launch_bounds__(kThreads) quantize_tensor_kernel(const T* __restrict__ x,
                                                                   typename Q::Storage* __restrict__ q,
                                                                   float* __restrict__ scale_inv, int64_t n,
                                                                   const uint32_t* __restrict__ amax_bits) {
  const float s = scale_inv_from_amax_bits(*amax_bits, Q::kMax);
  if (blockIdx.x == 0 && threadIdx.x == 0) *scale_inv = s;
  float v[kVecValues];
  const int64_t stride = int64_t(gridDim.x) * kThreads * kVecValues;
  for (int64_t c0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVecValues; c0 < n; c0 += stride) {
    load8<T, kVec>(x, c0, n, v);
    quantize_store8<Q, kVec>(v, s, q, c0, n);
  }
}

// ---- dequantize: 8 values of one row per thread ---------------------------------------------------
struct Fp8In {
  using Storage = uint8_t;
  __device__ static float to_f32(uint8_t b) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(b, __NV_E4M3)));
  }
};
struct Int8In {
  using Storage = int8_t;
  __device__ static float to_f32(int8_t b) { return static_cast<float>(b); }
};

__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_out(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_out(__half* p, float v) { *p = __float2half_rn(v); }

// Which element of scale_inv covers (r, c); mode: 0 tensor, 1 row, 2 block1x128, 3 block128x128.
__device__ __forceinline__ int64_t scale_index(int mode, int64_t r, int64_t c, int64_t groups_per_row) {
  switch (mode) {
    case 0: return 0;
    case 1: return r;
    case 2: return r * groups_per_row + c / kGroup;
    default: return (r / kGroup) * groups_per_row + c / kGroup;
  }
}

template <typename Q, typename OutT, bool kVec>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(const typename Q::Storage* __restrict__ q,
                                                              const float* __restrict__ scale_inv,
                                                              OutT* __restrict__ out, int64_t rows, int64_t cols,
                                                              int mode, int64_t groups_per_row) {
  const int64_t chunks_per_row = (cols + kVecValues - 1) / kVecValues;
  const int64_t chunk = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (chunk >= rows * chunks_per_row) return;
  const int64_t r = chunk / chunks_per_row;
  const int64_t c0 = (chunk % chunks_per_row) * kVecValues;  // 8 values never straddle a 128-group
  const float s = scale_inv[scale_index(mode, r, c0, groups_per_row)];
  const typename Q::Storage* q_row = q + r * cols;
  OutT* out_row = out + r * cols;
  if constexpr (kVec) {
    const uint2 raw = *reinterpret_cast<const uint2*>(q_row + c0);
    const typename Q::Storage* b = reinterpret_cast<const typename Q::Storage*>(&raw);
    alignas(16) OutT o[kVecValues];
#pragma unroll
    for (int j = 0; j < kVecValues; ++j) store_out(&o[j], Q::to_f32(b[j]) * s);
    if constexpr (sizeof(OutT) == 4) {
      reinterpret_cast<uint4*>(out_row + c0)[0] = reinterpret_cast<const uint4*>(o)[0];
      reinterpret_cast<uint4*>(out_row + c0)[1] = reinterpret_cast<const uint4*>(o)[1];
    } else {
      *reinterpret_cast<uint4*>(out_row + c0) = *reinterpret_cast<const uint4*>(o);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVecValues; ++j)
      if (c0 + j < cols) store_out(out_row + c0 + j, Q::to_f32(q_row[c0 + j]) * s);
  }
}

}  // namespace anvil::ops::cuda
