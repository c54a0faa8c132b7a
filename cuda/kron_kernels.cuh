// Kernels of the Kronecker-factored product (launched by kron.cu). Device code
// only, so tests/cuda_emulation compiles these same kernels for the CPU.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device.cuh"

namespace lowrank {

constexpr int kKronThreads = 256;

struct KronDims {
  int p, q, r, s;
  __host__ __device__ bool b_first() const {
    return int64_t(q) * s * r + int64_t(p) * q * r <= int64_t(p) * q * s + int64_t(p) * s * r;
  }
  __host__ __device__ int mid() const { return b_first() ? q * r : p * s; }
  // float32 words of shared memory: a, b^T, X, intermediate, Y.
  int64_t forward_words() const {
    return int64_t(p) * q + int64_t(s) * r + int64_t(q) * s + mid() + int64_t(p) * r;
  }
  // a, b (rows padded to s + 1), X, dY, G = a^T dY, Z = X b^T (rows padded to r + 1), da,
  // db accumulators. The padding keeps the transposed reads of b and Z (stride s or r
  // words, 32-way bank conflicts when that is a multiple of 32) on distinct banks.
  int64_t backward_words() const {
    return 2 * int64_t(p) * q + int64_t(r) * (s + 1) + int64_t(r) * s + int64_t(q) * s +
           int64_t(p) * r + int64_t(q) * r + int64_t(q) * (r + 1);
  }
};

template <typename T>
__device__ __forceinline__ void stage(float* dst, const T* src, int n) {
  for (int e = threadIdx.x; e < n; e += blockDim.x) dst[e] = to_float(src[e]);
}

template <typename T>
__global__ void __launch_bounds__(kKronThreads)
    kron_forward_kernel(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                        const T* addend, float scale, T* y, int64_t tokens, KronDims d) {
  // addend may alias y (in-place accumulation): each element is read before it is written,
  // by the same thread, so neither pointer is __restrict__.
  LOWRANK_SHARED_FLOATS(smem);
  const int p = d.p, q = d.q, r = d.r, s = d.s;
  float* as = smem;           // p x q
  float* bts = as + p * q;    // s x r  (b transposed)
  float* xs = bts + s * r;    // q x s
  float* mid = xs + q * s;    // q x r or p x s
  float* ys = mid + d.mid();  // p x r
  stage(as, a, p * q);
  for (int e = threadIdx.x; e < r * s; e += blockDim.x) {
    const int k = e / s, j = e - k * s;
    bts[j * r + k] = to_float(b[e]);
  }
  const bool b_first = d.b_first();
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    __syncthreads();  // previous token's ys fully stored; a, b^T staged
    stage(xs, x + t * q * s, q * s);
    __syncthreads();
    if (b_first) {
      block_gemm<false>(q, r, s, xs, s, 1, bts, r, 1, mid, r);
      __syncthreads();
      block_gemm<false>(p, r, q, as, q, 1, mid, r, 1, ys, r);
    } else {
      block_gemm<false>(p, s, q, as, q, 1, xs, s, 1, mid, s);
      __syncthreads();
      block_gemm<false>(p, r, s, mid, s, 1, bts, r, 1, ys, r);
    }
    __syncthreads();
    T* yt = y + t * p * r;
    const T* at = addend ? addend + t * p * r : nullptr;
    for (int e = threadIdx.x; e < p * r; e += blockDim.x)
      yt[e] = from_float<T>(at ? fmaf(scale, ys[e], to_float(at[e])) : scale * ys[e]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kKronThreads)
    kron_factor_grads_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                             const T* __restrict__ a, const T* __restrict__ b,
                             float* __restrict__ da, float* __restrict__ db, int64_t tokens,
                             KronDims d) {
  LOWRANK_SHARED_FLOATS(smem);
  const int p = d.p, q = d.q, r = d.r, s = d.s;
  const int ldb = s + 1, ldz = r + 1;  // padded rows: see backward_words
  float* as = smem;                    // p x q
  float* bs = as + p * q;              // r x s (ld s + 1)
  float* xs = bs + r * ldb;            // q x s
  float* dys = xs + q * s;             // p x r
  float* g = dys + p * r;              // q x r: a^T dY
  float* z = g + q * r;                // q x r: X b^T (ld r + 1)
  float* da_acc = z + q * ldz;         // p x q
  float* db_acc = da_acc + p * q;      // r x s
  stage(as, a, p * q);
  for (int e = threadIdx.x; e < r * s; e += blockDim.x) bs[(e / s) * ldb + e % s] = to_float(b[e]);
  for (int e = threadIdx.x; e < p * q; e += blockDim.x) da_acc[e] = 0.f;
  for (int e = threadIdx.x; e < r * s; e += blockDim.x) db_acc[e] = 0.f;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    __syncthreads();
    stage(xs, x + t * q * s, q * s);
    stage(dys, dy + t * p * r, p * r);
    __syncthreads();
    block_gemm<false>(q, r, p, as, 1, q, dys, r, 1, g, r);     // a^T dY
    block_gemm<false>(q, r, s, xs, s, 1, bs, 1, ldb, z, ldz);  // X b^T: B(k, j) = b[j, k]
    __syncthreads();
    block_gemm<true>(r, s, q, g, 1, r, xs, s, 1, db_acc, s);     // += G^T X
    block_gemm<true>(p, q, r, dys, r, 1, z, 1, ldz, da_acc, q);  // += dY Z^T: B(k, j) = Z[j, k]
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p * q; e += blockDim.x) atomicAdd(da + e, da_acc[e]);
  for (int e = threadIdx.x; e < r * s; e += blockDim.x) atomicAdd(db + e, db_acc[e]);
}

// ---- tensor-core kernels (float16 / bfloat16 storage, float32 accumulation) ----------------
//
// Tokens are processed in tiles of T; every factor and operand is zero-padded to
// multiples of 16 in shared memory (the WMMA tile), so any p, q, r, s works while the
// padded operands fit the shared-memory budget (the launcher picks T, or falls back).
// One tile, with X_t (q x s), Z_t = X_t b^T (q x r) and Y_t = a Z_t (p x r):
//   stage 1: [X_1; ...; X_T] (T q x s) . b^T  -> Z, stored as [Z_1 | ... | Z_T] (q x T r)
//   stage 2: a (p x q) . [Z_1 | ... | Z_T]   -> [Y_1 | ... | Y_T] (p x T r)
// so the intermediate never leaves the chip and y is written once, with the fused
// residual y = addend + scale * Y. Per token: 2 (q s r + p q r) FLOP; bytes: x read
// and y written once (2 (q s + p r) for 16-bit storage, plus the addend when given):
// 128 MiB and 8.6 GFLOP at x = 8192 x 4096 with 64 x 64 factors, so on a GPU with
// tensor cores the kernel is bound by memory, where the composite path writes and
// re-reads Z (another 64 MiB) and runs two GEMM launches. Unverified on a GPU so far.

constexpr int kKronTcThreads = 256;  // 8 warps
constexpr int kWmma = 16;

__host__ __device__ inline int pad16(int v) {
  return (v + kWmma - 1) / kWmma * kWmma;
}

struct KronTcDims {
  int p, q, r, s;
  int tile;  // tokens per tile (T)
  __host__ __device__ int pp() const { return pad16(p); }
  __host__ __device__ int qp() const { return pad16(q); }
  __host__ __device__ int rp() const { return pad16(r); }
  __host__ __device__ int sp() const { return pad16(s); }
  __host__ __device__ int ldz() const { return tile * rp(); }  // [Z_1 | ... | Z_T]
  // Shared-memory layout of the forward kernel, in bytes (every region 32-byte aligned:
  // sizes are multiples of 16 x 16 elements).
  __host__ __device__ int64_t a_bytes() const { return int64_t(pp()) * qp() * 2; }
  __host__ __device__ int64_t b_bytes() const { return int64_t(rp()) * sp() * 2; }
  __host__ __device__ int64_t x_bytes() const { return int64_t(tile) * qp() * sp() * 2; }
  __host__ __device__ int64_t zh_bytes() const { return int64_t(qp()) * ldz() * 2; }
  __host__ __device__ int64_t f_bytes() const {  // Z, then Y, in float32
    return int64_t(pp() > qp() ? pp() : qp()) * ldz() * 4;
  }
  __host__ __device__ int64_t forward_bytes() const {
    return a_bytes() + b_bytes() + x_bytes() + zh_bytes() + f_bytes();
  }
  // The factor-gradient kernel adds dY (p x T r, 16-bit), G = a^T dY stacked as
  // (T q x r, 16-bit) and the float32 accumulators of da (p x q) and db (r x s).
  __host__ __device__ int64_t dy_bytes() const { return int64_t(pp()) * ldz() * 2; }
  __host__ __device__ int64_t g_bytes() const { return int64_t(tile) * qp() * rp() * 2; }
  __host__ __device__ int64_t acc_bytes() const {
    return (int64_t(pp()) * qp() + int64_t(rp()) * sp()) * 4;
  }
  __host__ __device__ int64_t grads_bytes() const {
    return forward_bytes() + dy_bytes() + g_bytes() + acc_bytes();
  }
};

// The forward kernel's shared-memory regions (the factor-gradient kernel's first ones).
template <typename T>
struct KronTcRegions {
  T* a;      // pp x qp
  T* b;      // rp x sp
  T* x;      // T qp x sp: [X_1; ...; X_T]
  T* zh;     // qp x ldz: [Z_1 | ... | Z_T]
  float* f;  // max(pp, qp) x ldz, float32 staging
  __device__ KronTcRegions(char* smem, const KronTcDims& d)
      : a(reinterpret_cast<T*>(smem)),
        b(reinterpret_cast<T*>(smem + d.a_bytes())),
        x(b + int64_t(d.rp()) * d.sp()),
        zh(x + int64_t(d.tile) * d.qp() * d.sp()),
        f(reinterpret_cast<float*>(zh + int64_t(d.qp()) * d.ldz())) {}
};

// dst (rows_p x cols_p, row-major, 16-bit) = src (rows x cols, row-major) zero-padded.
template <typename T>
__device__ __forceinline__ void stage_padded(T* dst, const T* src, int rows, int cols, int rows_p,
                                             int cols_p) {
  const T zero = from_float<T>(0.f);
  for (int e = threadIdx.x; e < rows_p * cols_p; e += blockDim.x) {
    const int i = e / cols_p, j = e - (e / cols_p) * cols_p;
    dst[e] = (i < rows && j < cols) ? src[int64_t(i) * cols + j] : zero;
  }
}

// Stage 1 of a tile: zf (qp x ldz, float) = [X_1 | ... | X_T]-stacked . b^T, written
// as [Z_1 | ... | Z_T]. xs is (T qp x sp) row-major, bs is b (rp x sp) row-major.
template <typename T>
__device__ __forceinline__ void kron_tc_stage1(const KronTcDims& d, const T* xs, const T* bs,
                                               float* zf) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int qp = d.qp(), rp = d.rp(), sp = d.sp(), ldz = d.ldz();
  const int m_tiles = d.tile * qp / kWmma, n_tiles = rp / kWmma;
  for (int t = warp; t < m_tiles * n_tiles; t += warps) {
    const int mt = t / n_tiles, nt = t - mt * n_tiles;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int k0 = 0; k0 < sp; k0 += kWmma) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;  // b^T
      wmma::load_matrix_sync(fa, xs + int64_t(mt) * kWmma * sp + k0, sp);
      wmma::load_matrix_sync(fb, bs + int64_t(nt) * kWmma * sp + k0, sp);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    const int token = mt * kWmma / qp, row = mt * kWmma - token * qp;  // a tile is one token's
    wmma::store_matrix_sync(zf + int64_t(row) * ldz + token * rp + nt * kWmma, acc, ldz,
                            wmma::mem_row_major);
  }
}

// c (M x N, float, ld ldc) (= or +=) A . B on tensor cores, by the block's warps: A is
// M x K (row-major at a with ld lda, or column-major: A(i, k) = a[k * lda + i]), B is
// K x N (row-major at b with ld ldb, or column-major: B(k, j) = b[j * ldb + k]).
template <typename T, typename LayoutA, typename LayoutB, bool Accumulate>
__device__ __forceinline__ void tc_gemm(int M, int N, int K, const T* a, int lda, const T* b,
                                        int ldb, float* c, int ldc) {
  using namespace nvcuda;
  constexpr bool a_row = std::is_same<LayoutA, wmma::row_major>::value;
  constexpr bool b_row = std::is_same<LayoutB, wmma::row_major>::value;
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int n_tiles = N / kWmma;
  for (int t = warp; t < (M / kWmma) * n_tiles; t += warps) {
    const int i0 = t / n_tiles * kWmma, j0 = (t - t / n_tiles * n_tiles) * kWmma;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (Accumulate)
      wmma::load_matrix_sync(acc, c + int64_t(i0) * ldc + j0, ldc, wmma::mem_row_major);
    else
      wmma::fill_fragment(acc, 0.f);
    for (int k0 = 0; k0 < K; k0 += kWmma) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
      wmma::load_matrix_sync(fa, a_row ? a + int64_t(i0) * lda + k0 : a + int64_t(k0) * lda + i0,
                             lda);
      wmma::load_matrix_sync(fb, b_row ? b + int64_t(k0) * ldb + j0 : b + int64_t(j0) * ldb + k0,
                             ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + int64_t(i0) * ldc + j0, acc, ldc, wmma::mem_row_major);
  }
}

// xs (T qp x sp) = the tile's X_t stacked, zero-padded (rows of absent tokens too).
template <typename T>
__device__ __forceinline__ void stage_x_tile(const KronTcDims& d, const T* __restrict__ x,
                                             int64_t t0, int live, T* xs) {
  const int q = d.q, s = d.s, qp = d.qp(), sp = d.sp();
  const T zero = from_float<T>(0.f);
  for (int e = threadIdx.x; e < d.tile * qp * sp; e += blockDim.x) {
    const int tt = e / (qp * sp), rest = e - tt * qp * sp;
    const int i = rest / sp, j = rest - (rest / sp) * sp;
    xs[e] = (tt < live && i < q && j < s) ? x[(t0 + tt) * q * s + int64_t(i) * s + j] : zero;
  }
}

template <typename T>
__device__ __forceinline__ void to_storage(T* dst, const float* src, int64_t n) {
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) dst[e] = from_float<T>(src[e]);
}

template <typename T>
__global__ void __launch_bounds__(kKronTcThreads)
    kron_forward_tc_kernel(const T* __restrict__ x, const T* __restrict__ a,
                           const T* __restrict__ b, const T* addend, float scale, T* y,
                           int64_t tokens, KronTcDims d) {
#if LOWRANK_TENSOR_CORE_ARCH
  // addend may alias y: each element is read before it is written, by the same thread.
  LOWRANK_SHARED_FLOATS(smem_words);
  char* smem = reinterpret_cast<char*>(smem_words);
  const int p = d.p, q = d.q, r = d.r, s = d.s;
  const int pp = d.pp(), qp = d.qp(), rp = d.rp(), sp = d.sp(), ldz = d.ldz();
  const KronTcRegions<T> regions(smem, d);
  T *as = regions.a, *bs = regions.b, *xs = regions.x, *zh = regions.zh;
  float* f = regions.f;  // Z, then Y
  stage_padded(as, a, p, q, pp, qp);
  stage_padded(bs, b, r, s, rp, sp);
  for (int64_t t0 = int64_t(blockIdx.x) * d.tile; t0 < tokens; t0 += int64_t(gridDim.x) * d.tile) {
    const int live = int(tokens - t0 < d.tile ? tokens - t0 : d.tile);
    __syncthreads();  // the previous tile is done with xs, zh and f
    stage_x_tile(d, x, t0, live, xs);
    __syncthreads();
    kron_tc_stage1(d, xs, bs, f);
    __syncthreads();
    to_storage(zh, f, int64_t(qp) * ldz);
    __syncthreads();
    tc_gemm<T, nvcuda::wmma::row_major, nvcuda::wmma::row_major, false>(pp, ldz, qp, as, qp, zh,
                                                                        ldz, f, ldz);
    __syncthreads();
    for (int e = threadIdx.x; e < live * p * r; e += blockDim.x) {
      const int tt = e / (p * r), rest = e - tt * p * r;
      const int i = rest / r, j = rest - (rest / r) * r;
      const int64_t out = (t0 + tt) * p * r + rest;
      const float v = scale * f[int64_t(i) * ldz + tt * rp + j];
      y[out] = from_float<T>(addend ? v + to_float(addend[out]) : v);
    }
  }
#else
  __trap();  // not built for this target: tensor_cores() is false, never launched
#endif
}

// da = sum_t dY_t Z_t^T and db = sum_t G_t^T X_t (G_t = a^T dY_t), each block summing its
// tiles in a fixed order into shared memory and writing its partial sums; the partials
// are added by kron_reduce_partials_kernel in a fixed order: deterministic, no atomics.
// Per token 2 (q s r + p q r) (stage 1, G) + 2 (p r q + r q s) (da, db) FLOP.
template <typename T>
__global__ void __launch_bounds__(kKronTcThreads)
    kron_factor_grads_tc_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                const T* __restrict__ a, const T* __restrict__ b,
                                float* __restrict__ partial_da, float* __restrict__ partial_db,
                                int64_t tokens, KronTcDims d) {
#if LOWRANK_TENSOR_CORE_ARCH
  using nvcuda::wmma::col_major;
  using nvcuda::wmma::row_major;
  LOWRANK_SHARED_FLOATS(smem_words);
  char* smem = reinterpret_cast<char*>(smem_words);
  const int p = d.p, q = d.q, r = d.r, s = d.s;
  const int pp = d.pp(), qp = d.qp(), rp = d.rp(), sp = d.sp(), ldz = d.ldz();
  const KronTcRegions<T> regions(smem, d);
  T *as = regions.a, *bs = regions.b, *xs = regions.x, *zh = regions.zh;
  float* f = regions.f;                                     // float staging
  T* dys = reinterpret_cast<T*>(smem + d.forward_bytes());  // pp x ldz: [dY_1 | ... | dY_T]
  T* gh = dys + int64_t(pp) * ldz;                          // T qp x rp: [G_1; ...; G_T]
  float* da_acc = reinterpret_cast<float*>(gh + int64_t(d.tile) * qp * rp);  // pp x qp
  float* db_acc = da_acc + int64_t(pp) * qp;                                 // rp x sp
  stage_padded(as, a, p, q, pp, qp);
  stage_padded(bs, b, r, s, rp, sp);
  for (int e = threadIdx.x; e < pp * qp; e += blockDim.x) da_acc[e] = 0.f;
  for (int e = threadIdx.x; e < rp * sp; e += blockDim.x) db_acc[e] = 0.f;
  const T zero = from_float<T>(0.f);
  for (int64_t t0 = int64_t(blockIdx.x) * d.tile; t0 < tokens; t0 += int64_t(gridDim.x) * d.tile) {
    const int live = int(tokens - t0 < d.tile ? tokens - t0 : d.tile);
    __syncthreads();
    stage_x_tile(d, x, t0, live, xs);
    for (int e = threadIdx.x; e < pp * ldz; e += blockDim.x) {
      const int i = e / ldz, col = e - (e / ldz) * ldz;
      const int tt = col / rp, j = col - (col / rp) * rp;
      dys[e] = (tt < live && i < p && j < r) ? dy[(t0 + tt) * p * r + int64_t(i) * r + j] : zero;
    }
    __syncthreads();
    kron_tc_stage1(d, xs, bs, f);  // Z
    __syncthreads();
    to_storage(zh, f, int64_t(qp) * ldz);
    __syncthreads();
    // G = a^T [dY_1 | ... | dY_T] (qp x ldz); stored stacked as [G_1; ...; G_T] (T qp x rp)
    {
      using namespace nvcuda;
      const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
      const int n_tiles = ldz / kWmma;
      for (int t = warp; t < (qp / kWmma) * n_tiles; t += warps) {
        const int i0 = t / n_tiles * kWmma, j0 = (t - t / n_tiles * n_tiles) * kWmma;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
        for (int k0 = 0; k0 < pp; k0 += kWmma) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, col_major> fa;  // a^T
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, row_major> fb;
          wmma::load_matrix_sync(fa, as + int64_t(k0) * qp + i0, qp);
          wmma::load_matrix_sync(fb, dys + int64_t(k0) * ldz + j0, ldz);
          wmma::mma_sync(acc, fa, fb, acc);
        }
        const int token = j0 / rp, col = j0 - token * rp;
        wmma::store_matrix_sync(f + (int64_t(token) * qp + i0) * rp + col, acc, rp,
                                wmma::mem_row_major);
      }
    }
    __syncthreads();
    to_storage(gh, f, int64_t(d.tile) * qp * rp);
    __syncthreads();
    // da += [dY_1 | ... | dY_T] [Z_1 | ... | Z_T]^T;  db += [G_1; ...; G_T]^T [X_1; ...; X_T]
    tc_gemm<T, row_major, col_major, true>(pp, qp, ldz, dys, ldz, zh, ldz, da_acc, qp);
    tc_gemm<T, col_major, row_major, true>(rp, sp, d.tile * qp, gh, rp, xs, sp, db_acc, sp);
  }
  __syncthreads();
  float* my_da = partial_da + int64_t(blockIdx.x) * p * q;
  float* my_db = partial_db + int64_t(blockIdx.x) * r * s;
  for (int e = threadIdx.x; e < p * q; e += blockDim.x)
    my_da[e] = da_acc[(e / q) * qp + (e - (e / q) * q)];
  for (int e = threadIdx.x; e < r * s; e += blockDim.x)
    my_db[e] = db_acc[(e / s) * sp + (e - (e / s) * s)];
#else
  __trap();  // not built for this target: tensor_cores() is false, never launched
#endif
}

// out[e] = sum over blocks of partial[block][e], in block order (deterministic).
__global__ void __launch_bounds__(kKronTcThreads)
    kron_reduce_partials_kernel(const float* __restrict__ partial, int blocks, int64_t n,
                                float* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += int64_t(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int k = 0; k < blocks; ++k) sum += partial[int64_t(k) * n + e];
    out[e] = sum;
  }
}

}  // namespace lowrank
