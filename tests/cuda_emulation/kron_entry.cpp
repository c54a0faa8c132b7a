// C entry points running the Kronecker kernels of cuda/kron_kernels.cuh on the
// CPU (float32 and bfloat16 storage; float16 and bfloat16 on tensor cores), for
// tests/test_cuda_emulation.py. Each takes the limits of the GPU it imitates
// (shared memory per block, multiprocessors) and launches what cuda/kron.cu
// would launch there: the same plan (kron_launch.h) picks tile, grid and workspace.
#include "emulate.h"
// The kernel headers come after the emulation macros.
#include "kron_launch.h"

using lowrank::DeviceLimits;
using lowrank::KronDims;

template <typename T>
static void forward(const void* x, const void* a, const void* b, const void* addend, float scale,
                    void* y, int64_t tokens, int p, int q, int r, int s,
                    const DeviceLimits& device) {
  if (tokens == 0) return;  // as the launcher
  const KronDims d{p, q, r, s};
  const lowrank::KronLaunch plan = lowrank::kron_forward_launch(tokens, d, device);
  emulation::launch(unsigned(plan.grid), lowrank::kKronThreads, plan.smem_bytes,
                    lowrank::kron_forward_kernel<T>, static_cast<const T*>(x),
                    static_cast<const T*>(a), static_cast<const T*>(b),
                    static_cast<const T*>(addend), scale, static_cast<T*>(y), tokens, d);
}

extern "C" void kron_forward_f32(const void* x, const void* a, const void* b, const void* addend,
                                 float scale, void* y, int64_t tokens, int p, int q, int r, int s,
                                 int64_t shared_bytes, int multiprocessors) {
  forward<float>(x, a, b, addend, scale, y, tokens, p, q, r, s, {shared_bytes, multiprocessors});
}

extern "C" void kron_forward_bf16(const void* x, const void* a, const void* b, const void* addend,
                                  float scale, void* y, int64_t tokens, int p, int q, int r, int s,
                                  int64_t shared_bytes, int multiprocessors) {
  forward<__nv_bfloat16>(x, a, b, addend, scale, y, tokens, p, q, r, s,
                         {shared_bytes, multiprocessors});
}

extern "C" void kron_factor_grads_f32(const float* dy, const float* x, const float* a,
                                      const float* b, float* da, float* db, int64_t tokens, int p,
                                      int q, int r, int s, int64_t shared_bytes,
                                      int multiprocessors) {
  if (tokens == 0) return;
  const KronDims d{p, q, r, s};
  const lowrank::KronLaunch plan =
      lowrank::kron_factor_grads_launch(tokens, d, {shared_bytes, multiprocessors});
  emulation::launch(unsigned(plan.grid), lowrank::kKronThreads, plan.smem_bytes,
                    lowrank::kron_factor_grads_kernel<float>, dy, x, a, b, da, db, tokens, d);
}

// ---- tensor-core kernels (emulated WMMA) -----------------------------------------------------

// The launch plan: plan[0..3] = tile (0: does not fit), grid, shared bytes, workspace floats.
extern "C" void kron_tc_plan(int64_t tokens, int p, int q, int r, int s, int grads,
                             int64_t shared_bytes, int multiprocessors, int64_t* plan) {
  const lowrank::KronTcLaunch launch =
      lowrank::kron_tc_launch(tokens, p, q, r, s, grads != 0, {shared_bytes, multiprocessors});
  plan[0] = launch.dims.tile;
  plan[1] = launch.grid;
  plan[2] = launch.smem_bytes;
  plan[3] = launch.workspace_floats();
}

template <typename T>
static void forward_tc(const void* x, const void* a, const void* b, const void* addend, float scale,
                       void* y, int64_t tokens, int p, int q, int r, int s,
                       const DeviceLimits& device) {
  const lowrank::KronTcLaunch plan = lowrank::kron_tc_launch(tokens, p, q, r, s, false, device);
  if (plan.grid == 0) return;  // the launcher refuses tile 0; the tests ask for shapes that fit
  emulation::launch(unsigned(plan.grid), lowrank::kKronTcThreads, plan.smem_bytes,
                    lowrank::kron_forward_tc_kernel<T>, static_cast<const T*>(x),
                    static_cast<const T*>(a), static_cast<const T*>(b),
                    static_cast<const T*>(addend), scale, static_cast<T*>(y), tokens, plan.dims);
}

// workspace: the plan's workspace_floats() floats (what lowrank.ops.kron allocates).
template <typename T>
static void grads_tc(const void* dy, const void* x, const void* a, const void* b, float* workspace,
                     float* da, float* db, int64_t tokens, int p, int q, int r, int s,
                     const DeviceLimits& device) {
  const lowrank::KronTcLaunch plan = lowrank::kron_tc_launch(tokens, p, q, r, s, true, device);
  if (plan.grid == 0) return;
  float* partial_da = workspace;
  float* partial_db = workspace + plan.partial_db_offset();
  emulation::launch(unsigned(plan.grid), lowrank::kKronTcThreads, plan.smem_bytes,
                    lowrank::kron_factor_grads_tc_kernel<T>, static_cast<const T*>(dy),
                    static_cast<const T*>(x), static_cast<const T*>(a), static_cast<const T*>(b),
                    partial_da, partial_db, tokens, plan.dims);
  emulation::launch(unsigned(plan.reduce_grid), lowrank::kKronTcThreads, 0,
                    lowrank::kron_reduce_partials_kernel, static_cast<const float*>(partial_da),
                    int(plan.grid), int64_t(p) * q, da);
  emulation::launch(unsigned(plan.reduce_grid), lowrank::kKronTcThreads, 0,
                    lowrank::kron_reduce_partials_kernel, static_cast<const float*>(partial_db),
                    int(plan.grid), int64_t(r) * s, db);
}

extern "C" void kron_forward_tc_f16(const void* x, const void* a, const void* b, const void* addend,
                                    float scale, void* y, int64_t tokens, int p, int q, int r,
                                    int s, int64_t shared_bytes, int multiprocessors) {
  forward_tc<__half>(x, a, b, addend, scale, y, tokens, p, q, r, s,
                     {shared_bytes, multiprocessors});
}

extern "C" void kron_forward_tc_bf16(const void* x, const void* a, const void* b,
                                     const void* addend, float scale, void* y, int64_t tokens,
                                     int p, int q, int r, int s, int64_t shared_bytes,
                                     int multiprocessors) {
  forward_tc<__nv_bfloat16>(x, a, b, addend, scale, y, tokens, p, q, r, s,
                            {shared_bytes, multiprocessors});
}

extern "C" void kron_factor_grads_tc_f16(const void* dy, const void* x, const void* a,
                                         const void* b, float* workspace, float* da, float* db,
                                         int64_t tokens, int p, int q, int r, int s,
                                         int64_t shared_bytes, int multiprocessors) {
  grads_tc<__half>(dy, x, a, b, workspace, da, db, tokens, p, q, r, s,
                   {shared_bytes, multiprocessors});
}

extern "C" void kron_factor_grads_tc_bf16(const void* dy, const void* x, const void* a,
                                          const void* b, float* workspace, float* da, float* db,
                                          int64_t tokens, int p, int q, int r, int s,
                                          int64_t shared_bytes, int multiprocessors) {
  grads_tc<__nv_bfloat16>(dy, x, a, b, workspace, da, db, tokens, p, q, r, s,
                          {shared_bytes, multiprocessors});
}
