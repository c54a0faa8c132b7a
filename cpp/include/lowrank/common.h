// Definitions shared by the CPU (cpp/) and CUDA (cuda/) modules: dtype codes
// that Python passes across the boundary, and raw-pointer helpers. No torch here.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace lowrank {

// Must match python/lowrank/_native.py (DTYPE_CODES).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

template <typename T>
inline T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline std::string dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
  }
  return "unknown";
}

// Calls fn(I{}) with I the integer type of an index tensor: code 0 int32, 1 int64.
template <typename Fn>
void dispatch_index(int index_code, Fn&& fn) {
  if (index_code == 0)
    fn(int32_t{});
  else
    fn(int64_t{});
}

}  // namespace lowrank
