// Register-tiled small matrix products for the fused CPU kernels.
//
//   C[M x N] (= or +=) A[M x K] . B[K x N]
//
// A is read through arbitrary strides (element (i, k) at A[i*rsa + k*csa]), so
// transposed operands cost nothing; B and C are row-major with unit column
// stride, which is the dimension the tiles vectorise over. Every function is
// force-inlined so that each instruction-set entry point (cpu.h) compiles its
// own copy with its own vector width: Cfg::VB bytes per vector, Cfg::MR rows by
// Cfg::NV vectors of accumulators held in registers.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lowrank/cpu.h"

namespace lowrank {

template <int VB_, int MR_, int NV_>
struct TileShape {
  static constexpr int VB = VB_;
  static constexpr int MR = MR_;
  static constexpr int NV = NV_;
};
using TileAvx512 = TileShape<64, 8, 2>;  // 16 zmm accumulators of 32
using TileAvx2 = TileShape<32, 6, 2>;    // 12 ymm accumulators of 16
using TileBase = TileShape<16, 4, 2>;    // 8 xmm accumulators of 16

template <typename T, int VB>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
};

template <typename T, int VB, int MR, int NV>
LOWRANK_ALWAYS_INLINE void gemm_tile(int K, const T* A, std::ptrdiff_t rsa, std::ptrdiff_t csa,
                                     const T* B, std::ptrdiff_t ldb, T* C, std::ptrdiff_t ldc,
                                     bool accumulate) {
  using V = typename VecOf<T, VB>::type;
  constexpr int L = VB / static_cast<int>(sizeof(T));
  V c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) c[i][v] = V{};
  for (int k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&b[v], B + k * ldb + v * L, sizeof(V));
    const T* a_col = A + k * csa;
    for (int i = 0; i < MR; ++i) {
      const V a = V{} + a_col[i * rsa];  // one broadcast under -fno-signed-zeros
      for (int v = 0; v < NV; ++v) c[i][v] += a * b[v];
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) {
      T* dst = C + i * ldc + v * L;
      if (accumulate) {
        V old;
        std::memcpy(&old, dst, sizeof(V));
        c[i][v] += old;
      }
      std::memcpy(dst, &c[i][v], sizeof(V));
    }
  }
}

// Columns [j0, N) that do not fill a vector: plain loops.
template <typename T>
LOWRANK_ALWAYS_INLINE void gemm_columns_scalar(int M, int j0, int N, int K, const T* A,
                                               std::ptrdiff_t rsa, std::ptrdiff_t csa, const T* B,
                                               std::ptrdiff_t ldb, T* C, std::ptrdiff_t ldc,
                                               bool accumulate) {
  for (int i = 0; i < M; ++i) {
    for (int j = j0; j < N; ++j) {
      T sum = accumulate ? C[i * ldc + j] : T(0);
      for (int k = 0; k < K; ++k) sum += A[i * rsa + k * csa] * B[k * ldb + j];
      C[i * ldc + j] = sum;
    }
  }
}

template <class Cfg, typename T, int VB, int NV>
LOWRANK_ALWAYS_INLINE void gemm_column_panel(int M, int j, int K, const T* A, std::ptrdiff_t rsa,
                                             std::ptrdiff_t csa, const T* B, std::ptrdiff_t ldb,
                                             T* C, std::ptrdiff_t ldc, bool accumulate) {
  int i = 0;
  for (; i + Cfg::MR <= M; i += Cfg::MR)
    gemm_tile<T, VB, Cfg::MR, NV>(K, A + i * rsa, rsa, csa, B + j, ldb, C + i * ldc + j, ldc,
                                  accumulate);
  for (; i + 2 <= M; i += 2)
    gemm_tile<T, VB, 2, NV>(K, A + i * rsa, rsa, csa, B + j, ldb, C + i * ldc + j, ldc, accumulate);
  for (; i < M; ++i)
    gemm_tile<T, VB, 1, NV>(K, A + i * rsa, rsa, csa, B + j, ldb, C + i * ldc + j, ldc, accumulate);
}

// Columns [j, N) narrower than a full vector: halve the vector width down to
// 16 bytes (so e.g. N = 8 floats still runs on 8-lane vectors), then plain loops.
template <class Cfg, typename T, int VB>
LOWRANK_ALWAYS_INLINE void gemm_narrow_columns(int M, int j, int N, int K, const T* A,
                                               std::ptrdiff_t rsa, std::ptrdiff_t csa, const T* B,
                                               std::ptrdiff_t ldb, T* C, std::ptrdiff_t ldc,
                                               bool accumulate) {
  if constexpr (VB >= 16 && VB >= int(2 * sizeof(T))) {
    constexpr int L = VB / static_cast<int>(sizeof(T));
    for (; j + L <= N; j += L)
      gemm_column_panel<Cfg, T, VB, 1>(M, j, K, A, rsa, csa, B, ldb, C, ldc, accumulate);
    gemm_narrow_columns<Cfg, T, VB / 2>(M, j, N, K, A, rsa, csa, B, ldb, C, ldc, accumulate);
  } else if (j < N) {
    gemm_columns_scalar(M, j, N, K, A, rsa, csa, B, ldb, C, ldc, accumulate);
  }
}

template <class Cfg, typename T>
LOWRANK_ALWAYS_INLINE void gemm(int M, int N, int K, const T* A, std::ptrdiff_t rsa,
                                std::ptrdiff_t csa, const T* B, std::ptrdiff_t ldb, T* C,
                                std::ptrdiff_t ldc, bool accumulate) {
  constexpr int L = Cfg::VB / static_cast<int>(sizeof(T));
  if (K == 0) {
    if (!accumulate)
      for (int i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(T) * N);
    return;
  }
  int j = 0;
  for (; j + Cfg::NV * L <= N; j += Cfg::NV * L)
    gemm_column_panel<Cfg, T, Cfg::VB, Cfg::NV>(M, j, K, A, rsa, csa, B, ldb, C, ldc, accumulate);
  gemm_narrow_columns<Cfg, T, Cfg::VB>(M, j, N, K, A, rsa, csa, B, ldb, C, ldc, accumulate);
}

// ---- batched "NT" products: C[M x N] += sum_u A_u . B_u^T -----------------------------
// A_u rows (A + u*a_batch + i*lda) and B_u rows (B + u*b_batch + j*ldb) are both
// contiguous along the K dimension, so tiles vectorise over K (dot products) and
// keep MI x NJ vector accumulators across the whole batch; each accumulator is
// reduced horizontally once. This replaces a transpose per batch element.

template <typename T, int VB>
LOWRANK_ALWAYS_INLINE T horizontal_sum(typename VecOf<T, VB>::type v) {
  T sum = T(0);
  for (int l = 0; l < VB / int(sizeof(T)); ++l) sum += v[l];
  return sum;
}

template <typename T, int VB, int MI, int NJ>
LOWRANK_ALWAYS_INLINE void gemm_nt_tile(int K, int64_t batch, const T* A, std::ptrdiff_t lda,
                                        std::ptrdiff_t a_batch, const T* B, std::ptrdiff_t ldb,
                                        std::ptrdiff_t b_batch, T* C, std::ptrdiff_t ldc) {
  using V = typename VecOf<T, VB>::type;
  constexpr int L = VB / static_cast<int>(sizeof(T));
  V acc[MI][NJ];
  T tail[MI][NJ];
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < NJ; ++j) {
      acc[i][j] = V{};
      tail[i][j] = T(0);
    }
  const int kv = K - K % L;
  for (int64_t u = 0; u < batch; ++u) {
    const T* a = A + u * a_batch;
    const T* b = B + u * b_batch;
    for (int k = 0; k < kv; k += L) {
      V av[MI], bv[NJ];
      for (int i = 0; i < MI; ++i) std::memcpy(&av[i], a + i * lda + k, sizeof(V));
      for (int j = 0; j < NJ; ++j) std::memcpy(&bv[j], b + j * ldb + k, sizeof(V));
      for (int i = 0; i < MI; ++i)
        for (int j = 0; j < NJ; ++j) acc[i][j] += av[i] * bv[j];
    }
  }
  // The K % L leftover columns in a separate sweep, so the loop above keeps every
  // accumulator in a register across the whole batch.
  if (kv < K)
    for (int64_t u = 0; u < batch; ++u)
      for (int k = kv; k < K; ++k)
        for (int i = 0; i < MI; ++i)
          for (int j = 0; j < NJ; ++j)
            tail[i][j] += A[u * a_batch + i * lda + k] * B[u * b_batch + j * ldb + k];
  for (int i = 0; i < MI; ++i)
    for (int j = 0; j < NJ; ++j) C[i * ldc + j] += horizontal_sum<T, VB>(acc[i][j]) + tail[i][j];
}

template <typename T, int VB, int MI>
LOWRANK_ALWAYS_INLINE void gemm_nt_rows(int N, int K, int64_t batch, const T* A, std::ptrdiff_t lda,
                                        std::ptrdiff_t a_batch, const T* B, std::ptrdiff_t ldb,
                                        std::ptrdiff_t b_batch, T* C, std::ptrdiff_t ldc) {
  int j = 0;
  for (; j + 4 <= N; j += 4)
    gemm_nt_tile<T, VB, MI, 4>(K, batch, A, lda, a_batch, B + j * ldb, ldb, b_batch, C + j, ldc);
  for (; j < N; ++j)
    gemm_nt_tile<T, VB, MI, 1>(K, batch, A, lda, a_batch, B + j * ldb, ldb, b_batch, C + j, ldc);
}

template <typename T, int VB>
LOWRANK_ALWAYS_INLINE void gemm_nt_width(int M, int N, int K, int64_t batch, const T* A,
                                         std::ptrdiff_t lda, std::ptrdiff_t a_batch, const T* B,
                                         std::ptrdiff_t ldb, std::ptrdiff_t b_batch, T* C,
                                         std::ptrdiff_t ldc) {
  int i = 0;
  for (; i + 4 <= M; i += 4)
    gemm_nt_rows<T, VB, 4>(N, K, batch, A + i * lda, lda, a_batch, B, ldb, b_batch, C + i * ldc,
                           ldc);
  for (; i < M; ++i)
    gemm_nt_rows<T, VB, 1>(N, K, batch, A + i * lda, lda, a_batch, B, ldb, b_batch, C + i * ldc,
                           ldc);
}

// The widest vector not longer than K (down to 16 bytes) carries the dot products.
template <class Cfg, typename T>
LOWRANK_ALWAYS_INLINE void gemm_nt_batched(int M, int N, int K, int64_t batch, const T* A,
                                           std::ptrdiff_t lda, std::ptrdiff_t a_batch, const T* B,
                                           std::ptrdiff_t ldb, std::ptrdiff_t b_batch, T* C,
                                           std::ptrdiff_t ldc) {
  constexpr int VB = Cfg::VB;
  if (K >= VB / int(sizeof(T)) || VB <= 16)
    gemm_nt_width<T, VB>(M, N, K, batch, A, lda, a_batch, B, ldb, b_batch, C, ldc);
  else if (VB >= 32 && K >= VB / 2 / int(sizeof(T)))
    gemm_nt_width<T, (VB >= 32 ? VB / 2 : 16)>(M, N, K, batch, A, lda, a_batch, B, ldb, b_batch, C,
                                               ldc);
  else
    gemm_nt_width<T, 16>(M, N, K, batch, A, lda, a_batch, B, ldb, b_batch, C, ldc);
}

// dst[cols x rows] = src[rows x cols]^T, both row-major; 16 x 16 tiles keep the
// strided side of the copy inside a few cache lines.
template <typename T>
LOWRANK_ALWAYS_INLINE void transpose(int rows, int cols, const T* src, T* dst) {
  constexpr int kTile = 16;
  for (int i0 = 0; i0 < rows; i0 += kTile)
    for (int j0 = 0; j0 < cols; j0 += kTile) {
      const int i1 = std::min(rows, i0 + kTile), j1 = std::min(cols, j0 + kTile);
      for (int i = i0; i < i1; ++i)
        for (int j = j0; j < j1; ++j) dst[int64_t(j) * rows + i] = src[int64_t(i) * cols + j];
    }
}

// Copies of w[b] (rows x cols), b < blocks, each transposed.
template <typename T>
std::vector<T> transpose_blocks(const T* w, int blocks, int rows, int cols) {
  std::vector<T> out(size_t(blocks) * rows * cols);
  for (int b = 0; b < blocks; ++b)
    transpose(rows, cols, w + int64_t(b) * rows * cols, out.data() + int64_t(b) * rows * cols);
  return out;
}

}  // namespace lowrank
