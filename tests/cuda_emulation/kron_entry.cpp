// C entry points running the Kronecker kernels of cuda/kron_kernels.cuh on the
// CPU (float32 and bfloat16 storage), for tests/test_cuda_emulation.py.
#include "emulate.h"
// The kernel header comes after the emulation macros.
#include "kron_kernels.cuh"

using lowrank::KronDims;

template <typename T>
static void forward(const void* x, const void* a, const void* b, const void* addend, float scale,
                    void* y, int64_t tokens, int p, int q, int r, int s, unsigned grid) {
  const KronDims d{p, q, r, s};
  emulation::launch(grid, lowrank::kKronThreads, d.forward_words() * sizeof(float),
                    lowrank::kron_forward_kernel<T>, static_cast<const T*>(x),
                    static_cast<const T*>(a), static_cast<const T*>(b),
                    static_cast<const T*>(addend), scale, static_cast<T*>(y), tokens, d);
}

extern "C" void kron_forward_f32(const void* x, const void* a, const void* b, const void* addend,
                                 float scale, void* y, int64_t tokens, int p, int q, int r, int s,
                                 unsigned grid) {
  forward<float>(x, a, b, addend, scale, y, tokens, p, q, r, s, grid);
}

extern "C" void kron_forward_bf16(const void* x, const void* a, const void* b, const void* addend,
                                  float scale, void* y, int64_t tokens, int p, int q, int r, int s,
                                  unsigned grid) {
  forward<__nv_bfloat16>(x, a, b, addend, scale, y, tokens, p, q, r, s, grid);
}

extern "C" void kron_factor_grads_f32(const float* dy, const float* x, const float* a,
                                      const float* b, float* da, float* db, int64_t tokens, int p,
                                      int q, int r, int s, unsigned grid) {
  const KronDims d{p, q, r, s};
  emulation::launch(grid, lowrank::kKronThreads, d.backward_words() * sizeof(float),
                    lowrank::kron_factor_grads_kernel<float>, dy, x, a, b, da, db, tokens, d);
}
