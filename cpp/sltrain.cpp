// Sparse-plus-low-rank products (SLTrain: Han et al., "SLTrain: a sparse plus
// low-rank approach for parameter and memory efficient pretraining", NeurIPS 2024).
//
// W = scale * B A + S, B: (out, r), A: (r, in), S: out x in with `values` at the
// sorted flat positions `indices` (row * in + col; int32 or int64).
//
// sltrain_rebuild: W in one pass: each block of rows is the register-tiled
//   product scale * B_rows A, and the nonzeros of those rows (a contiguous range
//   of the sorted indices) are added while the rows are in cache.
//   Floor: out*in*r multiply-adds, W written once.
// sparse_rows: y[t, row_k] += v_k x[t, col_k] (x S^T), or with `transpose`
//   y[t, col_k] += v_k x[t, row_k] (x S); one pass over the nonzeros per token.
// sltrain_scatter: W[indices[k]] += values[k] in place (the composite rebuild's scatter
//   after a library GEMM); the indices are unique, so threads never share an element.
// sampled_dot: g[k] = sum_t dy[t, row_k] x[t, col_k]: the dense gradient dy^T x
//   sampled at the support, without forming it; tokens*nnz multiply-adds.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lowrank/common.h"
#include "lowrank/cpu.h"
#include "lowrank/small_gemm.h"

namespace py = pybind11;

namespace lowrank {
namespace {

template <class Cfg, typename T, typename I>
LOWRANK_ALWAYS_INLINE void rebuild_rows(int64_t r0, int64_t r1, int64_t in, int rank, const T* b,
                                        const T* a, const T* values, const I* indices, int64_t nnz,
                                        T scale, T* w) {
  // scale * B[r0:r1] A, then the nonzeros of those rows.
  std::vector<T> bs(size_t((r1 - r0) * rank));
  for (int64_t i = 0; i < (r1 - r0) * rank; ++i) bs[i] = scale * b[r0 * rank + i];
  gemm<Cfg, T>(int(r1 - r0), int(in), rank, bs.data(), rank, 1, a, in, w + r0 * in, in, false);
  const I* first = std::lower_bound(indices, indices + nnz, I(r0 * in));
  const I* last = std::lower_bound(first, indices + nnz, I(r1 * in));
  for (const I* it = first; it != last; ++it) w[*it] += values[it - indices];
}

#define LOWRANK_SLTRAIN_ENTRIES(SUFFIX, TARGET, CFG)                                       \
  template <typename T, typename I>                                                        \
  TARGET void rebuild_##SUFFIX(int64_t r0, int64_t r1, int64_t in, int rank, const T* b,   \
                               const T* a, const T* values, const I* indices, int64_t nnz, \
                               T scale, T* w) {                                            \
    rebuild_rows<CFG, T, I>(r0, r1, in, rank, b, a, values, indices, nnz, scale, w);       \
  }

LOWRANK_SLTRAIN_ENTRIES(base, , TileBase)
#if LOWRANK_HAS_ISA_TARGETS
LOWRANK_SLTRAIN_ENTRIES(avx2, LOWRANK_TARGET_AVX2, TileAvx2)
LOWRANK_SLTRAIN_ENTRIES(avx512, LOWRANK_TARGET_AVX512, TileAvx512)
#endif

template <typename T, typename I>
void rebuild(int64_t out, int64_t in, int rank, const T* b, const T* a, const T* values,
             const I* indices, int64_t nnz, double scale, T* w, int threads) {
  const Isa isa = cpu_isa();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, in * rank / 64 + 1));
  parallel_chunks(out, threads, grain, [&](int64_t begin, int64_t end, int) {
    for (int64_t r0 = begin; r0 < end; r0 += 64) {
      const int64_t r1 = std::min(end, r0 + 64);
#if LOWRANK_HAS_ISA_TARGETS
      if (isa == Isa::Avx512) {
        rebuild_avx512<T, I>(r0, r1, in, rank, b, a, values, indices, nnz, T(scale), w);
        continue;
      }
      if (isa == Isa::Avx2) {
        rebuild_avx2<T, I>(r0, r1, in, rank, b, a, values, indices, nnz, T(scale), w);
        continue;
      }
#endif
      rebuild_base<T, I>(r0, r1, in, rank, b, a, values, indices, nnz, T(scale), w);
    }
  });
}

template <typename T, typename I>
void scatter_add(const T* values, const I* indices, int64_t nnz, T* w, int threads) {
  parallel_chunks(nnz, threads, 16384, [&](int64_t begin, int64_t end, int) {
    for (int64_t k = begin; k < end; ++k) w[indices[k]] += values[k];
  });
}

// y (tokens x y_width) = x S^T, or x S with `transpose` (S is rows x cols = out x in).
// Tokens go in blocks of 8 so each nonzero's position is decoded once per block.
template <typename T, typename I>
void sparse_rows(const T* x, int64_t tokens, int64_t x_width, const T* values, const I* indices,
                 int64_t nnz, int64_t cols, bool transpose, T* y, int64_t y_width, int threads) {
  constexpr int64_t kBlock = 8;
  const int64_t blocks = (tokens + kBlock - 1) / kBlock;
  parallel_chunks(blocks, threads, std::max<int64_t>(1, 8192 / (nnz + 1)),
                  [&](int64_t begin, int64_t end, int) {
                    for (int64_t blk = begin; blk < end; ++blk) {
                      const int64_t t0 = blk * kBlock, nt = std::min(kBlock, tokens - t0);
                      std::fill(y + t0 * y_width, y + (t0 + nt) * y_width, T(0));
                      for (int64_t k = 0; k < nnz; ++k) {
                        const int64_t row = int64_t(indices[k]) / cols;
                        const int64_t col = int64_t(indices[k]) - row * cols;
                        const int64_t from = transpose ? row : col, to = transpose ? col : row;
                        const T v = values[k];
                        for (int64_t u = 0; u < nt; ++u)
                          y[(t0 + u) * y_width + to] += v * x[(t0 + u) * x_width + from];
                      }
                    }
                  });
}

// g[k] = sum_t dy[t, row_k] x[t, col_k]; parallel over nonzeros, tokens inner (the
// factored path runs at small token counts, where dy and x stay in cache).
template <typename T, typename I>
void sampled_dot(const T* dy, const T* x, int64_t tokens, int64_t out, int64_t in, const I* indices,
                 int64_t nnz, T* g, int threads) {
  parallel_chunks(nnz, threads, 256, [&](int64_t begin, int64_t end, int) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t row = int64_t(indices[k]) / in, col = int64_t(indices[k]) - row * in;
      T sum = T(0);
      for (int64_t t = 0; t < tokens; ++t) sum += dy[t * out + row] * x[t * in + col];
      g[k] = sum;
    }
  });
}

}  // namespace

void bind_sltrain(py::module_& m) {
  m.def(
      "sltrain_rebuild",
      [](int dtype, int index_code, std::uintptr_t b, std::uintptr_t a, std::uintptr_t values,
         std::uintptr_t indices, int64_t nnz, double scale, std::uintptr_t w, int64_t out,
         int64_t in, int rank, int threads) {
        dispatch_cpu_float(static_cast<DType>(dtype), [&](auto tag) {
          using T = decltype(tag);
          dispatch_index(index_code, [&](auto itag) {
            using I = decltype(itag);
            rebuild<T, I>(out, in, rank, as_ptr<const T>(b), as_ptr<const T>(a),
                          as_ptr<const T>(values), as_ptr<const I>(indices), nnz, scale,
                          as_ptr<T>(w), threads);
          });
        });
      },
      py::call_guard<py::gil_scoped_release>(), "W = scale * B A + S in one pass.");
  m.def(
      "sltrain_scatter",
      [](int dtype, int index_code, std::uintptr_t values, std::uintptr_t indices, int64_t nnz,
         std::uintptr_t w, int threads) {
        dispatch_cpu_float(static_cast<DType>(dtype), [&](auto tag) {
          using T = decltype(tag);
          dispatch_index(index_code, [&](auto itag) {
            using I = decltype(itag);
            scatter_add<T, I>(as_ptr<const T>(values), as_ptr<const I>(indices), nnz, as_ptr<T>(w),
                              threads);
          });
        });
      },
      py::call_guard<py::gil_scoped_release>(), "W[indices] += values in place.");
  m.def(
      "sparse_rows",
      [](int dtype, int index_code, std::uintptr_t x, int64_t tokens, int64_t x_width,
         std::uintptr_t values, std::uintptr_t indices, int64_t nnz, int64_t cols, bool transpose,
         std::uintptr_t y, int64_t y_width, int threads) {
        dispatch_cpu_float(static_cast<DType>(dtype), [&](auto tag) {
          using T = decltype(tag);
          dispatch_index(index_code, [&](auto itag) {
            using I = decltype(itag);
            sparse_rows<T, I>(as_ptr<const T>(x), tokens, x_width, as_ptr<const T>(values),
                              as_ptr<const I>(indices), nnz, cols, transpose, as_ptr<T>(y), y_width,
                              threads);
          });
        });
      },
      py::call_guard<py::gil_scoped_release>(), "x S^T (or x S with transpose) per token.");
  m.def(
      "sampled_dot",
      [](int dtype, int index_code, std::uintptr_t dy, std::uintptr_t x, int64_t tokens,
         int64_t out, int64_t in, std::uintptr_t indices, int64_t nnz, std::uintptr_t g,
         int threads) {
        dispatch_cpu_float(static_cast<DType>(dtype), [&](auto tag) {
          using T = decltype(tag);
          dispatch_index(index_code, [&](auto itag) {
            using I = decltype(itag);
            sampled_dot<T, I>(as_ptr<const T>(dy), as_ptr<const T>(x), tokens, out, in,
                              as_ptr<const I>(indices), nnz, as_ptr<T>(g), threads);
          });
        });
      },
      py::call_guard<py::gil_scoped_release>(), "g[k] = sum_t dy[t, row_k] x[t, col_k].");
}

}  // namespace lowrank
