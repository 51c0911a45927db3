// Arguments of the per-sample Fisher kernels (CPU and CUDA): for x [N, T, K] and
// grad_out d [N, T, M] given by element strides (either layout, no copies), one pass computes
//   fisher     [M, K]  sum_n (D_n^T X_n)^2          (float or double, += or =)
//   grad_weight[M, K]  sum_n  D_n^T X_n             (float or double, += or =)
//   sq_norms   [N]     ||D_n^T X_n||_F^2            (float or double, =)
// each optional (nullptr), without ever holding the per-sample gradients.
// Framework-free: the CUDA kernels include it too.
#pragma once

#include <cstdint>

namespace fq {

struct FisherArgs {
  const void* x;
  const void* d;
  bool bf16;                       // inputs are bfloat16 bits (else float32)
  int64_t n, t, k, m;              // samples, tokens per sample, in / out features
  int64_t xs_n, xs_t, xs_k;        // element strides of x as [N, T, K]
  int64_t ds_n, ds_t, ds_m;        // element strides of d as [N, T, M]
  void* fisher;                    // contiguous [M, K] or nullptr
  bool fisher_f64, fisher_accumulate;
  void* grad_weight;               // contiguous [M, K] or nullptr
  bool grad_f64, grad_accumulate;
  void* sq_norms;                  // contiguous [N] or nullptr
  bool sq_f64;
};

}  // namespace fq
