// C entry points running the SLTrain kernels of cuda/sltrain_kernels.cuh on the
// CPU (float32, int32 indices), for tests/test_cuda_emulation.py.
#include "emulate.h"
// The kernel header comes after the emulation macros.
#include "sltrain_kernels.cuh"

using lowrank::kSLTrainThreads;

extern "C" void sltrain_rebuild_f32(const float* b, const float* a, const float* values,
                                    const int32_t* indices, int64_t nnz, float scale, float* w,
                                    int64_t out, int64_t in, int rank, unsigned grid) {
  emulation::launch(grid, kSLTrainThreads, 0, lowrank::sltrain_lowrank_kernel<float>, b, a, scale,
                    w, out, in, rank);
  emulation::launch(grid, kSLTrainThreads, 0, lowrank::sltrain_scatter_kernel<float, int32_t>,
                    values, indices, nnz, w);
}

extern "C" void sparse_rows_f32(const float* x, int64_t tokens, int64_t x_width,
                                const float* values, const int32_t* indices, int64_t nnz,
                                int64_t cols, bool transpose, float* y, int64_t y_width,
                                unsigned grid) {
  if (!transpose) {  // as the CUDA launcher: warp per (row, token chunk)
    emulation::launch(grid, kSLTrainThreads, kSLTrainThreads * sizeof(float),
                      lowrank::sparse_rows_warp_kernel<float, int32_t>, x, tokens, x_width, values,
                      indices, nnz, cols, y, y_width);
    return;
  }
  emulation::launch(grid, kSLTrainThreads, 0, lowrank::sparse_rows_kernel<float, int32_t>, x,
                    tokens, x_width, values, indices, nnz, cols, transpose, y, y_width);
}

extern "C" void sampled_dot_f32(const float* dy, const float* x, int64_t tokens, int64_t out,
                                int64_t in, const int32_t* indices, int64_t nnz, float* g,
                                unsigned grid) {
  emulation::launch(grid, kSLTrainThreads, 0, lowrank::sampled_dot_kernel<float, int32_t>, dy, x,
                    tokens, out, in, indices, nnz, g);
}
