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

// ---- tensor-core kernels (emulated WMMA) -----------------------------------------------------

using lowrank::KronTcDims;

template <typename T>
static void forward_tc(const void* x, const void* a, const void* b, const void* addend, float scale,
                       void* y, int64_t tokens, int p, int q, int r, int s, int tile,
                       unsigned grid) {
  const KronTcDims d{p, q, r, s, tile};
  emulation::launch(grid, lowrank::kKronTcThreads, d.forward_bytes(),
                    lowrank::kron_forward_tc_kernel<T>, static_cast<const T*>(x),
                    static_cast<const T*>(a), static_cast<const T*>(b),
                    static_cast<const T*>(addend), scale, static_cast<T*>(y), tokens, d);
}

template <typename T>
static void grads_tc(const void* dy, const void* x, const void* a, const void* b, float* partials,
                     float* da, float* db, int64_t tokens, int p, int q, int r, int s, int tile,
                     unsigned grid) {
  const KronTcDims d{p, q, r, s, tile};
  float* partial_da = partials;
  float* partial_db = partials + int64_t(grid) * p * q;
  emulation::launch(grid, lowrank::kKronTcThreads, d.grads_bytes(),
                    lowrank::kron_factor_grads_tc_kernel<T>, static_cast<const T*>(dy),
                    static_cast<const T*>(x), static_cast<const T*>(a), static_cast<const T*>(b),
                    partial_da, partial_db, tokens, d);
  emulation::launch(2, lowrank::kKronTcThreads, 0, lowrank::kron_reduce_partials_kernel,
                    static_cast<const float*>(partial_da), int(grid), int64_t(p) * q, da);
  emulation::launch(2, lowrank::kKronTcThreads, 0, lowrank::kron_reduce_partials_kernel,
                    static_cast<const float*>(partial_db), int(grid), int64_t(r) * s, db);
}

extern "C" void kron_forward_tc_f16(const void* x, const void* a, const void* b, const void* addend,
                                    float scale, void* y, int64_t tokens, int p, int q, int r,
                                    int s, int tile, unsigned grid) {
  forward_tc<__half>(x, a, b, addend, scale, y, tokens, p, q, r, s, tile, grid);
}

extern "C" void kron_forward_tc_bf16(const void* x, const void* a, const void* b,
                                     const void* addend, float scale, void* y, int64_t tokens,
                                     int p, int q, int r, int s, int tile, unsigned grid) {
  forward_tc<__nv_bfloat16>(x, a, b, addend, scale, y, tokens, p, q, r, s, tile, grid);
}

extern "C" void kron_factor_grads_tc_f16(const void* dy, const void* x, const void* a,
                                         const void* b, float* partials, float* da, float* db,
                                         int64_t tokens, int p, int q, int r, int s, int tile,
                                         unsigned grid) {
  grads_tc<__half>(dy, x, a, b, partials, da, db, tokens, p, q, r, s, tile, grid);
}

extern "C" void kron_factor_grads_tc_bf16(const void* dy, const void* x, const void* a,
                                          const void* b, float* partials, float* da, float* db,
                                          int64_t tokens, int p, int q, int r, int s, int tile,
                                          unsigned grid) {
  grads_tc<__nv_bfloat16>(dy, x, a, b, partials, da, db, tokens, p, q, r, s, tile, grid);
}
