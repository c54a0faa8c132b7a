// Launchers of the random sketches on CUDA (kernels in sketch_kernels.cuh).
// Storage float32/float16/bfloat16 (and float64 for philox_fill), float32 math.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "sketch_kernels.cuh"

namespace py = pybind11;

namespace lowrank {
namespace {

unsigned grid_for(int64_t work, int device, int per_sm) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(work, multiprocessors(device) * per_sm)));
}

void philox_fill_cuda(int dtype, std::uintptr_t out, int64_t n, int kind, uint64_t seed,
                      uint64_t stream_id, int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (n == 0) return;
  const unsigned grid = grid_for((n + kSketchThreads - 1) / kSketchThreads, device, 8);
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    philox_fill_kernel<T>
        <<<grid, kSketchThreads, 0, stream>>>(as_ptr<T>(out), n, kind, seed, stream_id);
    check_launch("philox_fill_kernel");
  };
  if (static_cast<DType>(dtype) == DType::Float64)
    launch(double{});
  else
    dispatch_cuda_float(static_cast<DType>(dtype), launch);
}

void srht_rows_cuda(int dtype, std::uintptr_t a, int64_t rows, int64_t n, std::uintptr_t signs,
                    std::uintptr_t cols, int64_t l, int64_t n2, double scale, std::uintptr_t out,
                    int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (rows == 0) return;
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    const size_t bytes = size_t(n2) * sizeof(float);
    allow_shared(srht_rows_kernel<T>, bytes, device, "srht_rows");
    srht_rows_kernel<T><<<grid_for(rows, device, 4), kSketchThreads, bytes, stream>>>(
        as_ptr<const T>(a), rows, n, as_ptr<const T>(signs), as_ptr<const int64_t>(cols), l, n2,
        float(scale), as_ptr<T>(out));
    check_launch("srht_rows_kernel");
  });
}

void sparse_sign_rows_cuda(int dtype, std::uintptr_t a, int64_t rows, int64_t n,
                           std::uintptr_t cols, std::uintptr_t signs, int64_t nonzeros, int64_t l,
                           std::uintptr_t out, int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (rows == 0) return;
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    const size_t bytes = size_t(l) * sizeof(float);
    allow_shared(sparse_sign_rows_kernel<T>, bytes, device, "sparse_sign_rows");
    sparse_sign_rows_kernel<T><<<grid_for(rows, device, 4), kSketchThreads, bytes, stream>>>(
        as_ptr<const T>(a), rows, n, as_ptr<const int32_t>(cols), as_ptr<const T>(signs), nonzeros,
        l, as_ptr<T>(out));
    check_launch("sparse_sign_rows_kernel");
  });
}

}  // namespace

void bind_sketch(py::module_& m) {
  m.def("philox_fill", &philox_fill_cuda, py::call_guard<py::gil_scoped_release>());
  m.def("srht_rows", &srht_rows_cuda, py::call_guard<py::gil_scoped_release>());
  m.def("sparse_sign_rows", &sparse_sign_rows_cuda, py::call_guard<py::gil_scoped_release>());
}

}  // namespace lowrank
