// Framework-free CPU fake quantization (forward and LSQ backward) on raw pointers.
// The tensor is seen as [outer, channels, inner], contiguous; one scale per channel.
#pragma once

#include <cstdint>

#include "fq/quant_math.h"

namespace fq::cpu {

// y = clamp(round(x / s_c)) * s_c.   T is float or uint16_t (bfloat16 bits).
template <typename T>
void fake_quant_forward(const T* x, const float* scale, T* y, int64_t outer, int64_t channels,
                        int64_t inner, QRange range);

// grad_x = STE-masked grad_y; grad_scale[c] = grad_factor * sum over channel c of
// grad_y * d y / d s (accumulated in double, then stored as float).
template <typename T>
void fake_quant_backward(const T* grad_y, const T* x, const float* scale, T* grad_x, float* grad_scale,
                         int64_t outer, int64_t channels, int64_t inner, QRange range, float grad_factor);

}  // namespace fq::cpu
