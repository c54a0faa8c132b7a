// Runs CUDA kernels on the CPU, for tests on machines without a GPU.
//
// Included before a kernel header (cuda/*_kernels.cuh) and compiled as C++20 by
// the host compiler: each CUDA thread of a block is a std::thread, __syncthreads
// is a barrier of the block, __syncwarp a barrier of its 32 threads, dynamic
// shared memory is a NaN-poisoned buffer per block, blocks run one after
// another, and nvcuda::wmma is emulated (wmma.h). This checks a kernel's index math,
// shared-memory layout and reduction structure with the very source nvcc
// compiles; it cannot show inter-block races or timing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct EmulatedDim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emulation {
inline thread_local EmulatedDim3 thread_index, block_index;
inline EmulatedDim3 block_size, grid_size;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local std::barrier<>* warp_barrier = nullptr;
inline thread_local float* shared_words = nullptr;
}  // namespace emulation

#define threadIdx (emulation::thread_index)
#define blockIdx (emulation::block_index)
#define blockDim (emulation::block_size)
#define gridDim (emulation::grid_size)
#define LOWRANK_SHARED_FLOATS(name) float* name = emulation::shared_words

inline void __syncthreads() {
  emulation::block_barrier->arrive_and_wait();
}

// The kernels call it with every lane of the warp active (full mask).
inline void __syncwarp(unsigned = 0xffffffffu) {
  emulation::warp_barrier->arrive_and_wait();
}

inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value);
}

namespace emulation {

// kernel<<<grid, block, shared_bytes>>>(args...), on the CPU.
template <class Kernel, class... Args>
void launch(unsigned grid, unsigned block, std::size_t shared_bytes, Kernel kernel, Args... args) {
  grid_size = {grid};
  block_size = {block};
  for (unsigned b = 0; b < grid; ++b) {
    std::vector<float> shared(shared_bytes / sizeof(float) + 1,
                              std::numeric_limits<float>::quiet_NaN());
    std::barrier<> barrier(block);
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    for (unsigned w = 0; w * 32 < block; ++w)
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, block - w * 32)));
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t)
      threads.emplace_back([&, t] {
        thread_index = {t};
        block_index = {b};
        block_barrier = &barrier;
        warp_barrier = warps[t / 32].get();
        shared_words = shared.data();
        kernel(args...);
      });
    for (auto& thread : threads) thread.join();
  }
}

}  // namespace emulation

#include "wmma.h"
