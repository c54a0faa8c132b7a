// Small kernels, each correct or with one deliberate mistake chosen by its arguments,
// for the tests that show each check of the emulation fires (tests/test_cuda_emulation.py).
#include "emulate.h"
// The kernel header comes after the emulation macros.
#include "device.cuh"

namespace {

using namespace nvcuda;

// One warp: out (16 x 16, float32) = T T^T for a 16 x 16 tile T of ones (float16) staged in
// shared memory `offset` elements from its start with leading dimension ldm. skip_mma: a
// lane that skips mma_sync; skip_syncwarp: a lane that skips the __syncwarp after staging.
__global__ void tile_kernel(float* out, int offset, int ldm, int skip_mma, int skip_syncwarp) {
  LOWRANK_SHARED_FLOATS(smem);
  __half* tile = reinterpret_cast<__half*>(smem) + offset;
  for (int e = threadIdx.x; e < 16 * ldm; e += 32) tile[e] = __float2half(1.f);
  if (int(threadIdx.x) != skip_syncwarp) __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::fill_fragment(c, 0.f);
  wmma::load_matrix_sync(a, tile, ldm);
  wmma::load_matrix_sync(b, tile, ldm);
  if (int(threadIdx.x) != skip_mma) wmma::mma_sync(c, a, b, c);
  wmma::store_matrix_sync(out, c, 16, wmma::mem_row_major);
}

// One warp: out[e] = 2 T (16 x 16, float32) for the same tile product stored to shared memory
// and read back by lane stride, with or without the __syncwarp in between.
__global__ void read_back_kernel(float* out, int sync) {
  LOWRANK_SHARED_FLOATS(smem);
  __half* tile = reinterpret_cast<__half*>(smem + 256);
  for (int e = threadIdx.x; e < 256; e += 32) tile[e] = __float2half(1.f);
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::fill_fragment(c, 0.f);
  wmma::load_matrix_sync(a, tile, 16);
  wmma::load_matrix_sync(b, tile, 16);
  wmma::mma_sync(c, a, b, c);
  wmma::store_matrix_sync(smem, c, 16, wmma::mem_row_major);
  if (sync) __syncwarp();
  for (int e = threadIdx.x; e < 256; e += 32) out[e] = 2.f * smem[e];
}

// out[t] = in[(t + 1) mod n] through shared memory, with or without the __syncthreads.
__global__ void rotate_kernel(const float* in, float* out, int sync) {
  LOWRANK_SHARED_FLOATS(smem);
  const unsigned n = blockDim.x, t = threadIdx.x;
  smem[t] = in[t];
  if (sync) __syncthreads();
  out[t] = smem[(t + 1) % n];
}

// Writes `count` floats of shared memory (the launch gives it 64).
__global__ void fill_kernel(int count) {
  LOWRANK_SHARED_FLOATS(smem);
  for (int e = threadIdx.x; e < count; e += blockDim.x) smem[e] = 0.f;
}

// mode 1: half the threads wait at one __syncthreads, half at another;
// mode 2: odd threads return before a __syncthreads.
__global__ void divergent_kernel(int mode) {
  if (mode == 1) {
    if (threadIdx.x < blockDim.x / 2)
      __syncthreads();
    else
      __syncthreads();
  } else if (mode == 2) {
    if (threadIdx.x % 2) return;
    __syncthreads();
  }
}

}  // namespace

extern "C" void tile_product(float* out, int offset, int ldm, int skip_mma, int skip_syncwarp) {
  const std::size_t bytes = (std::size_t(offset) + 16 * std::size_t(ldm)) * sizeof(__half);
  emulation::launch(1, 32, bytes, tile_kernel, out, offset, ldm, skip_mma, skip_syncwarp);
}

extern "C" void read_back(float* out, int sync) {
  emulation::launch(1, 32, 512 * sizeof(float), read_back_kernel, out, sync);
}

extern "C" void rotate(const float* in, float* out, int n, int sync) {
  emulation::launch(1, unsigned(n), n * sizeof(float), rotate_kernel, in, out, sync);
}

extern "C" void fill_shared(int count) {
  emulation::launch(2, 64, 64 * sizeof(float), fill_kernel, count);
}

extern "C" void divergent(int mode) {
  emulation::launch(1, 64, 0, divergent_kernel, mode);
}
