// The arithmetic of a scale, shared verbatim by the CPU reference and the CUDA kernels so that both
// produce the same bits: amax is taken as the largest |x| bit pattern (so NaN, whose pattern is above
// inf's, wins and poisons the group), scale_inv = max(amax, kAmaxFloor) / qmax with IEEE division,
// and q = x / scale_inv (IEEE division, as DeepSeek-V3's act_quant does), clamped, then rounded to
// nearest even. A group holding NaN or inf gets scale_inv = NaN and q = NaN (fp8) or 0 (int8), so the
// poison survives dequantization instead of turning into plausible numbers.
#pragma once

#include "ops/common/det_math.h"

#include <cstdint>

#if defined(__CUDACC__)
#define ANVIL_HD __host__ __device__ __forceinline__
#else
#define ANVIL_HD inline
#endif

namespace anvil::ops {

constexpr float kFp8E4m3Max = 448.0f;  // largest finite float8_e4m3fn
constexpr float kInt8Max = 127.0f;     // symmetric int8: [-127, 127]
// The amax of an all-zero (or tiny) group is raised to this, so its scale is finite and non-zero and
// the group quantizes to zeros. vLLM and SGLang use the same floor for per-token-group fp8.
constexpr float kAmaxFloor = 1e-10f;
constexpr uint32_t kInfBits = 0x7f800000u;
constexpr uint8_t kFp8NanBits = 0x7f;

ANVIL_HD uint32_t float_bits(float f) { return det::bits_of(f); }
ANVIL_HD float bits_float(uint32_t u) { return det::float_of(u); }

// |x| as an ordered integer: comparing these compares magnitudes, with NaN above inf above finite.
ANVIL_HD uint32_t abs_bits(float x) { return float_bits(x) & 0x7fffffffu; }

// scale_inv from the group's amax pattern; NaN when the group held NaN or inf.
ANVIL_HD float scale_inv_from_amax_bits(uint32_t amax_bits, float qmax) {
  if (amax_bits >= kInfBits) return bits_float(0x7fc00000u);
  float amax = bits_float(amax_bits);
  amax = amax > kAmaxFloor ? amax : kAmaxFloor;
  return amax / qmax;
}

ANVIL_HD bool scale_is_poisoned(float scale_inv) { return !(scale_inv == scale_inv); }

// x / scale_inv clamped to [-qmax, qmax]; the caller rounds (to e4m3 or to an integer).
ANVIL_HD float scaled_clamped(float x, float scale_inv, float qmax) {
  float v = x / scale_inv;
  v = v < -qmax ? -qmax : v;
  v = v > qmax ? qmax : v;
  return v;
}

}  // namespace anvil::ops
