// Launchers of the Monarch product on CUDA (kernels in monarch_kernels.cuh).
// Storage float32/float16/bfloat16, float32 accumulation.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "common.cuh"
#include "monarch_kernels.cuh"

namespace py = pybind11;

namespace lowrank {
namespace {

unsigned blocks_for(int64_t work, int device, int per_sm) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(work, multiprocessors(device) * per_sm)));
}

void monarch_matmul_cuda(int dtype, std::uintptr_t x, std::uintptr_t w1, std::uintptr_t w2,
                         std::uintptr_t y, int64_t tokens, int k, int q, int p, int l, int s, int r,
                         int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (tokens == 0) return;
  const MonarchDims d{k, q, p, l, s, r};
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    const size_t bytes = size_t(d.in() + d.mid()) * sizeof(float);
    allow_shared(monarch_forward_kernel<T>, bytes, device, "monarch_matmul");
    monarch_forward_kernel<T><<<blocks_for(tokens, device, 8), kMonarchThreads, bytes, stream>>>(
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
  float* h = as_ptr<float>(workspace);
  float* dh = h + tokens * d.mid();
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    const size_t bytes = size_t(d.in()) * sizeof(float);
    allow_shared(monarch_backward_mid_kernel<T>, bytes, device, "monarch_matmul backward");
    monarch_backward_mid_kernel<T>
        <<<blocks_for(tokens, device, 8), kMonarchThreads, bytes, stream>>>(
            as_ptr<const T>(dy), as_ptr<const T>(x), as_ptr<const T>(w1), as_ptr<const T>(w2),
            dw2 ? h : nullptr, dh, tokens, d);
    check_launch("monarch_backward_mid_kernel");
    if (dx) {
      monarch_backward_dx_kernel<T><<<blocks_for(tokens, device, 8), kMonarchThreads, 0, stream>>>(
          dh, as_ptr<const T>(w1), as_ptr<T>(dx), tokens, d);
      check_launch("monarch_backward_dx_kernel");
    }
    if (dw1) {
      const int64_t count = d.mid() * d.p;
      monarch_backward_dw1_kernel<T>
          <<<blocks_for((count + kMonarchThreads - 1) / kMonarchThreads, device, 8),
             kMonarchThreads, 0, stream>>>(dh, as_ptr<const T>(x), as_ptr<float>(dw1), tokens, d);
      check_launch("monarch_backward_dw1_kernel");
    }
    if (dw2) {
      const int64_t count = int64_t(d.l) * d.s * d.r;
      monarch_backward_dw2_kernel<T>
          <<<blocks_for((count + kMonarchThreads - 1) / kMonarchThreads, device, 8),
             kMonarchThreads, 0, stream>>>(as_ptr<const T>(dy), h, as_ptr<float>(dw2), tokens, d);
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
  const MonarchTcDims d{k, q, p, l, s, r, transposed};
  const size_t bytes = size_t(d.smem_bytes());
  const unsigned grid = blocks_for((tokens + kMonarchTile - 1) / kMonarchTile, device, 2);
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
