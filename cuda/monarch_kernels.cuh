// Kernels of the Monarch product (launched by monarch.cu; math in cpp/monarch.cpp).
// Device code only, so tests/cuda_emulation compiles these same kernels for the CPU.
//
// Forward: one block per token (grid-stride); the token's x and the intermediate h
// live in shared memory, weights are read through the cache, y is written once.
// Backward: per token, h and dh are recomputed into a float32 workspace; dx is a
// second per-token pass; dw1 and dw2 are reductions over tokens, one thread per
// weight element.
#pragma once

#include <cstdint>

#include "device.cuh"

namespace lowrank {

constexpr int kMonarchThreads = 256;

struct MonarchDims {
  int k, q, p, l, s, r;
  __host__ __device__ int64_t in() const { return int64_t(k) * p; }
  __host__ __device__ int64_t mid() const { return int64_t(k) * q; }
  __host__ __device__ int64_t out() const { return int64_t(l) * s; }
};

// h[i] for i = kk*q + qq, from x (shared memory, float32).
template <typename T>
__device__ __forceinline__ void monarch_stage1(const MonarchDims& d, const float* xs,
                                               const T* __restrict__ w1, float* h) {
  for (int64_t i = threadIdx.x; i < d.mid(); i += blockDim.x) {
    const int64_t kk = i / d.q;
    const T* w = w1 + i * d.p;
    const float* xk = xs + kk * d.p;
    float sum = 0.f;
    for (int pp = 0; pp < d.p; ++pp) sum = fmaf(to_float(w[pp]), xk[pp], sum);
    h[i] = sum;
  }
}

template <typename T>
__global__ void __launch_bounds__(kMonarchThreads)
    monarch_forward_kernel(const T* __restrict__ x, const T* __restrict__ w1,
                           const T* __restrict__ w2, T* __restrict__ y, int64_t tokens,
                           MonarchDims d) {
  LOWRANK_SHARED_FLOATS(smem);
  float* xs = smem;        // k*p
  float* h = xs + d.in();  // k*q
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    __syncthreads();  // the previous token is done with xs and h
    for (int64_t j = threadIdx.x; j < d.in(); j += blockDim.x) xs[j] = to_float(x[t * d.in() + j]);
    __syncthreads();
    monarch_stage1(d, xs, w1, h);
    __syncthreads();
    for (int64_t o = threadIdx.x; o < d.out(); o += blockDim.x) {
      const int64_t ss = o / d.l, ll = o - ss * d.l;
      const T* w = w2 + (ll * d.s + ss) * d.r;
      float sum = 0.f;
      for (int rr = 0; rr < d.r; ++rr) sum = fmaf(to_float(w[rr]), h[int64_t(rr) * d.l + ll], sum);
      y[t * d.out() + o] = from_float<T>(sum);
    }
  }
}

// Per token: h (recomputed) and dh = stage-2 transpose applied to dy, into float32 workspaces.
template <typename T>
__global__ void __launch_bounds__(kMonarchThreads)
    monarch_backward_mid_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                const T* __restrict__ w1, const T* __restrict__ w2,
                                float* __restrict__ h_out, float* __restrict__ dh_out,
                                int64_t tokens, MonarchDims d) {
  LOWRANK_SHARED_FLOATS(smem);
  float* xs = smem;  // k*p
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < d.in(); j += blockDim.x) xs[j] = to_float(x[t * d.in() + j]);
    __syncthreads();
    if (h_out) monarch_stage1(d, xs, w1, h_out + t * d.mid());
    for (int64_t i = threadIdx.x; i < d.mid(); i += blockDim.x) {
      const int64_t rr = i / d.l, ll = i - rr * d.l;  // i = rr*l + ll
      float sum = 0.f;
      for (int ss = 0; ss < d.s; ++ss)
        sum = fmaf(to_float(w2[(ll * d.s + ss) * d.r + rr]),
                   to_float(dy[t * d.out() + int64_t(ss) * d.l + ll]), sum);
      dh_out[t * d.mid() + i] = sum;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMonarchThreads)
    monarch_backward_dx_kernel(const float* __restrict__ dh, const T* __restrict__ w1,
                               T* __restrict__ dx, int64_t tokens, MonarchDims d) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x)
    for (int64_t j = threadIdx.x; j < d.in(); j += blockDim.x) {
      const int64_t kk = j / d.p, pp = j - kk * d.p;
      float sum = 0.f;
      for (int qq = 0; qq < d.q; ++qq)
        sum = fmaf(to_float(w1[(kk * d.q + qq) * d.p + pp]), dh[t * d.mid() + kk * d.q + qq], sum);
      dx[t * d.in() + j] = from_float<T>(sum);
    }
}

// dw1[kk, qq, pp] = sum_t dh[t, kk*q + qq] x[t, kk*p + pp]
template <typename T>
__global__ void __launch_bounds__(kMonarchThreads)
    monarch_backward_dw1_kernel(const float* __restrict__ dh, const T* __restrict__ x,
                                float* __restrict__ dw1, int64_t tokens, MonarchDims d) {
  const int64_t count = d.mid() * d.p;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = e / d.p, pp = e - i * d.p, kk = i / d.q;
    float sum = 0.f;
    for (int64_t t = 0; t < tokens; ++t)
      sum = fmaf(dh[t * d.mid() + i], to_float(x[t * d.in() + kk * d.p + pp]), sum);
    dw1[e] = sum;
  }
}

// dw2[ll, ss, rr] = sum_t dy[t, ss*l + ll] h[t, rr*l + ll]
template <typename T>
__global__ void __launch_bounds__(kMonarchThreads)
    monarch_backward_dw2_kernel(const T* __restrict__ dy, const float* __restrict__ h,
                                float* __restrict__ dw2, int64_t tokens, MonarchDims d) {
  const int64_t count = int64_t(d.l) * d.s * d.r;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ll = e / (int64_t(d.s) * d.r), rest = e - ll * d.s * d.r;
    const int64_t ss = rest / d.r, rr = rest - ss * d.r;
    float sum = 0.f;
    for (int64_t t = 0; t < tokens; ++t)
      sum = fmaf(to_float(dy[t * d.out() + ss * d.l + ll]), h[t * d.mid() + rr * d.l + ll], sum);
    dw2[e] = sum;
  }
}

// ---- tensor-core forward (float16 / bfloat16 storage, float32 accumulation) -----------------
//
// A tile of 16 tokens (the WMMA M dimension) at a time. Stage 1, per block kk and 16
// columns of w1[kk]: H = X_kk w1[kk]^T on tensor cores, each result scattered straight
// into the stage-2 layout (h index j = kk q + qq goes to block j mod l, row j div l: the
// permutation is folded into this shared-memory store); stage 2, per block ll:
// U = Z_ll w2[ll]^T, written over Z_ll; then y is written once, coalesced, with the
// output interleave (y[ss l + ll] = U_ll[ss]). Every operand is zero-padded to
// multiples of 16 in shared memory; the weights are read from L2 per tile.
// Per token 2 (k q p + l s r) FLOP; bytes: x read and y written once (2 (k p + l s) for
// 16-bit storage). At n = 4096, 64 blocks, 8192 tokens: 8.6 GFLOP and 128 MiB, where the
// composite path also writes and re-reads h and its transposes (about twice the bytes).
// The shared memory holds the whole intermediate of a tile (16 x k q values, 16-bit):
// shapes whose h does not fit (k q above about 6000 on 227 KiB) are left to the other
// implementations. Backward runs on the other implementations. Unverified on a GPU.

constexpr int kMonarchTcThreads = 256;  // 8 warps
constexpr int kMonarchTile = 16;        // tokens per tile

__host__ __device__ inline int monarch_pad16(int v) {
  return (v + 15) / 16 * 16;
}

struct MonarchTcDims {
  int k, q, p, l, s, r;
  __host__ __device__ int pp() const { return monarch_pad16(p); }
  __host__ __device__ int qp() const { return monarch_pad16(q); }
  __host__ __device__ int rp() const { return monarch_pad16(r); }
  __host__ __device__ int sp() const { return monarch_pad16(s); }
  // Row length of a block's region (Z_ll, then U_ll) and the region's stride in elements:
  // 16 extra elements (32 bytes) keep regions aligned and spread them over the banks.
  __host__ __device__ int zw() const { return rp() > sp() ? rp() : sp(); }
  __host__ __device__ int64_t region() const { return int64_t(kMonarchTile) * zw() + 16; }
  __host__ __device__ int64_t z_bytes() const { return int64_t(l) * region() * 2; }
  __host__ __device__ int wrow() const { return pp() > rp() ? pp() : rp(); }
  __host__ __device__ int64_t warp_bytes() const {  // X tile, weight rows, float results
    return int64_t(kMonarchTile) * pp() * 2 + int64_t(kMonarchTile) * wrow() * 2 +
           int64_t(kMonarchTile) * (sp() > 16 ? sp() : 16) * 4;
  }
  __host__ __device__ int64_t forward_bytes() const {
    return z_bytes() + int64_t(kMonarchTcThreads / 32) * warp_bytes();
  }
};

template <typename T>
__global__ void __launch_bounds__(kMonarchTcThreads)
    monarch_forward_tc_kernel(const T* __restrict__ x, const T* __restrict__ w1,
                              const T* __restrict__ w2, T* __restrict__ y, int64_t tokens,
                              MonarchTcDims d) {
  using namespace nvcuda;
  LOWRANK_SHARED_FLOATS(smem_words);
  char* smem = reinterpret_cast<char*>(smem_words);
  const int k = d.k, q = d.q, p = d.p, l = d.l, s = d.s, r = d.r;
  const int pp = d.pp(), qp = d.qp(), rp = d.rp(), sp = d.sp(), zw = d.zw();
  const int64_t region = d.region(), in = int64_t(k) * p, out = int64_t(l) * s;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  T* zh = reinterpret_cast<T*>(smem);  // l regions of 16 x zw
  char* mine = smem + d.z_bytes() + warp * d.warp_bytes();
  T* xw = reinterpret_cast<T*>(mine);                                  // 16 x pp
  T* ww = xw + kMonarchTile * pp;                                      // 16 x wrow
  float* fw = reinterpret_cast<float*>(ww + kMonarchTile * d.wrow());  // 16 x max(sp, 16)
  const T zero = from_float<T>(0.f);
  for (int64_t t0 = int64_t(blockIdx.x) * kMonarchTile; t0 < tokens;
       t0 += int64_t(gridDim.x) * kMonarchTile) {
    const int live = int(tokens - t0 < kMonarchTile ? tokens - t0 : kMonarchTile);
    __syncthreads();  // the previous tile's output is written
    for (int64_t e = threadIdx.x; e < int64_t(l) * region; e += blockDim.x) zh[e] = zero;
    __syncthreads();
    // Stage 1: tasks (kk, 16 columns of w1[kk]).
    for (int task = warp; task < k * (qp / 16); task += warps) {
      const int kk = task / (qp / 16), nt = task - kk * (qp / 16);
      for (int e = lane; e < kMonarchTile * pp; e += 32) {
        const int t = e / pp, c = e - (e / pp) * pp;
        xw[e] = (t < live && c < p) ? x[(t0 + t) * in + int64_t(kk) * p + c] : zero;
      }
      for (int e = lane; e < kMonarchTile * pp; e += 32) {
        const int i = e / pp, c = e - (e / pp) * pp, row = nt * 16 + i;
        ww[e] = (row < q && c < p) ? w1[(int64_t(kk) * q + row) * p + c] : zero;
      }
      __syncwarp();
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int k0 = 0; k0 < pp; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // w1[kk]^T
        wmma::load_matrix_sync(fa, xw + k0, pp);
        wmma::load_matrix_sync(fb, ww + k0, pp);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(fw, acc, 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int t = e / 16, qq = nt * 16 + (e - (e / 16) * 16);
        if (qq < q) {
          const int64_t j = int64_t(kk) * q + qq;  // h index; stage 2 reads it as (ll, rr)
          const int64_t ll = j % l, rr = j / l;
          zh[ll * region + int64_t(t) * zw + rr] = from_float<T>(fw[e]);
        }
      }
      __syncwarp();  // xw, ww and fw are reused by the warp's next task
    }
    __syncthreads();
    // Stage 2: one warp per block ll, all its output columns; U_ll then replaces Z_ll.
    for (int ll = warp; ll < l; ll += warps) {
      T* z = zh + int64_t(ll) * region;
      for (int nt = 0; nt < sp / 16; ++nt) {
        for (int e = lane; e < kMonarchTile * rp; e += 32) {
          const int i = e / rp, c = e - (e / rp) * rp, row = nt * 16 + i;
          ww[e] = (row < s && c < r) ? w2[(int64_t(ll) * s + row) * r + c] : zero;
        }
        __syncwarp();
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
        for (int k0 = 0; k0 < rp; k0 += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // w2[ll]^T
          wmma::load_matrix_sync(fa, z + k0, zw);
          wmma::load_matrix_sync(fb, ww + k0, rp);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(fw + nt * 16, acc, sp, wmma::mem_row_major);
        __syncwarp();  // ww is restaged for the next columns
      }
      for (int e = lane; e < kMonarchTile * sp; e += 32) {
        const int t = e / sp, c = e - (e / sp) * sp;
        z[int64_t(t) * zw + c] = from_float<T>(fw[e]);
      }
      __syncwarp();
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < int64_t(live) * out; e += blockDim.x) {
      const int64_t t = e / out, o = e - t * out;
      const int64_t ss = o / l, ll = o - ss * l;
      y[(t0 + t) * out + o] = zh[ll * region + t * zw + ss];
    }
  }
}

}  // namespace lowrank
