// Launch plans of the Monarch kernels (monarch_kernels.cuh): grids, shared memory and the
// backward workspace split, from the device's limits. Used by monarch.cu and by the CPU
// emulation (launch.h says why).
#pragma once

#include <cstdint>

#include "launch.h"
#include "monarch_kernels.cuh"

namespace lowrank {

struct MonarchLaunch {
  int64_t grid;
  int64_t smem_bytes;
};

// The SIMT forward: blocks stride over tokens; x and h of a token in shared memory.
inline MonarchLaunch monarch_forward_launch(int64_t tokens, const MonarchDims& d,
                                            const DeviceLimits& device) {
  return {grid_for(tokens, device, 8), (d.in() + d.mid()) * int64_t(sizeof(float))};
}

// The SIMT backward: a float32 workspace of 2 tokens k q floats holds h, then dh; the
// per-token kernels stride over tokens, the weight-gradient kernels over weight elements.
struct MonarchBackwardLaunch {
  int64_t token_grid;  // monarch_backward_mid_kernel and monarch_backward_dx_kernel
  int64_t smem_bytes;  // monarch_backward_mid_kernel
  int64_t dw1_grid, dw2_grid;
  int64_t dh_offset;  // floats from the workspace's start to dh
};

inline MonarchBackwardLaunch monarch_backward_launch(int64_t tokens, const MonarchDims& d,
                                                     const DeviceLimits& device) {
  const int64_t dw1 = d.mid() * d.p, dw2 = int64_t(d.l) * d.s * d.r;
  return {grid_for(tokens, device, 8), d.in() * int64_t(sizeof(float)),
          grid_for(ceil_div(dw1, kMonarchThreads), device, 8),
          grid_for(ceil_div(dw2, kMonarchThreads), device, 8), tokens * d.mid()};
}

// The tensor-core kernel (either direction): blocks stride over tiles of kMonarchTile tokens.
inline MonarchLaunch monarch_tc_launch(int64_t tokens, const MonarchTcDims& d,
                                       const DeviceLimits& device) {
  return {grid_for(ceil_div(tokens, kMonarchTile), device, 2), d.smem_bytes()};
}

}  // namespace lowrank
