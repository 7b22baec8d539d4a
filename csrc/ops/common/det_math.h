// Deterministic float arithmetic, identical bit for bit on the CPU and in CUDA kernels.
//
// expf differs between glibc and CUDA by an ulp here and there, and nvcc fuses a*b+c into an FMA
// where g++ (x86-64 without -mfma) does not. An op whose discrete output depends on float compares
// (the MoE gate's top-k) must see the same bits on both devices, so it computes with these: every
// product and sum is rounded explicitly (__fmul_rn/__fadd_rn stop nvcc from contracting), fused
// multiply-adds are written as fmaf (correctly rounded on both), and exp is Cephes' expf algorithm
// (Cody-Waite reduction, degree-6 polynomial), accurate to about 1 ulp.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ANVIL_DET __host__ __device__ __forceinline__
#else
#define ANVIL_DET inline
#endif

namespace anvil::ops::det {

ANVIL_DET float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

ANVIL_DET float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

ANVIL_DET float ieee_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

ANVIL_DET uint32_t bits_of(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}

ANVIL_DET float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

ANVIL_DET float fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

ANVIL_DET float round_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}

ANVIL_DET float pow2(int n) { return float_of(uint32_t(n + 127) << 23); }  // 2^n, n in [-126, 127]

// e^x. NaN stays NaN; overflow gives inf, underflow 0 (through subnormals).
ANVIL_DET float exp(float x) {
  if (!(x == x)) return x;
  if (x > 88.72283935546875f) return INFINITY;
  if (x < -103.97208404541015625f) return 0.0f;
  const float n = round_even(mul(x, 1.44269504088896341f));
  float r = fma(-n, 0.693359375f, x);     // ln 2, high part (exact in few bits)
  r = fma(-n, -2.12194440e-4f, r);        // ln 2, low part
  float p = 1.9875691500e-4f;
  p = fma(p, r, 1.3981999507e-3f);
  p = fma(p, r, 8.3334519073e-3f);
  p = fma(p, r, 4.1665795894e-2f);
  p = fma(p, r, 1.6666665459e-1f);
  p = fma(p, r, 5.0000001201e-1f);
  const float y = add(fma(p, mul(r, r), r), 1.0f);
  const int k = static_cast<int>(n);  // in [-150, 128]
  const int k1 = k / 2;
  return mul(mul(y, pow2(k1)), pow2(k - k1));  // two steps: 2^k alone may not be a normal float
}


// a / b within about 1 ulp, for b in (2^-125, 2^125): a bit-trick seed of 1/b, three Newton steps and
// one correction of the quotient, all FMAs (10 instructions; the IEEE division is ~4x that on the GPU,
// and the gate computes one per expert). Outside that range, and for b <= 0 or non-finite, the IEEE
// division (the branch is the same on both devices, so the bits still agree).
ANVIL_DET float div(float a, float b) {
  if (!(b > 2.35098870e-38f && b < 4.25352959e+37f)) return ieee_div(a, b);
  float r = float_of(0x7ef311c3u - bits_of(b));
  r = fma(r, fma(-b, r, 1.0f), r);
  r = fma(r, fma(-b, r, 1.0f), r);
  r = fma(r, fma(-b, r, 1.0f), r);
  const float q = mul(a, r);
  return fma(fma(-b, q, a), r, q);
}

ANVIL_DET float sigmoid(float x) { return div(1.0f, add(1.0f, exp(-x))); }

}  // namespace anvil::ops::det
