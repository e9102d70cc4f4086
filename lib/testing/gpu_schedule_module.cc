// Python module `jax_psroi._gpu_schedule_testing`, built only with
// JAX_PSROI_TESTING=ON: the CUDA kernels' schedule run serially on the CPU,
// as FFI capsules the tests register (tests/cases.py). Not part of the
// product: the installed package has no such module by default.
#include <nanobind/nanobind.h>

#include "python_targets.h"
#include "targets.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

NB_MODULE(_gpu_schedule_testing, m) {
  m.doc() = "jax_psroi test rig: the CUDA kernels' schedule, serially on the CPU.";
  m.attr("ffi_api_version") = nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  m.def("targets",
        []() { return jax_psroi::python_targets(jax_psroi::gpu_schedule_testing_targets()); },
        "[(name, operation, direction, layout, dtype, capsule)], for the CPU platform.");
  m.def("nms_targets",
        []() { return jax_psroi::python_targets(jax_psroi::nms_schedule_testing_targets()); },
        "Non-maximum suppression's CUDA schedule, one target per dtype, in the same form.");
  m.def("deform_targets",
        []() { return jax_psroi::python_targets(jax_psroi::deform_schedule_testing_targets()); },
        "Deformable RoI Align's CUDA kernels, in the same form.");
}
