// C entry points running the sketch kernels of cuda/sketch_kernels.cuh on the
// CPU (float32), for tests/test_cuda_emulation.py.
#include "emulate.h"
// The kernel header comes after the emulation macros.
#include "sketch_kernels.cuh"

using lowrank::kSketchThreads;

extern "C" void philox_fill_f32(float* out, int64_t n, int kind, uint64_t seed, uint64_t stream,
                                unsigned grid) {
  emulation::launch(grid, kSketchThreads, 0, lowrank::philox_fill_kernel<float>, out, n, kind, seed,
                    stream);
}

extern "C" void srht_rows_f32(const float* a, int64_t rows, int64_t n, const float* signs,
                              const int64_t* cols, int64_t l, int64_t n2, float scale, float* out,
                              unsigned grid) {
  emulation::launch(grid, kSketchThreads, n2 * sizeof(float), lowrank::srht_rows_kernel<float>, a,
                    rows, n, signs, cols, l, n2, scale, out);
}

extern "C" void sparse_sign_rows_f32(const float* a, int64_t rows, int64_t n, const int32_t* cols,
                                     const float* signs, int64_t nonzeros, int64_t l, float* out,
                                     unsigned grid) {
  emulation::launch(grid, kSketchThreads, l * sizeof(float),
                    lowrank::sparse_sign_rows_kernel<float>, a, rows, n, cols, signs, nonzeros, l,
                    out);
}
