// C entry points running the Monarch kernels of cuda/monarch_kernels.cuh on the
// CPU (float32; float16 and bfloat16 on tensor cores), for
// tests/test_cuda_emulation.py. Each takes the limits of the GPU it imitates and
// launches what cuda/monarch.cu would launch there (monarch_launch.h).
#include "emulate.h"
// The kernel headers come after the emulation macros.
#include "monarch_launch.h"

using lowrank::DeviceLimits;
using lowrank::kMonarchThreads;
using lowrank::MonarchDims;

extern "C" void monarch_forward_f32(const float* x, const float* w1, const float* w2, float* y,
                                    int64_t tokens, int k, int q, int p, int l, int s, int r,
                                    int64_t shared_bytes, int multiprocessors) {
  if (tokens == 0) return;
  const MonarchDims d{k, q, p, l, s, r};
  const lowrank::MonarchLaunch plan =
      lowrank::monarch_forward_launch(tokens, d, {shared_bytes, multiprocessors});
  emulation::launch(unsigned(plan.grid), kMonarchThreads, plan.smem_bytes,
                    lowrank::monarch_forward_kernel<float>, x, w1, w2, y, tokens, d);
}

// workspace: 2 tokens k q floats (h, then dh), as lowrank.ops.monarch allocates it.
extern "C" void monarch_backward_f32(const float* dy, const float* x, const float* w1,
                                     const float* w2, float* dx, float* dw1, float* dw2,
                                     float* workspace, int64_t tokens, int k, int q, int p, int l,
                                     int s, int r, int64_t shared_bytes, int multiprocessors) {
  if (tokens == 0) return;
  const MonarchDims d{k, q, p, l, s, r};
  const lowrank::MonarchBackwardLaunch plan =
      lowrank::monarch_backward_launch(tokens, d, {shared_bytes, multiprocessors});
  float* h = workspace;
  float* dh = workspace + plan.dh_offset;
  const auto grid = unsigned(plan.token_grid);
  emulation::launch(grid, kMonarchThreads, plan.smem_bytes,
                    lowrank::monarch_backward_mid_kernel<float>, dy, x, w1, w2, h, dh, tokens, d);
  emulation::launch(grid, kMonarchThreads, 0, lowrank::monarch_backward_dx_kernel<float>,
                    static_cast<const float*>(dh), w1, dx, tokens, d);
  emulation::launch(unsigned(plan.dw1_grid), kMonarchThreads, 0,
                    lowrank::monarch_backward_dw1_kernel<float>, static_cast<const float*>(dh), x,
                    dw1, tokens, d);
  emulation::launch(unsigned(plan.dw2_grid), kMonarchThreads, 0,
                    lowrank::monarch_backward_dw2_kernel<float>, dy, static_cast<const float*>(h),
                    dw2, tokens, d);
}

// The tensor-core launch plan: plan[0..1] = grid, shared bytes.
extern "C" void monarch_tc_plan(int64_t tokens, int k, int q, int p, int l, int s, int r,
                                int transposed, int64_t shared_bytes, int multiprocessors,
                                int64_t* plan) {
  const lowrank::MonarchTcDims d{k, q, p, l, s, r, transposed != 0};
  const lowrank::MonarchLaunch launch =
      lowrank::monarch_tc_launch(tokens, d, {shared_bytes, multiprocessors});
  plan[0] = launch.grid;
  plan[1] = launch.smem_bytes;
}

template <typename T>
static void product_tc(const void* src, const void* w1, const void* w2, void* dst, int64_t tokens,
                       int k, int q, int p, int l, int s, int r, int transposed,
                       const DeviceLimits& device) {
  if (tokens == 0) return;
  const lowrank::MonarchTcDims d{k, q, p, l, s, r, transposed != 0};
  const lowrank::MonarchLaunch plan = lowrank::monarch_tc_launch(tokens, d, device);
  auto run = [&](auto kernel) {
    emulation::launch(unsigned(plan.grid), lowrank::kMonarchTcThreads, plan.smem_bytes, kernel,
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
                               int transposed, int64_t shared_bytes, int multiprocessors) {
  product_tc<__half>(src, w1, w2, dst, tokens, k, q, p, l, s, r, transposed,
                     {shared_bytes, multiprocessors});
}

extern "C" void monarch_tc_bf16(const void* src, const void* w1, const void* w2, void* dst,
                                int64_t tokens, int k, int q, int p, int l, int s, int r,
                                int transposed, int64_t shared_bytes, int multiprocessors) {
  product_tc<__nv_bfloat16>(src, w1, w2, dst, tokens, k, q, p, l, s, r, transposed,
                            {shared_bytes, multiprocessors});
}
