// Framework-free CPU multi-scale deformable attention core (forward and backward) on raw
// pointers: bilinear sampling of the values at each query's points, zeros outside the map
// (align_corners=False, as F.grid_sample and the official CUDA kernel), weighted and summed
// over levels and points. Layouts, all contiguous:
//   value [N, S, M, D] (S = sum_l H_l W_l, levels concatenated row-major),
//   locations [N, Lq, M, L, P, 2] as (x, y) in [0, 1] of each level,
//   weights [N, Lq, M, L, P], out / grad_out [N, Lq, M * D].
#pragma once

#include <cstdint>
#include <vector>

namespace fq::cpu {

struct MsDeformAttnShape {
  int64_t n, s, m, d, lq, points;
  std::vector<int64_t> heights, widths, starts;  // per level; starts[l] = sum_{k<l} H_k W_k

  int64_t levels() const { return static_cast<int64_t>(heights.size()); }
};

// out[n, q, m*D + d] = sum_{l,p} w[n,q,m,l,p] * bilinear(value[n, start_l:, m, d] as [H_l, W_l]).
// T is float or double.
template <typename T>
void ms_deform_attn_forward(const T* value, const T* locations, const T* weights, T* out,
                            const MsDeformAttnShape& shape);

// Writes (does not accumulate) grad_value [N, S, M, D], grad_locations [N, Lq, M, L, P, 2]
// and grad_weights [N, Lq, M, L, P]. Each (n, m) pair is one work item that alone writes
// value[n, :, m, :]'s gradient, so the scatter needs no atomics and every element's
// summation order is fixed: results do not depend on the thread count.
template <typename T>
void ms_deform_attn_backward(const T* grad_out, const T* value, const T* locations, const T* weights,
                             T* grad_value, T* grad_locations, T* grad_weights, const MsDeformAttnShape& shape);

}  // namespace fq::cpu
