// CPU fake quantization: OpenMP over fixed-size chunks of the flattened tensor,
// SIMD inside each chunk (the per-segment loops have no branches the compiler
// cannot if-convert, and are compiled for AVX-512, AVX2 and baseline x86-64 with
// runtime selection, so the module runs on any x86-64 machine).
#include "fake_quant.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "fq/multiversion.h"

namespace fq::cpu {
namespace {

// Elements per OpenMP work item. A tensor of one chunk runs on the calling thread: waking the
// team costs more than the work there, and on a loaded machine every region waits for all
// its threads to be scheduled (tiny layers' weights and activations are one chunk).
constexpr int64_t kChunk = 1 << 14;

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }

template <typename T>
FQ_MULTIVERSION void forward_segment(const T* x, T* y, int64_t n, float s, QRange r) {
  const float inv = inv_scale(s);
  for (int64_t i = 0; i < n; ++i) store(y, i, fake_quant_value(load(x, i), s, inv, r));
}

// One STE element: writes dx[i] and returns dy_i * d y_i / d s.
template <typename T>
inline float backward_element(const T* dy, const T* x, T* dx, int64_t i, float s, float inv, QRange r) {
  const float xi = load(x, i), gi = load(dy, i);
  const float q = quant_code(xi, inv);
  store(dx, i, code_in_range(q, r) ? gi : 0.0f);
  return gi * lsq_scale_grad(xi, q, s, inv, r);
}

constexpr int kLanes = 16;  // independent partial sums: one AVX-512 register of floats

// Returns sum_i dy_i * d y_i / d s over the segment. A single running float sum cannot be
// vectorised without reassociation (the compiler must keep its order, which made this
// loop 10x slower than the forward); kLanes independent sums, added at the end, can.
// Float is exact enough for a 16k-element segment; segments are combined in double.
template <typename T>
FQ_MULTIVERSION float backward_segment(const T* dy, const T* x, T* dx, int64_t n, float s, QRange r) {
  const float inv = inv_scale(s);
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += backward_element(dy, x, dx, i + j, s, inv, r);
  float acc = 0.0f;
  for (; i < n; ++i) acc += backward_element(dy, x, dx, i, s, inv, r);
  for (int j = 0; j < kLanes; ++j) acc += lanes[j];
  return acc;
}

// Calls fn(row_begin_element, count, channel) for the row segments inside chunk k.
template <typename Fn>
void for_each_segment(int64_t k, int64_t total, int64_t channels, int64_t inner, Fn&& fn) {
  const int64_t end = std::min(total, (k + 1) * kChunk);
  for (int64_t i = k * kChunk; i < end;) {
    const int64_t row = i / inner;
    const int64_t stop = std::min(end, (row + 1) * inner);
    fn(i, stop - i, row % channels);
    i = stop;
  }
}

}  // namespace

template <typename T>
void fake_quant_forward(const T* x, const float* scale, T* y, int64_t outer, int64_t channels,
                        int64_t inner, QRange range) {
  const int64_t total = outer * channels * inner;
  const int64_t chunks = (total + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t k = 0; k < chunks; ++k) {
    for_each_segment(k, total, channels, inner, [&](int64_t i, int64_t n, int64_t c) {
      forward_segment(x + i, y + i, n, scale[c], range);
    });
  }
}

template <typename T>
void fake_quant_backward(const T* grad_y, const T* x, const float* scale, T* grad_x, float* grad_scale,
                         int64_t outer, int64_t channels, int64_t inner, QRange range, float grad_factor) {
  const int64_t total = outer * channels * inner;
  const int64_t chunks = (total + kChunk - 1) / kChunk;
  const int threads = omp_get_max_threads();
  // One partial sum per thread and channel, so no atomics and a fixed summation order
  // within each thread.
  std::vector<double> partial(static_cast<size_t>(threads) * channels, 0.0);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t k = 0; k < chunks; ++k) {
    double* mine = partial.data() + static_cast<size_t>(omp_get_thread_num()) * channels;
    for_each_segment(k, total, channels, inner, [&](int64_t i, int64_t n, int64_t c) {
      mine[c] += backward_segment(grad_y + i, x + i, grad_x + i, n, scale[c], range);
    });
  }
  for (int64_t c = 0; c < channels; ++c) {
    double sum = 0.0;
    for (int t = 0; t < threads; ++t) sum += partial[static_cast<size_t>(t) * channels + c];
    grad_scale[c] = static_cast<float>(sum * grad_factor);
  }
}

template void fake_quant_forward<float>(const float*, const float*, float*, int64_t, int64_t, int64_t, QRange);
template void fake_quant_forward<uint16_t>(const uint16_t*, const float*, uint16_t*, int64_t, int64_t, int64_t,
                                           QRange);
template void fake_quant_backward<float>(const float*, const float*, const float*, float*, float*, int64_t,
                                         int64_t, int64_t, QRange, float);
template void fake_quant_backward<uint16_t>(const uint16_t*, const uint16_t*, const float*, uint16_t*, float*,
                                            int64_t, int64_t, int64_t, QRange, float);

}  // namespace fq::cpu
