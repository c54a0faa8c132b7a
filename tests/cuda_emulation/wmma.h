// nvcuda::wmma on the CPU, for kernels run under emulate.h.
//
// CUDA leaves the mapping of a fragment's elements to the lanes of a warp
// unspecified, so here every lane holds the whole tile: load_matrix_sync and
// mma_sync compute the full tile in each emulated thread (float32 accumulation,
// in k order), which is a legal implementation of the API. store_matrix_sync
// writes the tile cooperatively without races, lane L the elements whose
// row-major index is congruent to 31 - L modulo 32: a kernel that reads what it
// stored through a natural lane stride (element L + 32 k by lane L) without
// __syncwarp first reads poison. A kernel that touches fragments only through the
// API therefore sees exactly the semantics it gets on a GPU; one that assumes an
// element-to-lane mapping breaks here.
//
// Each *_sync call checks what the CUDA programming guide requires: a 256-bit
// (32-byte) aligned pointer, ldm a multiple of 16 bytes (8 elements of a 16-bit
// type, 4 of float), and the call made by every lane of the warp with the same
// arguments; as the guide says, it waits until all lanes of the warp have arrived
// (emulate.h's warp barrier, which checks the lanes' calls).
#pragma once

#include <cstddef>
#include <cstdint>
#include <source_location>
#include <string>

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

// The guide's rules for load_matrix_sync and store_matrix_sync, and the warp-wide record.
template <class T>
inline void check_matrix(const char* operation, const T* ptr, unsigned ldm, int layout,
                         const std::source_location& site) {
  const std::string call = emulation::where(site) + ": " + operation;
  if (reinterpret_cast<std::uintptr_t>(ptr) % 32 != 0)
    emulation::fail(call + ": pointer not 32-byte (256-bit) aligned");
  if (ldm * sizeof(T) % 16 != 0)
    emulation::fail(call + ": ldm " + std::to_string(ldm) + " is not a multiple of " +
                    std::to_string(16 / sizeof(T)) + " elements (16 bytes)");
  emulation::warp_call(operation, ptr, ldm, layout, site);
}
}  // namespace detail

// Elements are held as float32 (exact for float16 and bfloat16 values), so mma_sync does no
// conversions; the kernels never touch x directly.
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = detail::extent<Use, M, N, K>::rows;
  static constexpr int cols = detail::extent<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];  // row-major (element (i, j) at i * cols + j), whatever Layout says
};

template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (int e = 0; e < f.num_elements; ++e) f.x[e] = detail::as_float(value);
}

// matrix_a / matrix_b: the layout is part of the fragment type.
template <class Use, int M, int N, int K, class T, class Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* ptr, unsigned ldm,
                             const std::source_location& site = std::source_location::current()) {
  constexpr bool row = std::is_same_v<Layout, row_major>;
  static_assert(row || std::is_same_v<Layout, col_major>, "matrix_a/b need a layout");
  detail::check_matrix("load_matrix_sync", ptr, ldm, row ? 0 : 1, site);
  for (int i = 0; i < f.rows; ++i)
    for (int j = 0; j < f.cols; ++j)
      f.x[i * f.cols + j] =
          detail::as_float(row ? ptr[std::size_t(i) * ldm + j] : ptr[std::size_t(j) * ldm + i]);
}

// accumulator: the layout is given at the call.
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* ptr, unsigned ldm,
                             layout_t layout,
                             const std::source_location& site = std::source_location::current()) {
  detail::check_matrix("load_matrix_sync", ptr, ldm, int(layout), site);
  for (int i = 0; i < f.rows; ++i)
    for (int j = 0; j < f.cols; ++j)
      f.x[i * f.cols + j] =
          layout == mem_row_major ? ptr[std::size_t(i) * ldm + j] : ptr[std::size_t(j) * ldm + i];
}

template <int M, int N, int K, class T>
inline void store_matrix_sync(T* ptr, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                              layout_t layout,
                              const std::source_location& site = std::source_location::current()) {
  detail::check_matrix("store_matrix_sync", static_cast<const T*>(ptr), ldm, int(layout), site);
  const int lane = int(threadIdx.x % 32);
  for (int e = 31 - lane; e < f.num_elements; e += 32) {
    const int i = e / f.cols, j = e % f.cols;
    if (layout == mem_row_major)
      ptr[std::size_t(i) * ldm + j] = f.x[e];
    else
      ptr[std::size_t(j) * ldm + i] = f.x[e];
  }
}

// d = a b + c, float32 accumulation, each element's sum in k order.
template <int M, int N, int K, class TA, class LA, class TB, class LB, class TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d,
                     const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b,
                     const fragment<accumulator, M, N, K, TC>& c,
                     const std::source_location& site = std::source_location::current()) {
  emulation::warp_call("mma_sync", nullptr, 0, 0, site);
  float out[M * N];
  for (int e = 0; e < M * N; ++e) out[e] = c.x[e];
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k) {
      const float aik = a.x[i * K + k];
      for (int j = 0; j < N; ++j) out[i * N + j] += aik * b.x[k * N + j];
    }
  for (int e = 0; e < M * N; ++e) d.x[e] = out[e];
}

}  // namespace wmma
}  // namespace nvcuda
