// Kernels of the Monarch product (launched by monarch.cu; math in cpp/monarch.cpp).
// Device code only, so tests/cuda_emulation compiles these same kernels for the CPU.
//
// Forward: one block per token (grid-stride); the token's x and the intermediate h
// live in shared memory, weights are read through the cache, y is written once.
// Backward: per token, h and dh are recomputed into a float32 workspace; dx is a
// second per-token pass; dw1 and dw2 are reductions over tokens, one thread per
// weight element.
#pragma once

#include <cstdint>

#include "device.cuh"

namespace lowrank {

constexpr int kMonarchThreads = 256;

struct MonarchDims {
  int k, q, p, l, s, r;
  __host__ __device__ int64_t in() const { return int64_t(k) * p; }
  __host__ __device__ int64_t mid() const { return int64_t(k) * q; }
  __host__ __device__ int64_t out() const { return int64_t(l) * s; }
};

// h[i] for i = kk*q + qq, from x (shared memory, float32).
template <typename T>
__device__ __forceinline__ void monarch_stage1(const MonarchDims& d, const float* xs,
                                               const T* __restrict__ w1, float* h) {
  for (int64_t i = threadIdx.x; i < d.mid(); i += blockDim.x) {
    const int64_t kk = i / d.q;
    const T* w = w1 + i * d.p;
    const float* xk = xs + kk * d.p;
    float sum = 0.f;
    for (int pp = 0; pp < d.p; ++pp) sum = fmaf(to_float(w[pp]), xk[pp], sum);
    h[i] = sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kMonarchThreads)
    monarch_forward_kernel(const T* __restrict__ x, const T* __restrict__ w1,
                           const T* __restrict__ w2, T* __restrict__ y, int64_t tokens,
                           MonarchDims d) {
  LOWRANK_SHARED_FLOATS(smem);
  float* xs = smem;        // k*p
  float* h = xs + d.in();  // k*q
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    __syncthreads();  // the previous token is done with xs and h
    for (int64_t j = threadIdx.x; j < d.in(); j += blockDim.x) xs[j] = to_float(x[t * d.in() + j]);
    __syncthreads();
    monarch_stage1(d, xs, w1, h);
    __syncthreads();
    for (int64_t o = threadIdx.x; o < d.out(); o += blockDim.x) {
      const int64_t ss = o / d.l, ll = o - ss * d.l;
      const T* w = w2 + (ll * d.s + ss) * d.r;
      float sum = 0.f;
      for (int rr = 0; rr < d.r; ++rr) sum = fmaf(to_float(w[rr]), h[int64_t(rr) * d.l + ll], sum);
      y[t * d.out() + o] = from_float<T>(sum);
    }
  }
}

// Per token: h (recomputed) and dh = stage-2 transpose applied to dy, into float32 workspaces.
template <typename T>
__global__ void __launch_bounds__(kMonarchThreads)
    monarch_backward_mid_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                const T* __restrict__ w1, const T* __restrict__ w2,
                                float* __restrict__ h_out, float* __restrict__ dh_out,
                                int64_t tokens, MonarchDims d) {
  LOWRANK_SHARED_FLOATS(smem);
  float* xs = smem;  // k*p
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < d.in(); j += blockDim.x) xs[j] = to_float(x[t * d.in() + j]);
    __syncthreads();
    if (h_out) monarch_stage1(d, xs, w1, h_out + t * d.mid());
    for (int64_t i = threadIdx.x; i < d.mid(); i += blockDim.x) {
      const int64_t rr = i / d.l, ll = i - rr * d.l;  // i = rr*l + ll
      float sum = 0.f;
      for (int ss = 0; ss < d.s; ++ss)
        sum = fmaf(to_float(w2[(ll * d.s + ss) * d.r + rr]),
                   to_float(dy[t * d.out() + int64_t(ss) * d.l + ll]), sum);
      dh_out[t * d.mid() + i] = sum;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMonarchThreads)
    monarch_backward_dx_kernel(const float* __restrict__ dh, const T* __restrict__ w1,
                               T* __restrict__ dx, int64_t tokens, MonarchDims d) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x)
    for (int64_t j = threadIdx.x; j < d.in(); j += blockDim.x) {
      const int64_t kk = j / d.p, pp = j - kk * d.p;
      float sum = 0.f;
      for (int qq = 0; qq < d.q; ++qq)
        sum = fmaf(to_float(w1[(kk * d.q + qq) * d.p + pp]), dh[t * d.mid() + kk * d.q + qq], sum);
      dx[t * d.in() + j] = from_float<T>(sum);
    }
}

// dw1[kk, qq, pp] = sum_t dh[t, kk*q + qq] x[t, kk*p + pp]
template <typename T>
__global__ void __launch_bounds__(kMonarchThreads)
    monarch_backward_dw1_kernel(const float* __restrict__ dh, const T* __restrict__ x,
                                float* __restrict__ dw1, int64_t tokens, MonarchDims d) {
  const int64_t count = d.mid() * d.p;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / d.p, pp = e - i * d.p, kk = i / d.q;
    float sum = 0.f;
    for (int64_t t = 0; t < tokens; ++t)
      sum = fmaf(dh[t * d.mid() + i], to_float(x[t * d.in() + kk * d.p + pp]), sum);
    dw1[e] = sum;
  }
}

// dw2[ll, ss, rr] = sum_t dy[t, ss*l + ll] h[t, rr*l + ll]
template <typename T>
__global__ void __launch_bounds__(kMonarchThreads)
    monarch_backward_dw2_kernel(const T* __restrict__ dy, const float* __restrict__ h,
                                float* __restrict__ dw2, int64_t tokens, MonarchDims d) {
  const int64_t count = int64_t(d.l) * d.s * d.r;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ll = e / (int64_t(d.s) * d.r), rest = e - ll * d.s * d.r;
    const int64_t ss = rest / d.r, rr = rest - ss * d.r;
    float sum = 0.f;
    for (int64_t t = 0; t < tokens; ++t)
      sum = fmaf(to_float(dy[t * d.out() + ss * d.l + ll]), h[t * d.mid() + rr * d.l + ll], sum);
    dw2[e] = sum;
  }
}

}  // namespace lowrank
