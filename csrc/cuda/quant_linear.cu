// CUDA quant_gemm (see kernels.h): 64 x 64 output tiles, 256 threads, operands loaded
// through shared memory and quantized on the way in (never written back).
//   integer path: clamped codes stored as int8, multiplied on the tensor cores with
//                 WMMA m16n16k16 s8 x s8 -> s32 (sm_72+; built for sm_80 / sm_90), exact;
//   float path:   fake-quant values (or raw operands) in fp32, 4 x 4 outputs per thread.
// One epilogue for both: scales and bias, or the STE mask and LSQ scale gradient
// (reduced per row in shared memory, then one global atomic per row or per block).
// The quantization arithmetic is fq/quant_math.h, shared with the CPU kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include "kernels.h"

namespace fq::cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 32, THREADS = 256, CLD = BN + 4;

template <typename T> __device__ __forceinline__ float load_f(const T* p, int64_t i);
template <> __device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
template <> __device__ __forceinline__ float load_f(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
template <> __device__ __forceinline__ float load_f(const __half* p, int64_t i) { return __half2float(p[i]); }

// An operand element as the product consumes it: its clamped code (integer path),
// its fake-quant value, or itself when the operand is not quantized.
template <bool INT8>
__device__ __forceinline__ float prologue(float v, const QuantOperand& q, float s) {
  if (!q.quantized) return v;
  const float code = clamp_code(quant_code(v, inv_scale(s)), q.range);
  return INT8 ? code : code * s;
}

__device__ __forceinline__ float b_scale(const QuantGemmArgs& p, int64_t k, int64_t n) {
  if (!p.qb.quantized) return 1.0f;
  return p.qb.scale[p.b_scale_mode == 0 ? 0 : (p.b_scale_mode == 1 ? n : k)];
}

// Shared-memory tile layouts. WMMA needs 32-byte aligned fragment pointers, so int8
// tiles are stored in 16-wide column blocks: A as [BK/16][BM][16], B as [BN/16][BK][16].
template <bool INT8> __device__ __forceinline__ int a_index(int r, int c) {
  return INT8 ? (c / 16) * BM * 16 + r * 16 + c % 16 : r * (BK + 1) + c;
}
template <bool INT8> __device__ __forceinline__ int b_index(int k, int n) {
  return INT8 ? (n / 16) * BK * 16 + k * 16 + n % 16 : k * BN + n;
}

// nan_rows / nan_cols (integer path): an int8 code cannot hold NaN, so the rows of A and
// columns of B that hold one are flagged, and the epilogue writes NaN there as the float
// product would (a benign race: every writer stores 1).
template <typename T, bool INT8, typename S>
__device__ void load_tiles(const QuantGemmArgs& p, int64_t z, int64_t m0, int64_t n0, int64_t k0, S* As, S* Bs,
                           int* nan_rows, int* nan_cols) {
  const T* a = static_cast<const T*>(p.a) + z * p.sa[0];
  const T* b = static_cast<const T*>(p.b) + z * p.sb[0];
  const float sa = p.qa.quantized ? p.qa.scale[0] : 1.0f;
  for (int i = threadIdx.x; i < BM * BK; i += THREADS) {
    const int r = i / BK, c = i % BK;
    const int64_t m = m0 + r, k = k0 + c;
    const float v = (m < p.M && k < p.K) ? load_f(a, m * p.sa[1] + k * p.sa[2]) : 0.0f;
    if (INT8 && v != v) nan_rows[r] = 1;
    As[a_index<INT8>(r, c)] = static_cast<S>(prologue<INT8>(v, p.qa, sa));
  }
  for (int i = threadIdx.x; i < BK * BN; i += THREADS) {
    const int r = i / BN, c = i % BN;
    const int64_t k = k0 + r, n = n0 + c;
    const bool in = k < p.K && n < p.N;
    const float v = in ? load_f(b, k * p.sb[1] + n * p.sb[2]) : 0.0f;
    if (INT8 && v != v) nan_cols[c] = 1;
    Bs[b_index<INT8>(r, c)] = static_cast<S>(prologue<INT8>(v, p.qb, in ? b_scale(p, k, n) : 1.0f));
  }
}

// Float path: thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j.
__device__ void mma_float(const float* As, const float* Bs, float (&acc)[4][4]) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  for (int k = 0; k < BK; ++k) {
    float bv[4];
    for (int j = 0; j < 4; ++j) bv[j] = Bs[b_index<false>(k, tx + 16 * j)];
    for (int i = 0; i < 4; ++i) {
      const float av = As[a_index<false>(ty + 16 * i, k)];
      for (int j = 0; j < 4; ++j) acc[i][j] += av * bv[j];
    }
  }
}

using namespace nvcuda;
using IntFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, int>;

// Integer path: warp w owns rows 16 (w / 2) and columns 32 (w % 2) + 16 f, f < 2.
__device__ void mma_int8(const signed char* As, const signed char* Bs, IntFrag (&acc)[2]) {
  const int w = threadIdx.x / 32, wm = w / 2, wn = w % 2;
  for (int kh = 0; kh < BK / 16; ++kh) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, As + kh * BM * 16 + wm * 16 * 16, 16);
    for (int f = 0; f < 2; ++f) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, Bs + (2 * wn + f) * BK * 16 + kh * 16 * 16, 16);
      wmma::mma_sync(acc[f], fa, fb, acc[f]);
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Thread t handles column t % 64 of rows t / 64 + 4 i: coalesced loads and stores, and
// a row is uniform across each warp, so its LSQ partial sums reduce by shuffles.
template <typename T, bool INT8>
__device__ void epilogue(const QuantGemmArgs& p, int64_t z, int64_t m0, int64_t n0, const float* Cs,
                         float* row_part, const int* nan_rows, const int* nan_cols) {
  const int c = threadIdx.x % BN;
  const int64_t n = n0 + c;
  const T* e = static_cast<const T*>(p.e);
  for (int r = threadIdx.x / BN; r < BM; r += THREADS / BN) {
    const int64_t m = m0 + r;
    float part = 0.0f;
    if (m < p.M && n < p.N) {
      const int64_t off = z * p.sc[0] + m * p.sc[1] + n * p.sc[2];
      float y = Cs[r * CLD + c];
      if (INT8) y = nan_rows[r] || nan_cols[c] ? __int_as_float(0x7fc00000) : y * (p.qa.scale[0] * b_scale(p, 0, n));
      if (p.bias) y += p.bias[n];
      if (e) {
        const float x = load_f(e, off), s = p.qe.scale[p.e_per_row ? m : 0], inv = inv_scale(s);
        const float q = quant_code(x, inv);
        part = y * lsq_scale_grad(x, q, s, inv, p.qe.range);
        y = code_in_range(q, p.qe.range) ? y : 0.0f;
      }
      p.c[off] = y;
    }
    if (e) {
      part = warp_sum(part);
      if (threadIdx.x % 32 == 0) atomicAdd(row_part + r, part);
    }
  }
}

template <typename T, bool INT8>
__global__ void __launch_bounds__(THREADS) quant_gemm_kernel(QuantGemmArgs p) {
  using S = std::conditional_t<INT8, signed char, float>;
  __shared__ __align__(32) S As[BM * (BK + 1)];
  __shared__ __align__(32) S Bs[BK * BN];
  __shared__ __align__(32) float Cs[BM * CLD];  // int32 on the integer path until converted
  __shared__ float row_part[BM];
  __shared__ int nan_rows[BM], nan_cols[BN];
  const int64_t z = blockIdx.z, m0 = (int64_t)blockIdx.y * BM, n0 = (int64_t)blockIdx.x * BN;
  float acc[4][4] = {};
  IntFrag iacc[2];
  if (INT8) for (auto& f : iacc) wmma::fill_fragment(f, 0);
  if (threadIdx.x < BM) nan_rows[threadIdx.x] = 0;
  if (threadIdx.x < BN) nan_cols[threadIdx.x] = 0;
  __syncthreads();  // the flags are zero before any load sets one
  for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
    load_tiles<T, INT8>(p, z, m0, n0, k0, As, Bs, nan_rows, nan_cols);
    __syncthreads();
    if constexpr (INT8) mma_int8(As, Bs, iacc); else mma_float(As, Bs, acc);
    __syncthreads();
  }
  if constexpr (INT8) {
    const int w = threadIdx.x / 32;
    int* Ci = reinterpret_cast<int*>(Cs);
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(Ci + (w / 2) * 16 * CLD + (w % 2) * 32 + 16 * f, iacc[f], CLD, wmma::mem_row_major);
    __syncthreads();
    // Exact below 2^24; above, one rounding, within the reference's own float GEMM error.
    for (int i = threadIdx.x; i < BM * CLD; i += THREADS) Cs[i] = static_cast<float>(Ci[i]);
  } else {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) Cs[(ty + 16 * i) * CLD + tx + 16 * j] = acc[i][j];
  }
  if (threadIdx.x < BM) row_part[threadIdx.x] = 0.0f;
  __syncthreads();
  epilogue<T, INT8>(p, z, m0, n0, Cs, row_part, nan_rows, nan_cols);
  if (!p.e) return;
  __syncthreads();
  if (threadIdx.x < BM && m0 + threadIdx.x < p.M) {
    const float v = row_part[threadIdx.x] * p.grad_factor;
    atomicAdd(p.grad_scale + (p.e_per_row ? m0 + threadIdx.x : 0), v);
  }
}

template <typename T>
const char* launch(const QuantGemmArgs& p, bool int8_path, cudaStream_t stream) {
  if (p.Z == 0 || p.M == 0 || p.N == 0) return nullptr;
  if (p.Z > 65535 || (p.M + BM - 1) / BM > 65535) return "quant_gemm: batch or row count too large for the grid";
  const dim3 grid(static_cast<unsigned>((p.N + BN - 1) / BN), static_cast<unsigned>((p.M + BM - 1) / BM),
                  static_cast<unsigned>(p.Z));
  if (int8_path)
    quant_gemm_kernel<T, true><<<grid, THREADS, 0, stream>>>(p);
  else
    quant_gemm_kernel<T, false><<<grid, THREADS, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* quant_gemm(const QuantGemmArgs& args, int dtype_code, bool int8_path, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype_code) {
    case 0: return launch<float>(args, int8_path, s);
    case 1: return launch<__nv_bfloat16>(args, int8_path, s);
    case 2: return launch<__half>(args, int8_path, s);
    default: return "unsupported dtype code";
  }
}

}  // namespace fq::cuda
