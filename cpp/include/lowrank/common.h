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

}  // namespace lowrank
