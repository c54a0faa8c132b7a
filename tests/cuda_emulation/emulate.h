// Runs CUDA kernels on the CPU, for tests on machines without a GPU.
//
// Included before a kernel header (cuda/*_kernels.cuh) and compiled as C++20 by the host
// compiler; each emulation library is one translation unit (an *_entry.cpp file).
//
// - Blocks run one after another. The threads of a block are scheduled as the environment
//   variable LOWRANK_EMULATION_SCHEDULE says:
//   `adversarial` (the default): each CUDA thread is a fiber (ucontext) and one runs at a
//   time, until it reaches a barrier or returns, in increasing thread order in one phase and
//   decreasing order in the next (a phase ends at a __syncthreads; blocks alternate the first
//   direction). A read of shared memory that no barrier orders after the write it needs then
//   runs before that write in one of the two orders and reads poison: a missing barrier
//   fails deterministically, not by timing luck.
//   `parallel`: each CUDA thread is a std::thread and all run at once, for ThreadSanitizer
//   (scripts/sanitize), which sees the barriers as synchronisation.
// - __syncthreads and __syncwarp are barriers of the block and of the warp that check that
//   all their threads reach the same barrier (source line) and none has returned; a block
//   that cannot progress is reported and released (its barriers are then no-ops).
// - Dynamic shared memory is 128-byte aligned (as cuda/device.cuh declares it), poisoned
//   with 0x7fff in every 16-bit half (NaN read as float32, float16 or bfloat16) and lies
//   between guard zones that are checked after the block: a write outside it is reported.
// - nvcuda::wmma (wmma.h) checks the pointer alignment and ldm rules of the CUDA programming
//   guide; each *_sync call waits for the whole warp, which checks that its lanes make the
//   same call with the same arguments.
//
// A failed check is recorded (the first message is kept) and the kernel runs on; the caller
// of an entry point reads it with emulation_take_error(). This checks index math,
// shared-memory layout, barriers and reductions with the very source nvcc compiles; it
// cannot show races between blocks, or speed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <source_location>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// cuda_fp16.h defines these for a host compiler already; here they mean plain C++.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct EmulatedDim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emulation {

inline thread_local EmulatedDim3 thread_index, block_index;
inline EmulatedDim3 block_size, grid_size;
inline thread_local float* shared_words = nullptr;

// ---- errors and barrier sites -------------------------------------------------------------------

inline std::mutex report_mutex;
inline std::string first_error;  // empty: none since the last emulation_take_error()
inline std::set<std::pair<std::string, unsigned>> barrier_sites;
inline std::pair<std::string, unsigned> skipped_barrier;  // a barrier to leave out (tests)

inline void fail(const std::string& message) {
  std::lock_guard lock(report_mutex);
  if (first_error.empty()) first_error = message;
}

inline const char* file_of(const std::source_location& site) {
  const char* slash = std::strrchr(site.file_name(), '/');
  return slash ? slash + 1 : site.file_name();
}

inline std::string where(const std::source_location& site) {
  return std::string(file_of(site)) + ":" + std::to_string(site.line());
}

inline bool same_site(const std::source_location& a, const std::source_location& b) {
  return a.line() == b.line() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

// ---- threads of a block ---------------------------------------------------------------------

enum class Schedule { adversarial, parallel };

inline Schedule schedule_from_environment() {
  const char* value = std::getenv("LOWRANK_EMULATION_SCHEDULE");
  return value && std::strcmp(value, "parallel") == 0 ? Schedule::parallel : Schedule::adversarial;
}

// A lane's WMMA *_sync calls since its warp last converged (a barrier): their number and a
// hash of (operation, pointer, ldm, layout, call site), which must agree across the warp.
struct LaneCalls {
  std::uint64_t count = 0, hash = 0;
  std::source_location first;
};

// __syncthreads of the block or __syncwarp of one warp: threads [first, first + size).
struct Barrier {
  unsigned first = 0, size = 0;
  bool block = false;
  unsigned arrived = 0, returned = 0;
  std::uint64_t generation = 0;
  std::source_location site;  // where this phase's first thread arrived
};

class Block {
 public:
  Block(unsigned index, unsigned size, Schedule schedule)
      : index_(index),
        size_(size),
        schedule_(schedule),
        state_(size, State::runnable),
        waiting_on_(size, nullptr),
        calls_(size) {
    block_.size = size;
    block_.block = true;
    for (unsigned w = 0; w * 32 < size; ++w) {
      Barrier warp;
      warp.first = w * 32;
      warp.size = std::min(32u, size - w * 32);
      warps_.push_back(warp);
    }
  }

  // Runs body(thread) for each of the block's threads, under the block's schedule.
  template <class Body>
  void run(Body body) {
    if (adversarial())
      run_fibers(body);
    else
      run_threads(body);
    check_lanes(0, size_);  // the end of the kernel is the warps' last convergence
  }

  // The calling thread arrives at __syncthreads (block), or at __syncwarp or a WMMA *_sync call
  // of its warp, and waits there until every thread of the block (warp) has.
  void arrive(bool block, const std::source_location& site) {
    const unsigned t = current_thread;
    Barrier& barrier = block ? block_ : warps_[t / 32];
    std::unique_lock lock(mutex_, std::defer_lock);
    if (!adversarial()) lock.lock();
    if (broken_) return;
    if (barrier.arrived == 0) {
      barrier.site = site;
    } else if (!same_site(barrier.site, site)) {
      fail(name(barrier) + ": thread " + std::to_string(t) + " waits at " + where(site) +
           " while others wait at " + where(barrier.site) +
           " (all threads must reach the same barrier)");
    }
    ++barrier.arrived;
    const std::uint64_t generation = barrier.generation;
    const bool completes = barrier.arrived + barrier.returned == barrier.size;
    if (completes) {
      complete(barrier);
    } else {
      state_[t] = State::waiting;
      waiting_on_[t] = &barrier;
    }
    if (adversarial()) {
      swapcontext(&fibers_[t].context, &scheduler_);  // the scheduler picks who runs next
    } else if (completes) {
      changed_.notify_all();
    } else if (!changed_.wait_for(lock, std::chrono::seconds(60),
                                  [&] { return broken_ || barrier.generation != generation; })) {
      release_stuck("no thread arrived for 60 s");
    }
  }

  LaneCalls& calls(unsigned thread) { return calls_[thread]; }

  static inline thread_local Block* current = nullptr;
  static inline thread_local unsigned current_thread = 0;

 private:
  enum class State { runnable, waiting, done };

  // An emulated thread of the adversarial schedule: a fiber on the calling OS thread.
  struct Fiber {
    static constexpr std::size_t kStack = 256 * 1024;
    ucontext_t context;
    std::unique_ptr<char[]> stack;
  };

  bool adversarial() const { return schedule_ == Schedule::adversarial; }

  // Adversarial: one fiber at a time, each until it reaches a barrier or returns; the
  // scheduler (this OS thread) then picks the next runnable one.
  template <class Body>
  void run_fibers(Body& body) {
    static thread_local Body* start_body;
    static thread_local Block* start_block;
    start_body = &body;
    start_block = this;
    fibers_ = std::vector<Fiber>(size_);
    for (unsigned t = 0; t < size_; ++t) {
      Fiber& fiber = fibers_[t];
      fiber.stack.reset(new char[Fiber::kStack]);
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = Fiber::kStack;
      fiber.context.uc_link = &scheduler_;  // a returning thread goes back to the scheduler
      makecontext(
          &fiber.context,
          [] {
            const unsigned t = current_thread;
            (*start_body)(t);
            start_block->finish(t);
          },
          0);
    }
    current = this;
    for (;;) {
      int next = pick();
      if (next < 0 && std::find(state_.begin(), state_.end(), State::waiting) != state_.end()) {
        release_stuck("no thread can run");
        next = pick();
      }
      if (next < 0) break;
      current_thread = unsigned(next);
      thread_index = {unsigned(next)};
      swapcontext(&scheduler_, &fibers_[next].context);
    }
  }

  // Parallel: every thread at once, for ThreadSanitizer.
  template <class Body>
  void run_threads(Body& body) {
    std::vector<std::thread> threads;
    threads.reserve(size_);
    for (unsigned t = 0; t < size_; ++t)
      threads.emplace_back([this, t, &body] {
        current = this;
        current_thread = t;
        body(t);
        finish(t);
      });
    for (auto& thread : threads) thread.join();
  }

  std::string name(const Barrier& barrier) const {
    return "block " + std::to_string(index_) +
           (barrier.block ? std::string(", __syncthreads")
                          : ", warp " + std::to_string(barrier.first / 32) + ", __syncwarp");
  }

  // Every thread of the barrier arrived or returned: the next phase starts.
  void complete(Barrier& barrier) {
    if (barrier.returned != 0)
      fail(name(barrier) + " at " + where(barrier.site) + ": " + std::to_string(barrier.returned) +
           " thread(s) returned while the others wait");
    check_lanes(barrier.first, barrier.first + barrier.size);
    barrier.arrived = 0;
    ++barrier.generation;
    if (barrier.block) ++phase_;
    for (unsigned t = barrier.first; t < barrier.first + barrier.size; ++t)
      if (waiting_on_[t] == &barrier) {
        waiting_on_[t] = nullptr;
        state_[t] = State::runnable;
      }
  }

  // Thread t returned from the kernel.
  void finish(unsigned t) {
    std::unique_lock lock(mutex_, std::defer_lock);
    if (!adversarial()) lock.lock();
    state_[t] = State::done;
    bool released = false;
    for (Barrier* barrier : {&block_, &warps_[t / 32]}) {
      ++barrier->returned;
      if (!broken_ && barrier->arrived != 0 &&
          barrier->arrived + barrier->returned == barrier->size) {
        complete(*barrier);
        released = true;
      }
    }
    if (released && !adversarial()) changed_.notify_all();
  }

  // Adversarial schedule: the lowest (or highest) runnable thread, -1 when none.
  int pick() const {
    const bool forward = (phase_ + index_) % 2 == 0;
    for (unsigned i = 0; i < size_; ++i) {
      const unsigned t = forward ? i : size_ - 1 - i;
      if (state_[t] == State::runnable) return int(t);
    }
    return -1;
  }

  // The block cannot progress: reports where its threads wait and lets them all run on.
  void release_stuck(const char* why) {
    std::string message = "block " + std::to_string(index_) + " cannot progress (" + why + "):";
    auto describe = [&](const Barrier& barrier) {
      if (barrier.arrived != 0)
        message += " " + std::to_string(barrier.arrived) + " of " + std::to_string(barrier.size) +
                   " threads wait at " + name(barrier) + " (" + where(barrier.site) + "), " +
                   std::to_string(barrier.returned) + " returned;";
    };
    describe(block_);
    for (const Barrier& warp : warps_) describe(warp);
    fail(message);
    broken_ = true;
    for (unsigned t = 0; t < size_; ++t)
      if (state_[t] == State::waiting) state_[t] = State::runnable;
    changed_.notify_all();
  }

  // The lanes of each warp in [begin, end) made the same WMMA *_sync calls; then forgets them.
  void check_lanes(unsigned begin, unsigned end) {
    for (unsigned w = begin / 32; w * 32 < end; ++w) {
      const unsigned first = w * 32, last = std::min(first + 32, size_);
      for (unsigned t = first + 1; t < last; ++t)
        if (calls_[t].count != calls_[first].count || calls_[t].hash != calls_[first].hash) {
          const LaneCalls& a = calls_[first].count ? calls_[first] : calls_[t];
          fail("block " + std::to_string(index_) + ", warp " + std::to_string(w) +
               ": lane 0 made " + std::to_string(calls_[first].count) +
               " WMMA *_sync calls and lane " + std::to_string(t - first) + " made " +
               std::to_string(calls_[t].count) +
               " different ones since the warp last converged (from " + where(a.first) +
               "); every lane must make each call, with the same arguments");
          break;
        }
      for (unsigned t = first; t < last; ++t) calls_[t] = LaneCalls{};
    }
  }

  const unsigned index_, size_;
  const Schedule schedule_;
  std::mutex mutex_;
  std::condition_variable changed_;  // parallel schedule: a barrier completed
  std::vector<State> state_;
  std::vector<Barrier*> waiting_on_;
  std::vector<LaneCalls> calls_;
  Barrier block_;
  std::vector<Barrier> warps_;
  std::vector<Fiber> fibers_;  // adversarial schedule
  ucontext_t scheduler_;
  unsigned phase_ = 0;
  bool broken_ = false;
};

// A WMMA *_sync call of the calling lane: recorded (see LaneCalls), then, as the CUDA
// programming guide describes these calls, the lane waits until all lanes of its warp have
// arrived at it before it runs.
inline void warp_call(const char* operation, const void* pointer, unsigned ldm, int layout,
                      const std::source_location& site) {
  LaneCalls& calls = Block::current->calls(Block::current_thread);
  if (calls.count++ == 0) calls.first = site;
  std::uint64_t h = calls.hash ^ 0x9e3779b97f4a7c15ull;
  for (std::uint64_t v : {std::uint64_t(std::hash<std::string_view>{}(operation)),
                          std::uint64_t(reinterpret_cast<std::uintptr_t>(pointer)),
                          std::uint64_t(ldm), std::uint64_t(layout), std::uint64_t(site.line())})
    h = (h ^ v) * 0x100000001b3ull;
  calls.hash = h;
  Block::current->arrive(false, site);
}

// ---- shared memory ------------------------------------------------------------------------

// One block's dynamic shared memory: 128-byte aligned, poisoned, between guard zones.
class SharedMemory {
 public:
  static constexpr std::size_t kGuard = 256;

  explicit SharedMemory(std::size_t bytes)
      : bytes_(bytes), total_((2 * kGuard + bytes + 127) / 128 * 128) {
    base_ = static_cast<unsigned char*>(std::aligned_alloc(128, total_));
    for (std::size_t i = 0; i < total_; ++i) base_[i] = poison(i);
  }
  ~SharedMemory() { std::free(base_); }
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  float* data() const { return reinterpret_cast<float*>(base_ + kGuard); }

  // What the block wrote outside its bytes, or an empty string.
  std::string overrun() const {
    for (std::size_t i = kGuard + bytes_; i < total_; ++i)
      if (base_[i] != poison(i))
        return "wrote byte " + std::to_string(i - kGuard) + " of shared memory, beyond the " +
               std::to_string(bytes_) + " bytes it was launched with";
    for (std::size_t i = 0; i < kGuard; ++i)
      if (base_[i] != poison(i))
        return "wrote shared memory " + std::to_string(kGuard - i) + " bytes before its start";
    return {};
  }

 private:
  // 0x7fff in every little-endian 16-bit half (kGuard and the alignment are even).
  static unsigned char poison(std::size_t i) { return i % 2 == 0 ? 0xff : 0x7f; }

  std::size_t bytes_, total_;
  unsigned char* base_;
};

}  // namespace emulation

#define threadIdx (emulation::thread_index)
#define blockIdx (emulation::block_index)
#define blockDim (emulation::block_size)
#define gridDim (emulation::grid_size)
#define LOWRANK_SHARED_FLOATS(name) float* name = emulation::shared_words

namespace emulation {

inline void barrier(bool block, const std::source_location& site) {
  {
    std::lock_guard lock(report_mutex);
    if (skipped_barrier.second == site.line() && skipped_barrier.first == file_of(site)) return;
    barrier_sites.emplace(file_of(site), site.line());
  }
  Block::current->arrive(block, site);
}

}  // namespace emulation

inline void __syncthreads(const std::source_location& site = std::source_location::current()) {
  emulation::barrier(true, site);
}

// The kernels call it with every lane of the warp (full mask), the only form emulated.
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       const std::source_location& site = std::source_location::current()) {
  if (mask != 0xffffffffu) emulation::fail(emulation::where(site) + ": partial __syncwarp mask");
  emulation::barrier(false, site);
}

inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value);
}

namespace emulation {

// kernel<<<grid, block, shared_bytes>>>(args...), on the CPU.
template <class Kernel, class... Args>
void launch(unsigned grid, unsigned block, std::size_t shared_bytes, Kernel kernel, Args... args) {
  grid_size = {grid};
  block_size = {block};
  const Schedule schedule = schedule_from_environment();
  for (unsigned b = 0; b < grid; ++b) {
    SharedMemory shared(shared_bytes);
    Block threads(b, block, schedule);
    threads.run([&](unsigned t) {
      thread_index = {t};
      block_index = {b};
      shared_words = shared.data();
      kernel(args...);
    });
    if (const std::string overrun = shared.overrun(); !overrun.empty())
      fail("block " + std::to_string(b) + " " + overrun);
  }
}

}  // namespace emulation

// Read by the tests through ctypes (one emulation library per translation unit).
extern "C" {

// The first error caught since the last call, or NULL; then forgets it.
const char* emulation_take_error() {
  static std::string taken;
  std::lock_guard lock(emulation::report_mutex);
  taken = std::move(emulation::first_error);
  emulation::first_error.clear();
  return taken.empty() ? nullptr : taken.c_str();
}

// Leaves out the barrier at file:line (a file name without folders; line 0: none), to show
// that the emulation catches a kernel without it.
void emulation_skip_barrier(const char* file, unsigned line) {
  std::lock_guard lock(emulation::report_mutex);
  emulation::skipped_barrier = {file, line};
}

// The barriers reached since the last call, as "file:line" separated by spaces; then forgets them.
const char* emulation_barrier_sites() {
  static std::string sites;
  std::lock_guard lock(emulation::report_mutex);
  sites.clear();
  for (const auto& [file, line] : emulation::barrier_sites)
    sites += (sites.empty() ? "" : " ") + file + ":" + std::to_string(line);
  emulation::barrier_sites.clear();
  return sites.c_str();
}
}

#include "wmma.h"
