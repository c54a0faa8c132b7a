// Kernels of the Kronecker-factored product (launched by kron.cu). Device code
// only, so tests/cuda_emulation compiles these same kernels for the CPU.
#pragma once

#include <cstdint>

#include "device.cuh"

namespace lowrank {

constexpr int kKronThreads = 256;

struct KronDims {
  int p, q, r, s;
  __host__ __device__ bool b_first() const {
    return int64_t(q) * s * r + int64_t(p) * q * r <= int64_t(p) * q * s + int64_t(p) * s * r;
  }
  __host__ __device__ int mid() const { return b_first() ? q * r : p * s; }
  // float32 words of shared memory: a, b^T, X, intermediate, Y.
  int64_t forward_words() const {
    return int64_t(p) * q + int64_t(s) * r + int64_t(q) * s + mid() + int64_t(p) * r;
  }
  // a, b, X, dY, G = a^T dY, Z = X b^T, da, db accumulators.
  int64_t backward_words() const {
    return 2 * int64_t(p) * q + 2 * int64_t(r) * s + int64_t(q) * s + int64_t(p) * r +
           2 * int64_t(q) * r;
  }
};

template <typename T>
__device__ __forceinline__ void stage(float* dst, const T* src, int n) {
  for (int e = threadIdx.x; e < n; e += blockDim.x) dst[e] = to_float(src[e]);
}

template <typename T>
__global__ void __launch_bounds__(kKronThreads)
    kron_forward_kernel(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                        const T* addend, float scale, T* y, int64_t tokens, KronDims d) {
  // addend may alias y (in-place accumulation): each element is read before it is written,
  // by the same thread, so neither pointer is __restrict__.
  LOWRANK_SHARED_FLOATS(smem);
  const int p = d.p, q = d.q, r = d.r, s = d.s;
  float* as = smem;           // p x q
  float* bts = as + p * q;    // s x r  (b transposed)
  float* xs = bts + s * r;    // q x s
  float* mid = xs + q * s;    // q x r or p x s
  float* ys = mid + d.mid();  // p x r
  stage(as, a, p * q);
  for (int e = threadIdx.x; e < r * s; e += blockDim.x) {
    const int k = e / s, j = e - k * s;
    bts[j * r + k] = to_float(b[e]);
  }
  const bool b_first = d.b_first();
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    __syncthreads();  // previous token's ys fully stored; a, b^T staged
    stage(xs, x + t * q * s, q * s);
    __syncthreads();
    if (b_first) {
      block_gemm<false>(q, r, s, xs, s, 1, bts, r, 1, mid, r);
      __syncthreads();
      block_gemm<false>(p, r, q, as, q, 1, mid, r, 1, ys, r);
    } else {
      block_gemm<false>(p, s, q, as, q, 1, xs, s, 1, mid, s);
      __syncthreads();
      block_gemm<false>(p, r, s, mid, s, 1, bts, r, 1, ys, r);
    }
    __syncthreads();
    T* yt = y + t * p * r;
    const T* at = addend ? addend + t * p * r : nullptr;
    for (int e = threadIdx.x; e < p * r; e += blockDim.x)
      yt[e] = from_float<T>(at ? fmaf(scale, ys[e], to_float(at[e])) : scale * ys[e]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kKronThreads)
    kron_factor_grads_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                             const T* __restrict__ a, const T* __restrict__ b,
                             float* __restrict__ da, float* __restrict__ db, int64_t tokens,
                             KronDims d) {
  LOWRANK_SHARED_FLOATS(smem);
  const int p = d.p, q = d.q, r = d.r, s = d.s;
  float* as = smem;                // p x q
  float* bs = as + p * q;          // r x s
  float* xs = bs + r * s;          // q x s
  float* dys = xs + q * s;         // p x r
  float* g = dys + p * r;          // q x r: a^T dY
  float* z = g + q * r;            // q x r: X b^T
  float* da_acc = z + q * r;       // p x q
  float* db_acc = da_acc + p * q;  // r x s
  stage(as, a, p * q);
  stage(bs, b, r * s);
  for (int e = threadIdx.x; e < p * q; e += blockDim.x) da_acc[e] = 0.f;
  for (int e = threadIdx.x; e < r * s; e += blockDim.x) db_acc[e] = 0.f;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    __syncthreads();
    stage(xs, x + t * q * s, q * s);
    stage(dys, dy + t * p * r, p * r);
    __syncthreads();
    block_gemm<false>(q, r, p, as, 1, q, dys, r, 1, g, r);  // a^T dY
    block_gemm<false>(q, r, s, xs, s, 1, bs, 1, s, z, r);   // X b^T: B(k, j) = b[j, k]
    __syncthreads();
    block_gemm<true>(r, s, q, g, 1, r, xs, s, 1, db_acc, s);   // += G^T X
    block_gemm<true>(p, q, r, dys, r, 1, z, 1, r, da_acc, q);  // += dY Z^T: B(k, j) = Z[j, k]
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p * q; e += blockDim.x) atomicAdd(da + e, da_acc[e]);
  for (int e = threadIdx.x; e < r * s; e += blockDim.x) atomicAdd(db + e, db_acc[e]);
}

}  // namespace lowrank
