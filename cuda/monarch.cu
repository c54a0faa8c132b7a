// Launchers of the Monarch product on CUDA (kernels in monarch_kernels.cuh).
// Storage float32/float16/bfloat16, float32 accumulation.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "common.cuh"
#include "monarch_launch.h"

namespace py = pybind11;

namespace lowrank {
namespace {

void monarch_matmul_cuda(int dtype, std::uintptr_t x, std::uintptr_t w1, std::uintptr_t w2,
                         std::uintptr_t y, int64_t tokens, int k, int q, int p, int l, int s, int r,
                         int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (tokens == 0) return;
  const MonarchDims d{k, q, p, l, s, r};
  const MonarchLaunch plan = monarch_forward_launch(tokens, d, device_limits(device));
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    const size_t bytes = size_t(plan.smem_bytes);
    allow_shared(monarch_forward_kernel<T>, bytes, device, "monarch_matmul");
    monarch_forward_kernel<T><<<unsigned(plan.grid), kMonarchThreads, bytes, stream>>>(
        as_ptr<const T>(x), as_ptr<const T>(w1), as_ptr<const T>(w2), as_ptr<T>(y), tokens, d);
    check_launch("monarch_forward_kernel");
  });
}

// workspace: float32, 2 * tokens * k*q (h, then dh); dw1/dw2 float32 outputs.
void monarch_backward_cuda(int dtype, std::uintptr_t dy, std::uintptr_t x, std::uintptr_t w1,
                           std::uintptr_t w2, std::uintptr_t dx, std::uintptr_t dw1,
                           std::uintptr_t dw2, std::uintptr_t workspace, int64_t tokens, int k,
                           int q, int p, int l, int s, int r, int device,
                           std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (tokens == 0) return;
  const MonarchDims d{k, q, p, l, s, r};
  const MonarchBackwardLaunch plan = monarch_backward_launch(tokens, d, device_limits(device));
  float* h = as_ptr<float>(workspace);
  float* dh = h + plan.dh_offset;
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    const size_t bytes = size_t(plan.smem_bytes);
    allow_shared(monarch_backward_mid_kernel<T>, bytes, device, "monarch_matmul backward");
    monarch_backward_mid_kernel<T><<<unsigned(plan.token_grid), kMonarchThreads, bytes, stream>>>(
        as_ptr<const T>(dy), as_ptr<const T>(x), as_ptr<const T>(w1), as_ptr<const T>(w2),
        dw2 ? h : nullptr, dh, tokens, d);
    check_launch("monarch_backward_mid_kernel");
    if (dx) {
      monarch_backward_dx_kernel<T><<<unsigned(plan.token_grid), kMonarchThreads, 0, stream>>>(
          dh, as_ptr<const T>(w1), as_ptr<T>(dx), tokens, d);
      check_launch("monarch_backward_dx_kernel");
    }
    if (dw1) {
      monarch_backward_dw1_kernel<T><<<unsigned(plan.dw1_grid), kMonarchThreads, 0, stream>>>(
          dh, as_ptr<const T>(x), as_ptr<float>(dw1), tokens, d);
      check_launch("monarch_backward_dw1_kernel");
    }
    if (dw2) {
      monarch_backward_dw2_kernel<T><<<unsigned(plan.dw2_grid), kMonarchThreads, 0, stream>>>(
          as_ptr<const T>(dy), h, as_ptr<float>(dw2), tokens, d);
      check_launch("monarch_backward_dw2_kernel");
    }
  });
}

int64_t monarch_tc_smem_bytes(int k, int q, int p, int l, int s, int r, bool transposed) {
  return MonarchTcDims{k, q, p, l, s, r, transposed}.smem_bytes();
}

// y = M x, or with transposed dx = M^T dy (src (tokens, l*s), dst (tokens, k*p)).
void monarch_matmul_tc_cuda(int dtype, std::uintptr_t src, std::uintptr_t w1, std::uintptr_t w2,
                            std::uintptr_t dst, int64_t tokens, int k, int q, int p, int l, int s,
                            int r, bool transposed, int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (tokens == 0) return;
  require_tensor_cores(device, "monarch_matmul");
  const MonarchTcDims d{k, q, p, l, s, r, transposed};
  const MonarchLaunch plan = monarch_tc_launch(tokens, d, device_limits(device));
  const size_t bytes = size_t(plan.smem_bytes);
  const unsigned grid = unsigned(plan.grid);
  auto launch = [&](auto tag, auto direction) {
    using T = decltype(tag);
    constexpr bool kTransposed = decltype(direction)::value;
    allow_shared(monarch_tc_kernel<T, kTransposed>, bytes, device, "monarch_matmul");
    monarch_tc_kernel<T, kTransposed><<<grid, kMonarchTcThreads, bytes, stream>>>(
        as_ptr<const T>(src), as_ptr<const T>(w1), as_ptr<const T>(w2), as_ptr<T>(dst), tokens, d);
    check_launch("monarch_tc_kernel");
  };
  auto in_direction = [&](auto tag) {
    if (transposed)
      launch(tag, std::true_type{});
    else
      launch(tag, std::false_type{});
  };
  switch (static_cast<DType>(dtype)) {
    case DType::Float16: in_direction(__half{}); return;
    case DType::BFloat16: in_direction(__nv_bfloat16{}); return;
    default: throw std::invalid_argument("monarch tensor-core kernel takes float16 or bfloat16");
  }
}

}  // namespace

void bind_monarch(py::module_& m) {
  m.def("monarch_matmul_tc", &monarch_matmul_tc_cuda, py::call_guard<py::gil_scoped_release>(),
        "y = M x, or dx = M^T dy, on tensor cores (float16/bfloat16).");
  m.def("monarch_tc_smem_bytes", &monarch_tc_smem_bytes);
  m.def("monarch_matmul", &monarch_matmul_cuda, py::call_guard<py::gil_scoped_release>());
  m.def("monarch_matmul_backward", &monarch_backward_cuda,
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace lowrank
