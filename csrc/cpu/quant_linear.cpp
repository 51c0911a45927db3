// CPU kernels of quant_linear's exact integer path (see quant_linear.h): two
// quantizers to int8 codes and the int32 -> float32 epilogue. OpenMP across rows
// or chunks, SIMD inside (compiled for AVX-512, AVX2 and baseline x86-64 with
// runtime selection, as in fake_quant.cpp).
#include "quant_linear.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "fq/multiversion.h"

namespace fq::cpu {
namespace {

// Activation elements per OpenMP work item; smaller problems run on the calling thread (see
// fake_quant.cpp's kChunk).
constexpr int64_t kChunk = 1 << 14;
constexpr int64_t kRowBlock = 16;    // weight rows transposed together

// NaN has no integer code: its (arbitrary) int8 is replaced by 0 and the caller is
// told, so it can use the float path, which propagates NaN as the reference does.
FQ_MULTIVERSION bool codes_segment(const float* x, int8_t* codes, int64_t n, float inv, QRange r, float offset,
                                   int32_t* sum) {
  int nan_seen = 0;
  int32_t acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float q = clamp_code(quant_code(x[i], inv), r);
    const bool nan = q != q;
    nan_seen |= nan;
    const int32_t code = nan ? 0 : static_cast<int32_t>(q - offset);
    codes[i] = static_cast<int8_t>(code);
    acc += code;
  }
  *sum = acc;
  return nan_seen != 0;
}

// One row of the output: y = ((double)acc + base[c]) * cs[c] + bias[c], rounded once.
// The buffer holds int32 on entry and float32 on exit (memcpy keeps the type pun legal).
FQ_MULTIVERSION void epilogue_row(unsigned char* row, const double* base, const double* cs, const double* bias,
                                  int64_t channels) {
  for (int64_t c = 0; c < channels; ++c) {
    int32_t a;
    std::memcpy(&a, row + 4 * c, 4);
    const float y = static_cast<float>((static_cast<double>(a) + base[c]) * cs[c] + bias[c]);
    std::memcpy(row + 4 * c, &y, 4);
  }
}

}  // namespace

bool quantize_act_codes(const float* x, int8_t* codes, int64_t n, float scale, QRange r) {
  const float inv = inv_scale(scale);
  const float offset = static_cast<float>(int8_code_offset(r));
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  int nan_seen = 0;
#pragma omp parallel for schedule(static) reduction(| : nan_seen) if (chunks > 1)
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t begin = k * kChunk;
    int32_t unused;
    nan_seen |= codes_segment(x + begin, codes + begin, std::min(kChunk, n - begin), inv, r, offset, &unused);
  }
  return nan_seen != 0;
}

bool quantize_weight_codes_t(const float* w, const float* scale, int8_t* codes_t, int32_t* row_sums,
                             int64_t rows, int64_t cols, QRange r) {
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  int nan_seen = 0;
#pragma omp parallel reduction(| : nan_seen) if (rows * cols > kChunk)
  {
    // Rows are quantized contiguously (SIMD) into a small buffer, then transposed.
    std::vector<int8_t> tile(static_cast<size_t>(kRowBlock * cols));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t r0 = b * kRowBlock, nr = std::min(kRowBlock, rows - r0);
      for (int64_t j = 0; j < nr; ++j)
        nan_seen |= codes_segment(w + (r0 + j) * cols, tile.data() + j * cols, cols, inv_scale(scale[r0 + j]),
                                  r, 0.0f, row_sums + r0 + j);
      for (int64_t k = 0; k < cols; ++k)
        for (int64_t j = 0; j < nr; ++j) codes_t[k * rows + r0 + j] = tile[j * cols + k];
    }
  }
  return nan_seen != 0;
}

void int_accum_epilogue(void* acc, int64_t tokens, int64_t channels, float a_scale, const float* w_scale,
                        const int32_t* row_sums, int32_t offset, const float* bias) {
  // Per-channel terms in double: a_scale * w_scale[c] is exact (24 + 24 bits), and so
  // is acc + offset * row_sum (< 2^53), so each output is rounded only twice in
  // double and once to float: within 1 ulp (float) of the exact value.
  std::vector<double> base(channels), cs(channels), b(channels);
  for (int64_t c = 0; c < channels; ++c) {
    base[c] = static_cast<double>(offset) * row_sums[c];
    cs[c] = static_cast<double>(a_scale) * w_scale[c];
    b[c] = bias ? bias[c] : 0.0;
  }
  auto* bytes = static_cast<unsigned char*>(acc);
#pragma omp parallel for schedule(static) if (tokens * channels > kChunk)
  for (int64_t t = 0; t < tokens; ++t)
    epilogue_row(bytes + 4 * t * channels, base.data(), cs.data(), b.data(), channels);
}

}  // namespace fq::cpu
