// CUDA fake quantization: a grid-stride elementwise forward, and a backward that
// reduces the LSQ scale gradient per channel in shared memory before one atomicAdd
// per block and channel segment. The arithmetic is fq/quant_math.h, shared with
// the CPU kernels (and so covered by the CPU tests).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "kernels.h"

namespace fq::cuda {

DeviceGuard::DeviceGuard(int device) {
  if (cudaGetDevice(&previous_) != cudaSuccess || previous_ == device) previous_ = -1;
  else if (cudaSetDevice(device) != cudaSuccess) previous_ = -1;
}

DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

namespace {

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f(float v) { return v; }
template <> __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const float* __restrict__ scale, T* __restrict__ y,
                               int64_t total, int64_t channels, int64_t inner, QRange r) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const float s = scale[(i / inner) % channels];
    y[i] = from_f<T>(fake_quant_value(to_f(x[i]), s, inv_scale(s), r));
  }
}

// One block per (row = outer*channel index) and column tile: every element of a
// block shares one channel, so the block reduces to a single value.
template <typename T>
__global__ void backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ scale,
                                T* __restrict__ dx, float* __restrict__ dscale, int64_t row0, int64_t channels,
                                int64_t inner, QRange r, float grad_factor) {
  __shared__ float warp_sums[32];
  const int64_t row = row0 + blockIdx.y;
  const int64_t c = row % channels;
  const float s = scale[c], inv = inv_scale(s);
  float acc = 0.0f;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < inner; j += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = row * inner + j;
    const float xi = to_f(x[i]), gi = to_f(dy[i]);
    const float q = quant_code(xi, inv);
    dx[i] = from_f<T>(code_in_range(q, r) ? gi : 0.0f);
    acc += gi * lsq_scale_grad(xi, q, s, inv, r);
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x < 32) {
    acc = threadIdx.x < (blockDim.x >> 5) ? warp_sums[threadIdx.x] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (threadIdx.x == 0) atomicAdd(dscale + c, acc * grad_factor);
  }
}

template <typename T>
const char* launch_forward(const void* x, const float* scale, void* y, int64_t total, int64_t channels,
                           int64_t inner, QRange r, cudaStream_t stream) {
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  if (total > 0)
    forward_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<const T*>(x), scale, static_cast<T*>(y), total,
                                                      channels, inner, r);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* launch_backward(const void* dy, const void* x, const float* scale, void* dx, float* dscale,
                            int64_t rows, int64_t channels, int64_t inner, QRange r, float grad_factor,
                            cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(dscale, 0, channels * sizeof(float), stream);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const int threads = 256;
  const int64_t col_blocks = std::min<int64_t>((inner + threads - 1) / threads, 1024);
  for (int64_t row0 = 0; row0 < rows; row0 += 65535) {  // gridDim.y is limited to 65535
    const int64_t nrows = std::min<int64_t>(rows - row0, 65535);
    if (inner == 0 || nrows == 0) break;
    dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(nrows));
    backward_kernel<T><<<grid, threads, 0, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(x), scale,
                                                     static_cast<T*>(dx), dscale, row0, channels, inner, r,
                                                     grad_factor);
  }
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename Fn>
const char* by_dtype(int dtype_code, Fn&& fn) {
  switch (dtype_code) {
    case 0: return fn(float{});
    case 1: return fn(__nv_bfloat16{});
    case 2: return fn(__half{});
    default: return "unsupported dtype code";
  }
}

}  // namespace

const char* fake_quant_forward(const void* x, const float* scale, void* y, int dtype_code, int64_t outer,
                               int64_t channels, int64_t inner, QRange range, void* stream) {
  return by_dtype(dtype_code, [&](auto tag) {
    return launch_forward<decltype(tag)>(x, scale, y, outer * channels * inner, channels, inner, range,
                                         static_cast<cudaStream_t>(stream));
  });
}

const char* fake_quant_backward(const void* grad_y, const void* x, const float* scale, void* grad_x,
                                float* grad_scale, int dtype_code, int64_t outer, int64_t channels,
                                int64_t inner, QRange range, float grad_factor, void* stream) {
  return by_dtype(dtype_code, [&](auto tag) {
    return launch_backward<decltype(tag)>(grad_y, x, scale, grad_x, grad_scale, outer * channels, channels,
                                          inner, range, grad_factor, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace fq::cuda
