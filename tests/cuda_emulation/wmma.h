// nvcuda::wmma on the CPU, for kernels run under emulate.h.
//
// CUDA leaves the mapping of a fragment's elements to the lanes of a warp
// unspecified, so here every lane holds the whole tile: load_matrix_sync and
// mma_sync compute the full tile in each emulated thread (float32 accumulation,
// in k order), which is a legal implementation of the API. store_matrix_sync
// writes the tile cooperatively without races: lane L stores the elements whose
// row-major index is congruent to L modulo 32. A kernel that touches fragments
// only through the API therefore sees exactly the semantics it gets on a GPU;
// one that assumes an element-to-lane mapping breaks here.
#pragma once

#include <cstddef>

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <class Use, int M, int N, int K>
struct extent;
template <int M, int N, int K>
struct extent<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct extent<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct extent<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};
inline float as_float(float v) {
  return v;
}
inline float as_float(__half v) {
  return __half2float(v);
}
inline float as_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = detail::extent<Use, M, N, K>::rows;
  static constexpr int cols = detail::extent<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];  // row-major (element (i, j) at i * cols + j), whatever Layout says
};

template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = value;
}

// matrix_a / matrix_b: the layout is part of the fragment type.
template <class Use, int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr, unsigned ldm) {
  constexpr bool row = std::is_same_v<Layout, row_major>;
  static_assert(row || std::is_same_v<Layout, col_major>, "matrix_a/b need a layout");
  for (int i = 0; i < f.rows; ++i)
    for (int j = 0; j < f.cols; ++j)
      f.x[i * f.cols + j] = row ? ptr[std::size_t(i) * ldm + j] : ptr[std::size_t(j) * ldm + i];
}

// accumulator: the layout is given at the call.
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* ptr, unsigned ldm,
                             layout_t layout) {
  for (int i = 0; i < f.rows; ++i)
    for (int j = 0; j < f.cols; ++j)
      f.x[i * f.cols + j] =
          layout == mem_row_major ? ptr[std::size_t(i) * ldm + j] : ptr[std::size_t(j) * ldm + i];
}

template <int M, int N, int K, class T>
inline void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                              layout_t layout) {
  const int lane = int(threadIdx.x % 32);
  for (int e = lane; e < f.num_elements; e += 32) {
    const int i = e / f.cols, j = e % f.cols;
    if (layout == mem_row_major)
      ptr[std::size_t(i) * ldm + j] = f.x[e];
    else
      ptr[std::size_t(j) * ldm + i] = f.x[e];
  }
}

// d = a b + c, float32 accumulation.
template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d,
                     const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b,
                     const fragment<accumulator, M, N, K, TC>& c) {
  TC out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float sum = c.x[i * N + j];
      for (int k = 0; k < K; ++k)
        sum += detail::as_float(a.x[i * K + k]) * detail::as_float(b.x[k * N + j]);
      out[i * N + j] = sum;
    }
  for (int e = 0; e < M * N; ++e) d.x[e] = out[e];
}

}  // namespace wmma
}  // namespace nvcuda
