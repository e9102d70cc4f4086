// Python module `jax_psroi._cuda`: the CUDA handlers as FFI capsules. It
// links the CUDA runtime statically and touches no device at import, so it
// imports on machines without a GPU (where jax.export for cuda still works).
#include <cuda_runtime_api.h>
#include <nanobind/nanobind.h>

#include "python_targets.h"
#include "targets.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

NB_MODULE(_cuda, m) {
  m.doc() = "jax_psroi CUDA kernels as XLA FFI handlers.";
  m.attr("ffi_api_version") =
      nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  // Same target names as the CPU's, registered for platform "CUDA".
  m.def("targets", []() { return jax_psroi::python_targets(jax_psroi::cuda_targets()); },
        "[(name, operation, direction, layout, dtype, capsule)]");
  m.def("nms_targets",
        []() { return jax_psroi::python_targets(jax_psroi::cuda_nms_targets()); },
        "Non-maximum suppression's, one per dtype, in the same form.");
  m.def("deform_targets",
        []() { return jax_psroi::python_targets(jax_psroi::cuda_deform_targets()); },
        "Deformable RoI Align's, in the same form.");
  // CUDA runtime version compiled in (static runtime), e.g. 13000.
  m.def("cuda_runtime_version", []() { return CUDART_VERSION; });
}
