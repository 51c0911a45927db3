// CPU multi-scale deformable attention core. The forward runs OpenMP over (n, q, m) output
// rows; the backward over (n, m) pairs, each of which alone owns value[n, :, m, :] and its
// gradient (race-free scatter, no atomics, thread-count-independent sums). The inner loops
// run over D, contiguous in value, out and grad_out, and are compiled for AVX-512, AVX2 and
// baseline x86-64 (FQ_MULTIVERSION). Nothing of size [N*M, D, Lq, L*P] is materialised,
// which is what the reference (F.grid_sample per level, then a weighted sum) spends its
// time and memory on.
#include "ms_deform_attn.h"

#include <algorithm>
#include <cmath>

#include "fq/multiversion.h"

namespace fq::cpu {
namespace {

// Work (multiply-adds) below which a region runs on the calling thread: waking the team
// costs more than small calls (the tiny model's decoder layers) take.
constexpr int64_t kParallelWork = 1 << 15;

// The four neighbours of one sample, in the order (x0, y0), (x0+1, y0), (x0, y0+1),
// (x0+1, y0+1): their rows of the level's values (-1 outside the map, which reads zero)
// and bilinear weights, and the sample's fractional position (fx, fy) in its cell.
template <typename T>
struct Corners {
  int64_t row[4] = {-1, -1, -1, -1};
  T weight[4] = {0, 0, 0, 0};
  T fx = 0, fy = 0;
};

template <typename T>
inline Corners<T> corners(T loc_x, T loc_y, int64_t h, int64_t w, int64_t start) {
  Corners<T> c;
  // grid_sample's own arithmetic (grid = 2 loc - 1, then ((grid + 1) W - 1) / 2) rather than
  // loc * W - 0.5: the same rounding as the reference, so a sample exactly on a pixel edge
  // or centre takes the same corners (and one-sided derivative) in both.
  const T x = ((T(2) * loc_x - T(1) + T(1)) * T(w) - T(1)) / T(2);
  const T y = ((T(2) * loc_y - T(1) + T(1)) * T(h) - T(1)) / T(2);
  // No corner inside (NaN included); also keeps the integer conversions below in range.
  if (!(x >= T(-1) && x < T(w) && y >= T(-1) && y < T(h))) return c;
  const T x0f = std::floor(x), y0f = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
  c.fx = x - x0f;
  c.fy = y - y0f;
  const T wx[2] = {T(1) - c.fx, c.fx}, wy[2] = {T(1) - c.fy, c.fy};
  for (int k = 0; k < 4; ++k) {
    const int64_t xi = x0 + (k & 1), yi = y0 + (k >> 1);
    if (xi >= 0 && xi < w && yi >= 0 && yi < h) {
      c.row[k] = start + yi * w + xi;
      c.weight[k] = wx[k & 1] * wy[k >> 1];
    }
  }
  return c;
}

// out[0:D] = sum_{l,p} w * bilinear(values) for one (n, q, m); value_nm points at
// value[n, 0, m, 0] (rows row_stride = M * D apart), loc / w at this (n, q, m)'s [L, P] block.
template <typename T>
FQ_MULTIVERSION void forward_row(const T* value_nm, int64_t row_stride, const T* loc, const T* w, T* out,
                                 const MsDeformAttnShape& sh) {
  const int64_t d = sh.d;
  std::fill(out, out + d, T(0));
  for (int64_t l = 0; l < sh.levels(); ++l) {
    for (int64_t p = 0; p < sh.points; ++p, loc += 2, ++w) {
      const Corners<T> c = corners(loc[0], loc[1], sh.heights[l], sh.widths[l], sh.starts[l]);
      for (int k = 0; k < 4; ++k) {
        if (c.row[k] < 0) continue;
        const T coef = *w * c.weight[k];
        const T* v = value_nm + c.row[k] * row_stride;
        for (int64_t i = 0; i < d; ++i) out[i] += coef * v[i];
      }
    }
  }
}

// <a, b> over d elements. Eight independent partial sums, added pairwise at the end: one
// running sum cannot be vectorised without reassociation (which -ffast-math would allow and
// the build forbids), and its add latency then bounds the loop. The order is fixed, so the
// result is deterministic.
template <typename T>
inline T dot(const T* a, const T* b, int64_t d) {
  constexpr int kLanes = 8;
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += a[i + j] * b[i + j];
  for (int j = 0; i < d; ++i, ++j) lanes[j] += a[i] * b[i];
  // Pairwise: three dependent adds instead of eight (one dot per corner of every sample).
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  return lanes[0];
}

// Gradients of one sample given dots[k] = <grad_out row, value at corner k>: the attention
// weight's (the bilinear sample's dot) and the location's, through the bilinear weights
// (d x / d loc_x = W, d y / d loc_y = H).
template <typename T>
inline void sample_grads(const Corners<T>& c, const T dots[4], T w, int64_t h, int64_t width, T* grad_loc,
                         T* grad_w) {
  *grad_w = c.weight[0] * dots[0] + c.weight[1] * dots[1] + c.weight[2] * dots[2] + c.weight[3] * dots[3];
  const T gx = (dots[1] - dots[0]) * (T(1) - c.fy) + (dots[3] - dots[2]) * c.fy;
  const T gy = (dots[2] - dots[0]) * (T(1) - c.fx) + (dots[3] - dots[1]) * c.fx;
  grad_loc[0] = w * gx * T(width);
  grad_loc[1] = w * gy * T(h);
}

// Backward of one (n, m) pair over all queries: pointers as in forward_row, at q = 0; grad_out
// rows (and value rows) are row_stride = M * D apart, the queries' [L, P] blocks of weights
// q_stride = M * L * P apart.
template <typename T>
FQ_MULTIVERSION void backward_head(const T* grad_out, const T* value_nm, T* grad_value_nm, const T* loc,
                                   const T* w, T* grad_loc, T* grad_w, const MsDeformAttnShape& sh) {
  const int64_t d = sh.d, row_stride = sh.m * sh.d, q_stride = sh.m * sh.levels() * sh.points;
  for (int64_t s = 0; s < sh.s; ++s) std::fill_n(grad_value_nm + s * row_stride, d, T(0));
  for (int64_t q = 0; q < sh.lq; ++q) {
    const T* g = grad_out + q * row_stride;
    for (int64_t j = 0; j < sh.levels() * sh.points; ++j) {
      const int64_t l = j / sh.points, at = q * q_stride + j;
      const Corners<T> c = corners(loc[2 * at], loc[2 * at + 1], sh.heights[l], sh.widths[l], sh.starts[l]);
      T dots[4] = {0, 0, 0, 0};
      for (int k = 0; k < 4; ++k) {
        if (c.row[k] < 0) continue;
        const T* v = value_nm + c.row[k] * row_stride;
        T* gv = grad_value_nm + c.row[k] * row_stride;
        const T coef = w[at] * c.weight[k];
        dots[k] = dot(g, v, d);
        for (int64_t i = 0; i < d; ++i) gv[i] += coef * g[i];
      }
      sample_grads(c, dots, w[at], sh.heights[l], sh.widths[l], grad_loc + 2 * at, grad_w + at);
    }
  }
}

int64_t work(const MsDeformAttnShape& sh) { return sh.n * sh.lq * sh.m * sh.levels() * sh.points * 4 * sh.d; }

}  // namespace

template <typename T>
void ms_deform_attn_forward(const T* value, const T* locations, const T* weights, T* out,
                            const MsDeformAttnShape& sh) {
  const int64_t rows = sh.n * sh.lq * sh.m, block = sh.levels() * sh.points;
#pragma omp parallel for schedule(static) if (work(sh) > kParallelWork)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = r / (sh.lq * sh.m), m = r % sh.m;
    forward_row(value + (n * sh.s * sh.m + m) * sh.d, sh.m * sh.d, locations + r * block * 2, weights + r * block,
                out + r * sh.d, sh);
  }
}

template <typename T>
void ms_deform_attn_backward(const T* grad_out, const T* value, const T* locations, const T* weights,
                             T* grad_value, T* grad_locations, T* grad_weights, const MsDeformAttnShape& sh) {
  const int64_t block = sh.levels() * sh.points;
#pragma omp parallel for schedule(dynamic) if (work(sh) > kParallelWork)
  for (int64_t nm = 0; nm < sh.n * sh.m; ++nm) {
    const int64_t n = nm / sh.m, m = nm % sh.m;
    const int64_t value_at = (n * sh.s * sh.m + m) * sh.d, sample_at = (n * sh.lq * sh.m + m) * block;
    backward_head(grad_out + (n * sh.lq * sh.m + m) * sh.d, value + value_at, grad_value + value_at,
                  locations + 2 * sample_at, weights + sample_at, grad_locations + 2 * sample_at,
                  grad_weights + sample_at, sh);
  }
}

template void ms_deform_attn_forward<float>(const float*, const float*, const float*, float*,
                                            const MsDeformAttnShape&);
template void ms_deform_attn_forward<double>(const double*, const double*, const double*, double*,
                                             const MsDeformAttnShape&);
template void ms_deform_attn_backward<float>(const float*, const float*, const float*, const float*, float*, float*,
                                             float*, const MsDeformAttnShape&);
template void ms_deform_attn_backward<double>(const double*, const double*, const double*, const double*, double*,
                                              double*, double*, const MsDeformAttnShape&);

}  // namespace fq::cpu
