// Launch plans of the Kronecker kernels (kron_kernels.cuh): tile, grid, shared memory and
// the factor-gradient workspace, from the device's limits. Used by kron.cu and by the CPU
// emulation (launch.h says why).
#pragma once

#include <cstdint>

#include "kron_kernels.cuh"
#include "launch.h"

namespace lowrank {

// The SIMT kernels: blocks stride over tokens, one token at a time.
struct KronLaunch {
  int64_t grid;
  int64_t smem_bytes;
};

inline KronLaunch kron_forward_launch(int64_t tokens, const KronDims& d,
                                      const DeviceLimits& device) {
  return {grid_for(tokens, device, 8), d.forward_words() * int64_t(sizeof(float))};
}

inline KronLaunch kron_factor_grads_launch(int64_t tokens, const KronDims& d,
                                           const DeviceLimits& device) {
  return {grid_for(tokens, device, 4), d.backward_words() * int64_t(sizeof(float))};
}

// Tokens per tile of the tensor-core kernels: the most, up to 8, whose padded operands fit
// `shared_bytes`; 0 when not even one token fits (the dispatch leaves the kernels out then).
inline int kron_tc_tile(int p, int q, int r, int s, bool grads, int64_t shared_bytes) {
  for (int tile = 8; tile >= 1; tile /= 2) {
    const KronTcDims d{p, q, r, s, tile};
    if ((grads ? d.grads_bytes() : d.forward_bytes()) <= shared_bytes) return tile;
  }
  return 0;
}

// A tensor-core launch: dims.tile == 0 when the factors do not fit (nothing may launch),
// grid == 0 when there are no tokens.
struct KronTcLaunch {
  KronTcDims dims;
  int64_t grid;
  int64_t smem_bytes;
  int64_t reduce_grid;  // blocks of kron_reduce_partials_kernel (factor gradients)
  // The factor-gradient kernel writes one partial da (p x q) and db (r x s) per block into a
  // float32 workspace, all the da's first.
  int64_t partial_db_offset() const { return grid * dims.p * dims.q; }
  int64_t workspace_floats() const {
    return grid * (int64_t(dims.p) * dims.q + int64_t(dims.r) * dims.s);
  }
};

inline KronTcLaunch kron_tc_launch(int64_t tokens, int p, int q, int r, int s, bool grads,
                                   const DeviceLimits& device) {
  const KronTcDims d{p, q, r, s, kron_tc_tile(p, q, r, s, grads, device.shared_bytes)};
  if (d.tile == 0 || tokens == 0) return {d, 0, 0, 0};
  const int64_t smem = grads ? d.grads_bytes() : d.forward_bytes();
  return {d, grid_for(ceil_div(tokens, d.tile), device, 2), smem, device.multiprocessors};
}

}  // namespace lowrank
