// lowrank._C: CPU kernels on raw pointers. Each op family adds one bind_* line.
#include <pybind11/pybind11.h>

#include "lowrank/cpu.h"

namespace py = pybind11;

namespace lowrank {
void bind_kron(py::module_& m);
void bind_sketch(py::module_& m);
void bind_monarch(py::module_& m);
void bind_sltrain(py::module_& m);
}  // namespace lowrank

PYBIND11_MODULE(_C, m) {
  m.doc() = "lowrank CPU kernels (raw pointers; validated and dispatched from Python)";
  m.def(
      "isa", [] { return std::string(lowrank::isa_name(lowrank::cpu_isa())); },
      "Instruction set the CPU kernels dispatch to on this machine.");
#ifdef LOWRANK_OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
  lowrank::bind_kron(m);
  lowrank::bind_sketch(m);
  lowrank::bind_monarch(m);
  lowrank::bind_sltrain(m);
}
