// Monarch products (Dao et al., "Monarch: Expressive structured matrices for
// efficient and accurate training", ICML 2022), fused per token block (CPU).
//
// Layout of the original code (x: (T, k*p), w1: (k, q, p), w2: (l, s, r), l*r == k*q):
//   h[t, kk*q + qq] = sum_pp w1[kk, qq, pp] x[t, kk*p + pp]        block-diagonal 1
//   y[t, ss*l + ll] = sum_rr w2[ll, ss, rr] h[t, rr*l + ll]         stride-l shuffle, block 2
// The intermediate h of a block of tokens lives in a thread-local buffer sized
// for L2: x is read once and y written once, with no shuffle copies in memory.
// Per block of tokens every product is a GEMM with the tokens as rows, so the
// register tiles of small_gemm.h run on tall operands; the stride-l columns of
// stage 2 are read through the A-operand strides and written through a tile.
//
// Backward (dy given, h recomputed rather than saved):
//   dh[t, rr*l + ll] = sum_ss w2[ll, ss, rr] dy[t, ss*l + ll]
//   dw2[ll] += dy_ll^T h_ll,  dx[t, kk*p + pp] = sum_qq w1[kk, qq, pp] dh[t, kk*q + qq]
//   dw1[kk] += dh_kk^T x_kk
// Five token-deep products against two for forward; the two-bmm reference does
// six and keeps h alive between passes.
//
// Speed floor (float32, n = 1024, 32 blocks of 32, 4096 tokens): forward moves
// 32 MiB and does 0.54 GFLOP; lowrank/bench/bench_monarch.py reports the fraction.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "lowrank/common.h"
#include "lowrank/cpu.h"
#include "lowrank/small_gemm.h"

namespace py = pybind11;

namespace lowrank {
namespace {

struct MonarchShape {
  int64_t tokens;
  int k, q, p, l, s, r;
  int64_t in() const { return int64_t(k) * p; }
  int64_t mid() const { return int64_t(k) * q; }
  int64_t out() const { return int64_t(l) * s; }
  // Tokens per block: h for the block stays near 128 KiB (in L2), and at least 16 tokens
  // make the rows of every product.
  template <typename T>
  int64_t block(int64_t tokens_in_chunk) const {
    const int64_t fit = (128 * 1024 / int64_t(sizeof(T))) / std::max<int64_t>(1, mid());
    return std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(fit, 16), tokens_in_chunk));
  }
};

// h rows [t0, t0 + nb) of stage 1: for every block kk, (nb x p) . w1[kk]^T (p x q).
template <class Cfg, typename T>
LOWRANK_ALWAYS_INLINE void stage1(const MonarchShape& sh, const T* x, const T* w1t, int64_t nb,
                                  T* h) {
  for (int kk = 0; kk < sh.k; ++kk)
    gemm<Cfg, T>(int(nb), sh.q, sh.p, x + kk * sh.p, sh.in(), 1, w1t + int64_t(kk) * sh.p * sh.q,
                 sh.q, h + int64_t(kk) * sh.q, sh.mid(), false);
}

template <class Cfg, typename T>
LOWRANK_ALWAYS_INLINE void forward_tokens(const MonarchShape& sh, int64_t t0, int64_t t1,
                                          const T* x, const T* w1t, const T* w2t, T* y) {
  const int64_t tb = sh.block<T>(t1 - t0);
  std::vector<T> h(size_t(tb * sh.mid())), tile(size_t(tb * sh.s));
  for (int64_t t = t0; t < t1; t += tb) {
    const int64_t nb = std::min(tb, t1 - t);
    stage1<Cfg, T>(sh, x + t * sh.in(), w1t, nb, h.data());
    for (int ll = 0; ll < sh.l; ++ll) {
      // (nb x r) . w2[ll]^T (r x s); A(t, rr) = h[t, rr*l + ll]
      gemm<Cfg, T>(int(nb), sh.s, sh.r, h.data() + ll, sh.mid(), sh.l,
                   w2t + int64_t(ll) * sh.r * sh.s, sh.s, tile.data(), sh.s, false);
      T* yb = y + t * sh.out() + ll;
      for (int64_t u = 0; u < nb; ++u)
        for (int ss = 0; ss < sh.s; ++ss)
          yb[u * sh.out() + int64_t(ss) * sh.l] = tile[u * sh.s + ss];
    }
  }
}

template <class Cfg, typename T>
LOWRANK_ALWAYS_INLINE void backward_tokens(const MonarchShape& sh, int64_t t0, int64_t t1,
                                           const T* dy, const T* x, const T* w1, const T* w1t,
                                           const T* w2, T* dx, T* dw1, T* dw2) {
  const int64_t tb = sh.block<T>(t1 - t0);
  std::vector<T> h(dw2 ? size_t(tb * sh.mid()) : 0), dh(size_t(tb * sh.mid()));
  std::vector<T> dy_ll(size_t(tb * sh.s)), h_ll(dw2 ? size_t(tb * sh.r) : 0);
  std::vector<T> dh_ll(size_t(tb * sh.r));
  for (int64_t t = t0; t < t1; t += tb) {
    const int64_t nb = std::min(tb, t1 - t);
    const T* xb = x + t * sh.in();
    if (dw2) stage1<Cfg, T>(sh, xb, w1t, nb, h.data());
    for (int ll = 0; ll < sh.l; ++ll) {
      // Gather the stride-l columns of this block into contiguous tiles.
      const T* dyb = dy + t * sh.out() + ll;
      for (int64_t u = 0; u < nb; ++u)
        for (int ss = 0; ss < sh.s; ++ss)
          dy_ll[u * sh.s + ss] = dyb[u * sh.out() + int64_t(ss) * sh.l];
      // dh_ll (nb x r) = dy_ll (nb x s) . w2[ll] (s x r)
      gemm<Cfg, T>(int(nb), sh.r, sh.s, dy_ll.data(), sh.s, 1, w2 + int64_t(ll) * sh.s * sh.r, sh.r,
                   dh_ll.data(), sh.r, false);
      for (int64_t u = 0; u < nb; ++u)
        for (int rr = 0; rr < sh.r; ++rr)
          dh[u * sh.mid() + int64_t(rr) * sh.l + ll] = dh_ll[u * sh.r + rr];
      if (dw2) {
        for (int64_t u = 0; u < nb; ++u)
          for (int rr = 0; rr < sh.r; ++rr)
            h_ll[u * sh.r + rr] = h[u * sh.mid() + int64_t(rr) * sh.l + ll];
        // dw2[ll] (s x r) += dy_ll^T (s x nb) . h_ll (nb x r)
        gemm<Cfg, T>(sh.s, sh.r, int(nb), dy_ll.data(), 1, sh.s, h_ll.data(), sh.r,
                     dw2 + int64_t(ll) * sh.s * sh.r, sh.r, true);
      }
    }
    for (int kk = 0; kk < sh.k; ++kk) {
      const T* dh_kk = dh.data() + int64_t(kk) * sh.q;
      // dx rows: (nb x q) . w1[kk] (q x p)
      if (dx)
        gemm<Cfg, T>(int(nb), sh.p, sh.q, dh_kk, sh.mid(), 1, w1 + int64_t(kk) * sh.q * sh.p, sh.p,
                     dx + t * sh.in() + int64_t(kk) * sh.p, sh.in(), false);
      // dw1[kk] (q x p) += dh_kk^T (q x nb) . x_kk (nb x p)
      if (dw1)
        gemm<Cfg, T>(sh.q, sh.p, int(nb), dh_kk, 1, sh.mid(), xb + int64_t(kk) * sh.p, sh.in(),
                     dw1 + int64_t(kk) * sh.q * sh.p, sh.p, true);
    }
  }
}

#define LOWRANK_MONARCH_ENTRIES(SUFFIX, TARGET, CFG)                                               \
  template <typename T>                                                                            \
  TARGET void forward_##SUFFIX(const MonarchShape& sh, int64_t t0, int64_t t1, const T* x,         \
                               const T* w1t, const T* w2t, T* y) {                                 \
    forward_tokens<CFG, T>(sh, t0, t1, x, w1t, w2t, y);                                            \
  }                                                                                                \
  template <typename T>                                                                            \
  TARGET void backward_##SUFFIX(const MonarchShape& sh, int64_t t0, int64_t t1, const T* dy,       \
                                const T* x, const T* w1, const T* w1t, const T* w2, T* dx, T* dw1, \
                                T* dw2) {                                                          \
    backward_tokens<CFG, T>(sh, t0, t1, dy, x, w1, w1t, w2, dx, dw1, dw2);                         \
  }

LOWRANK_MONARCH_ENTRIES(base, , TileBase)
#if LOWRANK_HAS_ISA_TARGETS
LOWRANK_MONARCH_ENTRIES(avx2, LOWRANK_TARGET_AVX2, TileAvx2)
LOWRANK_MONARCH_ENTRIES(avx512, LOWRANK_TARGET_AVX512, TileAvx512)
#endif

int64_t token_grain(const MonarchShape& sh) {
  const int64_t per_token = sh.mid() * (sh.p + sh.r) + 1;
  return std::max<int64_t>(1, 200000 / per_token);
}

template <typename T>
void forward(const MonarchShape& sh, const T* x, const T* w1, const T* w2, T* y, int threads) {
  const std::vector<T> w1t = transpose_blocks(w1, sh.k, sh.q, sh.p);
  const std::vector<T> w2t = transpose_blocks(w2, sh.l, sh.s, sh.r);
  const Isa isa = cpu_isa();
  parallel_chunks(sh.tokens, threads, token_grain(sh), [&](int64_t t0, int64_t t1, int) {
#if LOWRANK_HAS_ISA_TARGETS
    if (isa == Isa::Avx512) return forward_avx512<T>(sh, t0, t1, x, w1t.data(), w2t.data(), y);
    if (isa == Isa::Avx2) return forward_avx2<T>(sh, t0, t1, x, w1t.data(), w2t.data(), y);
#endif
    forward_base<T>(sh, t0, t1, x, w1t.data(), w2t.data(), y);
  });
}

template <typename T>
void backward(const MonarchShape& sh, const T* dy, const T* x, const T* w1, const T* w2, T* dx,
              T* dw1, T* dw2, int threads) {
  const std::vector<T> w1t = transpose_blocks(w1, sh.k, sh.q, sh.p);
  const Isa isa = cpu_isa();
  const size_t n1 = size_t(sh.k) * sh.q * sh.p, n2 = size_t(sh.l) * sh.s * sh.r;
  if (dw1) std::fill(dw1, dw1 + n1, T(0));
  if (dw2) std::fill(dw2, dw2 + n2, T(0));
  std::mutex reduce;
  parallel_chunks(sh.tokens, threads, token_grain(sh), [&](int64_t t0, int64_t t1, int) {
    std::vector<T> dw1_local(dw1 ? n1 : 0, T(0)), dw2_local(dw2 ? n2 : 0, T(0));
    T* d1 = dw1 ? dw1_local.data() : nullptr;
    T* d2 = dw2 ? dw2_local.data() : nullptr;
#if LOWRANK_HAS_ISA_TARGETS
    if (isa == Isa::Avx512)
      backward_avx512<T>(sh, t0, t1, dy, x, w1, w1t.data(), w2, dx, d1, d2);
    else if (isa == Isa::Avx2)
      backward_avx2<T>(sh, t0, t1, dy, x, w1, w1t.data(), w2, dx, d1, d2);
    else
#endif
      backward_base<T>(sh, t0, t1, dy, x, w1, w1t.data(), w2, dx, d1, d2);
    std::lock_guard<std::mutex> lock(reduce);
    for (size_t i = 0; i < dw1_local.size(); ++i) dw1[i] += dw1_local[i];
    for (size_t i = 0; i < dw2_local.size(); ++i) dw2[i] += dw2_local[i];
  });
}

}  // namespace

void bind_monarch(py::module_& m) {
  m.def(
      "monarch_matmul",
      [](int dtype, std::uintptr_t x, std::uintptr_t w1, std::uintptr_t w2, std::uintptr_t y,
         int64_t tokens, int k, int q, int p, int l, int s, int r, int threads) {
        const MonarchShape sh{tokens, k, q, p, l, s, r};
        dispatch_cpu_float(static_cast<DType>(dtype), [&](auto tag) {
          using T = decltype(tag);
          forward<T>(sh, as_ptr<const T>(x), as_ptr<const T>(w1), as_ptr<const T>(w2), as_ptr<T>(y),
                     threads);
        });
      },
      py::call_guard<py::gil_scoped_release>(), "Monarch product (see cpp/monarch.cpp).");
  m.def(
      "monarch_matmul_backward",
      [](int dtype, std::uintptr_t dy, std::uintptr_t x, std::uintptr_t w1, std::uintptr_t w2,
         std::uintptr_t dx, std::uintptr_t dw1, std::uintptr_t dw2, int64_t tokens, int k, int q,
         int p, int l, int s, int r, int threads) {
        const MonarchShape sh{tokens, k, q, p, l, s, r};
        dispatch_cpu_float(static_cast<DType>(dtype), [&](auto tag) {
          using T = decltype(tag);
          backward<T>(sh, as_ptr<const T>(dy), as_ptr<const T>(x), as_ptr<const T>(w1),
                      as_ptr<const T>(w2), as_ptr<T>(dx), as_ptr<T>(dw1), as_ptr<T>(dw2), threads);
        });
      },
      py::call_guard<py::gil_scoped_release>(),
      "Gradients of monarch_matmul; a zero address skips that gradient.");
}

}  // namespace lowrank
