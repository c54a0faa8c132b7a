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
// dominate. This SIMT kernel is compute-bound; its GPU timings are unmeasured.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "kron_kernels.cuh"

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
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    auto kernel = kron_forward_kernel<T>;
    const size_t bytes = size_t(d.forward_words()) * sizeof(float);
    allow_shared(kernel, bytes, device, "kron_matmul");
    const int64_t grid = std::min<int64_t>(tokens, int64_t(multiprocessors(device)) * 8);
    kernel<<<unsigned(grid), kKronThreads, bytes, stream>>>(
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
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    auto kernel = kron_factor_grads_kernel<T>;
    const size_t bytes = size_t(d.backward_words()) * sizeof(float);
    allow_shared(kernel, bytes, device, "kron_matmul backward");
    const int64_t grid = std::min<int64_t>(tokens, int64_t(multiprocessors(device)) * 4);
    kernel<<<unsigned(grid), kKronThreads, bytes, stream>>>(
        as_ptr<const T>(dy), as_ptr<const T>(x), as_ptr<const T>(a), as_ptr<const T>(b),
        as_ptr<float>(da), as_ptr<float>(db), tokens, d);
    check_launch("kron_factor_grads_kernel");
  });
}

void bind_kron(py::module_& m) {
  m.def("kron_matmul", &kron_matmul_cuda, py::call_guard<py::gil_scoped_release>(),
        "y = x @ kron(a, b)^T on the given device and stream.");
  m.def("kron_factor_grads", &kron_factor_grads_cuda, py::call_guard<py::gil_scoped_release>(),
        "Accumulates da, db (float32, zeroed by the caller) of kron_matmul.");
  m.def("kron_forward_smem_bytes", &kron_forward_smem_bytes);
  m.def("kron_backward_smem_bytes", &kron_backward_smem_bytes);
}

}  // namespace lowrank
