// Launch parameters as host code without CUDA runtime calls. The launchers (cuda/*.cu)
// query the device's limits and call the planning functions of <op>_launch.h; the CPU
// emulation (tests/cuda_emulation) calls the same functions with the limits of the GPU it
// imitates, so it runs the tile choice, grid size and workspace split a GPU would get.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lowrank {

// What a launch plan depends on.
struct DeviceLimits {
  int64_t shared_bytes;  // dynamic shared memory one block may opt in to
  int multiprocessors;
};

// Blocks for `work` independent items: at most `per_sm` per multiprocessor (the kernels
// stride over the rest), at least one.
inline int64_t grid_for(int64_t work, const DeviceLimits& device, int per_sm) {
  return std::max<int64_t>(1, std::min<int64_t>(work, int64_t(device.multiprocessors) * per_sm));
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace lowrank
