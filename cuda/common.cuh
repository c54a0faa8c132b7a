// CUDA-side helpers shared by the kernels: error checks, device selection,
// and float32 <-> storage-type conversion (float, half, bfloat16).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "lowrank/common.h"

namespace lowrank {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("lowrank CUDA error in ") + what + ": " +
                             cudaGetErrorString(status));
}

// This module links its own (static) CUDA runtime, whose current device is
// separate from torch's; every launcher therefore selects the tensor's device.
inline cudaStream_t use_device(int device, std::uintptr_t stream) {
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  return reinterpret_cast<cudaStream_t>(stream);
}

inline void check_launch(const char* kernel) {
  check_cuda(cudaGetLastError(), kernel);
}

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

// Calls fn(T{}) with T the storage type of a CUDA dtype.
template <typename Fn>
void dispatch_cuda_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(float{}); return;
    case DType::Float16: fn(__half{}); return;
    case DType::BFloat16: fn(__nv_bfloat16{}); return;
    default:
      throw std::invalid_argument("lowrank CUDA kernels take float32, float16 or bfloat16, got " +
                                  dtype_name(dtype));
  }
}

inline int max_shared_bytes(int device) {
  int bytes = 0;
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  return bytes;
}

inline int multiprocessors(int device) {
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
  return count;
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
