// Launchers of the sparse-plus-low-rank kernels on CUDA (sltrain_kernels.cuh).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "sltrain_kernels.cuh"

namespace py = pybind11;

namespace lowrank {
namespace {

unsigned grid_for_items(int64_t items, int device) {
  const int64_t blocks = (items + kSLTrainThreads - 1) / kSLTrainThreads;
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(blocks, multiprocessors(device) * 16)));
}

void rebuild_cuda(int dtype, int index_code, std::uintptr_t b, std::uintptr_t a,
                  std::uintptr_t values, std::uintptr_t indices, int64_t nnz, double scale,
                  std::uintptr_t w, int64_t out, int64_t in, int rank, int device,
                  std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (out * in == 0) return;
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    sltrain_lowrank_kernel<T><<<grid_for_items(out * in, device), kSLTrainThreads, 0, stream>>>(
        as_ptr<const T>(b), as_ptr<const T>(a), float(scale), as_ptr<T>(w), out, in, rank);
    check_launch("sltrain_lowrank_kernel");
    if (nnz == 0) return;
    dispatch_index(index_code, [&](auto itag) {
      using I = decltype(itag);
      sltrain_scatter_kernel<T, I><<<grid_for_items(nnz, device), kSLTrainThreads, 0, stream>>>(
          as_ptr<const T>(values), as_ptr<const I>(indices), nnz, as_ptr<T>(w));
      check_launch("sltrain_scatter_kernel");
    });
  });
}

void scatter_cuda(int dtype, int index_code, std::uintptr_t values, std::uintptr_t indices,
                  int64_t nnz, std::uintptr_t w, int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (nnz == 0) return;
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    dispatch_index(index_code, [&](auto itag) {
      using I = decltype(itag);
      sltrain_scatter_kernel<T, I><<<grid_for_items(nnz, device), kSLTrainThreads, 0, stream>>>(
          as_ptr<const T>(values), as_ptr<const I>(indices), nnz, as_ptr<T>(w));
      check_launch("sltrain_scatter_kernel");
    });
  });
}

// y: float32 accumulator, zeroed by the caller.
void sparse_rows_cuda(int dtype, int index_code, std::uintptr_t x, int64_t tokens, int64_t x_width,
                      std::uintptr_t values, std::uintptr_t indices, int64_t nnz, int64_t cols,
                      bool transpose, std::uintptr_t y, int64_t y_width, int device,
                      std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (tokens == 0 || nnz == 0) return;
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    dispatch_index(index_code, [&](auto itag) {
      using I = decltype(itag);
      if (!transpose) {  // warp per (row, token chunk): deterministic
        const int64_t chunks = (tokens + kSparseTokenChunk - 1) / kSparseTokenChunk;
        const int64_t warps = y_width * chunks, per_block = kSLTrainThreads / 32;
        const unsigned grid =
            unsigned(std::max<int64_t>(1, std::min<int64_t>((warps + per_block - 1) / per_block,
                                                            int64_t(multiprocessors(device)) * 8)));
        sparse_rows_warp_kernel<T, I><<<grid, kSLTrainThreads, kSLTrainThreads * 4, stream>>>(
            as_ptr<const T>(x), tokens, x_width, as_ptr<const T>(values), as_ptr<const I>(indices),
            nnz, cols, as_ptr<float>(y), y_width);
        check_launch("sparse_rows_warp_kernel");
        return;
      }
      const unsigned grid =
          unsigned(std::max<int64_t>(1, std::min<int64_t>(tokens, multiprocessors(device) * 8)));
      sparse_rows_kernel<T, I><<<grid, kSLTrainThreads, 0, stream>>>(
          as_ptr<const T>(x), tokens, x_width, as_ptr<const T>(values), as_ptr<const I>(indices),
          nnz, cols, transpose, as_ptr<float>(y), y_width);
      check_launch("sparse_rows_kernel");
    });
  });
}

void sampled_dot_cuda(int dtype, int index_code, std::uintptr_t dy, std::uintptr_t x,
                      int64_t tokens, int64_t out, int64_t in, std::uintptr_t indices, int64_t nnz,
                      std::uintptr_t g, int device, std::uintptr_t stream_handle) {
  cudaStream_t stream = use_device(device, stream_handle);
  if (nnz == 0) return;
  dispatch_cuda_float(static_cast<DType>(dtype), [&](auto tag) {
    using T = decltype(tag);
    dispatch_index(index_code, [&](auto itag) {
      using I = decltype(itag);
      sampled_dot_kernel<T, I><<<grid_for_items(nnz, device), kSLTrainThreads, 0, stream>>>(
          as_ptr<const T>(dy), as_ptr<const T>(x), tokens, out, in, as_ptr<const I>(indices), nnz,
          as_ptr<T>(g));
      check_launch("sampled_dot_kernel");
    });
  });
}

}  // namespace

void bind_sltrain(py::module_& m) {
  m.def("sltrain_rebuild", &rebuild_cuda, py::call_guard<py::gil_scoped_release>());
  m.def("sltrain_scatter", &scatter_cuda, py::call_guard<py::gil_scoped_release>());
  m.def("sparse_rows", &sparse_rows_cuda, py::call_guard<py::gil_scoped_release>());
  m.def("sampled_dot", &sampled_dot_cuda, py::call_guard<py::gil_scoped_release>());
}

}  // namespace lowrank
