// CPU-side infrastructure: dtype dispatch, instruction-set selection at run
// time and a parallel loop over torch's OpenMP pool.
#pragma once

#include <algorithm>
#include <cstdint>

#include "lowrank/common.h"

#ifdef LOWRANK_OPENMP
#include <omp.h>
#endif

#define LOWRANK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace lowrank {

// Calls fn(T{}) with T the C++ type of a CPU floating dtype (float32, float64).
template <typename Fn>
void dispatch_cpu_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: fn(float{}); return;
    case DType::Float64: fn(double{}); return;
    default:
      throw std::invalid_argument("lowrank CPU kernels take float32 or float64, got " +
                                  dtype_name(dtype));
  }
}

// Instruction sets the hot kernels are compiled for; chosen once per process.
enum class Isa : int { Base = 0, Avx2 = 1, Avx512 = 2 };

inline Isa cpu_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Base;
  }();
  return isa;
#else
  return Isa::Base;
#endif
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "baseline";
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWRANK_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma")))
#define LOWRANK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define LOWRANK_HAS_ISA_TARGETS 1
#else
#define LOWRANK_TARGET_AVX512
#define LOWRANK_TARGET_AVX2
#define LOWRANK_HAS_ISA_TARGETS 0
#endif

// Runs fn(begin, end, thread) over [0, n) split into contiguous chunks, on at
// most `threads` threads (Python passes torch.get_num_threads()). Chunks hold at
// least `grain` items so tiny problems stay on one thread.
template <typename Fn>
void parallel_chunks(int64_t n, int threads, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  const int64_t max_by_grain = std::max<int64_t>(1, n / std::max<int64_t>(1, grain));
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, max_by_grain)));
  if (nt == 1) {
    fn(int64_t{0}, n, 0);
    return;
  }
#ifdef LOWRANK_OPENMP
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    const int count = omp_get_num_threads();
    const int64_t begin = n * tid / count;
    const int64_t end = n * (tid + 1) / count;
    if (begin < end) fn(begin, end, tid);
  }
#else
  fn(int64_t{0}, n, 0);
#endif
}

// Number of threads parallel_chunks will use for the same arguments.
inline int chunk_threads(int64_t n, int threads, int64_t grain) {
#ifdef LOWRANK_OPENMP
  const int64_t max_by_grain = std::max<int64_t>(1, n / std::max<int64_t>(1, grain));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, max_by_grain)));
#else
  return 1;
#endif
}

}  // namespace lowrank
