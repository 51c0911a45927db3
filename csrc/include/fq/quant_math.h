// Quantization math shared by the CPU (C++) and CUDA kernels.
//
// Everything here is __host__ __device__ inline so that the CPU tests exercise
// exactly the arithmetic the GPU runs. Conventions follow torch's
// _fake_quantize_learnable_per_channel_affine with zero point 0, so torch can
// serve as an oracle:
//   code   q  = round_half_even(x * inv_scale)            (inv_scale = 1.0f / scale, see inv_scale)
//   value  y  = clamp(q, qmin, qmax) * scale
//   STE    dx = dy  if qmin <= q <= qmax  else 0            (mask on the rounded code)
//   LSQ    ds = dy * (clamp(q)*scale - x) * inv_scale  inside the range,
//          ds = dy * qmin (below) or dy * qmax (above) outside.
#pragma once

#include <cfloat>
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define FQ_HD __host__ __device__ __forceinline__
#else
#define FQ_HD inline
#endif

namespace fq {

struct QRange {
  float qmin;
  float qmax;
};

// Signed b-bit codes span [-2^(b-1), 2^(b-1)-1] (LSQ's convention), unsigned [0, 2^b-1].
FQ_HD QRange qrange(int bits, bool is_signed) {
  const float levels = static_cast<float>(1 << bits);
  return is_signed ? QRange{-levels / 2.0f, levels / 2.0f - 1.0f} : QRange{0.0f, levels - 1.0f};
}

// Round half to even without libm: adding 1.5 * 2^23 moves |v| < 2^22 into the
// binade where the float spacing is exactly 1, so the FPU's own round-to-nearest-even
// does the rounding. Larger |v| (far outside every 2..8 bit range), inf and NaN pass
// through unchanged; they are clamped or masked afterwards. Must not be compiled
// with -ffast-math (which would fold (v + M) - M to v).
FQ_HD float round_half_even(float v) {
  const float magic = 12582912.0f;  // 1.5 * 2^23
  return fabsf(v) < 4194304.0f ? (v + magic) - magic : v;
}

// Clamp written with comparisons so that a NaN code stays NaN (fminf would drop it).
FQ_HD float clamp_code(float q, QRange r) { return q < r.qmin ? r.qmin : (q > r.qmax ? r.qmax : q); }

FQ_HD bool code_in_range(float q, QRange r) { return q >= r.qmin && q <= r.qmax; }

// x * inv_scale rounded once, as torch computes it: never fused with the rounding
// trick's addition into an FMA (the CPU build also passes -ffp-contract=off).
FQ_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// 1 / scale, at most FLT_MAX: the reciprocal of a subnormal scale below 2^-128 overflows,
// and 0 * inf would give a NaN code where 0 is exactly code 0 at every scale. Larger
// |x| still saturate. Matches reference.inv_scale.
FQ_HD float inv_scale(float scale) {
  const float inv = 1.0f / scale;
  return inv < FLT_MAX ? inv : FLT_MAX;
}

// The unclamped integer code of x (as a float; NaN for NaN input).
FQ_HD float quant_code(float x, float inv_scale) { return round_half_even(mul_rn(x, inv_scale)); }

FQ_HD float fake_quant_value(float x, float scale, float inv_scale, QRange r) {
  return clamp_code(quant_code(x, inv_scale), r) * scale;
}

// d(fake_quant(x))/d(scale) for one element, before multiplying by dy and the
// LSQ gradient factor.
FQ_HD float lsq_scale_grad(float x, float q, float scale, float inv_scale, QRange r) {
  if (q < r.qmin) return r.qmin;
  if (q > r.qmax) return r.qmax;
  return (mul_rn(q, scale) - x) * inv_scale;  // q * scale rounded first, as torch does
}

// bfloat16 <-> float by bit manipulation (round to nearest even, NaN kept quiet),
// so the same code serves host and device without framework headers.
FQ_HD float bf16_to_float(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

FQ_HD uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace fq
