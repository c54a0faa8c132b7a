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

// y[t, col_k] += v_k x[t, row_k] (the transposed product) into a float32 accumulator;
// one block per token (grid-stride), threads over the nonzeros, float atomics: the
// columns of a row-sorted support are scattered. The product itself
// (transpose = false) takes sparse_rows_warp_kernel.
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

// First k with indices[k] >= target (the indices are sorted ascending).
template <typename I>
__device__ __forceinline__ int64_t first_at_least(const I* indices, int64_t nnz, int64_t target) {
  int64_t lo = 0, hi = nnz;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (int64_t(indices[mid]) < target)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

constexpr int kSparseTokenChunk = 64;

// y[t, row] += sum over the row's nonzeros of v_k x[t, col_k]. One warp per (row, chunk of
// 64 tokens): the row's nonzeros are contiguous in the sorted support (two binary searches
// per task), the lanes stride over them, and lane 0 adds the 32 partial sums in a fixed
// order: no atomics, deterministic, and a single token (a decode step) spreads over every
// SM, where one block per token ran on one. Shared memory: one float per thread.
// Per token 2 nnz FLOP; bytes: the nonzeros once per task, x and y per token.
template <typename T, typename I>
__global__ void __launch_bounds__(kSLTrainThreads)
    sparse_rows_warp_kernel(const T* __restrict__ x, int64_t tokens, int64_t x_width,
                            const T* __restrict__ values, const I* __restrict__ indices,
                            int64_t nnz, int64_t cols, float* __restrict__ y, int64_t y_width) {
  LOWRANK_SHARED_FLOATS(partial);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int64_t chunks = (tokens + kSparseTokenChunk - 1) / kSparseTokenChunk;
  for (int64_t task = int64_t(blockIdx.x) * warps + warp; task < y_width * chunks;
       task += int64_t(gridDim.x) * warps) {
    const int64_t row = task / chunks, chunk = task - row * chunks;
    const int64_t begin = first_at_least(indices, nnz, row * cols);
    const int64_t end = first_at_least(indices, nnz, (row + 1) * cols);
    const int64_t t_end =
        (chunk + 1) * kSparseTokenChunk < tokens ? (chunk + 1) * kSparseTokenChunk : tokens;
    for (int64_t t = chunk * kSparseTokenChunk; t < t_end; ++t) {
      float sum = 0.f;
      for (int64_t k = begin + lane; k < end; k += 32)
        sum = fmaf(to_float(values[k]), to_float(x[t * x_width + int64_t(indices[k]) - row * cols]),
                   sum);
      partial[threadIdx.x] = sum;
      __syncwarp();
      if (lane == 0) {
        float total = 0.f;
        for (int i = 0; i < 32; ++i) total += partial[warp * 32 + i];
        y[t * y_width + row] += total;
      }
      __syncwarp();  // the partials are read before the next token overwrites them
    }
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
