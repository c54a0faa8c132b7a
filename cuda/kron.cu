// Kronecker-factored matrix product on CUDA: y = x @ kron(a, b)^T without
// forming kron(a, b). Math and notation as in cpp/kron.cpp: one token's x is
// X (q x s) and its output a X b^T (p x r).
//
// Forward: each block keeps a and b^T in shared memory as float32 and walks
// tokens grid-stride; per token, X is staged in shared memory, the intermediate
// (Z = X b^T or W = a X, whichever is cheaper) never leaves the chip, and
// y = addend + scale * Y is written once (the adapter's fused residual add).
// Storage dtype float32/float16/bfloat16, float32 accumulation.
//
// Backward: dX is the forward kernel on (dY, a^T, b^T). The factor gradients
//   da = sum_t dY_t (X_t b^T)^T,   db = sum_t (a^T dY_t)^T X_t
// are accumulated per block in shared memory and added once per block into
// float32 outputs with atomics.
//
// Speed floor (bf16, in=out=4096, 64x64 factors, 8192 tokens): forward moves
// 128 MiB (x read, y written) and does 8.6 GFLOP; on tensor cores the bytes
// dominate. The SIMT kernel (float32 math) is compute-bound; the tensor-core
// kernels (float16/bfloat16, kron_kernels.cuh) aim at the memory floor. Neither
// has been timed on a GPU yet: the dispatch measures them against cuBLAS.
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdint>

#include "common.cuh"
#include "kron_launch.h"

namespace py = pybind11;

namespace lowrank {

int64_t kron_forward_smem_bytes(int p, int q, int r, int s) {
  return KronDims{p, q, r, s}.forward_words() * int64_t(sizeof(float));
}
int64_t kron_backward_smem_bytes(int p, int q, int r, int s) {
  return KronDims{p, q, r, s}.backward_words() * int64_t(sizeof(float));
}

void kron_matmul_cuda(int dtype, std::uintptr_t x, std::uintptr_t a, std::uintptr_t b,
                      std::uintptr_t addend, double scale, std::uintptr_t y, int64_t tokens, int p,
                      int q, int r, int s, int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (tokens == 0) return;
  const KronDims d{p, q, r, s};
  const KronLaunch plan = kron_forward_launch(tokens, d, device_limits(device));
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    auto kernel = kron_forward_kernel<T>;
    allow_shared(kernel, size_t(plan.smem_bytes), device, "kron_matmul");
    kernel<<<unsigned(plan.grid), kKronThreads, size_t(plan.smem_bytes), stream>>>(
        as_ptr<const T>(x), as_ptr<const T>(a), as_ptr<const T>(b), as_ptr<const T>(addend),
        float(scale), as_ptr<T>(y), tokens, d);
    check_launch("kron_forward_kernel");
  });
}

void kron_factor_grads_cuda(int dtype, std::uintptr_t dy, std::uintptr_t x, std::uintptr_t a,
                            std::uintptr_t b, std::uintptr_t da, std::uintptr_t db, int64_t tokens,
                            int p, int q, int r, int s, int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (tokens == 0) return;
  const KronDims d{p, q, r, s};
  const KronLaunch plan = kron_factor_grads_launch(tokens, d, device_limits(device));
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    auto kernel = kron_factor_grads_kernel<T>;
    allow_shared(kernel, size_t(plan.smem_bytes), device, "kron_matmul backward");
    kernel<<<unsigned(plan.grid), kKronThreads, size_t(plan.smem_bytes), stream>>>(
        as_ptr<const T>(dy), as_ptr<const T>(x), as_ptr<const T>(a), as_ptr<const T>(b),
        as_ptr<float>(da), as_ptr<float>(db), tokens, d);
    check_launch("kron_factor_grads_kernel");
  });
}

// ---- tensor-core kernels ----------------------------------------------------------------------

// Device code built for an older target (LOWRANK_TENSOR_CORE_ARCH) runs on a newer GPU
// through PTX compiled at load time, without the tensor-core kernels; the PTX version a
// kernel was built from says which code the GPU runs. All kernels of the module share it.
// The answer is remembered per device: the launchers ask on every call.
bool tensor_cores(int device) {
  constexpr int kRemembered = 64;
  static std::atomic<int> known[kRemembered] = {};  // 0: not asked yet, 1: no, 2: yes
  if (device >= 0 && device < kRemembered && known[device].load(std::memory_order_relaxed) != 0)
    return known[device].load(std::memory_order_relaxed) == 2;
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
             "cudaDeviceGetAttribute");
  bool usable = false;
  if (major >= 8) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    cudaFuncAttributes attributes{};
    check_cuda(cudaFuncGetAttributes(&attributes, kron_forward_tc_kernel<__half>),
               "cudaFuncGetAttributes");
    usable = attributes.ptxVersion >= 80;
  }
  if (device >= 0 && device < kRemembered)
    known[device].store(usable ? 2 : 1, std::memory_order_relaxed);
  return usable;
}

int kron_tc_tile_on(int p, int q, int r, int s, bool grads, int device) {
  return kron_tc_tile(p, q, r, s, grads, max_shared_bytes(device));
}

template <typename Fn>
void dispatch_tc_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float16: fn(__half{}); return;
    case DType::BFloat16: fn(__nv_bfloat16{}); return;
    default:
      throw std::invalid_argument("lowrank tensor-core kernels take float16 or bfloat16, got " +
                                  dtype_name(dtype));
  }
}

void kron_matmul_tc_cuda(int dtype, std::uintptr_t x, std::uintptr_t a, std::uintptr_t b,
                         std::uintptr_t addend, double scale, std::uintptr_t y, int64_t tokens,
                         int p, int q, int r, int s, int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (tokens == 0) return;
  require_tensor_cores(device, "kron_matmul");
  const KronTcLaunch plan = kron_tc_launch(tokens, p, q, r, s, false, device_limits(device));
  if (plan.dims.tile == 0)
    throw std::invalid_argument("kron_matmul: factors too large for shared memory");
  if (plan.grid == 0) return;
  dispatch_tc_dtype(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    auto kernel = kron_forward_tc_kernel<T>;
    allow_shared(kernel, size_t(plan.smem_bytes), device, "kron_matmul");
    kernel<<<unsigned(plan.grid), kKronTcThreads, size_t(plan.smem_bytes), stream>>>(
        as_ptr<const T>(x), as_ptr<const T>(a), as_ptr<const T>(b), as_ptr<const T>(addend),
        float(scale), as_ptr<T>(y), tokens, plan.dims);
    check_launch("kron_forward_tc_kernel");
  });
}

// Blocks of the factor-gradient kernel; its workspace holds blocks * (p q + r s) floats.
int64_t kron_tc_grad_blocks(int64_t tokens, int p, int q, int r, int s, int device) {
  return kron_tc_launch(tokens, p, q, r, s, true, device_limits(device)).grid;
}

void kron_factor_grads_tc_cuda(int dtype, std::uintptr_t dy, std::uintptr_t x, std::uintptr_t a,
                               std::uintptr_t b, std::uintptr_t da, std::uintptr_t db,
                               std::uintptr_t workspace, int64_t tokens, int p, int q, int r, int s,
                               int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (tokens == 0) {  // zero gradients
    check_cuda(cudaMemsetAsync(as_ptr<float>(da), 0, sizeof(float) * size_t(p) * q, stream),
               "cudaMemsetAsync");
    check_cuda(cudaMemsetAsync(as_ptr<float>(db), 0, sizeof(float) * size_t(r) * s, stream),
               "cudaMemsetAsync");
    return;
  }
  require_tensor_cores(device, "kron_matmul backward");
  const KronTcLaunch plan = kron_tc_launch(tokens, p, q, r, s, true, device_limits(device));
  if (plan.dims.tile == 0)
    throw std::invalid_argument("kron_matmul backward: factors too large for shared memory");
  float* partial_da = as_ptr<float>(workspace);
  float* partial_db = partial_da + plan.partial_db_offset();
  dispatch_tc_dtype(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    auto kernel = kron_factor_grads_tc_kernel<T>;
    allow_shared(kernel, size_t(plan.smem_bytes), device, "kron_matmul backward");
    kernel<<<unsigned(plan.grid), kKronTcThreads, size_t(plan.smem_bytes), stream>>>(
        as_ptr<const T>(dy), as_ptr<const T>(x), as_ptr<const T>(a), as_ptr<const T>(b), partial_da,
        partial_db, tokens, plan.dims);
    check_launch("kron_factor_grads_tc_kernel");
  });
  kron_reduce_partials_kernel<<<unsigned(plan.reduce_grid), kKronTcThreads, 0, stream>>>(
      partial_da, int(plan.grid), int64_t(p) * q, as_ptr<float>(da));
  kron_reduce_partials_kernel<<<unsigned(plan.reduce_grid), kKronTcThreads, 0, stream>>>(
      partial_db, int(plan.grid), int64_t(r) * s, as_ptr<float>(db));
  check_launch("kron_reduce_partials_kernel");
}

void bind_kron(py::module_& m) {
  m.def("kron_matmul_tc", &kron_matmul_tc_cuda, py::call_guard<py::gil_scoped_release>(),
        "y = addend + scale * x @ kron(a, b)^T on tensor cores (float16/bfloat16).");
  m.def("kron_factor_grads_tc", &kron_factor_grads_tc_cuda,
        py::call_guard<py::gil_scoped_release>(),
        "da, db (float32) of kron_matmul on tensor cores, deterministic (no atomics).");
  m.def("kron_tc_tile", &kron_tc_tile_on);
  m.def("kron_tc_smem_bytes", [](int p, int q, int r, int s, bool grads) {
    const KronTcDims d{p, q, r, s, 1};
    return grads ? d.grads_bytes() : d.forward_bytes();
  });
  m.def("kron_tc_grad_blocks", &kron_tc_grad_blocks);
  m.def("tensor_cores", &tensor_cores);
  m.def("kron_matmul", &kron_matmul_cuda, py::call_guard<py::gil_scoped_release>(),
        "y = x @ kron(a, b)^T on the given device and stream.");
  m.def("kron_factor_grads", &kron_factor_grads_cuda, py::call_guard<py::gil_scoped_release>(),
        "Accumulates da, db (float32, zeroed by the caller) of kron_matmul.");
  m.def("kron_forward_smem_bytes", &kron_forward_smem_bytes);
  m.def("kron_backward_smem_bytes", &kron_backward_smem_bytes);
}

}  // namespace lowrank
