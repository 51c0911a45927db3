// Exact integer path of quant_linear on the CPU: operands are quantized to int8
// codes by these kernels, multiplied by an int8 x int8 -> int32 GEMM chosen by the
// caller (torch._int_mm, oneDNN with AVX-512 VNNI here), and the int32 accumulator
// is turned into float32 outputs in place by the epilogue.
//
// Unsigned 8-bit activation codes (0..255) do not fit int8: they are stored as
// code - 128 and the epilogue adds back 128 * sum_k Wcode[n, k] (the row sums the
// weight kernel returns), so the accumulator stays exact.
#pragma once

#include <cstdint>

#include "fq/quant_math.h"

namespace fq::cpu {

// The shift that makes codes of `r` fit int8 (128 for unsigned 8 bit, else 0).
inline int32_t int8_code_offset(QRange r) { return r.qmax > 127.0f ? 128 : 0; }

// The largest reduction length whose int32 accumulator cannot overflow: every
// product of two int8 codes (after the shift) is at most 128 * 128 in magnitude.
constexpr int64_t kMaxExactK = (int64_t{1} << 31) / (128 * 128) - 1;

// codes[i] = clamp(round(x[i] / scale)) - int8_code_offset(r), per tensor. Returns true
// when x holds NaN (which has no code: the caller must take the float path).
bool quantize_act_codes(const float* x, int8_t* codes, int64_t n, float scale, QRange r);

// w [rows, cols] row-major, one scale per row (output channel). Writes the codes
// transposed, codes_t [cols, rows] (the layout the GEMM reads fastest), and
// row_sums[row] = sum of the row's codes. Returns true when w holds NaN.
bool quantize_weight_codes_t(const float* w, const float* scale, int8_t* codes_t, int32_t* row_sums,
                             int64_t rows, int64_t cols, QRange r);

// acc [tokens, channels] int32, rewritten in place as float32:
//   y = (acc + offset * row_sums[c]) * a_scale * w_scale[c] + bias[c]
// computed in double and rounded once to float (bias may be null).
void int_accum_epilogue(void* acc, int64_t tokens, int64_t channels, float a_scale, const float* w_scale,
                        const int32_t* row_sums, int32_t offset, const float* bias);

}  // namespace fq::cpu
