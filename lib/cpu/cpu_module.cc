// Python module `jax_psroi._cpu`: the CPU handlers as FFI capsules.
#include <nanobind/nanobind.h>

#include "gpu_schedule.h"
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
  // Here rather than in _cuda: exporting for CUDA works without a CUDA build.
  m.def(
      "cuda_workspace_elements",
      [](bool backward, int64_t num_images, int64_t num_rois, int64_t height,
         int64_t pooled_h, int64_t pooled_w) {
        jax_psroi::PsRoiDims d{};
        d.num_images = num_images;
        d.num_rois = num_rois;
        d.height = height;
        d.pooled_h = pooled_h;
        d.pooled_w = pooled_w;
        return jax_psroi::gpu_schedule::workspace_elements(d, backward);
      },
      "Int32 elements of a CUDA call's workspace (lib/gpu_schedule.h).");
}
