// Kernels of the random sketches (launched by sketch.cu; math in cpp/sketch.cpp).
// Device code only, so tests/cuda_emulation compiles these same kernels for the CPU.
#pragma once

#include <cmath>
#include <cstdint>

#include "device.cuh"
#include "lowrank/philox.h"

namespace lowrank {

constexpr int kSketchThreads = 256;

__device__ __forceinline__ void device_sincos(double x, double& s, double& c) {
  s = sin(x);
  c = cos(x);
}
__device__ __forceinline__ double device_log(double x) {
  return log(x);
}
__device__ __forceinline__ double device_sqrt(double x) {
  return sqrt(x);
}

// kind: 0 normal, 1 sign, 2 uniform (0, 1]; grid-stride over elements.
template <typename T>
__global__ void __launch_bounds__(kSketchThreads)
    philox_fill_kernel(T* out, int64_t n, int kind, uint64_t seed, uint64_t stream) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    double v;
    if (kind == 0)
      v = normal_at(uint64_t(e), stream, seed, device_sincos, device_log, device_sqrt);
    else if (kind == 1)
      v = sign_at(uint64_t(e), stream, seed);
    else
      v = uniform_open_closed(philox4x32(uint64_t(e) >> 2, stream, seed).v[e & 3]);
    out[e] = T(v);
  }
}

// One block per row (grid-stride): x * d into shared memory, zero-padded to n2,
// the Walsh-Hadamard butterflies stage by stage, then the sampled columns.
template <typename T>
__global__ void __launch_bounds__(kSketchThreads)
    srht_rows_kernel(const T* __restrict__ a, int64_t rows, int64_t n, const T* __restrict__ signs,
                     const int64_t* __restrict__ cols, int64_t l, int64_t n2, float scale,
                     T* __restrict__ out) {
  LOWRANK_SHARED_FLOATS(buffer);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    __syncthreads();  // the previous row's columns are read out
    for (int64_t j = threadIdx.x; j < n2; j += blockDim.x)
      buffer[j] = j < n ? to_float(a[row * n + j]) * to_float(signs[j]) : 0.f;
    // n2 (a power of two) fits shared memory, so 32-bit indices and shifts suffice: the
    // butterfly pair of idx at stage 2^lg is j = (idx >> lg) << (lg + 1) | (idx & (2^lg - 1)).
    const int half = int(n2 / 2);
    for (int lg = 0; (int64_t(1) << lg) < n2; ++lg) {
      __syncthreads();
      const int h = 1 << lg;
      for (int idx = threadIdx.x; idx < half; idx += blockDim.x) {
        const int j = ((idx >> lg) << (lg + 1)) | (idx & (h - 1));
        const float u = buffer[j], v = buffer[j + h];
        buffer[j] = u + v;
        buffer[j + h] = u - v;
      }
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < l; c += blockDim.x)
      out[row * l + c] = from_float<T>(scale * buffer[cols[c]]);
  }
}

// One block per row (grid-stride): the l outputs accumulate in shared memory.
template <typename T>
__global__ void __launch_bounds__(kSketchThreads)
    sparse_sign_rows_kernel(const T* __restrict__ a, int64_t rows, int64_t n,
                            const int32_t* __restrict__ cols, const T* __restrict__ signs,
                            int64_t nonzeros, int64_t l, T* __restrict__ out) {
  LOWRANK_SHARED_FLOATS(acc);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    __syncthreads();  // the previous row is written out
    for (int64_t c = threadIdx.x; c < l; c += blockDim.x) acc[c] = 0.f;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float v = to_float(a[row * n + j]);
      for (int64_t t = 0; t < nonzeros; ++t)
        atomicAdd(acc + cols[j * nonzeros + t], to_float(signs[j * nonzeros + t]) * v);
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < l; c += blockDim.x) out[row * l + c] = from_float<T>(acc[c]);
  }
}

}  // namespace lowrank
