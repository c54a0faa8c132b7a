// Host-side helpers for the CUDA launchers: error checks, device selection,
// device attributes and dtype dispatch. Device-side helpers are in device.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "device.cuh"
#include "launch.h"
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

inline DeviceLimits device_limits(int device) {
  return {max_shared_bytes(device), multiprocessors(device)};
}

// Whether the tensor-core kernels can run on `device` (defined in kron.cu): compute
// capability 8.0 or newer, and device code built for it (LOWRANK_TENSOR_CORE_ARCH).
bool tensor_cores(int device);

// Launchers of tensor-core kernels call this first: a clean error instead of a launch.
inline void require_tensor_cores(int device, const char* name) {
  if (!tensor_cores(device))
    throw std::invalid_argument(std::string(name) +
                                ": the tensor-core kernels need compute capability 8.0 or newer "
                                "and a build for it (LOWRANK_CUDA_ARCHS)");
}

// Checks that `bytes` of dynamic shared memory fit on the device and allows them.
template <typename Kernel>
inline void allow_shared(Kernel kernel, size_t bytes, int device, const char* name) {
  if (bytes > size_t(max_shared_bytes(device)))
    throw std::invalid_argument(std::string(name) + ": factors too large for shared memory");
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
             "cudaFuncSetAttribute");
}

}  // namespace lowrank
