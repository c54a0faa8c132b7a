// Counter-based random numbers (Philox4x32-10; Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC 2011), usable in host and device code.
//
// A random test matrix is a pure function of (seed, element index): element e
// of a stream draws from counter (e / 4, stream) and lane e % 4, so the same
// seed gives the same matrix on every device, in every process, in any order,
// and nothing is stored.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LOWRANK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LOWRANK_HOST_DEVICE inline
#endif

namespace lowrank {

struct Philox4 {
  uint32_t v[4];
};

LOWRANK_HOST_DEVICE void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = uint64_t(a) * uint64_t(b);
  hi = uint32_t(product >> 32);
  lo = uint32_t(product);
}

// Ten rounds of Philox4x32 on counter (c0, c1, c2, c3) with the 64-bit key `seed`.
LOWRANK_HOST_DEVICE Philox4 philox4x32(uint64_t counter, uint64_t stream, uint64_t seed) {
  uint32_t c0 = uint32_t(counter), c1 = uint32_t(counter >> 32);
  uint32_t c2 = uint32_t(stream), c3 = uint32_t(stream >> 32);
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(0xD2511F53u, c0, hi0, lo0);
    mul_hi_lo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Uniform in (0, 1], from the top 24 bits (exact in float32 and float64).
LOWRANK_HOST_DEVICE double uniform_open_closed(uint32_t bits) {
  return (double((bits >> 8) + 1u)) * (1.0 / 16777216.0);
}

// Element e of a standard-normal stream: Box-Muller on lanes (0, 1) or (2, 3).
template <typename Sincos, typename Log, typename Sqrt>
LOWRANK_HOST_DEVICE double normal_at(uint64_t e, uint64_t stream, uint64_t seed, Sincos sincos,
                                     Log log_fn, Sqrt sqrt_fn) {
  const Philox4 r = philox4x32(e >> 2, stream, seed);
  const int lane = int(e & 3u);
  const int pair = lane & 2;
  const double u1 = uniform_open_closed(r.v[pair]);
  const double u2 = uniform_open_closed(r.v[pair + 1]);
  const double radius = sqrt_fn(-2.0 * log_fn(u1));
  double s, c;
  sincos(6.283185307179586 * u2, s, c);
  return radius * ((lane & 1) ? s : c);
}

// Element e of a Rademacher (+1 / -1) stream.
LOWRANK_HOST_DEVICE double sign_at(uint64_t e, uint64_t stream, uint64_t seed) {
  const Philox4 r = philox4x32(e >> 7, stream, seed);
  const uint32_t word = r.v[(e >> 5) & 3u];
  return ((word >> (e & 31u)) & 1u) ? 1.0 : -1.0;
}

// Element e of a uniform integer stream on [0, n).
LOWRANK_HOST_DEVICE uint32_t index_at(uint64_t e, uint64_t stream, uint64_t seed, uint32_t n) {
  const Philox4 r = philox4x32(e >> 2, stream, seed);
  return uint32_t((uint64_t(r.v[e & 3u]) * n) >> 32);
}

}  // namespace lowrank
