// C entry points running the Monarch kernels of cuda/monarch_kernels.cuh on the
// CPU (float32), for tests/test_cuda_emulation.py.
#include "emulate.h"
// The kernel header comes after the emulation macros.
#include "monarch_kernels.cuh"

using lowrank::kMonarchThreads;
using lowrank::MonarchDims;

extern "C" void monarch_forward_f32(const float* x, const float* w1, const float* w2, float* y,
                                    int64_t tokens, int k, int q, int p, int l, int s, int r,
                                    unsigned grid) {
  const MonarchDims d{k, q, p, l, s, r};
  emulation::launch(grid, kMonarchThreads, (d.in() + d.mid()) * sizeof(float),
                    lowrank::monarch_forward_kernel<float>, x, w1, w2, y, tokens, d);
}

extern "C" void monarch_backward_f32(const float* dy, const float* x, const float* w1,
                                     const float* w2, float* dx, float* dw1, float* dw2,
                                     float* workspace, int64_t tokens, int k, int q, int p, int l,
                                     int s, int r, unsigned grid) {
  const MonarchDims d{k, q, p, l, s, r};
  float* h = workspace;
  float* dh = workspace + tokens * d.mid();
  emulation::launch(grid, kMonarchThreads, d.in() * sizeof(float),
                    lowrank::monarch_backward_mid_kernel<float>, dy, x, w1, w2, h, dh, tokens, d);
  emulation::launch(grid, kMonarchThreads, 0, lowrank::monarch_backward_dx_kernel<float>,
                    static_cast<const float*>(dh), w1, dx, tokens, d);
  emulation::launch(grid, kMonarchThreads, 0, lowrank::monarch_backward_dw1_kernel<float>,
                    static_cast<const float*>(dh), x, dw1, tokens, d);
  emulation::launch(grid, kMonarchThreads, 0, lowrank::monarch_backward_dw2_kernel<float>, dy,
                    static_cast<const float*>(h), dw2, tokens, d);
}

template <typename T>
static void product_tc(const void* src, const void* w1, const void* w2, void* dst, int64_t tokens,
                       int k, int q, int p, int l, int s, int r, int transposed, unsigned grid) {
  const lowrank::MonarchTcDims d{k, q, p, l, s, r, transposed != 0};
  auto run = [&](auto kernel) {
    emulation::launch(grid, lowrank::kMonarchTcThreads, d.smem_bytes(), kernel,
                      static_cast<const T*>(src), static_cast<const T*>(w1),
                      static_cast<const T*>(w2), static_cast<T*>(dst), tokens, d);
  };
  if (transposed)
    run(lowrank::monarch_tc_kernel<T, true>);
  else
    run(lowrank::monarch_tc_kernel<T, false>);
}

// y = M x (transposed = 0) or dx = M^T dy (transposed = 1).
extern "C" void monarch_tc_f16(const void* src, const void* w1, const void* w2, void* dst,
                               int64_t tokens, int k, int q, int p, int l, int s, int r,
                               int transposed, unsigned grid) {
  product_tc<__half>(src, w1, w2, dst, tokens, k, q, p, l, s, r, transposed, grid);
}

extern "C" void monarch_tc_bf16(const void* src, const void* w1, const void* w2, void* dst,
                                int64_t tokens, int k, int q, int p, int l, int s, int r,
                                int transposed, unsigned grid) {
  product_tc<__nv_bfloat16>(src, w1, w2, dst, tokens, k, q, p, l, s, r, transposed, grid);
}
