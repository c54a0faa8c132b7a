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

// ---- tensor-core product and its transpose (float16 / bfloat16 storage, float32 accumulation) --
//
// One kernel runs both directions as two block-diagonal stages A then B with the regrouping
// between them folded into a shared-memory store:
//   forward    y = M x:     A = blockdiag(w1)   (k blocks q x p), B = blockdiag(w2)   (l blocks s x
//   r) transposed dx = M^T dy: A = blockdiag(w2^T) (l blocks r x s), B = blockdiag(w1^T) (k blocks
//   p x q)
// The forward reads x block-contiguous and writes y interleaved (y[ss l + ll] = U_ll[ss]);
// the transpose reads dy interleaved and writes dx block-contiguous.
//
// A tile of 16 tokens (the WMMA M dimension) at a time. Stage A, per block a and 16 output
// rows of it: Z = X_a A_a^T on tensor cores, each result scattered straight into stage B's
// layout (forward: h index j = kk q + qq goes to block j mod l, row j div l; transpose: dh
// index j = rr l + ll goes to block j div q, row j mod q); stage B, one warp per block b:
// U = Z_b B_b^T, written over Z_b; then the output is written once, coalesced. Every
// operand is zero-padded to multiples of 16 in shared memory; the weights are read from L2
// per tile (the transposed weights in 16-element contiguous runs).
//
// Per token 2 (k q p + l s r) FLOP; bytes: the input read and the output written once
// (2 (k p + l s) for 16-bit storage). At n = 4096, 64 blocks, 8192 tokens: 8.6 GFLOP and
// 128 MiB, where the composite path also writes and re-reads h (or dh) and its transposes
// (about twice the bytes). The shared memory holds the whole intermediate of a tile
// (16 x k q values, 16-bit): shapes whose intermediate does not fit (k q above about 6000
// on 227 KiB) are left to the other implementations.
//
// The weight gradients are left to the composite path's strided-batched GEMMs by
// construction: dw2[ll] = sum_t du_ll z_ll^T needs z_ll, which mixes every input block
// through the permutation, so a kernel that does not store h must recompute all of stage A
// for each of the l output blocks (l times the FLOPs), and one that stores h and dh does
// exactly the composite's reductions over tokens (K = tokens), which cuBLAS runs at its
// tensor-core peak. With weight gradients the composite also has dh in memory already, so
// dx from it costs the same bytes as this kernel's transpose; the transpose pays off when
// only dx is needed (frozen weights). Unverified on a GPU.

constexpr int kMonarchTcThreads = 256;  // 8 warps
constexpr int kMonarchTile = 16;        // tokens per tile

__host__ __device__ inline int monarch_pad16(int v) {
  return (v + 15) / 16 * 16;
}

struct MonarchTcDims {
  int k, q, p, l, s, r;
  bool transposed;  // the kernel's direction: y = M x (false) or dx = M^T dy (true)
  // Stage A: na() blocks of oa() x ia(); stage B: nb() blocks of ob() x ib().
  __host__ __device__ int na() const { return transposed ? l : k; }
  __host__ __device__ int ia() const { return transposed ? s : p; }
  __host__ __device__ int oa() const { return transposed ? r : q; }
  __host__ __device__ int nb() const { return transposed ? k : l; }
  __host__ __device__ int ib() const { return transposed ? q : r; }
  __host__ __device__ int ob() const { return transposed ? p : s; }
  __host__ __device__ int64_t in() const { return int64_t(na()) * ia(); }
  __host__ __device__ int64_t out() const { return int64_t(nb()) * ob(); }
  __host__ __device__ int iap() const { return monarch_pad16(ia()); }
  __host__ __device__ int oap() const { return monarch_pad16(oa()); }
  __host__ __device__ int ibp() const { return monarch_pad16(ib()); }
  __host__ __device__ int obp() const { return monarch_pad16(ob()); }
  // Row length of a stage-B block's region (Z_b, then U_b) and the region's stride in
  // elements: 16 extra elements (32 bytes) keep regions aligned and spread them over banks.
  __host__ __device__ int zw() const { return ibp() > obp() ? ibp() : obp(); }
  __host__ __device__ int64_t region() const { return int64_t(kMonarchTile) * zw() + 16; }
  __host__ __device__ int64_t z_bytes() const { return int64_t(nb()) * region() * 2; }
  __host__ __device__ int wrow() const { return iap() > ibp() ? iap() : ibp(); }
  __host__ __device__ int64_t warp_bytes() const {  // input tile, weight rows, float results
    return int64_t(kMonarchTile) * iap() * 2 + int64_t(kMonarchTile) * wrow() * 2 +
           int64_t(kMonarchTile) * (obp() > 16 ? obp() : 16) * 4;
  }
  __host__ __device__ int64_t smem_bytes() const {
    return z_bytes() + int64_t(kMonarchTcThreads / 32) * warp_bytes();
  }
};

// Stages 16 rows (o0 ...) of a block's matrix, zero-padded to 16 x cols_p, into ww (row i,
// column c at ww[i * cols_p + c]); at(o, c) is the element, contiguous over o when
// by_rows is false (transposed weights), else over c, and the lanes follow the contiguous index.
template <typename T, typename At>
__device__ __forceinline__ void monarch_stage_rows(T* ww, int o0, int rows, int cols, int cols_p,
                                                   bool by_rows, int lane, At at) {
  const T zero = from_float<T>(0.f);
  for (int e = lane; e < kMonarchTile * cols_p; e += 32) {
    const int i = by_rows ? e / cols_p : e % kMonarchTile;
    const int c = by_rows ? e - i * cols_p : e / kMonarchTile;
    const int o = o0 + i;
    ww[i * cols_p + c] = (o < rows && c < cols) ? at(o, c) : zero;
  }
}

template <typename T, bool kTransposed>
__global__ void __launch_bounds__(kMonarchTcThreads)
    monarch_tc_kernel(const T* __restrict__ src, const T* __restrict__ w1, const T* __restrict__ w2,
                      T* __restrict__ dst, int64_t tokens, MonarchTcDims d) {
#if LOWRANK_TENSOR_CORE_ARCH
  using namespace nvcuda;
  LOWRANK_SHARED_FLOATS(smem_words);
  char* smem = reinterpret_cast<char*>(smem_words);
  const int q = d.q, p = d.p, l = d.l, s = d.s, r = d.r;
  const int na = d.na(), ia = d.ia(), oa = d.oa(), nb = d.nb(), ib = d.ib(), ob = d.ob();
  const int iap = d.iap(), oap = d.oap(), ibp = d.ibp(), obp = d.obp(), zw = d.zw();
  const int64_t region = d.region(), in = d.in(), out = d.out();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  T* zh = reinterpret_cast<T*>(smem);  // nb regions of 16 x zw
  char* mine = smem + d.z_bytes() + warp * d.warp_bytes();
  T* xw = reinterpret_cast<T*>(mine);                                  // 16 x iap
  T* ww = xw + kMonarchTile * iap;                                     // 16 x wrow
  float* fw = reinterpret_cast<float*>(ww + kMonarchTile * d.wrow());  // 16 x max(obp, 16)
  const T zero = from_float<T>(0.f);
  for (int64_t t0 = int64_t(blockIdx.x) * kMonarchTile; t0 < tokens;
       t0 += int64_t(gridDim.x) * kMonarchTile) {
    const int live = int(tokens - t0 < kMonarchTile ? tokens - t0 : kMonarchTile);
    __syncthreads();  // the previous tile's output is written
    for (int64_t e = threadIdx.x; e < int64_t(nb) * region; e += blockDim.x) zh[e] = zero;
    __syncthreads();
    // Stage A: tasks (block a, 16 of its output rows).
    for (int task = warp; task < na * (oap / 16); task += warps) {
      const int a = task / (oap / 16), nt = task - a * (oap / 16);
      for (int e = lane; e < kMonarchTile * iap; e += 32) {
        const int t = e / iap, c = e - (e / iap) * iap;
        const int64_t at = kTransposed ? int64_t(c) * l + a : int64_t(a) * p + c;
        xw[e] = (t < live && c < ia) ? src[(t0 + t) * in + at] : zero;
      }
      if (kTransposed)  // A_a = w2[a]^T: element (rr, ss) = w2[a, ss, rr]
        monarch_stage_rows(ww, nt * 16, oa, ia, iap, false, lane,
                           [&](int o, int c) { return w2[(int64_t(a) * s + c) * r + o]; });
      else  // A_a = w1[a]: element (qq, pp)
        monarch_stage_rows(ww, nt * 16, oa, ia, iap, true, lane,
                           [&](int o, int c) { return w1[(int64_t(a) * q + o) * p + c]; });
      __syncwarp();
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
      for (int k0 = 0; k0 < iap; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // A_a^T
        wmma::load_matrix_sync(fa, xw + k0, iap);
        wmma::load_matrix_sync(fb, ww + k0, iap);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(fw, acc, 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int t = e / 16, o = nt * 16 + (e - (e / 16) * 16);
        if (o < oa) {  // the regrouping between the stages
          const int64_t j = kTransposed ? int64_t(o) * l + a : int64_t(a) * q + o;
          const int64_t b = kTransposed ? j / q : j % l, row = kTransposed ? j % q : j / l;
          zh[b * region + int64_t(t) * zw + row] = from_float<T>(fw[e]);
        }
      }
      __syncwarp();  // xw, ww and fw are reused by the warp's next task
    }
    __syncthreads();
    // Stage B: one warp per block b, all its output columns; U_b then replaces Z_b.
    for (int b = warp; b < nb; b += warps) {
      T* z = zh + int64_t(b) * region;
      for (int nt = 0; nt < obp / 16; ++nt) {
        if (kTransposed)  // B_b = w1[b]^T: element (pp, qq) = w1[b, qq, pp]
          monarch_stage_rows(ww, nt * 16, ob, ib, ibp, false, lane,
                             [&](int o, int c) { return w1[(int64_t(b) * q + c) * p + o]; });
        else  // B_b = w2[b]: element (ss, rr)
          monarch_stage_rows(ww, nt * 16, ob, ib, ibp, true, lane,
                             [&](int o, int c) { return w2[(int64_t(b) * s + o) * r + c]; });
        __syncwarp();
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
        for (int k0 = 0; k0 < ibp; k0 += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // B_b^T
          wmma::load_matrix_sync(fa, z + k0, zw);
          wmma::load_matrix_sync(fb, ww + k0, ibp);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(fw + nt * 16, acc, obp, wmma::mem_row_major);
        __syncwarp();  // ww is restaged for the next columns
      }
      for (int e = lane; e < kMonarchTile * obp; e += 32) {
        const int t = e / obp, c = e - (e / obp) * obp;
        z[int64_t(t) * zw + c] = from_float<T>(fw[e]);
      }
      __syncwarp();
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < int64_t(live) * out; e += blockDim.x) {
      const int64_t t = e / out, o = e - t * out;
      const int64_t b = kTransposed ? o / ob : o % nb, row = kTransposed ? o % ob : o / nb;
      dst[(t0 + t) * out + o] = zh[b * region + t * zw + row];
    }
  }
#else
  __trap();  // not built for this target: tensor_cores() is false, never launched
#endif
}

}  // namespace lowrank
