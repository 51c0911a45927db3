// Launchers of the CUDA kernels, on raw device pointers and a cudaStream_t passed
// as an opaque handle (so this header needs no CUDA include). Each returns the
// CUDA error string of the launch, or nullptr on success.
#pragma once

#include <cstdint>

#include "fq/fisher_args.h"
#include "fq/quant_math.h"

namespace fq::cuda {

// Makes `device` current for the guard's lifetime (launches go to the current device,
// whatever device the stream or pointers belong to), then restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// dtype_code: 0 = float32, 1 = bfloat16, 2 = float16.
const char* fake_quant_forward(const void* x, const float* scale, void* y, int dtype_code, int64_t outer,
                               int64_t channels, int64_t inner, QRange range, void* stream);

// grad_scale must hold `channels` floats; it is zeroed and then accumulated.
const char* fake_quant_backward(const void* grad_y, const void* x, const float* scale, void* grad_x,
                                float* grad_scale, int dtype_code, int64_t outer, int64_t channels,
                                int64_t inner, QRange range, float grad_factor, void* stream);


// ---- quant_gemm (quant_linear / quant_matmul, csrc/cuda/quant_linear.cu) ----
// C[z, m, n] = sum_k A'[z, m, k] B'[z, k, n], operands fake-quantized (or quantized to
// int8 codes on the integer path) as they are loaded; epilogue: scales and bias
// (forward) or the STE mask against E plus the LSQ scale gradient (backward).
struct QuantOperand {
  bool quantized;
  const float* scale;  // per tensor (A, E), or as b_scale_mode says (B); E also per row m
  QRange range;
};

struct QuantGemmArgs {
  const void* a;  // [Z, M, K], strides sa (in elements: z, row, col); any float dtype T
  const void* b;  // [Z, K, N], strides sb; dtype T
  float* c;       // [Z, M, N], strides sc
  int64_t Z, M, N, K;
  int64_t sa[3], sb[3], sc[3];
  QuantOperand qa, qb;
  int b_scale_mode;    // 0: per tensor, 1: per n, 2: per k
  const float* bias;   // [N] or null
  const void* e;       // null, or [Z, M, N] of dtype T with C's strides: STE epilogue
  QuantOperand qe;
  bool e_per_row;      // E's scale per row m (else per tensor)
  float grad_factor;
  float* grad_scale;   // [M] or [1]; accumulated into (zero it first)
};

// int8_path: A and B codes fit int8 and their scales factor out (mode 0 or 1).
const char* quant_gemm(const QuantGemmArgs& args, int dtype_code, bool int8_path, void* stream);

// ---- per_sample_fisher (csrc/cuda/fisher.cu) ----
// The arguments of fq/fisher_args.h with float32 inputs (bf16 false) and grad_weight
// written, never accumulated (grad_accumulate false).
const char* per_sample_fisher(const FisherArgs& args, void* stream);

}  // namespace fq::cuda
