// Python module `jax_psroi._cpu`: the CPU handlers as FFI capsules.
#include <nanobind/nanobind.h>

#include "python_targets.h"
#include "targets.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

NB_MODULE(_cpu, m) {
  m.doc() = "jax_psroi CPU kernels as XLA FFI handlers.";
  m.attr("ffi_api_version") =
      nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.def("targets", []() { return jax_psroi::python_targets(jax_psroi::cpu_targets()); },
        "The product's targets: [(name, operation, direction, layout, dtype, capsule)].");
  m.def("gpu_schedule_targets",
        []() { return jax_psroi::python_targets(jax_psroi::cpu_gpu_schedule_targets()); },
        "Test-only targets running the CUDA kernels' schedule serially on the CPU.");
}
