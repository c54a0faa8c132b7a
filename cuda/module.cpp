// lowrank._cuda: CUDA kernels on raw pointers and a stream. Each op family adds
// one bind_* line. The CUDA runtime is linked statically, so importing this
// module needs no GPU and no driver; calls fail cleanly without one.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace lowrank {
void bind_kron(py::module_& m);
void bind_sketch(py::module_& m);
void bind_monarch(py::module_& m);
void bind_sltrain(py::module_& m);
}  // namespace lowrank

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "lowrank CUDA kernels (raw pointers and streams; validated and dispatched from Python)";
  m.attr("cuda_version") = LOWRANK_CUDA_VERSION;
  m.attr("architectures") = LOWRANK_CUDA_ARCHS;
  m.def("device_count", [] {
    int count = 0;
    return cudaGetDeviceCount(&count) == cudaSuccess ? count : 0;
  });
  lowrank::bind_kron(m);
  lowrank::bind_sketch(m);
  lowrank::bind_monarch(m);
  lowrank::bind_sltrain(m);
}
