// Random sketches for randomized SVD (CPU): counter-based test matrices, the
// subsampled randomized Hadamard transform and sparse sign embeddings.
//
// philox_fill: out[e] = N(0, 1), +-1 or U(0, 1] draw number `e` of (seed, stream)
//   (philox.h), so the matrix is the same on every device and thread layout.
// srht_rows: for each row x of A (n wide), y = scale * (H_{n2} (x * d))[cols]: the
//   rows of A D H S for random signs d, the Walsh-Hadamard matrix H of size
//   n2 = 2^ceil(log2 n) (x zero-padded) and l sampled columns (Woolfe, Liberty,
//   Rokhlin, Tygert 2008). Fast Walsh-Hadamard transform: n2 log2 n2 additions.
// sparse_sign_rows: for each row x of A, y[cols[j, t]] += signs[j, t] * x[j]: the
//   rows of A S for an n x l sparse sign matrix with z nonzeros per row
//   (Clarkson & Woodruff 2013; Tropp et al. 2019). n * z multiply-adds per row.
//
// Speed floors: philox_fill writes its output once (about 10 rounds of integer
// multiplies per 4 values); srht_rows reads A once and writes rows x l;
// sparse_sign_rows reads A once. All three are parallel over rows.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "lowrank/common.h"
#include "lowrank/cpu.h"
#include "lowrank/philox.h"

namespace py = pybind11;

namespace lowrank {
namespace {

enum class Distribution : int { Normal = 0, Sign = 1, Uniform = 2 };

// One Philox call gives four values (two Box-Muller pairs for normals), so the
// loop runs over groups of four elements.
template <typename T>
void philox_fill(T* out, int64_t n, Distribution kind, uint64_t seed, uint64_t stream,
                 int threads) {
  if (kind == Distribution::Sign) {
    parallel_chunks(n, threads, 4096, [&](int64_t begin, int64_t end, int) {
      for (int64_t e = begin; e < end; ++e) out[e] = T(sign_at(uint64_t(e), stream, seed));
    });
    return;
  }
  const int64_t groups = (n + 3) / 4;
  parallel_chunks(groups, threads, 1024, [&](int64_t begin, int64_t end, int) {
    for (int64_t g = begin; g < end; ++g) {
      const Philox4 r = philox4x32(uint64_t(g), stream, seed);
      // Box-Muller in the output's precision (float math for float32 output).
      T v[4];
      for (int lane = 0; lane < 4; ++lane) v[lane] = T(uniform_open_closed(r.v[lane]));
      if (kind == Distribution::Normal) {
        for (int pair = 0; pair < 4; pair += 2) {
          const T radius = std::sqrt(T(-2) * std::log(v[pair]));
          const T angle = T(6.283185307179586) * v[pair + 1];
          v[pair] = radius * std::cos(angle);
          v[pair + 1] = radius * std::sin(angle);
        }
      }
      for (int lane = 0; lane < 4 && 4 * g + lane < n; ++lane) out[4 * g + lane] = v[lane];
    }
  });
}

// In-place fast Walsh-Hadamard transform of x[0, n2), n2 a power of two (unnormalised).
template <typename T>
void walsh_hadamard(T* x, int64_t n2) {
  for (int64_t h = 1; h < n2; h *= 2)
    for (int64_t i = 0; i < n2; i += 2 * h)
#pragma omp simd
      for (int64_t j = i; j < i + h; ++j) {
        const T a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
}

template <typename T>
void srht_rows(const T* a, int64_t rows, int64_t n, const T* signs, const int64_t* cols, int64_t l,
               int64_t n2, double scale, T* out, int threads) {
  parallel_chunks(rows, threads, 1, [&](int64_t begin, int64_t end, int) {
    std::vector<T> buffer(static_cast<size_t>(n2));
    for (int64_t row = begin; row < end; ++row) {
      const T* x = a + row * n;
      for (int64_t j = 0; j < n; ++j) buffer[j] = x[j] * signs[j];
      for (int64_t j = n; j < n2; ++j) buffer[j] = T(0);
      walsh_hadamard(buffer.data(), n2);
      T* y = out + row * l;
      for (int64_t c = 0; c < l; ++c) y[c] = T(scale) * buffer[cols[c]];
    }
  });
}

template <typename T>
void sparse_sign_rows(const T* a, int64_t rows, int64_t n, const int32_t* cols, const T* signs,
                      int64_t nonzeros, int64_t l, T* out, int threads) {
  parallel_chunks(rows, threads, 1, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      const T* x = a + row * n;
      T* y = out + row * l;
      for (int64_t c = 0; c < l; ++c) y[c] = T(0);
      for (int64_t j = 0; j < n; ++j) {
        const T v = x[j];
        for (int64_t t = 0; t < nonzeros; ++t)
          y[cols[j * nonzeros + t]] += signs[j * nonzeros + t] * v;
      }
    }
  });
}

}  // namespace

void bind_sketch(py::module_& m) {
  m.def(
      "philox_fill",
      [](int dtype, std::uintptr_t out, int64_t n, int kind, uint64_t seed, uint64_t stream,
         int threads) {
        dispatch_cpu_float(static_cast<DType>(dtype), [&](auto tag) {
          using T = decltype(tag);
          philox_fill(as_ptr<T>(out), n, static_cast<Distribution>(kind), seed, stream, threads);
        });
      },
      py::call_guard<py::gil_scoped_release>(),
      "out[e] = draw e of (seed, stream): kind 0 normal, 1 sign, 2 uniform (0, 1].");
  m.def(
      "srht_rows",
      [](int dtype, std::uintptr_t a, int64_t rows, int64_t n, std::uintptr_t signs,
         std::uintptr_t cols, int64_t l, int64_t n2, double scale, std::uintptr_t out,
         int threads) {
        dispatch_cpu_float(static_cast<DType>(dtype), [&](auto tag) {
          using T = decltype(tag);
          srht_rows(as_ptr<const T>(a), rows, n, as_ptr<const T>(signs),
                    as_ptr<const int64_t>(cols), l, n2, scale, as_ptr<T>(out), threads);
        });
      },
      py::call_guard<py::gil_scoped_release>(), "Rows of scale * A D H S (see cpp/sketch.cpp).");
  m.def(
      "sparse_sign_rows",
      [](int dtype, std::uintptr_t a, int64_t rows, int64_t n, std::uintptr_t cols,
         std::uintptr_t signs, int64_t nonzeros, int64_t l, std::uintptr_t out, int threads) {
        dispatch_cpu_float(static_cast<DType>(dtype), [&](auto tag) {
          using T = decltype(tag);
          sparse_sign_rows(as_ptr<const T>(a), rows, n, as_ptr<const int32_t>(cols),
                           as_ptr<const T>(signs), nonzeros, l, as_ptr<T>(out), threads);
        });
      },
      py::call_guard<py::gil_scoped_release>(), "Rows of A S for a sparse sign matrix S.");
}

}  // namespace lowrank
