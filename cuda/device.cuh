// Device-side helpers shared by the kernels: float32 <-> storage-type conversion
// (float, half, bfloat16) and a shared-memory block GEMM. No runtime API calls,
// so tests/cuda_emulation can compile kernels that use these for the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifdef __CUDACC__
#include <mma.h>  // nvcuda::wmma (tests/cuda_emulation/wmma.h on the CPU)
#endif

// Dynamic shared memory of a kernel, as float32 words, 128-byte aligned: WMMA loads and
// stores need 32-byte aligned pointers, and the kernels carve regions whose offsets are
// multiples of 32 bytes out of it (the default alignment would be the element's, 4 bytes).
#ifndef LOWRANK_SHARED_FLOATS
#define LOWRANK_SHARED_FLOATS(name) extern __shared__ __align__(128) float name[]
#endif

// The tensor-core (WMMA) kernels need compute capability 8.0 (bfloat16 fragments). When
// device code is compiled for an older target (LOWRANK_CUDA_ARCHS=70 or 75), their bodies
// are left out and `lowrank::tensor_cores(device)` reports false for a GPU running that
// code, so the launchers refuse and the dispatch skips them; every other kernel is built.
// Host code and the CPU emulation (no __CUDA_ARCH__) see the full kernels.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define LOWRANK_TENSOR_CORE_ARCH 0
#else
#define LOWRANK_TENSOR_CORE_ARCH 1
#endif

namespace lowrank {

__device__ __forceinline__ float to_float(float v) {
  return v;
}
__device__ __forceinline__ float to_float(__half v) {
  return __half2float(v);
}
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// C[M x N] (= or +=) A[M x K] . B[K x N] over one thread block, all in shared
// memory; A element (i, k) at A[i*rsa + k*csa], B element (k, j) at
// B[k*rsb + j*csb]. Threads stride over C so neighbouring threads read
// neighbouring B columns (conflict-free when csb == 1) and share A.
template <bool Accumulate>
__device__ __forceinline__ void block_gemm(int M, int N, int K, const float* A, int rsa, int csa,
                                           const float* B, int rsb, int csb, float* C, int ldc) {
  for (int e = threadIdx.x; e < M * N; e += blockDim.x) {
    const int i = e / N, j = e - (e / N) * N;
    float sum = Accumulate ? C[i * ldc + j] : 0.f;
    const float* a = A + i * rsa;
    const float* b = B + j * csb;
    for (int k = 0; k < K; ++k) sum = fmaf(a[k * csa], b[k * rsb], sum);
    C[i * ldc + j] = sum;
  }
}

}  // namespace lowrank
