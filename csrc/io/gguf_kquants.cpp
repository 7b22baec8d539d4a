// ggml's reference quantizers for the 256-element super-block types Q4_K, Q5_K and Q6_K, and the 32-element
// Q5_0 / Q5_1 that llama-quantize falls back to when a row is not a multiple of 256 (io_internal.h).
//
// Written from ggml-quants.c (quantize_row_q4_K_ref, quantize_row_q5_K_ref, quantize_row_q6_K_ref with their
// helpers make_qkx2_quants and make_qx_quants, quantize_row_q5_0_ref, quantize_row_q5_1_ref) and the block
// structs of ggml-common.h. These are what llama-quantize runs when no importance matrix is given
// (quantize_q4_K & co. call the _ref functions when quant_weights is NULL), so the bytes here are the bytes
// llama-quantize writes from the same fp32 values. Every float operation is in ggml's order and the file is
// compiled with -ffp-contract=off (CMakeLists.txt): the scale searches compare sums of products, and a fused
// multiply-add or a reordered sum flips a comparison and with it a whole sub-block. tests/python/test_gguf_kquants.py
// compiles ggml-quants.c itself and compares bytes.
//
// The algorithms, briefly (docs/FORMATS.md "GGUF export" has the byte layouts):
// - Q4_K / Q5_K: x ~= d * sc_j * q - dmin * m_j over 8 sub-blocks of 32, q in [0, 15] / [0, 31]. Each sub-block's
//   (scale, min) comes from a weighted least-squares search over 21 / 16 candidate grids (make_qkx2_quants,
//   weights |x| + rms(x)); the 8 scales and 8 mins are then quantized to 6 bits against the super-block's fp16 d
//   and dmin, and the values re-rounded against the quantized scales.
// - Q6_K: x ~= d * sc_j * (q - 32) over 16 sub-blocks of 16, q in [0, 63], sc_j int8. Each sub-block's scale is
//   the best of 19 grids by the x^2-weighted error (make_qx_quants, rmse_type 1); the scales go to int8 against
//   d = max_scale / -128.
#include "io_internal.h"

#include "anvil/io/gguf.h"

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace anvil::io::detail {
namespace {

constexpr int kQK = 256;             // QK_K
constexpr float kGroupMaxEps = 1e-15f;  // GROUP_MAX_EPS

uint16_t to_fp16(float v) { return c10::Half(v).x; }
float from_fp16(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

// ggml's nearest_int: round half to even through the 1.5 * 2^23 trick (valid for |x| < 2^22; outside that
// the same bits come out as in ggml, and the callers clamp them).
int nearest_int(float x) {
  const float v = x + 12582912.f;
  int32_t i;
  std::memcpy(&i, &v, 4);
  return (i & 0x007fffff) - 0x00400000;
}

// make_qkx2_quants: the (scale, min) of n values with q in [0, nmax] minimizing the weighted squared error,
// trying the grids (nmax + rmin + rdelta * is) / (max - min) for is = 0..nstep after the plain one. Writes the
// chosen levels to L and -min to *the_min; returns the scale.
float make_qkx2(int n, int nmax, const float* x, const float* w, uint8_t* L, float* the_min, uint8_t* laux,
                float rmin, float rdelta, int nstep) {
  float min = x[0], max = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -min;
    return 0.f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    const int l = nearest_int(iscale * (x[i] - min));
    L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    float diff = scale * L[i] + min - x[i];
    diff = diff * diff;
    best_error += w[i] * diff;
  }
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * (x[i] - min));
      l = std::max(0, std::min(nmax, l));
      laux[i] = static_cast<uint8_t>(l);
      sum_l += w[i] * l;
      sum_l2 += w[i] * l * l;
      sum_xl += w[i] * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * laux[i] + this_min - x[i];
        diff = diff * diff;
        cur_error += w[i] * diff;
      }
      if (cur_error < best_error) {
        for (int i = 0; i < n; ++i) L[i] = laux[i];
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *the_min = -min;
  return scale;
}

// make_qx_quants with rmse_type 1 and no importance weights (weights x^2): the symmetric scale of n values with
// levels l in [-nmax, nmax - 1] (stored as l + nmax in L), the best of the grids -(nmax + 0.1 is) / max,
// is = -9..9, by sum(w x l)^2 / sum(w l^2).
float make_qx_rmse1(int n, int nmax, const float* x, int8_t* L) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = nearest_int(iscale * x[i]);
    l = std::max(-nmax, std::min(nmax - 1, l));
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      int l = nearest_int(iscale * x[i]);
      l = std::max(-nmax, std::min(nmax - 1, l));
      const float w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) {
        const int l = nearest_int(iscale * x[i]);
        L[i] = static_cast<int8_t>(nmax + std::max(-nmax, std::min(nmax - 1, l)));
      }
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// The 6-bit scale and min of sub-block j from the 12 packed bytes (get_scale_min_k4).
void scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// The shared part of Q4_K and Q5_K: per sub-block (scale, min) by make_qkx2, the 6-bit packed scales, d and
// dmin (written at out[0..4), scales at out[4..16)), and the final levels L (0..nmax) of all 256 values.
void quantize_k_scales_and_levels(const float* x, int nmax, float rmin, int nstep, uint8_t* out, uint8_t* L) {
  uint8_t laux[32];
  float weights[32], mins[8], scales[8];
  float max_scale = 0, max_min = 0;  // with the min subtracted, scales are positive
  for (int j = 0; j < 8; ++j) {
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += x[32 * j + l] * x[32 * j + l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(x[32 * j + l]);
    scales[j] = make_qkx2(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], laux, rmin, 0.1f, nstep);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  uint8_t* packed = out + 4;  // scales[12]
  std::memset(packed, 0, 12);
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  for (int j = 0; j < 8; ++j) {
    uint8_t ls = static_cast<uint8_t>(nearest_int(inv_scale * scales[j]));
    uint8_t lm = static_cast<uint8_t>(nearest_int(inv_min * mins[j]));
    ls = std::min<uint8_t>(63, ls);
    lm = std::min<uint8_t>(63, lm);
    if (j < 4) {
      packed[j] = ls;
      packed[j + 4] = lm;
    } else {  // low 4 bits in bytes 8..11, high 2 bits in the top of bytes 0..7
      packed[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
      packed[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
      packed[j] |= static_cast<uint8_t>((lm >> 4) << 6);
    }
  }
  const uint16_t d = to_fp16(max_scale / 63.f), dmin = to_fp16(max_min / 63.f);
  std::memcpy(out, &d, 2);
  std::memcpy(out + 2, &dmin, 2);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    scale_min_k4(j, packed, sc, m);
    const float dj = from_fp16(d) * sc;
    if (!dj) continue;  // the sub-block keeps make_qkx2's levels
    const float dm = from_fp16(dmin) * m;
    for (int ii = 0; ii < 32; ++ii) {
      const int l = nearest_int((x[32 * j + ii] + dm) / dj);
      L[32 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
    }
  }
}

// block_q4_K { ggml_half d, dmin; uint8_t scales[12]; uint8_t qs[128]; }: 144 bytes. Each 32 bytes of qs hold two
// sub-blocks: values 64 c + l in the low nibble of byte 32 c + l, 64 c + 32 + l in its high nibble.
void quantize_block_q4_k(const float* x, uint8_t* out) {
  uint8_t L[kQK];
  quantize_k_scales_and_levels(x, 15, -1.f, 20, out, L);
  uint8_t* q = out + 16;
  for (int j = 0; j < kQK; j += 64) {
    for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
    q += 32;
  }
}

// block_q5_K { ggml_half d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; }: 176 bytes. Low 4 bits as
// Q4_K's qs; the fifth bit of value 64 c + l in bit 2c of qh[l], of 64 c + 32 + l in bit 2c + 1.
void quantize_block_q5_k(const float* x, uint8_t* out) {
  uint8_t L[kQK];
  quantize_k_scales_and_levels(x, 31, -0.5f, 15, out, L);
  uint8_t* qh = out + 16;
  uint8_t* ql = out + 48;
  std::memset(qh, 0, 32);
  uint8_t m1 = 1, m2 = 2;
  for (int n = 0; n < kQK; n += 64) {
    for (int j = 0; j < 32; ++j) {
      int l1 = L[n + j], l2 = L[n + j + 32];
      if (l1 > 15) {
        l1 -= 16;
        qh[j] |= m1;
      }
      if (l2 > 15) {
        l2 -= 16;
        qh[j] |= m2;
      }
      ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
    }
    m1 <<= 2;
    m2 <<= 2;
    ql += 32;
  }
}

// block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; }: 210 bytes. Two halves of 128;
// in a half, value l + 32 k (k = 0..3) has its low nibble in ql[l + 32 (k % 2)] (low nibble for k < 2, high
// for k >= 2) and its top 2 bits in qh[l] bits 2k..2k+1.
void quantize_block_q6_k(const float* x, uint8_t* out) {
  int8_t L[kQK];
  float scales[16];
  float max_scale = 0, max_abs_scale = 0;
  for (int ib = 0; ib < 16; ++ib) {
    const float scale = make_qx_rmse1(16, 32, x + 16 * ib, L + 16 * ib);
    scales[ib] = scale;
    const float abs_scale = std::fabs(scale);
    if (abs_scale > max_abs_scale) {
      max_abs_scale = abs_scale;
      max_scale = scale;
    }
  }
  std::memset(out, 0, 210);
  if (max_abs_scale < kGroupMaxEps) return;  // an all-zero block: d = 0, all bytes 0
  int8_t* sc = reinterpret_cast<int8_t*>(out + 192);
  const float iscale = -128.f / max_scale;
  const uint16_t d = to_fp16(1 / iscale);
  std::memcpy(out + 208, &d, 2);
  for (int ib = 0; ib < 16; ++ib) sc[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));
  for (int j = 0; j < 16; ++j) {
    const float dj = from_fp16(d) * sc[j];
    if (!dj) continue;
    for (int ii = 0; ii < 16; ++ii) {
      int l = nearest_int(x[16 * j + ii] / dj);
      l = std::max(-32, std::min(31, l));
      L[16 * j + ii] = static_cast<int8_t>(l + 32);
    }
  }
  uint8_t* ql = out;
  uint8_t* qh = out + 128;
  for (int j = 0; j < kQK; j += 128) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF, q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
      ql[l] = static_cast<uint8_t>(q1 | (q3 << 4));
      ql[l + 32] = static_cast<uint8_t>(q2 | (q4 << 4));
      qh[l] = static_cast<uint8_t>((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                   ((L[j + l + 96] >> 4) << 6));
    }
    ql += 64;
    qh += 32;
  }
}

// block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }: 22 bytes. d = max / -16 (max the element of largest
// magnitude, first on ties), q = min(31, trunc(x / d + 16.5)); low nibbles as Q4_0, fifth bit of value j in bit j
// of the little-endian qh.
void quantize_block_q5_0(const float* x, uint8_t* out) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < 32; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -16;
  const float id = d ? 1.0f / d : 0.0f;
  const uint16_t dh = to_fp16(d);
  std::memcpy(out, &dh, 2);
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const float x0 = x[j] * id, x1 = x[16 + j] * id;
    const uint8_t xi0 = static_cast<uint8_t>(std::min(31, static_cast<int>(static_cast<int8_t>(x0 + 16.5f))));
    const uint8_t xi1 = static_cast<uint8_t>(std::min(31, static_cast<int>(static_cast<int8_t>(x1 + 16.5f))));
    out[6 + j] = static_cast<uint8_t>((xi0 & 0x0F) | ((xi1 & 0x0F) << 4));
    qh |= ((xi0 & 0x10u) >> 4) << j;
    qh |= ((xi1 & 0x10u) >> 4) << (j + 16);
  }
  std::memcpy(out + 2, &qh, 4);
}

// block_q5_1 { ggml_half d, m; uint8_t qh[4]; uint8_t qs[16]; }: 24 bytes. d = (max - min) / 31, m = min,
// q = trunc((x - min) / d + 0.5); bits as Q5_0.
void quantize_block_q5_1(const float* x, uint8_t* out) {
  float min = x[0], max = x[0];
  for (int j = 1; j < 32; ++j) {
    if (x[j] < min) min = x[j];
    if (x[j] > max) max = x[j];
  }
  const float d = (max - min) / ((1 << 5) - 1);
  const float id = d ? 1.0f / d : 0.0f;
  const uint16_t dh = to_fp16(d), mh = to_fp16(min);
  std::memcpy(out, &dh, 2);
  std::memcpy(out + 2, &mh, 2);
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const float x0 = (x[j] - min) * id, x1 = (x[16 + j] - min) * id;
    const uint8_t xi0 = static_cast<uint8_t>(x0 + 0.5f), xi1 = static_cast<uint8_t>(x1 + 0.5f);
    out[8 + j] = static_cast<uint8_t>((xi0 & 0x0F) | ((xi1 & 0x0F) << 4));
    qh |= ((xi0 & 0x10u) >> 4) << j;
    qh |= ((xi1 & 0x10u) >> 4) << (j + 16);
  }
  std::memcpy(out + 4, &qh, 4);
}

}  // namespace

GgmlBlockQuantizer ggml_block_quantizer(uint32_t type) {
  switch (type) {
    case ggml_type::kQ4_K: return quantize_block_q4_k;
    case ggml_type::kQ5_K: return quantize_block_q5_k;
    case ggml_type::kQ6_K: return quantize_block_q6_k;
    case ggml_type::kQ5_0: return quantize_block_q5_0;
    case ggml_type::kQ5_1: return quantize_block_q5_1;
    default: return nullptr;
  }
}

}  // namespace anvil::io::detail
