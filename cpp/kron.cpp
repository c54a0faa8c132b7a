// Kronecker-factored matrix product, fused per token block (CPU).
//
//   y = x @ kron(a, b)^T,  x: (T, q*s), a: (p, q), b: (r, s), y: (T, p*r)
//
// Viewing one token's x as X (q x s) row-major, kron(a, b) vec(X) = vec(a X b^T),
// so each token is two small products and no n x n matrix is formed. The two
// orders cost T*(q*s*r + p*q*r) ("b first": Z = X b^T, Y = a Z) or
// T*(p*q*s + p*s*r) ("a first": W = a X, Y = W b^T) multiply-adds; the cheaper
// one runs. One of the two products is done for a block of tokens at once, as
// one tall GEMM; the per-token intermediate stays in a thread-local buffer
// sized for L2, so memory traffic is x read once and y written once.
//
// Backward, for dY (T, p*r) viewed per token as p x r:
//   G  = a^T dY         (q x r)   shared by dX and db
//   dX = G b            (q x s)   one tall product per token block
//   db += G^T X         (r x s)   one product over K = tokens*q per block
//   Z  = X b^T          (q x r)   recomputed, never saved by forward; one tall product
//   da += dY Z^T        (p x q)   dot products along r, accumulated over the block
// Five small products per token against two for forward; stacking G and Z over
// a block of tokens turns the two weight-gradient sums into long products.
// da and db are accumulated per thread and reduced once.
//
// Speed floor (float32, 2-core AVX-512 machine, in=out=1024, 32x32 factors,
// 4096 tokens): forward moves 32 MiB and does 0.54 GFLOP, backward 48 MiB and
// 1.34 GFLOP; lowrank/bench/bench_kron.py reports the measured fraction.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "lowrank/common.h"
#include "lowrank/cpu.h"
#include "lowrank/small_gemm.h"

namespace py = pybind11;

namespace lowrank {
namespace {

struct KronShape {
  int64_t tokens;
  int p, q, r, s;
  bool b_first() const {
    // Multiply-adds per token of the two orders; ties go to "b first", whose
    // tall GEMM reads x contiguously.
    const int64_t cost_b_first = int64_t(q) * s * r + int64_t(p) * q * r;
    const int64_t cost_a_first = int64_t(p) * q * s + int64_t(p) * s * r;
    return cost_b_first <= cost_a_first;
  }
};

// Tokens per block: the block's intermediates stay near `budget` bytes (64 KiB,
// in L2 with room to spare), and no more tokens than the chunk has.
template <typename T>
int64_t token_block(int64_t per_token_elems, int64_t tokens, int64_t budget = 64 * 1024) {
  const int64_t fit = (budget / int64_t(sizeof(T))) / std::max<int64_t>(1, per_token_elems);
  return std::max<int64_t>(1, std::min(fit, tokens));
}

// y rows [t, t + n) start as a copy of the addend's (when there is one), so the
// last product of each block accumulates onto them in cache: no second pass.
template <typename T>
LOWRANK_ALWAYS_INLINE bool start_rows(T* y, const T* addend, int64_t t, int64_t n, int64_t out) {
  if (addend == nullptr) return false;
  if (addend != y) std::memcpy(y + t * out, addend + t * out, sizeof(T) * size_t(n * out));
  return true;
}

template <class Cfg, typename T>
LOWRANK_ALWAYS_INLINE void forward_tokens(const KronShape& sh, int64_t t0, int64_t t1, const T* x,
                                          const T* a, const T* bt, const T* addend, T* y) {
  const int p = sh.p, q = sh.q, r = sh.r, s = sh.s;
  const int64_t in = int64_t(q) * s, out = int64_t(p) * r;
  if (sh.b_first()) {
    const int64_t tb = token_block<T>(int64_t(q) * r, t1 - t0);
    std::vector<T> z(static_cast<size_t>(tb * q * r));
    for (int64_t t = t0; t < t1; t += tb) {
      const int64_t nb = std::min(tb, t1 - t);
      // Z rows for the whole block: (nb*q x s) . (s x r)
      gemm<Cfg, T>(int(nb * q), r, s, x + t * in, s, 1, bt, r, z.data(), r, false);
      const bool add = start_rows(y, addend, t, nb, out);
      for (int64_t u = 0; u < nb; ++u)
        gemm<Cfg, T>(p, r, q, a, q, 1, z.data() + u * q * r, r, y + (t + u) * out, r, add);
    }
  } else {
    const int64_t tb = token_block<T>(int64_t(p) * s, t1 - t0);
    std::vector<T> w(static_cast<size_t>(tb * p * s));
    for (int64_t t = t0; t < t1; t += tb) {
      const int64_t nb = std::min(tb, t1 - t);
      for (int64_t u = 0; u < nb; ++u)
        gemm<Cfg, T>(p, s, q, a, q, 1, x + (t + u) * in, s, w.data() + u * p * s, s, false);
      // Y rows for the whole block: (nb*p x s) . (s x r)
      const bool add = start_rows(y, addend, t, nb, out);
      gemm<Cfg, T>(int(nb * p), r, s, w.data(), s, 1, bt, r, y + t * out, r, add);
    }
  }
}

template <class Cfg, typename T>
LOWRANK_ALWAYS_INLINE void backward_tokens(const KronShape& sh, int64_t t0, int64_t t1, const T* dy,
                                           const T* x, const T* a, const T* b, const T* bt, T* dx,
                                           T* da, T* db) {
  const int p = sh.p, q = sh.q, r = sh.r, s = sh.s;
  const int64_t in = int64_t(q) * s, out = int64_t(p) * r;
  const bool need_g = dx != nullptr || db != nullptr;
  // Per token: G and Z (q x r each), stacked by rows; blocks of ~256 KiB make the
  // batched products below long.
  const int64_t per_token = (need_g ? int64_t(q) * r : 0) + (da ? int64_t(q) * r : 0);
  const int64_t tb = token_block<T>(per_token, t1 - t0, 256 * 1024);
  std::vector<T> g(need_g ? static_cast<size_t>(tb * q * r) : 0);
  std::vector<T> z(da ? static_cast<size_t>(tb * q * r) : 0);
  for (int64_t t = t0; t < t1; t += tb) {
    const int64_t nb = std::min(tb, t1 - t);
    const T* xb = x + t * in;  // the block's X rows stacked: (nb*q, s)
    if (need_g) {
      for (int64_t u = 0; u < nb; ++u)  // G = a^T dY: A(i, k) = a[k, i]
        gemm<Cfg, T>(q, r, p, a, 1, q, dy + (t + u) * out, r, g.data() + u * q * r, r, false);
      // dX rows for the block: (nb*q x r) . (r x s)
      if (dx) gemm<Cfg, T>(int(nb * q), s, r, g.data(), r, 1, b, s, dx + t * in, s, false);
      // db += sum_u G_u^T X_u: one product over K = nb*q
      if (db) gemm<Cfg, T>(r, s, int(nb * q), g.data(), 1, r, xb, s, db, s, true);
    }
    if (da) {
      // Z rows for the whole block: (nb*q x s) . (s x r); then da += sum_u dY_u Z_u^T,
      // dot products along r with no transpose.
      gemm<Cfg, T>(int(nb * q), r, s, xb, s, 1, bt, r, z.data(), r, false);
      gemm_nt_batched<Cfg, T>(p, q, r, nb, dy + t * out, r, out, z.data(), r, int64_t(q) * r, da,
                              q);
    }
  }
}

// One entry point per instruction set: the always-inline templates above are
// compiled into each with that set's vector width.
#define LOWRANK_KRON_ENTRIES(SUFFIX, TARGET, CFG)                                              \
  template <typename T>                                                                        \
  TARGET void forward_##SUFFIX(const KronShape& sh, int64_t t0, int64_t t1, const T* x,        \
                               const T* a, const T* bt, const T* addend, T* y) {               \
    forward_tokens<CFG, T>(sh, t0, t1, x, a, bt, addend, y);                                   \
  }                                                                                            \
  template <typename T>                                                                        \
  TARGET void backward_##SUFFIX(const KronShape& sh, int64_t t0, int64_t t1, const T* dy,      \
                                const T* x, const T* a, const T* b, const T* bt, T* dx, T* da, \
                                T* db) {                                                       \
    backward_tokens<CFG, T>(sh, t0, t1, dy, x, a, b, bt, dx, da, db);                          \
  }

LOWRANK_KRON_ENTRIES(base, , TileBase)
#if LOWRANK_HAS_ISA_TARGETS
LOWRANK_KRON_ENTRIES(avx2, LOWRANK_TARGET_AVX2, TileAvx2)
LOWRANK_KRON_ENTRIES(avx512, LOWRANK_TARGET_AVX512, TileAvx512)
#endif

// Tokens per thread chunk: enough multiply-adds to amortise waking a thread.
int64_t token_grain(const KronShape& sh) {
  const int64_t per_token = int64_t(sh.q) * sh.s * sh.r + int64_t(sh.p) * sh.q * sh.r + 1;
  return std::max<int64_t>(1, 200000 / per_token);
}

template <typename T>
void forward(const KronShape& sh, const T* x, const T* a, const T* b, const T* addend, double scale,
             T* y, int threads) {
  // y = addend + scale * x kron(a, b)^T; the scale is folded into b^T (r*s values).
  std::vector<T> bt = transpose_blocks(b, 1, sh.r, sh.s);
  if (scale != 1.0)
    for (T& v : bt) v *= T(scale);
  const Isa isa = cpu_isa();
  parallel_chunks(sh.tokens, threads, token_grain(sh), [&](int64_t t0, int64_t t1, int) {
#if LOWRANK_HAS_ISA_TARGETS
    if (isa == Isa::Avx512) return forward_avx512<T>(sh, t0, t1, x, a, bt.data(), addend, y);
    if (isa == Isa::Avx2) return forward_avx2<T>(sh, t0, t1, x, a, bt.data(), addend, y);
#endif
    forward_base<T>(sh, t0, t1, x, a, bt.data(), addend, y);
  });
}

template <typename T>
void backward(const KronShape& sh, const T* dy, const T* x, const T* a, const T* b, T* dx, T* da,
              T* db, int threads) {
  const std::vector<T> bt = transpose_blocks(b, 1, sh.r, sh.s);
  const Isa isa = cpu_isa();
  const size_t na = size_t(sh.p) * sh.q, nbsz = size_t(sh.r) * sh.s;
  if (da) std::fill(da, da + na, T(0));
  if (db) std::fill(db, db + nbsz, T(0));
  std::mutex reduce;
  parallel_chunks(sh.tokens, threads, token_grain(sh), [&](int64_t t0, int64_t t1, int) {
    std::vector<T> da_local(da ? na : 0, T(0)), db_local(db ? nbsz : 0, T(0));
    T* da_ptr = da ? da_local.data() : nullptr;
    T* db_ptr = db ? db_local.data() : nullptr;
#if LOWRANK_HAS_ISA_TARGETS
    if (isa == Isa::Avx512)
      backward_avx512<T>(sh, t0, t1, dy, x, a, b, bt.data(), dx, da_ptr, db_ptr);
    else if (isa == Isa::Avx2)
      backward_avx2<T>(sh, t0, t1, dy, x, a, b, bt.data(), dx, da_ptr, db_ptr);
    else
#endif
      backward_base<T>(sh, t0, t1, dy, x, a, b, bt.data(), dx, da_ptr, db_ptr);
    std::lock_guard<std::mutex> lock(reduce);
    for (size_t i = 0; i < da_local.size(); ++i) da[i] += da_local[i];
    for (size_t i = 0; i < db_local.size(); ++i) db[i] += db_local[i];
  });
}

}  // namespace

void bind_kron(py::module_& m) {
  m.def(
      "kron_matmul",
      [](int dtype, std::uintptr_t x, std::uintptr_t a, std::uintptr_t b, std::uintptr_t addend,
         double scale, std::uintptr_t y, int64_t tokens, int p, int q, int r, int s, int threads) {
        const KronShape sh{tokens, p, q, r, s};
        dispatch_cpu_float(static_cast<DType>(dtype), [&](auto tag) {
          using T = decltype(tag);
          forward<T>(sh, as_ptr<const T>(x), as_ptr<const T>(a), as_ptr<const T>(b),
                     as_ptr<const T>(addend), scale, as_ptr<T>(y), threads);
        });
      },
      py::call_guard<py::gil_scoped_release>(),
      "y = addend + scale * x @ kron(a, b)^T for contiguous x (tokens, q*s), a (p, q), b (r, s),\n"
      "addend and y (tokens, p*r); addend 0 means none.");
  m.def(
      "kron_matmul_backward",
      [](int dtype, std::uintptr_t dy, std::uintptr_t x, std::uintptr_t a, std::uintptr_t b,
         std::uintptr_t dx, std::uintptr_t da, std::uintptr_t db, int64_t tokens, int p, int q,
         int r, int s, int threads) {
        const KronShape sh{tokens, p, q, r, s};
        dispatch_cpu_float(static_cast<DType>(dtype), [&](auto tag) {
          using T = decltype(tag);
          backward<T>(sh, as_ptr<const T>(dy), as_ptr<const T>(x), as_ptr<const T>(a),
                      as_ptr<const T>(b), as_ptr<T>(dx), as_ptr<T>(da), as_ptr<T>(db), threads);
        });
      },
      py::call_guard<py::gil_scoped_release>(),
      "Gradients of kron_matmul; a zero address skips that gradient.");
}

}  // namespace lowrank
