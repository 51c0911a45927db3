// Launchers of the CUDA kernels, on raw device pointers and a cudaStream_t passed
// as an opaque handle (so this header needs no CUDA include). Each returns the
// CUDA error string of the launch, or nullptr on success.
#pragma once

#include <cstdint>

#include "fq/quant_math.h"

namespace fq::cuda {

// dtype_code: 0 = float32, 1 = bfloat16, 2 = float16.
const char* fake_quant_forward(const void* x, const float* scale, void* y, int dtype_code, int64_t outer,
                               int64_t channels, int64_t inner, QRange range, void* stream);

// grad_scale must hold `channels` floats; it is zeroed and then accumulated.
const char* fake_quant_backward(const void* grad_y, const void* x, const float* scale, void* grad_x,
                                float* grad_scale, int dtype_code, int64_t outer, int64_t channels,
                                int64_t inner, QRange range, float grad_factor, void* stream);

}  // namespace fq::cuda
