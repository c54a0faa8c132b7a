// Kernels of the sparse-plus-low-rank products (launched by sltrain.cu; math in
// cpp/sltrain.cpp). Device code only, so tests/cuda_emulation compiles these same
// kernels for the CPU. Storage T (float/half/bfloat16), float32 arithmetic.
#pragma once

#include <cstdint>

#include "device.cuh"

namespace lowrank {

constexpr int kSLTrainThreads = 256;

// W[i, j] = scale * sum_k B[i, k] A[k, j]: one thread per element, grid-stride.
// Neighbouring threads take neighbouring j: A reads coalesce, B reads broadcast.
template <typename T>
__global__ void __launch_bounds__(kSLTrainThreads)
    sltrain_lowrank_kernel(const T* __restrict__ b, const T* __restrict__ a, float scale,
                           T* __restrict__ w, int64_t out, int64_t in, int rank) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < out * in;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / in, j = e - i * in;
    float sum = 0.f;
    for (int k = 0; k < rank; ++k)
      sum = fmaf(to_float(b[i * rank + k]), to_float(a[k * in + j]), sum);
    w[e] = from_float<T>(scale * sum);
  }
}

// W[indices[k]] += values[k]; the indices are unique, so no two threads share an element.
template <typename T, typename I>
__global__ void __launch_bounds__(kSLTrainThreads)
    sltrain_scatter_kernel(const T* __restrict__ values, const I* __restrict__ indices, int64_t nnz,
                           T* __restrict__ w) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < nnz;
       k += int64_t(gridDim.x) * blockDim.x)
    w[indices[k]] = from_float<T>(to_float(w[indices[k]]) + to_float(values[k]));
}

// y[t, row_k] += v_k x[t, col_k] (or, transposed, y[t, col_k] += v_k x[t, row_k]) into a
// float32 accumulator; one block per token (grid-stride), threads over the nonzeros.
template <typename T, typename I>
__global__ void __launch_bounds__(kSLTrainThreads)
    sparse_rows_kernel(const T* __restrict__ x, int64_t tokens, int64_t x_width,
                       const T* __restrict__ values, const I* __restrict__ indices, int64_t nnz,
                       int64_t cols, bool transpose, float* __restrict__ y, int64_t y_width) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x)
    for (int64_t k = threadIdx.x; k < nnz; k += blockDim.x) {
      const int64_t row = int64_t(indices[k]) / cols, col = int64_t(indices[k]) - row * cols;
      const int64_t from = transpose ? row : col, to = transpose ? col : row;
      atomicAdd(y + t * y_width + to, to_float(values[k]) * to_float(x[t * x_width + from]));
    }
}

// g[k] = sum_t dy[t, row_k] x[t, col_k]: one thread per nonzero.
template <typename T, typename I>
__global__ void __launch_bounds__(kSLTrainThreads)
    sampled_dot_kernel(const T* __restrict__ dy, const T* __restrict__ x, int64_t tokens,
                       int64_t out, int64_t in, const I* __restrict__ indices, int64_t nnz,
                       T* __restrict__ g) {
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < nnz;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = int64_t(indices[k]) / in, col = int64_t(indices[k]) - row * in;
    float sum = 0.f;
    for (int64_t t = 0; t < tokens; ++t)
      sum = fmaf(to_float(dy[t * out + row]), to_float(x[t * in + col]), sum);
    g[k] = from_float<T>(sum);
  }
}

}  // namespace lowrank
